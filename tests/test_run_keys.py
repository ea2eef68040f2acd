"""Issue #15, item 3: the run-level keys act (log_level, results_dir via configs/hydra.yaml,
compute_teacher_eval, early_stopping_min_delta in one unit) and the seed's registry files are
checked. The end-to-end side (every implemented key read by a seed run, the results files, the
teacher metrics, exp_id in the run name) is in tests/test_asib_seed_experiments.py."""
from __future__ import annotations

import logging
import shutil
from types import SimpleNamespace

import pytest
import torch

from asib_core.config.compose import config_dir
from asib_core.config.errors import ConfigError
from asib_core.engine.amp import Precision
from asib_core.engine.runner import RunState, TrainingRun
from asib_core.models.seed_registry import seed_registry, seed_registry_problems
from asib_core.pipeline import distill, finetune
from asib_core.pipeline.results import apply_log_level, results_folder
from asib_core.pipeline.teacher_report import (FROM_TAG, KEY_TAG, log_teacher_report, report_keys,
                                                 teacher_eval_key, teacher_report)
from tests.asib_helpers import asib_cfg, tiny_data


@pytest.fixture
def configs(tmp_path, monkeypatch):
    """A copy of configs/ that ASIB_CONFIG_DIR points at."""
    copy = tmp_path / "configs"
    shutil.copytree(config_dir(), copy)
    monkeypatch.setenv("ASIB_CONFIG_DIR", str(copy))
    return copy


def test_log_level_sets_the_project_loggers():
    loggers = [logging.getLogger(n) for n in ("asib.distill", "asib_core.pipeline.teacher_splits")]
    before = {n: logging.getLogger(n).level for n in ("asib", "asib_core")}
    try:
        apply_log_level({"log_level": "WARNING"})
        assert not any(lg.isEnabledFor(logging.INFO) for lg in loggers)
        apply_log_level({"log_level": "DEBUG"})
        assert all(lg.isEnabledFor(logging.DEBUG) for lg in loggers)
    finally:
        for name, level in before.items():
            logging.getLogger(name).setLevel(level)


def test_results_folder_follows_hydra_yaml(configs, tmp_path):
    cfg = {"results_dir": str(tmp_path / "res"), "exp_id": "e1"}
    folder = results_folder(cfg, "abcdef0123")
    assert folder.parent == tmp_path / "res" and len(folder.name) == len("20260101_120000")
    (configs / "hydra.yaml").write_text("hydra:\n  run:\n    dir: ${experiment.results_dir}/${experiment.exp_id}\n")
    assert results_folder(cfg, "abcdef0123") == tmp_path / "res" / "e1"
    (tmp_path / "res" / "e1").mkdir(parents=True)   # taken: the run id keeps two runs apart
    assert results_folder(cfg, "abcdef0123") == tmp_path / "res" / "e1_abcdef01"


@pytest.mark.parametrize("text, word", [
    ("hydra:\n  job:\n    chdir: true\n", "chdir"),
    ("hydra:\n  sweep:\n    dir: x\n", "hydra.sweep.dir"),
])
def test_hydra_yaml_settings_that_would_not_apply_are_refused(configs, tmp_path, text, word):
    (configs / "hydra.yaml").write_text(text)
    with pytest.raises(ConfigError, match=word):
        results_folder({"results_dir": str(tmp_path), "exp_id": "e"}, "r")


class _LinearTeacher(torch.nn.Module):
    """Nearest class mean of the pixels plus seeded noise on the logits' weights: varied,
    partly agreeing predictions (an untrained CNN predicts one class)."""

    def __init__(self, means: torch.Tensor, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = means + 2 * means.std() * torch.randn(means.shape, generator=g)

    def forward(self, x):
        return {"logit": x.flatten(1) @ self.weight.T}


def _report_setup(tmp_path):
    cfg = asib_cfg("L0_baseline", ["experiment.dataset.train_per_class=2"])
    data = tiny_data(cfg, per_class=2)
    x_val, y_val, _ = next(iter(data.loader("val", batch_size=10**6)))
    means = torch.stack([x_val[y_val == c].flatten(1).mean(0) for c in range(10)])
    teachers = [_LinearTeacher(means, 1), _LinearTeacher(means, 2)]
    files = []
    for i, t in enumerate(teachers):
        files.append(tmp_path / f"t{i}.pt")
        torch.save(t.weight, files[-1])
    return cfg, data, teachers, files


def test_teacher_report_matches_an_independent_count_with_the_disagreement_limits(tmp_path):
    cfg, data, teachers, _ = _report_setup(tmp_path)
    x_val, y_val, _ = next(iter(data.loader("val", batch_size=10**6)))
    x_test, y_test, _ = next(iter(data.loader("test", batch_size=10**6)))
    with torch.no_grad():
        val = [t(x_val)["logit"].argmax(1) for t in teachers]
        test = [t(x_test)["logit"].argmax(1) for t in teachers]
    # limits: 5 batches of 16 = 80 samples, 40 samples = 3 whole batches = 48: the smaller wins
    keys = {"compute_teacher_eval": True, "eval_batch_size": 16, "disagreement_max_batches": 5,
            "disagreement_max_samples": 40}
    got = teacher_report(teachers, data, Precision(torch.device("cpu"), False), {**cfg, **keys})
    head = slice(0, 48)
    expected = {"teachers/disagreement": (val[0][head] != val[1][head]).float().mean().item(),
                "teachers/joint_error": ((val[0][head] != y_val[head]) & (val[1][head] != y_val[head])).float().mean().item()}
    for i in (0, 1):
        expected[f"teacher{i + 1}/val_acc"] = (val[i] == y_val).float().mean().item()
        expected[f"teacher{i + 1}/test_acc"] = (test[i] == y_test).float().mean().item()
    assert len(y_val) > 48 and 0 < expected["teachers/disagreement"] < 1 and 0 < expected["teacher1/val_acc"] < 1
    assert got == pytest.approx(expected, abs=1e-6)


def _logged_report(run_id: str) -> tuple[dict, dict]:
    from mlflow.tracking import MlflowClient

    run = MlflowClient().get_run(run_id)
    return ({k: v for k, v in run.data.metrics.items() if k.startswith("teacher")},
            {k: v for k, v in run.data.tags.items() if k.startswith("asib.teacher_eval")})


def test_teacher_report_is_switched_by_its_key_computed_once_and_copied_by_equal_runs(workdir):
    from asib_core.tracking.runs import open_run

    cfg, data, teachers, files = _report_setup(workdir)
    precision = Precision(torch.device("cpu"), False)
    calls = []
    for t in teachers:
        t.register_forward_hook(lambda *_: calls.append(1))
    runs = []
    for switch in (False, True, True):
        with open_run(experiment="report", run_name="r", tags={}) as run:
            log_teacher_report(run, teachers, files, data, precision, {**cfg, "compute_teacher_eval": switch})
            runs.append((run.run_id, len(calls)))
    off, first, second = (_logged_report(rid) for rid, _ in runs)
    assert off == ({}, {})
    assert first[0] == pytest.approx(teacher_report(teachers, data, precision, cfg))
    assert set(first[0]) == report_keys(2) and set(first[1]) == {KEY_TAG}
    assert runs[1][1] > 0 and runs[2][1] == runs[1][1]          # the third run evaluated nothing
    assert second[0] == first[0] and second[1] == {KEY_TAG: first[1][KEY_TAG], FROM_TAG: runs[1][0]}
    # another teacher file or another disagreement cut is another key: computed again
    torch.save(teachers[1].weight * 2, files[1])
    with open_run(experiment="report", run_name="r", tags={}) as run:
        log_teacher_report(run, teachers, files, data, precision, {**cfg, "compute_teacher_eval": True})
    third = _logged_report(run.run_id)
    assert set(third[1]) == {KEY_TAG} and third[1][KEY_TAG] != first[1][KEY_TAG]
    key = teacher_eval_key(cfg, files, data, precision.device)
    assert key != teacher_eval_key({**cfg, "disagreement_max_samples": 7}, files, data, precision.device)


def _stops_after(spec, accuracies) -> list[bool]:
    """Which of the epochs with these validation accuracies count as an improvement."""
    run = SimpleNamespace(state=RunState(), spec=spec, _save_best=lambda: None)
    improved = []
    for acc in accuracies:
        before = run.state.best_val
        TrainingRun._track_best(run, acc)
        improved.append(run.state.best_val != before)
    return improved


def test_early_stopping_min_delta_is_in_percentage_points_in_distill_and_finetune():
    cfg = asib_cfg("L0_baseline", ["experiment.early_stopping_min_delta=1.0"])
    specs = {"distill": distill.fit_spec(cfg),
             "finetune": finetune.FitSpec(stage_epochs=[3], **finetune.early_stopping(
                 {"early_stopping_min_delta": 1.0, "early_stopping_patience": 0}))}
    for step, spec in specs.items():
        # 1.0 = one point of accuracy: +0.5 points is no improvement, +2 points is
        assert _stops_after(spec, [0.50, 0.505, 0.52]) == [True, False, True], step


def test_seed_registry_files_are_checked_against_the_model_registry(configs):
    assert seed_registry_problems() == []
    assert seed_registry()["teacher"]["convnext_l"] == "convnext_l"
    text = (configs / "registry_key.yaml").read_text().replace("- convnext_l", "- convnext_xl")
    (configs / "registry_key.yaml").write_text(text)
    problems = seed_registry_problems()
    assert any("list different keys" in p for p in problems)
    assert any("convnext_xl" in p and "configs/model/teacher/convnext_xl.yaml" in p for p in problems)
    (configs / "model" / "teacher" / "convnext_xl.yaml").write_text("name: convnext_xxl\n")
    assert any("'convnext_xxl', which is not a registered model" in p for p in seed_registry_problems())
