"""Shared checks for the test suite."""

from __future__ import annotations

from typing import Any

import optree
import torch

import soo_func as sf


def versions(*trees: Any) -> list[int]:
    """The version counters of every tensor leaf in ``trees`` (in-place ops bump them)."""
    return [
        leaf._version
        for t in trees
        for leaf in optree.tree_leaves(t)
        if isinstance(leaf, torch.Tensor)
    ]


def clones(tree: Any) -> Any:
    return optree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, tree)


def assert_trees_equal(a: Any, b: Any) -> None:
    sf.tree.check_same_structure(a, b)
    for x, y in zip(optree.tree_leaves(a), optree.tree_leaves(b), strict=True):
        if isinstance(x, torch.Tensor):
            same = x.shape == y.shape and x.dtype == y.dtype
            assert same and torch.allclose(x, y, rtol=0, atol=0, equal_nan=True), (x, y)
        else:
            assert x == y


def assert_update_is_pure(
    transform: sf.Transform, params: Any, gradient: Any, steps: int = 3, **extra: Any
):
    """Run ``steps`` updates and check that no input is mutated and that repeating a call
    with the same inputs gives the same outputs. Returns the last (updates, state).

    ``gradient`` is fed as the updates; ``extra`` may hold ``grad=`` too (it then follows
    the new point like ``value``)."""
    grad = gradient
    state = transform.init(params)
    for _ in range(steps):
        inputs = (grad, state, params, extra)
        before_versions = versions(grad, state, params, *extra.values())
        before_values = clones((grad, state, params))
        updates, new_state = transform.update(grad, state, params, **extra)
        assert versions(grad, state, params, *extra.values()) == before_versions, (
            "update mutated an input"
        )
        assert_trees_equal(before_values, (grad, state, params))
        again_updates, again_state = transform.update(*inputs[:3], **extra)
        assert_trees_equal(updates, again_updates)
        assert_trees_equal(new_state, again_state)
        state = new_state
        params = sf.apply_updates(params, updates)
        if extra.get("value_fn") is not None:
            value, grad = sf.value_and_grad(extra["value_fn"])(params)
            extra = dict(extra, value=value)
            if "grad" in extra:
                extra["grad"] = grad
    return updates, state


# --- ridge regression: the closed-form reference of the adjoint tests ----------------------


def ridge_problem(seed: int = 0, m: int = 12, n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """A random ``m x n`` design ``a`` and targets ``b`` (float64)."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(m, n, generator=gen, dtype=torch.float64)
    b = torch.randn(m, generator=gen, dtype=torch.float64)
    return a, b


def ridge_value(x, a, b, lam):
    """``0.5 |a x - b|^2 + 0.5 lam |x|^2``."""
    return 0.5 * ((a @ x - b) ** 2).sum() + 0.5 * lam * (x**2).sum()


def ridge_closed_form(a, b, lam):
    """The ridge minimizer ``(a^T a + lam I)^{-1} a^T b``."""
    eye = torch.eye(a.shape[1], dtype=torch.float64)
    return torch.linalg.solve(a.T @ a + lam * eye, a.T @ b)


def assert_ridge_gradients_match_the_closed_form(result, inputs: list) -> None:
    """Gradients of ``result.params @ probe + result.value`` with respect to ``inputs``
    ``(a, b, lam)`` (a differentiable ridge solve) equal those of the closed form."""
    probe = torch.arange(1.0, inputs[0].shape[1] + 1, dtype=torch.float64)
    grads = torch.autograd.grad(result.params @ probe + result.value, inputs)
    ref_inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    x_ref = ridge_closed_form(*ref_inputs)
    ref = x_ref @ probe + ridge_value(x_ref, *ref_inputs)
    for got, want in zip(grads, torch.autograd.grad(ref, ref_inputs), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)
