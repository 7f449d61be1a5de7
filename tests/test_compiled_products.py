"""The compiled step's backend (:func:`soo_func.drivers.compiled_step.blas_inductor`) on a
linear-model objective ``f(w) = mean(softplus(-y * (X w + b)))``: the forward product
``X w`` (rows of ``X`` contiguous) is inductor's row reduction, the gradient's ``X^T r``
one BLAS matrix-vector call on a strided view of ``X``, and no buffer the size of ``X`` is
allocated (no copy of ``X`` or of ``X^T``): an evaluation reads ``X`` twice, as eager
autograd does."""

from __future__ import annotations

import re

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from soo_func.drivers.compiled_step import blas_inductor, rows_contiguous
from soo_func.oracles import value_and_grad

ROWS, COLS = 301, 7  # odd sizes, so that a buffer of X's shape is easy to find in the code


def _logistic(x: torch.Tensor, y: torch.Tensor):
    def value_fn(p):
        margins = y * (x @ p["w"] + p["b"])
        return torch.nn.functional.softplus(-margins).mean() + 0.5e-4 * (p["w"] @ p["w"])

    return value_fn


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_logistic_value_and_grad_keeps_the_transposed_product_blas_without_copying_x():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(ROWS, COLS, generator=gen, dtype=torch.float64)
    y = torch.sign(torch.randn(ROWS, generator=gen, dtype=torch.float64))
    params = {"w": torch.randn(COLS, dtype=torch.float64) / 10, "b": torch.zeros((), dtype=x.dtype)}
    value_fn = _logistic(x, y)
    compiled = torch.compile(value_and_grad(value_fn), fullgraph=True, backend=blas_inductor)
    (value, grad), codes = run_and_get_code(compiled, params)
    want_value, want_grad = value_and_grad(value_fn)(params)
    torch.testing.assert_close(value, want_value)
    torch.testing.assert_close(grad, want_grad)
    code = "\n".join(codes)
    products = re.findall(r"= torch\.ops\.aten\.mv\.default\(([^\n]*)", code)
    transposed = [p for p in products if f"({COLS}, {ROWS}), (1, {COLS})" in p]
    assert len(products) == 1 and len(transposed) == 1, products
    shapes = re.findall(r"empty_strided_cpu\(\(([0-9, ]*)\)", code)
    assert not [s for s in shapes if s in (f"{ROWS}, {COLS}", f"{COLS}, {ROWS}")], shapes


def test_rows_contiguous():
    matrix = torch.zeros(4, 3)
    assert rows_contiguous(matrix) and rows_contiguous(matrix[:, :2])
    assert not rows_contiguous(matrix.t()) and rows_contiguous(torch.zeros(3, 1).t())
