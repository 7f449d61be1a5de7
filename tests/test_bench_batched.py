"""Smoke tests: the compiled and batched benchmark suites run at tiny sizes (eager; one
compiled step traced by ``aot_eager``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks import bench_batched, bench_compiled, gpu_check, run


def test_the_suites_are_registered():
    suites, _, errors = run.discover()
    assert not errors, errors
    assert {"lbfgs_vs_torch", "batched_fits", "multistart"} <= set(suites)


def test_batched_fits_agree_with_scipy():
    rows = bench_batched.batched_fits(True, counts=(24,), subset=8)
    methods = {r["method"].split()[0]: r for r in rows}
    assert methods["soo_func"]["within_1e-3"] == 1.0
    assert methods["scipy"]["speedup_vs_scipy"] == 1.0
    if bench_batched.lsq_lma_parallel is None:
        pytest.skip("torchimize is not installed: its row is not checked")
    assert "torchimize" in methods


def test_multistart_finds_the_same_minima():
    (row,) = bench_batched.multistart(True, starts=8, steps=30)
    assert row["minima_agree"] and row["vmap_unconverged"] == 0
    assert row["worst_vmap_value"] < 1e-10


@pytest.mark.slow
def test_compiled_vmapped_step_returns_the_eager_fits():
    """The ``batched_step_compiled`` suite at a tiny size, traced by ``aot_eager`` (the
    suite itself compiles with inductor)."""
    rows = bench_batched.compiled_step(True, count=16, steps=3, backend="aot_eager")
    assert [row["method"] for row in rows] == ["eager vmap", "compiled vmap"]
    assert rows[0]["cpu_vs_eager"] == 1 and rows[1]["compile_cpu_seconds"] > 0
    assert rows[1]["max_param_gap"] < 1e-6  # the fits of the eager steps (not yet at rounding)


def test_nearest_minimum_labels():
    points = np.array([[3.0, 2.0], [0.0, 0.0]])
    assert bench_batched.nearest_minimum(points).tolist() == [0, -1]


def test_lbfgs_vs_torch_row_eager(monkeypatch):
    monkeypatch.setattr(bench_compiled, "PROBLEMS", {"logreg": _tiny_logreg})
    row = bench_compiled.compare(
        "logreg", torch.float64, "eager", quick=True, steps=3, repeats=1, compile_ours=False
    )
    assert row["ours_steps"] == row["torch_evals"] - 1 > 0  # both counts include the start
    assert row["ours_loss"] < np.log(2.0) and row["torch_loss"] < np.log(2.0)
    assert row["ratio_cpu"] > 0


def _tiny_logreg(quick, dtype, device):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=gen, dtype=dtype)
    y = torch.sign(x @ torch.ones(5, dtype=dtype) + 0.1)
    params = {"w": torch.zeros(5, dtype=dtype), "b": torch.zeros((), dtype=dtype)}

    def value_fn(p):
        return torch.nn.functional.softplus(-y * (x @ p["w"] + p["b"])).mean()

    return value_fn, params


def test_gpu_check_without_cuda(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the check itself is run by hand")
    assert gpu_check.main() == 0
    assert "no CUDA device" in capsys.readouterr().out
