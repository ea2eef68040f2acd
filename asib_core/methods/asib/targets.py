"""B-step KD targets of ASIB and the synergy gate.

Every target is a per-sample probability matrix at a given temperature (detached), turned
into a per-sample KD value ``T^2 * KL(q || softmax(s / T))`` by
:func:`asib_core.losses.soft_target_kd_loss` (reduction ``none``).

Ensemble targets (``kd_target`` teacher / avg / weighted_conf, and the fallback of
synergy / auto while the gate is closed, which is ``weighted_conf``):

* ``teacher``: ``softmax(t_k / T)``, ``k = kd_teacher_index``;
* ``avg``: ``sum_i w_i softmax(t_i / T)`` with the normalised static ``teacher_weights``;
* ``weighted_conf``: ``sum_i w_bi softmax(t_i / T)``, ``w_bi = a_bi / sum_j a_bj`` with
  ``a_bi = max_c softmax(t_i,b)_c`` (each teacher's own max probability, temperature 1).

With ``use_overlap_sampling`` (class-overlap experiments) a teacher only counts for the
samples whose label (either label of a mixed sample) lies in its class subset: its weight
is set to 0 there and the others are renormalised; in ``teacher`` mode the samples outside
the chosen teacher's subset get no KD term.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from asib_core.losses import feature_kd_loss, soft_target_kd_loss
from asib_core.methods.targets import selected_teacher, teacher_weights


def teacher_mask(subsets: torch.Tensor | None, batch, n_teachers: int) -> torch.Tensor | None:
    """``[B, K]`` bool: teacher i knows sample b's label (``subsets``: ``[K, C]`` bool)."""
    if subsets is None:
        return None
    mask = subsets[:, batch.y].T.clone()
    if batch.y_b is not None and batch.lam < 1.0:
        mask |= subsets[:, batch.y_b].T
    none = ~mask.any(dim=1)
    if none.any():  # a label no teacher saw: fall back to every teacher
        mask[none] = True
    return mask


def _renormalise(weights: torch.Tensor) -> torch.Tensor:
    return weights / weights.sum(dim=1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def ensemble_target(mode: str, cfg: dict, teacher_logits: list[torch.Tensor], tau: float,
                    mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(probs [B, C] at tau, sample_weight [B])`` of an ensemble KD target.

    ``mode`` is ``teacher``, ``avg`` or ``weighted_conf``; ``sample_weight`` is 1 except in
    ``teacher`` mode with an overlap mask (0 for samples the chosen teacher never saw).
    """
    logits = torch.stack([t.float() for t in teacher_logits], dim=0)   # [K, B, C]
    K, B = logits.shape[0], logits.shape[1]
    probs = F.softmax(logits / tau, dim=-1)
    ones = logits.new_ones(B)
    if mode == "teacher" or K == 1:
        k = selected_teacher(cfg, K) if mode == "teacher" else 0
        weight = ones if mask is None else mask[:, k].float()
        return probs[k], weight
    if mode == "avg":
        w = logits.new_tensor(teacher_weights(cfg, K)).unsqueeze(0).expand(B, K)
    elif mode == "weighted_conf":
        w = F.softmax(logits, dim=-1).amax(dim=-1).T                   # [B, K]
    else:
        raise ValueError(f"not an ensemble target: {mode}")
    if mask is not None:
        w = w * mask.float()
    w = _renormalise(w)
    return torch.einsum("bk,kbc->bc", w, probs), ones


@torch.no_grad()
def synergy_target(synergy_logits: torch.Tensor, scale: float, tau: float, ensemble_probs: torch.Tensor,
                   ens_alpha: float, mix=None) -> torch.Tensor:
    """``(1 - a) * mix(softmax(scale * z / tau)) + a * ensemble`` (probabilities at ``tau``);
    ``mix`` (``Batch.mix``) turns the clean images' synergy into targets of the mixed batch."""
    q = F.softmax(scale * synergy_logits.float() / tau, dim=-1)
    if mix is not None:
        q = mix(q)
    if ens_alpha <= 0:
        return q
    return (1.0 - ens_alpha) * q + ens_alpha * ensemble_probs


@torch.no_grad()
def label_ce(probs_or_logits: torch.Tensor, batch, is_logits: bool) -> torch.Tensor:
    """Per-sample CE of a prediction against the (possibly mixed) labels."""
    if is_logits:
        logp = F.log_softmax(probs_or_logits.float(), dim=-1)
    else:
        logp = torch.log(probs_or_logits.float().clamp_min(1e-12))
    ce = -logp.gather(1, batch.y.unsqueeze(1)).squeeze(1)
    if batch.y_b is not None and batch.lam < 1.0:
        ce_b = -logp.gather(1, batch.y_b.unsqueeze(1)).squeeze(1)
        ce = batch.lam * ce + (1.0 - batch.lam) * ce_b
    return ce


@torch.no_grad()
def auto_choice(synergy_probs_t1: torch.Tensor, ensemble_probs_t1: torch.Tensor, batch) -> torch.Tensor:
    """``auto``: sample b is taught by the synergy iff its label CE is not worse than the
    ensemble's (both probabilities at temperature 1, mixed labels weighted by lambda)."""
    return label_ce(synergy_probs_t1, batch, False) <= label_ce(ensemble_probs_t1, batch, False)


def feature_kd_term(student_feat: torch.Tensor, mu: torch.Tensor, weights: torch.Tensor | None, alpha: float,
                    clip: float | None, huber_beta: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """B-step feature KD at the spec's scale (3.6.6: a sum over the feature dimensions).

    ``v_b = D * min(mean_j e_bj, clip)`` with ``e`` the squared error (or Huber with
    ``huber_beta``) between the student feature and the detached ``mu``, ``D`` the width: the
    sum over dimensions, with ``feat_kd_clip`` capping the per-dimension mean (the sum at
    ``clip * D``). Returns ``(alpha * mean_b w_b v_b, mean_b w_b v_b)`` (weighted term, raw):
    the effective weight of the per-dimension mean is ``alpha * D`` (0.25 * 512 = 128 in L1/L3/L4).
    """
    width = int(student_feat.shape[-1])
    per_dim = feature_kd_loss(student_feat, mu, clip=clip, huber_beta=huber_beta, reduction="none",
                              feature_reduction="mean", clip_mode="sample", detach_target=True)
    w = weights if weights is not None else torch.ones_like(per_dim)
    raw = width * (w * per_dim).mean()
    return alpha * raw, raw


def mean_entropy(probs: torch.Tensor) -> float:
    """Mean entropy (nats) of the rows of a probability matrix."""
    p = probs.float()
    return float(-(p * p.clamp_min(1e-12).log()).sum(dim=1).mean())


def entropy_matching_scale(logits: torch.Tensor, tau: float, goal: float,
                           low: float = 1e-3, high: float = 1e3) -> float:
    """The factor ``a`` in ``[low, high]`` at which ``softmax(a * logits / tau)`` has the mean
    entropy ``goal`` (nats): bisection on ``log a``, since the entropy falls as ``a`` grows
    (the nearer bound when no factor in the range reaches ``goal``)."""
    z = logits.float() / float(tau)
    lo, hi = math.log(low), math.log(high)
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean_entropy(F.softmax(math.exp(mid) * z, dim=1)) > goal else (lo, mid)
    return math.exp((lo + hi) / 2)


def kd_vector(student_logits: torch.Tensor, probs: torch.Tensor, tau: float) -> torch.Tensor:
    return soft_target_kd_loss(student_logits, probs, tau, reduction="none")


@dataclass
class GateState:
    """The synergy gate: open iff the synergy was trained by an A-step and its last
    validation accuracy reaches ``threshold`` (NaN: not measured, closed). ``threshold`` is
    ``enable_kd_after_syn_acc``, or with ``synergy_gate_mode: ensemble`` the teacher ensemble's
    validation accuracy ``ensemble_acc`` of the same pass (``ASIBSettings.gate_threshold_for``)."""

    threshold: float
    syn_acc: float = math.nan
    trained: bool = False
    measured_stage: int = -1
    ensemble_acc: float = math.nan
    synergy_scale: float = math.nan   # synergy_scale_calibration: the scale the last A-step set

    @property
    def open(self) -> bool:
        return self.trained and self.syn_acc == self.syn_acc and self.syn_acc >= self.threshold

    def metrics(self) -> dict:
        return {"gate/open": float(self.open), "gate/syn_acc": self.syn_acc,
                "gate/threshold": self.threshold, "gate/synergy_trained": float(self.trained),
                "gate/ensemble_acc": self.ensemble_acc, **self._scale("gate/synergy_logit_scale")}

    def as_dict(self) -> dict:
        return {"syn_acc": float(self.syn_acc), "trained": bool(self.trained),
                "measured_stage": int(self.measured_stage), "threshold": float(self.threshold),
                "ensemble_acc": float(self.ensemble_acc), **self._scale("synergy_scale")}

    def _scale(self, name: str) -> dict:
        """``{name: synergy_scale}`` once an A-step has calibrated it, else nothing."""
        return {name: float(self.synergy_scale)} if self.synergy_scale == self.synergy_scale else {}

    def load(self, state: dict) -> None:
        self.syn_acc = float(state.get("syn_acc", math.nan))
        self.trained = bool(state.get("trained", False))
        self.measured_stage = int(state.get("measured_stage", -1))
        self.threshold = float(state.get("threshold", self.threshold))
        self.ensemble_acc = float(state.get("ensemble_acc", math.nan))
        self.synergy_scale = float(state.get("synergy_scale", math.nan))
