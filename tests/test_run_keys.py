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
from asib_core.models import create_model
from asib_core.models.seed_registry import seed_registry, seed_registry_problems
from asib_core.pipeline import distill, finetune
from asib_core.pipeline.results import apply_log_level, results_folder
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


def test_compute_teacher_eval_switches_the_teacher_report():
    cfg = asib_cfg("L0_baseline", ["experiment.dataset.train_per_class=2"])
    data = tiny_data(cfg, per_class=2)
    teachers = [create_model(n, num_classes=10, pretrained=False, small_input=True).eval()
                for n in ("resnet8", "resnet8")]
    precision = Precision(torch.device("cpu"), False)
    on = distill.teacher_report(teachers, [], data, precision, {**cfg, "compute_teacher_eval": True})
    assert {"teacher1/val_acc", "teacher1/test_acc", "teacher2/val_acc", "teacher2/test_acc",
            "teachers/disagreement", "teachers/joint_error"} == set(on)
    assert distill.teacher_report(teachers, [], data, precision, {**cfg, "compute_teacher_eval": False}) == {}


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
