"""The house rules of the package, checked on its source (issue 15): module and function
sizes, no private names imported across modules, function-level imports only to break a
named cycle (or for an optional dependency), and the publication declaration in step with
``docs/design.md`` and with what the library's transforms publish."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

import soo_func as sf
from soo_func import publication

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "soo_func"
MODULES = sorted(PACKAGE.rglob("*.py"))
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 100


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


_DEFS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def _direct_defs(node: ast.AST):
    """The functions and classes defined in ``node``'s body, not inside those."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, _DEFS):
            yield child
        else:
            yield from _direct_defs(child)


def _own_lines(node: ast.AST) -> int:
    """Lines of a function, not counting the functions and classes nested in it."""
    nested = sum(child.end_lineno - child.lineno + 1 for child in _direct_defs(node))
    return node.end_lineno - node.lineno + 1 - nested


def _functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_module_is_at_most_400_lines(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"{path.name} has {lines} lines"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_functions_are_at_most_100_lines(path):
    tree = ast.parse(path.read_text())
    long = [(f.name, _own_lines(f)) for f in _functions(tree) if _own_lines(f) > MAX_FUNCTION_LINES]
    assert not long, f"{path.name}: functions over {MAX_FUNCTION_LINES} lines: {long}"


def _is_module(dotted: str) -> bool:
    path = ROOT.joinpath(*dotted.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _private_imports(path: Path) -> list[str]:
    """Private names imported from another module, and private modules imported from
    outside their own package."""
    here = _module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ImportFrom) or not (node.module or "").startswith("soo_func"):
            continue
        module = node.module
        for alias in node.names:
            name = alias.name
            if not name.startswith("_") or name.startswith("__"):
                continue
            if not (module == package and _is_module(f"{module}.{name}")):
                found.append(f"line {node.lineno}: from {module} import {name}")
        private = [part for part in module.split(".") if part.startswith("_")]
        if private:
            owner = module[: module.index(private[0]) - 1]
            if package != owner and not package.startswith(owner + "."):
                found.append(f"line {node.lineno}: from {module} (a private module)")
    return found


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_private_name_is_imported_across_modules(path):
    assert not _private_imports(path), f"{path.name}: {_private_imports(path)}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_function_level_imports_name_their_reason(path):
    source = path.read_text()
    lines = source.splitlines()
    unexplained = []
    for function in _functions(ast.parse(source)):
        for node in ast.walk(function):
            if isinstance(node, ast.Import | ast.ImportFrom):
                text = " ".join(lines[node.lineno - 1 : node.end_lineno])
                if not re.search(r"#.*\b(cycle|optional)\b", text):
                    unexplained.append(f"line {node.lineno} in {function.name}")
    assert not unexplained, (
        f"{path.name}: function-level imports without a comment naming the cycle or the "
        f"optional dependency: {unexplained}"
    )


def test_design_doc_table_is_the_declaration():
    doc = (ROOT / "docs" / "design.md").read_text()
    match = re.search(r"<!-- publication-table -->\n(.*?)\n<!-- /publication-table -->", doc, re.S)
    assert match, "docs/design.md lacks the <!-- publication-table --> block"
    assert match.group(1).strip() == publication.markdown_table().strip(), (
        "docs/design.md's publication table differs from soo_func.publication: paste "
        "python -c 'import soo_func.publication as p; print(p.markdown_table())'"
    )


def _quadratic(p):
    return 0.5 * (p["x"] ** 2 * torch.arange(1.0, 4.0, dtype=torch.float64)).sum()


def _residuals(p):
    return p["x"] * torch.arange(1.0, 4.0, dtype=torch.float64) - 1.0


OPTIMIZERS = {
    "lbfgs+wolfe": lambda: sf.chain(sf.lbfgs(), sf.wolfe()),
    "bfgs+armijo": lambda: sf.chain(sf.bfgs(), sf.armijo()),
    "sr1(m)+trust_region": lambda: sf.chain(sf.sr1(memory_size=3), sf.trust_region()),
    "newton_krylov+trust_region": lambda: sf.chain(sf.newton_krylov(), sf.trust_region()),
    "nonlinear_cg+wolfe": lambda: sf.chain(sf.nonlinear_cg(), sf.wolfe()),
    "gauss_newton+armijo_sync_free": lambda: sf.chain(sf.gauss_newton(), sf.armijo_sync_free()),
    "levenberg_marquardt": lambda: sf.levenberg_marquardt(),
    "trust_region_reflective": lambda: sf.trust_region_reflective(-5.0, 5.0),
    "lbfgs_b": lambda: sf.lbfgs_b(-5.0, 5.0),
    "homotopy+newton+armijo": lambda: sf.chain(sf.homotopy(), sf.newton_krylov(), sf.armijo()),
}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_library_transforms_publish_only_declared_keys(name):
    """Every key a library chain publishes is declared (roles decide forwarding)."""
    opt = OPTIMIZERS[name]()
    params = {"x": torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)}
    state = opt.init(params)
    for _ in range(2):
        value, grad = sf.value_and_grad(_quadratic)(params)
        updates, state, published = sf.update_and_publish(
            opt, grad, state, params, value=value, value_fn=_quadratic, residual_fn=_residuals
        )
        undeclared = set(published) - set(publication.DECLARED)
        assert not undeclared, f"{name} publishes undeclared keys {sorted(undeclared)}"
        params = sf.apply_updates(params, updates)


def test_chain_forwards_model_keys_but_not_diagnostics_or_outcomes():
    seen = {}

    def init(params):
        return sf.EmptyState()

    def update(updates, state, params=None, **extra):
        seen.update(extra)
        return updates, state

    opt = sf.chain(sf.newton_krylov(), sf.armijo(), sf.Transform(init, update))
    params = {"x": torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)}
    value, grad = sf.value_and_grad(_quadratic)(params)
    sf.update_and_publish(opt, grad, opt.init(params), params, value=value, value_fn=_quadratic)
    assert "curvature" in seen  # model: forwarded
    assert not {"next_value", "search_failed", "newton_krylov_iters", "step_size"} & set(seen)
