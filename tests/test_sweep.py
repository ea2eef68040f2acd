"""Issue 7: Optuna sweeps as an MLflow entry point.

Trials are real distillation runs on digits, kept tiny: the cross-entropy student alone (no
teachers to train), 10 images per class, two epochs. A one-parameter space over the student's
learning rate makes the outcome of enqueued trials predictable: lr 0.1 learns, lr 1e-6 does not (so a median
pruner prunes it after epoch 1, but not a second lr 0.1 trial after the first), lr -1
fails inside its run (the optimiser refuses it) and the value "fast" fails before any run starts
(Optuna cannot read it as a float).
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import optuna
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from asib_core.config import ConfigError, resolve_experiment
from asib_core.sweep import SweepSettings, load_space, open_storage, run_sweep
from asib_core.sweep.recovery import worker_identity
from asib_core.sweep.space import format_value, parse_space
from asib_core.tracking.environ import set_environ
from pipelines._cli import parse_exp_args
from tests.pipeline_helpers import ROOT, env_for
from tests.sweep_helpers import (NoPostgres, free_port, runs_of, start_worker, study_trials, throwaway_postgres,
                                 wait_for)

FAST = ["method=ce", "experiment.student_epochs_per_stage=[2]", "experiment.dataset.train_per_class=10",
        "experiment.dataset.val_split=0.05", "experiment.dataset.batch_size=16", "experiment.eval_batch_size=256",
        "experiment.schedule.lr_warmup_epochs=0"]
LR_SPACE = {
    # 1e6 is a valid learning rate (the config validator accepts it) on which SGD diverges at
    # once: the non-finite loss survives SAFE-RETRY, so that trial's run fails
    "params": {"student_lr": {"type": "float", "low": 1e-6, "high": 1e6, "log": True}},
    "sampler": {"name": "tpe", "n_startup_trials": 2},
    "pruner": {"median": {"n_startup_trials": 1, "n_warmup_steps": 0}},
}
POSITIVE_LR_SPACE = {"params": {"student_lr": {"type": "float", "low": 0.01, "high": 0.2, "log": True}}}
GOOD, BAD, BROKEN, UNREADABLE = 0.1, 1e-6, 1e6, "fast"
ALSO_GOOD = GOOD      # the same good config again: trains to the same curve (deterministic)


# --------------------------------------------------------------------------- search spaces

def test_shipped_spaces_load_and_fit_their_experiments():
    default = load_space("default")
    assert default.param_names == ["ib_beta", "kd_alpha"]
    dist = {p.name: p for p in default.params}
    assert dist["ib_beta"].log and dist["ib_beta"].type == "float" and not dist["kd_alpha"].log
    values = default.complete({"ib_beta": 3.3e-4, "kd_alpha": 0.7234})
    assert values["ce_alpha"] == 0.2766
    # strict_mode holds for every trial of the default space (ce_alpha = 1 - kd_alpha)
    cfg = resolve_experiment("L1_ib", ["experiment.strict_mode=true"] + default.overrides(values)).cfg
    assert (cfg["ib_beta"], cfg["kd_alpha"], cfg["ce_alpha"]) == (3.3e-4, 0.7234, 0.2766)
    with pytest.raises(ConfigError, match="strict_mode"):
        resolve_experiment("L1_ib", ["experiment.strict_mode=true", "experiment.kd_alpha=0.7234"])
    from asib_core.sweep.runner import preflight

    tau_lr = load_space("tau_lr")
    assert set(tau_lr.param_names) == {"tau", "student_lr"}
    for exp in ("quickstart", "L1_ib"):   # every searched key reaches the run with its value
        preflight(SweepSettings(exp=exp, space="tau_lr"), tau_lr)
        cfg = resolve_experiment(exp, tau_lr.overrides(tau_lr.complete({"tau": 2.345678901, "student_lr": 0.01}))).cfg
        assert cfg["tau_start"] == cfg["tau_end"] == cfg["tau"] == 2.345678901
    # a space over a key the experiment's method does not use is refused before any trial
    feat = parse_space("feat", "inline", {"params": {"feat_kd_alpha": {"type": "float", "low": 0.1, "high": 0.5}}})
    preflight(SweepSettings(exp="L1_ib", space="feat"), feat)
    with pytest.raises(ConfigError, match="feat_kd_alpha"):
        preflight(SweepSettings(exp="quickstart", space="feat"), feat)


def test_sweep_values_reach_the_config_exactly():
    space = parse_space("t", "inline", {"params": {"ib_beta": {"type": "float", "low": 1e-7, "high": 1.0, "log": True},
                                                   "kd_target": {"type": "categorical", "choices": ["avg", "synergy"]},
                                                   "tau_schedule": {"type": "categorical", "choices": [None]}}})
    value = 1.2345678901234567e-05
    cfg = resolve_experiment("L1_ib", space.overrides({"ib_beta": value, "kd_target": "avg", "tau_schedule": None})).cfg
    assert cfg["ib_beta"] == value and cfg["kd_target"] == "avg" and cfg["tau_schedule"] is None
    assert format_value(True) == "true" and format_value([2, 3]) == "[2,3]" and format_value("a b") == "'a b'"


@pytest.mark.parametrize("raw, message", [
    ({"params": {}}, "at least one"),
    ({"params": {"x": {"type": "normal"}}}, "type"),
    ({"params": {"x": {"type": "float", "low": 1, "high": 1}}}, "low < high"),
    ({"params": {"x": {"type": "float", "low": 0, "high": 1, "log": True}}}, "low > 0"),
    ({"params": {"x": {"type": "float", "low": 0, "high": 1, "scale": 2}}}, "unknown keys"),
    ({"params": {"x": {"type": "categorical", "choices": [[1, 2]]}}}, "choices"),
    ({"params": {"x": {"type": "float", "low": 0, "high": 1}}, "derived": {"y": "1 - z"}}, "not a parameter"),
    ({"params": {"x": {"type": "float", "low": 0, "high": 1}}, "derived": {"y": "__import__('os')"}}, "may only use"),
    ({"params": {"x": {"type": "float", "low": 0, "high": 1}}, "sampler": {"name": "cmaes"}}, "sampler"),
    ({"params": {"x": {"type": "float", "low": 0, "high": 1}}, "pruner": {"median": {"patience": 2}}}, "pruner"),
    ({"params": {"x": {"type": "float", "low": 0, "high": 1}}, "search": 1}, "unknown keys"),
])
def test_bad_spaces_are_refused_naming_the_problem(raw, message):
    with pytest.raises(ConfigError, match=message):
        parse_space("bad", "inline", raw)


def test_storage_forms(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ASIB_ARTIFACT_ROOT", raising=False)
    store = open_storage("")
    assert store.kind == "journal" and store.description == f"journal file {tmp_path / 'mlruns/optuna/journal.log'}"
    assert open_storage(str(tmp_path / "j" / "s.log")).kind == "journal"
    store = open_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    assert store.kind == "rdb"
    from asib_core.sweep.storage import redact
    assert redact("postgresql://asib:secret@db:5432/optuna") == "postgresql://asib:***@db:5432/optuna"


def _ask_and_tell(journal: str, n_trials: int, out) -> None:
    """A worker without training: ask (under the ask lock) and finish trials at once."""
    from asib_core.sweep import study as st

    store = open_storage(journal)
    study = optuna.load_study(study_name=Path(journal).stem, storage=store.storage)
    taken = []
    while (trial := st.ask_next(study, store, n_trials, worker_identity(),
                                make_sampler=lambda seed: optuna.samplers.RandomSampler(seed=seed))) is not None:
        x = trial.suggest_float("x", 0.0, 1.0)
        study.tell(trial, x)
        taken.append((trial.number, x))
    out.put(taken)


def test_the_ask_lock_keeps_concurrent_workers_at_the_exact_total(tmp_path):
    import multiprocessing

    journal = str(tmp_path / "race.log")
    optuna.create_study(study_name="race", storage=open_storage(journal).storage, direction="maximize")
    # three workers with the same sampler seed (even the same worker index)
    # fork: the children only touch optuna (no torch), and skip re-importing the test module
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_ask_and_tell, args=(journal, 24, out)) for _ in range(3)]
    for proc in procs:
        proc.start()
    taken = [out.get(timeout=300) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    assert sorted(n for pairs in taken for n, _ in pairs) == list(range(24))
    assert len(optuna.load_study(study_name="race", storage=open_storage(journal).storage).trials) == 24
    assert len({x for pairs in taken for _, x in pairs}) == 24, "every trial draws from its own seed"
    # one worker on a fresh study draws the same values again (seeds depend on the trial count)
    first, second = tmp_path / "again1.log", tmp_path / "again2.log"
    for path in (first, second):
        optuna.create_study(study_name=path.stem, storage=open_storage(str(path)).storage, direction="maximize")
        _ask_and_tell(str(path), 5, out)
    assert out.get(timeout=10) == out.get(timeout=10)


def test_each_worker_takes_one_gpu_when_several_are_visible(monkeypatch):
    from asib_core.sweep.runner import worker_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert worker_device({"device": "cuda"}, [], 1) == ([], "cpu (no CUDA device visible)")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: f"GPU{i}")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    assert worker_device({"device": "cuda"}, [], 4) == (["experiment.device=cuda:1"], "cuda:1 of 3 (GPU1)")
    assert worker_device({"device": "auto"}, [], 0)[0] == ["experiment.device=cuda:0"]
    assert worker_device({"device": "cpu"}, [], 2)[0] == []
    assert worker_device({"device": "cuda:2"}, ["experiment.device=cuda:2"], 0)[0] == []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert worker_device({"device": "cuda"}, [], 3) == ([], "cuda:0 (GPU0)")


def test_mlproject_sweep_entry_declares_the_issue_parameters():
    entry = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]["sweep"]
    assert {"exp", "n_trials", "space", "study_name", "storage", "sampler_seed", "pruner", "overrides",
            "worker"} <= set(entry["parameters"])
    assert entry["command"].startswith("python -m pipelines.sweep ")


# --------------------------------------------------------------------------- sweeps

@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """One working directory and tracking store for the sweep tests (each uses its own study)."""
    work = tmp_path_factory.mktemp("sweep")
    (work / "lr.yaml").write_text(yaml.safe_dump(LR_SPACE))
    (work / "lr_positive.yaml").write_text(yaml.safe_dump(POSITIVE_LR_SPACE))
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME",
                                            "ASIB_ARTIFACT_ROOT")}
    old_cwd, old_threads = os.getcwd(), torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a shared machine: one thread is several times faster
    os.chdir(work)
    for key in saved:
        os.environ.pop(key, None)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    try:
        yield work
    finally:
        os.chdir(old_cwd)
        torch.set_num_threads(old_threads)
        set_environ(saved)


def study_runs(study_name: str):
    client = MlflowClient()
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(ids, f"tags.`optuna.study_name` = '{study_name}'", max_results=500)


def trial_runs(study_name: str):
    return [r for r in study_runs(study_name) if r.data.tags.get("step") != "sweep"]


def enqueue(storage: str, name: str, *lrs: float) -> None:
    study = optuna.create_study(study_name=name, storage=open_storage(storage).storage, direction="maximize")
    for lr in lrs:
        study.enqueue_trial({"student_lr": lr}, skip_if_exists=False)


@pytest.fixture(scope="module")
def small_sweep(home):
    """Five trials: lr 0.1 (COMPLETE), lr -1 (FAIL in its run), lr 1e-6 (PRUNED), "fast" (FAIL
    before its run), lr 0.1 again (COMPLETE: a good trial after a good one is not pruned)."""
    enqueue("", "small", GOOD, BROKEN, BAD, UNREADABLE, ALSO_GOOD)
    settings = SweepSettings(exp="quickstart", space=str(home / "lr.yaml"), n_trials=5, study_name="small",
                             pruner="median", overrides=list(FAST))
    return settings, run_sweep(settings)


def test_small_sweep_has_one_nested_run_per_trial_with_its_state(small_sweep):
    settings, result = small_sweep
    assert [(o.number, o.state) for o in result.outcomes] == [(0, "COMPLETE"), (1, "FAIL"), (2, "PRUNED"),
                                                              (3, "FAIL"), (4, "COMPLETE")]
    runs = {int(r.data.tags["optuna.trial_number"]): r for r in trial_runs("small")}
    assert sorted(runs) == [0, 1, 2, 3, 4]
    expected = {0: ("FINISHED", "COMPLETE", GOOD), 1: ("FAILED", "FAIL", BROKEN), 2: ("KILLED", "PRUNED", BAD),
                4: ("FINISHED", "COMPLETE", ALSO_GOOD)}
    for number, (status, state, lr) in expected.items():
        run = runs[number]
        tags = run.data.tags
        assert run.info.status == status, number
        assert tags["optuna.state"] == state and tags["optuna.study_name"] == "small"
        assert tags["mlflow.parentRunId"] == result.parent_run_id
        assert len(tags["config_sha256"]) == 64
        assert float(run.data.params["trial.student_lr"]) == lr
        assert run.info.run_id == result.outcomes[number].run_id
    assert "SAFE-RETRY failed" in runs[1].data.tags["asib.error"]      # diverged inside the run
    assert "val/acc" not in runs[1].data.metrics
    unreadable = runs[3]                                                    # failed before any run
    assert unreadable.info.status == "FAILED" and unreadable.data.tags["optuna.state"] == "FAIL"
    assert unreadable.data.tags["mlflow.parentRunId"] == result.parent_run_id
    assert unreadable.data.tags["asib.error"].startswith("ValueError") and "fast" in unreadable.data.tags["asib.error"]
    assert "val/best_acc" in runs[0].data.metrics
    # the objective is the validation accuracy: the study's value is the run's val/best_acc
    assert result.outcomes[0].value == runs[0].data.metrics["val/best_acc"]


def test_pruning_stops_the_trial_that_does_not_learn(small_sweep):
    _, result = small_sweep
    pruned = trial_runs("small")
    pruned = next(r for r in pruned if r.data.tags["optuna.trial_number"] == "2")
    assert pruned.info.status == "KILLED"
    assert pruned.data.tags["asib.pruned"].startswith("pruned by the median pruner after epoch 1")
    assert "asib.error" not in pruned.data.tags
    study = optuna.load_study(study_name="small", storage=open_storage("").storage)
    trials = study.get_trials()
    assert trials[0].intermediate_values.keys() == {1, 2}      # one report per epoch
    assert list(trials[2].intermediate_values) == [1]          # stopped after its first epoch
    assert trials[2].state == optuna.trial.TrialState.PRUNED
    # the good trial after the good one: reported both epochs, completed, not pruned
    assert trials[4].state == optuna.trial.TrialState.COMPLETE
    assert trials[4].intermediate_values.keys() == {1, 2}
    assert trials[4].intermediate_values == trials[0].intermediate_values
    assert "asib.pruned" not in next(r for r in trial_runs("small")
                                     if r.data.tags["optuna.trial_number"] == "4").data.tags


def test_resource_pruners_are_built_and_prune(home):
    """Successive halving and Hyperband with a minimum resource of one epoch: the bad trial
    after a good one stops at its first rung (epoch 1); the good one completes."""
    space = home / "lr_rungs.yaml"
    space.write_text(yaml.safe_dump(LR_SPACE | {"pruner": {"successive_halving": {"min_resource": 1},
                                                           "hyperband": {"min_resource": 1, "reduction_factor": 3}}}))
    for pruner in ("successive_halving", "hyperband"):
        name = f"rungs-{pruner}"
        enqueue("", name, GOOD, BAD)
        result = run_sweep(SweepSettings(exp="quickstart", space=str(space), n_trials=2, study_name=name,
                                         pruner=pruner, overrides=list(FAST)))
        assert [(o.number, o.state) for o in result.outcomes] == [(0, "COMPLETE"), (1, "PRUNED")], pruner
        trials = optuna.load_study(study_name=name, storage=open_storage("").storage).get_trials()
        assert list(trials[1].intermediate_values) == [1] and list(trials[0].intermediate_values) == [1, 2]
        run = next(r for r in trial_runs(name) if r.data.tags["optuna.trial_number"] == "1")
        assert run.data.tags["asib.pruned"].startswith(f"pruned by the {pruner} pruner after epoch 1")
        assert MlflowClient().get_run(result.parent_run_id).data.params["sweep.pruner"] == pruner


ONE_EPOCH = [o for o in FAST if "student_epochs_per_stage" not in o] + ["experiment.student_epochs_per_stage=[1]"]


def test_sampler_seed_reproduces_the_trials_and_samplers_are_selectable(home):
    """Through the entry point: the same sampler_seed gives the same trials (the model-based
    second trial too), another seed other trials; sampler=gp picks Optuna's GP sampler."""
    from pipelines.sweep import main

    space = home / "lr_model.yaml"
    space.write_text(yaml.safe_dump({"params": POSITIVE_LR_SPACE["params"],
                                     "sampler": {"name": "tpe", "n_startup_trials": 1}}))

    def sweep(name: str, seed: int, *extra: str) -> list:
        code = main(["exp=quickstart", f"space={space}", "n_trials=2", f"study_name={name}", f"sampler_seed={seed}",
                     "pruner=none", "overrides=" + " ".join(ONE_EPOCH), *extra])
        assert code == 0
        return optuna.load_study(study_name=name, storage=open_storage("").storage).get_trials()

    first, again, other = sweep("seed-a", 7), sweep("seed-b", 7), sweep("seed-c", 8)
    assert [t.params for t in first] == [t.params for t in again]
    assert [t.value for t in first] == [t.value for t in again]        # same trials, same training
    assert [t.params for t in other] != [t.params for t in first]
    assert first[0].params != first[1].params
    gp = sweep("seed-gp", 7, "sampler=gp")
    assert [t.state.name for t in gp] == ["COMPLETE", "COMPLETE"]
    assert gp[0].params == first[0].params          # the startup trial is drawn alike, the next by the GP
    parents = {r.data.tags["optuna.study_name"]: r for r in study_runs("seed-gp") + study_runs("seed-a")
               if r.data.tags.get("step") == "sweep"}
    assert parents["seed-gp"].data.params["sweep.sampler"] == "gp"
    assert parents["seed-a"].data.params["sweep.sampler"] == "tpe"
    assert parents["seed-a"].data.params["sweep.sampler_seed"] == "7"


def test_parent_run_reports_best_trials_plots_and_a_best_config_file(small_sweep, home):
    settings, result = small_sweep
    client = MlflowClient()
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["step"] == "sweep"
    best = max((o for o in result.outcomes if o.state == "COMPLETE"), key=lambda o: (o.value, -o.number))
    assert parent.data.metrics["best_value"] == best.value
    assert parent.data.metrics["n_complete"] == 2 and parent.data.metrics["n_pruned"] == 1
    assert parent.data.metrics["n_fail"] == 2
    assert float(parent.data.params["best.student_lr"]) == {0: GOOD, 4: ALSO_GOOD}[best.number]
    assert parent.data.tags["sweep.best_trial"] == str(best.number)
    names = {a.path for a in client.list_artifacts(result.parent_run_id, "plots")}
    assert {"plots/optimization_history.png", "plots/param_importances.png",
            "plots/parallel_coordinate.png"} <= names
    csv = Path(mlflow.artifacts.download_artifacts(run_id=result.parent_run_id, artifact_path="trials.csv"))
    lines = csv.read_text().strip().splitlines()
    assert len(lines) == 6 and {"COMPLETE", "FAIL", "PRUNED"} <= {line.split(",")[-1] for line in lines[1:]}
    # the override file is what `-e distill -P overrides="$(cat FILE)"` passes: it gives the best
    # trial's locked config
    text = result.best_file.read_text().strip()
    assert result.best_file == home / "experiments/sweeps/small/best_overrides.txt"
    exp, overrides = parse_exp_args([f"exp={settings.exp}", f"overrides={text}"])
    best_run = client.get_run(best.run_id)
    assert resolve_experiment(exp, overrides).sha256 == best_run.data.tags["config_sha256"]
    assert not list((home / "checkpoints").rglob("*.pt")), "trial states are removed"


def test_a_resumed_study_continues_its_trial_count(small_sweep, home):
    settings, first = small_sweep
    with pytest.raises(ConfigError, match="was created for"):
        run_sweep(SweepSettings(exp=settings.exp, space=settings.space, n_trials=6, study_name="small",
                                overrides=FAST[:-1]))
    again = run_sweep(SweepSettings(exp=settings.exp, space=settings.space, n_trials=6, study_name="small",
                                    pruner="none", overrides=list(FAST)))
    assert [o.number for o in again.outcomes] == [5] and again.parent_run_id != first.parent_run_id
    runs = trial_runs("small")
    assert sorted(int(r.data.tags["optuna.trial_number"]) for r in runs) == [0, 1, 2, 3, 4, 5]
    newest = next(r for r in runs if r.data.tags["optuna.trial_number"] == "5")
    assert newest.data.tags["mlflow.parentRunId"] == again.parent_run_id
    assert sum(again.counts.values()) == 6
    # the study is complete: one more call runs nothing and still reports
    done = run_sweep(SweepSettings(exp=settings.exp, space=settings.space, n_trials=6, study_name="small",
                                   pruner="none", overrides=list(FAST)))
    assert done.outcomes == [] and done.best is not None


def test_user_errors_stop_before_any_trial(home):
    from pipelines.sweep import main

    good = {"exp": "quickstart", "space": str(home / "lr.yaml"), "n_trials": "1", "study_name": "never"}
    for bad in ({"pruner": "sometimes"}, {"space": "nope"}, {"n_trials": "0"},
                {"overrides": "experiment.student_lr=0.1"},                 # a key the space searches
                {"overrides": "anchor=fair_baseline", "space": "default"},  # the anchor fixes kd_alpha
                {"space": "default"},                                        # KD without teachers
                {"storage": "postgresql+psycopg2://nobody@127.0.0.1:9/none"}):
        with pytest.raises(SystemExit) as info:
            main([f"{k}={v}" for k, v in (good | bad).items()])
        assert info.value.code == 2, bad
    assert not study_runs("never")


def _sweep_args(home: Path, name: str, storage: str, n_trials: int, overrides: list, space: str = "lr_positive.yaml"):
    return ["exp=quickstart", f"space={home / space}", f"n_trials={n_trials}", f"study_name={name}",
            f"storage={storage}", "pruner=none", "overrides=" + " ".join(overrides)]


SIX_EPOCHS = [o for o in FAST if "student_epochs_per_stage" not in o] + ["experiment.student_epochs_per_stage=[6]"]


def test_ctrl_c_ends_the_runs_killed_and_the_identical_command_retries_the_trial(home):
    """SIGINT to a real sweep worker in the middle of its first trial (sent at its third training
    batch, a deterministic moment: no race with a fast machine); then the identical command."""
    from asib_core.sweep import study as st

    journal = str(home / "ctrl-c.log")
    args = _sweep_args(home, "ctrl-c", journal, 2, SIX_EPOCHS)
    proc = start_worker(home, args, env={"ASIB_FAULT_AT": "epoch.batch#3", "ASIB_FAULT_SIGNAL": "INT"})
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 130, out[-3000:]
    assert "Traceback" not in out and "interrupted" in out and "same command" in out
    (dead, retry) = study_trials("ctrl-c", open_storage(journal).storage)
    assert dead.state == optuna.trial.TrialState.FAIL and retry.state == optuna.trial.TrialState.WAITING
    assert retry.params == dead.params
    assert st.count_trials(optuna.load_study(study_name="ctrl-c", storage=open_storage(journal).storage)) == 0
    (run,) = trial_runs("ctrl-c")
    assert run.info.status == "KILLED" and run.data.tags["optuna.state"] == "FAIL"
    assert run.data.tags["asib.error"] == "interrupted (KeyboardInterrupt)"
    parent = MlflowClient().get_run(run.data.tags["mlflow.parentRunId"])
    assert parent.info.status == "KILLED"
    assert not list((home / "checkpoints").rglob("trial-0-*")), "the interrupted trial's state is removed"
    assert not [r for r in runs_of("ctrl-c") if r.info.status == "RUNNING"]  # nested runs included

    resumed = start_worker(home, args)
    out = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, out[-3000:]
    trials = study_trials("ctrl-c", open_storage(journal).storage)
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE", "COMPLETE"]
    assert trials[1].params == dead.params                     # the retry ran the interrupted parameters
    runs = {int(r.data.tags["optuna.trial_number"]): r for r in trial_runs("ctrl-c")}
    assert {n: r.info.status for n, r in runs.items()} == {0: "KILLED", 1: "FINISHED", 2: "FINISHED"}
    assert float(runs[1].data.params["trial.student_lr"]) == dead.params["student_lr"]
    assert not [r for r in runs_of("ctrl-c") if r.info.status == "RUNNING"]


def _dead_identity() -> str:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    return f"{socket.gethostname()}:{done.stdout.strip()}:1.0"


def _orphan(study, client, experiment_id: str, owner: str, state_dir: Path):
    """What a worker killed mid-trial leaves: a RUNNING trial with its marks, a RUNNING parent
    run, a RUNNING trial run, and the trial's state folder."""
    from asib_core.sweep import recovery as rc

    parent = client.create_run(experiment_id, tags={"optuna.study_name": study.study_name, "step": "sweep",
                                                    rc.IDENTITY_TAG: owner})
    trial = study.ask()
    trial.suggest_float("x", 0.0, 1.0)
    uid = f"uid-{study.study_name}-{trial.number}"
    run = client.create_run(experiment_id, tags={"optuna.study_name": study.study_name, "sweep.trial_uid": uid,
                                                 "optuna.trial_number": str(trial.number), rc.IDENTITY_TAG: owner,
                                                 "mlflow.parentRunId": parent.info.run_id})
    state_dir.mkdir(parents=True)
    (state_dir / "last.pt").write_bytes(b"state")
    for key, value in {rc.WORKER_ATTR: owner, rc.UID_ATTR: uid, rc.PARENT_ATTR: parent.info.run_id,
                       rc.STATE_ATTR: str(state_dir)}.items():
        trial.set_user_attr(key, value)
    return trial, parent.info.run_id, run.info.run_id


def test_a_dead_workers_trial_is_retried_and_its_runs_closed(home):
    """A worker process of this host that is gone: the next ask fails its trial, closes its
    runs and hands out the retry (same parameters) first."""
    from asib_core.sweep import recovery as rc
    from asib_core.sweep import study as st

    client = MlflowClient()
    exp = client.create_experiment("orphans")
    store = open_storage(str(home / "orphan.log"))
    study = optuna.create_study(study_name="orphan", storage=store.storage, direction="maximize")
    orphan, parent, run = _orphan(study, client, exp, _dead_identity(), home / "orphan-state")
    quiet_parent = client.create_run(exp, tags={"optuna.study_name": "orphan", "step": "sweep",
                                                rc.IDENTITY_TAG: _dead_identity()})   # died between trials
    retry = st.ask_next(study, store, 5, worker_identity())
    trials = study.get_trials()
    assert trials[orphan.number].state == optuna.trial.TrialState.FAIL
    assert retry.number == orphan.number + 1 and retry.params == trials[orphan.number].params
    assert rc.retry_history(trials[retry.number]) == [orphan.number]
    assert retry.user_attrs[rc.WORKER_ATTR] == worker_identity()
    assert all(not retry.user_attrs.get(key) for key in rc.ATTEMPT_ATTRS)   # no marks of the dead attempt
    assert st.count_trials(study) == 1                       # the retry counts, the dead trial does not
    for run_id in (parent, run):
        assert client.get_run(run_id).info.status == "KILLED"
    assert client.get_run(run).data.tags[rc.RETRIED_TAG] == str(retry.number)
    assert not (home / "orphan-state").exists()
    # the parent of a worker that died between trials: closed when a worker of this host starts
    assert client.get_run(quiet_parent.info.run_id).info.status == "RUNNING"
    assert rc.close_dead_worker_runs("orphan") == [quiet_parent.info.run_id]
    # our own running trial is left alone
    assert st.ask_next(study, store, 5, worker_identity()).number == retry.number + 1
    assert study.get_trials()[retry.number].state == optuna.trial.TrialState.RUNNING


def test_heartbeats_fail_and_retry_a_trial_whose_worker_went_silent(home, tmp_path):
    """A database storage: a trial of a worker on another machine without a heartbeat for the
    grace period is failed and retried; one whose heartbeat thread runs is not."""
    from asib_core.sweep import recovery as rc
    from asib_core.sweep import study as st

    store = open_storage(f"sqlite:///{tmp_path / 'beats.db'}", heartbeat=1)     # stale after 3 s
    assert store.heartbeat == 1
    study = optuna.create_study(study_name="beats", storage=store.storage, direction="maximize")
    elsewhere = "another-machine:4242:1.0"                   # not a process of this host
    silent = st.ask_next(study, store, 5, elsewhere)
    silent.suggest_float("x", 0.0, 1.0)
    client = MlflowClient()
    exp = client.create_experiment("beats")
    parent = client.create_run(exp, tags={"optuna.study_name": "beats", "step": "sweep"})
    run = client.create_run(exp, tags={"optuna.study_name": "beats", "sweep.trial_uid": "silent-uid",
                                       "optuna.trial_number": str(silent.number)})
    silent.set_user_attr(rc.UID_ATTR, "silent-uid")
    silent.set_user_attr(rc.PARENT_ATTR, parent.info.run_id)
    beating = st.ask_next(study, store, 5, elsewhere)
    assert study.get_trials()[silent.number].state == optuna.trial.TrialState.RUNNING   # fresh heartbeat
    with rc.Heartbeat(store.storage, "beats", beating.number):
        time.sleep(5)                                        # > grace period: silent goes stale
        retry = st.ask_next(study, store, 5, worker_identity())
    trials = study.get_trials()
    assert trials[silent.number].state == optuna.trial.TrialState.FAIL
    assert trials[beating.number].state == optuna.trial.TrialState.RUNNING
    assert rc.retry_history(trials[retry.number]) == [silent.number] and retry.params == silent.params
    assert client.get_run(run.info.run_id).info.status == "KILLED"
    assert client.get_run(parent.info.run_id).info.status == "KILLED"
    assert client.get_run(run.info.run_id).data.tags[rc.RETRIED_TAG] == str(retry.number)


def test_optuna_dashboard_serves_the_project_storage(home, tmp_path):
    """optuna-dashboard as a real HTTP server on a journal study: the study and its trials come
    back over its JSON API as they were told."""
    import json

    journal = tmp_path / "dash.log"
    study = optuna.create_study(study_name="dash", storage=open_storage(str(journal)).storage, direction="maximize")
    told = []
    for _ in range(3):
        trial = study.ask()
        study.tell(trial, 1.0 - abs(trial.suggest_float("kd_alpha", 0.0, 1.0) - 0.5))
        told.append(trial.number)
    trials_told = {t.number: t for t in study.get_trials()}
    port = free_port()
    exe = shutil.which("optuna-dashboard")
    assert exe, "optuna-dashboard is a dependency (pyproject, conda.yaml): its command must be installed"
    proc = subprocess.Popen([exe, str(journal), "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"

    def get(path: str) -> dict:
        with urllib.request.urlopen(base + path, timeout=10) as answer:
            return json.loads(answer.read())

    try:
        assert wait_for(lambda: get("/api/studies") is not None, proc, poll=0.3, limit=300), proc.communicate()[0]
        (summary,) = get("/api/studies")["study_summaries"]
        assert summary["study_name"] == "dash" and summary["directions"] == ["maximize"]
        detail = get(f"/api/studies/{summary['study_id']}")
        assert detail["name"] == "dash"
        got = {t["number"]: t for t in detail["trials"]}
        assert sorted(got) == told
        for number, trial in trials_told.items():
            assert got[number]["state"] == "Complete"
            assert got[number]["values"] == [trial.value]
            assert [(p["name"], float(p["param_external_value"])) for p in got[number]["params"]] == \
                [("kd_alpha", trial.params["kd_alpha"])]
        assert [t["number"] for t in detail["best_trials"]] == [study.best_trial.number]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _workers(home: Path, name: str, storage: str, n_trials: int, count: int = 2) -> list:
    args = ["exp=quickstart", f"space={home / 'lr_positive.yaml'}", f"n_trials={n_trials}", f"study_name={name}",
            f"storage={storage}", "pruner=none", "overrides=" + " ".join(FAST)]
    env = env_for(home) | {"OMP_NUM_THREADS": "1"}  # the workers share the machine's cores
    procs = [subprocess.Popen([sys.executable, "-m", "pipelines.sweep", *args, f"worker={i}"], cwd=home,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(count)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out[-3000:]
    return outputs


def _check_shared_study(name: str, storage: str, n_trials: int) -> None:
    study = optuna.load_study(study_name=name, storage=open_storage(storage).storage)
    trials = study.get_trials()
    assert sorted(t.number for t in trials) == list(range(n_trials))
    assert all(t.state.is_finished() for t in trials)
    runs = trial_runs(name)
    numbers = sorted(int(r.data.tags["optuna.trial_number"]) for r in runs)
    assert numbers == list(range(n_trials)), "one nested run per trial, none lost, none twice"
    parents = [r for r in study_runs(name) if r.data.tags.get("step") == "sweep"]
    assert sorted(r.data.tags["sweep.worker"] for r in parents) == ["0", "1"]
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} <= {p.info.run_id for p in parents}
    assert {t.user_attrs["mlflow_run_id"] for t in trials} == {r.info.run_id for r in runs}


def test_two_workers_share_one_journal_study(home):
    journal = home / "shared" / "journal.log"
    outputs = _workers(home, "pair", str(journal), n_trials=4)
    _check_shared_study("pair", str(journal), 4)
    assert all("trials on cpu" in out or "trials on cuda" in out for out in outputs)


# --------------------------------------------------------------------------- PostgreSQL

@pytest.fixture(scope="session")
def postgres_url():
    """A throwaway PostgreSQL server on 127.0.0.1 (Debian's packages; .ci/run installs them)."""
    try:
        with throwaway_postgres() as url:
            yield url
    except NoPostgres as exc:
        pytest.skip(str(exc))


def test_two_workers_share_one_postgresql_study(home, postgres_url):
    _workers(home, "pg-pair", postgres_url, n_trials=3)
    _check_shared_study("pg-pair", postgres_url, 3)
    parent = next(r for r in study_runs("pg-pair") if r.data.tags.get("step") == "sweep")
    assert parent.data.tags["optuna.storage"].startswith("database postgresql+psycopg2://asib@127.0.0.1")
