"""The ASIB distiller (``method=asib``; ``asib_stage`` is the same class with the keys of
``configs/experiment/method/asib_stage.yaml``). docs/asib.md describes the method as built.

Per stage (``stage_start``): apply the stage's PPF levels, run the A-step (a_step.py) when
``teacher_adapt_epochs > 0`` and set the synergy gate from the validation synergy accuracy
measured after it (with no A-step the gate is closed: an untrained synergy never teaches).
Then the engine runs the stage's B-step epochs through :meth:`forward_train`:

    L = ce_alpha * CE_ls(s, y)
      + kd_alpha * kd_ramp * c * mean_b w_b * k_b                       (logit KD)
      + feat_kd_alpha * mean_b cw_b * d(f_b, mu_b)                     (feature KD, gate open)
      + hybrid_beta * mean_b tau^2 KL(q_avg || p^tau)                  (spec 3.6.9, always)

``q_avg`` is the ``avg`` ensemble (``teacher_weights``); when ``ce_alpha + hybrid_beta > 1``
both ``ce_alpha`` and ``kd_alpha`` are multiplied by ``1 - hybrid_beta`` (spec 3.6.9).

The student and the teachers' KD targets see the same (Mixup/CutMix-mixed) batch. IB_MBM is
queried as it was trained and gated: eval-mode student features and teacher tokens of the clean
images; its per-sample outputs (synergy probabilities, certainty weights, mu) are mixed like the
labels, ``lam * v + (1 - lam) * v[perm]`` (``Batch.mix``). Opt-in ``ib_mbm_query_view: mixed`` queries
with the mixed images instead (their teacher tokens are at hand: no second teacher pass).
``k_b`` is the per-sample KD value toward the sample's target (targets.py):

* ensemble-taught samples: ``tau^2 KL(q_ens || p^tau)``;
* synergy-taught samples (``synergy``: all samples, ``auto``: those whose synergy label-CE
  is not worse than the ensemble's; only while the gate is open):
  ``tau_s^2 KL(q_syn || p^tau_s)`` with
  ``q_syn = (1 - a) softmax(synergy_logit_scale * head(mu) / tau_s) + a q_ens^tau_s``,
  ``tau_s = tau_syn`` (or tau), ``a`` the ensemble share (``kd_ens_alpha`` in the first
  ``teacher_adapt_kd_warmup`` B-step epochs of the stage, then 0; opt-in ``kd_ens_alpha_ramp``:
  rising to ``kd_ens_alpha_max`` over the stage), ``head(z)`` with a sampled ``z``
  instead of ``mu`` when ``use_mu_for_kd: false``; under ``synergy_scale_calibration:
  ensemble_entropy`` the stage's A-step replaces ``synergy_logit_scale`` with the scale at
  which this target's mean entropy on the training split equals the ensemble target's at tau
  (``synergy_scale``).

``w_b`` = IB certainty weight (``use_ib`` and the synergy teaching: ``clamp(m_b / mean m,
min_cw, max_cw)``, ``m_b = mean_j exp(-logvar_bj)``) times the overlap validity (teacher
mode). ``c`` is the engine's ``kd_max_ratio`` cap of the weighted KD term (runner.py).
Feature KD (spec 3.6.6 scale, targets.feature_kd_term): per sample the sum over dims of the
Huber(``feat_kd_huber_beta``) or squared distance between the student's ``feat_kd_key`` feature
and the detached IB ``mu``, with ``feat_kd_clip`` capping the per-dimension mean.
"""
from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from asib_core.config.errors import ConfigError
from asib_core.config.finalize import finalize_with_runtime
from asib_core.losses import certainty_weights

from asib_core.contract import Batch, Distiller, TrainContext
from ..targets import selected_teacher
from ..registry import register_method
from . import ppf
from .a_step import AStep, in_eval_mode, synergy_accuracy
from .config_warnings import config_warnings
from .ib_mbm import IBMBM, SynergyHead
from .settings import ASIBSettings
from ..teacher_cache import TeacherFeatureCache
from .targets import (GateState, auto_choice, ensemble_target, feature_kd_term, kd_vector, synergy_target,
                      teacher_mask)

log = logging.getLogger(__name__)


def _feature_width(model: nn.Module, key: str, role: str) -> int:
    if key == "distill_feat":
        adapter = getattr(model, "distill_adapter", None)
        if adapter is None:
            raise ConfigError(
                f"feat_kd_key=distill_feat but the {role} has no distillation adapter: set "
                "use_distillation_adapter=true (and model.student.use_adapter=true), or feat_kd_key=feat_2d.")
        return int(adapter.out_dim)
    return int(model.num_features)


@register_method("asib")
class ASIB(Distiller):
    needs_teachers = True

    def __init__(self, student: nn.Module, teachers: list[nn.Module], cfg: dict):
        super().__init__(student, teachers, cfg)
        if not teachers:
            raise ConfigError("the ASIB method needs at least one teacher (teacher1, teacher2).")
        s = self.settings = ASIBSettings.from_cfg(cfg)
        self._check_teacher_keys(cfg)
        self.stage_epochs = [int(e) for e in cfg.get("student_epochs_per_stage") or [1]]
        self.num_classes = int(student.num_classes)
        self.gate = GateState(threshold=s.gate_threshold_for(math.nan))
        if s.hybrid_beta > 0 and self.ce_alpha + s.hybrid_beta > 1.0:
            # spec 3.6.9: the hybrid ensemble term takes its share from CE and KD
            self.ce_alpha *= 1.0 - s.hybrid_beta
            self.kd_alpha *= 1.0 - s.hybrid_beta
        self._ppf_stage = -1
        self._frozen_bn: list[nn.Module] = []
        #: the teachers' validation features, kept while their backbones cannot change
        self.val_teacher_cache = None if s.use_teacher_finetuning else TeacherFeatureCache()
        self.ib_mbm: IBMBM | None = None
        self.synergy_head: SynergyHead | None = None
        if s.needs_ib_mbm:
            self._build_ib(cfg)
        subsets = self._overlap_subsets(cfg) if s.use_overlap_sampling else None
        self.register_buffer("overlap_subsets", subsets, persistent=False)
        self._warn_about_config()

    # -- construction ------------------------------------------------------------
    def _check_teacher_keys(self, cfg: dict) -> None:
        weights = cfg.get("teacher_weights")
        if weights is not None:
            if len(weights) != len(self.teachers) or any(float(w) < 0 for w in weights) \
                    or not sum(float(w) for w in weights) > 0:
                raise ConfigError(
                    f"teacher_weights={list(weights)} must hold one non-negative weight per teacher "
                    f"({len(self.teachers)}) with a positive sum, or be null (equal weights).")
        if self.settings.kd_target == "teacher":
            selected_teacher(cfg, len(self.teachers))

    def _build_ib(self, cfg: dict) -> None:
        s = self.settings
        q_dim = _feature_width(self.student, s.feat_kd_key, "student")
        widths = sorted({int(t.distill_dim) for t in self.teachers})
        if len(widths) != 1:
            raise ConfigError(
                f"the teachers' features have different widths {widths}: IB_MBM needs one token width. "
                "Set use_distillation_adapter=true (every teacher then emits distill_out_dim features).")
        kv_dim = widths[0]
        d = int(s.ib_mbm_out_dim or kv_dim)
        if cfg.get("ib_mbm_query_dim") != q_dim:
            log.info("ib_mbm_query_dim: %s in the config, %d measured from the student's %s (used)",
                     cfg.get("ib_mbm_query_dim"), q_dim, s.feat_kd_key)
            finalize_with_runtime(cfg, ib_mbm_query_dim=q_dim)
        if s.feat_kd_alpha > 0 and q_dim != d:
            raise ConfigError(
                f"feature KD compares the student's {s.feat_kd_key} ({q_dim} wide) with the IB mu "
                f"(ib_mbm_out_dim={d}): the widths must agree. Use feat_kd_key=distill_feat with "
                f"distill_out_dim={d}, or feat_kd_alpha=0.")
        self.ib_mbm = IBMBM(q_dim, kv_dim, d, s.ib_mbm_n_head, logvar_clip=s.ib_mbm_logvar_clip,
                            min_std=s.ib_mbm_min_std, feature_norm=s.ib_mbm_feature_norm, stochastic=s.use_ib)
        self.synergy_head = SynergyHead(d, self.num_classes, s.synergy_head_dropout)
        self.ib_mbm.eval()
        self.synergy_head.eval()

    def _overlap_subsets(self, cfg: dict) -> torch.Tensor:
        from asib_core.data.splits import overlap_class_split

        if len(self.teachers) != 2:
            raise ConfigError("use_overlap_sampling=true needs exactly two teachers (teacher1, teacher2).")
        subsets = overlap_class_split(self.num_classes, float(self.settings.overlap_pct), int(cfg.get("seed", 0)))
        mask = torch.zeros(2, self.num_classes, dtype=torch.bool)
        for i, classes in enumerate(subsets):
            mask[i, classes] = True
        return mask

    def _warn_about_config(self) -> None:
        for message in config_warnings(self.settings, self.cfg, self.ib_mbm is not None):
            log.warning("ASIB: %s", message)

    # -- modes -----------------------------------------------------------------
    def train(self, mode: bool = True):
        super().train(mode)
        if self.ib_mbm is not None:
            self.ib_mbm.eval()
            self.synergy_head.eval()
        for bn in self._frozen_bn:
            bn.eval()
        return self

    # -- features ----------------------------------------------------------------
    @staticmethod
    def _token(out: dict) -> torch.Tensor:
        return out["distill_feat"] if "distill_feat" in out else out["feat_2d"]

    def teacher_tokens(self, x: torch.Tensor, a_step: bool = False) -> list[torch.Tensor]:
        """Teacher tokens for IB_MBM. In the A-step the graph is kept only through the
        teacher parameters being trained (adapters only: the backbone runs without grad)."""
        s = self.settings
        tokens = []
        for teacher in self.teachers:
            trains = a_step and any(p.requires_grad for p in teacher.parameters())
            if trains and s.use_teacher_finetuning:
                tokens.append(self._token(teacher(x)))
            elif trains:
                with torch.no_grad():
                    feat = teacher(x)["feat_2d"]
                tokens.append(teacher.distill_adapter(feat))
            else:
                with torch.no_grad():
                    tokens.append(self._token(teacher(x)))
        return tokens

    def tokens_from_features(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """The teacher tokens of already computed backbone features ``feat_2d`` (the same
        values :meth:`teacher_tokens` gives in eval mode)."""
        return [f if getattr(t, "distill_adapter", None) is None else t.distill_adapter(f)
                for t, f in zip(self.teachers, feats)]

    def teacher_logits(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """The teachers' logits of already computed ``feat_2d`` (eval mode: the head dropout is off)."""
        return [t.classifier(t.head_drop(f)) for t, f in zip(self.teachers, feats)]

    @property
    def ensemble_mode(self) -> str:
        """The B-step's ensemble target: ``weighted_conf`` behind ``synergy``/``auto``, else ``kd_target``."""
        return "weighted_conf" if self.settings.uses_synergy_target else self.settings.kd_target

    def synergy_scale(self) -> float:
        """The factor of the synergy logits in the B-step's synergy target: ``synergy_logit_scale``,
        or under ``synergy_scale_calibration: ensemble_entropy`` the one the stage's A-step set
        (``gate.synergy_scale``; ``a_step.calibrated_synergy_scale``)."""
        calibrated = self.gate.synergy_scale
        if self.settings.scale_calibration != "none" and calibrated == calibrated:
            return calibrated
        return self.settings.synergy_logit_scale

    @torch.no_grad()
    def synergy_logits(self, x: torch.Tensor, teacher_feats: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Evaluation synergy prediction ``head(mu)`` (callers set eval mode); with
        ``teacher_feats`` (the teachers' ``feat_2d`` of ``x``) the teacher backbones do not run."""
        query = self.student(x)[self.settings.feat_kd_key]
        tokens = self.teacher_tokens(x) if teacher_feats is None else self.tokens_from_features(teacher_feats)
        ib = self.ib_mbm(query, tokens, sample=False)
        return self.synergy_head(ib.mu)

    # -- PPF -----------------------------------------------------------------------
    def apply_stage_ppf(self, stage: int) -> dict:
        s = self.settings
        self._ppf_stage = stage
        if not s.use_partial_freeze:
            self._frozen_bn = []
            return {}
        level = s.freeze_level("student", stage)
        self._frozen_bn = ppf.apply_student_level(self.student, level, s.freeze_bn["student"])
        trainable = sum(p.numel() for p in self.student.parameters() if p.requires_grad)
        metrics = {"ppf/student_level": float(level), "ppf/student_trainable_params": float(trainable)}
        for i, role in enumerate(("teacher1", "teacher2")[: len(self.teachers)], start=1):
            metrics[f"ppf/teacher{i}_level"] = float(s.freeze_level(role, stage))
        return metrics

    # -- stages --------------------------------------------------------------------
    def stage_start(self, stage: int, runner) -> None:
        s = self.settings
        metrics = self.apply_stage_ppf(stage)
        if metrics:
            runner.log_metrics(metrics)
        if s.adapt_epochs > 0:
            AStep(self, stage, runner).run()
        elif self.ib_mbm is not None:
            # no A-step: measure (and log) the untrained synergy, keep the gate closed
            self.gate.syn_acc = synergy_accuracy(self, runner.val_loader, runner.precision)
            self.gate.measured_stage = stage
            runner.log_metrics({**self.gate.metrics(), "stage": stage + 1})
            log.warning("ASIB stage %d: no A-step ran; the synergy is untrained (validation accuracy %.4f) "
                        "and the gate stays closed.", stage + 1, self.gate.syn_acc)
        else:
            runner.log_metrics({**self.gate.metrics(), "stage": stage + 1})

    # -- B-step ------------------------------------------------------------------
    @torch.no_grad()
    def _query_synergy(self, batch: Batch, touts: list[dict]):
        """IB_MBM's output for the B-step batch and the function that maps its per-sample values
        onto the (mixed) batch.

        ``ib_mbm_query_view: clean`` (default): queried as it was trained and gated, with the student's
        ``feat_kd_key`` feature in eval mode (no BN statistics update) and the teachers' tokens,
        both of the clean images (``batch.x_clean``; the batch itself when it was not mixed); the
        values are then mixed like the labels (``Batch.mix``). Under Mixup/CutMix this runs the
        teachers a second time. ``mixed`` (opt-in): the same eval-mode query of the mixed images,
        whose teacher tokens the KD targets already computed: no second teacher pass, but IB_MBM
        sees inputs it was neither trained nor gated on, and its values already match the batch."""
        clean = batch.x_clean if batch.x_clean is not None else batch.x
        x = batch.x if self.settings.ib_mbm_query_view == "mixed" else clean
        with in_eval_mode(self.student):
            query = self.student(x)[self.settings.feat_kd_key]
        if x is batch.x:
            tokens = [self._token(o) for o in touts]
        else:
            tokens = [self._token(t(x)) for t in self.teachers]
        ib = self.ib_mbm(query, tokens, sample=not self.settings.use_mu_for_kd)
        return ib, (batch.mix if x is clean else _unmixed)

    def forward_train(self, batch: Batch, ctx: TrainContext):
        s = self.settings
        out = self.student(batch.x)
        logits = out["logit"]
        ce_raw = batch.ce(logits, s.ce_label_smoothing)
        losses = {"ce": self.ce_alpha * ce_raw}
        kd_w = self.kd_alpha * ctx.kd_ramp
        gate_open = self.ib_mbm is not None and self.gate.open
        syn_teaches = gate_open and s.uses_synergy_target and kd_w > 0
        feat_on = gate_open and s.feat_kd_alpha > 0
        hybrid_on = s.hybrid_beta > 0
        stats = {"gate/open": float(gate_open), "kd/tau": ctx.tau, "kd/syn_ratio": 0.0,
                 "b_step/syn_share": 0.0, "b_step/syn_kd_weight_share": 0.0}
        if self.gate.syn_acc == self.gate.syn_acc:
            stats["gate/syn_acc"] = self.gate.syn_acc
        if kd_w <= 0 and not feat_on and not hybrid_on:
            self.record(**stats)
            return logits, losses

        need_all = (syn_teaches or feat_on or hybrid_on or s.kd_target != "teacher"
                    or s.use_overlap_sampling)
        with torch.no_grad():
            if need_all:
                touts = [t(batch.x) for t in self.teachers]
            else:
                k = int(self.cfg.get("kd_teacher_index", 0) or 0)
                touts = [None] * len(self.teachers)
                touts[k] = self.teachers[k](batch.x)
        mask = teacher_mask(self.overlap_subsets, batch, len(self.teachers))
        ib = cw = None
        if syn_teaches or feat_on:
            ib, mix = self._query_synergy(batch, touts)
            if s.use_ib:
                cw = mix(certainty_weights(ib.effective_logvar, s.min_cw, s.max_cw, normalize=True))
                stats["kd/cw_mean"] = float(cw.mean())

        if kd_w > 0:
            tau = ctx.tau
            ens_mode = self.ensemble_mode
            tlogits = [o["logit"] if o is not None else None for o in touts]
            if not need_all:  # teacher mode without extras: only teacher k ran
                tlogits = [t if t is not None else tlogits[k] for t in tlogits]
            q_ens, valid = ensemble_target(ens_mode, self.cfg, tlogits, tau, mask)
            k_vec = kd_vector(logits, q_ens, tau)
            weight = valid
            if syn_teaches:
                with torch.no_grad():
                    z_syn = self.synergy_head(ib.mu if s.use_mu_for_kd else ib.z).float()
                tau_s = s.tau_syn or tau
                a = s.ens_alpha(ctx.epoch_in_stage, self.stage_epochs[min(ctx.stage, len(self.stage_epochs) - 1)])
                q_ens_s = q_ens
                if a > 0 and tau_s != tau:
                    q_ens_s = ensemble_target(ens_mode, self.cfg, tlogits, tau_s, mask)[0]
                q_syn = synergy_target(z_syn, self.synergy_scale(), tau_s, q_ens_s, a, mix=mix)
                k_syn = kd_vector(logits, q_syn, tau_s)
                if s.kd_target == "auto":
                    q_ens_1 = ensemble_target(ens_mode, self.cfg, tlogits, 1.0, mask)[0]
                    choose = auto_choice(mix(F.softmax(z_syn, dim=-1)), q_ens_1, batch)
                else:
                    choose = torch.ones_like(k_vec, dtype=torch.bool)
                k_vec = torch.where(choose, k_syn, k_vec)
                if cw is not None:
                    weight = weight * cw
                share = float(choose.float().mean())
                weight_share = float((weight * choose).sum() / weight.sum().clamp_min(1e-12))
                stats.update({"kd/syn_ratio": share, "kd/tau_syn": tau_s, "kd/ens_alpha": a,
                              "kd/synergy_scale": self.synergy_scale(),
                              "b_step/syn_share": share, "b_step/syn_kd_weight_share": weight_share})
            kd_raw = (weight * k_vec).mean()
            losses["kd"] = kd_w * kd_raw          # the engine applies kd_max_ratio to this term
            stats["kd/raw"] = float(kd_raw.detach())
            if mask is not None:
                stats["kd/overlap_teachers_per_sample"] = float(mask.float().sum(1).mean())

        if hybrid_on:
            tlogits = [o["logit"] for o in touts]
            q_avg, valid = ensemble_target("avg", self.cfg, tlogits, ctx.tau, mask)
            hybrid_raw = (valid * kd_vector(logits, q_avg, ctx.tau)).mean()
            losses["hybrid"] = s.hybrid_beta * hybrid_raw
            stats["hybrid/raw"] = float(hybrid_raw.detach())

        if feat_on:
            losses["feat_kd"], feat_raw = feature_kd_term(out[s.feat_kd_key], mix(ib.mu), cw,
                                                          s.feat_kd_alpha, s.feat_kd_clip, s.feat_kd_huber_beta)
            stats["feat_kd/raw"] = float(feat_raw.detach())
        self.record(**stats)
        return logits, losses

    # -- checkpoints ---------------------------------------------------------------
    def checkpoint_state(self) -> dict:
        """Student, IB_MBM, synergy head, the teachers' adapters (or whole teachers with
        ``use_teacher_finetuning``: the A-step trains them) and the gate / PPF state."""
        state = super().checkpoint_state()
        for i, teacher in enumerate(self.teachers):
            if self.settings.use_teacher_finetuning:
                part = {f"teachers.{i}.{k}": v for k, v in teacher.state_dict().items()}
            elif getattr(teacher, "distill_adapter", None) is not None:
                part = {f"teachers.{i}.distill_adapter.{k}": v
                        for k, v in teacher.distill_adapter.state_dict().items()}
            else:
                part = {}
            state.update(part)
        state["_asib"] = {"gate": self.gate.as_dict(), "ppf_stage": int(self._ppf_stage)}
        return state

    def load_checkpoint_state(self, state: dict) -> None:
        state = dict(state)
        extra = state.pop("_asib", None) or {}
        super().load_checkpoint_state(state)
        self.gate.load(extra.get("gate", {}))
        stage = int(extra.get("ppf_stage", -1))
        if stage >= 0:
            self.apply_stage_ppf(stage)


def _unmixed(values: torch.Tensor) -> torch.Tensor:
    """Per-sample values of the mixed batch itself (``ib_mbm_query_view: mixed``): nothing to mix."""
    return values


@register_method("asib_stage")
class ASIBStage(ASIB):
    """``method=asib_stage``: the same method; its method file sets stage-oriented defaults."""
