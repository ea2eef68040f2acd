"""The ASIB A-step: per stage, train IB_MBM, the synergy head and (optionally) teacher
parameters on the training split while the student is frozen (eval mode, no gradient).

Epoch ``e`` (0-based within the stage's ``teacher_adapt_epochs`` epochs), per batch of clean
(unmixed, augmented) training images::

    q, s      = student(x)[feat_kd_key], student logits          (no grad, eval mode)
    t_i       = teacher_i(x)[distill_feat | feat_2d]             (grad only into trained params)
    z, mu, lv = IB_MBM(q, [t_1, t_2])                            (z sampled: training mode)
    syn       = head(z)

    window    W = min(synergy_only_epochs, teacher_adapt_epochs - 1)
    e <  W:  L = mean_b CE_ls(syn_b, y_b)                          (synergy-only window)
    e >= W:  L = synergy_ce_alpha * mean_b cw_b CE_ls(syn_b, y_b)
               + w_kd * mean_b cw_b tau^2 KL(softmax(s_b/tau) || softmax(syn_b/tau))   [gate, below]
               + beta(stage, e) * mean_b KL(N(mu_b, std_b^2) || N(0, I))   [use_ib, KL epochs]
               + cccp_alpha * ramp * tau^2 * mean_b KL(softmax(s_b/tau) || softmax(syn_b/tau))
                                                                   [use_cccp and use_cccp_in_a]
    always:    + ib_mbm_reg_lambda * mean over IB_MBM/head tensors of mean(p^2)

with ``w_kd = teacher_adapt_alpha_kd`` (null: ``kd_alpha``), on (spec 3.4 step 4) when
``enable_kd_after_syn_acc`` is 0 or the latest validation synergy accuracy (the previous
A-step epoch's, else the previous stage's gate value, else 0) reaches it; ``CE_ls`` the
cross-entropy with ``label_smoothing``, ``cw_b = clamp(mean_j
exp(-logvar_bj), min_cw, 1)`` (detached; 1 without ``use_ib``), the KL epochs
``W <= e < W + ib_epochs_per_stage`` and ``beta``, ``ramp`` as in ``settings.py``. After
every epoch the synergy accuracy on the validation split is measured (``a_step/syn_acc``);
the value after the last epoch sets the gate (and, with ``synergy_scale_calibration:
ensemble_entropy``, the synergy target's logit scale: ``calibrated_synergy_scale``). There is
no rollback and no best-snapshot restore (a best-accuracy snapshot would systematically discard
the CCCP epochs).

The teachers' ``feat_2d`` of the training samples is computed once per stage when it cannot
change between epochs (frozen teacher backbones, a training loader without augmentation:
``teacher_cache.train_cache_for``), and so are the frozen student's query and logits (without
augmentation); otherwise they run on every batch. ``a_step_augment: false`` gives the A-step the
training split without augmentation (``runner.plain_train_loader``), so an A-step epoch after the
first costs little more than IB_MBM and its head.

Data parallelism (torchrun): these modules are trained outside the DDP module, so the A-step
synchronises them itself: rank 0's parameters and buffers are broadcast at its start, every
gradient is averaged over the ranks after each backward (as DDP does), and the buffers (BN
statistics of fine-tuned teachers) are broadcast from rank 0 after every epoch; every rank then
measures the same validation accuracy and sets the same gate.

Optimiser: a fresh AdamW per A-step with constant learning rates: IB_MBM ``a_step_lr *
ib_mbm_lr_factor``, synergy head ``a_step_lr`` (both weight decay ``a_step_weight_decay``),
teacher parameters ``teacher_lr`` (``teacher_weight_decay``).
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math

import torch
import torch.nn.functional as F

from asib_core.engine.amp import autocast_for
from asib_core.engine.loop import NonFiniteLoss
from asib_core.losses import cccp_loss, gaussian_kl

from . import ppf
from .targets import ensemble_target, entropy_matching_scale, mean_entropy
from ..teacher_cache import student_cache_for, teacher_features, train_cache_for

log = logging.getLogger(__name__)
ROLES = ("teacher1", "teacher2")
#: prefix of the per-A-step-epoch validation accuracies (validation_accuracies)
VAL_PREFIX = "a_step_val/"


def per_sample_ce(logits: torch.Tensor, batch, label_smoothing: float) -> torch.Tensor:
    ce = F.cross_entropy(logits.float(), batch.y, reduction="none", label_smoothing=label_smoothing)
    if batch.y_b is not None and batch.lam < 1.0:
        ce_b = F.cross_entropy(logits.float(), batch.y_b, reduction="none", label_smoothing=label_smoothing)
        ce = batch.lam * ce + (1.0 - batch.lam) * ce_b
    return ce


def a_step_certainty(effective_logvar: torch.Tensor, min_cw: float) -> torch.Tensor:
    """A-step certainty weights: ``clamp(mean_j exp(-logvar_bj), min_cw, 1)`` (detached)."""
    m = torch.exp(-effective_logvar.detach().float()).mean(dim=1)
    return m.clamp(min(min_cw, 1.0), 1.0)


def param_l2(modules) -> torch.Tensor:
    tensors = [p for m in modules for p in m.parameters()]
    return torch.stack([p.float().pow(2).mean() for p in tensors]).mean()


def a_step_losses(distiller, batch, stage: int, epoch: int, syn_acc: float = math.nan,
                  ensemble_acc: float = math.nan, feature_cache=None, student_cache=None):
    """One A-step batch: ``(synergy logits, {name: weighted loss})``; records diagnostics.
    ``syn_acc`` / ``ensemble_acc``: the latest validation synergy / teacher-ensemble accuracy
    (they gate the KD toward the student); ``feature_cache`` / ``student_cache``: a
    ``TrainFeatureCache`` of the teachers' features / of the frozen student's query and logits
    (only where it is valid: ``train_cache_for``, ``student_cache_for``)."""
    s = distiller.settings

    def student_outputs(x):
        out = distiller.student(x)
        return [out[s.feat_kd_key].detach(), out["logit"].detach()]

    with torch.no_grad():
        query, student_logits = (student_outputs(batch.x) if student_cache is None
                                 else student_cache.features(student_outputs, batch.x, batch.idx))
    if feature_cache is not None:
        tokens = distiller.tokens_from_features(feature_cache.features(
            lambda x: teacher_features(distiller.teachers, x), batch.x, batch.idx))
    else:
        tokens = distiller.teacher_tokens(batch.x, a_step=True)
    ib = distiller.ib_mbm(query, tokens)
    syn = distiller.synergy_head(ib.z)
    in_window = epoch < s.window
    ce_vec = per_sample_ce(syn, batch, s.label_smoothing)
    stats = {"a_step/window": float(in_window),
             "a_step/logvar_mean": float(ib.logvar.detach().float().mean()),
             "a_step/std_mean": float(ib.std.detach().float().mean())}
    if in_window or not s.use_ib:
        cw = torch.ones_like(ce_vec)
    else:
        cw = a_step_certainty(ib.effective_logvar, s.min_cw)
    stats["a_step/cw_mean"] = float(cw.mean())
    w_ce = 1.0 if in_window else s.synergy_ce_alpha
    losses = {"syn_ce": w_ce * (cw * ce_vec).mean()}
    kd_open = s.a_kd_open(epoch, syn_acc, ensemble_acc)
    stats["a_step/kd_open"] = float(kd_open)
    if kd_open:
        kd_raw = (cw * cccp_loss(syn, student_logits, s.tau_a, reduction="none")).mean()
        stats["a_step/kd_raw"] = float(kd_raw.detach())
        losses["kd"] = s.a_kd_alpha * kd_raw
    if s.use_ib:
        kl_raw = gaussian_kl(ib.mu, ib.effective_logvar, reduction="batchmean")
        beta = s.beta(stage, epoch)
        stats["a_step/ib_kl_raw"] = float(kl_raw.detach())
        stats["a_step/beta"] = beta
        losses["ib_kl"] = beta * kl_raw
    if s.cccp_on:
        ramp = s.cccp_ramp(stage, epoch)
        cccp_raw = cccp_loss(syn, student_logits, s.tau_a)
        stats["a_step/cccp_raw"] = float(cccp_raw.detach())
        stats["a_step/cccp_ramp"] = ramp
        losses["cccp"] = s.cccp_alpha * ramp * cccp_raw
    if s.ib_mbm_reg_lambda > 0:
        losses["ib_reg"] = s.ib_mbm_reg_lambda * param_l2([distiller.ib_mbm, distiller.synergy_head])
    distiller.record(**stats)
    return syn, losses


@torch.no_grad()
def validation_accuracies(distiller, loader, precision=None) -> dict[str, float]:
    """Top-1 accuracies on ``loader`` with every module in eval mode (the previous train/eval
    modes are restored afterwards): ``synergy`` (``head(mu)``), ``teacher1``, ``teacher2``, ...,
    ``ensemble`` (the argmax of the B-step's ensemble target at temperature 1,
    ``distiller.ensemble_mode``, without overlap masks) and ``oracle`` (a sample counts as right
    when any teacher is right). NaN each for an empty loader. The teachers run once per batch
    (their ``feat_2d`` gives tokens and logits), or not at all when the distiller's
    ``val_teacher_cache`` holds their features (teacher_cache.py)."""
    teachers = distiller.teachers
    names = ["synergy", *(f"teacher{i}" for i in range(1, len(teachers) + 1)), "ensemble", "oracle"]
    correct = dict.fromkeys(names, 0)
    seen = 0
    cache = getattr(distiller, "val_teacher_cache", None)
    batches = (cache.batches(loader, teachers, precision) if cache is not None
               else ((x, y, teacher_features(teachers, x, precision)) for x, y, *_ in loader))
    with all_in_eval_mode(distiller):
        for x, y, feats in batches:
            with autocast_for(precision):
                logits = distiller.synergy_logits(x, feats)
                tlogits = [t.float() for t in distiller.teacher_logits(feats)]
            ens = ensemble_target(distiller.ensemble_mode, distiller.cfg, tlogits, 1.0)[0]
            right = [lg.argmax(1) == y for lg in tlogits]
            hits = [logits.float().argmax(1) == y, *right, ens.argmax(1) == y, torch.stack(right).any(0)]
            for name, hit in zip(names, hits):
                correct[name] += int(hit.sum())
            seen += int(y.shape[0])
    return {name: (correct[name] / seen if seen else math.nan) for name in names}


@contextlib.contextmanager
def in_eval_mode(*modules):
    """``modules`` in eval mode inside the block; every submodule's previous mode restored after
    it (a module whose parts were in mixed modes, e.g. PPF's frozen BatchNorms, gets them back)."""
    modes = [[m.training for m in mod.modules()] for mod in modules]
    for mod in modules:
        mod.eval()
    try:
        yield
    finally:
        for mod, flags in zip(modules, modes):
            for m, flag in zip(mod.modules(), flags):
                m.training = flag


def all_in_eval_mode(distiller):
    """Student, teachers, IB_MBM and synergy head in eval mode inside the block (:func:`in_eval_mode`)."""
    return in_eval_mode(distiller.student, *distiller.teachers, distiller.ib_mbm, distiller.synergy_head)


@torch.no_grad()
def calibrated_synergy_scale(distiller, loader, tau: float, precision=None) -> float:
    """``synergy_scale_calibration: ensemble_entropy``: the synergy logit scale ``a`` at which the
    B-step's synergy target ``softmax(a * head(mu) / tau_s)`` (``tau_s = tau_syn``, null: ``tau``)
    has, over ``loader`` (the A-step passes every image of the training split, unsharded, in
    order, without augmentation; every module in eval mode, as the B-step queries the synergy),
    the mean entropy of the B-step's ensemble target at ``tau``. No labels are read."""
    synergy, ensemble = [], []
    with all_in_eval_mode(distiller):
        for x, *_ in loader:
            feats = teacher_features(distiller.teachers, x, precision)
            with autocast_for(precision):
                synergy.append(distiller.synergy_logits(x, feats).float())
                tlogits = [t.float() for t in distiller.teacher_logits(feats)]
            ensemble.append(ensemble_target(distiller.ensemble_mode, distiller.cfg, tlogits, tau)[0])
    tau_s = distiller.settings.tau_syn or tau
    return entropy_matching_scale(torch.cat(synergy), tau_s, mean_entropy(torch.cat(ensemble)))


def synergy_accuracy(distiller, loader, precision=None) -> float:
    """Top-1 validation accuracy of ``head(mu)`` (:func:`validation_accuracies`)."""
    return validation_accuracies(distiller, loader, precision)["synergy"]


class AStep:
    """Runs the A-step of one stage through ``runner.run_aux_epochs``."""

    def __init__(self, distiller, stage: int, runner):
        self.d = distiller
        self.stage = stage
        self.runner = runner
        self.s = distiller.settings
        self.teacher_params = []
        self.frozen_teacher_bns = []
        for i, teacher in enumerate(distiller.teachers):
            role = ROLES[i] if i < len(ROLES) else ROLES[-1]
            level = self.s.freeze_level(role, stage)
            named = ppf.teacher_a_step_params(teacher, level, finetune=self.s.use_teacher_finetuning,
                                              adapter_only=self.s.train_distill_adapter_only)
            self.teacher_params.append(named)
            if self.s.use_teacher_finetuning and self.s.use_partial_freeze and self.s.freeze_bn.get(role, True):
                self.frozen_teacher_bns.extend(ppf.frozen_batchnorms(teacher, level))
        self.last_acc = math.nan
        self.last_ensemble_acc = math.nan

    # -- modes / grads ---------------------------------------------------------
    def set_modes(self) -> None:
        d = self.d
        d.student.eval()
        for teacher in d.teachers:
            teacher.train(self.s.use_teacher_finetuning)
        for bn in self.frozen_teacher_bns:
            bn.eval()
        d.ib_mbm.train()
        d.synergy_head.train()

    def set_grads(self, on: bool) -> None:
        for teacher, named in zip(self.d.teachers, self.teacher_params):
            teacher.requires_grad_(False)
            if on:
                for _, p in named:
                    p.requires_grad_(True)

    def optimizer(self) -> torch.optim.Optimizer:
        s, d = self.s, self.d
        groups = [
            {"params": list(d.ib_mbm.parameters()), "lr": s.a_step_lr * s.ib_mbm_lr_factor,
             "weight_decay": s.a_step_weight_decay, "name": "ib_mbm"},
            {"params": list(d.synergy_head.parameters()), "lr": s.a_step_lr,
             "weight_decay": s.a_step_weight_decay, "name": "synergy_head"},
        ]
        teacher = [p for named in self.teacher_params for _, p in named]
        if teacher:
            groups.append({"params": teacher, "lr": s.teacher_lr, "weight_decay": s.teacher_weight_decay,
                           "name": "teachers"})
        return torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8)

    def trainable_counts(self) -> dict:
        out = {"a_step/ib_mbm_params": float(sum(p.numel() for p in self.d.ib_mbm.parameters())),
               "a_step/synergy_head_params": float(sum(p.numel() for p in self.d.synergy_head.parameters()))}
        for i, named in enumerate(self.teacher_params, start=1):
            out[f"a_step/teacher{i}_trainable_params"] = float(sum(p.numel() for _, p in named))
        return out

    # -- the run ------------------------------------------------------------------
    def _trained(self) -> dict:
        modules = {"ib_mbm": self.d.ib_mbm, "synergy_head": self.d.synergy_head}
        for i, teacher in enumerate(self.d.teachers):
            if self.teacher_params[i]:
                modules[f"teacher{i}"] = teacher
        return modules

    def trained_modules(self) -> list:
        """IB_MBM, the synergy head and every teacher with parameters trained here."""
        return list(self._trained().values())

    def _snapshot(self) -> dict:
        return {k: copy.deepcopy(m.state_dict()) for k, m in self._trained().items()}

    def _restore(self, snap: dict) -> None:
        for key, state in snap.items():
            module = (self.d.teachers[int(key[len("teacher"):])] if key.startswith("teacher")
                      else getattr(self.d, key))
            module.load_state_dict(state)

    def run(self) -> float:
        snap = self._snapshot()
        try:
            return self._run_once()
        except NonFiniteLoss as first:
            runner = self.runner
            if runner.state.safe_retries >= 1:
                raise RuntimeError(f"SAFE-RETRY failed: the A-step loss became non-finite again ({first}). "
                                   "The run stops.") from first
            log.warning("[SAFE-RETRY] A-step of stage %d: %s -- restoring its start state, AMP off",
                        self.stage + 1, first)
            self._restore(snap)
            runner.state.safe_retries += 1
            runner.precision.disable()
            runner.cfg["use_amp"] = False
            runner.lock.verify(runner.cfg, "before_safe_retry")
            if runner.tracker is not None and runner.dist.is_main:
                runner.tracker.set_tags({"asib.safe_retry": f"a_step stage {self.stage + 1}: {first}"[:500]})
            runner.log_metrics({"safe_retry": float(runner.state.safe_retries)})
            self.d.pop_epoch_metrics()
            return self._run_once()
        finally:
            self.set_grads(False)
            for teacher in self.d.teachers:
                teacher.eval()
            self.d.ib_mbm.eval()
            self.d.synergy_head.eval()

    def _run_once(self) -> float:
        s, d, runner = self.s, self.d, self.runner
        self.set_grads(True)
        self.set_modes()
        opt = self.optimizer()
        params = [p for g in opt.param_groups for p in g["params"]]
        counts = self.trainable_counts()
        epochs = s.adapt_epochs
        loader = runner.train_loader if s.a_step_augment else runner.plain_train_loader()
        cache, student_cache = train_cache_for(s, loader), student_cache_for(loader)

        def step_fn(batch, e):
            measured = self.last_acc == self.last_acc
            return a_step_losses(d, batch, self.stage, e, self.last_acc if measured else d.gate.syn_acc,
                                 self.last_ensemble_acc if measured else d.gate.ensemble_acc, cache, student_cache)

        def extra(e):
            runner.dist.broadcast_states(self.trained_modules(), buffers_only=True)
            accs = validation_accuracies(d, runner.val_loader, runner.precision)
            self.set_modes()
            acc = self.last_acc = accs["synergy"]
            self.last_ensemble_acc = accs["ensemble"]
            metrics = {f"{VAL_PREFIX}{name}_acc": value for name, value in accs.items()}
            metrics.update({"a_step/syn_acc": acc, "a_step/lr_ib_mbm": opt.param_groups[0]["lr"],
                       "a_step/lr_synergy_head": opt.param_groups[1]["lr"],
                       "a_step/cccp_on": float(s.cccp_ramp(self.stage, e) > 0),
                            "a_step/ib_kl_on": float(s.use_ib and s.kl_active(e)), "stage": self.stage + 1})
            if e == 0:
                metrics.update(counts)
            if e == epochs - 1:
                d.gate.syn_acc, d.gate.trained, d.gate.measured_stage = acc, True, self.stage
                d.gate.ensemble_acc = accs["ensemble"]
                d.gate.threshold = s.gate_threshold_for(accs["ensemble"])
                if s.scale_calibration == "ensemble_entropy":
                    every_image = runner.data.loader("train", train=False, augment=False,
                                                     channels_last=runner.channels_last)
                    scale = calibrated_synergy_scale(d, every_image, runner.context().tau, runner.precision)
                    d.gate.synergy_scale = runner.dist.broadcast_object(scale)   # rank 0's on every rank
                metrics.update(d.gate.metrics())
            return metrics

        runner.dist.broadcast_states(self.trained_modules())
        runner.run_aux_epochs("a_step", step_fn, params, opt, epochs, mix=False, loader=loader,
                              clamp=not s.disable_loss_clamp_in_a, extra_metrics=extra,
                              after_backward=lambda: runner.dist.average_gradients(params))
        log.info("A-step of stage %d: validation synergy accuracy %.4f, teacher ensemble %.4f "
                 "(gate threshold %.4f -> %s); synergy target logit scale %.3g%s", self.stage + 1, self.last_acc,
                 self.last_ensemble_acc, d.gate.threshold, "open" if d.gate.open else "closed", d.synergy_scale(),
                 " (calibrated)" if s.scale_calibration != "none" else "")
        return self.last_acc
