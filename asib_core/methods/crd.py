"""CRD (Tian, Krishnan, Isola, "Contrastive Representation Distillation", ICLR 2020).

Loss (RepDistiller convention; every entry already weighted)::

    ce  = ce_alpha * CE(s, y)                                    (mixed labels under Mixup/CutMix)
    kd  = kd_alpha * kd_ramp * T^2 KL(p_target^T || p_s^T)       (omitted when kd_alpha == 0;
                                                                  target per kd_target, T = ctx.tau)
    crd = crd_weight * [NCE(student anchor vs teacher memory) + NCE(teacher anchor vs student memory)]

on the pooled features ``feat_2d`` of the student and of teacher ``kd_teacher_index``:
``v = l2n(Linear(feat_2d))`` (``crd_feat_dim``-d, two trainable embeddings), two momentum memory
banks ``[N_train, crd_feat_dim]`` (``crd_momentum``), ``crd_nce_k`` distinct negatives per anchor drawn
from samples of *other classes* (CRD "exact" mode), temperature ``crd_nce_t``, normaliser ``Z`` fixed
at the first batch. The math lives in :mod:`asib_core.losses.crd`.

Keys: ``crd_feat_dim`` (128 in the paper), ``crd_nce_k`` (16384; negatives of one anchor are
distinct, drawn without replacement as in RepDistiller, so K is cut, with a log line, to the
smallest other-class pool ``N_train - max_c N_c`` when the training set is smaller: 4,500 for
5,000 balanced CIFAR-10 images), ``crd_nce_t`` (0.07), ``crd_momentum`` (0.5),
``crd_weight`` (weight of the CRD term; not in the seed configs, default 0.8 = kd-reference).

The memory needs the training-set size and labels, which the constructor (``cfg`` only) does not
have: :meth:`CRD.pretrain` (run once by ``TrainingRun.fit`` before the first epoch) builds it
from ``runner.data.train``; :meth:`CRD.setup_memory` does the same by hand. The banks are buffers
of the ``memory`` sub-module: ``.to(device)`` moves them, ``checkpoint_state()`` saves them, and
:meth:`CRD.load_checkpoint_state` rebuilds the memory from a checkpoint on resume (which happens
before ``pretrain`` would run).
"""
from __future__ import annotations

import logging

import torch

from asib_core.losses import CRDEmbed, CRDMemory, crd_nce_loss, soft_target_kd_loss

from ._probe import (
    needed_teachers, probe_shapes, teacher_forward, teacher_logits,
)
from asib_core.contract import Batch, Distiller, TrainContext
from .registry import register_method
from .targets import target_probs

log = logging.getLogger(__name__)

#: weight of the CRD term when ``crd_weight`` is not configured (kd-reference.md: 0.8, CE 1)
DEFAULT_CRD_WEIGHT = 0.8
_MEMORY_KEY = "memory.memory_s"


@register_method("crd")
class CRD(Distiller):
    def __init__(self, student, teachers, cfg):
        super().__init__(student, teachers, cfg)
        self.t_index, self.needed = needed_teachers(cfg, len(self.teachers), self.name, self.kd_alpha != 0)
        self.feat_dim = int(cfg.get("crd_feat_dim") or 128)
        self.nce_k = int(cfg.get("crd_nce_k") or 16384)
        self.nce_t = float(cfg.get("crd_nce_t") or 0.07)
        momentum = cfg.get("crd_momentum")
        self.momentum = 0.5 if momentum is None else float(momentum)
        weight = cfg.get("crd_weight")
        self.crd_weight = DEFAULT_CRD_WEIGHT if weight is None else float(weight)
        s_dim = probe_shapes(self.student)["feat_2d"][1]
        t_dim = probe_shapes(self.teachers[self.t_index])["feat_2d"][1]
        device = next(self.student.parameters()).device
        self.embed_s = CRDEmbed(s_dim, self.feat_dim).to(device)
        self.embed_t = CRDEmbed(t_dim, self.feat_dim).to(device)
        self.memory: CRDMemory | None = None
        self.effective_nce_k: int | None = None

    # -- memory ---------------------------------------------------------------
    def setup_memory(self, n_data: int, labels=None) -> CRDMemory:
        """Build the two memory banks for a training set of ``n_data`` samples.

        ``labels`` (``[n_data]``) switch on exact-mode negatives (other classes only). The
        negatives of an anchor are distinct, so ``crd_nce_k`` is cut (logged) to the smallest
        pool: ``n_data`` minus the largest class's count (``n_data - 1`` without labels).
        """
        n_data = int(n_data)
        labels = None if labels is None else torch.as_tensor(labels).long().reshape(-1)
        pool = n_data - 1 if labels is None else n_data - int(torch.bincount(labels).max())
        k = self.nce_k
        if k > pool:
            log.info("CRD: crd_nce_k=%d exceeds the %d distinct negatives every anchor has (%d samples); "
                     "using %d negatives per anchor", k, pool, n_data, pool)
            k = pool
        memory = CRDMemory(self.feat_dim, n_data, k, self.nce_t, self.momentum, labels=labels)
        memory.to(self.embed_s.linear.weight.device)
        self.memory = memory
        self.effective_nce_k = k
        return memory

    def pretrain(self, runner) -> None:
        """Not a training stage: builds the memory from the run's training split."""
        if self.memory is not None:
            return
        train = runner.data.train
        self.setup_memory(len(train), train.labels).to(runner.device)
        log.info("CRD memory: %d x %d per modality, %d negatives (exact mode), T=%.3g, momentum=%.3g",
                 self.memory.n_data, self.feat_dim, self.effective_nce_k, self.nce_t, self.momentum)

    def load_checkpoint_state(self, state: dict) -> None:
        if _MEMORY_KEY in state and self.memory is None:
            n_data = int(state[_MEMORY_KEY].shape[0])
            self.setup_memory(n_data, state.get("memory.labels"))
        elif _MEMORY_KEY not in state and self.memory is not None:
            self.memory = None  # a state from before pretrain(): pretrain() builds it again
        super().load_checkpoint_state(state)

    # -- training -------------------------------------------------------------
    def auxiliary_modules(self):
        return [self.embed_s, self.embed_t]

    def forward_train(self, batch: Batch, ctx: TrainContext):
        if self.memory is None:
            raise RuntimeError("CRD needs its memory bank before training: TrainingRun.fit() builds it "
                               "in pretrain(runner); outside a run call setup_memory(n_train, labels).")
        s_out = self.student(batch.x)
        logits = s_out["logit"]
        t_outs = teacher_forward(self.teachers, batch.x, self.needed)
        losses = {"ce": self.ce_alpha * batch.ce(logits, self.label_smoothing)}
        if self.kd_alpha != 0:
            target = target_probs(self.cfg, teacher_logits(t_outs), ctx.tau)
            losses["kd"] = self.kd_alpha * ctx.kd_ramp * soft_target_kd_loss(logits, target, ctx.tau)
        v_s = self.embed_s(s_out["feat_2d"].float())
        v_t = self.embed_t(t_outs[self.t_index]["feat_2d"].float())
        out_s, out_t = self.memory(v_s, v_t, batch.idx)
        n = self.memory.n_data
        nce_s = crd_nce_loss(out_s[:, 0], out_s[:, 1:], n)
        nce_t = crd_nce_loss(out_t[:, 0], out_t[:, 1:], n)
        losses["crd"] = self.crd_weight * (nce_s + nce_t)
        self.record(crd_nce_student=nce_s.detach(), crd_nce_teacher=nce_t.detach())
        return logits, losses
