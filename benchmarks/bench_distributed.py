"""Data-parallel scaling: a 100-step ``chain(lbfgs(), wolfe())`` solve of L2-regularized
logistic regression (1M x 100 float32) on 1 rank and on 2 gloo ranks of this machine, each
rank with ``OMP_NUM_THREADS=1`` (:func:`soo_func.distributed.run_local`).

Rows: the wall time of the solve on each rank count (data made before the clock starts),
the speed-up 1 -> 2 ranks (goal >= 1.7x), and per step the oracle calls (values and
gradients through the objective) against the all-reduces the data-parallel objective made
(goal: one per oracle call). ``quick``: 100k rows and 20 steps.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

import soo_func as sf
from soo_func import distributed as sfd

GOAL_SPEEDUP = 1.7
FEATURES = 100
CHUNK_ROWS = 125_000


def _chunk(index: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``[index * rows, (index + 1) * rows)`` of the data set (one seed per chunk, so a
    rank makes only its own rows and every rank count solves the same problem)."""
    g = torch.Generator().manual_seed(1000 + index)
    x = torch.randn(rows, FEATURES, generator=g)
    truth = torch.linspace(-1.0, 1.0, FEATURES)
    y = (x @ truth + torch.randn(rows, generator=g) > 0).to(torch.float32)
    return x, y


def _shard(rank: int, world: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    chunks = max(1, rows // CHUNK_ROWS)
    size = rows // chunks
    mine = [_chunk(i, size) for i in range(chunks) if i * world // chunks == rank]
    return torch.cat([c[0] for c in mine]), torch.cat([c[1] for c in mine])


def _loss(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = x @ w
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, y) + 5e-5 * w.dot(w)


def _solve(rank: int, world: int, out_dir: str, rows: int, steps: int) -> None:
    x, y = _shard(rank, world, rows)
    value_fn = sfd.data_parallel(_loss, reduce="mean").bind(x, y)
    w0 = torch.zeros(FEATURES)
    torch.distributed.barrier()
    start = time.perf_counter()
    result = sf.minimize(value_fn, w0, sf.chain(sf.lbfgs(), sf.wolfe()), max_steps=steps, gtol=0.0)
    seconds = time.perf_counter() - start
    if rank == 0:
        row = {
            "seconds": seconds,
            "steps": result.num_steps,
            "value": float(result.value),
            "oracle_calls": result.num_value_evals,
            "collectives": value_fn.num_collectives,
        }
        (Path(out_dir) / f"world{world}.json").write_text(json.dumps(row))


def _timed(world: int, rows: int, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        codes = sfd.run_local(_solve, world, out, rows, steps, timeout=1800.0)
        if codes != [0] * world:
            raise RuntimeError(f"bench_distributed: ranks exited with {codes}")
        return json.loads((Path(out) / f"world{world}.json").read_text())


def run(quick: bool) -> list[dict]:
    rows, steps = (100_000, 20) if quick else (1_000_000, 100)
    results = {world: _timed(world, rows, steps) for world in (1, 2)}
    speedup = results[1]["seconds"] / results[2]["seconds"]
    out = []
    for world, r in results.items():
        out.append({
            "ranks": world,
            "rows": rows,
            "steps": r["steps"],
            "seconds": r["seconds"],
            "speedup": speedup if world == 2 else 1.0,
            "goal_met": speedup >= GOAL_SPEEDUP if world == 2 else True,
            "value": r["value"],
            "oracle_calls_per_step": r["oracle_calls"] / max(1, r["steps"]),
            "collectives_per_step": r["collectives"] / max(1, r["steps"]),
            "collectives_per_oracle_call": r["collectives"] / max(1, r["oracle_calls"]),
        })  # fmt: skip
    return out


SUITES = {"distributed": run}
