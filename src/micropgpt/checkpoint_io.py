"""Checkpoint writes that a crash, a kill or a full disk cannot leave half-done.

Lightning's own TorchCheckpointIO (2.6) writes through an fsspec transaction: a temporary file
in the system temp dir, no fsync, then `shutil.move`, which copies into the target in place when
the temp dir is another file system (a tmpfs /tmp), so a kill during that copy truncates
last.ckpt. Here the temporary file sits beside the target, is fsynced, then renamed over it.
Checkpoint paths that are URLs (s3://, gs://, memory://) are left to Lightning's fsspec writer: an
object store replaces a whole object at once anyway.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from fsspec.core import split_protocol
from lightning.pytorch.plugins.io import TorchCheckpointIO

from micropgpt.errors import UserError
from micropgpt.files import atomic_write


class AtomicCheckpointIO(TorchCheckpointIO):
    """A checkpoint file is the previous one or the whole new one, never a part of either."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if is_url(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        target = Path(path)
        try:
            atomic_write(target, lambda f: torch.save(checkpoint, f))
        except (OSError, RuntimeError) as e:
            reason = _os_reason(e)
            if reason is None:
                raise
            kept = "the previous one is kept" if target.exists() else "none was written"
            raise UserError(
                f"could not write checkpoint {target} ({reason}); {kept}: free space or fix the "
                "output directory (hydra.run.dir=...), then resume with ckpt_path=last"
            ) from None


def is_url(path) -> bool:
    """Whether `path` names a file of another file system than the local one (s3://bucket/...)."""
    protocol, _ = split_protocol(str(path))
    return protocol not in (None, "file")


def _os_reason(error: BaseException) -> str | None:
    """The file system's reason for a failed write: torch.save raises a RuntimeError about its
    zip writer, with the OSError (disk full, file too large, read-only) as its context."""
    while error is not None:
        if isinstance(error, OSError):
            return error.strerror or str(error)
        error = error.__cause__ or error.__context__
    return None
