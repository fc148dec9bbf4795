"""Every notebook executes headlessly (tiny mode: a tiny random model trained for two epochs)."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[2] / "notebooks").glob("*.ipynb"))


def test_notebooks_exist():
    assert NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path, monkeypatch):
    monkeypatch.setenv("DGPO_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("DGPO_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend: figures become PNG outputs
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    figures = [o for o in outputs if o.get("output_type") == "display_data" and "image/png" in o.get("data", {})]
    assert figures  # the figures were drawn


def test_notebooks_match_their_generator():
    """The committed notebooks (with their outputs) were executed from the cells in make_notebooks.py."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_notebooks", NOTEBOOKS[0].parent / "make_notebooks.py")
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    assert sorted(f"{name}.ipynb" for name in generator.NOTEBOOKS) == [p.name for p in NOTEBOOKS]
    for path in NOTEBOOKS:
        cells = nbformat.read(path, as_version=4).cells
        expected = generator.NOTEBOOKS[path.stem]
        assert [(c.cell_type, c.source) for c in cells] == [(c.cell_type, c.source) for c in expected], path.name
        assert path.stat().st_size < 2_000_000, path.name
