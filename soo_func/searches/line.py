"""What the line searches share: evaluation along a ray, the search state, publishing,
the initial step and the safeguarded interpolation formulas.

Along a descent direction ``d`` at ``x`` a search studies ``phi(alpha) = f(x + alpha d)``
with ``phi(0) = f(x)`` and ``phi'(0) = <grad f(x), d> < 0`` (Nocedal & Wright, *Numerical
Optimization*, 2nd ed., chapter 3). The searches decide on the host: each trial costs one
host synchronisation (its value and slope are read together), and one more is spent at
the start to read ``phi(0)``, ``phi'(0)`` and the initial-step inputs. The count is kept
in the state as ``num_syncs``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch

from soo_func import tree
from soo_func.options import check_int_at_least
from soo_func.oracles import value_and_grad

PyTree = Any

__all__ = [
    "INITIAL_STEPS",
    "LineSearchState",
    "Ray",
    "Trial",
    "cubic_minimizer",
    "cubic_minimizer_from_values",
    "init_search_state",
    "publish_search",
    "quadratic_minimizer",
    "safeguard",
]

INITIAL_STEPS = ("unit", "previous_decrease")


class LineSearchState(NamedTuple):
    """The state of :func:`~soo_func.searches.armijo` and :func:`~soo_func.searches.wolfe`.

    Attributes:
      step_size: 0-d, the step length ``alpha`` taken by the last update (0 when it failed
        without a decreasing point).
      next_value: 0-d, the objective at ``params + alpha d`` (at ``params`` after a zero step;
        +inf before the first update).
      next_grad: the gradient there (a pytree like the params).
      search_failed: 0-d bool, no step met the search's conditions in the last update.
      num_search_evals: 0-d int64, objective evaluations of the last update.
      num_search_grads: 0-d int64, gradient evaluations of the last update.
      num_syncs: 0-d int64, host synchronisations over all updates so far.
      previous_value: 0-d, the objective at the start of the last update (+inf before the
        first), for the ``"previous_decrease"`` initial step.
    """

    step_size: torch.Tensor
    next_value: torch.Tensor
    next_grad: PyTree
    search_failed: torch.Tensor
    num_search_evals: torch.Tensor
    num_search_grads: torch.Tensor
    num_syncs: torch.Tensor
    previous_value: torch.Tensor


def _float_leaf(params: PyTree) -> torch.Tensor:
    for leaf in tree.leaves(params):
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
            return leaf
    raise TypeError("a line search needs params with at least one floating-point tensor leaf")


def init_search_state(params: PyTree) -> LineSearchState:
    """The state before the first update: +inf values (not NaN, so that states compare
    equal), zero gradient, no failure."""
    like = _float_leaf(params)
    unknown = torch.full((), math.inf, dtype=like.dtype, device=like.device)
    count = torch.zeros((), dtype=torch.int64, device=like.device)
    # one tensor per field (.clone()): shared ones would make a compiled update recompile
    return LineSearchState(
        step_size=torch.zeros((), dtype=like.dtype, device=like.device),
        next_value=unknown,
        next_grad=tree.zeros_like(params),
        search_failed=torch.zeros((), dtype=torch.bool, device=like.device),
        num_search_evals=count,
        num_search_grads=count.clone(),
        num_syncs=count.clone(),
        previous_value=unknown.clone(),
    )


def publish_search(state: LineSearchState, params: PyTree = None, **extra: Any) -> dict[str, Any]:
    """What a line search publishes after its update (see :mod:`soo_func.base`).

    ``next_value``/``next_grad`` belong to ``next_value_fn``, the ``value_fn`` extra the
    search evaluated, so the driver reuses them instead of evaluating the point again.
    """
    del params
    return {
        "next_value": state.next_value,
        "next_grad": state.next_grad,
        "next_value_fn": extra.get("value_fn"),
        "search_failed": state.search_failed,
        "step_size": state.step_size,
        "num_search_evals": state.num_search_evals,
        "num_search_grads": state.num_search_grads,
    }


class Trial(NamedTuple):
    """One evaluated point ``alpha`` of the ray: host floats for decisions, tensors to hand on.

    ``slope`` is ``phi'(alpha)`` (NaN when only the value was evaluated, then ``grad`` is None).
    """

    alpha: float
    value: float
    slope: float
    value_tensor: torch.Tensor
    grad: PyTree | None

    @property
    def finite(self) -> bool:
        return math.isfinite(self.value) and (self.grad is None or math.isfinite(self.slope))


class Ray:
    """``phi(alpha) = value_fn(params + alpha * direction)`` with evaluation and sync counts.

    Trial points are built as ``params + (alpha * direction)``, exactly as
    :func:`soo_func.apply_updates` builds them from the returned step, so the value and
    gradient handed to the driver belong to the point it moves to. Gradients go through
    :func:`soo_func.oracles.value_and_grad` and values through ``value_fn`` itself, so a
    :class:`~soo_func.oracles.CountedObjective` is charged for both.
    """

    def __init__(self, value_fn: Callable, params: PyTree, direction: PyTree):
        self.value_fn = value_fn
        self.params = params
        self.direction = direction
        self.num_evals = 0
        self.num_grads = 0
        self.num_syncs = 0
        self._last_step: tuple[float, PyTree] | None = None

    def step(self, alpha: float) -> PyTree:
        """The update ``alpha * direction`` (the last one is kept: the accepted trial is
        usually the last, and its step is then not computed twice)."""
        if self._last_step is not None and self._last_step[0] == alpha:
            return self._last_step[1]
        step = tree.scale(alpha, self.direction)
        self._last_step = (alpha, step)
        return step

    def point(self, alpha: float) -> PyTree:
        return tree.add(self.params, self.step(alpha))

    def value(self, alpha: float) -> Trial:
        """``phi(alpha)`` only (one value evaluation, one sync)."""
        with torch.no_grad():
            value = self.value_fn(self.point(alpha))
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise ValueError("value_fn must return a scalar (0-d) loss tensor")
        value = value.detach().reshape(())
        self.num_evals += 1
        self.num_syncs += 1
        return Trial(alpha, float(value), math.nan, value, None)

    def value_and_slope(self, alpha: float) -> Trial:
        """``phi(alpha)`` and ``phi'(alpha) = <grad f(x + alpha d), d>`` (one sync for both)."""
        value, grad = value_and_grad(self.value_fn)(self.point(alpha))
        slope = tree.vdot(grad, self.direction)
        self.num_evals += 1
        self.num_grads += 1
        self.num_syncs += 1
        host_value, host_slope = torch.stack([value.double(), slope.double()]).tolist()
        return Trial(alpha, host_value, host_slope, value, grad)


class Start(NamedTuple):
    """``phi(0)``, ``phi'(0)`` and the first trial step, read in one host sync, with the
    numbers of evaluations and gradients of the previous update (0 before the first)."""

    value: float
    slope: float
    initial_step: float
    previous_evals: int
    previous_grads: int


def read_start(
    ray: Ray,
    value: torch.Tensor,
    grad: PyTree,
    state: LineSearchState,
    initial_step: str | float,
    published_step: Any,
) -> Start:
    """Read ``phi(0)``, ``phi'(0)`` and choose the first trial step (one sync).

    Order of precedence: a finite positive ``step_hint`` 0-d tensor published upstream
    (nonlinear CG publishes one), then the search's ``initial_step`` strategy:

    * a number: that step;
    * ``"unit"``: 1 (Newton and quasi-Newton directions are scaled);
    * ``"previous_decrease"``: Nocedal & Wright eq. (3.60),
      ``alpha0 = 2 (f_k - f_{k-1}) / phi'(0)``, capped at 1; before the first update it
      uses ``f_{k-1} = f_k + ||grad||/2`` (scipy's convention), that is
      ``alpha0 = ||grad|| / |phi'(0)|`` (unit length for steepest descent).
    """
    slope = tree.vdot(grad, ray.direction)
    nan = torch.full((), math.nan, dtype=torch.float64, device=slope.device)
    hint = nan
    if isinstance(published_step, torch.Tensor) and published_step.numel() == 1:
        hint = published_step.detach().reshape(()).to(device=slope.device, dtype=torch.float64)
    elif isinstance(published_step, (int, float)):
        hint = torch.full((), float(published_step), dtype=torch.float64, device=slope.device)
    grad_norm = tree.norm(grad).double() if initial_step == "previous_decrease" else nan
    numbers = torch.stack(
        [
            value.detach().reshape(()).double(),
            slope.double(),
            hint,
            state.previous_value.double().to(slope.device),
            grad_norm,
            state.num_search_evals.double().to(slope.device),
            state.num_search_grads.double().to(slope.device),
        ]
    ).tolist()
    ray.num_syncs += 1
    f0, slope0, hint_f, previous, norm, previous_evals, previous_grads = numbers
    if math.isfinite(hint_f) and hint_f > 0:
        alpha0 = hint_f
    elif initial_step == "unit":
        alpha0 = 1.0
    elif initial_step == "previous_decrease":
        if math.isfinite(previous):
            alpha0 = 2.0 * (f0 - previous) / slope0 if slope0 != 0 else math.nan
        else:
            alpha0 = norm / abs(slope0) if slope0 != 0 else math.nan
        alpha0 = min(1.0, alpha0) if math.isfinite(alpha0) and alpha0 > 0 else 1.0
    else:
        alpha0 = float(initial_step)
    return Start(f0, slope0, alpha0, int(previous_evals), int(previous_grads))


def check_initial_step(who: str, initial_step: str | float) -> str | float:
    """Validate an ``initial_step`` argument: a strategy name or a positive finite number."""
    if isinstance(initial_step, str):
        if initial_step not in INITIAL_STEPS:
            raise ValueError(
                f"{who}: initial_step must be one of {INITIAL_STEPS} or a positive number, "
                f"got {initial_step!r}"
            )
        return initial_step
    if isinstance(initial_step, bool) or not isinstance(initial_step, (int, float)):
        raise TypeError(
            f"{who}: initial_step must be one of {INITIAL_STEPS} or a positive number, got "
            f"{type(initial_step).__name__}"
        )
    if not (math.isfinite(initial_step) and initial_step > 0):
        raise ValueError(f"{who}: initial_step must be positive and finite, got {initial_step}")
    return float(initial_step)


def check_max_steps(who: str, max_steps: int) -> int:
    """Validate a ``max_steps`` argument: an integer >= 1."""
    return check_int_at_least(who, "max_steps", max_steps, 1)


def resolve_alias(who: str, name: str, value: float | None, alias: str, alias_value, default):
    """``value`` or its alias (``c1`` for ``slope_rtol``...), refusing two different values."""
    if value is not None and alias_value is not None and value != alias_value:
        raise ValueError(
            f"{who}: {name}={value} and its alias {alias}={alias_value} disagree; pass only one"
        )
    chosen = value if value is not None else alias_value
    return default if chosen is None else float(chosen)


def finish(
    ray: Ray,
    state: LineSearchState,
    start_value: torch.Tensor,
    start_grad: PyTree,
    accepted: Trial | None,
    failed: bool,
) -> tuple[PyTree, LineSearchState]:
    """The update ``alpha * d`` and the new state for the ``accepted`` trial (zero step if None).

    ``accepted`` must carry its gradient.
    """
    like = start_value.detach().reshape(())
    device = like.device
    if accepted is None:
        updates = tree.zeros_like(ray.direction)
        alpha, next_value, next_grad = 0.0, like, start_grad
    else:
        updates = ray.step(accepted.alpha)
        alpha, next_value, next_grad = accepted.alpha, accepted.value_tensor, accepted.grad
    new_state = LineSearchState(
        step_size=torch.tensor(alpha, dtype=like.dtype, device=device),
        next_value=next_value.reshape(()),
        next_grad=next_grad,
        search_failed=torch.tensor(failed, device=device),
        num_search_evals=torch.tensor(ray.num_evals, dtype=torch.int64, device=device),
        num_search_grads=torch.tensor(ray.num_grads, dtype=torch.int64, device=device),
        num_syncs=state.num_syncs + ray.num_syncs,
        previous_value=like,
    )
    return updates, new_state


def check_extras(who: str, updates: PyTree, state: Any, extra: Mapping[str, Any]) -> None:
    if not isinstance(state, LineSearchState):
        raise TypeError(
            f"{who} got a state of type {type(state).__name__}: pass the state made by its init"
        )
    tree.check_same_structure(extra["grad"], updates, names=("grad", "updates (the direction)"))


# --- interpolation (host floats) -------------------------------------------------------


def quadratic_minimizer(a: float, fa: float, dfa: float, b: float, fb: float) -> float:
    """Minimizer of the quadratic with value ``fa`` and slope ``dfa`` at ``a`` and value ``fb``
    at ``b``; NaN when it has none (non-positive curvature).

    With ``a = 0`` this is Nocedal & Wright eq. (3.57),
    ``alpha1 = -phi'(0) alpha0^2 / (2 [phi(alpha0) - phi(0) - phi'(0) alpha0])``.
    """
    width = b - a
    curvature = (fb - fa - dfa * width) / (width * width) if width != 0 else math.nan
    if not (math.isfinite(curvature) and curvature > 0):
        return math.nan
    return a - dfa / (2.0 * curvature)


def cubic_minimizer(a: float, fa: float, dfa: float, b: float, fb: float, dfb: float) -> float:
    """Minimizer of the cubic matching values and slopes at ``a`` and ``b`` (Nocedal & Wright
    eq. (3.59)); NaN when the cubic has no local minimizer.

    ``d1 = phi'(a) + phi'(b) - 3 (phi(a) - phi(b)) / (a - b)``,
    ``d2 = sign(b - a) sqrt(d1^2 - phi'(a) phi'(b))``,
    ``x = b - (b - a) (phi'(b) + d2 - d1) / (phi'(b) - phi'(a) + 2 d2)``.
    """
    if a == b:
        return math.nan
    d1 = dfa + dfb - 3.0 * (fa - fb) / (a - b)
    radicand = d1 * d1 - dfa * dfb
    if not (math.isfinite(radicand) and radicand >= 0):
        return math.nan
    d2 = math.copysign(math.sqrt(radicand), b - a)
    denominator = dfb - dfa + 2.0 * d2
    if denominator == 0 or not math.isfinite(denominator):
        return math.nan
    x = b - (b - a) * (dfb + d2 - d1) / denominator
    return x if math.isfinite(x) else math.nan


def cubic_minimizer_from_values(
    f0: float, df0: float, a0: float, fa0: float, a1: float, fa1: float
) -> float:
    """Minimizer of the cubic through ``phi(0)``, ``phi'(0)``, ``phi(a0)``, ``phi(a1)``
    (Nocedal & Wright, the cubic before eq. (3.58) and eq. (3.58)); NaN if it has none.

    ``phi_c(x) = a x^3 + b x^2 + phi'(0) x + phi(0)`` with
    ``[a, b] = [[a0^2, -a1^2], [-a0^3, a1^3]] [r1, r0] / (a0^2 a1^2 (a1 - a0))``,
    ``r1 = phi(a1) - phi(0) - phi'(0) a1``, ``r0 = phi(a0) - phi(0) - phi'(0) a0``, and
    the minimizer ``x = (-b + sqrt(b^2 - 3 a phi'(0))) / (3 a)``.
    """
    if a0 == a1 or a0 == 0 or a1 == 0:
        return math.nan
    r1 = fa1 - f0 - df0 * a1
    r0 = fa0 - f0 - df0 * a0
    denominator = a0 * a0 * a1 * a1 * (a1 - a0)
    a = (a0 * a0 * r1 - a1 * a1 * r0) / denominator
    b = (-(a0**3) * r1 + a1**3 * r0) / denominator
    if not (math.isfinite(a) and math.isfinite(b)):
        return math.nan
    if a == 0:
        return -df0 / (2.0 * b) if b > 0 else math.nan
    radicand = b * b - 3.0 * a * df0
    if radicand < 0:
        return math.nan
    # (-b + sqrt(rad)) / (3a), written to avoid cancellation when b > 0.
    root = math.sqrt(radicand)
    x = -df0 / (b + root) if b + root != 0 else (-b + root) / (3.0 * a)
    return x if math.isfinite(x) else math.nan


def safeguard(x: float, lo: float, hi: float, fallback: float) -> float:
    """``x`` clipped into ``[lo, hi]`` (``lo <= hi``), or ``fallback`` when ``x`` is NaN."""
    if not math.isfinite(x):
        return fallback
    return min(max(x, lo), hi)
