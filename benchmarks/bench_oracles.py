"""Oracle overheads: ``sf.value_and_grad`` against eager ``torch.autograd.grad``, and Hessian
products (``sf.hvp`` in both modes, ``sf.linearize_grad``'s operator) against a gradient.

Goals (ratios measured in the same run, float32, median of repeats after warm-up):
``value_and_grad`` within 1.1x of eager autograd; one Hessian product within 2.5x of a
gradient. Models: an MLP and a small conv net with GroupNorm, both through
``torch.func.functional_call`` on a params dict.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import soo_func as sf

GOAL_VALUE_AND_GRAD = 1.1
GOAL_HVP = 2.5


def _mlp(quick: bool) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    width = 128 if quick else 512
    model = nn.Sequential(
        nn.Linear(64, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 10)
    )
    inputs = torch.randn(256, 64)
    targets = torch.randint(0, 10, (256,))
    return model, inputs, targets


def _convnet(quick: bool) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    channels = 8 if quick else 16
    model = nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1),
        nn.GroupNorm(4, channels),
        nn.Tanh(),
        nn.Conv2d(channels, 2 * channels, 3, padding=1),
        nn.GroupNorm(4, 2 * channels),
        nn.Tanh(),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(2 * channels * 16, 10),
    )
    inputs = torch.randn(32 if quick else 64, 3, 16, 16)
    targets = torch.randint(0, 10, (inputs.shape[0],))
    return model, inputs, targets


def _round_robin_medians(
    cases: dict[str, Callable[[], object]], repeats: int, warmup: int = 3
) -> dict[str, float]:
    """Median seconds per case, timing one call of each case in turn, so that load changes
    on a shared machine hit every case alike (the ratios are what we report)."""
    for _ in range(warmup):
        for fn in cases.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def _measure(name: str, build, quick: bool) -> list[dict]:
    torch.manual_seed(0)
    model, inputs, targets = build(quick)
    value_fn, params = sf.functional_loss(model, nn.functional.cross_entropy)
    batch = (inputs, targets)

    def loss(p):
        return value_fn(p, batch)

    v = {k: torch.randn_like(t) for k, t in params.items()}
    leaves = [t.detach().requires_grad_(True) for t in params.values()]
    names = list(params)

    def eager():
        out = loss(dict(zip(names, leaves, strict=True)))
        return torch.autograd.grad(out, leaves)

    vg = sf.value_and_grad(loss)
    _, _, hvp_op = sf.linearize_grad(loss, params)
    cases = {
        "eager_grad": eager,
        "value_and_grad": lambda: vg(params),
        "hvp_fwd_rev": lambda: sf.hvp(loss, params, v),
        "hvp_rev_rev": lambda: sf.hvp(loss, params, v, mode="reverse-over-reverse"),
        "linearized_hvp": lambda: hvp_op(v),
        "linearize_grad": lambda: sf.linearize_grad(loss, params),
    }
    repeats = 21 if quick else 41
    t = _round_robin_medians(cases, repeats)
    num_params = sum(p.numel() for p in params.values())
    row = {
        "model": name,
        "params": num_params,
        "eager_grad_ms": 1e3 * t["eager_grad"],
        "vg_over_eager": t["value_and_grad"] / t["eager_grad"],
        "hvp_fwd_rev_over_grad": t["hvp_fwd_rev"] / t["value_and_grad"],
        "hvp_rev_rev_over_grad": t["hvp_rev_rev"] / t["value_and_grad"],
        "linearized_hvp_over_grad": t["linearized_hvp"] / t["value_and_grad"],
        "linearize_over_grad": t["linearize_grad"] / t["value_and_grad"],
    }
    row["vg_goal_met"] = row["vg_over_eager"] <= GOAL_VALUE_AND_GRAD
    row["hvp_goal_met"] = row["hvp_fwd_rev_over_grad"] <= GOAL_HVP
    return [row]


def oracles(quick: bool) -> list[dict]:
    """Oracle overheads on an MLP and a GroupNorm conv net (float32, CPU)."""
    return _measure("mlp", _mlp, quick) + _measure("convnet_groupnorm", _convnet, quick)


def oracles_quick(quick: bool) -> list[dict]:
    """The bundled default (``make bench``): the quick sizes."""
    del quick
    return oracles(quick=True)


SUITES = {"oracles": oracles, "oracles_quick": oracles_quick}
DEFAULT = ["oracles_quick"]

if __name__ == "__main__":
    from benchmarks.run import format_table

    print(format_table(oracles(quick=True)))
