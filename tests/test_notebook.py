"""docs/quickstart.ipynb, top to bottom in a real Jupyter kernel, with a tiny model."""

from __future__ import annotations

import subprocess

import nbformat
from conftest import ROOT, TINY
from nbclient import NotebookClient

NOTEBOOK = ROOT / "docs" / "quickstart.ipynb"


def git_status() -> str:
    return subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT, capture_output=True, text=True
    ).stdout


def test_the_quickstart_notebook_runs_in_a_jupyter_kernel(tmp_path, corpus, monkeypatch):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code), "outputs not stripped"

    tiny = [*TINY, "trainer.max_steps=30", "trainer.val_check_interval=10", f"data.path={corpus}"]
    monkeypatch.setenv("QUICKSTART_DIR", str(tmp_path))
    monkeypatch.setenv("QUICKSTART_OVERRIDES", " ".join(tiny))
    before = git_status()
    NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": tmp_path}}
    ).execute()
    assert git_status() == before

    outputs = [output for cell in code for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    assert any("image/png" in output.get("data", {}) for output in outputs), "no loss plot"
    text = "".join(output.get("text", "") for output in outputs if output.output_type == "stream")
    assert "ROMEO:" in text and "bits per character" in text
    [run_dir] = (tmp_path / "outputs").glob("*/*")
    assert (run_dir / "checkpoints" / "best.ckpt").is_file()
