"""The publication record: what a chain member may tell the members after it and the driver.

A :class:`~soo_func.base.Transform` may carry ``publish(state, params, **extra) -> Mapping``.
Its keys are declared here, once, each with a :class:`Role`:

* ``model`` -- the quadratic model of a direction (its curvature operator, a step-length
  hint). Forwarded to the later members of a chain as keyword extras.
* ``objective`` -- a rewritten objective (a homotopy's ``f_t``, its value and gradient, how to
  recover the original objective's value from it, a moved point). Forwarded as extras too:
  every later member then works on the rewritten objective.
* ``outcome`` -- what a search hands the driver (the value and gradient at the accepted
  point, failure, whether convergence may be declared, an incumbent). Not forwarded.
* ``diagnostic`` -- 0-d tensors the driver records in its history. Not forwarded.

A key that is not declared is a user's extension: it is forwarded to later members (the
way to hand a custom model down a chain), and recorded in the history when it is a 0-d
tensor. ``docs/design.md``'s table is :func:`markdown_table` (a test keeps them equal).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, TypedDict, get_type_hints

import torch

from soo_func.tree import FlatStep

PyTree = Any

__all__ = [
    "DECLARED",
    "EXTRAS",
    "Declared",
    "Publication",
    "Role",
    "forwarded",
    "markdown_table",
    "recorded",
]


class Role(enum.Enum):
    """Who a published key is for (see the module docstring)."""

    MODEL = "model"
    OBJECTIVE = "objective"
    OUTCOME = "outcome"
    DIAGNOSTIC = "diagnostic"


#: Roles whose keys reach the later members of a chain as keyword extras.
FORWARDED_ROLES = frozenset({Role.MODEL, Role.OBJECTIVE})


@dataclass(frozen=True)
class Declared:
    """The declaration of one published key: its role, who publishes and reads it, meaning."""

    role: Role
    publishers: str
    readers: str
    meaning: str
    recorded: bool = True  # a 0-d tensor under this key goes to the driver's history


_MODEL, _OBJECTIVE, _OUTCOME = Role.MODEL, Role.OBJECTIVE, Role.OUTCOME
_DIRECTIONS = "bfgs, dfp, sr1, broyden, ssbfgs, ssbroyden, lbfgs, newton_krylov, gauss_newton"
_REWRITERS = "homotopy, arclength_homotopy"
_SEARCHES = (
    "armijo, armijo_sync_free, wolfe, trust_region, levenberg, levenberg_marquardt, lbfgs_b, "
    "trust_region_reflective"
)


class Publication(TypedDict, total=False):
    """The declared keys of a publication, typed, with their :class:`Declared` metadata."""

    curvature: Annotated[
        Callable[[PyTree], PyTree],
        Declared(
            _MODEL,
            _DIRECTIONS,
            "trust_region, levenberg, hessian_free",
            "`v -> B v`: the Hessian (or its approximation) of the direction's quadratic model "
            "`m(d) = f + <g, d> + 0.5 <d, B d>` at params",
        ),
    ]
    direction_skipped: Annotated[
        bool,
        Declared(
            _MODEL,
            "newton_krylov (under `model_only`)",
            "trust_region",
            "True: the direction did not solve its model (it was told `model_only`); its "
            "updates are the negative gradient, not a warm start",
            False,
        ),
    ]
    step_hint: Annotated[
        torch.Tensor,
        Declared(
            _MODEL,
            "lbfgs, bfgs, dfp, sr1, broyden, nonlinear_cg",
            "armijo, armijo_sync_free, wolfe",
            "0-d: the first trial step length the direction suggests (used when finite and "
            "positive)",
        ),
    ]
    flat_step: Annotated[
        FlatStep,
        Declared(
            _MODEL,
            "lbfgs, bfgs, dfp, sr1, broyden (limited memory)",
            "armijo_sync_free",
            "a `tree.FlatStep`: the direction's params, gradient and updates with their "
            "raveled vectors, reused by a search whose trees are these (by identity)",
            False,
        ),
    ]
    value_fn: Annotated[
        Callable[[PyTree], torch.Tensor],
        Declared(_OBJECTIVE, _REWRITERS, "every later member", "the rewritten objective"),
    ]
    value: Annotated[
        torch.Tensor,
        Declared(_OBJECTIVE, _REWRITERS, "every later member", "its 0-d value at params", False),
    ]
    grad: Annotated[
        PyTree,
        Declared(_OBJECTIVE, _REWRITERS, "every later member", "its gradient at params"),
    ]
    residual_fn: Annotated[
        Callable[[PyTree], PyTree],
        Declared(
            _OBJECTIVE,
            "a rewriter of a least-squares objective",
            "every later member",
            "the rewritten residual function (the loss is half its sum of squares)",
        ),
    ]
    recover_objective: Annotated[
        Callable[..., tuple[torch.Tensor, PyTree]],
        Declared(
            _OBJECTIVE,
            "homotopy",
            "the driver",
            "`(value, grad, params) -> (value, grad)`: the original objective's value and "
            "gradient from the rewritten one's, exactly (Keller: `f = f_t + (1 - t) <g0, x>`)",
        ),
    ]
    params_offset: Annotated[
        PyTree,
        Declared(
            _OBJECTIVE,
            _REWRITERS,
            "chain (adds it to the final updates; not published further)",
            "the member moved the point to `params + params_offset` and published the "
            "objective as seen from there, `p -> f(p + params_offset)`",
        ),
    ]
    continuation_restart: Annotated[
        torch.Tensor,
        Declared(
            _OBJECTIVE,
            _REWRITERS,
            "reset_at_stage_change",
            "0-d bool: the rewritten objective changed (a new stage of the path)",
        ),
    ]
    next_value: Annotated[
        torch.Tensor,
        Declared(
            _OUTCOME,
            _SEARCHES,
            "the driver",
            "0-d: `next_value_fn` at `params + updates`, already evaluated",
            False,
        ),
    ]
    next_grad: Annotated[
        PyTree,
        Declared(_OUTCOME, _SEARCHES, "the driver", "its gradient there"),
    ]
    next_value_fn: Annotated[
        Callable[[PyTree], torch.Tensor],
        Declared(
            _OUTCOME,
            _SEARCHES,
            "the driver",
            "the objective the search evaluated (the driver reuses `next_value`/`next_grad` "
            "when it is its own, or recovers them through `recover_objective`)",
        ),
    ]
    search_failed: Annotated[
        torch.Tensor,
        Declared(
            _OUTCOME,
            _SEARCHES,
            "the driver",
            "0-d bool: no acceptable step was found; a safe step was returned",
        ),
    ]
    projected_grad_inf: Annotated[
        torch.Tensor,
        Declared(
            _OUTCOME,
            "lbfgs_b, trust_region_reflective",
            "the driver (its gtol and gtol_rel test it instead of ||g||_inf)",
            "0-d: ||P(x - g) - x||_inf at the accepted point, the first-order stationarity "
            "measure on the box",
        ),
    ]
    converged_ok: Annotated[
        torch.Tensor,
        Declared(
            _OUTCOME,
            _REWRITERS,
            "the driver",
            "0-d bool: whether the driver may declare convergence (false before t = 1)",
        ),
    ]
    incumbent_params: Annotated[
        PyTree,
        Declared(
            _OUTCOME,
            "arclength_homotopy",
            "the driver",
            "the best minimizer found while exploring; returned if lower at the stop",
        ),
    ]
    incumbent_value: Annotated[
        torch.Tensor,
        Declared(_OUTCOME, "arclength_homotopy", "the driver", "0-d: its value (inf: none)", False),
    ]
    uncharged_evals: Annotated[
        torch.Tensor,
        Declared(
            _OUTCOME,
            "armijo_sync_free (compiled)",
            "the sync-free driver (adds them to its counts)",
            "[values, gradients] int64: evaluations made inside `torch.cond` branches, "
            "which charge no host counter",
        ),
    ]


def _diagnostic(publishers: str, meaning: str) -> Declared:
    return Declared(Role.DIAGNOSTIC, publishers, "the driver's history", meaning)


_LINE = "armijo, armijo_sync_free, wolfe"
_CONTINUATION = "homotopy, arclength_homotopy"

#: The diagnostics the library's transforms publish (0-d tensors, recorded, not forwarded).
DIAGNOSTICS: dict[str, Declared] = {
    "step_size": _diagnostic(_LINE, "the accepted step length alpha"),
    "num_active_bounds": _diagnostic(
        "lbfgs_b, trust_region_reflective", "entries on a bound after the step"
    ),
    "num_search_evals": _diagnostic(_LINE, "values evaluated by the search so far"),
    "num_search_grads": _diagnostic(_LINE, "gradients evaluated by the search so far"),
    "radius": _diagnostic(
        "trust_region, trust_region_reflective", "the trust-region radius after the step"
    ),
    "ratio": _diagnostic(
        "trust_region, levenberg, trust_region_reflective",
        "actual over predicted reduction of the trial step",
    ),
    "step_accepted": _diagnostic("trust_region, levenberg", "0-d bool: the trial step was taken"),
    "damping": _diagnostic("levenberg, levenberg_marquardt", "the damping lambda after the step"),
    "cg_beta": _diagnostic("nonlinear_cg", "the conjugacy parameter beta_k"),
    "cg_restarted": _diagnostic("nonlinear_cg", "0-d bool: the direction restarted"),
    "newton_forcing_term": _diagnostic("newton_krylov", "the inner solve's relative tolerance"),
    "newton_krylov_iters": _diagnostic("newton_krylov", "inner Krylov iterations"),
    "newton_negative_curvature": _diagnostic(
        "newton_krylov", "0-d bool: negative curvature was met"
    ),
    "newton_fallback": _diagnostic("newton_krylov", "0-d bool: the steepest-descent fallback"),
    "gauss_newton_krylov_iters": _diagnostic("gauss_newton", "inner CG iterations"),
    "gauss_newton_fallback": _diagnostic("gauss_newton", "0-d bool: the fallback was taken"),
    "hessian_free_damping": _diagnostic("hessian_free", "the Levenberg-Marquardt damping"),
    "hessian_free_reduction_ratio": _diagnostic("hessian_free", "the reduction ratio rho"),
    "continuation_t": _diagnostic(_CONTINUATION, "the homotopy parameter t"),
    "continuation_t_path": _diagnostic("homotopy", "t on the followed path"),
    "continuation_stage": _diagnostic("homotopy", "the stage counter"),
    "continuation_step": _diagnostic("homotopy", "the t-increment"),
    "continuation_retries": _diagnostic("homotopy", "retries of the current stage"),
    "continuation_grad_norm": _diagnostic("homotopy", "the norm of the gradient of f_t"),
    "continuation_path_steps": _diagnostic("arclength_homotopy", "steps along the curve"),
    "continuation_rejections": _diagnostic("arclength_homotopy", "rejected curve steps"),
    "continuation_crossings": _diagnostic("arclength_homotopy", "crossings of t = 1"),
    "continuation_minimizers": _diagnostic("arclength_homotopy", "minimizers found"),
    "continuation_descent_steps": _diagnostic("arclength_homotopy", "descent steps taken"),
}


def _extra(readers: str, meaning: str) -> Declared:
    return Declared(Role.OBJECTIVE, "the caller (the drivers pass them)", readers, meaning)


#: The keyword extras a caller passes to ``update`` (what is known at the current point).
#: Not publications: listed here so that every key of the extras channel has one home.
EXTRAS: dict[str, Declared] = {
    "value": _extra("searches, trust regions, Levenberg", "`value=loss`: the 0-d loss at params"),
    "grad": _extra("searches, Levenberg (chain passes its input when absent)",
                   "`grad=g`: the gradient pytree at params"),
    "value_fn": _extra("searches, newton_krylov, hessian_free, homotopy",
                       "`value_fn=loss_fn`: a function params -> 0-d loss tensor"),
    "residual_fn": _extra("gauss_newton, levenberg_marquardt, trust_region_reflective",
                          "`residual_fn=fn`: a function params -> residual pytree (the loss is "
                          "half the sum of squares; least_squares passes it)"),
    "curvature": _extra("hessian_free, levenberg, trust_region",
                        "`curvature=B`: a curvature operator v -> B v (e.g. a GGN on a "
                        "subsample, stochastic.training.ggn_operator) when no member publishes one"),
    "model_only": _extra("newton_krylov (chain passes it)",
                         "`model_only=True`: a later chain member solves the model itself "
                         "(`Transform.solves_model`, trust_region's Steihaug): publish the "
                         "curvature and skip the direction's own solve"),
    "continues": _extra("levenberg, levenberg_marquardt (the dense Jacobian cache)",
                        "`continues=True`: params and the state are those the previous update "
                        "published, with the same functions (the sync-free driver from its "
                        "second step): a cache kept there is reused without a check"),
    "overlap_value_fn": _extra("multi_batch_lbfgs",
                               "`overlap_value_fn=fn`: the loss on the overlap of two batches"),
}  # fmt: skip


def _declared_keys() -> dict[str, Declared]:
    hints = get_type_hints(Publication, include_extras=True)
    out = {name: hint.__metadata__[0] for name, hint in hints.items()}
    overlap = out.keys() & DIAGNOSTICS.keys()
    if overlap:  # pragma: no cover - a declaration error, caught at import
        raise RuntimeError(f"keys declared twice: {sorted(overlap)}")
    return {**out, **DIAGNOSTICS}


#: Every declared key and its declaration.
DECLARED: dict[str, Declared] = _declared_keys()


def forwarded(published: Mapping[str, Any]) -> dict[str, Any]:
    """The entries that later chain members receive as extras: model and objective keys,
    and undeclared (user) keys."""
    return {
        key: val
        for key, val in published.items()
        if key not in DECLARED or DECLARED[key].role in FORWARDED_ROLES
    }


def recorded(published: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The 0-d tensors the driver records in its history: diagnostics, flags such as
    ``search_failed`` and undeclared keys; not the values it reports itself."""
    return {
        key: val
        for key, val in published.items()
        if (key not in DECLARED or DECLARED[key].recorded)
        and isinstance(val, torch.Tensor)
        and val.dim() == 0
    }


def markdown_table() -> str:
    """The declaration as the markdown tables of ``docs/design.md``: the publications, then
    the extras a caller passes."""
    rows = ["| key | role | published by | read by | meaning |", "| --- | --- | --- | --- | --- |"]
    for name, decl in DECLARED.items():
        rows.append(
            f"| `{name}` | {decl.role.value} | {decl.publishers} | {decl.readers} | "
            f"{decl.meaning} |"
        )
    rows += ["", "| extra passed to `update` | read by | meaning |", "| --- | --- | --- |"]
    rows += [f"| `{name}` | {decl.readers} | {decl.meaning} |" for name, decl in EXTRAS.items()]
    return "\n".join(rows)
