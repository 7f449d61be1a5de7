"""What the drivers return: :class:`MinimizeResult`, and the partial result an exception
carries out of a run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

PyTree = Any

__all__ = ["MinimizeResult", "attach_partial_result"]


@dataclass
class MinimizeResult:
    """What :func:`~soo_func.minimize` returns.

    ``history`` holds one dict per step (``step``, ``value``, ``grad_norm``,
    ``step_norm``, evaluation counts, and any 0-d diagnostics the optimizer
    published, e.g. ``continuation_t``); entry 0 is the starting point.

    ``state`` is the optimizer's state at ``params``: ``minimize(value_fn, result.params,
    optimizer, state=result.state)`` continues the run. It is ``None`` when the driver
    returned an optimizer's incumbent (the state belongs to the last point, not to it).

    A sync-free run (``check_every`` other than 1, or ``compile=True``:
    :mod:`soo_func.drivers.sync_free`) reads nothing on the host, so its ``converged`` is
    a 0-d bool tensor, ``num_steps`` a 0-d int64 tensor (the steps the problem took before
    it stopped and was frozen), ``reason_code`` a 0-d int64 tensor indexing
    :data:`~soo_func.drivers.sync_free.REASON_NAMES` (``reason`` then only says so;
    :func:`~soo_func.drivers.sync_free.reason_names` reads it), and ``history`` is empty.
    Batched by ``torch.func.vmap``, each of these has the batch dimension.
    """

    params: PyTree
    value: torch.Tensor
    grad: PyTree
    grad_norm: torch.Tensor
    num_steps: int | torch.Tensor
    num_value_evals: int
    num_grad_evals: int
    num_hvp_evals: int
    converged: bool | torch.Tensor
    reason: str
    state: Any = None  # the optimizer's state at ``params`` (None: see ``reason``)
    history: list[dict[str, float]] = field(default_factory=list)
    num_residual_evals: int = 0  # least_squares: residual_fn evaluations by the optimizer
    reason_code: torch.Tensor | None = None  # sync-free runs only (see above)


def attach_partial_result(err: BaseException, partial: MinimizeResult) -> None:
    """Attach ``partial`` to ``err`` as ``err.partial_result`` (with a note saying so),
    where the exception type allows attributes."""
    try:
        err.partial_result = partial
    except (AttributeError, TypeError):  # pragma: no cover - exceptions with __slots__
        return
    if hasattr(err, "add_note") and not getattr(err, "_soo_func_noted", False):
        err.add_note(
            f"soo_func: the run so far ({partial.num_steps} steps) is err.partial_result; "
            "resume with minimize(value_fn, partial.params, optimizer, state=partial.state)"
        )
        err._soo_func_noted = True
