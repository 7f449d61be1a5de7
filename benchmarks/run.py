"""The benchmark runner: ``python -m benchmarks.run --suite NAME [--quick] [--json PATH]``.

Every module ``benchmarks/bench_*.py`` exposes ``SUITES = {name: run_fn}`` with
``run_fn(quick: bool) -> list[dict]`` (flat rows of str/float/int/bool) and may list
some of them in ``DEFAULT = [names]``: ``--suite default`` runs every module's
DEFAULT suites (``make bench``). ``--list`` lists the suites. Each suite's rows are
printed as an aligned table and all rows are written to JSON (default
``benchmarks/results/latest.json``). A suite that raises prints its traceback, the
others still run, and the exit code is 1. ``--device cuda`` sets the environment variable
``SOO_FUNC_BENCH_DEVICE`` that the suites supporting a device read through
:func:`bench_device` (``quasi_newton``, ``lbfgs_vs_torch``, ``batched_fits``, ``multistart``);
the others run on the CPU. ``python -m benchmarks.gpu_check`` runs the CUDA checks and the
device suites in one command.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import pkgutil
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT_JSON = HERE / "results" / "latest.json"

Row = dict[str, Any]
Suite = Callable[[bool], list[Row]]


DEVICE_VARIABLE = "SOO_FUNC_BENCH_DEVICE"


def bench_device() -> str:
    """The device that ``--device`` asked for (``"cpu"`` by default)."""
    return os.environ.get(DEVICE_VARIABLE, "cpu")


def discover() -> tuple[dict[str, Suite], list[str], dict[str, str]]:
    """Import every ``benchmarks/bench_*.py``; return (suites, default names, import errors)."""
    suites: dict[str, Suite] = {}
    default: list[str] = []
    errors: dict[str, str] = {}
    for info in sorted(pkgutil.iter_modules([str(HERE)]), key=lambda i: i.name):
        if not info.name.startswith("bench_"):
            continue
        try:
            module = importlib.import_module(f"benchmarks.{info.name}")
        except Exception:
            errors[info.name] = traceback.format_exc()
            continue
        for name, fn in getattr(module, "SUITES", {}).items():
            if name in suites:
                errors[f"{info.name}:{name}"] = f"suite name {name!r} is defined twice"
                continue
            suites[name] = fn
        default.extend(n for n in getattr(module, "DEFAULT", []) if n not in default)
    return suites, default, errors


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if value == 0:
            return "0"
        if 1e-3 <= abs(value) < 1e6:
            return f"{value:.4g}"
        return f"{value:.3e}"
    return str(value)


def format_table(rows: Sequence[Row]) -> str:
    """Rows as an aligned text table; columns in order of first appearance."""
    if not rows:
        return "(no rows)"
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    cells = [[_cell(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(
            v.rjust(w) if _is_number(v) else v.ljust(w) for v, w in zip(values, widths, strict=True)
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(columns), rule, *(line(r) for r in cells)])


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def run_suites(names: Sequence[str], quick: bool, suites: dict[str, Suite]) -> tuple[dict, bool]:
    """Run ``names``; return ({suite: {"rows", "seconds", "error"}}, all_ok)."""
    results: dict[str, dict[str, Any]] = {}
    ok = True
    for name in names:
        print(f"\n== {name} {'(quick)' if quick else ''}", flush=True)
        start = time.perf_counter()
        try:
            rows = list(suites[name](quick))
            error = None
        except Exception:
            rows, error, ok = [], traceback.format_exc(), False
            print(error, file=sys.stderr, flush=True)
        seconds = time.perf_counter() - start
        if error is None:
            print(format_table(rows))
        print(f"({seconds:.1f} s)", flush=True)
        results[name] = {"rows": rows, "seconds": seconds, "error": error}
    return results, ok


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    try:
        return float(value)  # 0-d tensors, numpy scalars
    except (TypeError, ValueError):
        return str(value)


def _torch_version() -> str:
    try:
        import torch
    except ImportError:  # pragma: no cover
        return "none"
    return f"{torch.__version__} threads={torch.get_num_threads()}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    parser.add_argument("--suite", action="append", default=[], help="suite name or 'default'")
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    parser.add_argument("--json", default=str(DEFAULT_JSON), help="where to write all rows")
    parser.add_argument("--list", action="store_true", help="list the suites and exit")
    parser.add_argument(
        "--device", default=None, help="cpu or cuda, for the suites that support it"
    )
    args = parser.parse_args(argv)
    if args.device is not None:
        import torch

        if args.device.startswith("cuda") and not torch.cuda.is_available():
            parser.error("--device cuda but torch.cuda.is_available() is False")
        os.environ[DEVICE_VARIABLE] = args.device

    suites, default, errors = discover()
    for where, error in errors.items():
        print(f"could not load {where}:\n{error}", file=sys.stderr)
    if args.list or not args.suite:
        for name in sorted(suites):
            print(f"{name}{'  (default)' if name in default else ''}")
        return 1 if errors else 0

    names: list[str] = []
    for wanted in args.suite:
        for name in default if wanted == "default" else [wanted]:
            if name not in suites:
                parser.error(f"unknown suite {name!r}; --list shows the {len(suites)} suites")
            if name not in names:
                names.append(name)
    results, ok = run_suites(names, args.quick, suites)

    path = Path(args.json)
    os.makedirs(path.parent, exist_ok=True)
    payload = {
        "quick": args.quick,
        "python": sys.version.split()[0],
        "torch": _torch_version(),
        "device": bench_device(),
        "suites": results,
        "load_errors": errors,
    }
    path.write_text(json.dumps(_jsonable(payload), indent=2))
    print(f"\nwrote {path}")
    return 0 if ok and not errors else 1


if __name__ == "__main__":
    sys.exit(main())
