"""The rows of a sharded residual on every rank: an all-gather that forward-mode AD and
``vmap`` see through, so ``jacfwd`` of a sharded ``residual_fn`` is the whole Jacobian.

Gathering is linear, ``gather(r_1, ..., r_R) = (r_1; ...; r_R)``, so its forward-mode
derivative gathers the tangents, ``d gather = gather(J_1 v; ...; J_R v) = J v``, and under
``vmap`` (``jacfwd`` batches the ``n`` tangents) it gathers the batched rows in one
collective. Its reverse-mode derivative is refused: on replicated params the adjoint of a
gather must also sum the parameter gradients over the ranks, which a single autograd node
cannot do; the oracles' reduced products are the reverse-mode route.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from soo_func.distributed.collective import Collective, DistributedOracleError

__all__ = ["gather_rows", "routes_message"]


def routes_message(who: str, what: str) -> str:
    """Why a direct differentiation of a sharded function is refused, and what to do."""
    return (
        f"{who}: {what} is differentiated in reverse mode outside soo_func's oracles "
        "(value_and_grad, hvp, hvp_operator, linearize_grad, ggn_operator), which would not "
        "be reduced across ranks. A closure around it hides it from them: pass it to the "
        "drivers as it is (minimize(fn, params, opt, args=...), sf.least_squares(res, ..., "
        "args=...), training_step: they bind arguments with .bind), or bind them yourself "
        "with fn.bind(*args)"
    )


class _GatherRows(torch.autograd.Function):
    """``x`` (rows on dim 0, any trailing dims) -> all ranks' rows, in rank order."""

    @staticmethod
    def forward(x: torch.Tensor, gather: Callable, who: str) -> torch.Tensor:
        return gather(x)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        ctx.gather, ctx.who = inputs[1], inputs[2]

    @staticmethod
    def jvp(ctx: Any, tangent: torch.Tensor, *_: Any) -> torch.Tensor:
        return _GatherRows.apply(tangent, ctx.gather, ctx.who)

    @staticmethod
    def backward(ctx: Any, *_: Any):
        raise DistributedOracleError(routes_message(ctx.who, "the sharded residual_fn"))

    @staticmethod
    def vmap(info: Any, in_dims: tuple, x: torch.Tensor, gather: Callable, who: str):
        if in_dims[0] is None:
            return _GatherRows.apply(x, gather, who), None
        return _GatherRows.apply(x.movedim(in_dims[0], 1), gather, who), 1


class RowGatherer:
    """Gathers one sharded function's rows (the ranks' row counts found once, padded)."""

    def __init__(self, collective: Collective):
        self.collective = collective
        self.sizes: dict[int, list[int]] = {}

    def _sizes(self, rows: int, device: torch.device) -> list[int]:
        if rows not in self.sizes:
            mine = torch.tensor([rows], dtype=torch.int64, device=device)
            self.sizes[rows] = [int(s) for s in self.collective.all_gather(mine, "row counts")]
        return self.sizes[rows]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        sizes = self._sizes(x.shape[0], x.device)
        padded = torch.zeros((max(sizes), *x.shape[1:]), dtype=x.dtype, device=x.device)
        padded[: x.shape[0]] = x
        parts = self.collective.all_gather(padded, "residual rows")
        return torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)])


def gather_rows(x: torch.Tensor, gatherer: RowGatherer, who: str) -> torch.Tensor:
    """All ranks' rows of ``x`` (a 0-d residual counts as one row), differentiable in
    forward mode and under ``vmap``."""
    return _GatherRows.apply(x.reshape(1) if x.dim() == 0 else x, gatherer, who)
