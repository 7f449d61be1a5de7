"""The drivers' evaluation counts against an independent hand count, for every family.

The rule (``soo_func.oracles.CountedObjective``): a value (a call of ``value_fn``, or a
``value_and_grad``) is 1 in ``num_value_evals``; a gradient 1 in ``num_grad_evals``; a
curvature product ``H v`` or ``J^T H_L J v`` 1 in ``num_hvp_evals``, plus 1 for the shared
gradient pass of ``hvp_operator(mode="linearize")``, plus ``n`` for a dense Jacobian (one
per column); in ``least_squares`` a residual vector that the optimizer evaluates through
``residual_fn`` (a call, a Gauss-Newton operator's linearization, the residuals a dense
Jacobian returns) is 1 in ``num_residual_evals``.

The hand count never looks at those counters: :class:`Probe` wraps the user's function
and classifies each call by how it was made -- a plain call (a value), an eager call on
leaves that require grad (a gradient; when its backward runs with ``create_graph`` it is
a Hessian linearization instead, and every later backward through that graph is one
product), a call inside ``torch.func`` (``grad`` over ``jvp``/``vjp``: one Hessian
product; for a residual function ``vjp``: a linearization, each reverse pass through it
after the first (which builds the transposed graph that answers ``J v``) one Gauss-Newton
product, ``jvp``: one Gauss-Newton product, ``vmap`` of ``jvp``: a dense Jacobian).
"""

from __future__ import annotations

import sys

import pytest
import torch

import soo_func as sf
from soo_func import tree
from soo_func.directions.gauss_newton import gauss_newton
from soo_func.directions.newton import newton_krylov

Jvp = torch._C._functorch.TransformType.Jvp
Grad = torch._C._functorch.TransformType.Grad


class Probe:
    """``fn`` with a hand count of the oracle calls made on it (see the module docstring)."""

    def __init__(self, fn, *, residual: bool = False):
        self.fn = fn
        self.residual = residual
        self.values = self.grads = self.products = self.residuals = 0
        self.linearizations = self.reverse_passes = 0
        self._eager: list[list[bool]] = []  # per eager call: grad mode at each backward

    def __call__(self, params):
        layer = torch._C._functorch.peek_interpreter_stack()
        if layer is not None:
            linearized = self._functorch_call(layer, params)
            out = self.fn(params)
            if linearized:
                out.register_hook(self._reverse_pass)
            return out
        from_objective = sys._getframe(1).f_globals["__name__"] == "soo_func.drivers.least_squares"
        if not self.residual or from_objective:
            return self._eager_call(params)
        self.residuals += 1  # a residual vector the optimizer asked for
        return self.fn(params)

    def _reverse_pass(self, grad):
        self.reverse_passes += 1

    def _functorch_call(self, layer, params) -> bool:
        """Classify a call inside ``torch.func``; true for a residual linearization."""
        kind, level = layer.key(), layer.level()
        if not self.residual and kind == Grad and level == 2:
            self.products += 1  # hvp: jvp or vjp of grad
        elif self.residual and kind == Grad and level == 1:
            self.residuals += 1  # a Gauss-Newton operator's linearization (vjp)
            self.linearizations += 1
            return True
        elif self.residual and kind == Jvp and level == 1:
            self.products += 1  # J v of one Gauss-Newton product
        elif self.residual and kind == Jvp and level == 2:
            self.residuals += 1  # jacfwd: the residuals and n columns
            self.products += sum(leaf.numel() for leaf in tree.leaves(params))
        else:
            raise AssertionError(f"unexpected call inside torch.func: {kind} at level {level}")
        return False

    def _eager_call(self, params):
        if not any(leaf.requires_grad for leaf in tree.leaves(params)):
            self.values += 1
            return self.fn(params)
        modes: list[bool] = []
        self._eager.append(modes)
        aliases = tree.map_leaves(lambda t: t * 1.0, params)  # a node that every backward crosses
        tree.leaves(aliases)[0].register_hook(lambda g: modes.append(torch.is_grad_enabled()))
        return self.fn(aliases)

    def totals(self) -> dict[str, int]:
        """The hand count: values, gradients, products, residual evaluations."""
        values, grads, products = self.values, self.grads, self.products
        products += self.reverse_passes - self.linearizations
        for modes in self._eager:
            if modes and modes[0]:  # create_graph: a Hessian linearization, then products
                products += len(modes)
            else:
                values, grads = values + 1, grads + 1
        return {"value": values, "grad": grads, "hvp": products, "residual": self.residuals}


def driver_counts(result) -> dict[str, int]:
    return {
        "value": result.num_value_evals,
        "grad": result.num_grad_evals,
        "hvp": result.num_hvp_evals,
        "residual": result.num_residual_evals,
    }


def smooth_problem():
    """A smooth strictly convex, non-quadratic function of a two-leaf pytree."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(7, 5, generator=g, dtype=torch.float64)
    c = torch.randn(5, generator=g, dtype=torch.float64)

    def value_fn(p):
        x = torch.cat([p["w"].reshape(-1), p["b"]])
        return torch.logsumexp(a @ x, 0) + 0.5 * (x * x).sum() + (c * x).sum() + (x**4).sum() / 4

    params = {
        "w": torch.full((2, 2), 0.3, dtype=torch.float64),
        "b": torch.tensor([-0.5], dtype=torch.float64),
    }
    return value_fn, params


def residual_problem():
    """An exponential fit: 9 residuals, 3 parameters."""
    g = torch.Generator().manual_seed(1)
    t = torch.linspace(0, 1, 9, dtype=torch.float64)
    y = torch.randn(9, generator=g, dtype=torch.float64)

    def residual_fn(p):
        return p["a"] * torch.exp(-p["k"] * t) + p["c"][0] * t - y

    params = {
        "a": torch.tensor(1.5, dtype=torch.float64),
        "k": torch.tensor(0.7, dtype=torch.float64),
        "c": torch.tensor([0.2], dtype=torch.float64),
    }
    return residual_fn, params


MINIMIZE_FAMILIES = {
    "lbfgs+wolfe": lambda: sf.chain(sf.lbfgs(), sf.wolfe()),
    "bfgs+armijo": lambda: sf.chain(sf.bfgs(), sf.armijo()),
    "nonlinear_cg+wolfe": lambda: sf.chain(sf.nonlinear_cg(), sf.wolfe()),
    "newton_krylov+armijo": lambda: sf.chain(newton_krylov("cg", max_iters=4), sf.armijo()),
    "newton_krylov+trust_region": lambda: sf.chain(
        newton_krylov("cr", max_iters=4), sf.trust_region()
    ),
    "newton_krylov(forward-over-reverse)+armijo": lambda: sf.chain(
        newton_krylov("cg", max_iters=3, hvp_mode="forward-over-reverse"), sf.armijo()
    ),
    "sr1(memory_size=5)+trust_region": lambda: sf.chain(sf.sr1(memory_size=5), sf.trust_region()),
    "dfp+wolfe": lambda: sf.chain(sf.dfp(), sf.wolfe()),
    "ssbfgs+wolfe": lambda: sf.chain(sf.ssbfgs(), sf.wolfe()),
    "ssbfgs(memory_size=5)+wolfe": lambda: sf.chain(sf.ssbfgs(memory_size=5), sf.wolfe()),
    "broyden(memory_size=5)+armijo_sync_free": lambda: sf.chain(
        sf.broyden(memory_size=5), sf.armijo_sync_free()
    ),
    "newton_krylov+levenberg": lambda: sf.chain(newton_krylov("cr", max_iters=4), sf.levenberg()),
    "homotopy+newton_krylov+armijo": lambda: sf.chain(
        sf.homotopy(), newton_krylov("cg", max_iters=4), sf.armijo()
    ),
}


@pytest.mark.parametrize("family", sorted(MINIMIZE_FAMILIES))
def test_minimize_counts_equal_the_hand_count(family):
    value_fn, params = smooth_problem()
    probe = Probe(value_fn)
    result = sf.minimize(probe, params, MINIMIZE_FAMILIES[family](), max_steps=30, gtol=1e-9)
    assert result.num_steps >= 2, result.reason
    hand = probe.totals()
    assert hand["value"] > 0 and hand["grad"] > 0
    assert driver_counts(result) == hand
    if family.startswith("newton"):
        assert hand["hvp"] > 0
    assert result.history[-1]["num_hvp_evals"] == result.num_hvp_evals


LEAST_SQUARES_FAMILIES = {
    "gauss_newton+armijo": lambda: sf.chain(gauss_newton(max_iters=3), sf.armijo()),
    "levenberg_marquardt(dense)": lambda: sf.levenberg_marquardt(solver="dense"),
    "levenberg_marquardt(cg)": lambda: sf.levenberg_marquardt(solver="cg"),
}


@pytest.mark.parametrize(
    "family",
    [
        "gauss_newton+armijo",
        "levenberg_marquardt(dense)",
        "levenberg_marquardt(cg)",
    ],
)
def test_least_squares_counts_equal_the_hand_count(family):
    residual_fn, params = residual_problem()
    probe = Probe(residual_fn, residual=True)
    result = sf.least_squares(
        probe, params, LEAST_SQUARES_FAMILIES[family](), max_steps=30, gtol=1e-9
    )
    assert result.num_steps >= 2, result.reason
    hand = probe.totals()
    assert hand["residual"] > 0 and hand["hvp"] > 0
    assert driver_counts(result) == hand


def test_probe_classifies_each_oracle():
    """The hand count itself, on one call of each oracle."""
    value_fn, params = smooth_problem()
    probe = Probe(value_fn)
    sf.value_and_grad(probe)(params)
    probe(params)
    sf.hvp(probe, params, params)
    op = sf.oracles.hvp_operator(probe, params)
    op(params)
    op(params)
    assert probe.totals() == {"value": 2, "grad": 1, "hvp": 1 + 3, "residual": 0}
    residual_fn, params = residual_problem()
    probe = Probe(residual_fn, residual=True)
    _, matvec = sf.oracles.ggn_operator(probe, params)
    matvec(params)
    matvec(params)
    sf.ggn_vp(probe, params, params)
    probe(params)
    # Two linearizations (ggn_operator, ggn_vp) and one call: 3 residual vectors.
    assert probe.totals() == {"value": 0, "grad": 0, "hvp": 3, "residual": 3}
