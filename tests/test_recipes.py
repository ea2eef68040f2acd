"""Paper recipes (``recipe=NAME``, configs/recipe) and the baselines' fidelity to the reference code.

1. Every recipe resolves, with ``exp=sota_generic`` and the low-data benchmark's common
   overrides (on digits), to exactly the weights of ../shared/docs/kd-reference.md, with the
   KD cap, Mixup, CutMix, label smoothing, the global KD warm-up and the tau schedule off. The
   expected values below are written from kd-reference.md, not read from the recipe files.
2. Overrides still win over a recipe; a clashing ``method=``/``anchor=`` is refused.
3. FT's factor loss against an independent formula (RepDistiller's ``l2n(mean_c f^2)``), DKD's
   warm-up from its own key scaled to the run, AB's connector only when shapes differ, CRD's
   128-d embedding and negatives without repeats within an anchor's draw.
4. Two recipes run one tiny digits epoch end to end.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from asib_core.config import ConfigError, build_effective, config_dir, finalize_config
from asib_core.config.compose import list_recipes
from asib_core.contract import Batch, TrainContext
from asib_core.engine.schedules import tau_for_epoch
from asib_core.methods import build_distiller
from asib_core.methods.ab import connector
from asib_core.methods.asib.settings import ASIBSettings
from asib_core.models import create_model

from asib_helpers import asib_cfg, make_run, single_torch_thread, tiny_data

#: the paper recipes' switches (decisions.md "Recipes: the seed's and the papers'")
OFF = {"kd_max_ratio": None, "mixup_alpha": 0.0, "cutmix_alpha_distill": 0.0, "ce_label_smoothing": 0.0,
       "kd_warmup_epochs": 0, "tau_schedule": None, "tau_start": None, "tau_end": None, "grad_clip_norm": 0.0,
       "b_step_lr": None, "b_step_weight_decay": None}
#: recipe -> (method, weights), from kd-reference.md (and the protocol's CE-only baseline)
EXPECTED = {
    "ce_protocol": ("ce", {"ce_alpha": 1.0, "kd_alpha": 0.0}),
    "kd_paper": ("vanilla_kd", {"ce_alpha": 0.1, "kd_alpha": 0.9, "tau": 4.0, "kd_target": "teacher"}),
    "avg_kd_paper": ("vanilla_kd", {"ce_alpha": 0.1, "kd_alpha": 0.9, "tau": 4.0, "kd_target": "avg",
                                    "teacher_weights": None}),
    "fitnet_paper": ("fitnet", {"ce_alpha": 1.0, "kd_alpha": 0.0, "hint_beta": 100.0,
                                "hint_layer": "feat_4d_layer2"}),
    "at_paper": ("at", {"ce_alpha": 1.0, "kd_alpha": 0.0, "at_beta": 1000.0}),
    "ab_paper": ("ab", {"ce_alpha": 1.0, "kd_alpha": 0.0, "feature_weight": 1.0, "attention_weight": 0.0}),
    "ft_paper": ("ft", {"ce_alpha": 1.0, "kd_alpha": 0.0, "factor_weight": 200.0, "feature_weight": 1.0}),
    "crd_paper": ("crd", {"ce_alpha": 1.0, "kd_alpha": 0.0, "crd_weight": 0.8, "crd_feat_dim": 128,
                          "crd_nce_k": 16384, "crd_nce_t": 0.07, "crd_momentum": 0.5}),
    "dkd_paper": ("dkd", {"ce_alpha": 1.0, "kd_alpha": 0.0, "tau": 4.0, "kd_target": "teacher",
                          "dkd_alpha": 1.0, "dkd_beta": 2.0, "dkd_warmup_epochs": 20}),
    "reviewkd_paper": ("reviewkd", {"ce_alpha": 1.0, "kd_alpha": 0.0, "feature_weight": 5.0,
                                    "attention_weight": 0.0}),
    "simkd_paper": ("simkd", {"ce_alpha": 0.0, "kd_alpha": 0.0, "feature_weight": 1.0}),
    "sskd_paper": ("sskd", {"ce_alpha": 0.1, "kd_alpha": 0.9, "tau": 4.0, "kd_target": "teacher",
                            "feature_weight": 2.7, "contrastive_weight": 10.0, "sskd_pretrain_epochs": 60}),
    # ASIB on avg-KD's paper recipe (the protocol's fair test of the synergy, issue 13)
    "asib_kd_paper": ("asib", {"ce_alpha": 0.1, "kd_alpha": 0.9, "tau": 4.0}),
}
CPU = torch.device("cpu")


def benchmark_common() -> list[str]:
    """The low-data benchmark's common overrides, on digits instead of the CIFAR-10 image folder."""
    spec = yaml.safe_load((config_dir() / "benchmark" / "cifar10_lowdata.yaml").read_text(encoding="utf-8"))
    return ["dataset=digits" if item == "dataset=imagefolder" else item for item in spec["common"]]


def resolved(recipe: str, *extra: str) -> dict:
    return finalize_config(build_effective("sota_generic", benchmark_common() + [f"recipe={recipe}", *extra]))


def test_the_recipes_are_exactly_the_named_ones():
    assert sorted(list_recipes()) == sorted(EXPECTED)


@pytest.mark.parametrize("recipe", sorted(EXPECTED))
def test_recipe_resolves_to_the_papers_weights(recipe):
    cfg = resolved(recipe)
    method, weights = EXPECTED[recipe]
    assert cfg["method_name"] == method and cfg["recipe"] == recipe
    got = {key: cfg.get(key, "<unset>") for key in {**OFF, **weights}}
    assert got == {**OFF, **weights}
    assert {tau_for_epoch(cfg, e, 30) for e in range(30)} == {float(cfg["tau"])}  # constant temperature
    assert cfg["dataset"]["name"] == "digits" and cfg["student_epochs_per_stage"] == [30]


def test_overrides_win_over_the_recipe_and_clashes_are_refused():
    cfg = resolved("kd_paper", "experiment.kd_teacher_index=1", "experiment.tau=2.0")
    assert (cfg["kd_teacher_index"], cfg["tau"], cfg["kd_alpha"]) == (1, 2.0, 0.9)
    assert resolved("ce_protocol", "method=ce")["method_name"] == "ce"  # the benchmark's CE-only row
    with pytest.raises(ConfigError, match="recipe=dkd_paper runs method 'dkd'"):
        resolved("dkd_paper", "method=vanilla_kd")
    with pytest.raises(ConfigError, match="anchor"):
        resolved("kd_paper", "anchor=fair_baseline")
    with pytest.raises(ConfigError, match="unknown recipe 'kd_papr'.*kd_paper"):
        resolved("kd_papr")
    with pytest.raises(ConfigError, match="as recipe=NAME"):
        build_effective("sota_generic", ["+recipe=kd_paper"])


# -- fidelity to the reference implementations ------------------------------------------------
def test_the_protocol_rows_read_the_teachers_the_protocol_names():
    """benchmark-protocol.md: KD from each teacher, avg-KD from both, the single-teacher baselines
    from wrn_16_2 (kd_teacher_index 1: none needs a same-family pair); AB reads it in its first
    stage only; the results page shows this as each row's `teachers used` (the run tag). The
    one-teacher slice (cifar10_lowdata_resnet20.yaml) keeps resnet20 -> resnet8."""
    from asib_core.benchmark import load_benchmark

    expected = {"CE-only": [], "KD (resnet20)": [0], "KD (wrn_16_2)": [1], "avg-KD": [0, 1],
                "seed recipe (sota_generic, vanilla_kd)": [0, 1]}
    bench = load_benchmark("cifar10_lowdata")
    rows = [r for r in bench.rows if r.exp == "sota_generic"]
    assert len(rows) == 14
    for row in rows:
        cfg = finalize_config(build_effective(row.exp, benchmark_common() + list(row.overrides)))
        torch.manual_seed(0)
        teachers = [create_model("resnet20", num_classes=10), create_model("wrn_16_2", num_classes=10)]
        distiller = build_distiller(cfg, create_model("resnet8", num_classes=10), teachers)
        assert distiller.teachers_used() == expected.get(row.name, [1]), row.name
        if row.name == "DKD":
            assert cfg["dkd_beta"] == 6.0          # mdistiller's beta for a WRN teacher (dkd_paper: 2)
    same_family = load_benchmark("cifar10_lowdata_resnet20")
    for row in same_family.rows:
        cfg = finalize_config(build_effective(row.exp, benchmark_common() + list(row.overrides)))
        assert cfg["kd_teacher_index"] == 0, row.name


FEATURE_KD = ("feat_kd_alpha", "feat_kd_huber_beta", "feat_kd_clip")


def test_the_protocol_ladder_gives_an_a_step_only_to_rungs_whose_b_step_reads_the_synergy():
    """The ladder's budget (2 x 15 student epochs) for every rung; 4 A-step epochs per stage for
    the rungs that train a synergy, none for L0 (avg-KD in the ladder's setting: an A-step there
    would only add run time to the rung the others' cost is measured against)."""
    from asib_core.benchmark import load_benchmark

    bench = load_benchmark("cifar10_lowdata")
    ladder = {r.name: r for r in bench.rows if r.exp.startswith("L")}
    assert list(ladder) == ["L0 baseline", "L1 IB", "L2 CCCP", "L3 IB+CCCP+T-adapt", "L4 full",
                            "L4 full, feature KD at the mean's scale",
                            "L4 full, feature KD at the mean's scale, no PPF",
                            "L4 full, L1's feature KD (Huber 1, clip 3)",
                            "L4 full, feature KD at the mean's scale, mixed-view IB_MBM query",
                            "L0 on avg-KD's recipe", "L1 IB on avg-KD's recipe", "L4 full on avg-KD's recipe",
                            "L1 IB on avg-KD's recipe, calibrated synergy target",
                            "L4 full on avg-KD's recipe, calibrated synergy target",
                            "L1 IB on avg-KD's recipe, calibrated synergy target, no A-step KD toward the student"]
    for name, row in ladder.items():
        cfg = finalize_config(build_effective(row.exp, benchmark_common() + list(row.overrides)))
        assert (cfg["num_stages"], cfg["student_epochs_per_stage"]) == (2, [15, 15]), name
        assert cfg["teacher_adapt_epochs"] == (0 if name.startswith("L0") else 4), name
        if "at the mean's scale" in name:   # L4's cause rows: the feature KD at 1/512 of its weight
            assert cfg["feat_kd_alpha"] == 0.25 / 512, name
            assert cfg["use_partial_freeze"] is (not name.endswith("no PPF")), name
            assert cfg.get("ib_mbm_query_view", "clean") == ("mixed" if "mixed-view" in name else "clean"), name
        if "L1's feature KD" in name:       # L1's distance and cap at the spec's weight
            l1 = finalize_config(build_effective("L1_ib", benchmark_common() + list(ladder["L1 IB"].overrides)))
            assert [cfg[k] for k in FEATURE_KD] == [l1[k] for k in FEATURE_KD] == [0.25, 1.0, 3.0], name


def test_the_ladder_on_avg_kds_recipe_differs_from_the_seeds_rung_only_in_the_recipe():
    """The fair test of the synergy: each "on avg-KD's recipe" row is its seed rung (same
    experiment, same overrides) with only the recipe's keys changed, and those keys take exactly
    the avg-KD row's values, so the rung and avg-KD differ only in ASIB's mechanisms."""
    from asib_core.benchmark import load_benchmark

    bench = load_benchmark("cifar10_lowdata")
    rows = {r.name: r for r in bench.rows}
    recipe_keys = {**OFF, "ce_alpha": 0.1, "kd_alpha": 0.9, "tau": 4.0}
    avg_kd = finalize_config(build_effective("sota_generic", benchmark_common() + list(rows["avg-KD"].overrides)))
    assert {k: avg_kd[k] for k in recipe_keys} == recipe_keys
    fair = [r for r in bench.rows if r.name.endswith(" on avg-KD's recipe")]
    assert len(fair) == 3
    resolved_fair = {}
    for row in fair:
        seed_name = row.name.removesuffix(" on avg-KD's recipe")
        seed_rung = rows["L0 baseline" if seed_name == "L0" else seed_name]
        assert row.exp == seed_rung.exp
        assert list(row.overrides) == [*seed_rung.overrides, "recipe=asib_kd_paper"], row.name
        on_seed, on_kd = (finalize_config(build_effective(r.exp, benchmark_common() + list(r.overrides)))
                          for r in (seed_rung, row))
        changed = {k for k in set(on_seed) | set(on_kd) if on_seed.get(k) != on_kd.get(k)}
        assert changed - {"config_sha256", "recipe"} <= set(recipe_keys) | {"teacher_adapt_alpha_kd"}, row.name
        assert {k: on_kd[k] for k in recipe_keys} == recipe_keys, row.name
        # ... and every ASIB setting (A-step, gate, synergy target, PPF) is the seed rung's: the A-step
        # KD toward the student reads kd_alpha when teacher_adapt_alpha_kd is null, so the recipe's
        # kd_alpha 0.9 must not reach it (the recipe pins it at the rungs' 0.35)
        assert ASIBSettings.from_cfg(on_kd) == ASIBSettings.from_cfg(on_seed), row.name
        assert ASIBSettings.from_cfg(on_kd).a_kd_alpha == on_seed["kd_alpha"] == 0.35, row.name
        assert on_kd["method_name"] == "asib" and on_kd["kd_target"] == on_seed["kd_target"], row.name
        resolved_fair[row.name] = on_kd
    assert resolved_fair["L0 on avg-KD's recipe"]["kd_target"] == avg_kd["kd_target"] == "avg"
    # the calibrated rows: their fair row with the synergy target at tau and the entropy-matched scale
    for name in ("L1 IB on avg-KD's recipe", "L4 full on avg-KD's recipe"):
        row = rows[f"{name}, calibrated synergy target"]
        cfg = finalize_config(build_effective(row.exp, benchmark_common() + list(row.overrides)))
        changed = {k for k in set(cfg) | set(resolved_fair[name]) if cfg.get(k) != resolved_fair[name].get(k)}
        assert changed - {"config_sha256"} == {"tau_syn", "synergy_scale_calibration"}, name
        assert (cfg["tau_syn"], cfg["synergy_scale_calibration"]) == (None, "ensemble_entropy"), name
        assert resolved_fair[name].get("synergy_scale_calibration", "none") == "none", name
    # the ablation: the calibrated L1 with the A-step's KD toward the student off, nothing else changed
    calibrated, ablation = (finalize_config(build_effective("L1_ib", benchmark_common() + list(rows[name].overrides)))
                            for name in ("L1 IB on avg-KD's recipe, calibrated synergy target",
                                         "L1 IB on avg-KD's recipe, calibrated synergy target, "
                                         "no A-step KD toward the student"))
    changed = {k for k in set(calibrated) | set(ablation) if calibrated.get(k) != ablation.get(k)}
    assert changed - {"config_sha256"} == {"teacher_adapt_alpha_kd"}
    assert ASIBSettings.from_cfg(calibrated).a_kd_alpha == 0.35 and ASIBSettings.from_cfg(ablation).a_kd_alpha == 0.0


def test_a_paper_recipe_trains_the_auxiliary_modules_like_the_student():
    """One optimiser over student and modules, as RepDistiller: under a paper recipe the
    auxiliary group (here FitNet's regressor) takes the student's LR and weight decay; the
    seed's own settings keep their b_step_lr / b_step_weight_decay."""
    from asib_core.engine.optim import student_optimizer

    for extra, (lr, wd) in ((["recipe=fitnet_paper", "experiment.student_lr=0.05"], (0.05, 5e-4)),
                            (["method=fitnet", "experiment.student_lr=0.05"], (0.1, 3e-4))):
        cfg = finalize_config(build_effective("sota_generic", benchmark_common() + extra))
        distiller = _build(cfg)
        opt = student_optimizer(cfg, distiller.student_parameters(), distiller.auxiliary_parameters())
        groups = {g["name"]: (g["lr"], g["weight_decay"]) for g in opt.param_groups}
        assert groups == {"student": (0.05, 5e-4), "auxiliary": (lr, wd)}, extra



def _models(teacher: str = "resnet20"):
    torch.manual_seed(0)
    student = create_model("resnet8", num_classes=10)
    return student, create_model(teacher, num_classes=10).eval()


def _build(cfg: dict, teacher: str = "resnet20"):
    student, t = _models(teacher)
    return build_distiller(cfg, student, [t])


def _batch(n: int = 4) -> Batch:
    g = torch.Generator().manual_seed(3)
    return Batch(x=torch.randn(n, 3, 32, 32, generator=g), y=torch.arange(n) % 10, idx=torch.arange(n))


def _ctx(epoch: int, total: int) -> TrainContext:
    return TrainContext(epoch=epoch, stage=0, epoch_in_stage=epoch, total_epochs=total, tau=4.0, kd_ramp=1.0,
                        device=CPU)


def test_ft_factor_loss_is_repdistillers_l2n_of_the_channel_mean_square():
    cfg = resolved("ft_paper")
    student, teacher = _models()
    dist = build_distiller(cfg, student, [teacher])
    batch = _batch()
    with torch.no_grad():
        _, losses = dist.forward_train(batch, _ctx(0, 30))
        f_s = dist.translator(dist.student(batch.x)["feat_4d"]).double().numpy()
        f_t = dist.paraphraser.encoder(teacher(batch.x)["feat_4d"]).double().numpy()

    def factor(f):  # RepDistiller FactorTransfer.factor, p1 = 2: F.normalize(f.pow(2).mean(1).view(B, -1))
        a = (f ** 2).mean(axis=1).reshape(f.shape[0], -1)
        return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)

    expect = 200.0 * np.abs(factor(f_s) - factor(f_t)).mean()  # p2 = 1, times the paper weight
    assert float(losses["ft"]) == pytest.approx(expect, rel=1e-4)


def test_dkd_warmup_comes_from_its_own_key_and_scales_with_the_run():
    dist = _build(resolved("dkd_paper", "experiment.kd_warmup_epochs=8"))
    assert [dist.warmup_epochs(t) for t in (240, 30, 3, 480)] == [20, 3, 1, 40]  # ceil(20 * t / 240)
    assert [dist.dkd_warmup(e, 30) for e in range(4)] == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0])
    assert dist.dkd_warmup(9, 240) == pytest.approx(10 / 20)  # kd_warmup_epochs=8 plays no part
    batch = _batch()
    with torch.no_grad():
        first = dist.forward_train(batch, _ctx(0, 30))[1]["dkd"]
        full = dist.forward_train(batch, _ctx(5, 30))[1]["dkd"]
    torch.testing.assert_close(first, full / 3)
    off = _build(resolved("dkd_paper", "experiment.dkd_warmup_epochs=0"))
    assert off.dkd_warmup(0, 240) == 1.0


def test_ab_connector_only_where_student_and_teacher_shapes_differ():
    assert isinstance(connector((1, 16, 32, 32), (1, 16, 32, 32)), torch.nn.Identity)
    assert isinstance(connector((1, 16, 32, 32), (1, 32, 32, 32))[0], torch.nn.Conv2d)      # channels differ
    assert isinstance(connector((1, 16, 32, 32), (1, 16, 16, 16))[0], torch.nn.Conv2d)      # size differs
    same = _build(resolved("ab_paper"), "resnet20")     # 16/32/64 vs 16/32/64
    wide = _build(resolved("ab_paper"), "wrn_16_2")     # 16/32/64 vs 32/64/128
    assert all(isinstance(c, torch.nn.Identity) for c in same.connectors)
    assert [c[0].out_channels for c in wide.connectors] == [32, 64, 128]


def test_crd_paper_embeds_in_128_d_and_draws_distinct_negatives(monkeypatch):
    import asib_core.losses.crd as crd_losses

    monkeypatch.setattr(crd_losses, "SAMPLING_CHUNK_ELEMENTS", 7 * 60)  # anchors in chunks of 7 rows
    dist = _build(resolved("crd_paper"))
    assert dist.embed_s.linear.out_features == dist.embed_t.linear.out_features == 128
    labels = torch.arange(60) % 10                      # 6 per class: 54 negatives in every pool
    memory = dist.setup_memory(60, labels)
    assert dist.effective_nce_k == memory.nce_k == 54   # 16384 cut to the smallest pool
    idx = torch.arange(60).repeat(20)
    for k in (54, 10):
        neg = memory.sample_negatives(idx, k=k, generator=torch.Generator().manual_seed(k))
        assert neg.shape == (1200, k) and all(len(set(row)) == k for row in neg.tolist())
        assert bool((labels[neg] != labels[idx].unsqueeze(1)).all())


# -- end to end: one tiny digits epoch ---------------------------------------------------------
@pytest.mark.parametrize("recipe,term", [("dkd_paper", "dkd"), ("crd_paper", "crd")])
def test_recipe_runs_one_tiny_digits_epoch(recipe, term, tmp_path):
    cfg = asib_cfg("sota_generic", [f"recipe={recipe}", "experiment.student_epochs_per_stage=[1]",
                                    "experiment.optimizer=sgd", "experiment.student_lr=0.05",
                                    "experiment.dataset.batch_size=16"])
    with single_torch_thread():
        run, dist = make_run(cfg, tiny_data(cfg, per_class=4), None, tmp_path)
        state = run.fit()
    history = [h for h in run.state.history if "train/loss" in h]
    assert len(history) == 1 and dist.name == EXPECTED[recipe][0], state
    epoch = history[0]
    assert np.isfinite(epoch["train/loss"]) and epoch[f"train/{term}"] > 0
    assert "train/kd" not in epoch and epoch["tau"] == 4.0  # no extra KD term, constant T
