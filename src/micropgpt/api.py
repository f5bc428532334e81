"""micropgpt from Python or Jupyter: train, sample and evaluate, as the commands do.

    import micropgpt
    result = micropgpt.train(["experiment=cpu_2min"])        # python train.py experiment=cpu_2min
    print(micropgpt.sample(result.run_dir, prompt="ROMEO:"))  # python generate.py ckpt=... prompt=...
    micropgpt.evaluate(result.run_dir)                        # python eval.py ckpt=...

conf/ is found beside the package (an editable install of the project checkout); run dirs and
data/ are relative to the working directory, as for the commands. A user's mistake raises
micropgpt.UserError with the message the command prints.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from micropgpt import hydra_app
from micropgpt.errors import UserError
from micropgpt.hydra_app import GenerateSchema
from micropgpt.sampling import SEPARATOR, samples_from_checkpoint
from micropgpt.summary import RunResult, read_result

# generate.py's options that do not fit "one sample, returned as a string".
_NOT_FOR_SAMPLE = ("num_samples", "stream", "out")


def _overrides(overrides: Sequence[str]) -> list[str]:
    if isinstance(overrides, str) or not all(isinstance(o, str) for o in overrides):
        raise UserError(f"overrides={overrides!r}: pass a list of strings, e.g. ['trainer.max_steps=100']")
    return hydra_app.verbatim_overrides(overrides)  # text and paths as typed, as the commands take them


def train(overrides: Sequence[str] = ()) -> RunResult:
    """Train as `python train.py *overrides` does: the same run dir (outputs/DATE/TIME unless
    hydra.run.dir= says otherwise), .hydra/, train.log, checkpoints, TensorBoard events and
    result.json. Each call is a run of its own; the result carries its `run_dir`."""
    return read_result(hydra_app.train_from_python(_overrides(overrides)))


def sample(
    ckpt: str | Path, prompt: str | None = None, max_new_tokens: int | None = None, **options: Any
) -> str:
    """One sample, as `python generate.py ckpt=... prompt=...` prints it: the prompt and the new
    characters. `options`: conf/generate.yaml's temperature, top_k, top_p, seed (same seed, same
    text), device, kv_cache, cache_keep, prompt_file; what is not given is conf/generate.yaml's."""
    allowed = sorted(set(GenerateSchema.__dataclass_fields__) - {"ckpt", *_NOT_FOR_SAMPLE})
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise UserError(f"micropgpt.sample has no option {', '.join(unknown)}; it has {', '.join(allowed)}")
    given = {"prompt": prompt, "max_new_tokens": max_new_tokens}
    values = {"ckpt": str(ckpt), **{k: v for k, v in given.items() if v is not None}, **options}
    cfg = hydra_app.merged(hydra_app.compose("generate"), values)
    samples = samples_from_checkpoint(
        **{key: value for key, value in cfg.items() if key not in _NOT_FOR_SAMPLE}, num_samples=1
    )
    return "".join(samples.pieces).removesuffix(SEPARATOR)


def evaluate(
    ckpt: str | Path,
    data_path: str | Path | None = None,
    stride: int | None = None,
    out: str | Path | None = None,
    overrides: Sequence[str] = (),
) -> dict:
    """Loss and bits per character, as `python eval.py ckpt=... [data.path=...]` computes them:
    {"loss", "bpc", "characters", "windows", "checkpoint"}. Without `data_path`, on the run's
    own validation split. `overrides`: conf/eval.yaml's, e.g. ["trainer.devices=2"]."""
    values = {
        "ckpt": str(ckpt),
        "data": {"path": None if data_path is None else str(data_path)},
        "stride": stride,
        "out": None if out is None else str(out),
    }
    return hydra_app.evaluate_from_python(values, _overrides(overrides))
