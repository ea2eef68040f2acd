"""Issue 13: ASIB as specified (asib-method-spec.md under decisions.md). Each test pins one
mechanism's spec meaning on fixed tensors, a composed seed config, or a tiny in-process
digits run."""
from __future__ import annotations

import dataclasses
import math
import logging

import pytest
import torch
import torch.nn.functional as F

from asib_core.config.effective import build_effective
from asib_core.config.errors import ConfigError
from asib_core.config.finalize import finalize_config
from asib_core.config.resolve import resolve_experiment
from asib_core.contract import Batch, TrainContext
from asib_core.engine.schedules import kd_cap
from asib_core.methods.asib import ASIBSettings, ppf
from asib_core.methods.asib.targets import feature_kd_term
from tests.asib_helpers import asib_cfg, make_run, single_torch_thread, tiny_data


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with single_torch_thread():
        yield


def effective(exp, overrides=()):
    return finalize_config(build_effective(exp, list(overrides)))


# -- 1. precedence: base counts as set at experiment level -------------------------------------
@pytest.mark.parametrize("exp,ppf", [("L0_baseline", False), ("L1_ib", False), ("L2_cccp", False),
                                     ("L3_ib_cccp_tadapt", False), ("L4_full", True),
                                     ("side_cccp_ppf", True)])
def test_ppf_only_where_the_experiment_sets_it(exp, ppf):
    cfg = effective(exp)
    assert cfg["use_partial_freeze"] is ppf


def test_method_file_fills_only_keys_neither_base_nor_experiment_sets():
    cfg = effective("sota_generic")
    # base sets these: the method file's 0.25 / 6 / true / 0.1 must not replace them
    assert cfg["kd_ens_alpha"] == 0.0 and cfg["teacher_adapt_epochs"] == 0 and cfg["use_ib"] is False
    assert cfg["student_lr"] == 0.1          # the experiment's own value (base 0.05, method 0.1)
    # base leaves these unset: the method file fills them
    assert cfg["kd_target"] == "auto" and cfg["kd_max_ratio"] == 1.25 and cfg["tau_syn"] == 6.0
    # an override still wins over base and method
    assert effective("sota_generic", ["experiment.kd_ens_alpha=0.3"])["kd_ens_alpha"] == 0.3
    assert effective("overlap_100")["student_lr"] == 0.05     # base's, not the method file's 0.1


# -- 2. teacher_adapt_kd_warmup, the CCCP ramp, the opt-in ensemble-share ramp -----------------
def test_teacher_adapt_kd_warmup_is_the_number_of_mixed_b_step_epochs_per_stage():
    l1 = ASIBSettings.from_cfg(asib_cfg("L1_ib"))     # kd_ens_alpha 0.5, teacher_adapt_kd_warmup 6
    assert [l1.ens_alpha(e, 20) for e in range(8)] == [0.5] * 6 + [0.0, 0.0]
    assert l1.ens_alpha(19, 20) == 0.0               # no rise toward kd_ens_alpha_max by default
    ramp = ASIBSettings.from_cfg(asib_cfg("L1_ib", ["experiment.kd_ens_alpha_ramp=true",
                                                    "experiment.teacher_adapt_kd_warmup=0"]))
    assert [ramp.ens_alpha(e, 11) for e in (0, 5, 10)] == pytest.approx([0.5, 0.65, 0.8])


def test_the_cccp_ramp_reads_its_own_key():
    cfg = asib_cfg("L3_ib_cccp_tadapt", ["experiment.cccp_ramp_epochs=4"])   # window 2, 4 CCCP epochs
    assert cfg["teacher_adapt_kd_warmup"] == 6
    s = ASIBSettings.from_cfg(cfg)
    assert [s.cccp_ramp(0, e) for e in range(6)] == pytest.approx([0, 0, 0.25, 0.5, 0.75, 1.0])
    s = ASIBSettings.from_cfg(asib_cfg("L3_ib_cccp_tadapt", ["experiment.cccp_ramp_epochs=0"]))
    assert [s.cccp_ramp(0, e) for e in range(6)] == [0, 0, 1, 1, 1, 1]


def test_the_share_ramp_refuses_a_mixing_epoch_count_it_would_ignore():
    with pytest.raises(ConfigError, match="kd_ens_alpha_ramp=True with teacher_adapt_kd_warmup=6"):
        resolve_experiment("L1_ib", ["experiment.kd_ens_alpha_ramp=true"])


def _open_gate_run(tmp_path, exp="L1_ib", overrides=()):
    cfg = asib_cfg(exp, ["experiment.dataset.batch_size=16", *overrides])
    run, d = make_run(cfg, tiny_data(cfg, per_class=2, val_split=0.02), None, tmp_path)
    d.gate.syn_acc, d.gate.trained = 0.95, True
    d.train()
    for m in d.student.modules():      # repeated train-mode calls keep the running statistics that
        if isinstance(m, torch.nn.BatchNorm2d):       # the eval-mode IB query reads
            m.momentum = 0.0
    x, y, idx = next(iter(run.train_loader))
    return run, d, Batch(x=x, y=y, idx=idx, y_b=y, lam=1.0)


def _ctx(epoch_in_stage):
    return TrainContext(epoch=epoch_in_stage, stage=0, epoch_in_stage=epoch_in_stage, total_epochs=20,
                        tau=4.0, kd_ramp=1.0, device=torch.device("cpu"))


def test_forward_train_mixes_the_ensemble_only_in_the_first_epochs_of_a_stage(tmp_path):
    run, d, batch = _open_gate_run(tmp_path)
    stats, kd = {}, {}
    for e in (0, 5, 6, 12):
        d.pop_epoch_metrics()
        _, losses = d.forward_train(batch, _ctx(e))
        stats[e], kd[e] = d.pop_epoch_metrics(), float(losses["kd"].detach())
    assert [stats[e]["kd/ens_alpha"] for e in (0, 5, 6, 12)] == [0.5, 0.5, 0.0, 0.0]
    assert kd[0] == pytest.approx(kd[5], rel=1e-6) and kd[6] == pytest.approx(kd[12], rel=1e-6)
    assert kd[0] != pytest.approx(kd[6], rel=1e-4)
    # after the mixing epochs the target is the pure synergy: the same as kd_ens_alpha 0 from the start
    settings = d.settings
    d.settings = dataclasses.replace(settings, kd_ens_alpha=0.0)
    try:
        _, losses = d.forward_train(batch, _ctx(0))
    finally:
        d.settings = settings
    assert float(losses["kd"].detach()) == pytest.approx(kd[6], rel=1e-6)


def test_a_kd_ens_alpha_max_without_the_ramp_is_warned_about(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="asib_core.methods.asib.distiller"):
        _open_gate_run(tmp_path)
    assert any("kd_ens_alpha_max=0.8 has no effect" in r.getMessage() for r in caplog.records)


# -- 3. hybrid_beta acts whenever it is set ------------------------------------------------------
def _hand_kd(student_logits, q, tau):
    logp = F.log_softmax(student_logits.double() / tau, 1)
    return float((tau ** 2 * (q.double() * (q.double().log() - logp)).sum(1)).mean())


def test_hybrid_beta_adds_kd_toward_the_avg_ensemble_with_the_gate_closed(tmp_path):
    cfg = asib_cfg("L0_baseline", ["experiment.dataset.batch_size=16"])
    assert cfg["hybrid_beta"] == 0.05 and cfg["kd_target"] == "avg" and cfg["teacher_weights"] == [0.7, 0.3]
    run, d = make_run(cfg, tiny_data(cfg, per_class=2, val_split=0.02), None, tmp_path)
    d.train()
    x, y, idx = next(iter(run.train_loader))
    batch = Batch(x=x, y=y, idx=idx, y_b=y, lam=1.0)
    _, losses = d.forward_train(batch, _ctx(0))
    with torch.no_grad():
        s_logits = d.student(x)["logit"]                      # train mode, as in forward_train
        q = sum(w * F.softmax(t(x)["logit"].double() / 4.0, 1) for w, t in zip((0.7, 0.3), d.teachers))
    assert float(losses["hybrid"].detach()) == pytest.approx(0.05 * _hand_kd(s_logits, q, 4.0), rel=1e-4)
    assert (d.ce_alpha, d.kd_alpha) == (0.65, 0.35)           # 0.65 + 0.05 <= 1: no rescale


def test_hybrid_beta_rescales_ce_and_kd_when_the_weights_would_exceed_one(tmp_path):
    cfg = asib_cfg("L0_baseline", ["experiment.hybrid_beta=0.5"])
    _, d = make_run(cfg, tiny_data(cfg, per_class=2, val_split=0.02), None, tmp_path)
    assert (d.ce_alpha, d.kd_alpha) == pytest.approx((0.65 * 0.5, 0.35 * 0.5))


def test_baselines_run_without_the_hybrid_term():
    assert effective("sota_generic", ["method=vanilla_kd"])["hybrid_beta"] == 0.0
    assert effective("sota_generic")["hybrid_beta"] == 0.05


# -- 4. the KD cap compares the raw terms (spec 3.6.7) -------------------------------------------
def test_kd_cap_compares_raw_kd_with_raw_ce():
    ce_raw, kd_raw = torch.tensor(1.0), torch.tensor(3.0, requires_grad=True)
    losses = {"ce": 0.5 * ce_raw, "kd": 0.2 * kd_raw}
    cfg = {"kd_max_ratio": 1.25, "kd_warmup_epochs": 3}
    capped, factor = kd_cap(losses, cfg, epoch=3, weights=(0.5, 0.2))
    # raw: 1.25 * 1.0 / 3.0 = 0.41667 (the weighted terms, 0.5 vs 0.6, would not cap at all)
    assert factor == pytest.approx(1.25 / 3.0)
    assert float(capped["kd"].detach()) == pytest.approx(0.2 * 3.0 * 1.25 / 3.0)
    capped["kd"].backward()
    assert float(kd_raw.grad) == pytest.approx(0.2 * 1.25 / 3.0)       # the factor is a constant
    assert float(capped["ce"]) == 0.5
    # within the KD warm-up, and with a KD below the cap, nothing changes
    assert kd_cap(losses, cfg, epoch=2, weights=(0.5, 0.2))[1] == 1.0
    assert kd_cap({"ce": 0.5 * ce_raw, "kd": 0.2 * torch.tensor(1.0)}, cfg, 5, (0.5, 0.2))[1] == 1.0
    # the weights are those applied: kd_alpha * kd_ramp (half-way through a ramp the raw KD is 6)
    assert kd_cap(losses, cfg, epoch=3, weights=(0.5, 0.1))[1] == pytest.approx(1.25 / 6.0)


def test_kd_cap_without_a_ce_term_is_refused():
    with pytest.raises(ConfigError, match="kd_max_ratio=1.25 with ce_alpha=0"):
        resolve_experiment("L0_baseline", ["experiment.ce_alpha=0.0"])


# -- 5. feature KD at the spec's scale (sum over dimensions) -------------------------------------
def test_feature_kd_value_and_gradient_are_the_sum_over_dimensions():
    f = torch.tensor([[1.0, 2.0, 0.0, -1.0], [0.5, 0.5, 0.5, 0.5]], requires_grad=True)
    mu = torch.tensor([[0.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]], requires_grad=True)
    w = torch.tensor([1.0, 0.5])
    term, raw = feature_kd_term(f, mu, w, alpha=0.25, clip=None, huber_beta=None)
    # per-sample sums of squares: 1 + 1 + 1 + 4 = 7 and 4 * 0.25 = 1; weighted batch mean (7 + 0.5) / 2
    assert float(raw.detach()) == pytest.approx(3.75)
    assert float(term.detach()) == pytest.approx(0.25 * 3.75)
    term.backward()
    diff = (f - mu).detach()
    assert torch.allclose(f.grad, 0.25 * 2 * diff * w[:, None] / 2)
    assert mu.grad is None                                 # the IB mu is a detached target
    # Huber (beta 1) per element, the clip caps the per-dimension mean (the sum at clip * D)
    _, raw = feature_kd_term(f.detach(), mu.detach(), None, alpha=1.0, clip=0.5, huber_beta=1.0)
    # sample 1: elements 0.5, 0.5, 0.5, |-2| - 0.5 = 1.5 -> mean 0.75, capped at 0.5 -> 2.0;
    # sample 2: 0.125 each -> mean 0.125 -> 0.5; batch mean 1.25
    assert float(raw) == pytest.approx(1.25)


# -- 8. silent no-ops are warned about, naming the key --------------------------------------------
def _asib_warnings(caplog, cfg):
    from asib_core.methods import build_distiller
    from asib_core.models import create_model
    from asib_core.pipeline.models import build_student

    caplog.clear()
    teachers = [create_model(n, num_classes=10, distill_out_dim=cfg["distill_out_dim"])
                for n in ("resnet20", "wrn_16_2")]
    with caplog.at_level(logging.WARNING, logger="asib_core.methods.asib.distiller"):
        build_distiller(cfg, build_student(cfg, 10), teachers)
    return " | ".join(r.getMessage() for r in caplog.records)


def test_teacher_freeze_keys_without_teacher_finetuning_are_warned_about(caplog):
    text = _asib_warnings(caplog, asib_cfg("L4_full"))
    assert "teacher1_freeze_level and teacher2_freeze_level (or their _schedule) have no effect" in text
    assert "teacher1_freeze_bn and teacher2_freeze_bn have no effect" in text
    text = _asib_warnings(caplog, asib_cfg("L4_full", ["experiment.use_teacher_finetuning=true",
                                                       "experiment.train_distill_adapter_only=false"]))
    assert "freeze_level" not in text and "freeze_bn" not in text


def test_teacher_weights_under_the_closed_gate_fallback_are_warned_about(caplog):
    cfg = asib_cfg("overlap_100")          # kd_target auto, hybrid_beta 0, method file's [0.7, 0.3]
    assert cfg["kd_target"] == "auto" and cfg["hybrid_beta"] == 0.0
    assert "teacher_weights=[0.7, 0.3] has no effect" in _asib_warnings(caplog, cfg)
    # with the hybrid term (base's 0.05) the weights act there
    assert "teacher_weights" not in _asib_warnings(caplog, asib_cfg("L1_ib"))


def test_a_min_std_below_the_logvar_clip_floor_is_warned_about(caplog):
    # clip 4: std >= exp(-2) = 0.135 anyway, so the seed's 0.01 floor never binds
    assert "ib_mbm_min_std=0.01 can never bind" in _asib_warnings(caplog, asib_cfg("L1_ib"))
    assert "ib_mbm_min_std" not in _asib_warnings(caplog, asib_cfg("L1_ib", ["experiment.ib_mbm_min_std=0.2"]))


def test_a_clamped_synergy_only_window_is_warned_about(caplog):
    assert "synergy_only_epochs=6 is clamped to 5" in _asib_warnings(caplog, asib_cfg("L2_cccp"))
    assert "synergy_only_epochs" not in _asib_warnings(caplog, asib_cfg("L1_ib"))


def test_a_mixed_ib_mbm_query_view_that_cannot_act_is_warned_about(caplog):
    mixed = "experiment.ib_mbm_query_view=mixed"
    assert "ib_mbm_query_view" not in _asib_warnings(caplog, asib_cfg("L1_ib", [mixed]))   # Mixup + CutMix
    no_mixing = _asib_warnings(caplog, asib_cfg("L1_ib", [mixed, "experiment.mixup_alpha=0",
                                                          "experiment.cutmix_alpha_distill=0"]))
    assert "ib_mbm_query_view=mixed has no effect: mixup_alpha and cutmix_alpha_distill are 0" in no_mixing
    unread = _asib_warnings(caplog, asib_cfg("L2_cccp", [mixed]))             # kd_target avg, no feature KD
    assert "ib_mbm_query_view=mixed has no effect: the B-step never queries IB_MBM (kd_target=avg" in unread


def test_b_step_lr_without_auxiliary_modules_is_warned_about(caplog):
    from asib_core.engine.optim import student_optimizer

    cfg = asib_cfg("overlap_100")
    assert cfg["optimizer"] == "sgd" and cfg["b_step_lr"] == 0.05
    params = [torch.nn.Parameter(torch.zeros(2))]
    with caplog.at_level(logging.WARNING, logger="asib_core.engine.optim"):
        student_optimizer(cfg, params, [])
    assert "b_step_lr=0.05 and b_step_weight_decay=0.0003: no effect" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="asib_core.engine.optim"):
        opt = student_optimizer(cfg, params, [torch.nn.Parameter(torch.zeros(1))])
    assert "b_step_lr" not in caplog.text and opt.param_groups[1]["lr"] == 0.05


# -- 7. the gated A-step KD that pulls the synergy toward the student ----------------------------
def test_a_step_kd_toward_the_student_is_on_after_the_window_once_the_gate_metric_reaches_the_threshold(tmp_path):
    from asib_core.methods.asib.a_step import a_step_certainty, a_step_losses

    cfg = asib_cfg("L1_ib", ["experiment.dataset.batch_size=16"])     # window 2, kd_alpha 0.35, thr 0.8
    run, d = make_run(cfg, tiny_data(cfg, per_class=2, val_split=0.02), None, tmp_path)
    x, y, idx = next(iter(run.train_loader))
    batch = Batch(x=x, y=y, idx=idx, y_b=y, lam=1.0)
    captured = {}
    d.ib_mbm.register_forward_hook(lambda m, i, o: captured.update(out=o))
    d.student.eval()
    d.ib_mbm.train()
    d.synergy_head.train()
    syn, losses = a_step_losses(d, batch, stage=1, epoch=3, syn_acc=0.85)
    with torch.no_grad():
        s_logits = d.student(x)["logit"]
    cw = a_step_certainty(captured["out"].effective_logvar, d.settings.min_cw)
    p_s = F.softmax(s_logits.double() / 4.0, 1)
    kl = (p_s * (p_s.log() - F.log_softmax(syn.detach().double() / 4.0, 1))).sum(1)
    assert float(losses["kd"].detach()) == pytest.approx(0.35 * float((cw.double() * 16.0 * kl).mean()), rel=1e-4)
    losses["kd"].backward()
    assert d.synergy_head.fc.weight.grad.abs().sum() > 0                 # it trains the synergy
    assert "kd" not in a_step_losses(d, batch, stage=1, epoch=3, syn_acc=0.5)[1]      # gate metric < 0.8
    assert "kd" not in a_step_losses(d, batch, stage=1, epoch=1, syn_acc=0.85)[1]     # synergy-only window
    assert "kd" not in a_step_losses(d, batch, stage=0, epoch=3)[1]                   # nothing measured yet
    d.settings = dataclasses.replace(d.settings, gate_threshold=0.0)
    assert "kd" in a_step_losses(d, batch, stage=0, epoch=3)[1]                       # threshold 0: open
    d.settings = dataclasses.replace(d.settings, a_kd_alpha=0.0)
    assert "kd" not in a_step_losses(d, batch, stage=0, epoch=3)[1]                   # weight 0: off


# -- 6. the B-step queries IB_MBM as it was trained and gated ------------------------------------
@pytest.mark.parametrize("view", ["clean", "mixed"])
def test_b_step_queries_ib_mbm_with_eval_mode_features_of_the_chosen_view(tmp_path, view):
    """clean (default): the images before mixing, the outputs then mixed like the labels, the
    teachers run twice; mixed (opt-in ib_mbm_query_view): the mixed images, the teachers' tokens of
    the KD targets' pass reused (one pass each), the outputs used as they are."""
    run, d, clean_batch = _open_gate_run(tmp_path, overrides=[f"experiment.ib_mbm_query_view={view}"])
    assert d.settings.ib_mbm_query_view == view
    x, y = clean_batch.x, clean_batch.y
    perm = torch.roll(torch.arange(x.shape[0]), 1)
    lam = 0.7
    batch = Batch(x=lam * x + (1 - lam) * x[perm], y=y, idx=clean_batch.idx, y_b=y[perm], lam=lam,
                  x_clean=x, perm=perm)
    seen, teacher_calls = {}, []
    d.ib_mbm.register_forward_hook(lambda m, i, o: seen.update(query=i[0], tokens=i[1], out=o))
    for t in d.teachers:
        t.register_forward_hook(lambda m, i, o: teacher_calls.append(m))
    _, losses = d.forward_train(batch, _ctx(8))                  # after the mixing epochs: a = 0
    assert len(teacher_calls) == (4 if view == "clean" else 2)  # two teachers, twice or once each
    x_view = x if view == "clean" else batch.x
    with torch.no_grad():
        d.student.eval()
        query = d.student(x_view)["distill_feat"]
        logits = d.student.train()(batch.x)["logit"]
        tokens = [t(x_view)["distill_feat"] for t in d.teachers]
    assert torch.allclose(seen["query"], query, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(seen["tokens"], tokens))
    # clean: the clean images' synergy and certainty weights mixed like the labels,
    # lam * v + (1 - lam) * v[perm]; mixed: the values of the mixed images themselves
    s = d.settings
    with torch.no_grad():
        z = d.synergy_head(seen["out"].mu)
    mix = (lambda v: lam * v + (1 - lam) * v[perm]) if view == "clean" else (lambda v: v)   # noqa: E731
    q = mix(F.softmax(s.synergy_logit_scale * z.double() / s.tau_syn, 1))
    m = torch.exp(-seen["out"].effective_logvar.double()).mean(1)
    cw = mix((m / m.mean()).clamp(s.min_cw, s.max_cw))
    k = s.tau_syn ** 2 * (q * (q.log() - F.log_softmax(logits.double() / s.tau_syn, 1))).sum(1)
    assert float(losses["kd"].detach()) == pytest.approx(0.35 * float((cw * k).mean()), rel=1e-4)


def test_an_unknown_ib_mbm_query_view_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="ib_mbm_query_view"):
        ASIBSettings.from_cfg(asib_cfg("L1_ib", ["experiment.ib_mbm_query_view=augmented"]))


# -- tests the issue asks for ---------------------------------------------------------------------
def test_a_step_learning_rate_groups(tmp_path):
    from asib_core.methods.asib.a_step import AStep

    cfg = asib_cfg("L3_ib_cccp_tadapt", ["experiment.dataset.batch_size=16"])
    assert (cfg["a_step_lr"], cfg["ib_mbm_lr_factor"], cfg["teacher_lr"]) == (1e-4, 2, 3e-6)
    run, d = make_run(cfg, tiny_data(cfg, per_class=2, val_split=0.02), None, tmp_path)
    groups = {g["name"]: g for g in AStep(d, 0, run).optimizer().param_groups}
    assert groups["ib_mbm"]["lr"] == pytest.approx(2e-4) and groups["synergy_head"]["lr"] == 1e-4
    assert groups["teachers"]["lr"] == 3e-6 and groups["teachers"]["weight_decay"] == 1e-4
    assert {id(p) for p in groups["ib_mbm"]["params"]} == {id(p) for p in d.ib_mbm.parameters()}
    assert {id(p) for p in groups["synergy_head"]["params"]} == {id(p) for p in d.synergy_head.parameters()}
    adapters = {id(p) for t in d.teachers for p in t.distill_adapter.parameters()}
    assert {id(p) for p in groups["teachers"]["params"]} == adapters      # train_distill_adapter_only


def test_a_b_step_leaves_ib_mbm_head_and_adapters_unchanged(tmp_path):
    cfg = asib_cfg("L3_ib_cccp_tadapt", ["experiment.num_stages=1", "experiment.student_epochs_per_stage=[1]",
                                         "experiment.teacher_adapt_epochs=1", "experiment.enable_kd_after_syn_acc=0",
                                         "experiment.dataset.batch_size=16"])
    run, d = make_run(cfg, tiny_data(cfg, per_class=2, val_split=0.02), None, tmp_path)
    after_a = {}
    stage_start = d.stage_start

    def spy(stage, runner):
        before = {k: v.clone() for k, v in d.state_dict().items()}
        stage_start(stage, runner)
        after_a.update({k: v.clone() for k, v in d.state_dict().items()})
        after_a["_moved"] = [k for k, v in before.items() if not torch.equal(v, after_a[k])]

    d.stage_start = spy
    run.log_metrics = lambda metrics, step=None: None
    run.fit()
    moved = after_a["_moved"]
    assert any(k.startswith("ib_mbm.") for k in moved) and any(".distill_adapter." in k for k in moved)
    b_steps = [h for h in run.state.history if "train/kd" in h]
    assert b_steps and b_steps[-1]["gate/open"] == 1.0 and b_steps[-1]["kd/syn_ratio"] == 1.0
    final = d.state_dict()
    kept = [k for k in final if k.startswith(("ib_mbm.", "synergy_head.")) or ".distill_adapter." in k
            and k.startswith("teachers.")]
    assert kept and all(torch.equal(final[k], after_a[k]) for k in kept)
    assert any(not torch.equal(final[k], after_a[k]) for k in final if k.startswith("student."))


def test_use_teacher_finetuning_trains_the_unfrozen_teacher_part_in_the_a_step(tmp_path):
    cfg = asib_cfg("L4_full", ["experiment.num_stages=1", "experiment.student_epochs_per_stage=[0]",
                               "experiment.teacher_adapt_epochs=1", "experiment.use_teacher_finetuning=true",
                               "experiment.train_distill_adapter_only=false", "experiment.dataset.batch_size=16",
                               *[f"experiment.{r}_freeze_level_schedule=[1]" for r in ("student", "teacher1",
                                                                                      "teacher2")]])
    run, d = make_run(cfg, tiny_data(cfg, per_class=2, val_split=0.02), None, tmp_path)
    before = [{k: v.clone() for k, v in t.state_dict().items()} for t in d.teachers]
    modes = []
    tokens = d.teacher_tokens
    d.teacher_tokens = lambda x, a_step=False: (a_step and modes.append([t.training for t in d.teachers]),
                                                tokens(x, a_step))[1]
    run.log_metrics = lambda metrics, step=None: None
    run.fit()
    assert modes and all(m == [True, True] for m in modes)                # BN batch statistics
    for teacher, old in zip(d.teachers, before):
        new = teacher.state_dict()
        changed = {k for k in new if not torch.equal(new[k], old[k])}
        assert any(k.startswith("distill_adapter.") for k in changed)
        assert any(not k.startswith(("distill_adapter.", "classifier.")) for k in changed)   # the backbone
        frozen = ppf.frozen_parameter_names(teacher, 1)                 # level 1: all but the last stage
        assert frozen and not frozen & changed
        assert all(p.requires_grad is False for p in teacher.parameters())             # frozen again
    state = d.checkpoint_state()
    assert any(k.startswith("teachers.0.") and "distill_adapter" not in k for k in state)


# -- per-epoch logging: validation accuracies per A-step epoch, synergy shares per B-step epoch ---
def _hand_weighted_conf(tlogits):
    conf = torch.stack([F.softmax(t, 1).amax(1) for t in tlogits], 1)
    w = conf / conf.sum(1, keepdim=True)
    return sum(w[:, i:i + 1] * F.softmax(t, 1) for i, t in enumerate(tlogits))


@torch.no_grad()
def _hand_val_accuracies(d, loader):
    d.eval()
    right = {k: 0 for k in ("synergy", "teacher1", "teacher2", "ensemble", "oracle")}
    seen = 0
    for x, y, _ in loader:
        touts = [t(x) for t in d.teachers]
        mu = d.ib_mbm(d.student(x)["distill_feat"], [o["distill_feat"] for o in touts]).mu
        hits = [o["logit"].argmax(1) == y for o in touts]
        right["synergy"] += int((d.synergy_head(mu).argmax(1) == y).sum())
        right["teacher1"] += int(hits[0].sum())
        right["teacher2"] += int(hits[1].sum())
        right["ensemble"] += int((_hand_weighted_conf([o["logit"] for o in touts]).argmax(1) == y).sum())
        right["oracle"] += int((hits[0] | hits[1]).sum())
        seen += int(y.shape[0])
    return {k: v / seen for k, v in right.items()}


@torch.no_grad()
def _hand_synergy_shares(d, batch):
    """``auto``, unmixed batch: the samples whose synergy label-CE is not above the ensemble's,
    and their share of the certainty weights clamp(m / mean m, min_cw, max_cw)."""
    s = d.settings
    flags = [m.training for m in d.student.modules()]
    d.student.eval()
    query = d.student(batch.x)["distill_feat"]
    for m, flag in zip(d.student.modules(), flags):
        m.training = flag
    touts = [t(batch.x) for t in d.teachers]
    ib = d.ib_mbm(query, [o["distill_feat"] for o in touts])
    syn_ce = F.cross_entropy(d.synergy_head(ib.mu), batch.y, reduction="none")
    ens_ce = -torch.log(_hand_weighted_conf([o["logit"] for o in touts]).gather(1, batch.y[:, None])).squeeze(1)
    choose = (syn_ce <= ens_ce).float()
    m = (1.0 / ib.std ** 2).mean(1)
    cw = (m / m.mean()).clamp(s.min_cw, s.max_cw)
    return float(choose.mean()), float((cw * choose).sum() / cw.sum())


def test_per_epoch_accuracies_and_synergy_shares_are_logged_in_the_store(workdir, monkeypatch):
    from mlflow.tracking import MlflowClient

    from asib_core.tracking import configure_tracking, open_run

    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    cfg = asib_cfg("L1_ib", ["experiment.num_stages=1", "experiment.student_epochs_per_stage=[1]",
                             "experiment.teacher_adapt_epochs=1", "experiment.enable_kd_after_syn_acc=0",
                             "experiment.kd_target=auto", "experiment.mixup_alpha=0",
                             "experiment.cutmix_alpha_distill=0", "experiment.dataset.batch_size=8"])
    run, d = make_run(cfg, tiny_data(cfg, per_class=3, val_split=0.05), None, workdir)
    hand_acc, hand_shares = {}, []
    stage_start, forward_train = d.stage_start, d.forward_train

    def spy_stage_start(stage, runner):
        stage_start(stage, runner)
        hand_acc.update(_hand_val_accuracies(d, runner.val_loader))

    def spy_forward_train(batch, ctx):
        out = forward_train(batch, ctx)      # its train-mode forward moves the BN statistics the IB query reads
        hand_shares.append(_hand_synergy_shares(d, batch))
        return out

    d.stage_start, d.forward_train = spy_stage_start, spy_forward_train
    configure_tracking()
    with open_run(experiment="asib-logging", run_name="tiny", tags={}) as handle:
        run.tracker = handle
        run.fit()
    client = MlflowClient()

    def logged(key):
        return [(m.step, m.value) for m in client.get_metric_history(handle.run_id, key)]

    for name, value in hand_acc.items():                       # the A-step epoch is step 0
        assert logged(f"a_step_val/{name}_acc") == [(0, pytest.approx(value, abs=1e-9))], name
    assert logged("a_step/syn_acc")[0][1] == logged("a_step_val/synergy_acc")[0][1]
    assert logged("gate/open")[0] == (0, 1.0) and len(hand_shares) == len(run.train_loader) >= 2
    share, weight_share = (sum(v) / len(hand_shares) for v in zip(*hand_shares))   # means over batches
    assert logged("b_step/syn_share") == [(1, pytest.approx(share, abs=1e-6))]
    assert logged("b_step/syn_kd_weight_share") == [(1, pytest.approx(weight_share, abs=1e-6))]
    assert 0.0 < share < 1.0                  # auto: a share that depends on the samples


# -- the relative gate option -------------------------------------------------------------------
def test_the_gate_decision_in_both_modes_on_fixed_values():
    from asib_core.methods.asib.targets import GateState

    absolute = ASIBSettings.from_cfg(asib_cfg("L1_ib"))                       # threshold 0.8
    relative = ASIBSettings.from_cfg(asib_cfg("L1_ib", ["experiment.synergy_gate_mode=ensemble"]))
    assert absolute.gate_mode == "absolute"                                   # the default

    def gate(settings, syn, ens):
        return GateState(threshold=settings.gate_threshold_for(ens), syn_acc=syn, trained=True,
                         ensemble_acc=ens).open

    assert [gate(absolute, 0.79, 0.5), gate(absolute, 0.80, 0.95)] == [False, True]
    assert [gate(relative, 0.79, 0.78), gate(relative, 0.80, 0.95), gate(relative, 0.9, 0.9)] == [True, False, True]
    assert not gate(relative, 0.9, math.nan)                                  # no ensemble measured yet
    # the A-step KD toward the student: the same rule against the latest measurements
    assert absolute.a_kd_open(3, 0.85, 0.9) and not relative.a_kd_open(3, 0.85, 0.9)
    assert relative.a_kd_open(3, 0.9, 0.85) and not relative.a_kd_open(3, 0.9)
    with pytest.raises(ConfigError, match="synergy_gate_mode='relative'"):
        ASIBSettings.from_cfg(asib_cfg("L1_ib", synergy_gate_mode="relative"))


def test_an_absolute_threshold_under_the_ensemble_gate_is_warned_about():
    from asib_core.methods.asib.config_warnings import config_warnings

    cfg = asib_cfg("L1_ib", ["experiment.synergy_gate_mode=ensemble"])
    assert any("enable_kd_after_syn_acc=0.8 is not read" in m
               for m in config_warnings(ASIBSettings.from_cfg(cfg), cfg, True))
    cfg = asib_cfg("L1_ib")
    assert not any("enable_kd_after_syn_acc" in m for m in config_warnings(ASIBSettings.from_cfg(cfg), cfg, True))


def test_the_ensemble_gate_takes_the_ensemble_accuracy_measured_after_the_a_step(tmp_path):
    from asib_core.methods.asib.a_step import AStep

    cfg = asib_cfg("L1_ib", ["experiment.num_stages=1", "experiment.student_epochs_per_stage=[1]",
                             "experiment.teacher_adapt_epochs=1", "experiment.synergy_gate_mode=ensemble",
                             "experiment.dataset.batch_size=16"])
    run, d = make_run(cfg, tiny_data(cfg, per_class=2, val_split=0.05), None, tmp_path)
    run.log_metrics = lambda metrics, step=None: None
    AStep(d, 0, run).run()
    hand = _hand_val_accuracies(d, run.val_loader)
    assert d.gate.threshold == d.gate.ensemble_acc == pytest.approx(hand["ensemble"], abs=1e-9)
    assert d.gate.open == (hand["synergy"] >= hand["ensemble"])
    assert d.gate.threshold != 0.8 or hand["ensemble"] == 0.8


# -- the teachers' training features computed once per stage (frozen teachers, no augmentation) --
@pytest.mark.parametrize("augment", [False, True])
def test_a_step_reuses_the_teachers_training_features_only_for_unaugmented_images(tmp_path, monkeypatch, augment):
    from asib_core.methods.asib import a_step

    cfg = asib_cfg("L3_ib_cccp_tadapt", ["experiment.num_stages=1", "experiment.student_epochs_per_stage=[1]",
                                         "experiment.teacher_adapt_epochs=3", "experiment.dataset.batch_size=12"])
    build, losses = a_step.train_cache_for, a_step.a_step_losses
    results = {}
    for cached in (True, False):
        monkeypatch.setattr(a_step, "train_cache_for", build if cached else (lambda *args: None))
        run, d = make_run(cfg, tiny_data(cfg, per_class=4, val_split=0.02, data_aug=int(augment)), None,
                          tmp_path / str(cached))
        run.log_metrics = lambda metrics, step=None: None
        train_calls, distinct = [], set()
        d.teachers[0].register_forward_hook(lambda m, i, o: train_calls.append(i[0].shape[0]))
        monkeypatch.setattr(a_step, "a_step_losses",
                            lambda dd, batch, *args: (distinct.update(batch.idx.tolist()), losses(dd, batch, *args))[1])
        a_step.AStep(d, 0, run).run()
        results[cached] = (sum(train_calls) - len(run.data.val), (run.train_loader.num_samples, len(distinct)),
                           {k: v for k, v in d.state_dict().items() if k.startswith(("ib_mbm.", "synergy_head."))
                            or ".distill_adapter." in k})
    (seen, (per_epoch, distinct), state), (live_seen, _, live_state) = results[True], results[False]
    # 36 of the 40 samples per epoch (drop_last): the teachers run on some alone in epochs 2-3,
    # and at least two batches of epoch 3 read every row from the cache
    assert live_seen == 3 * per_epoch and per_epoch < distinct <= per_epoch + 4
    assert seen == (3 * per_epoch if augment else distinct)        # without augmentation: once per sample
    assert state.keys() == live_state.keys() and any(".distill_adapter." in k for k in state)
    # the same A-step as with live features, up to float rounding: a sample whose features are
    # computed alone (not seen in the first epoch) differs in the last bits from one in a batch
    assert all(torch.allclose(state[k], live_state[k], rtol=0, atol=1e-5) for k in state)


def test_a_step_without_augmentation_runs_student_and_teachers_once_per_sample(tmp_path, monkeypatch):
    """a_step_augment=false on an augmented run: the A-step reads the training images as they are
    (the B-step still augments), and over 3 A-step epochs the frozen student and the frozen
    teachers see each training sample once; with the key true (the seed's behaviour) every epoch."""
    from asib_core.methods.asib import a_step

    seen = {}
    for plain in (True, False):
        cfg = asib_cfg("L1_ib", ["experiment.num_stages=1", "experiment.student_epochs_per_stage=[1]",
                                 "experiment.teacher_adapt_epochs=3", "experiment.dataset.batch_size=12",
                                 f"experiment.a_step_augment={str(not plain).lower()}"])
        run, d = make_run(cfg, tiny_data(cfg, per_class=4, val_split=0.02, data_aug=1), None, tmp_path / str(plain))
        run.log_metrics = lambda metrics, step=None: None
        calls = {"student": [], "teacher1": [], "teacher2": []}
        for name, module in (("student", d.student), ("teacher1", d.teachers[0]), ("teacher2", d.teachers[1])):
            module.register_forward_hook(lambda m, i, o, name=name: calls[name].append(i[0]))
        batches = []
        losses = a_step.a_step_losses
        monkeypatch.setattr(a_step, "a_step_losses",
                            lambda dd, batch, *args: (batches.append(batch), losses(dd, batch, *args))[1])
        a_step.AStep(d, 0, run).run()
        monkeypatch.undo()
        n_val = len(run.data.val)          # the validation passes: teachers once (cached), student every epoch
        rows = {k: sum(x.shape[0] for x in v) - (3 * n_val if k == "student" else n_val) for k, v in calls.items()}
        seen[plain] = (rows, run.train_loader.num_samples, batches, run)
    (rows, per_epoch, batches, run), (live_rows, live_epoch, live_batches, _) = seen[True], seen[False]
    assert live_rows == {k: 3 * live_epoch for k in live_rows}           # augmented: every epoch
    assert all(per_epoch <= v <= per_epoch + 4 for v in rows.values())   # once per sample (drop_last: 36 of 40)
    # the A-step's images are the training images as they are; the seed's A-step augments them
    loader = run.train_loader
    unaugmented = [loader.normalize(loader.images.index_select(0, b.idx)) for b in (batches[0], live_batches[0])]
    assert torch.equal(batches[0].x, unaugmented[0]) and not torch.equal(live_batches[0].x, unaugmented[1])
    assert run.train_loader.augment and not run.plain_train_loader().augment
