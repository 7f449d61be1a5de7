"""Every notebook in notebooks/ executes (small sizes) and is stored without outputs.

The kernel is this interpreter (the venv's python): a kernelspec pointing at
``sys.executable`` is written to a temporary ``JUPYTER_PATH`` entry under a unique
name, so no user-level ``python3`` kernel can be picked up instead.
"""

from __future__ import annotations

import glob
import json
import os
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))
KERNEL_NAME = "soo-func-test-venv"


@pytest.fixture
def venv_kernel(tmp_path, monkeypatch):
    spec_dir = tmp_path / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "soo_func test venv",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    old = os.environ.get("JUPYTER_PATH")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path) + (os.pathsep + old if old else ""))
    monkeypatch.setenv("SOO_FUNC_SMALL", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # One thread: the notebooks' small models gain nothing from two, and on a loaded machine
    # two OpenMP threads on one free core spin at every barrier (a hessian_free cell went
    # from 30 s to over 120 s with the other core busy).
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return KERNEL_NAME


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ holds no .ipynb"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[os.path.basename(p) for p in NOTEBOOKS])
def test_notebook_is_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs, f"{path}: strip outputs before committing"
            assert cell.execution_count is None, f"{path}: strip execution counts"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[os.path.basename(p) for p in NOTEBOOKS])
def test_notebook_executes(path, venv_kernel):
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=120,
        kernel_name=venv_kernel,
        resources={"metadata": {"path": os.path.dirname(path)}},
    )
    client.execute()
    errors = [
        output
        for cell in nb.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type == "error"
    ]
    assert not errors
    if os.path.basename(path) == "quickstart.ipynb":
        printed = "".join(
            output.get("text", "")
            for cell in nb.cells
            if cell.cell_type == "code"
            for output in cell.outputs
            if output.output_type == "stream"
        )
        assert "gtol" in printed, printed  # the best optimizer converged
