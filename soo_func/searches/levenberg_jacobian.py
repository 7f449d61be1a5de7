"""The Levenberg-Marquardt Jacobian within a memory budget, built in chunks.

``torch.func.jacfwd`` pushes all ``n`` basis vectors through the residual function at once
(one ``vmap`` of ``jvp``): besides the m x n result it holds every intermediate of the
forward pass ``n`` times. For a network's residuals (a PINN: ``m`` collocation points,
hidden activations of width ``w`` per point, derivatives of the network inside the
residual) that is about ``n * m * w * (number of intermediates)`` numbers, hundreds of times
the Jacobian itself. Here the basis is pushed through in chunks of ``k`` vectors, so the
peak is the Jacobian plus one chunk's work:

* :func:`jacobian` -- the m x n ``J`` and the residuals ``r``, or nothing when ``J`` would
  exceed a byte budget. Forward mode (columns, ``jvp``) when ``n <= m``, reverse mode
  (rows, ``vjp`` of one linearization) when ``m < n``: ``min(m, n)`` products either way.
  One ``jacfwd`` when a single chunk holds all ``n <= m`` columns, as before this module
  existed. ``m`` is remembered per function (:func:`known_rows`); for a new function the
  first chunk of ``FIRST_CHUNK`` columns tells it, so sizing costs no evaluation.
* :func:`column_sq` -- Marquardt's ``diag(J^T J)`` (the squared column norms), accumulated
  chunk by chunk without storing ``J`` (the matrix-free solver's damping diagonal).
* :func:`chunk_length` -- ``k``: ``chunk_size`` when given, else the largest ``k`` with
  ``k * m <= CHUNK_ROWS`` (a chunk's work is that of one ``jvp``/``vjp`` of the residuals
  on ``k * m`` rows).
* :func:`default_max_jacobian_bytes` -- the budget for ``J`` when none is given: a
  fraction of the device's available memory, read once per device and process.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import weakref
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
import torch.func as tf

from soo_func import tree

try:  # optional: the host's available memory
    import psutil
except ImportError:  # pragma: no cover - psutil is installed with the dev tools
    psutil = None

PyTree = Any

__all__ = [
    "BUDGET_FRACTION",
    "CHUNK_ROWS",
    "FIRST_CHUNK",
    "Blocks",
    "Jacobian",
    "available_memory",
    "chunk_count",
    "chunk_length",
    "column_sq",
    "default_max_jacobian_bytes",
    "dense_jacobian",
    "flat_residual_fn",
    "jacobian",
    "jacobian_blocks",
    "jacobian_bytes",
    "known_rows",
]

FIRST_CHUNK = 32
"""Columns in the first chunk of a function whose residual count ``m`` is not known yet."""

CHUNK_ROWS = 2**15
"""Automatic chunks: ``k`` basis vectors per chunk with ``k * m <= CHUNK_ROWS``."""

BUDGET_FRACTION = 0.125
"""The default ``max_jacobian_bytes`` is this fraction of the available memory: the dense
solve holds a few m x n arrays at its peak (the Jacobians at the point and at the trial,
the scaled copy and the SVD factor of Moré's rule)."""


def available_memory(device: torch.device) -> int:
    """Bytes free on ``device``: ``torch.cuda.mem_get_info`` on CUDA; on the host
    ``psutil``'s available memory when installed, else ``MemAvailable`` of
    ``/proc/meminfo``, else the free physical pages (``os.sysconf``)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if psutil is not None:
        return int(psutil.virtual_memory().available)
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


_BUDGETS: dict[str, int] = {}


def default_max_jacobian_bytes(device: torch.device) -> int:
    """``BUDGET_FRACTION`` of :func:`available_memory` on ``device``, read on the first
    call for that device and kept for the process (so that a run's choice of solver does
    not move with the memory it uses itself)."""
    key = str(device)
    if key not in _BUDGETS:  # read on the host (transforms read it at init, before tracing)
        _BUDGETS[key] = int(BUDGET_FRACTION * available_memory(torch.device(key)))
    return _BUDGETS[key]


def jacobian_bytes(m: int, n: int, dtype: torch.dtype) -> int:
    """The size of an m x n Jacobian of ``dtype``."""
    return m * n * torch.empty((), dtype=dtype).element_size()


def chunk_length(count: int, rows: int, chunk_size: int | None) -> int:
    """Basis vectors per chunk, at most ``count``: ``chunk_size``, else the largest ``k``
    with ``k * rows <= CHUNK_ROWS`` (at least 1)."""
    if chunk_size is None:
        chunk_size = max(1, CHUNK_ROWS // max(rows, 1))
    return max(1, min(count, chunk_size))


def flat_residual_fn(raw_fn: Callable, like: PyTree) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> r``: ``raw_fn`` on the flat parameter vector ``x`` (unraveled like ``like``),
    its output pytree flattened (one leaf is reshaped, not copied)."""
    raveled = tree.ravel(like)

    def flat_fn(flat: torch.Tensor) -> torch.Tensor:
        leaves = tree.leaves(raw_fn(tree.unravel(flat, raveled)))
        if len(leaves) == 1:
            return leaves[0].reshape(-1)
        return torch.cat([leaf.reshape(-1) for leaf in leaves])

    return flat_fn


def dense_jacobian(residual_fn: Callable, params: PyTree) -> tuple[torch.Tensor, torch.Tensor]:
    """``(J, r)``: the m x n Jacobian of the flattened residuals at ``params`` and the
    residuals, from one ``jacfwd``. Charges nothing (the caller does)."""
    return _whole_jacobian(flat_residual_fn(residual_fn, params), tree.ravel(params).flat)


def _whole_jacobian(flat_fn: Callable, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(J, r)`` of ``flat_fn`` at ``x`` from one ``jacfwd`` (``vmap`` over ``n`` ``jvp``s)."""
    if _vmap_of_jvp_breaks():
        r, block = _pushforwards(flat_fn, x, _basis(0, x.shape[0], x.shape[0], x))
        return block.T, r

    def with_aux(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = flat_fn(flat)
        return r, r

    return tf.jacfwd(with_aux, has_aux=True)(x)


def _vmap_of_jvp_breaks() -> bool:
    """Whether ``torch.compile`` traces this inside a ``torch.func`` transform, where a
    ``vmap`` of ``jvp`` fails to trace (pytorch/pytorch#151196, #160508: "InferenceMode ...
    _fw_primal" on fake tensors; ``torch.compile(vmap(least_squares step))``). Host-side
    flags only: the answer is a constant of the trace."""
    return torch.compiler.is_compiling() and tree.in_functorch_transform()


def _pushforwards(
    flat_fn: Callable, x: torch.Tensor, tangents: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(r, J t_i for each row t_i of tangents)``: one ``vmap`` of ``jvp``, or, where that
    does not trace (:func:`_vmap_of_jvp_breaks`), one ``jvp`` per tangent (the same
    products, unrolled in the compiled graph)."""

    def column(tangent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return tf.jvp(flat_fn, (x,), (tangent,))

    if not _vmap_of_jvp_breaks():
        r, block = tf.vmap(column)(tangents)
        return r[0], block
    pairs = [column(tangent) for tangent in tangents.unbind(0)]
    return pairs[0][0], torch.stack([tangent_out for _, tangent_out in pairs])


class Jacobian(NamedTuple):
    """``J`` (m x n; ``None`` when it exceeded the budget), the residuals ``r`` (``None``
    when nothing was evaluated) and the products spent (``n`` columns forward, ``m`` rows
    reverse, plus a discarded first chunk)."""

    jac: torch.Tensor | None
    residuals: torch.Tensor | None
    products: int


class Blocks(NamedTuple):
    """A Jacobian about to be built: ``whole`` when one ``jacfwd`` built it already, else the
    lazy ``blocks`` (``(start, block)``: ``J[:, start:start + k].T`` when ``columns``, else
    ``J[start:start + k]``). ``spent`` products are made already, ``products`` in all."""

    residuals: torch.Tensor
    rows: int
    whole: torch.Tensor | None
    blocks: Iterator[tuple[int, torch.Tensor]]
    columns: bool
    spent: int
    products: int


_ROWS: weakref.WeakKeyDictionary[Callable, int] = weakref.WeakKeyDictionary()


def known_rows(raw_fn: Callable) -> int | None:
    """The residual count ``m`` of ``raw_fn`` once a Jacobian of it was built here (a
    host-side memo, so that no evaluation is spent on sizing), else ``None``."""
    try:
        return _ROWS.get(raw_fn)
    except TypeError:  # not weakly referenceable or unhashable
        return None


def _remember_rows(raw_fn: Callable, rows: int) -> None:
    """Memo ``rows`` for ``raw_fn``; not while ``torch.compile`` traces: the memo would be a
    side effect keeping ``raw_fn`` (and the traced tensors it closes over) past the graph."""
    if torch.compiler.is_compiling() or known_rows(raw_fn) == rows:
        return
    with contextlib.suppress(TypeError):  # not weakly referenceable or unhashable
        _ROWS[raw_fn] = rows


def _basis(start: int, stop: int, size: int, like: torch.Tensor) -> torch.Tensor:
    """Rows ``start:stop`` of the ``size`` x ``size`` identity."""
    rows = torch.zeros(stop - start, size, dtype=like.dtype, device=like.device)
    rows[torch.arange(stop - start), torch.arange(start, stop)] = 1
    return rows


def _column_blocks(flat_fn: Callable, x: torch.Tensor, k: int, first: int = 0):
    """``(start, J[:, start:start + k].T)`` for the column chunks from column ``first``."""
    n = x.shape[0]
    for start in range(first, n, k):
        stop = min(n, start + k)
        yield start, _pushforwards(flat_fn, x, _basis(start, stop, n, x))[1]


def _first_columns(flat_fn: Callable, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(r, J[:, :k].T)``: the residuals come with the first chunk (they tell ``m``)."""
    return _pushforwards(flat_fn, x, _basis(0, k, x.shape[0], x))


def _row_blocks(vjp_fn: Callable, residuals: torch.Tensor, k: int):
    """``(start, J[start:start + k])`` for the row chunks (reverse mode)."""
    m = residuals.shape[0]
    for start in range(0, m, k):
        stop = min(m, start + k)
        yield start, tf.vmap(lambda u: vjp_fn(u)[0])(_basis(start, stop, m, residuals))


def chunk_count(m: int, n: int, chunk_size: int | None = None) -> int:
    """How many chunks an m x n Jacobian is built in once ``m`` is known (1: one ``vmap``)."""
    count = n if n <= m else m
    return -(-count // chunk_length(count, m, chunk_size))


def jacobian_blocks(raw_fn: Callable, params: PyTree, chunk_size: int | None = None) -> Blocks:
    """How the Jacobian of the uncounted ``raw_fn`` at ``params`` is built, and its first
    evaluation: one ``jacfwd`` when a chunk holds all ``n <= m`` columns; else column
    chunks (``n <= m``) or row chunks of one linearization (``m < n``). When ``m`` is not
    known yet (:func:`known_rows`) the first chunk, ``min(chunk_size or FIRST_CHUNK, n)``
    columns, tells it (discarded if rows are cheaper)."""
    x = tree.ravel(params).flat
    n = x.shape[0]
    flat_fn = flat_residual_fn(raw_fn, params)
    m, first, r, spent = known_rows(raw_fn), None, None, 0
    if m is None:
        k0 = min(n, chunk_size or FIRST_CHUNK)
        if k0 < n:
            r, first = _first_columns(flat_fn, x, k0)
            m, spent = r.shape[0], k0
    if first is None and (m is None or (n <= m and chunk_length(n, m, chunk_size) >= n)):
        whole, r = _whole_jacobian(flat_fn, x)  # one chunk: jacfwd as it is
        _remember_rows(raw_fn, r.shape[0])
        return Blocks(r, r.shape[0], whole, iter(()), True, n, n)
    _remember_rows(raw_fn, m)
    if n <= m:
        k = chunk_length(n, m, chunk_size)
        if first is None:
            r = flat_fn(x)
            blocks = _column_blocks(flat_fn, x, k)
        else:
            blocks = itertools.chain([(0, first)], _column_blocks(flat_fn, x, k, first.shape[0]))
        return Blocks(r, r.shape[0], None, blocks, True, spent, n)
    r, vjp_fn = tf.vjp(flat_fn, x)
    m = r.shape[0]  # the memo only plans the chunks: the shapes are the evaluated ones
    blocks = _row_blocks(vjp_fn, r, chunk_length(m, m, chunk_size))
    return Blocks(r, m, None, blocks, False, spent, spent + m)


def _assemble(plan: Blocks, n: int) -> torch.Tensor:
    """The m x n Jacobian from its chunks, written into one preallocated tensor (the peak is
    ``J`` and one chunk); concatenated under a ``torch.func`` transform (a batched chunk
    cannot be written into a plain tensor)."""
    if tree.in_functorch_transform():
        parts = [block.T if plan.columns else block for _, block in plan.blocks]
        return torch.cat(parts, dim=1 if plan.columns else 0)
    like = plan.residuals
    jac = torch.empty(plan.rows, n, dtype=like.dtype, device=like.device)
    for start, block in plan.blocks:
        if plan.columns:
            jac[:, start : start + block.shape[0]] = block.T
        else:
            jac[start : start + block.shape[0]] = block
    return jac


def jacobian(
    raw_fn: Callable,
    params: PyTree,
    chunk_size: int | None = None,
    max_bytes: int | None = None,
) -> Jacobian:
    """The Jacobian of the flattened residuals of the uncounted ``raw_fn`` at ``params``
    (:func:`jacobian_blocks`), or ``jac=None`` when it would take more than ``max_bytes``
    (``residuals`` then ``None`` when ``m`` was known without an evaluation). The caller
    charges the products and the one residual evaluation."""
    n = tree.ravel(params).flat.shape[0]
    m = known_rows(raw_fn)
    like = tree.leaves(params)[0]
    if max_bytes is not None and m is not None and jacobian_bytes(m, n, like.dtype) > max_bytes:
        return Jacobian(None, None, 0)
    plan = jacobian_blocks(raw_fn, params, chunk_size)
    if max_bytes is not None and jacobian_bytes(plan.rows, n, like.dtype) > max_bytes:
        return Jacobian(None, plan.residuals, plan.spent)
    if plan.whole is not None:
        return Jacobian(plan.whole, plan.residuals, n)
    return Jacobian(_assemble(plan, n), plan.residuals, plan.products)


def column_sq(
    raw_fn: Callable, params: PyTree, chunk_size: int | None = None
) -> tuple[torch.Tensor, int]:
    """``(diag(J^T J), products)`` of the uncounted ``raw_fn`` at ``params`` (flat), one
    chunk of ``J`` at a time, never storing it; ``(J * J).sum(0)`` of one ``jacfwd`` as
    before when a chunk holds all ``n <= m`` columns."""
    plan = jacobian_blocks(raw_fn, params, chunk_size)
    if plan.whole is not None:
        return (plan.whole * plan.whole).sum(0), plan.products
    if plan.columns:
        return torch.cat([(block * block).sum(1) for _, block in plan.blocks]), plan.products
    total = torch.zeros_like(tree.ravel(params).flat)
    for _, block in plan.blocks:
        total = total + (block * block).sum(0)
    return total, plan.products
