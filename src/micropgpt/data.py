"""The corpus as character blocks: fetch, verify, encode once, split, serve.

The encoded corpus is cached under `cache_dir` as `<sha256 of the text>.ids` (raw uint16 ids, or
uint32 for vocabularies over 65,536 characters) and `<sha256>.json` (vocabulary and length). The key
is the content hash, so an edited corpus is re-encoded and a copied or moved one is not; the cache
never goes beside the corpus, which may be read-only. Encoding streams through the file in chunks,
so memory stays bounded whatever the corpus size, and training windows read from a memory map.
"""

from __future__ import annotations

import codecs
import hashlib
import itertools
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from micropgpt.errors import UserError
from micropgpt.files import atomic_write
from micropgpt.tokenizer import CharTokenizer

TINY_SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
CHUNK_BYTES = 16 << 20


def download(url: str, target: Path, sha256: str, timeout: float = 30.0) -> None:
    """Fetch `url` to `target`, keeping it only when its SHA-256 matches."""
    hint = f"download it by hand to {target}, or train on another file with data.path=..."

    def fetch(f) -> None:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                data = response.read()
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise UserError(f"could not download {url} to {target} ({reason}); {hint}") from None
        digest = hashlib.sha256(data).hexdigest()
        if digest != sha256:
            raise UserError(
                f"download of {url} has SHA-256 {digest}, expected {sha256}; nothing was kept at "
                f"{target}; {hint}"
            )
        f.write(data)

    atomic_write(target, fetch)


def _read_chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            yield chunk


def _text_chunks(path: Path) -> Iterator[str]:
    """Decode `path` as UTF-8 chunk by chunk; a bad byte is reported with its offset."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    for chunk in [*_read_chunks(path), b""]:
        pending = len(decoder.getstate()[0])
        try:
            yield decoder.decode(chunk, final=not chunk)
        except UnicodeDecodeError as e:
            raise UserError(
                f"{path} is not UTF-8 text: invalid byte 0x{e.object[e.start]:02x} at byte offset "
                f"{offset - pending + e.start}; convert it to UTF-8 (e.g. iconv -t UTF-8)"
            ) from None
        offset += len(chunk)


def _code_points(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


def encode_corpus(path: Path, cache_dir: Path) -> tuple[Path, CharTokenizer]:
    """Encode `path` to a cached id file (once per content) and return it with its tokenizer."""
    if path.is_dir() or not path.exists():
        raise UserError(f"corpus {path} does not exist or is not a file; set data.path=<a UTF-8 text file>")
    digest = hashlib.sha256()
    for chunk in _read_chunks(path):
        digest.update(chunk)
    key = digest.hexdigest()
    ids_path, meta_path = cache_dir / f"{key}.ids", cache_dir / f"{key}.json"
    if meta_path.exists() and ids_path.exists():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        return ids_path, CharTokenizer(meta["vocab"])

    alphabet = np.zeros(0, dtype=np.uint32)
    for text in _text_chunks(path):
        alphabet = np.union1d(alphabet, np.unique(_code_points(text)))
    if alphabet.size == 0:
        raise UserError(f"corpus {path} is empty; set data.path=<a UTF-8 text file>")
    # Sorted code points are the sorted characters, so an id is the rank of its code point.
    dtype = np.uint16 if alphabet.size <= 1 << 16 else np.uint32
    num_tokens = 0

    def write_ids(f) -> None:
        nonlocal num_tokens
        for text in _text_chunks(path):
            ids = np.searchsorted(alphabet, _code_points(text)).astype(dtype)
            f.write(ids.tobytes())
            num_tokens += ids.size

    atomic_write(ids_path, write_ids)
    tokenizer = CharTokenizer([chr(c) for c in alphabet])
    meta = {
        "vocab": tokenizer.vocab,
        "dtype": np.dtype(dtype).name,
        "num_tokens": num_tokens,
        "source": str(path),
    }
    atomic_write(meta_path, lambda f: f.write(json.dumps(meta, ensure_ascii=False).encode("utf-8")))
    return ids_path, tokenizer


class _Windows(Dataset):
    """Windows of `block_size + 1` ids over a slice of the id file: (inputs, targets shifted by one).

    The memory map opens lazily, so a DataLoader worker opens its own instead of receiving a copy.
    """

    def __init__(self, ids_path: Path, dtype: np.dtype, start: int, stop: int, block_size: int):
        self.ids_path, self.dtype = ids_path, dtype
        self.start, self.stop, self.block_size = start, stop, block_size
        self._ids: np.ndarray | None = None

    def _window(self, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._ids is None:
            self._ids = np.memmap(self.ids_path, dtype=self.dtype, mode="r")
        begin = self.start + offset
        chunk = torch.from_numpy(self._ids[begin : begin + self.block_size + 1].astype(np.int64))
        return chunk[:-1], chunk[1:]


class RandomWindows(_Windows):
    """Every start position is one item; WindowSampler picks them at random."""

    def __len__(self) -> int:
        return self.stop - self.start - self.block_size

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._window(i)


class WindowSampler(DistributedSampler):
    """A random order of the training windows that a resumed run can continue where it stopped.

    The order is a function of (seed, epoch) only, not of the global RNG, and each of
    `num_replicas` processes takes its own share (DistributedSampler's split; Lightning keeps a
    DistributedSampler as it is under DDP). `resume(epoch, batches)` skips the windows of the
    `batches` batches this process already trained on in `epoch`; the length stays the whole
    epoch's, which is what Lightning's restored batch counter expects.
    """

    def __init__(self, dataset: Dataset, batch_size: int, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas, rank, shuffle=True, seed=seed, drop_last=True)
        self.batch_size = batch_size
        self.resume_epoch, self.resume_batches = 0, 0

    def resume(self, epoch: int, batches: int) -> None:
        self.resume_epoch, self.resume_batches = epoch, batches

    def __iter__(self):
        indices = super().__iter__()
        if self.epoch == self.resume_epoch:
            return itertools.islice(indices, self.resume_batches * self.batch_size, None)
        return indices


class ConsecutiveWindows(_Windows):
    """Non-overlapping windows covering the slice once, for an exact validation loss."""

    def __len__(self) -> int:
        return (self.stop - self.start - 1) // self.block_size

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._window(i * self.block_size)


class CharDataModule(L.LightningDataModule):
    """Character blocks of a UTF-8 corpus: Tiny Shakespeare unless `path` names another file.

    Without `path`, the corpus is fetched from `url` into `data_dir` when missing and kept only if
    its SHA-256 is `sha256`. The first `1 - val_fraction` of the characters train, the rest validate.
    Training windows come in an order fixed by `seed` (see WindowSampler); the position in it is
    saved in checkpoints, so a resumed run continues with the windows the interrupted one had next.
    """

    def __init__(
        self,
        path: str | None = None,
        data_dir: str = "data",
        block_size: int = 128,
        batch_size: int = 32,
        val_fraction: float = 0.2,
        num_workers: int = 0,
        url: str = TINY_SHAKESPEARE_URL,
        sha256: str = TINY_SHAKESPEARE_SHA256,
        seed: int = 0,
    ):
        super().__init__()
        if not 0.0 < val_fraction < 1.0:
            raise UserError(f"data.val_fraction={val_fraction} must be between 0 and 1")
        if batch_size < 1:
            raise UserError(f"data.batch_size={batch_size} must be at least 1")
        self.data_dir = Path(data_dir)
        self.path = Path(path) if path else self.data_dir / "tinyshakespeare" / "input.txt"
        self.download_default = not path
        self.url, self.sha256 = url, sha256
        self.block_size, self.batch_size = block_size, batch_size
        self.val_fraction, self.num_workers = val_fraction, num_workers
        self.seed = seed
        self.resume_at = (0, 0)  # (epoch, batches trained in it), from a checkpoint
        self.tokenizer: CharTokenizer | None = None
        self.ids_path: Path | None = None

    @property
    def cache_dir(self) -> Path:
        return self.data_dir / "cache"

    def prepare_data(self) -> None:
        if self.download_default and not self.path.exists():
            download(self.url, self.path, self.sha256)
        self.ids_path, self.tokenizer = encode_corpus(self.path, self.cache_dir)

    @property
    def vocab(self) -> list[str]:
        if self.tokenizer is None:
            self.prepare_data()
        return self.tokenizer.vocab

    def setup(self, stage: str | None = None) -> None:
        if self.ids_path is None:
            # On ranks other than 0 Lightning skips prepare_data; the cache it wrote is reused.
            self.prepare_data()
        dtype = np.dtype(np.uint16 if len(self.tokenizer) <= 1 << 16 else np.uint32)
        total = self.ids_path.stat().st_size // dtype.itemsize
        split = int(total * (1 - self.val_fraction))
        for name, size in (("training", split), ("validation", total - split)):
            if size < self.block_size + 1:
                raise UserError(
                    f"the {name} split of {self.path} has {size} characters, fewer than "
                    f"model.block_size + 1 = {self.block_size + 1}; use a longer corpus, a smaller "
                    "model.block_size or another data.val_fraction"
                )
        self.train_set = RandomWindows(self.ids_path, dtype, 0, split, self.block_size)
        self.val_set = ConsecutiveWindows(self.ids_path, dtype, split, total, self.block_size)

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        num_replicas, rank = (1, 0) if trainer is None else (trainer.world_size, trainer.global_rank)
        sampler = WindowSampler(self.train_set, self.batch_size, num_replicas, rank, self.seed)
        sampler.resume(*self.resume_at)
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=True,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            generator=self._loader_generator(),
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.val_set,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            generator=self._loader_generator(),
        )

    def _loader_generator(self) -> torch.Generator:
        # Without one, every new DataLoader iterator (each validation) draws its workers' base
        # seed from the global RNG, and a resumed run, which validates at other moments, would
        # then draw other dropout masks than the uninterrupted one.
        return torch.Generator().manual_seed(self.seed)

    def state_dict(self) -> dict[str, int]:
        # Lightning's count of the batches trained on in this epoch (processed: the optimizer step
        # is done), as of the checkpoint, whatever the DataLoader had prefetched beyond them.
        loop = self.trainer.fit_loop
        batches = loop.epoch_loop.batch_progress.current.processed
        return {"epoch": loop.epoch_progress.current.processed, "batches": batches}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.resume_at = (state_dict["epoch"], state_dict["batches"])
