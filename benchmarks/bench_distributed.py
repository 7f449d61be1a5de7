"""Data-parallel scaling: a 100-step ``chain(lbfgs(), wolfe())`` solve of L2-regularized
logistic regression (1M x 100 float32, columns scaled over 3 decades so that the solve
runs its 100 steps) on 1 rank and on 2 gloo ranks of this machine, each rank with
``OMP_NUM_THREADS=1`` (:func:`soo_func.distributed.run_local`).

Rows: the wall time of the solve and per step (data made before the clock starts), the
speed-up 1 -> 2 ranks per step (goal >= 1.7x), and per step the oracle calls (values and
gradients through the objective) against the all-reduces the data-parallel objective made
(goal: one per oracle call). The control row ``2 (no collectives)`` solves each rank's
shard alone (plain objective, same work per step, no communication): its speed-up is what
the machine itself allows at that moment (the cores are shared), the ceiling for the
data-parallel one. ``quick``: 100k rows and 20 steps.
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
CHUNKS = 8  # the data set is made in 8 seeded chunks; a rank makes only its own


def _chunk(index: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``[index * rows, (index + 1) * rows)`` of the data set (one seed per chunk, so
    every rank count solves the same problem)."""
    g = torch.Generator().manual_seed(1000 + index)
    x = torch.randn(rows, FEATURES, generator=g)
    y = (x @ torch.linspace(-1.0, 1.0, FEATURES) + torch.randn(rows, generator=g) > 0).float()
    return x * torch.logspace(-1.5, 1.5, FEATURES), y


def _shard(rank: int, world: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    mine = [_chunk(i, rows // CHUNKS) for i in range(CHUNKS) if i * world // CHUNKS == rank]
    return torch.cat([c[0] for c in mine]), torch.cat([c[1] for c in mine])


def _loss(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = x @ w
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, y) + 5e-5 * w.dot(w)


def _solve(rank: int, world: int, out_dir: str, rows: int, steps: int, reduced: bool) -> None:
    x, y = _shard(rank, world, rows)
    local = sfd.data_parallel(_loss, reduce="mean") if reduced else _loss
    value_fn = local.bind(x, y) if reduced else (lambda w: _loss(w, x, y))
    torch.distributed.barrier()
    start = time.perf_counter()
    result = sf.minimize(value_fn, torch.zeros(FEATURES), sf.chain(sf.lbfgs(), sf.wolfe()),
                         max_steps=steps, gtol=0.0)  # fmt: skip
    row = {
        "seconds": time.perf_counter() - start,
        "steps": result.num_steps,
        "value": float(result.value),
        "oracle_calls": result.num_value_evals,
        "collectives": value_fn.num_collectives if reduced else 0,
    }
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(row))


def _timed(world: int, rows: int, steps: int, reduced: bool) -> dict:
    """Rank 0's row, with the slowest rank's time (the ranks of the control are unsynchronised)."""
    with tempfile.TemporaryDirectory() as out:
        codes = sfd.run_local(_solve, world, out, rows, steps, reduced, timeout=1800.0)
        if codes != [0] * world:
            raise RuntimeError(f"bench_distributed: ranks exited with {codes}")
        ranks = [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(world)]
    row = dict(ranks[0], seconds=max(r["seconds"] for r in ranks))
    row["per_step"] = row["seconds"] / max(1, row["steps"])
    return row


def run(quick: bool) -> list[dict]:
    rows, steps = (100_000, 20) if quick else (1_000_000, 100)
    runs = {
        "1": _timed(1, rows, steps, reduced=True),
        "2": _timed(2, rows, steps, reduced=True),
        "2 (no collectives)": _timed(2, rows, steps, reduced=False),
    }
    out = []
    for name, r in runs.items():
        speedup = runs["1"]["per_step"] / r["per_step"]
        calls = max(1, r["oracle_calls"])
        out.append({
            "ranks": name,
            "rows": rows,
            "steps": r["steps"],
            "seconds": r["seconds"],
            "ms_per_step": 1000 * r["per_step"],
            "speedup_per_step": speedup,
            "goal_met": speedup >= GOAL_SPEEDUP if name == "2" else "",
            "value": r["value"],
            "oracle_calls_per_step": r["oracle_calls"] / max(1, r["steps"]),
            "collectives_per_step": r["collectives"] / max(1, r["steps"]),
            "collectives_per_oracle_call": r["collectives"] / calls,
        })  # fmt: skip
    return out


SUITES = {"distributed": run}
