"""SSKD (Xu, Liu, Li, Loy, "Knowledge Distillation Meets Self-Supervision", ECCV 2020).

Every training image appears in 4 rotations (0, 90, 180, 270 degrees, ``torch.rot90`` of the
augmented batch); the student and the teachers see the ``4B`` images in one forward. Rows of
rotation 0 are the "normal" images, the ``3B`` others the "transformed" ones (grouped per image).
A self-supervision (SS) head ``Linear(d, d) -> ReLU -> Linear(d, d)`` on the pooled feature
``feat_2d`` exists on the student (trained with the student) and on teacher
``kd_teacher_index`` (trained first, then frozen).

Stage 1, ``pretrain(runner)`` (logged under ``sskd_pretrain/``): the teacher is frozen and only
its SS head learns the contrastive prediction "which of the B originals is this rotated image"
(``sskd_ss_ce_loss`` at T = 1, as in the official code), SGD lr 0.05, momentum 0.9, weight decay
5e-4, lr x0.1 at 50 % and 75 % of the stage (official: 60 epochs, milestones 30 / 45).
Length: ``sskd_pretrain_epochs`` if set, else ``min(60, ceil(total student epochs / 4))`` (60
before a 240-epoch run). Each epoch logs the head's matching accuracy on the validation split
(``sskd_pretrain/val_ss_acc``); the frozen teacher's features of the four rotations of those
(unaugmented) images are the same every epoch, so the teacher runs over them once per run and
later epochs run only the head (``TeacherFeatureCache``): before, the teacher's validation passes
cost as much as its training passes.

Stage 2, the student epochs (every entry already weighted, T = ctx.tau)::

    ce    = ce_alpha * CE(s_normal, y)
    kd    = kd_alpha * kd_ramp * T^2 KL(p_target^T || p_s^T)   on normal images (omitted when 0)
    tf_kd = feature_weight * T^2 KL on the transformed images' class predictions, target per
            kd_target, all rows kept (sskd_transformed_kd, keep ratio 1.0)
    ss_kd = contrastive_weight * 0.5^2 KL(softmax(S_t / 0.5) || softmax(S_s / 0.5)), S = cosine
            similarity "transformed vs originals" of the SS-head embeddings, teacher-correct rows
            + 75 % of the wrong ones with the smallest rank (sskd_similarity_kl)

Reference weights -> keys: 0.1 CE -> ``ce_alpha``, 0.9 KD -> ``kd_alpha``, 2.7 transformed KD ->
``feature_weight``, 10 similarity KD -> ``contrastive_weight`` (with T = 4: ``tau: 4`` and no tau
schedule). The seed's values (0.3 / 0.7 / 0.5 / 1.0) are weaker than the paper's.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from asib_core.losses import (
    soft_target_kd_loss,
    sskd_similarity,
    sskd_similarity_kl,
    sskd_ss_ce_loss,
    sskd_transformed_kd,
)

from ._probe import needed_teachers, probe_shapes, teacher_forward
from .teacher_cache import TeacherFeatureCache
from asib_core.contract import Batch, Distiller, TrainContext
from .registry import register_method
from .targets import target_probs

log = logging.getLogger(__name__)

ROTATIONS = 4
SS_TEMPERATURE = 0.5          # similarity KD temperature
SS_KEEP_WRONG = 0.75          # fraction of teacher-wrong similarity rows kept
TF_KEEP_WRONG = 1.0           # fraction of teacher-wrong transformed rows kept
PRETRAIN_MAX_EPOCHS, REFERENCE_EPOCHS = 60, 240  # official: 60 SS-head epochs, then 240
PRETRAIN_LR, PRETRAIN_MOMENTUM, PRETRAIN_WD = 0.05, 0.9, 5e-4
PRETRAIN_MILESTONES = (0.5, 0.75)
PRETRAIN_TEMPERATURE = 1.0    # official teacher.py: CE on the raw cosine similarities


class SSHead(nn.Sequential):
    """Self-supervision projection head on the pooled feature."""

    def __init__(self, dim: int):
        super().__init__(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, dim))


def rotate4(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W] -> [4B, C, H, W]``, rows ``4b + k`` = image b rotated by ``k * 90`` degrees."""
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"SSKD rotations need square images, got {tuple(x.shape[-2:])}")
    return torch.stack([torch.rot90(x, k, dims=(2, 3)) for k in range(ROTATIONS)], dim=1).flatten(0, 1)


def split_rotations(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of a ``[4B, ...]`` output -> (normal ``[B, ...]``, transformed ``[3B, ...]`` per image)."""
    grouped = t.reshape(-1, ROTATIONS, *t.shape[1:])
    return grouped[:, 0], grouped[:, 1:].reshape(-1, *t.shape[1:])


def pretrain_epochs(cfg: dict, total_epochs: int) -> int:
    value = cfg.get("sskd_pretrain_epochs")
    if value is not None:
        return max(0, int(value))
    total = int(total_epochs)
    if total <= 0:
        return 0
    share = -(-total * PRETRAIN_MAX_EPOCHS // REFERENCE_EPOCHS)  # integer ceil of total / 4
    return min(PRETRAIN_MAX_EPOCHS, max(1, share))


class OnRotations:
    """A frozen teacher called on the four rotations of its input (``feat_2d`` rows ``4b + k``),
    for :class:`TeacherFeatureCache`; a plain callable, so the distiller does not register the
    teacher a second time."""

    def __init__(self, teacher: nn.Module):
        self.teacher = teacher

    def __call__(self, x: torch.Tensor) -> dict:
        return self.teacher(rotate4(x))


@register_method("sskd")
class SSKD(Distiller):
    def __init__(self, student, teachers, cfg):
        super().__init__(student, teachers, cfg)
        # the transformed-image KD always reads kd_target
        self.t_index, self.needed = needed_teachers(cfg, len(self.teachers), self.name, True)
        fw, cw = cfg.get("feature_weight"), cfg.get("contrastive_weight")
        self.tf_weight = 2.7 if fw is None else float(fw)
        self.ss_weight = 10.0 if cw is None else float(cw)
        s_dim = probe_shapes(self.student)["feat_2d"][1]
        t_dim = probe_shapes(self.teachers[self.t_index])["feat_2d"][1]
        device = next(self.student.parameters()).device
        self.ss_head_s = SSHead(s_dim).to(device)
        # teacher side: trained in pretrain() only, never by the student optimiser
        self.ss_head_t = SSHead(t_dim).to(device)
        self.val_teacher_cache = TeacherFeatureCache()   # the teacher's features of the rotated val images

    def auxiliary_modules(self):
        return [self.ss_head_s]

    # -- stage 1: the teacher's SS head ----------------------------------------
    def _teacher_ss(self, x: torch.Tensor):
        """Teacher (frozen) outputs on the 4 rotations and its SS-head embeddings."""
        with torch.no_grad():
            t_out = self.teachers[self.t_index](rotate4(x))
        return t_out, self.ss_head_t(t_out["feat_2d"].detach())

    @staticmethod
    def _ss_accuracy(emb: torch.Tensor) -> torch.Tensor:
        nor, aug = split_rotations(emb)
        sim = sskd_similarity(nor, aug)
        target = torch.arange(nor.shape[0], device=sim.device).repeat_interleave(ROTATIONS - 1)
        return (sim.argmax(dim=1) == target).float().mean()

    def pretrain(self, runner) -> None:
        epochs = pretrain_epochs(self.cfg, runner.spec.total_epochs)
        if epochs <= 0:
            log.warning("SSKD: no pre-training epochs (sskd_pretrain_epochs=0 or an empty run): "
                        "the teacher's SS head stays untrained")
            self.ss_head_t.requires_grad_(False)
            return
        head = self.ss_head_t.requires_grad_(True)
        params = list(head.parameters())
        optimizer = torch.optim.SGD(params, lr=PRETRAIN_LR, momentum=PRETRAIN_MOMENTUM,
                                    weight_decay=PRETRAIN_WD)
        milestones = [int(m * epochs) for m in PRETRAIN_MILESTONES]
        chunk = int(self.cfg.get("dataset", {}).get("batch_size") or 64)

        def step(batch, _epoch):
            t_out, emb = self._teacher_ss(batch.x)
            nor, aug = split_rotations(emb)
            loss = sskd_ss_ce_loss(nor, aug, temperature=PRETRAIN_TEMPERATURE)
            self.record(ss_acc=self._ss_accuracy(emb.detach()))
            return split_rotations(t_out["logit"])[0], {"ss_ce": loss}

        def epoch_metrics(_epoch):
            return {"sskd_pretrain/lr": optimizer.param_groups[0]["lr"],
                    "sskd_pretrain/val_ss_acc": self.ss_val_accuracy(runner, chunk)}

        def step_lr(epoch):     # x0.1 at each milestone
            for group in optimizer.param_groups:
                group["lr"] = PRETRAIN_LR * 0.1 ** sum(epoch >= m for m in milestones)

        runner.run_aux_epochs("sskd_pretrain", step, params, optimizer, epochs,
                              extra_metrics=epoch_metrics, before_epoch=step_lr)
        head.requires_grad_(False)
        dist = getattr(runner, "dist", None)
        if dist is not None and dist.enabled:
            # run_aux_epochs does not go through DDP: every rank trained its own copy of the
            # head on its shard; keep rank 0's so all ranks distil toward the same targets
            import torch.distributed as torch_dist
            for tensor in list(head.parameters()) + list(head.buffers()):
                torch_dist.broadcast(tensor.data, src=0)

    @torch.no_grad()
    def ss_val_accuracy(self, runner, chunk: int = 64) -> float:
        """SS-head matching accuracy on the validation split (``chunk`` originals per group)."""
        if len(runner.data.val) == 0:
            return float("nan")
        correct = total = 0.0
        rotated = [OnRotations(self.teachers[self.t_index])]
        for x, _, (feats,) in self.val_teacher_cache.batches(runner.val_loader, rotated, runner.precision):
            for start in range(0, x.shape[0], chunk):
                size = min(chunk, x.shape[0] - start)
                if size < 2:
                    continue
                with runner.precision.autocast():
                    emb = self.ss_head_t(feats[ROTATIONS * start:ROTATIONS * (start + size)])
                n = (ROTATIONS - 1) * size
                correct += float(self._ss_accuracy(emb.float())) * n
                total += n
        return correct / total if total else float("nan")

    # -- stage 2: the student ----------------------------------------------------
    def forward_train(self, batch: Batch, ctx: TrainContext):
        x4 = rotate4(batch.x)
        s_out = self.student(x4)
        s_nor, s_aug = split_rotations(s_out["logit"])
        t_outs = teacher_forward(self.teachers, x4, self.needed)
        with torch.no_grad():
            t_emb = self.ss_head_t(t_outs[self.t_index]["feat_2d"])
        t_split = [(None, None) if t is None else split_rotations(t["logit"]) for t in t_outs]
        losses = {"ce": self.ce_alpha * batch.ce(s_nor, self.label_smoothing)}
        if self.kd_alpha != 0:
            target = target_probs(self.cfg, [nor for nor, _ in t_split], ctx.tau)
            losses["kd"] = self.kd_alpha * ctx.kd_ramp * soft_target_kd_loss(s_nor, target, ctx.tau)
        # transformed-image KD toward the kd_target distribution, given as logits T * log(q)
        # (softmax(T log q / T) = q; the error ranking of q equals that of the teacher logits)
        q_aug = target_probs(self.cfg, [aug for _, aug in t_split], ctx.tau).float()
        pseudo_logits = ctx.tau * torch.log(q_aug.clamp_min(torch.finfo(q_aug.dtype).tiny))
        y_aug = batch.y.repeat_interleave(ROTATIONS - 1)
        losses["tf_kd"] = self.tf_weight * sskd_transformed_kd(s_aug, pseudo_logits, y_aug, ctx.tau,
                                                               keep_wrong_ratio=TF_KEEP_WRONG)
        s_emb = self.ss_head_s(s_out["feat_2d"])
        s_nor_emb, s_aug_emb = split_rotations(s_emb)
        t_nor_emb, t_aug_emb = split_rotations(t_emb)
        losses["ss_kd"] = self.ss_weight * sskd_similarity_kl(
            s_nor_emb, s_aug_emb, t_nor_emb, t_aug_emb,
            temperature=SS_TEMPERATURE, keep_wrong_ratio=SS_KEEP_WRONG)
        self.record(sskd_ss_acc=self._ss_accuracy(s_emb.detach()))
        return s_nor, losses
