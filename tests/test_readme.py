"""The README's quick start runs as written, and its algorithm table tells the truth."""

from __future__ import annotations

import contextlib
import io
import os
import re

import torch

import soo_func as sf

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def read_readme() -> str:
    with open(README, encoding="utf-8") as f:
        return f.read()


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def test_quick_start_runs_and_converges():
    blocks = python_blocks(read_readme())
    assert blocks, "README.md has no ```python block"
    namespace: dict = {"__name__": "readme"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(blocks[0], "README.md", "exec"), namespace)
    result = namespace["result"]
    assert result.converged, result.reason
    assert float(result.value) < 1e-12
    assert out.getvalue().startswith("gtol")


def test_manual_step_block_runs_after_quick_start():
    blocks = python_blocks(read_readme())
    namespace: dict = {"__name__": "readme"}
    with contextlib.redirect_stdout(io.StringIO()):
        for block in blocks[:2]:
            exec(compile(block, "README.md", "exec"), namespace)
    # one step from the start (-1.2, 1), where the value is 24.2, goes downhill
    assert float(namespace["rosenbrock"](namespace["params"])) < 24.2
    assert namespace["state"] is not None


def table_rows(text: str) -> list[tuple[list[str], str]]:
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[2] in {"available", "planned"}:
            rows.append((re.findall(r"`(\w+)`", cells[1]), cells[2]))
    return rows


def test_algorithm_table_matches_the_package():
    rows = table_rows(read_readme())
    assert len(rows) >= 10
    for names, status in rows:
        if status == "available":
            missing = [n for n in names if not hasattr(sf, n)]
            assert not missing, f"README lists {missing} as available but soo_func lacks them"
        else:
            present = [n for n in names[:1] if hasattr(sf, n)]
            assert not present, (
                f"README lists {present} as planned but it exists: mark it available"
            )


def test_implicit_adjoint_block_gives_the_closed_form_hyper_gradient():
    blocks = python_blocks(read_readme())
    block = next(b for b in blocks if 'adjoint="implicit"' in b)
    namespace: dict = {"__name__": "readme"}
    exec(compile(blocks[0], "README.md", "exec"), namespace)  # imports
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(block, "README.md", "exec"), namespace)
    a, b, lam = namespace["A"], namespace["b"], namespace["lam"]
    assert namespace["fit"].converged
    # d/dlam |x*(lam) - x_valid|^2 with x* = (A^T A + lam I)^{-1} A^T b
    lam_ref = lam.detach().clone().requires_grad_(True)
    eye = torch.eye(a.shape[1], dtype=a.dtype)
    x_star = torch.linalg.solve(a.T @ a + lam_ref * eye, a.T @ b)
    ((x_star - namespace["x_valid"]) ** 2).sum().backward()
    torch.testing.assert_close(lam.grad, lam_ref.grad, rtol=1e-5, atol=1e-8)


def test_every_python_block_runs_in_order():
    """The later blocks (unrolled adjoint, box bounds, batched solves) run as written after
    the earlier ones, and say what their comments say."""
    namespace: dict = {"__name__": "readme"}
    with contextlib.redirect_stdout(io.StringIO()):
        for block in python_blocks(read_readme()):
            exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["lam"].grad is not None  # the unrolled block's hyper-gradient
    torch.testing.assert_close(
        namespace["boxed"].params, torch.tensor([0.5, 0.25], dtype=torch.float64)
    )
    assert bool(namespace["fits"].converged.all())
    torch.testing.assert_close(namespace["fits"].params, namespace["truth"], atol=1e-5, rtol=0)
    assert float(namespace["runs"].value.max()) < 1e-8
