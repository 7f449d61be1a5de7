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
