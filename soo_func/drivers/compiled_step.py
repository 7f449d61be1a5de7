"""The compiled step of the sync-free driver: ``torch.compile`` with ``fullgraph=True`` (graph
breaks and a warning when the chain does not trace whole), on inductor with the
matrix-vector products kept as BLAS calls.

Inductor decomposes ``aten.mv``, ``addmv`` and ``dot`` into its own multiply-and-reduce
loops (it has no lowering for them); :func:`blas_inductor` leaves them out of the
decomposition table so that they run as calls of the eager kernels.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch._inductor.compile_fx import compile_fx
from torch._inductor.decomposition import select_decomp_table
from torch._inductor.lowering import lowerings, make_fallback

__all__ = ["BLAS_PRODUCTS", "CompiledStep", "blas_inductor"]


BLAS_PRODUCTS = (
    torch.ops.aten.mv.default,
    torch.ops.aten.addmv.default,
    torch.ops.aten.dot.default,
)
"""Products that inductor would decompose into its own loops (``mv`` becomes a multiply and
a row sum) and that the compiled step keeps as calls of the eager (BLAS) kernels."""


def blas_inductor(graph: torch.fx.GraphModule, example_inputs: list) -> Callable:
    """The inductor backend with :data:`BLAS_PRODUCTS` kept whole (a matrix-vector product
    of the objective or of the pair memory runs as one BLAS call)."""
    register_blas_fallbacks()
    table = {op: fn for op, fn in select_decomp_table().items() if op not in BLAS_PRODUCTS}
    return compile_fx(graph, example_inputs, decompositions=table)


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
