"""The benchmark runner: discovery, tables, JSON, and a failing suite that does not stop the rest."""

from __future__ import annotations

import json
import re

import pytest

from benchmarks import run


def test_format_table_aligns_columns():
    rows = [{"name": "a", "value": 1.5, "ok": True}, {"name": "longer", "value": 1e-9}]
    lines = run.format_table(rows).splitlines()
    assert lines[0].split() == ["name", "value", "ok"]
    rule_starts = [m.start() for m in re.finditer(r"-+", lines[1])]
    header_starts = [m.start() for m in re.finditer(r"\S+", lines[0])]
    assert header_starts[0] == rule_starts[0] and header_starts[2] == rule_starts[2]
    assert lines[2].index("yes") == rule_starts[2]  # text is left-aligned under its rule
    assert "1.000e-09" in lines[3] and "yes" in lines[2]
    assert run.format_table([]) == "(no rows)"


def test_discover_finds_the_bundled_suites():
    suites, default, errors = run.discover()
    assert not errors, errors
    assert {"classic", "oracles"} <= set(suites)
    assert {"classic_quick", "oracles_quick"} <= set(default)
    assert set(default) <= set(suites)


def test_failing_suite_is_reported_and_the_rest_run(capsys):
    def good(quick):
        return [{"quick": quick, "x": 1}]

    def bad(quick):
        raise RuntimeError("boom")

    results, ok = run.run_suites(["bad", "good"], True, {"bad": bad, "good": good})
    assert not ok
    assert "RuntimeError: boom" in results["bad"]["error"]
    assert results["good"]["rows"] == [{"quick": True, "x": 1}]
    captured = capsys.readouterr()
    assert "boom" in captured.err and "quick" in captured.out


def test_main_writes_json_and_exit_code(tmp_path, monkeypatch):
    monkeypatch.setattr(
        run,
        "discover",
        lambda: (
            {"ok": lambda q: [{"v": float("inf")}], "bad": lambda q: 1 / 0},
            ["ok"],
            {},
        ),
    )
    path = tmp_path / "out.json"
    assert run.main(["--suite", "default", "--quick", "--json", str(path)]) == 0
    payload = json.loads(path.read_text())
    assert payload["quick"] is True and payload["suites"]["ok"]["rows"] == [{"v": "inf"}]
    assert run.main(["--suite", "ok", "--suite", "bad", "--json", str(path)]) == 1
    assert "ZeroDivisionError" in json.loads(path.read_text())["suites"]["bad"]["error"]
    with pytest.raises(SystemExit):
        run.main(["--suite", "nope", "--json", str(path)])


def test_device_option_reaches_the_suites(tmp_path, monkeypatch):
    import torch

    monkeypatch.delenv(run.DEVICE_VARIABLE, raising=False)
    assert run.bench_device() == "cpu"
    seen = []
    monkeypatch.setattr(
        run, "discover", lambda: ({"s": lambda q: seen.append(run.bench_device()) or []}, [], {})
    )
    path = tmp_path / "out.json"
    assert run.main(["--suite", "s", "--device", "cpu", "--json", str(path)]) == 0
    assert seen == ["cpu"] and json.loads(path.read_text())["device"] == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            run.main(["--suite", "s", "--device", "cuda", "--json", str(path)])
