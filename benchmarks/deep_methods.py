"""The methods of the deep-learning experiment: baselines and soo_func configurations.

Each :class:`Method` names a torch.optim baseline or a soo_func transform, the knob its
tuning grid varies (3 values each: the same budget for every method), its batch size
and what the training step must pass as extras (a GGN ``curvature`` operator on a
subsample, a ``residual_fn`` factor of the cross-entropy GGN, or the overlap loss of
multi-batch L-BFGS). Families that another part of soo_func has not shipped yet are
left out (:func:`available_methods` looks them up by name).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

import soo_func as sf
from soo_func.stochastic import hessian_free, multi_batch_lbfgs

__all__ = ["Method", "available_methods"]


@dataclass
class Method:
    """A training method: ``build(knob)`` makes a torch.optim factory or a soo_func Transform.

    ``knob`` is the tuned value (``grid``); ``batch_size`` may depend on it via
    ``batch_size_of``. ``curvature_size``: examples of the gradient batch used for GGN
    products (the ``curvature`` extra); ``overlap``: multi-batch overlap size.
    ``cosine_decay``: the step decays to 0 over the run's updates along a cosine
    (:func:`soo_func.cosine_decay_schedule`): a torch.optim method's learning rate through
    ``LambdaLR``; a soo_func method is then built as ``build(knob, step_scale)`` with
    ``step_scale = sf.scale_by_schedule(...)`` to place in its chain (before a search).
    """

    name: str
    kind: str  # "torch" or "soo"
    knob: str
    grid: tuple[float, ...]
    build: Callable[[float], Any]
    batch_size: int = 128
    batch_size_of: Callable[[float], int] | None = None
    curvature_size: int | None = None
    overlap: int | None = None
    ggn_residual: bool = False  # pass residual_fn = cross_entropy_ggn_residual on the subsample
    cosine_decay: bool = False
    notes: str = ""

    def batch(self, knob: float) -> int:
        return self.batch_size_of(knob) if self.batch_size_of else self.batch_size


def _family(name: str) -> Callable | None:
    """``sf.<name>``, or the same name in ``soo_func.directions`` / ``soo_func.searches``."""
    import soo_func.directions as directions
    import soo_func.searches as searches

    for where in (sf, directions, searches):
        if hasattr(where, name):
            return getattr(where, name)
    return None


def available_methods() -> dict[str, Method]:
    """Every method that the installed soo_func provides (families land independently)."""
    methods = {
        "sgd": Method(
            "sgd",
            "torch",
            "lr",
            (0.01, 0.03, 0.1),
            lambda lr: lambda ps: torch.optim.SGD(ps, lr=lr, momentum=0.9),
            notes="torch.optim.SGD momentum 0.9, batch 128",
        ),
        "adam": Method(
            "adam",
            "torch",
            "lr",
            (3e-4, 1e-3, 3e-3),
            lambda lr: lambda ps: torch.optim.Adam(ps, lr=lr),
            notes="torch.optim.Adam, batch 128",
        ),
        "hessian_free": Method(
            "hessian_free",
            "soo",
            "damping",
            (0.03, 0.3, 3.0),
            lambda lam: hessian_free(damping=lam, max_cg_iters=10),
            batch_size=1000,
            curvature_size=250,
            notes="Martens 2010, GGN on 1/4 of a 1000 batch, 10 CG iterations",
        ),
        "hessian_free_b250": Method(
            "hessian_free_b250",
            "soo",
            "damping",
            (0.03, 0.3, 3.0),
            lambda lam: hessian_free(damping=lam, max_cg_iters=10),
            batch_size=250,
            curvature_size=64,
            notes="as hessian_free with batch 250 and GGN on 64 (more steps per epoch)",
        ),
        "multi_batch_lbfgs": Method(
            "multi_batch_lbfgs",
            "soo",
            "lr",
            (0.1, 0.3, 1.0),
            lambda lr: multi_batch_lbfgs(memory_size=10, learning_rate=lr),
            batch_size=512,
            overlap=128,
            notes="Berahas et al. 2016, batch 512, overlap 128, m=10",
        ),
    }
    # Hessian-free with its step scaled by a cosine decay after the CG/Levenberg-Marquardt
    # machinery (the damping still adapts to the unscaled proposal's reduction ratio).
    methods["hessian_free_b250_cosine"] = dataclasses.replace(
        methods["hessian_free_b250"], name="hessian_free_b250_cosine", cosine_decay=True,
        build=lambda lam, step_scale: sf.chain(hessian_free(damping=lam, max_cg_iters=10), step_scale),
        notes=methods["hessian_free_b250"].notes + ", step decayed to 0 along a cosine over the run",
    )  # fmt: skip
    for name in ("sgd", "adam"):  # the baselines with the learning rate decayed along a cosine
        methods[f"{name}_cosine"] = dataclasses.replace(
            methods[name], name=f"{name}_cosine", cosine_decay=True,
            notes=methods[name].notes + ", learning rate decayed to 0 along a cosine over the run",
        )  # fmt: skip
    lbfgs, armijo, wolfe = _family("lbfgs"), _family("armijo"), _family("wolfe")
    nonlinear_cg, levenberg = _family("nonlinear_cg"), _family("levenberg")
    gauss_newton = _family("gauss_newton")
    if lbfgs and armijo:
        methods["lbfgs_armijo"] = Method(
            "lbfgs_armijo",
            "soo",
            "batch",
            (1000, 2000, 4000),
            lambda b: sf.chain(lbfgs(memory_size=10), armijo()),
            batch_size_of=int,
            notes="lbfgs(10) + armijo on large batches (grid: batch size)",
        )
    if nonlinear_cg and wolfe:
        methods["nonlinear_cg_wolfe"] = Method(
            "nonlinear_cg_wolfe",
            "soo",
            "batch",
            (1000, 2000, 4000),
            lambda b: sf.chain(nonlinear_cg(), wolfe()),
            batch_size_of=int,
            notes="nonlinear_cg + wolfe on large batches (grid: batch size)",
        )
    if gauss_newton and armijo:
        # Batch 1000 is the original configuration; 500 and 250 give 2x and 4x the steps per
        # epoch, the GGN on about a quarter of the batch, 10 CG iterations.
        for suffix, batch, curvature in (("", 1000, 250), ("_b500", 500, 125), ("_b250", 250, 64)):
            methods[f"gauss_newton_armijo{suffix}"] = Method(
                f"gauss_newton_armijo{suffix}", "soo", "damping", (0.01, 0.1, 1.0),
                lambda lam: sf.chain(gauss_newton(damping=lam, max_iters=10), armijo()),
                batch_size=batch, curvature_size=curvature, ggn_residual=True,
                notes=f"gauss_newton (CE GGN via its residual factor on {curvature} of a batch of "
                f"{batch}, 10 CG) + armijo",
            )  # fmt: skip
        # The same with the step decayed to 0 along a cosine over the run (the schedule
        # scales the Gauss-Newton direction before the search tries its unit step). _c250: the
        # GGN on the whole batch of 250 (about 3x the seconds of GGN on 64).
        for suffix, batch, curvature in (
            ("_b500", 500, 125),
            ("_b250", 250, 64),
            ("_b250_c250", 250, 250),
        ):
            methods[f"gauss_newton_armijo{suffix}_cosine"] = Method(
                f"gauss_newton_armijo{suffix}_cosine", "soo", "damping", (0.01, 0.1, 1.0),
                lambda lam, step_scale: sf.chain(
                    gauss_newton(damping=lam, max_iters=10), step_scale, armijo()
                ),
                batch_size=batch, curvature_size=curvature, ggn_residual=True, cosine_decay=True,
                notes=f"gauss_newton (CE GGN on {curvature} of a batch of {batch}, 10 CG) + armijo, "
                "the direction scaled by a cosine decay to 0 over the run",
            )  # fmt: skip
    if levenberg:
        methods["levenberg_ggn"] = Method(
            "levenberg_ggn",
            "soo",
            "damping",
            (0.01, 0.1, 1.0),
            lambda lam: levenberg(initial_damping=lam, solver="cg"),
            batch_size=1000,
            curvature_size=250,
            notes="levenberg (D = I, CG solve) on the subsampled GGN",
        )
    return methods
