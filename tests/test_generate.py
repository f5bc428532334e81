"""generate.py as users run it: a subprocess on a real checkpoint from a tiny training run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import forkserver
import pytest
import torch

from micropgpt.checkpoint import load_checkpoint
from micropgpt.sampling import SEPARATOR

ROOT = Path(__file__).resolve().parents[1]
SPEED_LINE = re.compile(r"^(\d+) tokens in [\d.]+ s, [\d.]+ tokens/s$")


def run_generate(cwd: Path, *overrides: str) -> subprocess.CompletedProcess:
    """`python generate.py` from `cwd`, which it must leave as it found it."""
    cwd.mkdir(parents=True, exist_ok=True)
    before = sorted(cwd.iterdir())
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    cmd = [sys.executable, str(ROOT / "generate.py"), *overrides]
    result = forkserver.run(cmd, cwd=cwd, env=env, timeout=300)
    assert sorted(cwd.iterdir()) == before, "generate.py wrote files into the working directory"
    return result


def samples_of(stdout: str, prompt: str) -> list[str]:
    """The new characters of each sample in generate.py's stdout."""
    assert stdout.endswith(SEPARATOR)
    texts = stdout.split(SEPARATOR)[:-1]
    assert all(text.startswith(prompt) for text in texts)
    return [text[len(prompt) :] for text in texts]


def test_same_command_prints_the_same_text(tiny_run, tmp_path):
    command = [f"ckpt={tiny_run}", "prompt=ROMEO:", "max_new_tokens=300", "seed=7"]
    first = run_generate(tmp_path, *command)
    assert first.returncode == 0, first.stderr
    [sample] = samples_of(first.stdout, "ROMEO:")
    _, tokenizer = load_checkpoint(tiny_run)
    assert len(sample) == 300
    assert set(sample) <= set(tokenizer.vocab)
    loading, speed = first.stderr.strip().splitlines()
    assert loading.startswith(f"loaded {tiny_run / 'checkpoints' / 'best.ckpt'}")
    assert SPEED_LINE.match(speed).group(1) == "300"

    assert run_generate(tmp_path, *command).stdout == first.stdout
    assert run_generate(tmp_path, *command, "stream=false").stdout == first.stdout
    assert run_generate(tmp_path, *command[:-1], "seed=8").stdout != first.stdout


def test_several_samples_are_one_reproducible_batch_whose_first_row_is_the_single_sample(tiny_run, tmp_path):
    command = [f"ckpt={tiny_run}", "prompt=ROMEO:", "max_new_tokens=60", "seed=7"]
    [single] = samples_of(run_generate(tmp_path, *command).stdout, "ROMEO:")
    batch = run_generate(tmp_path, *command, "num_samples=3")
    assert batch.returncode == 0, batch.stderr
    samples = samples_of(batch.stdout, "ROMEO:")
    assert samples[0] == single and len(set(samples)) == 3
    assert SPEED_LINE.match(batch.stderr.strip().splitlines()[-1]).group(1) == "180"
    assert run_generate(tmp_path, *command, "num_samples=3", "stream=false").stdout == batch.stdout
    assert run_generate(tmp_path, *command, "num_samples=3").stdout == batch.stdout


def test_a_reader_that_stops_early_ends_generation_quietly(tiny_run, tmp_path):
    # `python generate.py ... | head -c 10`: the pipe closes while characters still stream.
    cmd = [sys.executable, str(ROOT / "generate.py"), f"ckpt={tiny_run}", "max_new_tokens=20000"]
    with subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as process:
        assert len(process.stdout.read(10)) == 10
        process.stdout.close()
        stderr = process.stderr.read().decode()
    assert process.returncode == 141  # 128 + SIGPIPE, what the shell reports for such a stop
    assert "Traceback" not in stderr and "Error" not in stderr, stderr


def test_greedy_is_deterministic_without_a_seed_and_the_same_without_cache(tiny_run, tmp_path):
    # "ROMEO:" plus 26 characters is exactly the tiny model's block_size of 32.
    greedy = [f"ckpt={tiny_run}", "prompt=ROMEO:", "max_new_tokens=26", "temperature=0", "seed=null"]
    outputs = {
        run_generate(tmp_path, *greedy).stdout,
        run_generate(tmp_path, *greedy).stdout,
        run_generate(tmp_path, *greedy, "kv_cache=false").stdout,
    }
    [output] = outputs
    assert len(samples_of(output, "ROMEO:")[0]) == 26


def test_out_file_holds_all_samples(tiny_run, tmp_path):
    out = tmp_path / "samples" / "out.txt"
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("KING:\nWhat", encoding="utf-8")
    result = run_generate(
        tmp_path / "cwd",
        f"ckpt={tiny_run / 'checkpoints' / 'last.ckpt'}",
        f"prompt_file={prompt_file}",
        "num_samples=3",
        "max_new_tokens=40",
        f"out={out}",
    )
    assert result.returncode == 0, result.stderr
    assert out.read_text(encoding="utf-8") == result.stdout
    samples = samples_of(result.stdout, "KING:\nWhat")
    assert len(samples) == 3 and len(set(samples)) == 3
    assert all(len(sample) == 40 for sample in samples)
    assert SPEED_LINE.match(result.stderr.strip().splitlines()[-1]).group(1) == "120"
    assert os.listdir(out.parent) == ["out.txt"]  # no temporary file left behind


def test_bf16_and_compiled_checkpoint_loads_as_float32(tiny_run, tmp_path):
    checkpoint = torch.load(tiny_run / "checkpoints" / "best.ckpt", weights_only=True)
    original = checkpoint["state_dict"]
    # What a torch.compile'd GPT trained in bf16 saves: prefixed keys, bf16 tensors.
    checkpoint["state_dict"] = {
        key.replace("model.", "model._orig_mod.", 1): value.to(torch.bfloat16)
        for key, value in original.items()
    }
    converted = tmp_path / "bf16_compiled.ckpt"
    torch.save(checkpoint, converted)

    model, _ = load_checkpoint(converted, "cpu")
    for name, tensor in model.state_dict().items():
        assert tensor.dtype == torch.float32
        torch.testing.assert_close(tensor, original[f"model.{name}"], rtol=1e-2, atol=1e-2)
    result = run_generate(tmp_path / "cwd", f"ckpt={converted}", "max_new_tokens=20", "stream=false")
    assert result.returncode == 0, result.stderr
    assert len(samples_of(result.stdout, "\n")[0]) == 20


class CallsCode:
    """Unpickling this runs a shell command: what a hostile checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_case_files(tmp_path: Path) -> dict[str, Path]:
    files = {name: tmp_path / name for name in ("random.ckpt", "text.ckpt", "foreign.ckpt", "hostile.ckpt")}
    files["random.ckpt"].write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    files["text.ckpt"].write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n")
    torch.save(torch.nn.Linear(4, 4).state_dict(), files["foreign.ckpt"])
    torch.save({"state_dict": {}, "payload": CallsCode(tmp_path / "pwned")}, files["hostile.ckpt"])
    (tmp_path / "empty_run").mkdir()
    files["empty_run"] = tmp_path / "empty_run"
    return files


ERROR_CASES = {
    "missing file": (["ckpt={tmp}/nowhere.ckpt"], "does not exist"),
    "run dir without checkpoints": (["ckpt={tmp}/empty_run"], "has no checkpoints/best.ckpt"),
    "random bytes": (["ckpt={tmp}/random.ckpt"], "is not a PyTorch checkpoint"),
    "text file": (["ckpt={tmp}/text.ckpt"], "is not a PyTorch checkpoint"),
    "plain state_dict": (["ckpt={tmp}/foreign.ckpt"], "not a micropgpt checkpoint: it has no hyper_param"),
    "pickle calling code": (["ckpt={tmp}/hostile.ckpt"], "is untrusted: its pickle would import"),
    "prompt outside vocabulary": (["ckpt={run}", "prompt=Ah ☃ snow"], "'☃' (U+2603)"),
    "negative max_new_tokens": (["ckpt={run}", "max_new_tokens=-1"], "max_new_tokens=-1 must be 0 or more"),
    "negative temperature": (["ckpt={run}", "temperature=-0.5"], "temperature=-0.5 must be"),
    "top_p zero": (["ckpt={run}", "top_p=0"], "top_p=0.0 must be in (0, 1]"),
    "top_p above one": (["ckpt={run}", "top_p=1.5"], "top_p=1.5 must be in (0, 1]"),
    "top_k zero": (["ckpt={run}", "top_k=0"], "top_k=0 must be at least 1"),
}


@pytest.mark.parametrize("case", ERROR_CASES)
def test_error_is_one_line_nonzero_exit_and_nothing_written(case, tiny_run, tmp_path):
    overrides, expected = ERROR_CASES[case]
    write_case_files(tmp_path)
    out = tmp_path / "out.txt"
    overrides = [o.format(tmp=tmp_path, run=tiny_run) for o in overrides]
    result = run_generate(tmp_path / "cwd", *overrides, f"out={out}")
    assert result.returncode != 0
    assert result.stdout == ""
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: ")
    assert expected in line
    assert not out.exists()
    assert not (tmp_path / "pwned").exists()


def test_sampling_starts_without_importing_lightning():
    """generate.py and `import micropgpt` need no Lightning, whose import takes seconds: only the
    training and evaluation jobs import it."""
    check = (
        "import runpy, sys; sys.argv = ['generate.py', '--cfg', 'job']; "
        "import micropgpt, micropgpt.sampling; "
        "runpy.run_path('generate.py', run_name='__main__'); "
        "assert 'lightning' not in sys.modules, 'lightning was imported'"
    )
    command = [sys.executable, "-c", check]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "prompt:" in result.stdout
