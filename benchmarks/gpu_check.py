"""One command for a machine with a CUDA device: ``python -m benchmarks.gpu_check``.

1. the CUDA tests (``pytest -k cuda``);
2. the sync-free paths under ``torch.cuda.set_sync_debug_mode("error")``: steps of
   ``chain(lbfgs(), armijo_sync_free())``, vmapped ``levenberg_marquardt`` fits and vmapped
   multistart L-BFGS must not synchronise with the host;
3. the suites ``lbfgs_vs_torch``, ``batched_fits`` and ``multistart`` (100 starts) with
   ``--device cuda``, then ``lbfgs_vs_torch --quick`` compiled with
   ``mode="reduce-overhead"`` (CUDA graphs).

Each part runs in a subprocess under its own time limit (about 8 minutes in all) and one
summary table is printed at the end; the suites' own tables are printed as they run.
Without a CUDA device it prints ``no CUDA device`` and exits 0.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import soo_func as sf
from benchmarks.bench_batched import decay_data, decay_residual, himmelblau
from benchmarks.run import format_table
from benchmarks.sync_free_loops import (
    COMPILE_MODE_VARIABLE,
    lbfgs_batched,
    lbfgs_chain,
    lm_batched,
    make_step,
)

ROOT = Path(__file__).resolve().parent.parent
SUITE_RUNS = (  # (label, suites, --quick, compile mode, seconds allowed)
    ("suite lbfgs_vs_torch", ["lbfgs_vs_torch"], False, "", 200),
    ("suite batched_fits", ["batched_fits"], False, "", 60),
    ("suite multistart (quick: the loop syncs every step)", ["multistart"], True, "", 40),
    ("lbfgs_vs_torch reduce-overhead (quick)", ["lbfgs_vs_torch"], True, "reduce-overhead", 80),
)
TEST_SECONDS = 80  # with the sync checks (about 20 s): 480 s at most


def run_tests() -> dict:
    """``pytest -k cuda`` on the test suite."""
    cmd = [sys.executable, "-m", "pytest", "tests", "-q", "-k", "cuda", "-p", "no:cacheprovider"]
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=TEST_SECONDS)
    except subprocess.TimeoutExpired:
        return {"check": "pytest -k cuda", "status": f"timed out ({TEST_SECONDS} s)"}
    last = (done.stdout.strip().splitlines() or ["(no output)"])[-1]
    status = "ok" if done.returncode == 0 else f"FAILED (rc {done.returncode})"
    if done.returncode != 0:
        print(done.stdout[-4000:], done.stderr[-2000:], sep="\n")
    return {
        "check": "pytest -k cuda",
        "status": status,
        "seconds": round(time.perf_counter() - start, 1),
        "result": last,
    }


def _lbfgs_steps() -> None:
    """Twelve eager steps of the chain on a 1,001-parameter quadratic."""
    params = {
        "w": torch.linspace(-1.0, 1.0, 1000, device="cuda"),
        "b": torch.zeros((), device="cuda"),
    }

    def value_fn(p):
        return ((p["w"] - 0.5) ** 2 * torch.arange(1, 1001, device="cuda")).sum() + p["b"] ** 2

    opt = lbfgs_chain(3)
    step = make_step(opt, value_fn)
    state = opt.init(params)
    value, grad = sf.value_and_grad(value_fn)(params)
    step(params, state, value, grad)  # warm-up outside the check (first-call allocations)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(12):
            params, state, value, grad = step(params, state, value, grad)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _checked(fn) -> None:
    """``fn()`` with host synchronisations raising."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _lm_fits() -> None:
    t, y = decay_data(64)
    t, y = t.cuda(), y.cuda()
    x0 = torch.tensor([1.0, 1.0, 0.0], dtype=y.dtype, device="cuda").expand(64, 3).clone()
    _checked(lambda: lm_batched(decay_residual(t), x0, y, 5))


def _multistart() -> None:
    x0s = torch.rand(64, 2, dtype=torch.float64, device="cuda") * 10 - 5
    _checked(lambda: lbfgs_batched(himmelblau, x0s, 5, 4))


def sync_checks() -> list[dict]:
    """Each sync-free path under ``set_sync_debug_mode("error")``."""
    rows = []
    checks = {
        "sync-free lbfgs+armijo_sync_free steps": _lbfgs_steps,
        "sync-free vmapped levenberg_marquardt": _lm_fits,
        "sync-free vmapped multistart lbfgs": _multistart,
    }
    for name, fn in checks.items():
        start = time.perf_counter()
        try:
            fn()
            status, result = "ok", "no host sync"
        except Exception as err:
            status, result = "FAILED", f"{type(err).__name__}: {str(err).splitlines()[0][:100]}"
        rows.append(
            {
                "check": name,
                "status": status,
                "seconds": round(time.perf_counter() - start, 1),
                "result": result,
            }
        )
    return rows


def _summary(suite: str, rows: list[dict]) -> str:
    """The ratios a suite's rows report, in one line."""
    if suite == "lbfgs_vs_torch":
        return "; ".join(
            f"{r['problem']}/{r['dtype']}/{r['objective']} {r['ratio_wall']}" for r in rows
        )
    if suite == "batched_fits":
        return "; ".join(
            f"{r['fits']} {r['method'].split()[0]} x{r['speedup_vs_scipy']} ({r['within_1e-3']})"
            for r in rows
        )
    return "; ".join(f"x{r['speedup']} minima {r['minima_agree']}" for r in rows)


def run_suites(label: str, suites: list[str], quick: bool, mode: str, limit: int) -> list[dict]:
    """``benchmarks.run`` on ``suites`` with ``--device cuda``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "out.json"
        cmd = [sys.executable, "-m", "benchmarks.run", "--device", "cuda", "--json", str(path)]
        cmd += [arg for s in suites for arg in ("--suite", s)] + (["--quick"] if quick else [])
        env = dict(os.environ, **{COMPILE_MODE_VARIABLE: mode})
        start = time.perf_counter()
        try:
            done = subprocess.run(cmd, cwd=ROOT, env=env, timeout=limit)
        except subprocess.TimeoutExpired:
            return [{"check": label, "status": f"timed out ({limit} s)"}]
        seconds = round(time.perf_counter() - start, 1)
        if not path.exists():
            return [
                {"check": label, "status": f"FAILED (rc {done.returncode})", "seconds": seconds}
            ]
        results = json.loads(path.read_text())["suites"]
    rows = []
    for suite, result in results.items():
        status = "ok" if result["error"] is None else "FAILED"
        summary = _summary(suite, result["rows"]) if status == "ok" else result["error"][-100:]
        rows.append({"check": label, "status": status, "seconds": seconds, "result": summary})
    return rows


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 0
    print(f"device: {torch.cuda.get_device_name()}", flush=True)
    rows = [run_tests(), *sync_checks()]
    for label, suites, quick, mode, limit in SUITE_RUNS:
        rows += run_suites(label, suites, quick, mode, limit)
    print("\n== gpu_check summary\n" + format_table(rows))
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
