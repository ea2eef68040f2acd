"""Issue 2: seed configs compose; effective config rules; lock hash; CLI."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from asib_core.config import ConfigError, ConfigLock, ConfigLockError, config_hash, list_experiments
from asib_core.config.effective import build_effective
from asib_core.config.finalize import finalize_config

SEED_EXPERIMENTS = ["L0_baseline", "L1_ib", "L2_cccp", "L3_ib_cccp_tadapt", "L4_full",
                    "overlap_100", "side_cccp_ppf", "sota_generic"]


def effective(exp, overrides=()):
    return finalize_config(build_effective(exp, list(overrides)))


@pytest.fixture(scope="module")
def seed_configs():
    return {exp: effective(exp) for exp in SEED_EXPERIMENTS}


def test_every_seed_experiment_is_known():
    assert set(SEED_EXPERIMENTS) <= set(list_experiments())


@pytest.mark.parametrize("exp,expected", [
    ("L0_baseline", {"ce_alpha": 0.65, "kd_alpha": 0.35, "kd_target": "avg", "use_ib": False,
                     "teacher1.name": "convnext_l", "teacher2.name": "resnet152",
                     "model.student.name": "resnet101_scratch", "student_epochs_per_stage": [20, 20, 20, 20],
                     "method_name": "asib", "optimizer": "adamw", "schedule.min_lr": 1e-6}),
    ("L1_ib", {"ib_beta": 5e-05, "kd_target": "synergy", "teacher1.name": "convnext_l",
               "model.student.name": "resnet101_scratch", "student_epochs_per_stage": [20, 20, 20, 20],
               "ib_mbm_lr_factor": 2, "enable_kd_after_syn_acc": 0.8, "tau_schedule": [3.5, 5.0]}),
    ("L2_cccp", {"use_cccp": True, "cccp_alpha": 0.2, "synergy_only_epochs": 6, "ib_mbm_lr_factor": 10,
                 "kd_target": "avg"}),
    ("L3_ib_cccp_tadapt", {"train_distill_adapter_only": True, "teacher_lr": 3e-06, "use_ib": True}),
    ("L4_full", {"use_partial_freeze": True, "student_freeze_level_schedule": [-1, -1, 1, 1],
                 "teacher2_freeze_bn": True, "dataset.batch_size": 64}),
    ("overlap_100", {"overlap_pct": 100, "teacher1.name": "convnext_s", "ib_beta": 0.005,
                     "student_epochs_per_stage": [15, 15], "dataset.batch_size": 128}),
    ("side_cccp_ppf", {"student_freeze_level": 1, "use_ib": False, "cccp_nt": 1}),
    ("sota_generic", {"teacher1.name": "resnet152", "teacher2.name": "convnext_s",
                      "model.student.name": "mobilenet_v2_scratch", "model.student.pretrained": False,
                      "distill_out_dim": 256, "ib_mbm_out_dim": 256, "student_epochs_per_stage": [240],
                      "use_partial_freeze": False, "ce_label_smoothing": 0.1}),
])
def test_seed_values_survive_composition(seed_configs, exp, expected):
    cfg = seed_configs[exp]
    for dotted, value in expected.items():
        node = cfg
        for part in dotted.split("."):
            node = node[part]
        assert node == value, f"{exp}: {dotted} = {node!r}, seed says {value!r}"


def test_experiment_beats_base_beats_method(seed_configs):
    # L0 sets ce_alpha 0.65 although the asib method file says 0.70 (fill-only promotion)
    assert seed_configs["L0_baseline"]["ce_alpha"] == 0.65
    # sota_generic leaves kd_ens_alpha unset but base sets it: base (0.0) counts as set at
    # experiment level, the method file's 0.25 fills nothing (decisions.md, Precedence corrected)
    assert seed_configs["sota_generic"]["kd_ens_alpha"] == 0.0
    # a key neither sets comes from the method file
    assert seed_configs["sota_generic"]["kd_target"] == "auto"
    # a key only base sets keeps base's value
    assert seed_configs["sota_generic"]["disagreement_max_batches"] == 10


@pytest.mark.parametrize("method", ["ab", "asib", "asib_stage", "at", "crd", "dkd", "fitnet", "ft",
                                    "reviewkd", "simkd", "sskd", "vanilla_kd", "ce"])
def test_every_method_file_composes(method):
    cfg = effective("sota_generic", [f"method={method}"])
    assert cfg["method_name"] == method
    # the experiment's explicit alphas win over the method file's
    assert (cfg["ce_alpha"], cfg["kd_alpha"]) == (0.65, 0.35)
    if method not in ("asib", "asib_stage"):
        assert cfg["use_ib"] is False and cfg["feat_kd_alpha"] == 0.0


@pytest.mark.parametrize("preset", ["ab", "asib", "at", "crd", "dkd", "fitnet", "ft", "reviewkd",
                                    "simkd", "sskd", "vanilla_kd"])
def test_every_alternative_method_file_composes(preset):
    cfg = effective("sota_generic", [f"method_preset={preset}"])
    assert cfg["method_name"] == preset


def test_method_specific_keys_arrive():
    cfg = effective("sota_generic", ["method=dkd"])
    assert (cfg["dkd_alpha"], cfg["dkd_beta"], cfg["kd_target"]) == (1.0, 2.0, "teacher")
    cfg = effective("sota_generic", ["method=fitnet"])
    assert cfg["hint_layer"] == "feat_4d_layer2" and cfg["hint_beta"] == 100.0


def test_hash_ignores_sanitised_keys_and_order():
    cfg = effective("L1_ib")
    base = config_hash(cfg)
    reordered = dict(reversed(list(cfg.items())))
    assert config_hash(reordered) == base
    for key, value in (("use_amp", False), ("csv_filename", "x.csv"), ("student_ep3_acc", 0.5),
                       ("optimizer", "sgd"), ("teacher1_ckpt", "/elsewhere.pth")):
        assert config_hash({**cfg, key: value}) == base, key


@pytest.mark.parametrize("key,value", [("ib_beta", 1e-4), ("kd_alpha", 0.4), ("tau", 5.0)])
def test_hash_changes_with_real_keys(key, value):
    cfg = effective("L1_ib")
    assert config_hash({**cfg, key: value}) != config_hash(cfg)


def test_nested_change_changes_hash():
    cfg = effective("L1_ib")
    changed = {**cfg, "dataset": {**cfg["dataset"], "batch_size": 32}}
    assert config_hash(changed) != config_hash(cfg)


def test_hash_is_identical_across_processes():
    code = ("from asib_core.config import resolve_experiment;"
            "print(resolve_experiment('L1_ib', ['experiment.seed=7'], for_run=False).sha256)")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
            for _ in range(2)}
    assert len(outs) == 1 and len(outs.pop()) == 64


def test_verify_catches_a_mutation_and_names_the_key():
    cfg = effective("L1_ib")
    lock = ConfigLock(cfg)
    lock.verify(cfg, "before_run")
    cfg["use_amp"] = False  # sanitised: allowed
    lock.verify(cfg, "before_safe_retry")
    cfg["ib_beta"] = 0.5
    cfg["dataset"]["batch_size"] = 8
    with pytest.raises(ConfigLockError) as err:
        lock.verify(cfg, "after_run")
    message = str(err.value)
    assert "ib_beta: 5e-05 -> 0.5" in message and "dataset.batch_size: 64 -> 8" in message
    assert "after_run" in message


def test_strict_mode_refuses_and_auto_renorm_rescales():
    with pytest.raises(ConfigError, match="ce_alpha \\+ kd_alpha must equal 1"):
        effective("L1_ib", ["experiment.strict_mode=true", "experiment.kd_alpha=0.5"])
    cfg = effective("L1_ib", ["experiment.strict_mode=true", "experiment.kd_alpha=0.5",
                              "experiment.auto_renorm=true"])
    assert cfg["ce_alpha"] == pytest.approx(0.65 / 1.15) and cfg["kd_alpha"] == pytest.approx(0.5 / 1.15)


def test_anchor_forces_its_values_and_protects_them():
    cfg = effective("L0_baseline", ["anchor=fair_baseline"])
    assert cfg["optimizer"] == "sgd" and cfg["student_lr"] == 0.1 and cfg["dataset"]["batch_size"] == 128
    assert cfg["strict_mode"] is True
    assert cfg["anchor"]["_pre_merge"]["optimizer"] == "adamw"
    from asib_core.config.effective import check_anchor
    cfg["student_lr"] = 0.2
    with pytest.raises(ConfigError, match="student_lr: anchor=0.1 effective=0.2"):
        check_anchor(cfg)


def test_cccp_multi_step_is_refused():
    with pytest.raises(ConfigError, match="cccp_nt=2"):
        effective("L2_cccp", ["experiment.cccp_nt=2"])


def test_small_student_gets_256_dims():
    cfg = effective("sota_generic", ["experiment.distill_out_dim=null"])
    assert cfg["distill_out_dim"] == 256 and cfg["ib_mbm_out_dim"] == 256 and cfg["ib_mbm_query_dim"] == 256


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "pipelines.config", *args], capture_output=True, text=True)


def test_cli_prints_effective_config_and_hash():
    out = run_cli("exp=L4_full")
    assert out.returncode == 0, out.stderr
    payload = json.loads(out.stdout)
    assert payload["exp"] == "L4_full" and len(payload["config_sha256"]) == 64
    # the printed hash is the lock of the same experiment built here, independently of the CLI
    assert payload["config_sha256"] == ConfigLock(effective("L4_full")).sha256
    assert payload["config_sha256"] != ConfigLock(effective("L4_full", ["experiment.ib_beta=0.5"])).sha256
    assert payload["config"]["student_freeze_level_schedule"] == [-1, -1, 1, 1]


def test_cli_unknown_experiment_lists_known():
    out = run_cli("exp=L9_magic")
    assert out.returncode == 2
    assert "unknown experiment 'L9_magic'" in out.stderr and "L1_ib" in out.stderr and "L4_full" in out.stderr


@pytest.mark.parametrize("override,needle", [
    ("experiment.ib_beta=abc", "ib_beta"),
    ("experiment.ib_beta", "malformed override"),
    ("experiment.ib_bta=1e-4", "ib_bta"),
    ("experiment.student_epochs_per_stage=[1,2", "student_epochs_per_stage"),
])
def test_cli_bad_overrides_exit_2_naming_the_key(override, needle):
    out = run_cli("exp=L1_ib", override)
    assert out.returncode == 2
    assert needle in out.stderr
