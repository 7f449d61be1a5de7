"""The compiled step of the sync-free driver: ``torch.compile`` with ``fullgraph=True`` (graph
breaks and a warning when the chain does not trace whole), on inductor with the
matrix-vector products that read a matrix by columns kept as BLAS calls.

Inductor decomposes ``aten.mv``, ``addmv`` and ``dot`` into its own multiply-and-reduce
loops (it has no lowering for them). ``A v`` with the rows of ``A`` contiguous is a
reduction along contiguous memory, which inductor's vectorised loop streams; ``A^T r``
(``A`` row-major, so its transpose strided by rows) is a reduction across rows, where
inductor's loop is the slower one and the BLAS ``gemv`` reads ``A`` row by row.
:func:`blas_inductor` keeps ``dot`` and every ``mv``/``addmv`` whose matrix is not
contiguous along its rows as calls of the eager kernels, and decomposes the others as
inductor does. A linear model's objective and gradient (``X w``, then ``X^T r``) then
take one inductor row reduction and one BLAS call on ``X``, and neither copies ``X``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch._inductor.compile_fx import compile_fx
from torch._inductor.decomposition import select_decomp_table
from torch._inductor.lowering import lowerings, make_fallback

__all__ = [
    "BLAS_PRODUCTS",
    "ROW_PRODUCTS",
    "CompiledStep",
    "blas_inductor",
    "by_rows",
    "rows_contiguous",
]


BLAS_PRODUCTS = (
    torch.ops.aten.mv.default,
    torch.ops.aten.addmv.default,
    torch.ops.aten.dot.default,
)
"""Products that inductor would decompose into its own loops (``mv`` becomes a multiply and
a row sum) and that the compiled step keeps as calls of the eager (BLAS) kernels, except
the row-contiguous ones of :data:`ROW_PRODUCTS`."""


ROW_PRODUCTS = {torch.ops.aten.mv.default: 0, torch.ops.aten.addmv.default: 1}
"""The products of :data:`BLAS_PRODUCTS` that inductor's decomposition takes when their
matrix (the argument at this index) is contiguous along its rows."""


def blas_inductor(graph: torch.fx.GraphModule, example_inputs: list) -> Callable:
    """The inductor backend with :data:`BLAS_PRODUCTS` kept whole (one BLAS call) except
    the row-contiguous matrix-vector products (:func:`by_rows`), which inductor decomposes
    into its own row reductions."""
    register_blas_fallbacks()
    decompositions = select_decomp_table()
    table = {op: fn for op, fn in decompositions.items() if op not in BLAS_PRODUCTS}
    for op, matrix_index in ROW_PRODUCTS.items():
        if op in decompositions:
            table[op] = by_rows(decompositions[op], matrix_index)
    return compile_fx(graph, example_inputs, decompositions=table)


def rows_contiguous(matrix: torch.Tensor) -> bool:
    """Whether each row of the 2-D ``matrix`` is contiguous (unit stride along a row)."""
    return matrix.dim() == 2 and (matrix.size(1) <= 1 or matrix.stride(1) == 1)


def by_rows(decomposition: Callable, matrix_index: int) -> Callable:
    """``decomposition`` where the product's matrix (argument ``matrix_index``) has
    contiguous rows (a sum along each row, ``(A * v).sum(1)``); elsewhere
    ``NotImplemented``, which keeps the op (its BLAS fallback)."""

    def decompose(*args: Any, **kwargs: Any) -> Any:
        if rows_contiguous(args[matrix_index]):
            return decomposition(*args, **kwargs)
        return NotImplemented

    return decompose


def register_blas_fallbacks() -> None:
    """Give inductor an explicit fallback lowering (the eager kernel) for each of
    :data:`BLAS_PRODUCTS`, once per process.

    Without it inductor makes the fallback implicitly when it meets the op, and that path
    raises where the environment variable ``CI`` is set, because a decomposition exists.
    The default inductor never sees these ops at lowering time (it decomposes them first),
    so the registration changes nothing for other compiles."""
    for op in BLAS_PRODUCTS:
        if op not in lowerings:
            make_fallback(op, override_decomp=True)


class CompiledStep:
    """``step`` compiled with ``fullgraph=True``, or with graph breaks and a warning when
    the chain does not trace whole (dynamo raises at the first call, before running
    anything). ``whole`` says whether the one graph held. The backend is inductor with the
    matrix-vector products kept as BLAS calls (:func:`blas_inductor`)."""

    def __init__(self, step: Callable[[Any], Any]):
        self.step = step
        self.whole = True
        self.compiled = torch.compile(step, fullgraph=True, backend=blas_inductor)

    def __call__(self, carry: Any) -> Any:
        if not self.whole:
            return self.compiled(carry)
        try:
            return self.compiled(carry)
        except Exception as err:  # dynamo's errors share no public base class
            first_line = (str(err).splitlines() or [""])[0]
            warnings.warn(
                f"compile=True: the step does not compile as one graph ({type(err).__name__}: "
                f"{first_line}); compiling it with graph breaks",
                stacklevel=5,
            )
        self.whole, self.compiled = False, torch.compile(self.step, backend=blas_inductor)
        return self.compiled(carry)
