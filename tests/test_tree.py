"""Pytree arithmetic against flat torch results."""

from __future__ import annotations

import math
from typing import NamedTuple

import pytest
import torch

from soo_func import tree


class Pair(NamedTuple):
    weight: torch.Tensor
    bias: torch.Tensor


def make_tree(dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)

    return {"layer": Pair(r(3, 4), r(4)), "extra": [r(2), (r(1, 2, 2), r(()))]}


def flat(x):
    return torch.cat([leaf.reshape(-1) for leaf in tree.leaves(x)])


def test_ravel_unravel_round_trip(dtype, device):
    x = make_tree(dtype, device)
    raveled = tree.ravel(x)
    assert raveled.flat.shape == (12 + 4 + 2 + 4 + 1,)
    assert raveled.flat.dtype == dtype and raveled.flat.device.type == device.type
    back = tree.unravel(raveled.flat, raveled)
    assert tree.structure(back) == tree.structure(x)
    for a, b in zip(tree.leaves(back), tree.leaves(x), strict=True):
        assert a.shape == b.shape and torch.equal(a, b)
    # an example pytree works as the template too
    back2 = tree.unravel(raveled.flat * 2, x)
    assert torch.equal(flat(back2), 2 * flat(x))
    assert isinstance(back2["layer"], Pair)


def test_unravel_wrong_size_and_ravel_mixed_dtypes():
    x = make_tree()
    with pytest.raises(ValueError, match="entries"):
        tree.unravel(torch.zeros(5, dtype=torch.float64), x)
    with pytest.raises(TypeError, match="one dtype"):
        tree.ravel({"a": torch.zeros(2), "b": torch.zeros(2, dtype=torch.float64)})


def test_vdot_norm_sum_of_squares_match_flat(dtype):
    x, y = make_tree(dtype, seed=1), make_tree(dtype, seed=2)
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    expected = torch.dot(flat(x), flat(y))
    assert torch.allclose(tree.vdot(x, y), expected, rtol=rtol)
    assert tree.vdot(x, y).dim() == 0 and tree.vdot(x, y).dtype == dtype
    assert torch.allclose(tree.norm(x), torch.linalg.norm(flat(x)), rtol=rtol)
    assert torch.equal(tree.norm(x, math.inf), flat(x).abs().max())
    assert torch.equal(tree.norm(x, "inf"), flat(x).abs().max())
    assert torch.allclose(tree.sum_of_squares(x), (flat(x) ** 2).sum(), rtol=rtol)
    with pytest.raises(ValueError, match="ord"):
        tree.norm(x, 1)


def test_arithmetic_matches_flat():
    x, y = make_tree(seed=1), make_tree(seed=2)
    assert torch.equal(flat(tree.add(x, y)), flat(x) + flat(y))
    assert torch.equal(flat(tree.sub(x, y)), flat(x) - flat(y))
    assert torch.equal(flat(tree.neg(x)), -flat(x))
    assert torch.equal(flat(tree.scale(2.5, x)), 2.5 * flat(x))
    assert torch.equal(flat(tree.zeros_like(x)), torch.zeros_like(flat(x)))
    assert torch.equal(flat(tree.ones_like(x)), torch.ones_like(flat(x)))


def test_axpy_with_python_and_tensor_alpha(dtype):
    x, y = make_tree(dtype, seed=1), make_tree(dtype, seed=2)
    expected = -0.75 * flat(x) + flat(y)
    assert torch.allclose(flat(tree.axpy(-0.75, x, y)), expected)
    alpha = torch.tensor(-0.75, dtype=torch.float64)  # a 0-d tensor of another dtype
    out = tree.axpy(alpha, x, y)
    assert all(leaf.dtype == dtype for leaf in tree.leaves(out))
    assert torch.allclose(flat(out), expected)
    scaled = tree.scale(torch.tensor(3.0, dtype=dtype), x)
    assert torch.allclose(flat(scaled), 3 * flat(x))


def test_where_selects_without_sync():
    x, y = make_tree(seed=1), make_tree(seed=2)
    assert torch.equal(flat(tree.where(torch.tensor(True), x, y)), flat(x))
    assert torch.equal(flat(tree.where(torch.tensor(False), x, y)), flat(y))


def test_functions_do_not_mutate_inputs():
    x, y = make_tree(seed=1), make_tree(seed=2)
    before = [leaf.clone() for leaf in tree.leaves((x, y))]
    versions = [leaf._version for leaf in tree.leaves((x, y))]
    tree.add(x, y)
    tree.axpy(torch.tensor(2.0), x, y)
    tree.scale(3.0, x)
    tree.unravel(tree.ravel(x).flat, x)
    assert versions == [leaf._version for leaf in tree.leaves((x, y))]
    for a, b in zip(before, tree.leaves((x, y)), strict=True):
        assert torch.equal(a, b)


def test_mismatched_structures_show_both():
    x = {"a": torch.zeros(2), "b": torch.zeros(2)}
    y = {"a": torch.zeros(2), "c": torch.zeros(2)}
    with pytest.raises(ValueError) as err:
        tree.add(x, y)
    message = str(err.value)
    assert "'b'" in message and "'c'" in message
    with pytest.raises(ValueError, match="structures differ"):
        tree.vdot(x, [torch.zeros(2), torch.zeros(2)])


def test_non_tensor_leaf_is_named():
    with pytest.raises(TypeError, match=r"\['b'\].*float"):
        tree.check_tensor_leaves({"a": torch.zeros(1), "b": 1.5})


def test_empty_tree_reduction():
    with pytest.raises(ValueError, match="empty"):
        tree.vdot({}, {})


def test_norms_of_trees_with_zero_size_leaves():
    x = {
        "w": torch.tensor([1.0, -2.0], dtype=torch.float64),
        "e": torch.zeros(0, dtype=torch.float64),
    }
    assert float(tree.norm(x, math.inf)) == 2.0  # before: amax() on the empty leaf raised
    assert float(tree.norm(x)) == pytest.approx(math.sqrt(5.0), rel=1e-15)
    assert float(tree.sum_of_squares(x)) == 5.0 and float(tree.scaled_norm(x)) == pytest.approx(
        math.sqrt(5.0), rel=1e-15
    )
    empty = {"e": torch.zeros(0), "f": torch.zeros(0, 3)}
    assert float(tree.norm(empty, math.inf)) == 0.0 and float(tree.norm(empty)) == 0.0
    assert bool(tree.all_finite(empty))


def test_scaled_norm_does_not_overflow_and_all_finite_does_not_square():
    x = {"a": torch.tensor([3e25, -4e25]), "b": torch.tensor([0.0])}
    assert math.isinf(float(tree.norm(x)))  # the hot-path norm squares (float32 max ~3.4e38)
    assert float(tree.scaled_norm(x)) == pytest.approx(5e25, rel=1e-6)
    assert bool(tree.all_finite(x))
    assert not bool(tree.all_finite({"a": torch.tensor([1.0, math.nan]), "b": torch.ones(1)}))
    assert not bool(tree.all_finite(torch.tensor([math.inf])))
    zero = torch.zeros(3, dtype=torch.float64)
    assert float(tree.scaled_norm(zero)) == 0.0
