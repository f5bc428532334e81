"""Files and directories that a crash, a full disk or a concurrent run cannot leave half-made or shared."""

from __future__ import annotations

import itertools
import os
import tempfile
from pathlib import Path


def atomic_write(target: Path, write) -> None:
    """Call `write(file)` on a temporary file beside `target`, fsync, then rename it into place.

    Readers see the old file or the whole new one, never a part; on any error the temporary file
    is removed and `target` is untouched.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
