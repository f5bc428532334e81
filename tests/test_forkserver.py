"""tests/forkserver.py, which runs the scripts for most tests: what a script sees and gives back
through it is what it sees and gives back as `python script.py`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import forkserver
import pytest

REPORT = """\
import json, os, random, sys
import torch
print(json.dumps({
    "argv": sys.argv, "cwd": os.getcwd(), "path0": sys.path[0], "answer": os.environ.get("ANSWER"),
    "stdin": sys.stdin.read(), "main": __name__, "torch": torch.rand(1).item(), "random": random.random(),
    "encoding": sys.stdout.encoding,
}))
print("to stderr: é", file=sys.stderr)
sys.exit(int(os.environ.get("EXIT", "0")))
"""


@pytest.fixture
def script(tmp_path) -> Path:
    path = tmp_path / "scripts" / "report.py"
    path.parent.mkdir()
    path.write_text(REPORT)
    return path


def test_a_script_gets_and_gives_what_python_script_py_would(script, tmp_path):
    argv = [sys.executable, str(script), "a b", "ü=1"]
    env = {**os.environ, "ANSWER": "42", "EXIT": "3", "PYTHONIOENCODING": "utf-8"}
    forked = forkserver.run(argv, cwd=tmp_path, env=env, timeout=120)
    again = forkserver.run(argv, cwd=tmp_path, env=env, timeout=120)
    plain = subprocess.run(
        argv, cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120
    )
    for result in (forked, again):
        assert (result.returncode, result.stderr) == (plain.returncode, plain.stderr) == (3, "to stderr: é\n")
    reports = [json.loads(result.stdout) for result in (forked, again, plain)]
    draws = {name: {report.pop(name) for report in reports} for name in ("torch", "random")}
    assert reports[0] == reports[1] == reports[2]
    assert reports[0]["argv"] == [str(script), "a b", "ü=1"] and reports[0]["main"] == "__main__"
    assert reports[0]["path0"] == str(script.parent) and reports[0]["stdin"] == ""
    assert all(len(values) == 3 for values in draws.values())  # every process draws its own seeds


def test_a_script_past_its_timeout_is_killed(tmp_path):
    script, pid_file = tmp_path / "sleep.py", tmp_path / "pid"
    script.write_text("import os, time\nopen('pid', 'w').write(str(os.getpid()))\ntime.sleep(60)\n")
    with pytest.raises(subprocess.TimeoutExpired):
        forkserver.run([sys.executable, str(script)], cwd=tmp_path, env=dict(os.environ), timeout=5)
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    raise AssertionError(f"process {pid} still runs after its timeout")
