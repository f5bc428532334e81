"""The DataModule on real files: split, windows, cache, bad corpora, and downloads over HTTP."""

from __future__ import annotations

import hashlib
import http.server
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from micropgpt import data
from micropgpt.data import CharDataModule
from micropgpt.errors import UserError
from micropgpt.hydra_app import compose

# Cyrillic, CJK and emoji: several bytes per character, so byte and character counts differ.
TEXT = ("Быть или не быть, вот в чём вопрос. 生存还是毁灭 🎭\n" * 40)[:1500]
BLOCK = 16


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return path


def datamodule(corpus: Path, data_dir: Path, **kwargs) -> CharDataModule:
    dm = CharDataModule(path=str(corpus), data_dir=str(data_dir), block_size=BLOCK, batch_size=8, **kwargs)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def decode(dm: CharDataModule, ids: torch.Tensor) -> str:
    return dm.tokenizer.decode(ids.tolist())


@pytest.fixture
def dm(tmp_path) -> CharDataModule:
    return datamodule(write(tmp_path / "corpus" / "text.txt", TEXT), tmp_path / "data")


def test_the_order_of_training_windows_follows_the_run_seed_given_as_data_seed(tmp_path):
    assert compose("train", ["seed=7"]).data.seed == 7  # conf/data: seed: ${seed}
    corpus = write(tmp_path / "corpus" / "text.txt", TEXT)

    def first_batch(seed: int) -> torch.Tensor:
        return next(iter(datamodule(corpus, tmp_path / "data", seed=seed).train_dataloader()))[0]

    assert torch.equal(first_batch(7), first_batch(7))
    assert not torch.equal(first_batch(7), first_batch(8))


def test_split_is_80_20_of_characters(dm):
    assert len(TEXT.encode("utf-8")) > len(TEXT)
    split = int(len(TEXT) * 0.8)
    assert (dm.train_set.start, dm.train_set.stop) == (0, split)
    assert (dm.val_set.start, dm.val_set.stop) == (split, len(TEXT))
    assert dm.vocab == sorted(set(TEXT))


def test_training_windows_are_shifted_pairs_inside_the_training_split(dm):
    split = int(len(TEXT) * 0.8)
    assert len(dm.train_set) == split - BLOCK
    for i in (0, 123, len(dm.train_set) - 1):
        inputs, targets = dm.train_set[i]
        assert decode(dm, inputs) == TEXT[i : i + BLOCK]
        assert decode(dm, targets) == TEXT[i + 1 : i + BLOCK + 1]
    # The last window's last target is the last training character: none reaches validation.
    _, last_targets = dm.train_set[len(dm.train_set) - 1]
    assert decode(dm, last_targets)[-1] == TEXT[split - 1]

    inputs, targets = next(iter(dm.train_dataloader()))
    assert inputs.shape == targets.shape == (8, BLOCK)
    assert inputs.dtype == targets.dtype == torch.int64
    torch.testing.assert_close(inputs[:, 1:], targets[:, :-1])


def test_validation_windows_tile_the_validation_split(dm):
    split = int(len(TEXT) * 0.8)
    val_text = TEXT[split:]
    windows = [dm.val_set[i] for i in range(len(dm.val_set))]
    inputs = "".join(decode(dm, x) for x, _ in windows)
    targets = "".join(decode(dm, y) for _, y in windows)
    # Non-overlapping and contiguous from the split on; only a tail shorter than a block is left out.
    assert inputs == val_text[: len(inputs)]
    assert targets == val_text[1 : len(inputs) + 1]
    assert len(val_text) - 1 - len(targets) < BLOCK
    batches = list(dm.val_dataloader())
    assert sum(x.size(0) for x, _ in batches) == len(windows)
    assert torch.equal(torch.cat([x for x, _ in batches]), torch.stack([x for x, _ in windows]))


def test_cache_lives_under_data_dir_and_is_rebuilt_when_the_text_changes(tmp_path):
    corpus = write(tmp_path / "corpus" / "text.txt", TEXT)
    first = datamodule(corpus, tmp_path / "data")
    assert sorted(p.name for p in corpus.parent.iterdir()) == ["text.txt"]
    assert first.ids_path.parent == tmp_path / "data" / "cache"
    cached = sorted(p.name for p in (tmp_path / "data" / "cache").iterdir())
    assert len(cached) == 2

    again = datamodule(corpus, tmp_path / "data")
    assert again.ids_path == first.ids_path
    assert sorted(p.name for p in (tmp_path / "data" / "cache").iterdir()) == cached

    changed_text = TEXT.replace("вопрос", "QUESTION")
    write(corpus, changed_text)
    changed = datamodule(corpus, tmp_path / "data")
    assert changed.ids_path != first.ids_path
    assert "Q" in changed.vocab and "Q" not in first.vocab
    inputs, _ = changed.train_set[0]
    assert decode(changed, inputs) == changed_text[:BLOCK]


@pytest.mark.parametrize("bad", [b"\xff tail", b"\xd0A tail", b"\xd0"], ids=["stray", "cut", "truncated"])
@pytest.mark.parametrize("chunk_bytes", [1 << 20, 7])
def test_invalid_utf8_names_the_byte_offset(tmp_path, monkeypatch, chunk_bytes, bad):
    # 7-byte chunks split multi-byte characters, and leave the bad sequence's lead byte pending at
    # the end of a chunk (76 = 10 x 7 + 6): the offset must still be that of the bad byte.
    monkeypatch.setattr(data, "CHUNK_BYTES", chunk_bytes)
    good = "абв 你好\n".encode() * 5 + b"Romeo:"
    assert len(good) % 7 == 6
    corpus = write(tmp_path / "bad.txt", good + bad)
    with pytest.raises(UserError, match=rf"invalid byte 0x{bad[0]:02x} at byte offset {len(good)}\b"):
        datamodule(corpus, tmp_path / "data")


def test_empty_corpus_is_a_clear_error(tmp_path):
    corpus = write(tmp_path / "empty.txt", "")
    with pytest.raises(UserError, match="is empty"):
        datamodule(corpus, tmp_path / "data")


def test_corpus_shorter_than_a_block_is_a_clear_error(tmp_path):
    corpus = write(tmp_path / "short.txt", "To be or not to be, that is the question.\n")
    with pytest.raises(UserError, match=r"fewer than model\.block_size \+ 1 = 17"):
        datamodule(corpus, tmp_path / "data")


def test_missing_corpus_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match=r"does not exist.*data\.path="):
        datamodule(tmp_path / "no_such.txt", tmp_path / "data")


# --- download, against a real HTTP server on 127.0.0.1 ---

BODY = TEXT.encode("utf-8")


@pytest.fixture
def server():
    """Serves BODY at /input.txt, and at /cut-off only its first half before closing; yields the base URL."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path not in ("/input.txt", "/cut-off"):
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(BODY)))
            self.end_headers()
            # HTTP/1.0: the connection closes when the handler returns, here short of Content-Length.
            self.wfile.write(BODY if self.path == "/input.txt" else BODY[: len(BODY) // 2])

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def download_datamodule(data_dir: Path, url: str, sha256: str) -> CharDataModule:
    return CharDataModule(data_dir=str(data_dir), block_size=BLOCK, batch_size=8, url=url, sha256=sha256)


def test_download_keeps_a_file_with_the_right_sha256(tmp_path, server):
    dm = download_datamodule(tmp_path / "data", f"{server}/input.txt", hashlib.sha256(BODY).hexdigest())
    dm.prepare_data()
    dm.setup("fit")
    target = tmp_path / "data" / "tinyshakespeare" / "input.txt"
    assert target.read_bytes() == BODY
    assert sorted(p.name for p in target.parent.iterdir()) == ["input.txt"]
    assert dm.vocab == sorted(set(TEXT))


def test_download_with_a_wrong_sha256_leaves_no_file(tmp_path, server):
    expected = hashlib.sha256(b"something else").hexdigest()
    dm = download_datamodule(tmp_path / "data", f"{server}/input.txt", expected)
    with pytest.raises(UserError) as excinfo:
        dm.prepare_data()
    message = str(excinfo.value)
    assert hashlib.sha256(BODY).hexdigest() in message and expected in message
    assert "data.path=" in message
    target_dir = tmp_path / "data" / "tinyshakespeare"
    assert not target_dir.exists() or list(target_dir.iterdir()) == []


@pytest.mark.parametrize("where", ["closed port", "404"])
def test_failed_download_leaves_no_file_and_names_url_target_and_override(tmp_path, server, where):
    url = f"http://127.0.0.1:{closed_port()}/input.txt" if where == "closed port" else f"{server}/missing"
    dm = download_datamodule(tmp_path / "data", url, hashlib.sha256(BODY).hexdigest())
    with pytest.raises(UserError) as excinfo:
        dm.prepare_data()
    message = str(excinfo.value)
    target = tmp_path / "data" / "tinyshakespeare" / "input.txt"
    assert url in message and str(target) in message and "data.path=" in message
    assert "\n" not in message
    assert not target.parent.exists() or list(target.parent.iterdir()) == []


def test_download_cut_off_mid_way_is_one_error_line_and_keeps_nothing(tmp_path, server):
    """The server closes the connection after half the Content-Length bytes: train.py says so."""
    url, data_dir = f"{server}/cut-off", tmp_path / "data"
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        f"hydra.run.dir={tmp_path / 'run'}",
        f"data.data_dir={data_dir}",
        f"data.url={url}",
        f"data.sha256={hashlib.sha256(BODY).hexdigest()}",
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "Traceback" not in result.stdout + result.stderr
    (error,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    target = data_dir / "tinyshakespeare" / "input.txt"
    assert f"could not download {url} to {target}" in error
    assert f"the connection closed after {len(BODY) // 2} of {len(BODY)} bytes" in error
    assert "data.path=" in error
    assert not target.parent.exists() or list(target.parent.iterdir()) == []
