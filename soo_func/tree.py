"""Pytree arithmetic on ``optree``.

Every function here takes parameter pytrees (dicts, lists, tuples, NamedTuples of
tensors) and returns new ones; nothing is mutated. Reductions (:func:`vdot`,
:func:`norm`, :func:`sum_of_squares`) return 0-d tensors on the leaves' device, so
no host synchronisation happens in a hot path.

The dense methods use :func:`ravel` / :func:`unravel` to move between a pytree and
one flat vector.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import optree
import torch

PyTree = Any

__all__ = [
    "FlatStep",
    "PyTree",
    "Raveled",
    "add",
    "all_finite",
    "axpy",
    "check_same_structure",
    "check_tensor_leaves",
    "host_reads_allowed",
    "in_functorch_transform",
    "in_vmap",
    "leaves",
    "map_leaves",
    "neg",
    "no_host_reads",
    "norm",
    "ones_like",
    "overflow_safe_norm",
    "ravel",
    "same_leaves",
    "scale",
    "scaled_norm",
    "structure",
    "sub",
    "sum_of_squares",
    "unravel",
    "vdot",
    "where",
    "zeros_like",
]

_NONE_IS_LEAF = False


def structure(tree: PyTree) -> optree.PyTreeSpec:
    """The tree structure (``optree.PyTreeSpec``) of ``tree``."""
    return optree.tree_structure(tree, none_is_leaf=_NONE_IS_LEAF)


def leaves(tree: PyTree) -> list[Any]:
    """The leaves of ``tree`` in optree's canonical order."""
    return optree.tree_leaves(tree, none_is_leaf=_NONE_IS_LEAF)


def check_tensor_leaves(tree: PyTree, what: str = "params") -> None:
    """Raise ``TypeError`` naming the first leaf of ``tree`` that is not a tensor."""
    paths, values, _ = optree.tree_flatten_with_path(tree, none_is_leaf=_NONE_IS_LEAF)
    for path, leaf in zip(paths, values, strict=True):
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(
                f"{what} must be a pytree whose leaves are torch.Tensor, but the leaf at "
                f"{_path_str(path)} is {type(leaf).__name__}: {leaf!r:.80}. Convert it with "
                "torch.as_tensor(...) or move it out of the pytree (close over it in value_fn)."
            )


def check_same_structure(*trees: PyTree, names: tuple[str, ...] | None = None) -> None:
    """Raise ``ValueError`` showing both structures when ``trees`` differ in structure."""
    first = structure(trees[0])
    for i, other in enumerate(trees[1:], start=1):
        spec = structure(other)
        if spec != first:
            a = names[0] if names else "tree 0"
            b = names[i] if names else f"tree {i}"
            raise ValueError(
                f"pytree structures differ:\n  {a}: {first}\n  {b}: {spec}\n"
                "Both must have the same containers and keys (as the params pytree does)."
            )


def _path_str(path: tuple) -> str:
    return "root" if not path else "".join(f"[{k!r}]" for k in path)


def map_leaves(fn: Callable[..., Any], tree: PyTree, *rest: PyTree) -> PyTree:
    """``optree.tree_map`` with a structure check that shows both trees on mismatch."""
    if rest:
        check_same_structure(tree, *rest)
    return optree.tree_map(fn, tree, *rest, none_is_leaf=_NONE_IS_LEAF)


def _flatten_alike(*trees: PyTree) -> tuple[list[list[Any]], optree.PyTreeSpec]:
    """The leaves of each of ``trees`` (one flatten each) and their common structure.

    Raises like :func:`check_same_structure` when the structures differ."""
    flat = [optree.tree_flatten(t, none_is_leaf=_NONE_IS_LEAF) for t in trees]
    spec = flat[0][1]
    if any(other != spec for _, other in flat[1:]):
        check_same_structure(*trees)
    return [leaves for leaves, _ in flat], spec


_NO_HOST_READS: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "soo_func_no_host_reads", default=False
)


@contextlib.contextmanager
def no_host_reads() -> Iterator[None]:
    """Within this context :func:`host_reads_allowed` is false: the sync-free driver's
    loop (:mod:`soo_func.drivers.sync_free`) runs its transforms' mask-and-freeze paths
    in eager mode too, so that no step waits on the device."""
    token = _NO_HOST_READS.set(True)
    try:
        yield
    finally:
        _NO_HOST_READS.reset(token)


def in_functorch_transform() -> bool:
    """Whether this code runs inside a ``torch.func`` transform (``vmap``, ``grad``, ``jvp``,
    ``vjp``): its tensors may be wrapped, and the eager autograd paths do not apply."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def host_reads_allowed() -> bool:
    """Whether code may read a tensor on the host (``bool``, ``float``, ``.item()``) here.

    False while ``torch.compile`` traces (a read would break the graph), inside
    ``torch.func.vmap`` (a batched tensor has no single value) and within
    :func:`no_host_reads` (the sync-free driver). Code that takes an early
    exit on a host read (a Krylov loop's convergence test, a cache hit) takes the
    mask-and-freeze path instead: the same arithmetic, with the remaining iterations
    frozen.
    """
    if torch.compiler.is_compiling():
        return False
    if _NO_HOST_READS.get():
        return False
    return not in_vmap()


def in_vmap() -> bool:
    """Whether this code runs inside ``torch.func.vmap`` (at any level): a batched tensor
    has no single value to read on the host."""
    stack = torch._C._functorch.get_interpreter_stack() or ()
    vmap = torch._C._functorch.TransformType.Vmap
    return any(level.key() == vmap for level in stack)


def _all_tensors(leaves: list[Any]) -> bool:
    """Whether the multi-tensor ``torch._foreach_*`` kernels apply to ``leaves``: all are
    tensors and no ``torch.func`` transform is active (``vmap`` has no batching rule for
    them; the per-leaf ops it falls back to give the same values)."""
    if torch._C._are_functorch_transforms_active():
        return False
    return all(isinstance(leaf, torch.Tensor) for leaf in leaves)


def _foreach_binary(foreach: Callable, single: Callable, x: PyTree, y: PyTree, **kw) -> PyTree:
    """Apply a ``torch._foreach_*`` op to the leaves of two alike pytrees (one kernel launch
    per group of tensors instead of one Python call per leaf); ``single`` when a leaf is
    not a tensor."""
    (xs, ys), spec = _flatten_alike(x, y)
    if _all_tensors(xs) and _all_tensors(ys):
        return optree.tree_unflatten(spec, foreach(xs, ys, **kw))
    return optree.tree_unflatten(spec, [single(a, b, **kw) for a, b in zip(xs, ys, strict=True)])


def add(x: PyTree, y: PyTree) -> PyTree:
    """``x + y`` leafwise."""
    return _foreach_binary(torch._foreach_add, torch.add, x, y)


def sub(x: PyTree, y: PyTree) -> PyTree:
    """``x - y`` leafwise."""
    return _foreach_binary(torch._foreach_sub, torch.sub, x, y)


def neg(x: PyTree) -> PyTree:
    """``-x`` leafwise."""
    return map_leaves(torch.neg, x)


def scale(alpha: float | torch.Tensor, x: PyTree) -> PyTree:
    """``alpha * x`` leafwise; ``alpha`` may be a Python number or a 0-d tensor."""
    flat, spec = optree.tree_flatten(x, none_is_leaf=_NONE_IS_LEAF)
    if _all_tensors(flat) and not isinstance(alpha, torch.Tensor):
        return optree.tree_unflatten(spec, torch._foreach_mul(flat, alpha))
    return optree.tree_unflatten(spec, [leaf * alpha for leaf in flat])


def axpy(alpha: float | torch.Tensor, x: PyTree, y: PyTree) -> PyTree:
    """``alpha * x + y`` leafwise (BLAS ``axpy``)."""
    if isinstance(alpha, torch.Tensor):
        return map_leaves(lambda a, b: torch.addcmul(b, a, alpha.to(a.dtype)), x, y)
    return _foreach_binary(
        lambda xs, ys: torch._foreach_add(ys, xs, alpha=alpha),
        lambda a, b: torch.add(b, a, alpha=alpha),
        x,
        y,
    )


def _sum_scalars(parts: list[torch.Tensor]) -> torch.Tensor:
    if not parts:
        raise ValueError("cannot reduce an empty pytree: params must hold at least one tensor")
    if len(parts) == 1:
        return parts[0]
    return torch.stack(parts).sum()


def vdot(x: PyTree, y: PyTree) -> torch.Tensor:
    """Inner product ``<x, y>`` over all leaves, as a 0-d tensor (real leaves)."""
    (xs, ys), _ = _flatten_alike(x, y)
    parts = [torch.dot(a.reshape(-1), b.reshape(-1)) for a, b in zip(xs, ys, strict=True)]
    return _sum_scalars(parts)


def sum_of_squares(x: PyTree) -> torch.Tensor:
    """``<x, x>`` as a 0-d tensor."""
    parts = [torch.dot(a.reshape(-1), a.reshape(-1)) for a in leaves(x)]
    return _sum_scalars(parts)


def norm(x: PyTree, ord: float | str = 2) -> torch.Tensor:
    """The 2-norm (default) or infinity-norm (``ord=inf``) of all leaves together, 0-d."""
    if ord == 2:
        parts = leaves(x)
        if len(parts) > 1 and _all_tensors(parts) and not any(a.is_complex() for a in parts):
            # One multi-tensor kernel for the per-leaf norms (half the cost of per-leaf dots
            # with many small leaves), then the norm of the norms (no squares to overflow).
            return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(parts)))
        return torch.sqrt(sum_of_squares(x))
    if ord in (float("inf"), "inf"):
        # max(max x, -min x): two reads of each leaf (the second from cache), no |x| temporary.
        # Zero-size leaves have no maximum and contribute nothing.
        parts = leaves(x)
        if not parts:
            raise ValueError("cannot reduce an empty pytree: params must hold at least one tensor")
        filled = [a for a in parts if a.numel() > 0]
        if not filled:
            return torch.zeros((), dtype=parts[0].real.dtype, device=parts[0].device)
        if any(a.is_complex() for a in filled):
            return torch.stack([a.abs().amax() for a in filled]).amax()
        highs = torch.stack([a.amax() for a in filled]).amax()
        lows = torch.stack([a.amin() for a in filled]).amin()
        return torch.maximum(highs, -lows)
    raise ValueError(f"norm supports ord=2 and ord=inf, got {ord!r}")


def scaled_norm(x: PyTree) -> torch.Tensor:
    """The 2-norm of all leaves without overflow: ``m * ||x / m||`` with ``m = ||x||_inf``
    (LAPACK's ``dnrm2`` idea: the squares of ``x / m`` are at most 1), 0 when ``x`` is 0.

    Two passes over the leaves instead of one: :func:`norm` is the hot-path norm; this
    one is for values read once (a driver's stopping numbers when :func:`norm`
    overflowed, float32 gradients above ~1e19)."""
    big = norm(x, math.inf)
    safe = torch.where(big > 0, big, torch.ones_like(big))
    return big * norm(scale(1 / safe, x))


def overflow_safe_norm(x: PyTree) -> torch.Tensor:
    """The 2-norm of all leaves as reported to a user: :func:`norm`, or :func:`scaled_norm`
    where that overflowed while every entry is finite (no host read)."""
    fast = norm(x)
    overflowed = ~torch.isfinite(fast) & all_finite(x).to(fast.device)
    return torch.where(overflowed, scaled_norm(x), fast)


def all_finite(x: PyTree) -> torch.Tensor:
    """0-d bool: every entry of every leaf is finite (no squares, so no overflow)."""
    parts = leaves(x)
    flags = [torch.isfinite(a).all() for a in parts]
    if not flags:
        return torch.ones((), dtype=torch.bool)
    return torch.stack(flags).all() if len(flags) > 1 else flags[0]


def zeros_like(x: PyTree) -> PyTree:
    """A pytree of zeros shaped, typed and placed like ``x``."""
    return map_leaves(torch.zeros_like, x)


def ones_like(x: PyTree) -> PyTree:
    """A pytree of ones shaped, typed and placed like ``x``."""
    return map_leaves(torch.ones_like, x)


def where(condition: torch.Tensor, x: PyTree, y: PyTree) -> PyTree:
    """Select ``x`` where the 0-d boolean ``condition`` holds, else ``y``, without a host sync."""
    return map_leaves(lambda a, b: torch.where(condition, a, b), x, y)


class Raveled(NamedTuple):
    """A flat vector and what :func:`unravel` needs to rebuild the pytree."""

    flat: torch.Tensor
    treespec: optree.PyTreeSpec
    shapes: tuple[torch.Size, ...]


def ravel(x: PyTree) -> Raveled:
    """Concatenate the leaves of ``x`` into one 1-D tensor.

    All leaves must share one dtype and device (as the dense methods require).
    """
    flat_leaves, treespec = optree.tree_flatten(x, none_is_leaf=_NONE_IS_LEAF)
    dtypes = {leaf.dtype for leaf in flat_leaves}
    if len(dtypes) > 1:
        raise TypeError(
            f"ravel needs one dtype across leaves, got {sorted(str(d) for d in dtypes)}; cast the "
            "params to a common dtype first"
        )
    shapes = tuple(leaf.shape for leaf in flat_leaves)
    flat = torch.cat([leaf.reshape(-1) for leaf in flat_leaves])
    return Raveled(flat, treespec, shapes)


def unravel(flat: torch.Tensor, like: Raveled | PyTree) -> PyTree:
    """Split the 1-D ``flat`` back into the pytree described by ``like``.

    ``like`` is a :class:`Raveled` (from :func:`ravel`) or an example pytree.
    """
    if not isinstance(like, Raveled):
        flat_leaves, treespec = optree.tree_flatten(like, none_is_leaf=_NONE_IS_LEAF)
        shapes = tuple(leaf.shape for leaf in flat_leaves)
    else:
        treespec, shapes = like.treespec, like.shapes
    sizes = [s.numel() for s in shapes]
    if flat.numel() != sum(sizes):
        raise ValueError(f"flat vector has {flat.numel()} entries, the pytree needs {sum(sizes)}")
    parts = torch.split(flat, sizes)
    return optree.tree_unflatten(
        treespec, [p.reshape(s) for p, s in zip(parts, shapes, strict=True)]
    )


def same_leaves(x: PyTree, y: PyTree) -> bool:
    """Whether ``x`` and ``y`` are made of the very same leaf objects, in the same order (an
    identity test on the Python objects: no tensor is read, ``torch.compile`` traces it)."""
    x_leaves, y_leaves = leaves(x), leaves(y)
    return len(x_leaves) == len(y_leaves) and all(
        a is b for a, b in zip(x_leaves, y_leaves, strict=True)
    )


class FlatStep(NamedTuple):
    """A direction's point, gradient and updates, with the flat vectors ``x, g, d`` that
    :func:`ravel` would make of them (``updates`` are views of ``d``).

    A direction that works on flat vectors publishes it (key ``flat_step``) so that a search
    working on flat vectors reuses ``x, g, d`` instead of copying every leaf again; the
    search checks with :meth:`describes` that its own trees are these (a member between
    them that changed the updates makes new leaves, and the search then ravels its own)."""

    params: PyTree
    grad: PyTree
    updates: PyTree
    x: torch.Tensor
    g: torch.Tensor
    d: torch.Tensor

    def describes(self, params: PyTree, grad: PyTree, updates: PyTree) -> bool:
        """Whether ``params``, ``grad`` and ``updates`` are this step's trees (by identity)."""
        return (
            same_leaves(params, self.params)
            and same_leaves(grad, self.grad)
            and same_leaves(updates, self.updates)
        )
