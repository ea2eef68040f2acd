"""Issue 14, item 1: every key's domain in keys.yaml, one validator, one paragraph.

The validator (asib_core/config/validate.py) checks a config against the ``range``/``choices``/
``rules`` of keys.yaml; ``resolve_experiment`` and ``finetune_config`` call it before any data or
model is touched. The domains are tied to the code that reads the values (dataset registry,
schedules, targets), so a new choice cannot be added to one and forgotten in the other.
"""
from __future__ import annotations

import math

import pytest
import yaml

from asib_core.config import ConfigError, resolve_experiment
from asib_core.config.reference import KEYS_FILE, load_reference
from asib_core.config.validate import (
    RULES, config_problems, domain_problem, parse_interval, refuse, validate_config,
)
from pipelines import _cli


def raw_sections() -> dict:
    return yaml.safe_load(KEYS_FILE.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------- intervals

@pytest.mark.parametrize("text,inside,outside", [
    ("[0, 1)", [0, 0.5, 0.999999], [-1e-9, 1, 1.5, math.nan, math.inf]),
    ("(0, inf)", [1e-12, 3, 1e300], [0, -1, math.nan, math.inf]),
    ("[1, inf)", [1, 2, 10 ** 12], [0, -1, 0.999]),
    ("[-1, inf)", [-1, 0, 7], [-2, -math.inf]),
    ("[0, 100]", [0, 100, 37.5], [-0.1, 100.01]),
    ("[0, inf]", [0, math.inf], [-1, math.nan]),
])
def test_interval_bounds_are_inclusive_or_exclusive_as_written(text, inside, outside):
    interval = parse_interval(text)
    assert all(v in interval for v in inside), [v for v in inside if v not in interval]
    assert not any(v in interval for v in outside), [v for v in outside if v in interval]


@pytest.mark.parametrize("text", ["0, 1", "[1, 0]", "[a, 1)", "[0; 1]", "{0, 1}"])
def test_malformed_intervals_are_errors_in_keys_yaml(text):
    with pytest.raises(ValueError, match="keys.yaml"):
        parse_interval(text)


# --------------------------------------------------------------------------- keys.yaml

def test_every_domain_parses_and_every_default_lies_inside_it():
    checked = 0
    for section in ("run", "finetune"):
        for key, spec in load_reference(section).items():
            if spec.range:
                parse_interval(spec.range)
                checked += 1
            assert spec.choices is None or len(spec.choices) >= 1, key
            if spec.default is not None and not key.startswith("anchor."):
                assert domain_problem(spec, spec.default) is None, f"{section}.{key}: default {spec.default!r}"
    assert checked > 100


def test_every_written_rule_has_its_check_and_every_check_is_written():
    written = {(section, key) for section, entries in raw_sections().items()
               for key, body in entries.items() if body.get("rules")}
    assert written == set(RULES), (
        f"rules without a check: {sorted(written - set(RULES))}; "
        f"checks without a rule text: {sorted(set(RULES) - written)}")


def test_numeric_keys_have_a_domain():
    """Every number a config carries has a range or choices, unless its meaning says it has no
    effect (accepted only so that the seed configs compose) or it is a pattern/record."""
    missing = []
    for section in ("run", "finetune"):
        for key, spec in load_reference(section).items():
            kinds = {t.strip() for t in spec.type.split("|")}
            numeric = kinds & {"int", "float"} or (kinds == {"list"} and key.endswith(("schedule", "weights")))
            inert = "No effect" in spec.meaning or "*" in key or key.startswith("anchor._")
            if numeric and not inert and spec.range is None and spec.choices is None:
                missing.append(f"{section}.{key}")
    assert not missing, missing


def test_choices_match_the_code_that_reads_them():
    from asib_core.data import dataset_names
    from asib_core.engine.finetune_schedules import KNOWN as FINETUNE_SCHEDULES
    from asib_core.methods.targets import LOGIT_TARGETS

    run, finetune = load_reference("run"), load_reference("finetune")
    assert set(run["dataset.name"].choices) == set(dataset_names()) == set(finetune["dataset.name"].choices)
    assert set(finetune["scheduler_type"].choices) == set(FINETUNE_SCHEDULES)
    assert set(LOGIT_TARGETS) <= set(run["kd_target"].choices)
    assert run["anchor.kd_target"].choices == run["kd_target"].choices
    assert run["anchor.optimizer"].choices == run["optimizer"].choices == ("sgd", "adamw")


def test_shipped_choices_are_accepted_by_the_code():
    """A value the validator lets through must not be refused later by the code that reads it."""
    import torch

    from asib_core.engine.amp import Precision
    from asib_core.engine.optim import build_optimizer
    from asib_core.engine.schedules import lr_multiplier

    run = load_reference("run")
    param = torch.nn.Parameter(torch.zeros(1))
    for kind in run["optimizer"].choices:
        build_optimizer(kind, [{"params": [param]}], lr=0.1, weight_decay=0.0)
    for dtype in run["amp_dtype"].choices:
        Precision(torch.device("cpu"), True, dtype)
    for kind in run["schedule.type"].choices:
        assert lr_multiplier({"type": kind}, 0.1, 10)(0) > 0


# --------------------------------------------------------------------------- the validator

def test_all_problems_of_a_config_in_one_paragraph():
    cfg = {"seed": -1, "kd_target": "best", "student_lr": math.nan, "dataset": {"batch_size": 0, "val_split": 1.5},
           "min_cw": 2.0, "max_cw": 1.0, "teacher_weights": [1.0, -1.0], "eval_batch_size": 0,
           "kd_alpha": "high", "ib_betta": 1.0}
    with pytest.raises(ConfigError) as info:
        validate_config(cfg)
    message = str(info.value)
    assert "\n" not in message and "(11 problems)" in message
    for needle in ("seed=-1", "[0, 4294967295]", "kd_target='best'", "'teacher', 'avg'", "student_lr=nan",
                   "NaN", "dataset.batch_size=0", "[1, inf)", "dataset.val_split=1.5", "(0, 1)",
                   "min_cw=2.0, max_cw=1.0", "teacher_weights=[1.0, -1.0]", "eval_batch_size=0",
                   "kd_alpha='high': expected float", "ib_betta", "did you mean ib_beta",
                   "docs/configuration.md"):
        assert needle in message, needle


def test_a_valid_config_has_no_problems_and_null_passes_where_the_type_allows_it():
    problems, notes = config_problems({"seed": 0, "tau_syn": None, "teacher_weights": None, "kd_max_ratio": None,
                                       "dataset": {"batch_size": 1, "val_split": 0.5, "train_per_class": None}})
    assert problems == [] and notes == []
    refuse([])  # nothing to refuse: no error


def test_list_elements_are_checked_one_by_one():
    problems, _ = config_problems({"student_freeze_level_schedule": [-1, 0, -2], "tau_schedule": [4.0, math.inf]})
    assert any(p.startswith("student_freeze_level_schedule=[-1, 0, -2]") and "[-1, inf)" in p for p in problems)
    assert any(p.startswith("tau_schedule=[4.0, inf]") and "infinite" in p for p in problems)


@pytest.mark.parametrize("cfg,needle", [
    ({"student_epochs_per_stage": [5, 5, 5], "num_stages": 2}, "give one epoch count per stage (2 entries)"),
    ({"student_epochs_per_stage": [0, 0], "num_stages": 2}, "train for 0 epochs"),
    ({"student_epochs_per_stage": 0, "num_stages": 3}, "train for 0 epochs"),
    ({"tau_start": 4.0, "tau_end": None}, "set both"),
    ({"tau_schedule": [4.0, 3.0, 2.0]}, "[start, end]"),
    ({"teacher_weights": [1.0], "teacher1": {"name": "a"}, "teacher2": {"name": "b"}}, "one weight per teacher"),
    ({"teacher_weights": [0.0, 0.0]}, "positive sum"),
    ({"kd_ens_alpha": 0.5, "kd_ens_alpha_max": 0.2}, "kd_ens_alpha_max must lie"),
    ({"device": "gpu"}, "cuda:N"),
])
def test_cross_key_rules(cfg, needle):
    problems, _ = config_problems(cfg)
    assert any(needle in p for p in problems), problems


@pytest.mark.parametrize("cfg", [
    {"student_epochs_per_stage": [5], "num_stages": 4},
    {"student_epochs_per_stage": [1, 0], "num_stages": 2},
    {"student_epochs_per_stage": 3, "num_stages": 2},
    {"tau_start": 4.0, "tau_end": 1.0},
    {"device": "cuda:3"}, {"device": "CPU"},
])
def test_cross_key_rules_accept_valid_combinations(cfg):
    assert config_problems(cfg)[0] == []


def test_finetune_rules_and_domains():
    problems, _ = config_problems({"subset": 1, "overlap_pct": None, "restart_multiplier": 1.5,
                                   "scheduler_type": "linear", "finetune_lr": 0.0}, "finetune")
    text = " ".join(problems)
    for needle in ("subset=1 without overlap_pct", "restart_multiplier=1.5", "scheduler_type='linear'",
                   "finetune_lr=0.0"):
        assert needle in text


# --------------------------------------------------------------------------- resolution paths

@pytest.mark.parametrize("override,needle", [
    ("experiment.num_stages=0", "num_stages=0"),          # would be derived as 1 by finalize_config
    ("experiment.num_stages=abc", "num_stages='abc'"),    # would crash in finalize_config
    ("experiment.dataset.batch_size=-1", "dataset.batch_size=-1"),
    ("experiment.student_lr=nan", "student_lr=nan"),
    ("seed=-1", "seed=-1"),
])
def test_resolve_experiment_refuses_before_deriving(override, needle):
    with pytest.raises(ConfigError) as info:
        resolve_experiment("quickstart", [override])
    assert needle in str(info.value) and "experiment 'quickstart'" in str(info.value)


def test_printing_a_config_refuses_invalid_values_too():
    with pytest.raises(ConfigError, match="ib_beta=-0.5"):
        resolve_experiment("L1_ib", ["experiment.ib_beta=-0.5"], for_run=False)


def test_finetune_config_refuses_with_the_same_paragraph():
    from asib_core.pipeline.finetune import finetune_config

    cfg = finetune_config("resnet20", "digits", [])
    assert cfg["dataset"]["batch_size"] == cfg["batch_size"]
    with pytest.raises(ConfigError) as info:
        finetune_config("resnet20", "digits", ["batch_size=0", "finetune_lr=nan", "seed=-3"])
    message = str(info.value)
    assert "(3 problems)" in message and "batch_size=0" in message and "finetune_lr=nan" in message
    assert "dataset.batch_size" not in message  # derived from batch_size, reported once


# --------------------------------------------------------------------------- command-line counts

@pytest.mark.parametrize("name,text,value", [("nproc", "2", 2), ("nproc", "2.0", 2), ("n_trials", "20", 20),
                                             ("worker", "0", 0), ("sampler_seed", "7.0", 7)])
def test_count_options_accept_whole_numbers(name, text, value):
    assert _cli.whole_number(name, text) == value


@pytest.mark.parametrize("name,text", [("nproc", "abc"), ("nproc", "0"), ("nproc", "1.5"), ("n_trials", "nan"),
                                       ("n_trials", "-3"), ("worker", "-1"), ("sampler_seed", "inf")])
def test_count_options_refuse_anything_else(name, text):
    with pytest.raises(ConfigError) as info:
        _cli.whole_number(name, text)
    assert f"{name}={text!r}" in str(info.value) and "whole number" in str(info.value)


def test_an_unwritable_place_is_one_sentence_and_other_errors_are_not_masked(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OSError) as info:
        (tmp_path / "afile" / "out").mkdir(parents=True)
    sentence = _cli.unwritable(info.value)
    assert sentence.startswith(f"cannot write {tmp_path / 'afile'}") and "writable" in sentence
    assert _cli.unwritable(FileNotFoundError(2, "No such file or directory", "x")) is None
    assert _cli.unwritable(RuntimeError("a bug")) is None
