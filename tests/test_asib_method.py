"""Issue 6, ASIB: each mechanism proved by a test that fails without it.

Real digits data, resnet20 + wrn_16_2 teachers -> resnet8 student (tests/asib_helpers.py).
"""
from __future__ import annotations

import copy
import dataclasses
import math

from pathlib import Path

import mlflow
import pytest
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient

from asib_core.config.errors import ConfigError
from asib_core.engine.state import load_state
from asib_core.losses import soft_target_kd_loss
from asib_core.methods.asib import IBMBM, ASIBSettings
from asib_core.methods.asib.a_step import a_step_losses, calibrated_synergy_scale, synergy_accuracy
from asib_core.methods.asib.targets import ensemble_target, entropy_matching_scale, mean_entropy, teacher_mask
from asib_core.contract import Batch, TrainContext
from asib_core.tracking.runs import RunHandle
from tests.asib_helpers import asib_cfg, make_run, tiny_data, trained_teacher_states


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@dataclasses.dataclass
class _StoreTracker(RunHandle):
    """The run's real tracker, on a sqlite store of its own (the global tracking URI is untouched)."""

    uri: str = ""

    def log_metrics(self, metrics: dict, step: int) -> None:
        before = mlflow.get_tracking_uri()
        mlflow.set_tracking_uri(self.uri)
        try:
            super().log_metrics(metrics, step)
        finally:
            mlflow.set_tracking_uri(before)


class _StoreLog:
    """What the run logged, read back from the store: one dict of metrics per step, in step order."""

    def __init__(self, run, folder: Path):
        uri = f"sqlite:///{Path(folder) / 'mlflow.db'}"
        self.client = MlflowClient(uri)
        exp = self.client.create_experiment("asib-test")
        self.run_id = self.client.create_run(exp).info.run_id
        run.tracker = _StoreTracker(self.run_id, exp, False, uri=uri)

    def _steps(self) -> list[dict]:
        by_step: dict[int, dict] = {}
        for key in self.client.get_run(self.run_id).data.metrics:
            for m in self.client.get_metric_history(self.run_id, key):
                by_step.setdefault(m.step, {})[key] = m.value
        return [by_step[k] for k in sorted(by_step)]

    def __iter__(self):
        return iter(self._steps())

    def __getitem__(self, i):
        return self._steps()[i]


def _logged(run, folder: Path) -> _StoreLog:
    return _StoreLog(run, folder)


def _first_batch(run, mixed: bool = False) -> Batch:
    x, y, idx = next(iter(run.train_loader))
    if not mixed:
        return Batch(x=x, y=y, idx=idx, y_b=y, lam=1.0)
    perm = torch.roll(torch.arange(x.shape[0]), 1)
    lam = 0.7
    return Batch(x=lam * x + (1 - lam) * x[perm], y=y, idx=idx, y_b=y[perm], lam=lam)


# -- IB_MBM ----------------------------------------------------------------------------
def test_ib_mbm_samples_in_training_mode_and_returns_mu_in_eval_mode():
    torch.manual_seed(0)
    ib = IBMBM(8, 6, 16, 4, logvar_clip=4.0, min_std=0.01, feature_norm="l2")
    q, kv = torch.randn(512, 8), torch.randn(512, 2, 6)
    ib.train()
    a, b = ib(q, kv), ib(q, kv)
    assert torch.equal(a.mu, b.mu)
    assert not torch.allclose(a.z, a.mu) and not torch.allclose(a.z, b.z)
    eps = (a.z - a.mu) / a.std                       # the reparameterisation noise is N(0, I)
    eps = eps.detach()
    assert abs(float(eps.mean())) < 0.02 and abs(float(eps.std()) - 1.0) < 0.02
    ib.eval()
    c, d = ib(q, kv), ib(q, kv)
    assert torch.equal(c.z, c.mu) and torch.equal(c.z, d.z)
    assert not torch.equal(ib(q, kv, sample=True).z, c.mu)      # use_mu_for_kd: false samples in eval
    ib.stochastic = False                                         # use_ib: false -> deterministic
    ib.train()
    assert torch.equal(ib(q, kv).z, ib(q, kv).mu)


def test_ib_mbm_logvar_clip_min_std_and_feature_norm():
    torch.manual_seed(0)
    ib = IBMBM(8, 6, 16, 2, logvar_clip=0.5, min_std=0.9, feature_norm="l2").eval()
    with torch.no_grad():
        ib.logvar_head.bias.fill_(-3.0)               # far below -clip: clipped, then floored
    q, kv = torch.randn(32, 8), torch.randn(32, 2, 6)
    with torch.no_grad():
        out = ib(q, kv)
    assert float(out.logvar.min()) >= -0.5 and float(out.logvar.max()) <= 0.5
    assert float(out.std.min()) >= 0.9 - 1e-6
    # l2: the scale of the inputs does not matter; none: it does
    assert torch.allclose(ib(10 * q, 3 * kv).mu, out.mu, atol=1e-5)
    ib.feature_norm = "none"
    assert not torch.allclose(ib(10 * q, 3 * kv).mu, ib(q, kv).mu, atol=1e-3)
    with pytest.raises(ConfigError):
        IBMBM(8, 6, 10, 4)                            # d not divisible by n_head


# -- settings: window, schedules, refusals -----------------------------------------------
def test_window_beta_and_ramp_schedules_of_the_seed_ladder():
    l2 = ASIBSettings.from_cfg(asib_cfg("L2_cccp"))
    assert (l2.adapt_epochs, l2.synergy_only_epochs, l2.window) == (6, 6, 5)
    # the CCCP ramp has its own key (cccp_ramp_epochs, default 2): one post-window epoch per stage
    assert [l2.cccp_ramp(0, e) for e in range(6)] == [0, 0, 0, 0, 0, 0.5]
    assert [l2.cccp_ramp(s, 5) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]
    l3 = ASIBSettings.from_cfg(asib_cfg("L3_ib_cccp_tadapt"))
    assert l3.window == 2 and l3.kl_epochs_per_stage == 4 and l3.cccp_ramp_epochs == 2
    assert [l3.cccp_ramp(0, e) for e in range(6)] == pytest.approx([0, 0, 1 / 2, 1, 1, 1])
    # beta: ib_beta 5e-5, warm-up 4 KL-epochs counted over the run, KL in epochs 2..5
    assert [l3.beta(0, e) for e in range(6)] == pytest.approx([0, 0, 1.25e-5, 2.5e-5, 3.75e-5, 5e-5])
    assert l3.beta(1, 2) == pytest.approx(5e-5)
    assert ASIBSettings.from_cfg(asib_cfg("L1_ib")).cccp_on is False
    sota = ASIBSettings.from_cfg(asib_cfg("sota_generic"))
    assert sota.kd_target == "auto" and sota.kl_epochs_per_stage == 0 and not sota.use_partial_freeze
    assert sota.ens_alpha(0, 240) == 0.0 and sota.ens_alpha(239, 240) == 0.0   # base: kd_ens_alpha 0


@pytest.mark.parametrize("changes, needle", [
    ({"use_vib_synergy_head": True}, "use_vib_synergy_head"),
    ({"use_cccp": True, "use_cccp_in_a": False}, "use_cccp_in_a"),
    ({"use_teacher_finetuning": True, "train_distill_adapter_only": True}, "contradict"),
    ({"kd_ens_alpha": 0.5, "kd_ens_alpha_max": 0.2}, "kd_ens_alpha_max"),
    ({"kd_target": "auto_min"}, "kd_target"),
    ({"teacher_adapt_epochs": 0}, "use_cccp=true needs an A-step"),
    ({"use_overlap_sampling": True, "overlap_pct": None}, "overlap_pct"),
    ({"feat_kd_key": "feat_4d"}, "feat_kd_key"),
    ({"synergy_scale_calibration": "auto"}, "synergy_scale_calibration"),
])
def test_settings_refuse_keys_that_cannot_do_what_they_say(changes, needle):
    cfg = asib_cfg("L3_ib_cccp_tadapt")
    cfg.update(changes)
    with pytest.raises(ConfigError, match=needle):
        ASIBSettings.from_cfg(cfg)


@pytest.mark.parametrize("changes, needle", [
    ({"teacher_weights": [1.0, 1.0, 1.0]}, "teacher_weights"),
    ({"teacher_weights": [-1.0, 2.0]}, "teacher_weights"),
    ({"feat_kd_key": "feat_2d"}, "widths must agree"),          # resnet8 feat_2d is 64 wide, mu 32
    ({"kd_target": "teacher", "kd_teacher_index": 2}, "kd_teacher_index"),
])
def test_distiller_refuses_inconsistent_keys_at_build(tmp_path, changes, needle):
    cfg = asib_cfg("L1_ib")
    cfg.update(changes)
    with pytest.raises(ConfigError, match=needle):
        make_run(cfg, tiny_data(cfg, per_class=2), None, tmp_path)


# -- IB KL and CCCP in the A-step ---------------------------------------------------------
def test_ib_kl_term_matches_the_closed_form_gaussian_kl(tmp_path):
    cfg = asib_cfg("L1_ib", ["experiment.ib_beta=0.1"])
    run, d = make_run(cfg, tiny_data(cfg, per_class=4), None, tmp_path)
    batch = _first_batch(run)
    captured = {}
    d.ib_mbm.register_forward_hook(lambda m, i, o: captured.update(out=o))
    d.student.eval()
    d.ib_mbm.train()
    d.synergy_head.train()
    torch.manual_seed(3)
    _, losses = a_step_losses(d, batch, stage=0, epoch=3)
    mu, std = captured["out"].mu.detach().double(), captured["out"].std.detach().double()
    kl_hand = (0.5 * (mu ** 2 + std ** 2 - torch.log(std ** 2) - 1.0)).sum(1).mean()
    kl_dist = torch.distributions.kl_divergence(torch.distributions.Normal(mu, std),
                                                torch.distributions.Normal(0.0, 1.0)).sum(1).mean()
    assert float(kl_hand) == pytest.approx(float(kl_dist), rel=1e-9)
    # L1: window 2, KL epochs 2..5, warm-up 4 -> epoch 3 of stage 0 is the 2nd KL epoch: beta = 0.1 * 2 / 4
    assert float(losses["ib_kl"].detach()) == pytest.approx(0.05 * float(kl_hand), rel=1e-5)
    _, window_losses = a_step_losses(d, batch, stage=0, epoch=1)
    assert float(window_losses["ib_kl"].detach()) == 0.0 and set(window_losses) == {"syn_ce", "ib_kl"}


def test_cccp_is_zero_in_the_window_and_nonzero_after_it_in_an_L2_a_step(tmp_path):
    cfg = asib_cfg("L2_cccp", ["experiment.num_stages=1", "experiment.student_epochs_per_stage=[0]",
                               "experiment.dataset.batch_size=16"])
    run, d = make_run(cfg, tiny_data(cfg, per_class=2, val_split=0.02), None, tmp_path)
    _logged(run, tmp_path)
    run.fit()
    a_steps = [h for h in run.state.history if "a_step/loss" in h]
    assert len(a_steps) == 6                                       # teacher_adapt_epochs 6, window 5
    cccp = [h["a_step/cccp"] for h in a_steps]
    assert cccp[:5] == [0.0] * 5 and cccp[5] > 0
    assert all(h["a_step/cccp_raw"] > 0 for h in a_steps)          # the distance itself is never 0
    # cccp_alpha 0.2 times the ramp 1/2 (cccp_ramp_epochs 2, first post-window epoch)
    assert cccp[5] == pytest.approx(0.2 * 0.5 * a_steps[5]["a_step/cccp_raw"], rel=1e-6)
    assert a_steps[5]["a_step/loss"] == pytest.approx(a_steps[5]["a_step/syn_ce"] + cccp[5], rel=1e-6)
    assert "a_step/ib_kl" not in a_steps[5]                        # L2: use_ib false


# -- PPF over the four stages of L4 --------------------------------------------------------
def test_ppf_leaves_exactly_the_documented_parameters_trainable_in_each_L4_stage(tmp_path):
    cfg = asib_cfg("L4_full", ["experiment.student_epochs_per_stage=[1,1,1,1]",
                               "experiment.teacher_adapt_epochs=1", "experiment.dataset.batch_size=16"])
    assert cfg["student_freeze_level_schedule"] == [-1, -1, 1, 1]
    run, d = make_run(cfg, tiny_data(cfg, per_class=2, val_split=0.02), None, tmp_path)
    logged = _logged(run, tmp_path)
    seen, a_step_teacher, snapshots = {}, {}, {}
    forward_train, teacher_tokens, stage_start = d.forward_train, d.teacher_tokens, d.stage_start

    def spy_forward(batch, ctx):
        bn_modes = {n: m.training for n, m in d.student.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
        seen[ctx.stage] = ({n for n, p in d.student.named_parameters() if p.requires_grad}, bn_modes,
                           [{n for n, p in t.named_parameters() if p.requires_grad} for t in d.teachers])
        return forward_train(batch, ctx)

    def spy_tokens(x, a_step=False):
        if a_step:
            a_step_teacher[len(snapshots) - 1] = [{n for n, p in t.named_parameters() if p.requires_grad}
                                                  for t in d.teachers]
        return teacher_tokens(x, a_step=a_step)

    def spy_stage_start(stage, runner):
        snapshots[stage] = copy.deepcopy(d.student.state_dict())
        stage_start(stage, runner)

    d.forward_train, d.teacher_tokens, d.stage_start = spy_forward, spy_tokens, spy_stage_start
    run.fit()

    every = {n for n, _ in d.student.named_parameters()}
    level1 = {n for n in every if n.startswith(("layer3.", "classifier.", "distill_adapter."))}
    assert level1 and level1 != every
    for stage, expected in enumerate([every, every, level1, level1]):
        trainable, bn_modes, teachers_b = seen[stage]
        assert trainable == expected, f"stage {stage + 1}"
        frozen_bn = {n for n in bn_modes if not n.startswith("layer3.")}
        assert all(bn_modes[n] == (stage < 2) for n in frozen_bn)            # student_freeze_bn: eval
        assert all(bn_modes[n] for n in bn_modes if n.startswith("layer3."))
        assert teachers_b == [set(), set()]                                    # frozen in the B-step
        # train_distill_adapter_only: only the adapters train in the A-step, at every level
        for names, teacher in zip(a_step_teacher[stage], d.teachers):
            assert names == {f"distill_adapter.{n}" for n, _ in teacher.distill_adapter.named_parameters()}
    final = d.student.state_dict()
    for name, value in snapshots[2].items():                  # stages 3-4: the frozen part never moves
        if name.startswith(("stem.", "layer1.", "layer2.")):
            assert torch.equal(value, final[name]), name      # weights and BN running statistics
    for name in ("layer3.0.conv1.weight", "classifier.weight"):
        assert not torch.equal(snapshots[2][name], final[name]), name
    assert not torch.equal(snapshots[0]["stem.conv1.weight"], snapshots[2]["stem.conv1.weight"])
    ppf_logs = [m for m in logged if "ppf/student_level" in m]
    assert [m["ppf/student_level"] for m in ppf_logs] == [-1, -1, 1, 1]
    # a resumed run re-applies the stage's freezing and the gate from the checkpoint
    _, fresh = make_run(cfg, tiny_data(cfg, per_class=2, val_split=0.02), None, tmp_path / "fresh")
    fresh.load_checkpoint_state(load_state(run.last_path)["model"])      # the file a resume reads
    assert {n for n, p in fresh.student.named_parameters() if p.requires_grad} == level1
    assert fresh.gate.as_dict() == d.gate.as_dict() and fresh.gate.trained
    for a, b in zip(fresh.teachers, d.teachers):
        assert torch.equal(a.distill_adapter[0].weight, b.distill_adapter[0].weight)


# -- A-step with trained teachers, the gate and the B-step targets ------------------------
@pytest.fixture(scope="module")
def trained_a_step(request, tmp_path_factory):
    cache = request.config.cache.mkdir("asib_teachers") if request.config.cache else tmp_path_factory.mktemp("t")
    states = trained_teacher_states(cache)
    cfg = asib_cfg("L1_ib", ["experiment.num_stages=1", "experiment.student_epochs_per_stage=[0]",
                             "experiment.teacher_adapt_epochs=4", "experiment.a_step_lr=0.003",
                             "experiment.ib_mbm_lr_factor=1"])
    folder = tmp_path_factory.mktemp("astep")
    run, d = make_run(cfg, tiny_data(cfg, per_class=16), states, folder)
    logged = _logged(run, folder)
    before = synergy_accuracy(d, run.val_loader)
    ib_before = copy.deepcopy(d.ib_mbm.state_dict())
    teacher_before = [copy.deepcopy(t.state_dict()) for t in d.teachers]
    run.fit()
    return {"run": run, "d": d, "logged": logged, "before": before, "ib_before": ib_before,
            "teacher_before": teacher_before}


def test_a_step_trains_the_synergy_above_chance_on_validation(trained_a_step):
    run, d = trained_a_step["run"], trained_a_step["d"]
    accs = [h["a_step/syn_acc"] for h in run.state.history if "a_step/syn_acc" in h]
    assert len(accs) == 4
    assert trained_a_step["before"] < 0.2 and accs[-1] >= 0.25 and accs[-1] > trained_a_step["before"] + 0.1
    assert any(not torch.equal(v, d.ib_mbm.state_dict()[k]) for k, v in trained_a_step["ib_before"].items())
    for t, before in zip(d.teachers, trained_a_step["teacher_before"]):   # L1: teachers untouched
        assert all(torch.equal(v, t.state_dict()[k]) for k, v in before.items())
    # the gate holds the validation accuracy of the last A-step epoch, computed independently here
    correct = seen = 0
    d.eval()
    with torch.no_grad():
        for x, y, _ in run.val_loader:
            tokens = [t(x)["distill_feat"] for t in d.teachers]
            mu = d.ib_mbm(d.student(x)["distill_feat"], tokens).mu
            correct += int((d.synergy_head(mu).argmax(1) == y).sum())
            seen += int(y.shape[0])
    assert d.gate.syn_acc == accs[-1] == correct / seen and d.gate.trained
    last = [m for m in trained_a_step["logged"] if "gate/open" in m][-1]
    assert last["gate/syn_acc"] == accs[-1] and last["gate/threshold"] == 0.8


def _hand_kd(d, batch, tau, ens_alpha, gate_open, auto=False, scale=None):
    s = d.settings
    scale = s.synergy_logit_scale if scale is None else scale
    with torch.no_grad():
        out = d.student(batch.x)
        touts = [t(batch.x) for t in d.teachers]
        probs = [F.softmax(o["logit"] / tau, 1) for o in touts]
        conf = torch.stack([F.softmax(o["logit"], 1).amax(1) for o in touts], 1)
        w = conf / conf.sum(1, keepdim=True)
        q_ens = w[:, :1] * probs[0] + w[:, 1:] * probs[1]
        k_ens = soft_target_kd_loss(out["logit"], q_ens, tau, reduction="none")
        if not gate_open:
            return float(k_ens.mean()), 0.0
        d.student.eval()                              # the IB query: eval-mode student features
        query = d.student(batch.x)["distill_feat"]
        d.student.train()
        ib = d.ib_mbm(query, [o["distill_feat"] for o in touts])
        z = d.synergy_head(ib.mu)
        tau_s = s.tau_syn
        probs_s = [F.softmax(o["logit"] / tau_s, 1) for o in touts]
        q_ens_s = w[:, :1] * probs_s[0] + w[:, 1:] * probs_s[1]
        q_syn = (1 - ens_alpha) * F.softmax(scale * z / tau_s, 1) + ens_alpha * q_ens_s
        k_syn = soft_target_kd_loss(out["logit"], q_syn, tau_s, reduction="none")   # hybrid: own term
        m = torch.exp(-2 * torch.log(ib.std)).mean(1)
        cw = (m / m.mean()).clamp(s.min_cw, s.max_cw)
        choose = torch.ones_like(k_syn, dtype=torch.bool)
        if auto:
            ce_syn = batch.lam * F.cross_entropy(z, batch.y, reduction="none") + (1 - batch.lam) * \
                F.cross_entropy(z, batch.y_b, reduction="none")
            conf1 = w[:, :1] * F.softmax(touts[0]["logit"], 1) + w[:, 1:] * F.softmax(touts[1]["logit"], 1)
            logq = torch.log(conf1)
            ce_ens = -(batch.lam * logq.gather(1, batch.y[:, None]) +
                       (1 - batch.lam) * logq.gather(1, batch.y_b[:, None])).squeeze(1)
            choose = ce_syn <= ce_ens
        k = torch.where(choose, k_syn, k_ens)
        return float((cw * k).mean()), float(choose.float().mean())


def test_gate_switches_the_kd_target_when_validation_synergy_accuracy_crosses_the_threshold(trained_a_step):
    run, d = trained_a_step["run"], trained_a_step["d"]
    d.train()
    # BN momentum 0: the train-mode forwards below leave the running statistics (read by the
    # eval-mode IB query) as they are, so every call sees the same query
    bns = [m for m in d.student.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.momentum = 0.0
    batch = _first_batch(run, mixed=True)
    ctx = TrainContext(epoch=5, stage=0, epoch_in_stage=0, total_epochs=1, tau=4.0, kd_ramp=1.0,
                       device=torch.device("cpu"))
    inputs = []
    hook = d.teachers[0].register_forward_hook(lambda m, i, o: inputs.append(i[0]))
    acc = d.gate.syn_acc
    results = {}
    for label, threshold in (("open", acc - 0.01), ("closed", acc + 0.01)):
        d.gate.threshold = threshold
        d.pop_epoch_metrics()
        _, losses = d.forward_train(batch, ctx)
        stats = d.pop_epoch_metrics()
        results[label] = (losses, stats)
        # the teachers see the student's own batch (this hand-made batch has no x_clean)
        assert torch.equal(inputs[-1], batch.x)
    hook.remove()
    a = d.settings.kd_ens_alpha                                   # first B-step epoch of the stage
    (open_losses, open_stats), (closed_losses, closed_stats) = results["open"], results["closed"]
    assert open_stats["gate/open"] == 1.0 and open_stats["kd/syn_ratio"] == 1.0
    assert closed_stats["gate/open"] == 0.0 and closed_stats["kd/syn_ratio"] == 0.0
    kd_open, _ = _hand_kd(d, batch, 4.0, a, gate_open=True)
    kd_closed, _ = _hand_kd(d, batch, 4.0, a, gate_open=False)
    assert float(open_losses["kd"].detach()) == pytest.approx(0.35 * kd_open, rel=1e-4)
    assert float(closed_losses["kd"].detach()) == pytest.approx(0.35 * kd_closed, rel=1e-4)
    assert kd_open != pytest.approx(kd_closed, rel=1e-3)
    assert "feat_kd" in open_losses and "feat_kd" not in closed_losses    # feature KD follows the gate
    # auto: per-sample choice between the synergy and the ensemble
    d.gate.threshold = acc - 0.01
    settings = d.settings
    d.settings = dataclasses.replace(settings, kd_target="auto")
    try:
        d.pop_epoch_metrics()
        _, losses = d.forward_train(batch, ctx)
        stats = d.pop_epoch_metrics()
    finally:
        d.settings = settings
    kd_auto, ratio = _hand_kd(d, batch, 4.0, a, gate_open=True, auto=True)
    assert stats["kd/syn_ratio"] == pytest.approx(ratio)
    assert float(losses["kd"].detach()) == pytest.approx(0.35 * kd_auto, rel=1e-4)
    # synergy_scale_calibration: the synergy target takes the scale the A-step set, not synergy_logit_scale
    d.settings = dataclasses.replace(settings, scale_calibration="ensemble_entropy")
    d.gate.synergy_scale = 2.5
    try:
        d.pop_epoch_metrics()
        _, losses = d.forward_train(batch, ctx)
        stats = d.pop_epoch_metrics()
    finally:
        d.settings, d.gate.synergy_scale = settings, math.nan
    assert stats["kd/synergy_scale"] == 2.5
    assert float(losses["kd"].detach()) == pytest.approx(0.35 * _hand_kd(d, batch, 4.0, a, True, scale=2.5)[0],
                                                         rel=1e-4)
    assert float(losses["kd"].detach()) != pytest.approx(0.35 * kd_open, rel=1e-3)
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum


def test_entropy_matching_scale_recovers_the_scale_of_a_known_target():
    logits = torch.tensor([[4.0, 1.0, 0.0, -2.0], [0.5, 0.4, -0.3, 0.0], [9.0, -1.0, 2.0, 2.0]])

    def entropy(a: float) -> float:                      # by hand: -sum p log p, mean over rows
        p = [[math.exp(a * v / 3.0) for v in row] for row in logits.tolist()]
        p = [[v / sum(row) for v in row] for row in p]
        return sum(-sum(v * math.log(v) for v in row) for row in p) / len(p)

    for a in (0.2, 1.0, 2.95, 7.0):
        assert entropy_matching_scale(logits, 3.0, entropy(a)) == pytest.approx(a, rel=1e-5)
    assert mean_entropy(F.softmax(logits / 3.0, 1)) == pytest.approx(entropy(1.0), rel=1e-6)
    # a goal no scale reaches (above ln 4, the entropy of the uniform distribution): the lower bound
    assert entropy_matching_scale(logits, 3.0, math.log(4) + 0.1) == pytest.approx(1e-3, rel=1e-6)


def test_calibrated_scale_gives_the_synergy_target_the_ensembles_entropy_on_the_training_split(trained_a_step):
    """Recomputed by hand on the training split without augmentation, everything in eval mode:
    the weighted_conf ensemble at tau and the synergy target at tau_syn with the scale found."""
    run, d = trained_a_step["run"], trained_a_step["d"]
    tau, tau_s = 4.0, d.settings.tau_syn
    scale = calibrated_synergy_scale(d, run.data.loader("train", train=False, augment=False), tau)
    d.eval()
    z, q = [], []
    with torch.no_grad():
        for x, *_ in run.data.loader("train", train=False, augment=False):
            touts = [t(x) for t in d.teachers]
            z.append(d.synergy_head(d.ib_mbm(d.student(x)["distill_feat"], [o["distill_feat"] for o in touts]).mu))
            conf = torch.stack([F.softmax(o["logit"], 1).amax(1) for o in touts], 1)
            w = conf / conf.sum(1, keepdim=True)
            q.append(sum(w[:, i:i + 1] * F.softmax(o["logit"] / tau, 1) for i, o in enumerate(touts)))
    z, q = torch.cat(z), torch.cat(q)

    def entropy(p):
        return float(-(p * p.log()).sum(1).mean())

    assert entropy(F.softmax(scale * z / tau_s, 1)) == pytest.approx(entropy(q), abs=1e-4)
    assert scale != pytest.approx(d.settings.synergy_logit_scale, rel=0.05)


def test_a_step_with_scale_calibration_sets_logs_and_checkpoints_the_scale(tmp_path, request, caplog):
    cache = request.config.cache.mkdir("asib_teachers") if request.config.cache else tmp_path / "t"
    cfg = asib_cfg("L1_ib", ["experiment.num_stages=1", "experiment.student_epochs_per_stage=[0]",
                             "experiment.teacher_adapt_epochs=1", "experiment.synergy_scale_calibration=ensemble_entropy"])
    with caplog.at_level("WARNING"):
        run, d = make_run(cfg, tiny_data(cfg, per_class=4), trained_teacher_states(cache), tmp_path)
    assert "synergy_logit_scale=0.7 is not read" in caplog.text
    logged = _logged(run, tmp_path)
    assert d.synergy_scale() == d.settings.synergy_logit_scale == 0.7      # before any A-step
    run.fit()
    scale = d.gate.synergy_scale
    assert scale == pytest.approx(calibrated_synergy_scale(d, run.data.loader("train", train=False, augment=False), run.context().tau), rel=1e-9)
    assert d.synergy_scale() == scale and scale != pytest.approx(0.7, rel=0.01)
    assert [m["gate/synergy_logit_scale"] for m in logged if "gate/synergy_logit_scale" in m] == [scale]
    state = {}
    state["_asib"] = {"gate": d.gate.as_dict()}
    d.gate.synergy_scale = math.nan
    d.gate.load(state["_asib"]["gate"])
    assert d.synergy_scale() == scale


def test_without_an_a_step_the_untrained_synergy_never_opens_the_gate(tmp_path):
    cfg = asib_cfg("overlap_100", ["experiment.enable_kd_after_syn_acc=0.0", "experiment.dataset.batch_size=16"])
    assert cfg["teacher_adapt_epochs"] == 0 and cfg["kd_target"] == "auto"
    run, d = make_run(cfg, tiny_data(cfg, per_class=2, val_split=0.02), None, tmp_path)
    logged = _logged(run, tmp_path)
    d.stage_start(0, run)
    assert not d.gate.open and not d.gate.trained
    assert d.gate.syn_acc == synergy_accuracy(d, run.val_loader, run.precision)  # measured, not trained
    assert logged[-1]["gate/open"] == 0.0 and logged[-1]["gate/synergy_trained"] == 0.0
    d.train()
    ctx = TrainContext(epoch=9, stage=0, epoch_in_stage=0, total_epochs=1, tau=4.0, kd_ramp=1.0,
                       device=torch.device("cpu"))
    _, losses = d.forward_train(_first_batch(run), ctx)
    stats = d.pop_epoch_metrics()
    assert stats["kd/syn_ratio"] == 0.0 and "feat_kd" not in losses and "kd" in losses


# -- class-overlap sampling ---------------------------------------------------------------
def test_overlap_sampling_drops_teachers_that_never_saw_the_label():
    subsets = torch.zeros(2, 4, dtype=torch.bool)
    subsets[0, [0, 1, 2]] = True                     # teacher 1: classes 0-2, teacher 2: 2-3
    subsets[1, [2, 3]] = True
    y = torch.tensor([0, 2, 3])
    batch = Batch(x=torch.zeros(3, 1), y=y, idx=y, y_b=y, lam=1.0)
    mask = teacher_mask(subsets, batch, 2)
    assert mask.tolist() == [[True, False], [True, True], [False, True]]
    logits = [torch.randn(3, 4), torch.randn(3, 4)]
    cfg = {"teacher_weights": [0.5, 0.5], "kd_teacher_index": 0}
    avg, _ = ensemble_target("avg", cfg, logits, 2.0, mask)
    p = [F.softmax(t / 2.0, 1) for t in logits]
    assert torch.allclose(avg[0], p[0][0]) and torch.allclose(avg[2], p[1][2])
    assert torch.allclose(avg[1], 0.5 * p[0][1] + 0.5 * p[1][1])
    _, valid = ensemble_target("teacher", cfg, logits, 2.0, mask)
    assert valid.tolist() == [1.0, 1.0, 0.0]
    mixed = Batch(x=torch.zeros(3, 1), y=y, idx=y, y_b=torch.tensor([3, 2, 3]), lam=0.6)
    assert teacher_mask(subsets, mixed, 2).tolist() == [[True, True], [True, True], [False, True]]
    no_mask, _ = ensemble_target("avg", cfg, logits, 2.0, None)
    assert not torch.allclose(no_mask[0], avg[0]) and not math.isnan(float(no_mask.sum()))


def test_a_step_and_b_step_losses_stay_float32_under_bfloat16_autocast(tmp_path):
    """The CUDA runs use bf16 autocast; CPU autocast exercises the same dtype paths."""
    cfg = asib_cfg("L4_full", ["experiment.teacher_adapt_epochs=2", "experiment.dataset.batch_size=16"])
    run, d = make_run(cfg, tiny_data(cfg, per_class=2, val_split=0.02), None, tmp_path)
    batch = _first_batch(run, mixed=True)
    d.student.eval()
    d.ib_mbm.train()
    d.synergy_head.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, a_losses = a_step_losses(d, batch, stage=0, epoch=1)
    d.gate.syn_acc, d.gate.trained = 0.9, True
    d.train()
    ctx = TrainContext(epoch=5, stage=0, epoch_in_stage=0, total_epochs=1, tau=4.0, kd_ramp=1.0,
                       device=torch.device("cpu"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, b_losses = d.forward_train(batch, ctx)
    assert set(a_losses) == {"syn_ce", "ib_kl", "cccp"} and set(b_losses) == {"ce", "kd", "feat_kd", "hybrid"}
    for value in [*a_losses.values(), *b_losses.values()]:
        assert value.dtype == torch.float32 and torch.isfinite(value.detach())
    sum(b_losses.values()).backward()
    assert d.student.layer1[0].conv1.weight.grad is not None


# -- the teachers' validation features, computed once per run -----------------------------
def test_validation_synergy_reuses_the_teachers_features_and_matches_a_live_pass(trained_a_step):
    run, d = trained_a_step["run"], trained_a_step["d"]
    calls = []
    hooks = [t.register_forward_hook(lambda *_: calls.append(1)) for t in d.teachers]
    cache = d.val_teacher_cache
    try:
        cached = synergy_accuracy(d, run.val_loader)        # the A-step filled the cache
        assert calls == []
        d.val_teacher_cache = None
        live = synergy_accuracy(d, run.val_loader)
        assert len(calls) == len(d.teachers) * len(run.val_loader)
    finally:
        d.val_teacher_cache = cache
        for h in hooks:
            h.remove()
    assert cached == live


class _CountingTeacher(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return {"feat_2d": x.flatten(1) * 2.0}


def test_teacher_feature_cache_replays_rebuilds_on_other_samples_and_gives_up_past_its_limit():
    from asib_core.methods.teacher_cache import TeacherFeatureCache

    loader = [(torch.full((4, 3), float(i)), torch.arange(4) + i, None) for i in range(3)]
    teacher, cache = _CountingTeacher(), TeacherFeatureCache()
    first = [f[0] for _, _, f in cache.batches(loader, [teacher])]
    again = [f[0] for _, _, f in cache.batches(loader, [teacher])]
    assert teacher.calls == 3 and all(torch.equal(a, b) for a, b in zip(first, again))
    assert all(torch.equal(f, x.flatten(1) * 2.0) for f, (x, _, _) in zip(again, loader))
    loader[1] = (torch.full((4, 3), 7.0), torch.arange(4) + 7, None)       # other samples, same loader
    changed = [f[0] for _, _, f in cache.batches(loader, [teacher])]
    assert torch.equal(changed[1], torch.full((4, 3), 14.0)) and teacher.calls == 5   # batches 2 and 3 live
    small, teacher2 = TeacherFeatureCache(max_bytes=60), _CountingTeacher()
    for _ in range(2):
        list(small.batches(loader, [teacher2]))
    assert teacher2.calls == 6 and small.nbytes == 0


def test_a_scratch_student_frozen_by_ppf_from_the_first_stage_is_warned_about(caplog):
    from asib_core.methods import build_distiller
    from asib_core.models import create_model
    from asib_core.pipeline.models import build_student

    def build(cfg):
        caplog.clear()
        teachers = [create_model(n, num_classes=10, distill_out_dim=cfg["distill_out_dim"])
                    for n in ("resnet20", "wrn_16_2")]
        with caplog.at_level("WARNING", logger="asib_core.methods.asib.distiller"):
            build_distiller(cfg, build_student(cfg, 10), teachers)
        return [r.getMessage() for r in caplog.records if "trained from scratch" in r.getMessage()]

    side = asib_cfg("side_cccp_ppf")                   # level 1 in every stage, scratch student
    assert side["use_partial_freeze"] is True and side["student_freeze_level"] == 1
    assert len(build(side)) == 1
    assert build(asib_cfg("L0_baseline")) == []        # base's use_partial_freeze: false (issue 13)
    assert build(asib_cfg("L4_full")) == []           # its schedule starts at -1
