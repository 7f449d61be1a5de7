"""Reporting for :mod:`benchmarks.experiment`: ratios to a peer, text and Markdown tables, plots.

The README's table is printed from saved records by::

    python -m benchmarks.experiment_report benchmarks/results/deep_full_cpu10.json [--target 0.89]

(``--peer adam_cosine``: ratios to another method; ``--averaged``: the accuracy of the
averaged parameters; ``--target``: recompute the epochs and seconds to another accuracy
from the saved curves; several records of one command split across processes by
``--methods`` or ``--first-seed`` are merged (:func:`merge`), and ``--plot``/``--save``
write the merged curves and record.)
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

__all__ = ["averaged_view", "first_reaching", "format_table", "markdown_table", "merge", "plot",
           "reach_summary", "retarget", "spread", "summarize_runs", "with_ratios"]  # fmt: skip


def spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation of the finite ``values`` (NaN, NaN when none)."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    return statistics.mean(finite), (statistics.stdev(finite) if len(finite) > 1 else 0.0)


def first_reaching(epochs, seconds, accuracy, target: float) -> tuple[float, float]:
    """``(epoch, seconds)`` of the first evaluation with accuracy >= ``target``, else NaNs."""
    for e, s, a in zip(epochs, seconds, accuracy, strict=True):
        if a >= target:
            return e, s
    return math.nan, math.nan


def reach_summary(runs: list[dict], target: float) -> dict:
    """How the ``runs`` (dicts with ``epochs``, ``seconds``, ``accuracy``) reach ``target``.

    ``epochs_to_target`` / ``seconds_to_target``: mean and sd over the seeds that reached it;
    ``epochs_median`` / ``seconds_median``: median over *all* seeds, a seed that never
    reached it counting as never (NaN when fewer than half reached it), so one lucky
    seed cannot stand for a method.
    """
    reach = [first_reaching(r["epochs"], r["seconds"], r["accuracy"], target) for r in runs]
    e_mean, e_sd = spread([e for e, _ in reach])
    t_mean, t_sd = spread([t for _, t in reach])

    def median(values: list[float]) -> float:
        m = statistics.median([v if math.isfinite(v) else math.inf for v in values])
        return m if math.isfinite(m) else math.nan

    reached = sum(math.isfinite(e) for e, _ in reach)
    return {"reached": f"{reached}/{len(runs)}", "epochs_to_target": e_mean, "epochs_sd": e_sd,
            "seconds_to_target": t_mean, "seconds_sd": t_sd,
            "epochs_median": median([e for e, _ in reach]),
            "seconds_median": median([t for _, t in reach])}  # fmt: skip


def retarget(rows: list[dict], curves: dict, target: float, peer: str = "adam") -> list[dict]:
    """Copies of ``rows`` with their numbers (:func:`summarize_runs`) recomputed for
    ``target`` from the saved accuracy ``curves`` (``{"model/method": [run dicts]}``), with
    ratios to ``peer``."""
    out = [
        {**row, **summarize_runs(curves[f"{row['model']}/{row['method']}"], target)} for row in rows
    ]
    return with_ratios(out, peer)


def averaged_view(record: dict) -> dict:
    """A copy of ``record`` whose curves' ``accuracy`` is the accuracy of the averaged
    parameters (``averaged_accuracy``, :class:`benchmarks.experiment.ParamsAverage`)."""
    curves = {}
    for key, runs in record["curves"].items():
        if any("averaged_accuracy" not in r for r in runs):
            raise ValueError(
                f"{key} has no averaged_accuracy curve: the record predates parameter averaging "
                "(rerun it with the current benchmarks.experiment, or drop --averaged)"
            )
        curves[key] = [{**r, "accuracy": r["averaged_accuracy"]} for r in runs]
    return {**record, "curves": curves}


def summarize_runs(runs: list[dict], target: float) -> dict:
    """A table row's numbers from the ``runs`` of one method (dicts with ``epochs``,
    ``seconds``, ``accuracy``, ``diverged``): :func:`reach_summary`, the final test accuracy
    (mean, sd), the seconds per epoch and how many runs diverged."""
    acc_mean, acc_sd = spread([r["accuracy"][-1] if r["accuracy"] else math.nan for r in runs])
    per_epoch, _ = spread(
        [r["seconds"][-1] / r["epochs"][-1] if r["epochs"] else math.nan for r in runs]
    )
    return {**reach_summary(runs, target), "final_test_acc": acc_mean, "acc_sd": acc_sd,
            "sec_per_epoch": per_epoch,
            "diverged": sum(bool(r.get("diverged")) for r in runs)}  # fmt: skip


def merge(records: list[dict]) -> dict:
    """One record from several runs of the same experiment: methods run in parallel
    processes (``--methods``) and seeds split across processes (``--first-seed``).

    The configurations must agree except for ``methods``, ``seeds`` and ``first_seed``; a
    method in several records must have been tuned to the same value, its runs are pooled
    (distinct seeds) and its row recomputed by :func:`summarize_runs`.
    """
    ignored = {"methods", "seeds", "first_seed"}
    first = {k: v for k, v in records[0]["config"].items() if k not in ignored}
    for other in records[1:]:
        config = {k: v for k, v in other["config"].items() if k not in ignored}
        differ = sorted(k for k in set(first) | set(config) if first.get(k) != config.get(k))
        if differ or other.get("device") != records[0].get("device"):
            raise ValueError(
                "cannot merge records of different experiments: they differ in "
                f"{differ or ['device']}; merge only runs of one command split by --methods "
                "or --first-seed"
            )
    rows: dict[str, dict] = {}
    curves: dict[str, list] = {}
    for record in records:
        for row in record["rows"]:
            key = f"{row['model']}/{row['method']}"
            if key in rows and rows[key]["tuned"] != row["tuned"]:
                raise ValueError(
                    f"cannot pool {key}: tuned to {rows[key]['tuned']} in one record and "
                    f"{row['tuned']} in another"
                )
            runs = curves.get(key, []) + record["curves"][key]
            seeds = [r.get("seed") for r in runs]
            if key in rows and len(set(seeds)) != len(seeds):
                raise ValueError(f"cannot pool {key}: seed repeated in {seeds}")
            curves[key] = runs
            rows[key] = {**row, **summarize_runs(runs, first["target"])} if key in rows else row
    methods = list(dict.fromkeys(r["method"] for r in rows.values()))
    seeds = max(len(runs) for runs in curves.values())
    return {"config": {**records[0]["config"], "methods": methods, "seeds": seeds},
            "device": records[0].get("device"), "rows": with_ratios(list(rows.values())),
            "curves": curves}  # fmt: skip


def with_ratios(rows: list[dict], peer: str = "adam") -> list[dict]:
    """Add ``epochs_ratio_vs_<peer>`` and ``seconds_ratio_vs_<peer>`` (same model; NaN when
    either side never reached the target) to every row, in place; returns ``rows``."""
    peers = {r["model"]: r for r in rows if r["method"] == peer}
    for r in rows:
        p = peers.get(r["model"])
        for key in ("epochs_to_target", "seconds_to_target"):
            ok = p is not None and math.isfinite(p[key]) and p[key] > 0
            r[f"{key.split('_')[0]}_ratio_vs_{peer}"] = r[key] / p[key] if ok else math.nan
    return rows


def plot(curves: dict, target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({k.split("/")[0] for k in curves})
    fig, axes = plt.subplots(len(models), 2, figsize=(11, 4 * len(models)), squeeze=False)
    for row, model in enumerate(models):
        for key, runs in curves.items():
            if not key.startswith(model + "/"):
                continue
            for i, r in enumerate(runs):
                label = key.split("/")[1] if i == 0 else None
                color = f"C{sorted(curves).index(key) % 10}"
                axes[row, 0].plot(r["epochs"], r["accuracy"], color=color, alpha=0.7, label=label)
                axes[row, 1].plot(r["seconds"], r["accuracy"], color=color, alpha=0.7, label=label)
        for col, xlabel in enumerate(("epochs", "training seconds")):
            ax = axes[row, col]
            ax.axhline(target, color="k", ls=":", lw=1)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("test accuracy")
            ax.set_title(model)
            ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def format_table(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    cells = [
        [f"{r.get(k, ''):.4g}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys]
        for r in rows
    ]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    lines = ["  ".join(k.ljust(w) for k, w in zip(keys, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(cell, widths, strict=True)) for cell in cells]
    return "\n".join(lines)


def _mean_sd(mean: float, sd: float, digits: int) -> str:
    if not math.isfinite(mean):
        return "-"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def _ratio(value: float) -> str:
    return f"{value:.2f}x" if math.isfinite(value) else "-"


def markdown_table(rows: list[dict], target: float, peer: str = "adam") -> str:
    """The rows as a Markdown table: seeds that reached ``target``, the median epochs to it
    over all seeds (:func:`reach_summary`), epochs and seconds to it (mean ± sd over the
    seeds that reached it), their ratios to ``peer``, seconds per epoch, final accuracy."""
    head = [
        "model", "method", "tuned", f"reached {target:g}", "median epochs",
        f"epochs to {target:g}", f"seconds to {target:g}", f"epochs vs {peer}",
        f"seconds vs {peer}", "s / epoch", "final test acc",
    ]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        median = r.get("epochs_median", math.nan)
        cells = [
            r["model"],
            r["method"],
            r["tuned"],
            r["reached"],
            f"{median:.2f}" if math.isfinite(median) else "-",
            _mean_sd(r["epochs_to_target"], r["epochs_sd"], 2),
            _mean_sd(r["seconds_to_target"], r["seconds_sd"], 0),
            _ratio(r.get(f"epochs_ratio_vs_{peer}", math.nan)),
            _ratio(r.get(f"seconds_ratio_vs_{peer}", math.nan)),
            f"{r['sec_per_epoch']:.1f}",
            _mean_sd(r["final_test_acc"], r["acc_sd"], 4),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "records", nargs="+", help="deep_<tag>.json files written by benchmarks.experiment "
        "(several: runs of one command split by --methods or --first-seed, merged)",
    )  # fmt: skip
    parser.add_argument("--target", type=float, help="default: the run's own target")
    parser.add_argument(
        "--peer", default="adam", help="the method the ratios compare with (default adam; "
        "e.g. adam_cosine for the runs with a decaying step)",
    )  # fmt: skip
    parser.add_argument(
        "--averaged", action="store_true", help="the accuracy of the averaged parameters "
        "(a moving average over one epoch) instead of the last iterate's",
    )  # fmt: skip
    parser.add_argument("--plot", type=Path, help="also plot the (merged) curves to this PNG")
    parser.add_argument("--save", type=Path, help="also write the merged record to this JSON")
    args = parser.parse_args(argv)
    records = []
    for path in args.records:
        with open(path) as f:
            records.append(json.load(f))
    record = merge(records)
    try:
        view = averaged_view(record) if args.averaged else record
    except ValueError as error:
        parser.error(str(error))
    target = record["config"]["target"] if args.target is None else args.target
    methods = {row["method"] for row in record["rows"]}
    if args.peer not in methods:
        parser.error(f"--peer {args.peer} is not among the record's methods {sorted(methods)}")
    rows = retarget(view["rows"], view["curves"], target, args.peer)
    table = markdown_table(rows, target, args.peer)
    print(table)
    if args.plot:
        plot(view["curves"], target, args.plot)
    if args.save:
        with open(args.save, "w") as f:
            json.dump(record, f)
    return table


if __name__ == "__main__":
    main()
