"""Run the project's scripts (train.py, eval.py, generate.py) in forked copies of a process that has
already imported torch, Lightning and Hydra.

Every `python train.py` pays several seconds of imports before it reads its first argument, and
the tests run hundreds of them. `run` gives what `subprocess.run([sys.executable, script, ...])`
gives (stdout, stderr, exit status; a process of its own, killed on timeout), but the process is a
fork of a server that has done those imports once. Each request is forked twice: a waiter, which
reports the exit status, and under it the script's process, in a session of its own, which runs
the script with runpy as `python script.py` would (its argv, working directory, environment,
stdin from /dev/null, fresh random seeds, the normal interpreter exit with atexit handlers).

Requests whose environment differs from the server's in what is read at start-up or on import
(STARTUP_PREFIXES: the locale, PYTHON* settings other than output encoding and buffering, HOME,
TMPDIR, thread and torch settings) run as plain subprocesses.
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# What the scripts import before they do anything: imported once, here.
PRELOAD = (
    "lightning.pytorch",
    "hydra",
    "micropgpt.hydra_app",
    "micropgpt.module",
    "micropgpt.data",
    "micropgpt.callbacks",
    "micropgpt.evaluation",
    "micropgpt.sampling",
)
# Read at start-up or on import (by Python, torch, OpenMP, tempfile): a request that sets them
# otherwise than the server runs as a plain subprocess. The output's encoding and buffering
# (RUNTIME_ONLY) are set anew in each fork.
STARTUP_PREFIXES = ("PYTHON", "LC_", "LANG", "HOME", "TMPDIR", "OMP_", "MKL_", "TORCH", "CUDA")
RUNTIME_ONLY = {"PYTHONUNBUFFERED", "PYTHONIOENCODING"}


def _serve(socket_path: str) -> None:
    for module in PRELOAD:
        __import__(module)
    # The imported modules live as long as the server: out of the collector's sight, a fork's
    # exit does not walk them all (seconds), as the gc docs advise for forking servers.
    gc.freeze()
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(socket_path)
    listener.listen()
    print("ready", flush=True)
    client = os.getppid()
    listener.settimeout(5)
    while True:
        try:
            connection, _ = listener.accept()
        except TimeoutError:
            if os.getppid() != client:  # the test process is gone, without stopping its server
                return
            continue
        connection.settimeout(None)
        if os.fork() == 0:
            listener.close()
            _wait_for_script(connection)
        connection.close()
        while True:  # reap the waiters that have finished
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break


def _wait_for_script(connection: socket.socket) -> None:
    """The waiter: fork the script's process, tell the client its pid, then its exit status."""
    request = json.loads(connection.makefile("r").readline())
    pid = os.fork()
    if pid == 0:
        _run_script(request, connection)
    connection.sendall(f"{pid}\n".encode())
    _, status = os.waitpid(pid, 0)
    connection.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
    os._exit(0)


def _run_script(request: dict, connection: socket.socket) -> None:
    """Become `python script args...`; returns only by the interpreter's exit."""
    connection.close()
    os.setsid()
    stdin = os.open(os.devnull, os.O_RDONLY)
    stdout = os.open(request["stdout"], os.O_WRONLY)
    stderr = os.open(request["stderr"], os.O_WRONLY)
    for fd, target in ((stdin, 0), (stdout, 1), (stderr, 2)):
        os.dup2(fd, target)
        os.close(fd)
    env = request["env"]
    encoding, _, errors = env.get("PYTHONIOENCODING", "").partition(":")
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(
            encoding=encoding or None,
            errors=errors or None,
            write_through="PYTHONUNBUFFERED" in env or stream is sys.stderr,
        )
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(env)
    script = request["argv"][1]
    sys.argv = request["argv"][1:]
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    _fresh_random_state()
    import runpy

    runpy.run_path(script, run_name="__main__")
    sys.exit(0)


def _fresh_random_state() -> None:
    """A new process draws new seeds; a fork would repeat the server's."""
    import random

    import numpy
    import torch

    random.seed()
    numpy.random.seed()
    torch.seed()


class _Server:
    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="forkserver-")
        self.socket_path = os.path.join(self.dir, "socket")
        self.env = dict(os.environ)
        self.process = subprocess.Popen(
            [sys.executable, __file__, self.socket_path],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        if self.process.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the fork server did not start (exit {self.process.wait()})")
        atexit.register(self.stop)

    def serves(self, argv: list[str], env: dict[str, str]) -> bool:
        if argv[0] != sys.executable or len(argv) < 2 or not argv[1].endswith(".py"):
            return False
        keys = (set(env) | set(self.env)) - RUNTIME_ONLY
        return all(env.get(k) == self.env.get(k) for k in keys if k.startswith(STARTUP_PREFIXES))

    def run(
        self, argv: list[str], cwd: Path, env: dict[str, str], timeout: float
    ) -> subprocess.CompletedProcess:
        with tempfile.TemporaryDirectory(dir=self.dir) as out:
            paths = {name: os.path.join(out, name) for name in ("stdout", "stderr")}
            for path in paths.values():
                Path(path).touch()
            request = {"argv": argv, "cwd": str(cwd), "env": env, **paths}
            with socket.socket(socket.AF_UNIX) as connection:
                connection.connect(self.socket_path)
                connection.sendall((json.dumps(request) + "\n").encode())
                replies = _Lines(connection)
                pid = int(replies.next(timeout=60))
                try:
                    returncode = int(replies.next(timeout))
                except TimeoutError:
                    os.killpg(pid, signal.SIGKILL)
                    raise subprocess.TimeoutExpired(argv, timeout) from None
            stdout, stderr = (Path(paths[name]).read_text() for name in ("stdout", "stderr"))
        return subprocess.CompletedProcess(argv, returncode, stdout, stderr)

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()
        Path(self.socket_path).unlink(missing_ok=True)
        os.rmdir(self.dir)


class _Lines:
    """The lines the waiter sends, each read within a timeout."""

    def __init__(self, connection: socket.socket) -> None:
        self.connection, self.buffer = connection, b""

    def next(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            self.connection.settimeout(max(deadline - time.monotonic(), 0.001))
            data = self.connection.recv(4096)  # TimeoutError past the deadline
            if not data:
                raise RuntimeError("the fork server's waiter closed the connection")
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode()


_server: _Server | None = None


def run(argv: list[str], cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """subprocess.run(argv, cwd=cwd, env=env, stdin=DEVNULL, capture_output=True, text=True,
    timeout=timeout), through the fork server where it gives the same result."""
    global _server
    if _server is None:
        _server = _Server()
    if not _server.serves(argv, env):
        return subprocess.run(
            argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout
        )
    return _server.run(argv, cwd, env, timeout)


if __name__ == "__main__":
    _serve(sys.argv[1])
