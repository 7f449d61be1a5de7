"""A limited memory of curvature pairs ``(s_i, y_i)`` on flat (raveled) parameters.

The one memory of the limited-memory methods: :func:`~soo_func.directions.lbfgs.lbfgs`
and ``bfgs``/``dfp``/``sr1``/``broyden(memory_size=m)``
(:mod:`soo_func.directions.limited_memory`, pairs from consecutive points, :func:`push`)
and :func:`~soo_func.stochastic.multi_batch_lbfgs.multi_batch_lbfgs` (pairs measured on a
batch overlap, :func:`push_pair`). The products with it (the two-loop recursion, the
compact representations) are in :mod:`soo_func.directions.compact`.

Layout and why
--------------
The pairs live in a tuple of ``memory_size`` slots, oldest first, each a :data:`Pair`
``(s_i, y_i)`` of two ``[n]`` tensors. A new pair is appended by rebuilding the *tuple*
(drop the oldest slot, append the new one): no tensor of the old memory is copied or
written, which keeps ``update`` pure without paying a copy of the whole memory at every
step. The two vectors of a pair (and of the point ``(x, g)`` it is formed from) are
separate tensors so that a step's fresh tensors stay under the size from which the C
allocator maps new pages for each allocation (32 MiB with glibc: a ``[2, n]`` float64 at
``n = 2^21``), pages that fault in on first write. Small memories are one ``[m, 2, n]``
tensor instead, rebuilt by one concatenation per step, so that each product with the
memory is one operation: those of at most ``STACK_ALWAYS_ELEMENTS`` numbers, and those of
at most ``STACK_MAX_ELEMENTS`` numbers whose vectors are short (``n <= STACK_MAX_SLOT``:
the per-slot operations of the tuple then cost more than the copy). Both choices are
measured in "Measured choices" in ``docs/design.md``; :func:`init_memory` makes them from
the sizes (never from tensor values). Every slot is always occupied; a slot whose pair
was rejected (bad curvature), not yet filled, or dropped by a reset holds ``valid =
False`` and contributes nothing (its coefficients are zero; its vectors are finite, but
not necessarily zero).

Alongside the vectors the memory keeps their Gram matrix ``G = [S Y]^T [S Y]``
(``2m x 2m``, columns ``s_0..s_{m-1}, y_0..y_{m-1}``), updated incrementally: each stored pair
is read against ``g`` (``S^T g``, ``Y^T g``) and, for the compact forms, against the new
``s``; the products with the new ``y = g - g_prev`` are differences of the products with
``g`` and with ``g_prev`` (kept from the previous update in a :class:`LastPoint`). Every method then works on
small ``m x m`` matrices and reads the stored pairs once more, for the final linear
combination ``c0 g + S c_s + Y c_y`` (:func:`combine`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import optree
import torch

from soo_func import tree

__all__ = [
    "AcceptRule",
    "LastPoint",
    "Pair",
    "PairMemory",
    "Pushed",
    "check_memory_size",
    "combine",
    "complete_gram",
    "compute_dtype",
    "flat_point",
    "init_for",
    "init_last_point",
    "init_memory",
    "project",
    "push",
    "push_pair",
    "stacked_pairs",
]

STACK_MAX_ELEMENTS = 1 << 20
"""No memory of more than this many numbers (``2 m n``) is stored as one stacked tensor."""

STACK_ALWAYS_ELEMENTS = 1 << 17
"""Memories of at most this many numbers are stacked whatever ``n``."""

STACK_MAX_SLOT = 2048
"""Larger memories (up to ``STACK_MAX_ELEMENTS``) are stacked when ``n`` is at most this."""


Pair = tuple[torch.Tensor, torch.Tensor]
"""Two flat ``[n]`` vectors: a curvature pair ``(s, y)``, or a point ``(x, g)``."""


class PairMemory(NamedTuple):
    """The pairs, their Gram matrix and which slots are valid.

    ``pairs``: ``m`` :data:`Pair` slots ``(s_i, y_i)``, oldest first, as a tuple or, for
    small memories, stacked into one ``[m, 2, n]`` tensor (``[i, 0] = s_i``, ``[i, 1] = y_i``).
    ``gram``: ``[2m, 2m]`` inner products of ``[s_0..s_{m-1}, y_0..y_{m-1}]``
    (zero rows and columns for invalid slots). ``valid``: ``[m]`` bool.
    """

    pairs: tuple[Pair, ...] | torch.Tensor
    gram: torch.Tensor
    valid: torch.Tensor


class LastPoint(NamedTuple):
    """What :func:`push` keeps to form the next pair from consecutive points.

    ``point``: the flat params and gradient ``(x, g)`` at the last update;
    ``products``: ``[m, 2]``, ``(s_i^T g, y_i^T g)`` for that gradient;
    ``has_prev``: 0-d bool, false before the first update.
    """

    point: Pair
    products: torch.Tensor
    has_prev: torch.Tensor


class Pushed(NamedTuple):
    """What :func:`push` returns: the new memory, the new last point and the products
    with the gradient."""

    memory: PairMemory
    last: LastPoint
    sg: torch.Tensor  # [m]: s_i^T g (zero for invalid slots)
    yg: torch.Tensor  # [m]: y_i^T g
    gg: torch.Tensor  # 0-d: g^T g


AcceptRule = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``(tentative gram, tentative valid) -> 0-d bool``: whether the new pair (last slot) is kept."""


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the small matrices: float32 for bfloat16/float16 params (whose rounding
    would swamp the inner products, and which torch's small solvers do not support)."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def _zero_pair(n: int, dtype: torch.dtype, device: torch.device) -> Pair:
    return torch.zeros(n, dtype=dtype, device=device), torch.zeros(n, dtype=dtype, device=device)


def init_memory(memory_size: int, n: int, dtype: torch.dtype, device: torch.device) -> PairMemory:
    """An empty memory for ``n`` flat parameters (all slots invalid).

    The pairs are stored in ``dtype``; the Gram matrix in :func:`compute_dtype`.
    """
    small = compute_dtype(dtype)
    size = 2 * memory_size * n
    if size <= STACK_MAX_ELEMENTS and (size <= STACK_ALWAYS_ELEMENTS or n <= STACK_MAX_SLOT):
        pairs = torch.zeros(memory_size, 2, n, dtype=dtype, device=device)
    else:
        # one tensor per vector: slots sharing a tensor are inputs that alias each other, which
        # a compiled step guards on (a new pattern at each of the first pushes: recompiles)
        pairs = tuple(_zero_pair(n, dtype, device) for _ in range(memory_size))
    return PairMemory(
        pairs=pairs,
        gram=torch.zeros(2 * memory_size, 2 * memory_size, dtype=small, device=device),
        valid=torch.zeros(memory_size, dtype=torch.bool, device=device),
    )


def init_last_point(
    memory_size: int, n: int, dtype: torch.dtype, device: torch.device
) -> LastPoint:
    """No previous point yet (``has_prev`` false)."""
    return LastPoint(
        point=_zero_pair(n, dtype, device),
        products=torch.zeros(memory_size, 2, dtype=compute_dtype(dtype), device=device),
        has_prev=torch.zeros((), dtype=torch.bool, device=device),
    )


def init_for(params, memory_size: int) -> tuple[PairMemory, LastPoint, torch.Tensor]:
    """What a method over consecutive points starts from, for ``params`` (a pytree): the
    empty memory and last point of ``memory_size`` slots over the raveled leaves, and a 0-d
    one in :func:`compute_dtype` (the initial scalings' dtype)."""
    leaves = tree.leaves(params)
    n = sum(leaf.numel() for leaf in leaves)
    dtype, device = leaves[0].dtype, leaves[0].device
    one = torch.ones((), dtype=compute_dtype(dtype), device=device)
    memory = init_memory(memory_size, n, dtype, device)
    return memory, init_last_point(memory_size, n, dtype, device), one


def _products(pairs: tuple[Pair, ...] | torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``[k, 2]``: ``(s_i . v, y_i . v)`` for the slots of ``pairs`` (a tuple or stacked)."""
    if isinstance(pairs, torch.Tensor):
        return torch.mv(pairs.reshape(-1, v.shape[0]), v).view(-1, 2)
    return torch.stack([_dots(pair, (v,))[:, 0] for pair in pairs])


def _append(pairs: tuple[Pair, ...] | torch.Tensor, pair: Pair):
    """Drop the oldest slot and append ``pair``; the old memory is untouched."""
    if isinstance(pairs, torch.Tensor):
        return torch.cat([pairs[1:], torch.stack(pair)[None]])
    return (*pairs[1:], pair)


def _dots(left: Pair, right: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """``[2, k]``: the inner products of ``left``'s two vectors with each of ``right``."""
    return torch.stack([torch.stack([torch.dot(a, b) for b in right]) for a in left])


def stacked_pairs(memory: PairMemory) -> torch.Tensor:
    """``[m, 2, n]``: the pairs as one tensor (a copy for the tuple layout)."""
    if isinstance(memory.pairs, torch.Tensor):
        return memory.pairs
    return torch.stack([torch.stack(pair) for pair in memory.pairs])


def _shift_gram(gram: torch.Tensor, s_new: torch.Tensor, y_new: torch.Tensor) -> torch.Tensor:
    """The Gram matrix with the oldest slot dropped and the new pair's rows and columns set.

    ``s_new[i] = (s_i . s, y_i . s)`` and ``y_new[i] = (s_i . y, y_i . y)`` over the new
    slots (the last one is the new pair itself). The old slots move one place up (a roll of
    both slot axes); the new ``s`` and ``y`` rows and columns are written by masks.
    """
    m = s_new.shape[0]
    shifted = gram.view(2, m, 2, m).roll((-1, -1), (1, 3)).reshape(2 * m, 2 * m)
    rows = torch.stack([s_new, y_new]).transpose(1, 2).reshape(2, 2 * m)  # s . [S Y], y . [S Y]
    index = torch.arange(2 * m, device=gram.device)
    source = torch.where((index >= m)[:, None], rows[1], rows[0])  # row i: s or y block's new row
    new = index % m == m - 1
    gram = torch.where(new[:, None], source, shifted)
    return torch.where(new[None, :], source.T, gram)


def _store(
    memory: PairMemory,
    pair: Pair,
    gram: torch.Tensor,
    admissible: torch.Tensor,
    accept_rule: AcceptRule,
) -> tuple[PairMemory, torch.Tensor]:
    """Append ``pair`` with the shifted ``gram``; the slot is valid when ``admissible`` (0-d
    bool) and ``accept_rule`` hold. Returns the memory and that 0-d decision.

    A rejected slot is masked out of every product by ``valid`` (its coefficients are
    zero), which is exact for finite entries; NaN and inf entries are zeroed so that
    ``0 * NaN`` cannot reach a direction (out of place: ``pair`` is saved for the backward
    of the products that formed ``gram``, which ``adjoint="unrolled"`` differentiates; an
    accepted pair is finite and unchanged).
    """
    tentative = torch.cat([memory.valid[1:], admissible[None]])
    accept = admissible & accept_rule(gram, tentative)
    valid = torch.cat([memory.valid[1:], accept[None]])
    both = torch.cat([valid, valid])
    gram = torch.where(both[:, None] & both[None, :], gram, torch.zeros_like(gram))
    pair = tuple(torch.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0) for v in pair)
    return PairMemory(pairs=_append(memory.pairs, pair), gram=gram, valid=valid), accept


def push(
    memory: PairMemory,
    last: LastPoint,
    point: Pair,
    accept_rule: AcceptRule,
    full_gram: bool = True,
) -> Pushed:
    """Form ``s = x - x_prev``, ``y = g - g_prev`` from ``point = (x, g)`` and
    append the pair, valid when ``accept_rule(gram, valid)`` holds.

    ``accept_rule`` sees the tentative Gram matrix (new pair in the last slot) and the
    validity of the retained slots (the new slot marked valid); it returns a 0-d bool.
    Non-finite pairs and the first call (no previous point) are always rejected; a
    rejected pair still takes its slot (marked invalid) until it leaves the memory.

    With ``full_gram=False`` the retained slots are read against ``g`` only (half the work):
    their inner products with the new ``s`` (``S^T s``, ``Y^T s``) are left at zero. The
    two-loop recursion never reads them (it needs ``triu(S^T Y)``, ``Y^T Y`` and the
    products with ``g``); :func:`complete_gram` recomputes them when another formula must.
    """
    m = len(memory.pairs)
    g = point[1]
    small = memory.gram.dtype
    pair = (point[0] - last.point[0], g - last.point[1])  # s, y (fresh, stored as the new slot)
    own = _dots(pair, (g, *pair)).to(small)  # [2, 3]: (s, y) . (g, s, y)
    if m > 1:
        # Stack the per-slot products once (few small operations per step).
        kept_g = _products(memory.pairs[1:], g).to(small)
        if full_gram:
            kept_s = _products(memory.pairs[1:], pair[0]).to(small)
        else:
            kept_s = torch.zeros_like(kept_g)
        kept = torch.stack([kept_g, kept_s], 2)  # [m-1, 2, 2]: (s_i, y_i) . (g, s)
        # (s_i, y_i) . y = (s_i, y_i) . g - (s_i, y_i) . g_prev: y's products by differences,
        # as accurate as y = g - g_prev itself, and one pass over the memory fewer.
        kept_y = kept[:, :, 0] - last.products[1:]
        products = torch.cat([torch.cat([kept, kept_y[:, :, None]], 2), own[None]])
    else:
        products = own[None]  # [m, 2, 3]: (s_i, y_i) . (g, s, y)
    gg = torch.dot(g, g).to(small)

    sg, yg = products[:, 0, 0], products[:, 1, 0]
    s_new, y_new = products[:, :, 1], products[:, :, 2]  # [m, 2]: (s_i, y_i) . s / . y
    gram = _shift_gram(memory.gram, s_new, y_new)
    admissible = last.has_prev & torch.isfinite(products[-1]).all()
    new_memory, _ = _store(memory, pair, gram, admissible, accept_rule)
    valid = new_memory.valid
    new_last = LastPoint(
        point=point,
        products=torch.where(valid[:, None], products[:, :, 0], 0.0),
        has_prev=torch.ones_like(last.has_prev),
    )
    zero = torch.zeros_like(sg)
    return Pushed(
        new_memory, new_last, torch.where(valid, sg, zero), torch.where(valid, yg, zero), gg
    )


def push_pair(
    memory: PairMemory,
    pair: Pair,
    accept_rule: AcceptRule,
    rejected_takes_slot: bool = True,
) -> tuple[PairMemory, torch.Tensor]:
    """Append a given pair ``(s, y)``, valid when ``accept_rule`` holds (and
    it is finite). Returns the memory and the 0-d decision.

    With ``rejected_takes_slot=False`` a rejected pair leaves the memory as it was, so the
    memory holds the ``m`` newest *accepted* pairs (selected by masks, no host sync).
    """
    m = len(memory.pairs)
    small = memory.gram.dtype
    pair = (pair[0].clone(), pair[1].clone())  # stored as the new slot
    own = _dots(pair, pair).to(small)  # [2, 2]: (s, y) . (s, y)
    if m > 1:
        kept = torch.stack(
            [_products(memory.pairs[1:], pair[0]), _products(memory.pairs[1:], pair[1])], 2
        ).to(small)  # [m-1, 2, 2]: (s_i, y_i) . (s, y)
        products = torch.cat([kept, own[None]])
    else:
        products = own[None]
    gram = _shift_gram(memory.gram, products[:, :, 0], products[:, :, 1])
    admissible = torch.isfinite(own).all()
    new_memory, accept = _store(memory, pair, gram, admissible, accept_rule)
    if not rejected_takes_slot:
        new_memory = optree.tree_map(lambda a, b: torch.where(accept, a, b), new_memory, memory)
    return new_memory, accept


def complete_gram(memory: PairMemory) -> torch.Tensor:
    """The Gram matrix of ``[S Y]`` computed afresh from the stored pairs (masked)."""
    stacked = stacked_pairs(memory)  # [m, 2, n]
    columns = torch.cat([stacked[:, 0], stacked[:, 1]])  # [2m, n]: s_0..s_{m-1}, y_0..
    gram = (columns @ columns.T).to(memory.gram.dtype)
    both = torch.cat([memory.valid, memory.valid])
    return torch.where(both[:, None] & both[None, :], gram, torch.zeros_like(gram))


def project(memory: PairMemory, v: torch.Tensor) -> torch.Tensor:
    """``[S^T v; Y^T v]`` (``[2m]``) for a flat vector ``v``; zero on invalid slots."""
    products = _products(memory.pairs, v).to(memory.gram.dtype)  # [m, 2]
    out = torch.cat([products[:, 0], products[:, 1]])
    both = torch.cat([memory.valid, memory.valid])
    return torch.where(both, out, torch.zeros_like(out))


def combine(
    memory: PairMemory, v: torch.Tensor, identity_coef: torch.Tensor, coef: torch.Tensor
) -> torch.Tensor:
    """``identity_coef * v + S c_s + Y c_y`` with ``coef = [c_s; c_y]`` (``[2m]``).

    Into a fresh tensor, accumulated in place (no input is mutated); out of place under
    vmap (no batching rule for the in-place forms) and, for the tuple layout, as one sum
    when compiling, which the compiler fuses into a single pass over the memory (each
    vector read once, the result written once) where per-slot products re-read it.
    """
    m = len(memory.pairs)
    both = torch.cat([memory.valid, memory.valid])
    coef = torch.where(both, coef, torch.zeros_like(coef)).to(v.dtype)
    out = v * identity_coef.to(v.dtype)
    in_place = not torch._C._are_functorch_transforms_active()
    if isinstance(memory.pairs, torch.Tensor):
        rows = memory.pairs.reshape(2 * m, -1).T  # [n, 2m]: s_0, y_0, s_1, ...
        weights = torch.stack([coef[:m], coef[m:]], dim=1).reshape(-1)
        return out.addmv_(rows, weights) if in_place else torch.addmv(out, rows, weights)
    for index, vector in enumerate(v for pair in memory.pairs for v in pair):
        weight = coef[index // 2 + m * (index % 2)]  # s_i: coef[i], y_i: coef[m + i]
        if torch.compiler.is_compiling():
            out = out + weight * vector
        elif in_place:
            out = out.addcmul_(vector, weight)
        else:
            out = torch.addcmul(out, vector, weight)
    return out


def flat_point(params, grad) -> Pair:
    """``(x, g)``: the raveled params and gradient (two ``[n]`` tensors, see the layout)."""
    p_leaves, g_leaves = tree.leaves(params), tree.leaves(grad)
    dtypes = {leaf.dtype for leaf in p_leaves} | {leaf.dtype for leaf in g_leaves}
    if len(dtypes) > 1:
        raise TypeError(
            f"quasi-Newton directions ravel the params into one vector and need one dtype "
            f"across leaves, got {sorted(map(str, dtypes))}; cast the params to a common dtype"
        )
    return (
        torch.cat([leaf.reshape(-1) for leaf in p_leaves]),
        torch.cat([leaf.reshape(-1) for leaf in g_leaves]),
    )


def check_memory_size(who: str, memory_size: int) -> None:
    """Raise a clear error unless ``memory_size`` is a positive int."""
    if isinstance(memory_size, bool) or not isinstance(memory_size, int) or memory_size < 1:
        raise ValueError(f"{who}: memory_size must be a positive int, got {memory_size!r}")
