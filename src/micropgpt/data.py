"""The corpus as character blocks: fetch, verify, encode once, split, serve.

A corpus is one UTF-8 text file, or a directory whose `.txt` files (recursively, in sorted order
of their paths) are joined with a separator character between documents.

The encoded corpus is cached under `cache_dir` as `<sha256 of the text>.ids` (raw uint16 ids, or
uint32 for vocabularies over 65,536 characters) and `<sha256>.json` (vocabulary and length). The key
is the content hash, so an edited corpus is re-encoded and a copied or moved one is not; the cache
never goes beside the corpus, which may be read-only. Encoding streams through the files in chunks,
so memory stays bounded whatever the corpus size, and training windows read from a memory map.
"""

from __future__ import annotations

import codecs
import hashlib
import http.client
import itertools
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from micropgpt.errors import UserError
from micropgpt.files import atomic_write
from micropgpt.tokenizer import CharTokenizer

TINY_SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
CHUNK_BYTES = 16 << 20
# Between two documents of a corpus directory: ASCII's record separator, which text rarely contains.
DOCUMENT_SEPARATOR = "\x1e"
UNICODE_SIZE = 0x110000


def download(url: str, target: Path, sha256: str, timeout: float = 30.0) -> None:
    """Fetch `url` to `target`, keeping it only when its SHA-256 matches."""
    hint = f"download it by hand to {target}, or train on another file with data.path=..."

    def fetch(f) -> None:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                data = response.read()
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            reason = getattr(e, "reason", e)
            if isinstance(e, http.client.IncompleteRead):  # cut off before Content-Length bytes
                expected = "" if e.expected is None else f" of {len(e.partial) + e.expected}"
                reason = f"the connection closed after {len(e.partial)}{expected} bytes"
            raise UserError(f"could not download {url} to {target} ({reason}); {hint}") from None
        digest = hashlib.sha256(data).hexdigest()
        if digest != sha256:
            raise UserError(
                f"download of {url} has SHA-256 {digest}, expected {sha256}; nothing was kept at "
                f"{target}; {hint}"
            )
        f.write(data)

    atomic_write(target, fetch)


def corpus_files(path: Path) -> list[Path]:
    """The files a corpus path stands for: the file itself, or a directory's .txt files, sorted."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise UserError(
            f"corpus {path} does not exist; set data.path=<a UTF-8 text file or a directory of .txt files>"
        )
    files = sorted(p for p in path.rglob("*.txt") if p.is_file())
    if not files:
        raise UserError(
            f"corpus directory {path} has no .txt files; put UTF-8 text files named *.txt in it "
            "or set data.path=<a text file>"
        )
    return files


def _read_chunks(path: Path, progress: tqdm | None = None) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            if progress is not None:
                progress.update(len(chunk))
            yield chunk


def _text_chunks(path: Path, progress: tqdm | None = None) -> Iterator[str]:
    """Decode `path` as UTF-8 chunk by chunk; a bad byte is reported with its offset."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    # chain, not a list: a list would hold the whole file in memory.
    for chunk in itertools.chain(_read_chunks(path, progress), [b""]):
        pending = len(decoder.getstate()[0])
        try:
            yield decoder.decode(chunk, final=not chunk)
        except UnicodeDecodeError as e:
            raise UserError(
                f"{path} is not UTF-8 text: invalid byte 0x{e.object[e.start]:02x} at byte offset "
                f"{offset - pending + e.start}; convert it to UTF-8 (e.g. iconv -t UTF-8)"
            ) from None
        offset += len(chunk)


def _corpus_bytes(files: list[Path], separator: str, progress: tqdm) -> Iterator[bytes]:
    for i, path in enumerate(files):
        if i:
            yield separator.encode()
        yield from _read_chunks(path, progress)


def _corpus_text(files: list[Path], separator: str, progress: tqdm) -> Iterator[str]:
    for i, path in enumerate(files):
        if i:
            yield separator
        yield from _text_chunks(path, progress)


def _progress(files: list[Path], description: str) -> tqdm:
    """A bytes progress bar on the first process only, shown when a pass takes over a second."""
    total = sum(path.stat().st_size for path in files)
    return tqdm(
        total=total,
        desc=description,
        unit="B",
        unit_scale=True,
        delay=1.0,
        disable=rank_zero_only.rank != 0,
    )


def _code_points(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


def encode_corpus(
    path: Path, cache_dir: Path, separator: str = DOCUMENT_SEPARATOR
) -> tuple[Path, CharTokenizer]:
    """Encode the corpus at `path` to a cached id file (once per content); return it and its tokenizer."""
    files = corpus_files(path)
    digest = hashlib.sha256()
    with _progress(files, f"hashing {path.name}") as progress:
        for chunk in _corpus_bytes(files, separator, progress):
            digest.update(chunk)
    key = digest.hexdigest()
    ids_path, meta_path = cache_dir / f"{key}.ids", cache_dir / f"{key}.json"
    if meta_path.exists() and ids_path.exists():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        return ids_path, CharTokenizer(meta["vocab"])

    # A count per Unicode code point (9 MB) instead of sorting every chunk: linear time.
    seen = np.zeros(UNICODE_SIZE, dtype=bool)
    with _progress(files, f"finding the characters of {path.name}") as progress:
        for text in _corpus_text(files, separator, progress):
            seen |= np.bincount(_code_points(text), minlength=UNICODE_SIZE) > 0
    # Sorted code points are the sorted characters, so an id is the rank of its code point.
    alphabet = np.flatnonzero(seen)
    if alphabet.size == 0:
        raise UserError(f"corpus {path} is empty; set data.path=<a UTF-8 text file>")
    dtype = np.uint16 if alphabet.size <= 1 << 16 else np.uint32
    id_of = np.zeros(alphabet[-1] + 1, dtype=dtype)
    id_of[alphabet] = np.arange(alphabet.size)
    num_tokens = 0

    def write_ids(f) -> None:
        nonlocal num_tokens
        with _progress(files, f"encoding {path.name}") as progress:
            for text in _corpus_text(files, separator, progress):
                ids = id_of[_code_points(text)]
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
    """Every start position is one item; the (distributed) sampler picks them at random."""

    def __len__(self) -> int:
        return self.stop - self.start - self.block_size

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._window(i)


class RandomWindowSampler(DistributedSampler):
    """Window starts drawn uniformly at random with replacement (as nanoGPT does), in constant memory.

    A permutation of every start, which RandomSampler and Lightning's DistributedSampler build, is
    a list of one Python int per character: about 6 GB for a 200 MB corpus. This draws the starts
    in small chunks instead. Each process draws its own stream, seeded by (seed, epoch, rank), so
    the processes of a multi-device run train on different windows; an epoch is the process's share
    of as many windows as there are starts. Being a DistributedSampler, Lightning uses it as it is
    rather than wrapping it in one that lists every index. `resume(epoch, samples)` makes it skip
    the first `samples` windows of `epoch`, those a resumed run already trained on; the length
    stays the whole epoch's, which is what Lightning's restored batch counter expects.
    """

    draw_size = 1 << 16

    def __init__(self, dataset: Dataset, seed: int = 0):
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        super().__init__(
            dataset,
            num_replicas=None if distributed else 1,
            rank=None if distributed else 0,
            shuffle=True,
            seed=seed,
        )
        self.resume_epoch, self.resume_samples = 0, 0

    def resume(self, epoch: int, samples: int) -> None:
        self.resume_epoch, self.resume_samples = epoch, samples

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, self.epoch, self.rank])
        skip = self.resume_samples if self.epoch == self.resume_epoch else 0
        for first in range(0, self.num_samples, self.draw_size):
            count = min(self.draw_size, self.num_samples - first)
            # Skipped windows are drawn all the same, so the ones after them are the same too.
            starts = rng.integers(len(self.dataset), size=count)
            yield from starts[max(0, skip - first) :].tolist()


class ConsecutiveWindows(_Windows):
    """Non-overlapping windows covering the slice once, for an exact validation loss."""

    def __len__(self) -> int:
        return (self.stop - self.start - 1) // self.block_size

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._window(i * self.block_size)


class ValidationShardSampler(DistributedSampler):
    """Each process's share of the validation windows: a run of whole batches, every window once.

    Lightning's DistributedSampler pads the windows to a multiple of the process count by repeating
    some, so val/loss would depend on how many processes validate. Here the batches one process
    would see are split into contiguous shards, one per process, so each batch (the short last one
    too) holds the same windows whatever the number of processes, and GPTModule's mean weighted by
    targets is the one-process loss. Being a DistributedSampler, Lightning uses it as it is.
    """

    def __init__(self, dataset: Dataset, batch_size: int):
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        super().__init__(
            dataset,
            num_replicas=None if distributed else 1,
            rank=None if distributed else 0,
            shuffle=False,
        )
        batches = -(-len(dataset) // batch_size)
        if batches < self.num_replicas:
            # A process without a batch would skip validation, and the others wait for it forever.
            raise UserError(
                f"the validation split has {batches} batches of data.batch_size={batch_size}, fewer than "
                f"the {self.num_replicas} processes, which need one each; use a larger data.val_fraction, "
                "a smaller data.batch_size or fewer devices"
            )
        first, last = (batches * rank // self.num_replicas for rank in (self.rank, self.rank + 1))
        self.start, self.stop = first * batch_size, min(last * batch_size, len(dataset))
        self.num_samples, self.total_size = self.stop - self.start, len(dataset)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))


class CharDataModule(L.LightningDataModule):
    """Character blocks of a UTF-8 corpus: Tiny Shakespeare unless `path` names another file.

    `path` may also be a directory: its .txt files, in sorted order, joined by `separator`.
    Without `path`, the corpus is fetched from `url` into `data_dir` when missing and kept only if
    its SHA-256 is `sha256`. The first `1 - val_fraction` of the characters train, the rest validate.
    Training windows come in an order fixed by `seed` (see RandomWindowSampler); the
    position in it is saved in checkpoints, so a resumed run continues with the windows the
    interrupted one had next.
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
        separator: str = DOCUMENT_SEPARATOR,
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
        self.url, self.sha256, self.separator = url, sha256, separator
        self.block_size, self.batch_size = block_size, batch_size
        self.val_fraction, self.num_workers = val_fraction, num_workers
        self.seed = seed  # the run's: the order of training windows, the DataLoaders' generators
        self.resume_at = (0, 0)  # (epoch, batches trained in it), from a checkpoint
        self.tokenizer: CharTokenizer | None = None
        self.ids_path: Path | None = None

    @property
    def cache_dir(self) -> Path:
        return self.data_dir / "cache"

    def prepare_data(self) -> None:
        if self.download_default and not self.path.exists():
            download(self.url, self.path, self.sha256)
        self.ids_path, self.tokenizer = encode_corpus(self.path, self.cache_dir, self.separator)

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
        sampler = RandomWindowSampler(self.train_set, self.seed)
        epoch, batches = self.resume_at
        sampler.resume(epoch, batches * self.batch_size)
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
            sampler=ValidationShardSampler(self.val_set, self.batch_size),
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
        # is done), as of the checkpoint, whatever the DataLoader had prefetched beyond them. The
        # sampler cannot count them: the DataLoader and Lightning's fetcher draw batches ahead of
        # training; Lightning 2.6 saves the state of a DataLoader that has one, not of a sampler, and
        # then as of the prefetched batches. Its loop progress is the count it checkpoints itself.
        loop = self.trainer.fit_loop
        batches = loop.epoch_loop.batch_progress.current.processed
        return {"epoch": loop.epoch_progress.current.processed, "batches": batches}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.resume_at = (state_dict["epoch"], state_dict["batches"])
