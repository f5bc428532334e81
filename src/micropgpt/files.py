"""Files and directories that a crash, a full disk or a concurrent run cannot leave half-made or shared."""

from __future__ import annotations

import itertools
import os
import re
import secrets
from collections.abc import Iterable
from pathlib import Path

# atomic_write's temporary files are `.<target name>.<8 random characters>.micropgpt.tmp`: hidden,
# beside their target, and named so that no file of anyone else's is taken for one.
TEMPORARY_SUFFIX = ".micropgpt.tmp"
_TEMPORARY_NAME = re.compile(r"\..+\.[a-z0-9_]{8}" + re.escape(TEMPORARY_SUFFIX))


def atomic_write(target: Path, write) -> None:
    """Call `write(file)` on a temporary file beside `target`, fsync, then rename it into place.

    Readers see the old file or the whole new one, never a part; on any error the temporary file
    is removed and `target` is untouched. The file gets the permissions `open(target, "w")` would
    give it (0666 less the umask), so a cache or run dir shared by a group stays readable by it.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temporary_file(target)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _create_temporary_file(target: Path) -> tuple[int, Path]:
    """A new file beside `target` for atomic_write, created as open() creates files: mode 0666 less
    the umask (tempfile.mkstemp's are 0600, readable by their owner only)."""
    while True:
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}{TEMPORARY_SUFFIX}")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue


def remove_stale_temporary_files(directories: Iterable[Path]) -> list[Path]:
    """Remove the temporary files that atomic_writes killed before their rename left in `directories`
    (not in their subdirectories); return their paths.

    Only where no atomic_write can be running: a run's own directories, as the run starts.
    """
    removed = []
    for directory in dict.fromkeys(directories):
        if not directory.is_dir():
            continue
        for path in sorted(directory.iterdir()):
            if not (_TEMPORARY_NAME.fullmatch(path.name) and path.is_file() and not path.is_symlink()):
                continue
            try:
                path.unlink()
            except OSError:  # a read-only dir: the run's first write there will say so
                continue
            removed.append(path)
    return removed


def claim_new_dir(path: Path) -> Path:
    """Create and return `path`, or else `path-1`, `path-2`, ...: the first that did not exist.

    mkdir either creates a directory or fails because it exists, in one step, so two processes
    that claim the same path at the same moment get two different directories.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    for n in itertools.count():
        candidate = path if n == 0 else path.with_name(f"{path.name}-{n}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate
