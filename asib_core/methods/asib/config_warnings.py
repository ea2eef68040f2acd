"""Warnings about ASIB keys that cannot act in a run (decisions.md, "The one rule for config
keys"). A combination that a seed experiment itself sets is warned about here rather than
refused, so the seed's configs still run; refusals live in ``asib_core/config/validate.py``.

:func:`config_warnings` returns the messages (each names its key); the distiller logs them
once when it is built.
"""
from __future__ import annotations

import math

from asib_core.engine.loop import distill_mixing

TEACHER_ROLES = ("teacher1", "teacher2")


def _ppf_warnings(s, cfg: dict) -> list[str]:
    out = []
    first = s.freeze_level("student", 0)
    if first >= 0 and not (cfg.get("model", {}).get("student", {}) or {}).get("pretrained"):
        out.append(f"PPF freezes the student at level {first} from the first stage, but the student is trained "
                   "from scratch (pretrained: false): its frozen layers keep their random initialisation for "
                   "that stage. Set experiment.use_partial_freeze=false, or a schedule that starts at -1 as "
                   "L4 does, to train the whole student.")
    if s.use_teacher_finetuning:
        return out
    levels = [f"{role}_freeze_level" for role in TEACHER_ROLES
              if any(s.freeze_level(role, st) >= 0 for st in range(len(s.freeze_levels.get(role) or [-1])))]
    if levels:
        out.append(f"{' and '.join(levels)} (or their _schedule) have no effect: teacher freeze levels only limit "
                   "what a fine-tuning A-step trains (use_teacher_finetuning=true); without it the teacher "
                   "backbones stay frozen and only their adapters may train, at every level.")
    bn_keys = [f"{role}_freeze_bn" for role in TEACHER_ROLES if cfg.get(f"{role}_freeze_bn") is not None]
    if bn_keys:
        out.append(f"{' and '.join(bn_keys)} have no effect: teacher BatchNorm layers are always in eval mode "
                   "unless use_teacher_finetuning=true trains the teachers in the A-step.")
    return out


def _target_warnings(s, cfg: dict) -> list[str]:
    out = []
    if s.adapt_epochs > 0 and not s.synergy_consumed:
        out.append(f"the A-step trains the synergy, but the B-step never uses it (kd_target={s.kd_target}, "
                   "feat_kd_alpha=0): the A-step (IB, CCCP) cannot change the student in this run.")
    if s.adapt_epochs == 0 and s.synergy_consumed:
        out.append("teacher_adapt_epochs=0, so the synergy is never trained and its gate stays closed: "
                   f"kd_target={s.kd_target} teaches with the weighted_conf ensemble and feature KD is off for "
                   "the whole run.")
    if not s.kd_ens_alpha_ramp and s.kd_ens_alpha_max is not None and s.kd_ens_alpha_max != s.kd_ens_alpha:
        out.append(f"kd_ens_alpha_max={s.kd_ens_alpha_max:g} has no effect: the ensemble share only rises toward "
                   f"it with kd_ens_alpha_ramp=true (off by default); the share is kd_ens_alpha="
                   f"{s.kd_ens_alpha:g} in the first teacher_adapt_kd_warmup={s.kd_ens_epochs} B-step epochs of "
                   "each stage, then 0.")
    if not s.kd_ens_alpha_ramp and s.kd_ens_alpha > 0 and s.kd_ens_epochs == 0:
        out.append(f"kd_ens_alpha={s.kd_ens_alpha:g} has no effect: teacher_adapt_kd_warmup=0 mixes the "
                   "ensemble into the synergy target in no B-step epoch.")
    if s.scale_calibration != "none" and not s.uses_synergy_target:
        out.append(f"synergy_scale_calibration={s.scale_calibration} has no effect: kd_target={s.kd_target} "
                   "never makes the synergy a KD target.")
    elif s.scale_calibration != "none" and cfg.get("synergy_logit_scale") is not None:
        out.append(f"synergy_logit_scale={cfg['synergy_logit_scale']} is not read: with synergy_scale_calibration="
                   f"{s.scale_calibration} each stage's A-step sets the synergy target's logit scale "
                   "(logged as gate/synergy_logit_scale).")
    if s.gate_mode == "ensemble" and cfg.get("enable_kd_after_syn_acc") is not None:
        out.append(f"enable_kd_after_syn_acc={cfg['enable_kd_after_syn_acc']} is not read: with "
                   "synergy_gate_mode=ensemble the gate threshold is the teacher ensemble's validation accuracy.")
    if s.ib_mbm_query_view == "mixed":
        mixing = any(alpha > 0 for alpha in distill_mixing(cfg))
        if not mixing or not s.synergy_consumed:
            why = ("mixup_alpha and cutmix_alpha_distill are 0, so every batch is clean" if not mixing else
                   f"the B-step never queries IB_MBM (kd_target={s.kd_target}, feat_kd_alpha=0)")
            out.append(f"ib_mbm_query_view=mixed has no effect: {why}.")
    weights = cfg.get("teacher_weights")
    if weights is not None and s.kd_target != "avg" and s.hybrid_beta == 0:
        fallback = " (also the closed-gate fallback of synergy/auto)" if s.uses_synergy_target else ""
        out.append(f"teacher_weights={list(weights)} has no effect: kd_target={s.kd_target} uses the "
                   f"weighted_conf ensemble{fallback} or one teacher, and hybrid_beta=0; the weights only act in "
                   "kd_target=avg and the hybrid_beta term.")
    return out


def _ib_warnings(s, cfg: dict, has_ib_mbm: bool) -> list[str]:
    out = []
    if s.use_ib and s.adapt_epochs > 0 and s.ib_beta > 0 and s.kl_epochs_per_stage == 0:
        out.append(f"use_ib=true and ib_beta={s.ib_beta:g} but ib_epochs_per_stage={s.ib_epochs_per_stage}: the "
                   "IB KL term never switches on (the latent is still sampled in the A-step).")
    floor = math.exp(-s.ib_mbm_logvar_clip / 2.0)
    if has_ib_mbm and cfg.get("ib_mbm_min_std") is not None and s.ib_mbm_min_std <= floor:
        out.append(f"ib_mbm_min_std={s.ib_mbm_min_std:g} can never bind: with ib_mbm_logvar_clip="
                   f"{s.ib_mbm_logvar_clip:g} the std is already >= exp(-clip / 2) = {floor:.4g}.")
    if s.adapt_epochs > 0 and s.window < s.synergy_only_epochs:
        out.append(f"synergy_only_epochs={s.synergy_only_epochs} is clamped to {s.window} "
                   f"(teacher_adapt_epochs - 1 = {s.adapt_epochs - 1}): the last A-step epoch is always after "
                   "the synergy-only window, so that the IB KL and CCCP terms switch on.")
    return out


def config_warnings(settings, cfg: dict, has_ib_mbm: bool) -> list[str]:
    """Every warning of an ASIB config (one message per inert key or combination)."""
    return [*_ppf_warnings(settings, cfg), *_target_warnings(settings, cfg),
            *_ib_warnings(settings, cfg, has_ib_mbm)]
