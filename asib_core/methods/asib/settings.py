"""Every ASIB config key, read once, validated, with its default (docs/asib.md lists them).

``ASIBSettings.from_cfg(cfg)`` is the only place the ASIB method reads its keys; a value
that cannot do what its name says is refused here with a :class:`ConfigError` naming the
key (decisions.md, "The one rule for config keys").
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from asib_core.config.errors import ConfigError

KD_TARGETS = ("teacher", "avg", "weighted_conf", "synergy", "auto")
SYNERGY_TARGETS = ("synergy", "auto")
GATE_MODES = ("absolute", "ensemble")
SCALE_CALIBRATIONS = ("none", "ensemble_entropy")
IB_MBM_QUERY_VIEWS = ("clean", "mixed")   # ib_mbm_query_view: the B-step's view of the batch for IB_MBM
FEATURE_KEYS = ("distill_feat", "feat_2d")
ROLES = ("student", "teacher1", "teacher2")


def _float(cfg: dict, key: str, default: float | None) -> float | None:
    value = cfg.get(key, default)
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{key}={value!r} must be a number.") from exc


def _int(cfg: dict, key: str, default: int) -> int:
    value = cfg.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or int(value) != float(value):
        raise ConfigError(f"{key}={value!r} must be an integer.")
    return int(value)


def _bool(cfg: dict, key: str, default: bool) -> bool:
    value = cfg.get(key, default)
    return default if value is None else bool(value)


def synergy_window(synergy_only_epochs: int, adapt_epochs: int) -> int:
    """Length of the synergy-only window actually used: ``min(S, E - 1)`` (0 when E <= 1).

    The last A-step epoch is always after the window, so the terms that start after it
    (IB KL, CCCP) do switch on even when ``synergy_only_epochs >= teacher_adapt_epochs``
    (L2 and side_cccp_ppf set 6 and 6; the reference never switched CCCP on there).
    """
    if adapt_epochs <= 0:
        return 0
    return max(0, min(int(synergy_only_epochs), adapt_epochs - 1))


@dataclass(frozen=True)
class ASIBSettings:
    # -- A-step ---------------------------------------------------------------
    adapt_epochs: int
    a_step_augment: bool
    synergy_only_epochs: int
    window: int
    synergy_ce_alpha: float
    label_smoothing: float
    a_step_lr: float
    a_step_weight_decay: float
    ib_mbm_lr_factor: float
    teacher_lr: float
    teacher_weight_decay: float
    use_teacher_finetuning: bool
    train_distill_adapter_only: bool
    disable_loss_clamp_in_a: bool
    # -- IB_MBM / synergy head ------------------------------------------------
    use_ib: bool
    ib_beta: float
    ib_beta_warmup_epochs: int
    ib_epochs_per_stage: int
    ib_mbm_out_dim: int | None
    ib_mbm_n_head: int
    ib_mbm_feature_norm: str
    ib_mbm_logvar_clip: float
    ib_mbm_min_std: float
    ib_mbm_reg_lambda: float
    synergy_head_dropout: float
    # -- CCCP -----------------------------------------------------------------
    cccp_on: bool
    cccp_alpha: float
    cccp_ramp_epochs: int     # cccp_ramp_epochs
    a_kd_alpha: float         # teacher_adapt_alpha_kd (null: kd_alpha): A-step KD toward the student
    tau_a: float              # fixed `tau` of the A-step (CCCP)
    # -- B-step ---------------------------------------------------------------
    ce_label_smoothing: float
    kd_target: str
    gate_threshold: float     # enable_kd_after_syn_acc (a fraction)
    gate_mode: str            # synergy_gate_mode: absolute | ensemble
    kd_ens_alpha: float
    kd_ens_alpha_max: float | None
    kd_ens_epochs: int        # teacher_adapt_kd_warmup: B-step epochs per stage with the ensemble mixed in
    kd_ens_alpha_ramp: bool
    hybrid_beta: float
    tau_syn: float | None
    synergy_logit_scale: float
    scale_calibration: str    # synergy_scale_calibration: none | ensemble_entropy
    use_mu_for_kd: bool
    ib_mbm_query_view: str    # ib_mbm_query_view: clean (spec, default) | mixed (no second teacher pass)
    feat_kd_alpha: float
    feat_kd_key: str
    feat_kd_clip: float | None
    feat_kd_huber_beta: float | None
    min_cw: float
    max_cw: float
    # -- overlap --------------------------------------------------------------
    use_overlap_sampling: bool
    overlap_pct: float | None
    # -- PPF ------------------------------------------------------------------
    use_partial_freeze: bool
    freeze_levels: dict = field(default_factory=dict)   # role -> [level per stage]
    freeze_bn: dict = field(default_factory=dict)       # role -> bool

    @property
    def uses_synergy_target(self) -> bool:
        return self.kd_target in SYNERGY_TARGETS

    @property
    def synergy_consumed(self) -> bool:
        """Whether the B-step can use the synergy at all (target or feature KD)."""
        return self.uses_synergy_target or self.feat_kd_alpha > 0

    @property
    def needs_ib_mbm(self) -> bool:
        return self.adapt_epochs > 0 or self.synergy_consumed

    @property
    def kl_epochs_per_stage(self) -> int:
        """A-step epochs per stage with the IB KL term on (right after the window)."""
        if not self.use_ib or self.adapt_epochs <= 0:
            return 0
        return max(0, min(self.ib_epochs_per_stage, self.adapt_epochs - self.window))

    def kl_active(self, epoch: int) -> bool:
        return self.window <= epoch < self.window + self.kl_epochs_per_stage

    def beta(self, stage: int, epoch: int) -> float:
        """beta of A-step epoch ``epoch`` of stage ``stage`` (0-based).

        Linear warm-up over the KL-active A-step epochs counted over the whole run:
        ``n = stage * kl_epochs_per_stage + (epoch - window)`` and
        ``beta = ib_beta * min(1, (n + 1) / ib_beta_warmup_epochs)`` (``ib_beta`` if 0).
        """
        if not self.kl_active(epoch):
            return 0.0
        if self.ib_beta_warmup_epochs <= 0:
            return self.ib_beta
        n = stage * self.kl_epochs_per_stage + (epoch - self.window)
        return self.ib_beta * min(1.0, (n + 1) / self.ib_beta_warmup_epochs)

    def cccp_ramp(self, stage: int, epoch: int) -> float:
        """CCCP weight factor in A-step epoch ``epoch`` of stage ``stage``: 0 inside the window,
        then a linear warm-up over the post-window A-step epochs counted over the whole run,
        ``min(1, (n + 1) / cccp_ramp_epochs)`` with ``n = stage * (E - W) + epoch - W``
        (1 when ``cccp_ramp_epochs`` is 0)."""
        if not self.cccp_on or epoch < self.window:
            return 0.0
        if self.cccp_ramp_epochs <= 0:
            return 1.0
        n = stage * (self.adapt_epochs - self.window) + (epoch - self.window)
        return min(1.0, (n + 1) / self.cccp_ramp_epochs)

    def ens_alpha(self, epoch_in_stage: int, stage_epochs: int) -> float:
        """Ensemble share of the synergy target in B-step epoch ``epoch_in_stage`` (0-based)
        of a stage with ``stage_epochs`` epochs.

        Spec 3.6.3: ``kd_ens_alpha`` in the first ``teacher_adapt_kd_warmup`` epochs of each
        stage, 0 (pure synergy) after them. Opt-in ``kd_ens_alpha_ramp: true`` instead: linear
        from ``kd_ens_alpha`` (first epoch) to ``kd_ens_alpha_max`` (last epoch) of every stage.
        """
        start = self.kd_ens_alpha
        if not self.kd_ens_alpha_ramp:
            return start if epoch_in_stage < self.kd_ens_epochs else 0.0
        end = start if self.kd_ens_alpha_max is None else self.kd_ens_alpha_max
        if stage_epochs <= 1:
            return start
        return start + (end - start) * min(epoch_in_stage, stage_epochs - 1) / (stage_epochs - 1)

    def gate_threshold_for(self, ensemble_acc: float) -> float:
        """The synergy gate's threshold: ``enable_kd_after_syn_acc`` (``synergy_gate_mode:
        absolute``), or the teacher ensemble's validation accuracy measured in the same pass
        (``ensemble``; NaN before any measurement, which keeps the gate closed)."""
        return float(ensemble_acc) if self.gate_mode == "ensemble" else self.gate_threshold

    def a_kd_open(self, epoch: int, syn_acc: float, ensemble_acc: float = math.nan) -> bool:
        """Spec 3.4 step 4: the A-step KD toward the student is on after the window, with a
        positive weight, when the threshold (:meth:`gate_threshold_for` of the latest ensemble
        accuracy ``ensemble_acc``) is 0 or the latest validation synergy accuracy ``syn_acc``
        (NaN: none measured yet, read as 0) reaches it."""
        acc = 0.0 if syn_acc != syn_acc else syn_acc
        threshold = self.gate_threshold_for(ensemble_acc)
        return (epoch >= self.window and self.a_kd_alpha > 0
                and (threshold <= 0 or acc >= threshold))

    def freeze_level(self, role: str, stage: int) -> int:
        if not self.use_partial_freeze:
            return -1
        levels = self.freeze_levels.get(role) or [-1]
        return int(levels[min(stage, len(levels) - 1)])

    # ---------------------------------------------------------------------------
    @classmethod
    def from_cfg(cls, cfg: dict) -> "ASIBSettings":
        num_stages = int(cfg.get("num_stages") or len(cfg.get("student_epochs_per_stage") or [1]) or 1)
        adapt = _int(cfg, "teacher_adapt_epochs", 0)
        if adapt < 0:
            raise ConfigError(f"teacher_adapt_epochs must be >= 0, got {adapt}.")
        sync_only = _int(cfg, "synergy_only_epochs", 2)
        if sync_only < 0:
            raise ConfigError(f"synergy_only_epochs must be >= 0, got {sync_only}.")

        kd_target = str(cfg.get("kd_target") or "avg")
        if kd_target not in KD_TARGETS:
            raise ConfigError(f"kd_target='{kd_target}' is not known to the ASIB method; use one of "
                              f"{', '.join(KD_TARGETS)}.")

        use_cccp = _bool(cfg, "use_cccp", False)
        in_a = cfg.get("use_cccp_in_a")
        in_a = use_cccp if in_a is None else bool(in_a)
        if use_cccp != in_a:
            raise ConfigError(
                f"use_cccp={use_cccp} but use_cccp_in_a={in_a}: CCCP is an A-step term only, so the two "
                "switches must agree (set both true for CCCP, both false without it; "
                "use_cccp_in_a: null follows use_cccp).")
        if use_cccp and adapt <= 0:
            raise ConfigError("use_cccp=true needs an A-step (teacher_adapt_epochs > 0): the CCCP term "
                              "lives in the A-step. Set teacher_adapt_epochs or use_cccp=false.")

        finetune = _bool(cfg, "use_teacher_finetuning", False)
        adapter_only = _bool(cfg, "train_distill_adapter_only", False)
        if finetune and adapter_only:
            raise ConfigError("use_teacher_finetuning=true and train_distill_adapter_only=true contradict "
                              "each other (train the whole teachers or only their adapters); set one false.")
        if (finetune or adapter_only) and adapt <= 0:
            key = "use_teacher_finetuning" if finetune else "train_distill_adapter_only"
            raise ConfigError(f"{key}=true trains teacher parameters in the A-step, but "
                              "teacher_adapt_epochs=0 (no A-step). Set teacher_adapt_epochs > 0 or "
                              f"{key}=false.")
        if adapter_only and not cfg.get("use_distillation_adapter"):
            raise ConfigError("train_distill_adapter_only=true needs use_distillation_adapter=true "
                              "(the teachers have no adapter to train).")
        if cfg.get("use_vib_synergy_head"):
            raise ConfigError(
                "use_vib_synergy_head=true is refused: it has no separate behaviour in asib-kd. With "
                "use_ib=true the synergy head is already trained on the sampled latent "
                "z = mu + sigma * eps in the A-step (and reads mu, or z with use_mu_for_kd=false, in "
                "the B-step). Set use_vib_synergy_head=false.")

        threshold = _float(cfg, "enable_kd_after_syn_acc", 0.8)
        if threshold is None:
            threshold = 0.8
        if threshold > 1.0:
            if threshold > 100.0:
                raise ConfigError(f"enable_kd_after_syn_acc={threshold} must be a fraction in [0, 1] "
                                  "(or a percentage <= 100).")
            threshold = threshold / 100.0
        gate_mode = str(cfg.get("synergy_gate_mode") or "absolute")
        if gate_mode not in GATE_MODES:
            raise ConfigError(f"synergy_gate_mode='{gate_mode}' is not known; use one of {', '.join(GATE_MODES)}.")

        ens = _float(cfg, "kd_ens_alpha", 0.0) or 0.0
        ens_max = _float(cfg, "kd_ens_alpha_max", None)
        if not 0.0 <= ens <= 1.0:
            raise ConfigError(f"kd_ens_alpha={ens} must be in [0, 1].")
        if ens_max is not None and not ens <= ens_max <= 1.0:
            raise ConfigError(f"kd_ens_alpha_max={ens_max} must be in [kd_ens_alpha={ens}, 1] "
                              "(the ensemble share rises from kd_ens_alpha to kd_ens_alpha_max), or null.")

        min_cw = _float(cfg, "min_cw", 0.5)
        max_cw = _float(cfg, "max_cw", 1.5)
        if min_cw is None or max_cw is None or not 0.0 <= min_cw <= max_cw:
            raise ConfigError(f"min_cw={min_cw} and max_cw={max_cw} must satisfy 0 <= min_cw <= max_cw.")

        feat_key = str(cfg.get("feat_kd_key") or "distill_feat")
        if feat_key not in FEATURE_KEYS:
            raise ConfigError(f"feat_kd_key='{feat_key}' is not supported; use {' or '.join(FEATURE_KEYS)}.")
        feat_clip = _float(cfg, "feat_kd_clip", None)
        if feat_clip is not None and not feat_clip > 0:
            raise ConfigError(f"feat_kd_clip={feat_clip} must be > 0 (or null for no clip).")
        huber = _float(cfg, "feat_kd_huber_beta", None)
        if huber is not None and huber < 0:
            raise ConfigError(f"feat_kd_huber_beta={huber} must be >= 0 (or null for squared error).")

        tau_syn = _float(cfg, "tau_syn", None)
        if tau_syn is not None and not tau_syn > 0:
            raise ConfigError(f"tau_syn={tau_syn} must be > 0 (or null: the current B-step tau).")
        tau_a = _float(cfg, "tau", 4.0) or 4.0
        scale = _float(cfg, "synergy_logit_scale", 1.0)
        if scale is None or not scale > 0:
            raise ConfigError(f"synergy_logit_scale={scale} must be > 0.")
        calibration = str(cfg.get("synergy_scale_calibration") or "none")
        if calibration not in SCALE_CALIBRATIONS:
            raise ConfigError(f"synergy_scale_calibration='{calibration}' is not known; use one of "
                              f"{', '.join(SCALE_CALIBRATIONS)}.")
        query = str(cfg.get("ib_mbm_query_view") or "clean")
        if query not in IB_MBM_QUERY_VIEWS:
            raise ConfigError(f"ib_mbm_query_view='{query}' is not known; use one of {', '.join(IB_MBM_QUERY_VIEWS)}.")

        overlap_pct = _float(cfg, "overlap_pct", None)
        use_overlap = _bool(cfg, "use_overlap_sampling", False)
        if use_overlap and overlap_pct is None:
            raise ConfigError("use_overlap_sampling=true needs overlap_pct (the share of classes the two "
                              "teachers have in common); set overlap_pct or use_overlap_sampling=false.")

        use_ppf = _bool(cfg, "use_partial_freeze", False)
        levels, bn = {}, {}
        for role in ROLES:
            sched = cfg.get(f"{role}_freeze_level_schedule")
            default_level = 1 if role == "student" else -1
            scalar = _int(cfg, f"{role}_freeze_level", default_level)
            if sched:
                if use_ppf and len(sched) != num_stages:
                    raise ConfigError(f"{role}_freeze_level_schedule has {len(sched)} entries but "
                                      f"num_stages={num_stages}; give one level per stage.")
                levels[role] = [int(v) for v in sched]
            else:
                levels[role] = [scalar]
            if any(v < -1 for v in levels[role]):
                raise ConfigError(f"{role} freeze levels must be >= -1, got {levels[role]}.")
            bn[role] = _bool(cfg, f"{role}_freeze_bn", True)

        values = dict(
            adapt_epochs=adapt,
            a_step_augment=_bool(cfg, "a_step_augment", True),
            synergy_only_epochs=sync_only,
            window=synergy_window(sync_only, adapt),
            synergy_ce_alpha=_float(cfg, "synergy_ce_alpha", 1.0),
            label_smoothing=_float(cfg, "label_smoothing", 0.0) or 0.0,
            a_step_lr=_float(cfg, "a_step_lr", 1e-4),
            a_step_weight_decay=_float(cfg, "a_step_weight_decay", 1e-4) or 0.0,
            ib_mbm_lr_factor=_float(cfg, "ib_mbm_lr_factor", 1.0),
            teacher_lr=(_float(cfg, "teacher_lr", 0.0) or _float(cfg, "a_step_lr", 1e-4)),
            teacher_weight_decay=(_float(cfg, "teacher_weight_decay", 0.0)
                                  or _float(cfg, "a_step_weight_decay", 1e-4) or 0.0),
            use_teacher_finetuning=finetune,
            train_distill_adapter_only=adapter_only,
            disable_loss_clamp_in_a=_bool(cfg, "disable_loss_clamp_in_a", True),
            use_ib=_bool(cfg, "use_ib", False),
            ib_beta=_float(cfg, "ib_beta", 0.0) or 0.0,
            ib_beta_warmup_epochs=_int(cfg, "ib_beta_warmup_epochs", 0),
            ib_epochs_per_stage=_int(cfg, "ib_epochs_per_stage", 0),
            ib_mbm_out_dim=(None if cfg.get("ib_mbm_out_dim") is None else _int(cfg, "ib_mbm_out_dim", 0)),
            ib_mbm_n_head=_int(cfg, "ib_mbm_n_head", 1),
            ib_mbm_feature_norm=str(cfg.get("ib_mbm_feature_norm") or "l2"),
            ib_mbm_logvar_clip=_float(cfg, "ib_mbm_logvar_clip", 4.0),
            ib_mbm_min_std=_float(cfg, "ib_mbm_min_std", 0.01),
            ib_mbm_reg_lambda=_float(cfg, "ib_mbm_reg_lambda", 0.0) or 0.0,
            synergy_head_dropout=_float(cfg, "synergy_head_dropout", 0.0) or 0.0,
            cccp_on=use_cccp and in_a,
            cccp_alpha=_float(cfg, "cccp_alpha", 0.2),
            cccp_ramp_epochs=_int(cfg, "cccp_ramp_epochs", 2),
            a_kd_alpha=(_float(cfg, "teacher_adapt_alpha_kd", None) if cfg.get("teacher_adapt_alpha_kd") is not None
                        else _float(cfg, "kd_alpha", 1.0)),
            tau_a=tau_a,
            ce_label_smoothing=_float(cfg, "ce_label_smoothing", 0.0) or 0.0,
            kd_target=kd_target,
            gate_threshold=threshold,
            gate_mode=gate_mode,
            kd_ens_alpha=ens,
            kd_ens_alpha_max=ens_max,
            kd_ens_epochs=_int(cfg, "teacher_adapt_kd_warmup", 0),
            kd_ens_alpha_ramp=_bool(cfg, "kd_ens_alpha_ramp", False),
            hybrid_beta=_float(cfg, "hybrid_beta", 0.0) or 0.0,
            tau_syn=tau_syn,
            synergy_logit_scale=scale,
            scale_calibration=calibration,
            use_mu_for_kd=_bool(cfg, "use_mu_for_kd", True),
            ib_mbm_query_view=query,
            feat_kd_alpha=_float(cfg, "feat_kd_alpha", 0.0) or 0.0,
            feat_kd_key=feat_key,
            feat_kd_clip=feat_clip,
            feat_kd_huber_beta=huber,
            min_cw=min_cw,
            max_cw=max_cw,
            use_overlap_sampling=use_overlap,
            overlap_pct=overlap_pct,
            use_partial_freeze=use_ppf,
            freeze_levels=levels,
            freeze_bn=bn,
        )
        for key in ("synergy_ce_alpha", "a_step_lr", "ib_mbm_lr_factor", "cccp_alpha", "ib_beta",
                    "hybrid_beta", "feat_kd_alpha", "ib_mbm_reg_lambda", "label_smoothing",
                    "ib_beta_warmup_epochs", "ib_epochs_per_stage", "teacher_adapt_kd_warmup",
                    "cccp_ramp_epochs", "teacher_adapt_alpha_kd"):
            name = {"teacher_adapt_kd_warmup": "kd_ens_epochs", "teacher_adapt_alpha_kd": "a_kd_alpha"}.get(key, key)
            value = values[name]
            if value is None or (isinstance(value, float) and math.isnan(value)) or value < 0:
                raise ConfigError(f"{key}={value!r} must be a number >= 0.")
        if values["teacher_lr"] < 0 or values["a_step_weight_decay"] < 0:
            raise ConfigError("teacher_lr and a_step_weight_decay must be >= 0.")
        return cls(**values)
