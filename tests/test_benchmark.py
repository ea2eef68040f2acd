"""Issue 12 items 5-6: one command runs a benchmark protocol and `report` writes its results page.

A tiny digits benchmark (written by the test: two teachers fine-tuned for one epoch on 100
images per class - enough to disagree -, two rows x two seeds of one-epoch students on 20 images
per class) run in-process through the entry point
in one temporary MLflow store: first one run of it alone (an interrupted benchmark), then the
whole benchmark, then the same command again. The page's numbers are checked against the runs
in the store; the unknown-row refusal runs as a subprocess (its exit code is the point).
"""
from __future__ import annotations

import contextlib
import io
import re
import shutil
import statistics
from datetime import datetime, timezone

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.pipeline_helpers import all_runs, run_module, use_isolated_store

TINY = {
    "name": "tiny-digits", "title": "Tiny digits benchmark",
    "data": {"dataset": "digits"},
    "teachers": [{"teacher": t, "overrides": ["finetune_epochs=1", "dataset.train_per_class=100"]}
                 for t in ("resnet20", "wrn_16_2")],
    "seeds": [0, 1],
    "common": ["dataset=digits", "teacher1=resnet20", "teacher2=wrn_16_2", "student=resnet8",
               "experiment.student_epochs_per_stage=[1]", "experiment.dataset.train_per_class=20",
               "experiment.dataset.batch_size=64", "experiment.eval_batch_size=256", "experiment.log_model=false",
               "experiment.compute_teacher_eval=false"],
    "rows": [{"name": "CE-only", "exp": "quickstart", "overrides": ["method=ce"]},
             {"name": "KD (wrn_16_2)", "exp": "quickstart",
              "overrides": ["experiment.kd_target=teacher", "experiment.kd_teacher_index=1"]},
             {"name": "L0", "exp": "L0_baseline",      # an ASIB rung without A-step: the cost reference
              "overrides": ["experiment.num_stages=2", "experiment.student_epochs_per_stage=[1,1]",
                            "experiment.kd_warmup_epochs=1", "experiment.schedule.lr_warmup_epochs=1",
                            "experiment.loss_clamp_warmup_epochs=1", "experiment.dataset.num_workers=0"]},
             {"name": "L1 IB", "exp": "L1_ib",          # two stages of one A-step and one B-step epoch
              "overrides": ["experiment.num_stages=2", "experiment.student_epochs_per_stage=[1,1]",
                            "experiment.teacher_adapt_epochs=1", "experiment.ib_epochs_per_stage=1",
                            "experiment.synergy_only_epochs=1", "experiment.kd_warmup_epochs=1",
                            "experiment.teacher_adapt_kd_warmup=1", "experiment.schedule.lr_warmup_epochs=1",
                            "experiment.loss_clamp_warmup_epochs=1", "experiment.dataset.num_workers=0"]}],
    # claims the page checks: one met whatever the runs give, one never met
    "targets": [{"rows": ["KD (wrn_16_2)", "L1 IB"], "over": "CE-only", "by": -100.0, "source": "always"},
                {"row": "L0", "over": ["CE-only", "KD (wrn_16_2)"], "by": 100.0, "source": "never"}],
}
TRAINING_STEPS = ("finetune", "distill", "bench_teachers")


def _bench(argv: list[str]) -> str:
    from pipelines.benchmark import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0
    return out.getvalue()


def _training_runs(work) -> dict[str, str]:
    return {r.info.run_id: r.data.tags.get("step") for r in all_runs(work) if r.data.tags.get("step") in TRAINING_STEPS}


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    work = tmp_path_factory.mktemp("benchmark")
    spec = work / "tiny.yaml"
    spec.write_text(yaml.safe_dump(TINY), encoding="utf-8")
    args = [f"name={spec}", "out=results"]
    with pytest.MonkeyPatch.context() as mp:
        use_isolated_store(mp, work)
        partial = _bench([*args, "rows=CE-only", "seeds=0", "report=false"])   # stopped after one run
        first = _bench([*args, f"archive={work / 'live-archive'}"])
        after_first = _training_runs(work)
        second = _bench(args)
        yield {"work": work, "spec": spec, "partial": partial, "first": first, "second": second,
               "after_first": after_first, "after_second": _training_runs(work)}


def _distill_runs(work) -> list:
    return [r for r in all_runs(work) if r.data.tags.get("step") == "distill" and r.info.status == "FINISHED"]


def test_results_page_has_every_row_with_the_numbers_of_the_store(bench):
    runs = _distill_runs(bench["work"])
    assert len(runs) == 8 and all(r.data.tags["asib.benchmark"] == "tiny-digits" for r in runs)
    table = pd.read_csv(bench["work"] / "results" / "tiny-digits.csv")
    assert list(table["row"]) == ["CE-only", "KD (wrn_16_2)", "L0", "L1 IB"]
    page = (bench["work"] / "results" / "tiny-digits.md").read_text(encoding="utf-8")
    for _, line in table.iterrows():
        mine = [r for r in runs if r.data.tags["asib.bench_row"] == line["row"]]
        assert line["n"] == 2 and line["seeds"] == "0,1"
        for column, metric in (("val_acc", "val/best_acc"), ("test_acc", "test/acc"), ("test_acc_last", "test/acc_last")):
            values = [100 * r.data.metrics[metric] for r in mine]
            assert line[f"{column}_mean"] == pytest.approx(statistics.mean(values))
            assert line[f"{column}_std"] == pytest.approx(statistics.stdev(values))
        rate = statistics.mean(r.data.metrics["train/img_per_s_mean"] for r in mine)
        assert line["img_per_s_mean"] == pytest.approx(rate)
        both = "resnet20+wrn_16_2"
        exp, method, used = {"CE-only": ("quickstart", "ce", "none"), "L0": ("L0_baseline", "asib", both),
                             "L1 IB": ("L1_ib", "asib", both)}.get(
            line["row"], ("quickstart", "vanilla_kd", "wrn_16_2"))
        assert {r.data.tags["asib.teachers_used"] for r in mine} == {used}
        assert f"| {line['row']} | {exp} | {method} | {used.replace('+', ' + ')} | 2 | 0,1 | " in page
    assert "torch " in page and "cores" in page and "python -m pipelines.benchmark name=" in page
    assert re.search(r"commits of the runs:\n  - `[0-9a-f]{7,40}|unknown`", page)


def test_every_row_is_compared_with_the_reference_row(bench):
    """The last two columns: test points against CE-only (difference of the means, Welch standard
    error) and the run-time ratio, recomputed here from the runs."""
    runs = _distill_runs(bench["work"])
    table = pd.read_csv(bench["work"] / "results" / "tiny-digits.csv").set_index("row")

    def of(row):
        mine = [r for r in runs if r.data.tags["asib.bench_row"] == row]
        tests = [100 * r.data.metrics["test/acc"] for r in mine]
        times = [(r.info.end_time - r.info.start_time) / 1000 for r in mine]
        return statistics.mean(tests), statistics.stdev(tests), statistics.mean(times)

    ce_mean, ce_sd, ce_time = of("CE-only")
    for row in ("KD (wrn_16_2)", "L0", "L1 IB"):
        mean, sd, time = of(row)
        assert table.loc[row, "delta_test"] == pytest.approx(mean - ce_mean)
        assert table.loc[row, "delta_test_se"] == pytest.approx(((sd ** 2 + ce_sd ** 2) / 2) ** 0.5)
        assert table.loc[row, "time_ratio"] == pytest.approx(time / ce_time)
    page = (bench["work"] / "results" / "tiny-digits.md").read_text(encoding="utf-8")
    assert "| test vs CE-only (points ± s.e.) | run time / CE-only's |" in page
    assert "| (reference) | (reference) |" in page
    assert (bench["work"] / "results" / "tiny-digits-val-curves.png").is_file()


def test_the_page_checks_the_protocols_targets_on_the_runs(bench):
    """Each target: the row's mean test top-1 minus the higher mean of the rows it is compared
    with (recomputed here from the runs), the Welch s.e. of that difference, met or not."""
    runs = _distill_runs(bench["work"])

    def of(row):
        tests = [100 * r.data.metrics["test/acc"] for r in runs if r.data.tags["asib.bench_row"] == row]
        return statistics.mean(tests), statistics.stdev(tests)

    targets = pd.read_csv(bench["work"] / "results" / "tiny-digits-targets.csv")
    assert list(targets["row"]) == ["KD (wrn_16_2)", "L1 IB", "L0"]
    assert list(targets["status"]) == ["met", "met", "not met"]
    best = max(("CE-only", "KD (wrn_16_2)"), key=lambda row: of(row)[0])
    (mean, sd), (other, other_sd) = of("L0"), of(best)
    last = targets.iloc[2]
    assert last["compared"] == best and last["n"] == 2 and last["n_compared"] == 2
    assert last["delta"] == pytest.approx(mean - other)
    assert last["se"] == pytest.approx(((sd ** 2 + other_sd ** 2) / 2) ** 0.5)
    page = (bench["work"] / "results" / "tiny-digits.md").read_text(encoding="utf-8")
    assert (f"| L0 ≥ the best of CE-only, KD (wrn_16_2) +100.00 | never | {best} | 2 / 2 | "
            f"{mean - other:+.2f} ± {last['se']:.2f} | not met (short by {100 - (mean - other):.2f}) |") in page
    assert f"| L1 IB ≥ CE-only -100.00 | always | CE-only | 2 / 2 | {of('L1 IB')[0] - of('CE-only')[0]:+.2f}" in page


def test_targets_name_rows_of_their_own_file(tmp_path):
    """A target naming no row, an unknown row or a non-number `by` is refused with the rows
    listed; `rows:` states one claim per row; a file that extends another states its own."""
    from asib_core.benchmark import load_benchmark
    from asib_core.config import ConfigError

    spec = tmp_path / "b.yaml"
    for targets, says in (([{"row": "KD", "over": "CE-only"}], "names 'KD', which is not a row; its rows are CE-only"),
                          ([{"row": "L0"}], "needs `row: NAME`"),
                          ([{"row": "L0", "rows": ["L0"], "over": "CE-only"}], "needs `row: NAME`"),
                          ([{"row": "L0", "over": "CE-only", "by": "six"}], "by='six'; give test points"),
                          ({"row": "L0"}, "must be a list")):
        spec.write_text(yaml.safe_dump({**TINY, "targets": targets}), encoding="utf-8")
        with pytest.raises(ConfigError, match=re.escape(says)):
            load_benchmark(str(spec))
    spec.write_text(yaml.safe_dump(TINY), encoding="utf-8")
    bench = load_benchmark(str(spec))
    assert [(t.row, t.over, t.by) for t in bench.targets] == [
        ("KD (wrn_16_2)", ("CE-only",), -100.0), ("L1 IB", ("CE-only",), -100.0),
        ("L0", ("CE-only", "KD (wrn_16_2)"), 100.0)]
    child = tmp_path / "child.yaml"
    child.write_text(yaml.safe_dump({"extends": str(spec), "rows": ["CE-only", "L0"]}), encoding="utf-8")
    assert load_benchmark(str(child)).targets == []


def test_page_states_what_the_runs_cost(bench):
    """The compute lines: the student runs' summed run time and each teacher's training time
    (the sum of its fine-tune epochs), recomputed from the store."""
    from asib_core.report.writers import clock

    client = MlflowClient()
    runs = _distill_runs(bench["work"])
    page = (bench["work"] / "results" / "tiny-digits.md").read_text(encoding="utf-8")
    total = sum((r.info.end_time - r.info.start_time) / 1000 for r in runs)
    assert f"  - 8 student runs: {clock(total)} (h:mm:ss) of run time in all" in page
    for run in all_runs(bench["work"]):
        if run.data.tags.get("step") == "finetune":
            seconds = client.get_run(run.info.run_id).data.metrics["total_train_time_sec"]
            assert f"  - teacher `{run.data.tags['teacher']}`: {clock(seconds)} of training" in page


def test_commands_fed_row_by_row_collapse_into_one_line_per_command():
    """A protocol fed one (row, seed) at a time records dozens of commands; the page merges those
    that differ only in ``rows=`` / ``seeds=``, rows in the benchmark's order, seeds ascending."""
    from asib_core.report.benchmark import collapsed_commands

    base = "python -m pipelines.benchmark name=p"
    cmds = sorted([f"{base} 'rows=KD (r20)' seeds=1 report=false", f"{base} 'rows=KD (r20)' seeds=0 report=false",
                   f"{base} rows=CE-only seeds=10,2 report=false", f"{base} rows=CE-only seeds=0 report=false",
                   base, f"{base} rows=CE-only seeds=0"])
    assert collapsed_commands(cmds, ["CE-only", "KD (r20)"]) == [
        f"`{base}`",
        f"`{base} rows=<row> seeds=<seed> report=false`, run for CE-only: seeds 0, 2, 10; KD (r20): seeds 0, 1",
        f"`{base} rows=<row> seeds=<seed>`, run for CE-only: seeds 0"]


def test_the_commits_line_keeps_row_names_that_hold_commas_apart():
    """Each commit lists the rows it made, separated by '; ' since row names may hold commas."""
    from asib_core.report.benchmark import provenance

    a, b = "a" * 40, "b" * 40
    runs = pd.DataFrame({"tags.git_commit": [a, b, b],
                         "row": ["L1 IB", "L4 full, feature KD at the mean's scale", "L4 full, no PPF"],
                         "wall_time_s": [1.0, 2.0, 3.0]})
    assert provenance(runs, None)["commits"] == [
        f"`{a}` (L1 IB)", f"`{b}` (L4 full, feature KD at the mean's scale; L4 full, no PPF)"]


def test_the_page_names_paths_inside_a_checkout_relative_to_it(tmp_path):
    """A command recorded with ``archive=<checkout>/docs/results/x-runs`` is shown as
    ``archive=docs/results/x-runs`` (the checkout: the nearest folder above with ``.git``); a
    path in no checkout is left as it was recorded."""
    from asib_core.report.benchmark import collapsed_commands

    root = tmp_path / "checkout"
    (root / ".git").mkdir(parents=True)
    base = "python -m pipelines.benchmark name=p"
    cmds = [f"{base} rows=CE-only seeds=0 archive={root}/docs/results/p-runs",
            f"{base} rows=CE-only seeds=1 archive={root}/docs/results/p-runs",
            f"python -m pipelines.archive import src={tmp_path}/elsewhere"]
    assert collapsed_commands(cmds, ["CE-only"]) == [
        f"`{base} rows=<row> seeds=<seed> archive=docs/results/p-runs`, run for CE-only: seeds 0, 1",
        f"`python -m pipelines.archive import src={tmp_path}/elsewhere`"]


def test_curves_are_drawn_against_the_student_epoch_not_the_mlflow_step():
    """An ASIB run's ``val/acc`` history starts after its A-step steps and skips the next stage's;
    both figures draw its n-th point at student epoch n, as they do for a run without A-steps."""
    from asib_core.report import plots

    histories = {"asib": {"val/acc": pd.Series([0.3, 0.5, 0.6, 0.7], index=[11, 4, 5, 10])},
                 "plain": {"val/acc": pd.Series([0.2, 0.4, 0.5, 0.6], index=[0, 1, 2, 3])}}
    groups = [(name, pd.DataFrame({"run_id": [name], "seed": [0], "seed_order": [0]})) for name in histories]
    overview = plots.overview_figure(groups, histories).axes[0]
    assert [list(line.get_xdata()) for line in overview.lines] == [[1, 2, 3, 4]] * 2
    assert list(overview.lines[0].get_ydata()) == pytest.approx([50, 60, 70, 30])
    assert overview.get_xlabel() == "student epoch"
    panel = plots.group_figure("L1", groups[0][1], histories).axes[0]
    assert list(panel.lines[0].get_xdata()) == [1, 2, 3, 4]
    # more rows than the 10 colours of the cycle: every line still has its own colour and style
    many = {f"row {i}": {"val/acc": pd.Series([0.1, 0.2], index=[0, 1])} for i in range(23)}
    lines = plots.overview_figure([(name, pd.DataFrame({"run_id": [name]})) for name in many], many).axes[0].lines
    assert len({(line.get_color(), line.get_linestyle()) for line in lines}) == len(lines) == 23


def test_asib_section_shows_the_synergy_per_a_step_epoch_from_the_histories(bench):
    """Per stage and A-step epoch: the seeds' mean of the synergy's, each teacher's, the
    ensemble's and the oracle's validation accuracy; per stage the B-step synergy share; the cost
    table - all recomputed here from the two L1 runs' metric histories."""
    client = MlflowClient()
    l1 = [r for r in _distill_runs(bench["work"]) if r.data.tags["asib.bench_row"] == "L1 IB"]
    names = ("synergy", "teacher1", "teacher2", "ensemble", "oracle")
    expected: dict = {}
    shares: dict = {}
    for run in l1:
        stage = {m.step: int(m.value) for m in client.get_metric_history(run.info.run_id, "stage")}
        for name in names:
            for m in client.get_metric_history(run.info.run_id, f"a_step_val/{name}_acc"):
                expected.setdefault((stage[m.step], name), []).append(100 * m.value)
        for m in client.get_metric_history(run.info.run_id, "b_step/syn_share"):
            shares.setdefault(stage[m.step], []).append(100 * m.value)
    results = bench["work"] / "results"
    epochs = pd.read_csv(results / "tiny-digits-synergy-epochs.csv")
    assert list(zip(epochs["stage"], epochs["epoch"], epochs["n"], epochs["row"])) == [(1, 1, 2, "L1 IB"),
                                                                                   (2, 1, 2, "L1 IB")]
    for _, line in epochs.iterrows():
        for name in names:
            assert line[name] == pytest.approx(statistics.mean(expected[(line["stage"], name)]))
        assert line["synergy_minus_ensemble"] == pytest.approx(line["synergy"] - line["ensemble"])
    got_shares = pd.read_csv(results / "tiny-digits-synergy-shares.csv")
    assert {s: pytest.approx(statistics.mean(v)) for s, v in shares.items()} == dict(
        zip(got_shares["stage"], got_shares["share"]))
    cost = pd.read_csv(results / "tiny-digits-asib-cost.csv")      # every ASIB rung, against L0 (same recipe)
    assert cost[["row", "n", "student_epochs", "a_step_epochs"]].values.tolist() == [["L0", 2, 2.0, 0.0],
                                                                                    ["L1 IB", 2, 2.0, 2.0]]
    l0 = [r for r in _distill_runs(bench["work"]) if r.data.tags["asib.bench_row"] == "L0"]
    times = [statistics.mean((r.info.end_time - r.info.start_time) / 1000 for r in rs) for rs in (l0, l1)]
    assert cost["wall_time_s_mean"].tolist() == pytest.approx(times)
    assert cost["reference_row"].tolist() == ["L0", "L0"]
    assert cost["ratio_to_reference"].tolist() == pytest.approx([1.0, times[1] / times[0]])
    for rs, span in zip((l0, l1), cost["measured_utc"]):      # when the row's runs started (UTC)
        starts = sorted(datetime.fromtimestamp(r.info.start_time / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M")
                        for r in rs)
        assert span == (starts[0] if starts[0] == starts[-1] else f"{starts[0]} to {starts[-1]}")
    page = (results / "tiny-digits.md").read_text(encoding="utf-8")
    assert "| L1 IB | 2 | 1 | 2 | " in page and "| `resnet20` | `wrn_16_2` | ensemble | oracle |" in page
    assert "![synergy against the teachers per A-step epoch](tiny-digits-synergy.png)" in page
    assert (results / "tiny-digits-synergy.png").stat().st_size > 1000


def test_asib_cost_is_read_against_the_first_rung_on_the_same_recipe():
    """The seed's rungs (CutMix: a second teacher pass for the clean synergy query) against the
    seed's L0, the rungs on avg-KD's recipe against that recipe's L0, whatever the row order."""
    from asib_core.report.synergy import with_references

    cost = pd.DataFrame({"row": ["L0", "L0 fair", "L1", "L1 fair", "L4 fair"],
                         "recipe": ["", "asib_kd_paper", "", "asib_kd_paper", "asib_kd_paper"],
                         "wall_time_s_mean": [400.0, 300.0, 1000.0, 390.0, 450.0]})
    got = with_references(cost)
    assert got["reference_row"].tolist() == ["L0", "L0 fair", "L0", "L0 fair", "L0 fair"]
    assert got["ratio_to_reference"].tolist() == pytest.approx([1.0, 1.0, 2.5, 1.3, 1.5])


def test_teachers_table_comes_from_one_evaluation_run(bench):
    client = MlflowClient()
    evals = [r for r in all_runs(bench["work"]) if r.data.tags.get("step") == "bench_teachers"]
    assert len(evals) == 1
    m = evals[0].data.metrics
    for split in ("val", "test"):
        accs = [m[f"teacher/{t}/{split}_acc"] for t in ("resnet20", "wrn_16_2")]
        assert m[f"oracle/{split}_acc"] >= max(accs) and 0 <= m[f"agreement/{split}"] <= 1
        assert f"ensemble/{split}_acc" in m
    # each teacher's validation accuracy is the one its fine-tune measured on the same split
    for teacher in ("resnet20", "wrn_16_2"):
        ft = client.get_run(evals[0].data.tags[f"teacher_run.{teacher}"])
        assert m[f"teacher/{teacher}/val_acc"] == pytest.approx(ft.data.metrics["val/best_acc"])
    # ensemble, oracle and agreement recomputed here from the two pinned checkpoints
    for split in ("val", "test"):
        probs, labels = _teacher_outputs(bench["work"], split)
        preds = probs.argmax(2)
        assert m[f"ensemble/{split}_acc"] == pytest.approx((probs.mean(0).argmax(1) == labels).mean())
        assert m[f"oracle/{split}_acc"] == pytest.approx((preds == labels).any(0).mean())
        assert m[f"agreement/{split}"] == pytest.approx((preds[0] == preds[1]).mean())
    page = (bench["work"] / "results" / "tiny-digits.md").read_text(encoding="utf-8")
    assert f"| `wrn_16_2` | {100 * m['teacher/wrn_16_2/val_acc']:.2f} | {100 * m['teacher/wrn_16_2/test_acc']:.2f} |" in page
    assert f"| oracle (any teacher right) | {100 * m['oracle/val_acc']:.2f} |" in page


def _teacher_outputs(work, split: str):
    """Softmax outputs (teacher x image x class) of the pinned teachers on a split, and the labels."""
    import numpy as np
    import torch

    from asib_core.config import resolve_experiment
    from asib_core.data import build_data
    from asib_core.models import create_model

    cfg = resolve_experiment("quickstart", TINY["common"]).cfg
    data = build_data(cfg, "cpu")
    x, y = map(torch.cat, zip(*[(xb, yb) for xb, yb, _ in data.loader(split, batch_size=256)]))
    probs = []
    for name in ("resnet20", "wrn_16_2"):
        payload = torch.load(work / "checkpoints" / "benchmark" / "tiny-digits" / f"{name}_digits.pth",
                             map_location="cpu", weights_only=True)
        model = create_model(name, num_classes=10, pretrained=False, small_input=True)
        model.load_state_dict(payload["model"])
        with torch.no_grad():
            probs.append(torch.softmax(model.eval()(x)["logit"], 1).numpy())
    return np.stack(probs), y.numpy()


def test_progress_lines_and_an_interrupted_benchmark_continues(bench):
    lines = [ln for ln in bench["first"].splitlines() if ln.startswith("[")]
    assert [ln.split(" ")[0] for ln in lines] == [f"[{i}/8]" for i in range(1, 9)]
    assert all("elapsed" in ln for ln in lines) and "ETA" in lines[1]
    assert "CE-only seed 0: reused" in lines[0]                 # made by the interrupted command
    assert all("trained in" in ln for ln in lines[1:])
    first_id = re.search(r"\(run (\w+)\)", bench["partial"]).group(1)
    assert f"(run {first_id})" in lines[0]


def test_rerun_reuses_every_run(bench):
    assert bench["after_second"] == bench["after_first"]        # no new teacher, evaluation or student run
    lines = [ln for ln in bench["second"].splitlines() if ln.startswith("[")]
    assert len(lines) == 8 and all(": reused" in ln for ln in lines)
    assert "0 runs trained, 8 reused" in bench["second"]


def test_report_alone_writes_the_same_page(bench, tmp_path):
    from pipelines.report import main

    with pytest.MonkeyPatch.context() as mp:
        use_isolated_store(mp, bench["work"])
        assert main([f"benchmark={bench['spec']}", f"out={tmp_path}"]) == 0
    alone = pd.read_csv(tmp_path / "tiny-digits.csv")
    pd.testing.assert_frame_equal(alone, pd.read_csv(bench["work"] / "results" / "tiny-digits.csv"))


def test_unknown_row_is_refused_before_any_training(tmp_path):
    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump(TINY), encoding="utf-8")
    proc = run_module("pipelines.benchmark", [f"name={spec}", "rows=CE-only,Hinton"], tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "no row 'Hinton'" in proc.stderr and "1: KD (wrn_16_2)" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not all_runs(tmp_path) and not (tmp_path / "checkpoints").exists()


def test_every_benchmark_config_row_composes_in_a_dry_run(workdir, capsys):
    """configs/benchmark/digits.yaml (CE, KD, avg-KD, an ASIB rung): every row composes; nothing runs."""
    from pipelines.benchmark import main

    assert main(["name=digits", "dry_run=true", "seeds=0"]) == 0
    out = capsys.readouterr().out
    assert "4 of 4 runs to train" in out and "L1 IB seed 0: to run" in out
    assert not all_runs(workdir)


def test_rows_by_name_or_index_and_an_unknown_benchmark(workdir, capsys):
    """Row names may hold commas (the protocol's seed-recipe row); an unknown name lists the known ones."""
    from asib_core.benchmark import load_benchmark, select_rows, select_seeds
    from pipelines.benchmark import main

    bench = load_benchmark("cifar10_lowdata")
    chosen = select_rows(bench, "seed recipe (sota_generic, vanilla_kd),0,KD (wrn_16_2),0")
    assert [r.name for r in chosen] == ["seed recipe (sota_generic, vanilla_kd)", "CE-only", "KD (wrn_16_2)"]
    assert len(select_rows(bench, "")) == len(bench.rows) and select_seeds(bench, "") == [0, 1, 2]
    with pytest.raises(SystemExit) as exc:
        main(["name=cifar10_low", "dry_run=true"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "no benchmark named 'cifar10_low'" in err and "cifar10_lowdata" in err
    with pytest.raises(SystemExit) as exc:
        main(["name=digits", "seeds=0,x"])
    assert exc.value.code == 2 and "seeds='0,x'" in capsys.readouterr().err
    assert not all_runs(workdir)


def test_teacher_runs_pins_a_finetune_run_and_refuses_anything_else(bench, capsys):
    """teacher_runs=NAME=RUN_ID uses that FINISHED fine-tune (e.g. one made by older code) instead
    of an identity lookup; a run of another step or teacher, or an unknown teacher, is refused."""
    from pipelines.benchmark import main

    runs = all_runs(bench["work"])
    finetunes = {r.data.tags["teacher"]: r.info.run_id for r in runs if r.data.tags.get("step") == "finetune"}
    a_student = next(r.info.run_id for r in runs if r.data.tags.get("step") == "distill")
    args = [f"name={bench['spec']}", "dry_run=true", "seeds=0"]
    with pytest.MonkeyPatch.context() as mp:
        use_isolated_store(mp, bench["work"])
        assert main([*args, f"teacher_runs=resnet20={finetunes['resnet20']}"]) == 0
        assert f"teacher resnet20: reuse finetune run {finetunes['resnet20']}" in capsys.readouterr().out
        for bad, says in ((f"resnet20={finetunes['wrn_16_2']}", "teacher=wrn_16_2"),
                          (f"resnet20={a_student}", "step=distill"),
                          (f"resnet56={finetunes['resnet20']}", "does not use")):
            with pytest.raises(SystemExit) as exc:
                main([*args, f"teacher_runs={bad}"])
            assert exc.value.code == 2 and says in capsys.readouterr().err


def test_a_row_whose_definition_changed_keeps_only_the_seeds_rerun_since(bench, tmp_path):
    """Redefine two rows and rerun one seed of one of them: the page must not average that run
    with the seed run under the old definition, nor show the other row's old runs as its numbers.
    The old runs are left out and named, with the key that differs, until they are rerun (in a
    copy of the benchmark's store, so the other tests keep theirs)."""
    work = tmp_path / "copy"
    shutil.copytree(bench["work"], work)
    ce, kd, *rest = TINY["rows"]
    changed = {**TINY, "rows": [{**ce, "overrides": [*ce["overrides"], "experiment.ce_label_smoothing=0.1"]},
                                {**kd, "overrides": [*kd["overrides"], "experiment.tau=2.0"]}, *rest]}
    spec = work / "tiny.yaml"
    spec.write_text(yaml.safe_dump(changed), encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        use_isolated_store(mp, work)
        out = _bench([f"name={spec}", "out=results", "rows=CE-only", "seeds=0"])
        old = {(r.data.tags["asib.bench_row"], r.data.tags["seed"]): r.info.run_id for r in _distill_runs(work)}
    assert "1 runs trained, 0 reused" in out
    table = pd.read_csv(work / "results" / "tiny-digits.csv", dtype={"seeds": str}).set_index("row")
    assert (table.loc["CE-only", "n"], table.loc["CE-only", "seeds"]) == (1, "0")
    assert table.loc["KD (wrn_16_2)", "n"] == 0
    assert (table.loc["L0", "n"], table.loc["L0", "seeds"]) == (2, "0,1")          # unchanged rows keep theirs
    page = (work / "results" / "tiny-digits.md").read_text(encoding="utf-8")
    expected = [("CE-only", "1", "`ce_label_smoothing` 0.0 (now 0.1)"), ("KD (wrn_16_2)", "0", "`tau` 4.0 (now 2.0)"),
                ("KD (wrn_16_2)", "1", "`tau` 4.0 (now 2.0)")]
    for row, seed, key in expected:
        assert (f"{row}, seed {seed} (run `{old[(row, seed)]}`): ran under another definition of the row: "
                f"{key}; rerun this seed") in page
    assert page.count("; rerun this seed") == len(expected)


def test_a_benchmark_extends_another_and_takes_rows_by_name(tmp_path):
    """`extends`: fields replace the parent's, common_extra is appended, a row named by a string
    is the parent's row; an unknown name, a loop and broken YAML are one-paragraph errors."""
    from asib_core.benchmark import load_benchmark
    from asib_core.config import ConfigError

    parent = tmp_path / "parent.yaml"
    parent.write_text(yaml.safe_dump(TINY), encoding="utf-8")
    child = tmp_path / "child.yaml"
    child.write_text(yaml.safe_dump({"extends": str(parent), "name": "slice", "common_extra": ["teacher2=resnet20"],
                                     "rows": ["KD (wrn_16_2)", {"name": "own", "exp": "L1_ib"}]}), encoding="utf-8")
    bench = load_benchmark(str(child))
    assert bench.name == "slice" and bench.seeds == [0, 1] and bench.teachers == TINY["teachers"]
    assert bench.common == [*TINY["common"], "teacher2=resnet20"]
    kd = TINY["rows"][1]
    assert [(r.name, r.exp, list(r.overrides)) for r in bench.rows] == [(kd["name"], kd["exp"], kd["overrides"]),
                                                                        ("own", "L1_ib", [])]
    for text, says in (({"extends": str(parent), "rows": ["Hinton"]}, "'Hinton' is not a row of"),
                       ({"extends": str(child), "rows": ["own"]}, None)):
        child.write_text(yaml.safe_dump(text), encoding="utf-8")
        with pytest.raises(ConfigError, match=says or "loops back"):
            load_benchmark(str(child))
    child.write_text(yaml.safe_dump({"extends": str(parent), "reference_row": "Hinton"}), encoding="utf-8")
    with pytest.raises(ConfigError, match="reference_row 'Hinton' is not one of its rows"):
        load_benchmark(str(child))
    child.write_text("rows: [a, [b\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_benchmark(str(child))


# -- run archives: the benchmark's runs carried to another store ------------------------------
def _archive(argv: list[str]) -> str:
    from pipelines.archive import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0
    return out.getvalue()


def _by_origin(work) -> dict:
    return {r.data.tags["asib.archived_from"]: r for r in all_runs(work) if "asib.archived_from" in r.data.tags}


@pytest.fixture(scope="module")
def archived(bench, tmp_path_factory):
    """The benchmark's runs exported twice, then imported twice into an empty store."""
    base = tmp_path_factory.mktemp("archive")
    arch, again, reexported, fresh = base / "archive", base / "again", base / "reexported", base / "fresh"
    fresh.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        use_isolated_store(mp, bench["work"])
        exported = _archive(["export", f"benchmark={bench['spec']}", f"out={arch}"])
        _archive(["export", "filter=tags.step = 'finetune'", f"out={base / 'teachers'}"])
        _archive(["export", f"benchmark={bench['spec']}", f"out={again}"])
        assert main_report([f"benchmark={bench['spec']}", "out=page"]) == 0          # bench work/page
        use_isolated_store(mp, fresh)
        first, second = _archive(["import", f"src={arch}"]), _archive(["import", f"src={arch}"])
        _archive(["export", f"benchmark={bench['spec']}", f"out={reexported}"])
        assert main_report([f"benchmark={bench['spec']}", "out=page"]) == 0          # fresh/page
    return {"base": base, "arch": arch, "again": again, "reexported": reexported, "fresh": fresh,
            "exported": exported,
            "pages": (bench["work"] / "page", fresh / "page"),
            "first": first, "second": second}


def main_report(argv: list[str]) -> int:
    from pipelines.report import main

    with contextlib.redirect_stdout(io.StringIO()):
        return main(argv)


def test_the_benchmark_rewrites_its_archive_after_the_teachers_and_every_trained_run(bench):
    """archive=DIR: once the teachers are evaluated and after each run it trains, the folder holds
    every FINISHED run so far, with the teachers' checkpoints (read_archive checks the manifest)."""
    from asib_core.tracking.archive import read_archive

    src, records = read_archive(bench["work"] / "live-archive")
    trained = bench["first"].count(": trained in ")
    assert trained == 7 and bench["first"].count("archive: ") == 1 + trained
    assert f"archive: {len(records)} runs in {src}" in bench["first"]
    ids = {r["run_id"] for r in records}
    assert {r.info.run_id for r in _distill_runs(bench["work"])} <= ids          # all 8, the partial's too
    teachers = [r for r in records if r["tags"].get("step") == "finetune"]
    assert sorted(r["tags"]["teacher"] for r in teachers) == ["resnet20", "wrn_16_2"]
    assert all(r["artifacts"] and (src / "artifacts" / r["run_id"] / r["artifacts"][0]).is_file() for r in teachers)
    assert all(r["status"] == "FINISHED" for r in records)


def test_the_committed_protocol_archive_is_intact_and_its_teachers_load():
    """docs/results/cifar10-lowdata-runs (committed): every file as its manifest says, the
    protocol's two teachers with checkpoints that load (weights only) into the registry's models."""
    from pathlib import Path

    import torch

    from asib_core.benchmark import load_benchmark
    from asib_core.models import create_model
    from asib_core.tracking.archive import read_archive

    bench = load_benchmark("cifar10_lowdata")
    src, records = read_archive(Path(__file__).resolve().parents[1] / "docs/results" / f"{bench.name}-runs")
    teachers = {r["tags"]["teacher"]: r for r in records if r["tags"].get("step") == "finetune"}
    assert sorted(teachers) == sorted(t["teacher"] for t in bench.teachers)
    for name, record in teachers.items():
        state = torch.load(src / "artifacts" / record["run_id"] / record["artifacts"][0], weights_only=True)
        assert state["meta"]["teacher"] == name and state["meta"]["run_id"] == record["run_id"]
        assert state["meta"]["test_acc"] == pytest.approx(record["metrics"]["test/acc"][-1][2], abs=1e-4)
        create_model(name, num_classes=10).load_state_dict(state["model"])        # strict


def test_an_archive_rebuilds_the_same_results_page_in_an_empty_store(bench, archived):
    """Every FINISHED run of the benchmark plus the runs they name (teachers, parents) travel;
    the page rebuilt from the empty store they were imported into is the same, byte for byte."""
    source = {r.info.run_id: r for r in all_runs(bench["work"])}
    imported = _by_origin(archived["fresh"])
    distill = {i for i, r in source.items() if r.data.tags.get("step") == "distill" and r.info.status == "FINISHED"}
    assert distill and distill <= set(imported)
    assert {source[i].data.tags.get("step") for i in imported} >= {"distill", "finetune", "bench_teachers"}
    assert f"archived {len(imported)} runs" in archived["exported"]
    for origin, run in imported.items():
        was = source[origin]
        assert (run.info.status, run.info.start_time, run.info.end_time, run.info.run_name) == \
               (was.info.status, was.info.start_time, was.info.end_time, was.info.run_name)
        assert run.data.params == was.data.params and run.data.metrics == was.data.metrics
    for name in ("tiny-digits.md", "tiny-digits.csv", "tiny-digits-synergy-epochs.csv", "tiny-digits-asib-cost.csv"):
        source_page, fresh_page = ((folder / name).read_text(encoding="utf-8") for folder in archived["pages"])
        assert fresh_page == source_page, name


def test_an_export_by_filter_holds_the_matching_runs_and_the_runs_they_name(bench, archived):
    """filter="tags.step = 'finetune'": the two teachers with their checkpoints, plus each run a
    teacher's tags name (its benchmark parent), and not one student run."""
    from asib_core.tracking.archive import read_archive

    src, records = read_archive(archived["base"] / "teachers")
    source = {r.info.run_id: r for r in all_runs(bench["work"])}
    teachers = {i for i, r in source.items() if r.data.tags.get("step") == "finetune"}
    named = {v for i in teachers for v in source[i].data.tags.values() if v in source}
    assert len(teachers) == 2 and {r["run_id"] for r in records} == teachers | named
    assert all(r["tags"].get("step") != "distill" for r in records)
    assert all((src / "artifacts" / r["run_id"] / r["artifacts"][0]).is_file()
               for r in records if r["run_id"] in teachers)


def test_an_imported_run_names_the_imported_teachers_whose_checkpoints_are_the_same_files(bench, archived):
    import hashlib

    import mlflow

    source = {r.info.run_id: r for r in all_runs(bench["work"])}
    imported = _by_origin(archived["fresh"])
    new_to_old = {r.info.run_id: origin for origin, r in imported.items()}
    checked = set()
    for origin, run in imported.items():        # every tag that named a run of the archive names its copy
        for key, value in source[origin].data.tags.items():
            if value in imported:
                assert new_to_old[run.data.tags[key]] == value, key
                checked.add(key)
    assert {"mlflow.parentRunId", "teacher_run.resnet20", "teacher_run.wrn_16_2"} <= checked
    teachers = {r.data.tags["teacher"]: (o, r) for o, r in imported.items() if r.data.tags.get("step") == "finetune"}
    assert set(teachers) == {"resnet20", "wrn_16_2"}

    def digest(run_id: str, workdir, artifact: str, dst) -> str:
        mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact, dst_path=str(dst))
        return hashlib.sha256(open(path, "rb").read()).hexdigest()

    for name, (origin, run) in teachers.items():
        artifact = source[origin].data.tags["asib.teacher_artifact"]
        assert run.data.tags["asib.teacher_artifact"] == artifact
        assert digest(run.info.run_id, archived["fresh"], artifact, archived["base"] / "dl-new" / name) == \
               digest(origin, bench["work"], artifact, archived["base"] / "dl-old" / name)
    pairs = ",".join(f"{n}={teachers[n][1].info.run_id}" for n in sorted(teachers))
    assert f"teachers: teacher_runs={pairs}" in archived["first"]


def test_importing_twice_adds_nothing_and_exporting_twice_writes_the_same_bytes(archived):
    """Exporting the same runs again, or exporting the store they were imported into (new run
    ids), writes the archive byte for byte: runs keep their original ids from store to store."""
    n = len(_by_origin(archived["fresh"]))
    assert f"imported {n} runs" in archived["first"] and f"imported 0 runs" in archived["second"]
    assert f"({n} were there already)" in archived["second"]
    assert len(all_runs(archived["fresh"])) == n + 1            # and the report's own run
    files = sorted(p.relative_to(archived["arch"]) for p in archived["arch"].rglob("*") if p.is_file())
    assert any(f.parts[0] == "artifacts" for f in files)
    for other in (archived["again"], archived["reexported"]):
        assert files == sorted(p.relative_to(other) for p in other.rglob("*") if p.is_file())
        assert all((archived["arch"] / f).read_bytes() == (other / f).read_bytes() for f in files)


def test_the_imported_store_continues_the_benchmark_reusing_every_run(bench, archived):
    """The same command on the imported store (same code): the teachers are found by identity,
    their checkpoints pinned from the imported artifacts, and every student run is reused."""
    with pytest.MonkeyPatch.context() as mp:
        use_isolated_store(mp, archived["fresh"])
        before = _training_runs(archived["fresh"])
        out = _bench([f"name={bench['spec']}", "report=false"])
        assert _training_runs(archived["fresh"]) == before
    assert "0 runs trained, 8 reused" in out, out[-3000:]


def test_a_killed_import_leaves_no_half_imported_run_and_a_bad_archive_is_refused(archived, tmp_path):
    from fault_helpers import SIGKILLED, run_step

    target = tmp_path / "store"
    target.mkdir()
    killed = run_step("pipelines.archive", ["import", f"src={archived['arch']}"], target, fault="archive.import#3")
    assert killed.returncode == SIGKILLED
    again = run_step("pipelines.archive", ["import", f"src={archived['arch']}"], target)
    assert again.returncode == 0, again.stderr[-2000:]
    n = len(_by_origin(archived["fresh"]))
    assert f"deleted {n - 2} half-imported runs" in again.stdout      # killed at its third run
    assert f"imported {n - 2} runs" in again.stdout and "(2 were there already)" in again.stdout
    runs = all_runs(target)
    assert len(runs) == n and all(r.info.status != "RUNNING" for r in runs)
    assert all("asib.import_pending" not in r.data.tags for r in runs)

    broken = tmp_path / "broken"
    shutil.copytree(archived["arch"], broken)
    victim = next((broken / "artifacts").rglob("*.pth"))
    victim.write_bytes(victim.read_bytes()[:100])
    for src, says in ((broken, f"{victim} is missing or differs"), (tmp_path / "nothing", "no run archive at")):
        proc = run_module("pipelines.archive", ["import", f"src={src}"], tmp_path)
        assert proc.returncode == 2 and says in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "mlflow.db").exists()


def test_an_interrupted_import_deletes_the_runs_it_had_begun(archived, tmp_path):
    """Ctrl-C (SIGINT) in the middle: exit 130, the runs already complete stay, the others are
    gone at once (not RUNNING, not waiting for the next command)."""
    from fault_helpers import run_step

    proc = run_step("pipelines.archive", ["import", f"src={archived['arch']}"], tmp_path,
                    fault="archive.import#2", signal_name="INT")
    assert proc.returncode == 130 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    runs = all_runs(tmp_path)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and "asib.import_pending" not in runs[0].data.tags
