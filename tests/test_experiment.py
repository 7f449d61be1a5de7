"""The experiment harness's options: the tuning budget, ratios to Adam, the strided ResNet, the CLI."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

import benchmarks.experiment as experiment
import soo_func as sf
from benchmarks.data import load_dataset
from benchmarks.experiment_report import markdown_table, merge, reach_summary, retarget, with_ratios
from benchmarks.models import SmallResNet, make_model


@pytest.fixture(scope="module")
def digits():
    data = load_dataset("digits", seed=0)
    return data._replace(
        train_x=data.train_x[:300],
        train_y=data.train_y[:300],
        test_x=data.test_x[:100],
        test_y=data.test_y[:100],
    )


def test_tuning_budget_options_reach_every_tuning_run_and_not_the_final_runs(digits, monkeypatch):
    calls, averaging = [], []
    real_train = experiment.train

    def recording_train(method, knob, model, train_x, train_y, eval_x, eval_y, **kw):
        calls.append((method.name, len(train_y), len(eval_y), kw["epochs"], kw["evals_per_epoch"]))
        averaging.append((kw["epochs"], kw.get("track_average", True)))
        return real_train(method, knob, model, train_x, train_y, eval_x, eval_y, **kw)

    monkeypatch.setattr(experiment, "train", recording_train)
    rows, _ = experiment.run_experiment(
        digits,
        models=["mlp"],
        methods=["sgd", "adam"],
        seeds=2,
        epochs=1.0,
        target=0.5,
        validation=50,
        tune_epochs=0.5,
        tune_size=120,
        evals_per_epoch=4,
        verbose=False,
    )
    tuning = [c for c in calls if c[3] == 0.5]
    final = [c for c in calls if c[3] == 1.0]
    assert len(tuning) == 6 and len(final) == 4 and len(calls) == 10
    assert all(c[1:3] == (120, 50) for c in tuning)  # tune_size examples, validation split
    assert all(c[1:3] == (300, 100) for c in final)  # whole training set, test set
    assert all(c[4] == 4 for c in calls)
    assert [r["method"] for r in rows] == ["sgd", "adam"]
    # tuning reads only the iterate: the averaged params are tracked in the final runs only
    assert sorted(set(averaging)) == [(0.5, False), (1.0, True)]


def test_tuning_defaults_to_the_final_budget_on_all_remaining_examples(digits, monkeypatch):
    calls = []
    real_train = experiment.train

    def recording_train(method, knob, model, train_x, train_y, eval_x, eval_y, **kw):
        calls.append((len(train_y), kw["epochs"]))
        return real_train(method, knob, model, train_x, train_y, eval_x, eval_y, **kw)

    monkeypatch.setattr(experiment, "train", recording_train)
    experiment.run_experiment(
        digits, models=["mlp"], methods=["sgd"], seeds=1, epochs=0.5, target=0.5,
        validation=50, verbose=False,
    )  # fmt: skip
    assert calls[:3] == [(250, 0.5)] * 3 and calls[3] == (300, 0.5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"tune_size": 0}, "tune_size"),
        ({"tune_epochs": 0.0}, "tune_epochs"),
        ({"validation": 300}, "validation"),
        ({"seeds": 0}, "seeds"),
    ],
)
def test_run_experiment_rejects_bad_budgets(digits, kwargs, match):
    base = dict(models=["mlp"], methods=["sgd"], seeds=1, epochs=1.0, target=0.5, validation=50)
    with pytest.raises(ValueError, match=match):
        experiment.run_experiment(digits, **{**base, **kwargs}, verbose=False)


def test_on_row_sees_each_method_as_it_finishes_with_ratios_to_adam(digits):
    seen = []
    rows, _ = experiment.run_experiment(
        digits,
        models=["mlp"],
        methods=["adam", "sgd"],
        seeds=1,
        epochs=0.5,
        target=0.0,  # reached at the first evaluation
        validation=50,
        tune_epochs=0.25,
        tune_size=100,
        on_row=lambda rows, curves: seen.append(([r["method"] for r in rows], sorted(curves))),
        verbose=False,
    )
    assert seen == [(["adam"], ["mlp/adam"]), (["adam", "sgd"], ["mlp/adam", "mlp/sgd"])]
    adam, sgd = rows
    assert adam["epochs_ratio_vs_adam"] == 1.0 and adam["seconds_ratio_vs_adam"] == 1.0
    assert sgd["epochs_ratio_vs_adam"] == 1.0  # both reach target 0 at the first evaluation
    assert sgd["seconds_ratio_vs_adam"] == pytest.approx(
        sgd["seconds_to_target"] / adam["seconds_to_target"]
    )


def test_on_row_sees_every_seed_so_a_cut_off_run_keeps_the_finished_seeds(digits):
    seen = []
    rows, curves = experiment.run_experiment(
        digits,
        models=["mlp"],
        methods=["adam", "sgd"],
        seeds=2,
        first_seed=3,
        epochs=0.25,
        target=0.0,
        validation=50,
        tune_epochs=0.25,
        tune_size=100,
        on_row=lambda rows, curves: seen.append(
            ([(r["method"], r["reached"]) for r in rows],
             {k: [run["seed"] for run in v] for k, v in curves.items()})
        ),
        verbose=False,
    )  # fmt: skip
    assert [s[0] for s in seen] == [
        [("adam", "1/1")],
        [("adam", "2/2")],
        [("adam", "2/2"), ("sgd", "1/1")],
        [("adam", "2/2"), ("sgd", "2/2")],
    ]
    assert seen[0][1] == {"mlp/adam": [3]}
    assert seen[2][1] == {"mlp/adam": [3, 4], "mlp/sgd": [3]}
    # the last call is the finished experiment
    assert seen[-1] == ([(r["method"], r["reached"]) for r in rows],
                        {k: [run["seed"] for run in v] for k, v in curves.items()})  # fmt: skip


def test_with_ratios_by_model_and_nan_when_a_side_never_reached():
    nan = math.nan
    rows = [
        {"model": "a", "method": "adam", "epochs_to_target": 4.0, "seconds_to_target": 10.0},
        {"model": "a", "method": "hf", "epochs_to_target": 2.0, "seconds_to_target": 50.0},
        {"model": "b", "method": "hf", "epochs_to_target": 1.0, "seconds_to_target": 5.0},
        {"model": "b", "method": "adam", "epochs_to_target": nan, "seconds_to_target": nan},
        {"model": "c", "method": "hf", "epochs_to_target": 1.0, "seconds_to_target": 5.0},
    ]
    with_ratios(rows)
    assert (rows[1]["epochs_ratio_vs_adam"], rows[1]["seconds_ratio_vs_adam"]) == (0.5, 5.0)
    assert rows[0]["epochs_ratio_vs_adam"] == 1.0
    assert math.isnan(rows[2]["epochs_ratio_vs_adam"])  # adam on b never reached
    assert math.isnan(rows[4]["seconds_ratio_vs_adam"])  # no adam row for c


def test_strided_stem_resnet_quarters_the_feature_maps_and_keeps_the_parameters():
    x = torch.randn(2, 1, 28, 28)
    plain, strided = make_model("resnet", width=4), make_model("resnet_s2", width=4)
    assert plain(x).shape == strided(x).shape == (2, 10)
    assert [p.shape for p in plain.parameters()] == [p.shape for p in strided.parameters()]
    assert plain.stem(x).shape[-2:] == (28, 28) and strided.stem(x).shape[-2:] == (14, 14)
    with pytest.raises(ValueError, match="stem_stride"):
        SmallResNet(stem_stride=3)
    with pytest.raises(ValueError, match="resnet_s2"):
        make_model("vgg")


def test_cli_records_the_budget_and_writes_partial_and_final_results(tmp_path, monkeypatch):
    monkeypatch.setattr(experiment, "RESULTS", tmp_path)
    monkeypatch.setattr(
        experiment, "load_dataset", lambda *a, **k: load_dataset("digits", train_size=300)
    )
    rows = experiment.main(
        ["--quick", "--methods", "sgd", "adam", "--seeds", "1", "--epochs", "0.5",
         "--tune-epochs", "0.25", "--tune-size", "100", "--evals-per-epoch", "3", "--tag", "t"]
    )  # fmt: skip
    assert [r["method"] for r in rows] == ["sgd", "adam"]
    record = json.loads((tmp_path / "deep_t.json").read_text())
    partial = json.loads((tmp_path / "deep_t_partial.json").read_text())
    assert record["config"]["tune_epochs"] == 0.25 and record["config"]["tune_size"] == 100
    assert record["config"]["evals_per_epoch"] == 3 and record["config"]["epochs"] == 0.5
    assert [r["method"] for r in partial["rows"]] == ["sgd", "adam"]
    assert "seconds_ratio_vs_adam" in record["rows"][0]
    assert (tmp_path / "deep_t.png").stat().st_size > 0


def test_markdown_table_prints_mean_sd_ratios_and_dashes_for_never_reached():
    nan = math.nan
    base = {"model": "m", "tuned": "lr=0.001", "sec_per_epoch": 9.44, "acc_sd": 0.001}
    rows = with_ratios(
        [
            {**base, "method": "adam", "reached": "3/3", "epochs_to_target": 4.5,
             "epochs_sd": 0.25, "seconds_to_target": 40.0, "seconds_sd": 2.0,
             "epochs_median": 4.25, "final_test_acc": 0.9012},
            {**base, "method": "hf", "reached": "0/3", "epochs_to_target": nan,
             "epochs_sd": nan, "seconds_to_target": nan, "seconds_sd": nan,
             "final_test_acc": 0.8875},
        ]
    )  # fmt: skip
    lines = markdown_table(rows, 0.9).splitlines()
    assert lines[0].startswith(
        "| model | method | tuned | reached 0.9 | median epochs | epochs to 0.9 |"
    )
    assert len(lines) == 4 and lines[1].count("---") == 11
    assert lines[2] == (
        "| m | adam | lr=0.001 | 3/3 | 4.25 | 4.50 ± 0.25 | 40 ± 2 | 1.00x | 1.00x | 9.4 "
        "| 0.9012 ± 0.0010 |"
    )
    assert lines[3] == "| m | hf | lr=0.001 | 0/3 | - | - | - | - | - | 9.4 | 0.8875 ± 0.0010 |"


def test_retarget_recomputes_reach_from_the_curves_and_the_cli_prints_it(tmp_path):
    from benchmarks.experiment_report import main

    def run(accuracy):
        return {"epochs": [0.5, 1.0, 1.5], "seconds": [10.0, 20.0, 30.0], "accuracy": accuracy}

    curves = {
        "m/adam": [run([0.5, 0.8, 0.9]), run([0.7, 0.85, 0.88])],
        "m/hf": [run([0.86, 0.9, 0.91]), run([0.8, 0.9, 0.9])],
    }
    rows = [
        {"model": "m", "method": name, "tuned": "x=1", "sec_per_epoch": 20.0,
         "final_test_acc": 0.9, "acc_sd": 0.0, "reached": "?", "epochs_to_target": 0.0,
         "epochs_sd": 0.0, "seconds_to_target": 0.0, "seconds_sd": 0.0}
        for name in ("adam", "hf")
    ]  # fmt: skip
    adam, hf = retarget(rows, curves, 0.85)
    assert (adam["reached"], adam["epochs_to_target"], adam["seconds_to_target"]) == (
        "2/2",
        1.25,
        25.0,
    )
    assert (hf["reached"], hf["epochs_to_target"], hf["seconds_to_target"]) == ("2/2", 0.75, 15.0)
    assert hf["epochs_ratio_vs_adam"] == 0.6 and rows[0]["reached"] == "?"  # rows not mutated
    adam, hf = retarget(rows, curves, 0.9)
    assert (adam["reached"], adam["epochs_to_target"], adam["epochs_sd"]) == ("1/2", 1.5, 0.0)
    assert hf["epochs_to_target"] == 1.0 and hf["epochs_ratio_vs_adam"] == pytest.approx(2 / 3)
    path = tmp_path / "record.json"
    path.write_text(json.dumps({"config": {"target": 0.9}, "rows": rows, "curves": curves}))
    assert "| m | hf | x=1 | 2/2 | 0.75 | 0.75 ± 0.35 |" in main([str(path), "--target", "0.85"])
    # One seed of two never reached 0.9: the median over all seeds is "never" (a dash).
    assert "| m | adam | x=1 | 1/2 | - | 1.50 ± 0.00 |" in main([str(path)])
    # Ratios to another peer: hf's 0.75 epochs over hf's own 0.75 is 1.00x.
    assert "| 0.75 ± 0.35 | 15 ± 7 | 1.00x | 1.00x |" in main(
        [str(path), "--target", "0.85", "--peer", "hf"]
    )
    with pytest.raises(SystemExit):
        main([str(path), "--peer", "adam_cosine"])


def test_reach_summary_median_counts_seeds_that_never_reach_as_never():
    def run(accuracy):
        return {"epochs": [1.0, 2.0, 3.0], "seconds": [5.0, 10.0, 15.0], "accuracy": accuracy}

    never, at_two, at_three = run([0.8, 0.8, 0.8]), run([0.8, 0.9, 0.9]), run([0.8, 0.8, 0.95])
    summary = reach_summary([at_two, never, at_three], 0.9)
    assert summary["reached"] == "2/3" and summary["epochs_median"] == 3.0
    assert summary["epochs_to_target"] == 2.5 and summary["seconds_median"] == 15.0
    lucky = reach_summary([at_two, never, never], 0.9)
    assert lucky["epochs_to_target"] == 2.0 and math.isnan(lucky["epochs_median"])


def test_merge_joins_split_runs_and_refuses_different_experiments(tmp_path):
    from benchmarks.experiment_report import main

    def record(method, epochs_to_target, **config):
        curve = {"epochs": [1.0, 2.0], "seconds": [1.0, 2.0], "accuracy": [0.5, 0.95]}
        row = {
            "model": "m",
            "method": method,
            "tuned": "x=1",
            "reached": "1/1",
            "epochs_to_target": epochs_to_target,
            "epochs_sd": 0.0,
            "seconds_to_target": 2.0,
            "seconds_sd": 0.0,
            "sec_per_epoch": 1.0,
            "final_test_acc": 0.95,
            "acc_sd": 0.0,
        }
        cfg = {"target": 0.9, "epochs": 2.0, "width": 16, "methods": [method], **config}
        return {"config": cfg, "device": "cpu", "rows": [row], "curves": {f"m/{method}": [curve]}}

    merged = merge([record("adam", 2.0), record("hf", 1.0)])
    assert [r["method"] for r in merged["rows"]] == ["adam", "hf"]
    assert merged["config"]["methods"] == ["adam", "hf"] and set(merged["curves"]) == {
        "m/adam",
        "m/hf",
    }
    assert merged["rows"][1]["epochs_ratio_vs_adam"] == 0.5
    with pytest.raises(ValueError, match=r"differ in \['width'\]"):
        merge([record("adam", 2.0), record("hf", 1.0, width=8)])
    paths = []
    for method in ("adam", "hf"):
        paths.append(tmp_path / f"{method}.json")
        paths[-1].write_text(json.dumps(record(method, 2.0)))
    out = tmp_path / "merged.json"
    table = main([*map(str, paths), "--save", str(out), "--plot", str(tmp_path / "m.png")])
    assert "| m | hf |" in table and "| m | adam |" in table
    assert json.loads(out.read_text())["config"]["methods"] == ["adam", "hf"]
    assert (tmp_path / "m.png").stat().st_size > 0


def test_merge_pools_seeds_split_across_processes():
    def record(seeds, reach_epoch, tuned="lr=0.001", first_seed=0):
        runs = []
        for seed in seeds:
            accuracy = [0.95 if e >= reach_epoch else 0.5 for e in (1.0, 2.0, 3.0)]
            runs.append({"seed": seed, "epochs": [1.0, 2.0, 3.0], "seconds": [2.0, 4.0, 6.0],
                         "accuracy": accuracy, "diverged": False})  # fmt: skip
        from benchmarks.experiment_report import summarize_runs

        row = {"model": "m", "method": "adam", "tuned": tuned, **summarize_runs(runs, 0.9)}
        cfg = {"target": 0.9, "epochs": 3.0, "methods": ["adam"], "seeds": len(seeds),
               "first_seed": first_seed}  # fmt: skip
        return {"config": cfg, "device": "cpu", "rows": [row], "curves": {"m/adam": runs}}

    early, late = record([0, 1, 2], 1.0), record([3, 4, 5], 3.0, first_seed=3)
    (row,) = merge([early, late])["rows"]
    assert row["reached"] == "6/6" and row["epochs_to_target"] == 2.0
    assert row["epochs_median"] == 2.0 and row["sec_per_epoch"] == 2.0
    assert early["rows"][0]["reached"] == "3/3"  # inputs not mutated
    with pytest.raises(ValueError, match="seed repeated"):
        merge([early, record([2, 3], 3.0)])
    with pytest.raises(ValueError, match=r"tuned to lr=0\.001 in one record and lr=0\.003"):
        merge([early, record([3, 4, 5], 3.0, tuned="lr=0.003")])


def test_experiment_checks_cli_trains_one_seed(capsys):
    from benchmarks.experiment_checks import main

    accuracy = main(["adam", "--train-size", "600", "--epochs", "0.5", "--width", "4"])
    assert len(accuracy) == 2 and all(0 <= a <= 1 for a in accuracy)
    assert "adam lr=0.001 width 4 seed 0" in capsys.readouterr().out  # the tuned value
    main(["adam", "--value", "0.003", "--train-size", "600", "--epochs", "0.25", "--width", "4"])
    assert "adam lr=0.003 width 4 seed 0" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["gauss_newton_armijo_b250_cosine", "hessian_free_b250_cosine"])
def test_cosine_decay_spans_exactly_the_updates_of_the_run(digits, monkeypatch, name):
    """The decaying methods' horizon is the number of updates train makes: the multiplier of
    the last update is the schedule's last nonzero value, and no update runs past it."""
    seen = []
    real_scale = sf.scale_by_schedule

    def recording_scale(schedule):
        real = real_scale(schedule)

        def update(updates, state, params=None, **extra):
            seen.append(float(schedule(state.count)))
            return real.update(updates, state, params)

        return sf.Transform(real.init, update)

    method = experiment.available_methods()[name]
    method = dataclasses.replace(method, batch_size=64, curvature_size=16)
    monkeypatch.setattr(sf, "scale_by_schedule", recording_scale)
    run = experiment.train(method, 0.1, "mlp", digits.train_x, digits.train_y, digits.test_x,
                           digits.test_y, epochs=1.5, seed=0)  # fmt: skip
    updates = experiment._num_updates(method, 0.1, len(digits.train_y), 1.5)
    assert updates == math.ceil(1.5 * 300 / 64) == len(seen)
    closed_form = [0.5 * (1 + math.cos(math.pi * k / updates)) for k in range(updates)]
    assert seen == pytest.approx(closed_form) and seen[-1] > 0
    assert not run.diverged and run.epochs[-1] == pytest.approx(len(seen) * 64 / 300)


def test_torch_baselines_with_cosine_decay_end_at_a_vanishing_learning_rate(digits, monkeypatch):
    rates = []
    real_step = torch.optim.lr_scheduler.LambdaLR.step

    def recording_step(self, *args):
        real_step(self, *args)
        rates.append(self.optimizer.param_groups[0]["lr"])

    monkeypatch.setattr(torch.optim.lr_scheduler.LambdaLR, "step", recording_step)
    method = experiment.available_methods()["adam_cosine"]
    experiment.train(method, 1e-3, "mlp", digits.train_x, digits.train_y, digits.test_x,
                     digits.test_y, epochs=1.0, seed=0)  # fmt: skip
    # LambdaLR sets the first rate when built, then one step after each update: the k-th
    # update ran at schedule(k), and the last at schedule(updates - 1) > 0.
    updates = math.ceil(300 / 128)
    assert len(rates) == 1 + updates
    schedule = sf.cosine_decay_schedule(1e-3, updates)
    assert rates == pytest.approx([float(schedule(torch.tensor(k))) for k in range(updates + 1)])
    assert rates[-2] > 0 and rates[-1] == 0.0


def test_params_average_is_the_debiased_exponential_average():
    """Against the explicit weighted mean: after updates with fractions f_1..f_k the weight
    of p_i is f_i * prod_{j > i} (1 - f_j), normalized to sum to one."""
    torch.manual_seed(0)
    points = [{"w": torch.randn(3), "b": torch.randn(())} for _ in range(5)]
    fractions = [0.3, 0.3, 0.5, 0.1, 1.0 / 3]
    average = experiment.ParamsAverage(points[0])
    for p, f in zip(points, fractions, strict=True):
        average.update(p, f)
    weights = [f * math.prod(1 - g for g in fractions[i + 1 :]) for i, f in enumerate(fractions)]
    for key in ("w", "b"):
        expected = sum(w * p[key] for w, p in zip(weights, points, strict=True)) / sum(weights)
        torch.testing.assert_close(average.value()[key], expected)
    constant = experiment.ParamsAverage(points[0])
    for _ in range(3):
        constant.update(points[0], 0.01)
    torch.testing.assert_close(constant.value()["w"], points[0]["w"])  # no pull towards zero
    assert points[0]["w"].data_ptr() != average.value()["w"].data_ptr()


def test_train_evaluates_the_averaged_params_alongside_the_iterate(digits):
    method = experiment.available_methods()["sgd"]
    run = experiment.train(method, 0.03, "mlp", digits.train_x, digits.train_y, digits.test_x,
                           digits.test_y, epochs=2.0, seed=0, evals_per_epoch=2)  # fmt: skip
    assert len(run.averaged_accuracy) == len(run.accuracy) == 4
    assert all(0 <= a <= 1 for a in run.averaged_accuracy)
    assert run.averaged_accuracy != run.accuracy
    plain = experiment.train(method, 0.03, "mlp", digits.train_x, digits.train_y, digits.test_x,
                             digits.test_y, epochs=2.0, seed=0, evals_per_epoch=2,
                             track_average=False)  # fmt: skip
    assert plain.averaged_accuracy == [] and plain.accuracy == run.accuracy


def test_report_averaged_reads_the_averaged_curves_and_names_old_records(tmp_path):
    from benchmarks.experiment_report import main, summarize_runs

    def run(accuracy, averaged):
        return {"epochs": [1.0, 2.0], "seconds": [5.0, 10.0], "accuracy": accuracy,
                "averaged_accuracy": averaged}  # fmt: skip

    curves = {"m/adam": [run([0.8, 0.9], [0.9, 0.95])]}
    row = {"model": "m", "method": "adam", "tuned": "lr=1",
           **summarize_runs(curves["m/adam"], 0.9)}  # fmt: skip
    path = tmp_path / "record.json"
    path.write_text(json.dumps({"config": {"target": 0.9}, "rows": [row], "curves": curves}))
    assert "| m | adam | lr=1 | 1/1 | 2.00 | 2.00 ± 0.00 |" in main([str(path)])
    averaged = main([str(path), "--averaged"])
    assert "| 1/1 | 1.00 | 1.00 ± 0.00 |" in averaged and "0.9500 ± 0.0000" in averaged
    del curves["m/adam"][0]["averaged_accuracy"]
    path.write_text(json.dumps({"config": {"target": 0.9}, "rows": [row], "curves": curves}))
    with pytest.raises(SystemExit):
        main([str(path), "--averaged"])
