"""The distiller contract (mdistiller style), shared by the engine and the methods.

It lives outside both ``asib_core/engine`` and ``asib_core/methods`` so that neither has to
import the other to know it: the engine drives any :class:`Distiller`, the methods implement
it, and the dependency between the two packages runs one way only (methods use engine
facilities such as the optimiser factory; the engine never imports a method).

A method is one small class with one job: given a batch, return the student
logits and a dict of named, already-weighted losses. The engine sums the losses,
back-propagates, clips, steps the optimiser and logs every named loss.

Extra trainable modules (regressors, connectors, embeddings, memory banks,
projectors, ...) are sub-modules of the distiller and are returned by
``auxiliary_modules()`` so the optimiser sees them. Teachers are frozen and stay in
eval mode whatever ``train()`` is called with.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Batch:
    """One training batch after mixing (``lam == 1`` when no Mixup/CutMix).

    ``x_clean`` holds the images before mixing and ``perm`` the partner permutation
    (``y_b = y[perm]``) when the engine mixed the batch; both None otherwise."""

    x: torch.Tensor
    y: torch.Tensor
    idx: torch.Tensor
    y_b: torch.Tensor | None = None
    lam: float = 1.0
    x_clean: torch.Tensor | None = None
    perm: torch.Tensor | None = None

    def mix(self, per_sample: torch.Tensor) -> torch.Tensor:
        """A per-sample quantity of the clean images mixed like the labels:
        ``lam * v + (1 - lam) * v[perm]`` (``v`` unchanged without mixing)."""
        if self.perm is None or self.lam >= 1.0:
            return per_sample
        return self.lam * per_sample + (1.0 - self.lam) * per_sample.index_select(0, self.perm)

    def ce(self, logits: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        """Cross-entropy against the (possibly mixed) labels."""
        loss = F.cross_entropy(logits, self.y, label_smoothing=label_smoothing)
        if self.y_b is None or self.lam >= 1.0:
            return loss
        other = F.cross_entropy(logits, self.y_b, label_smoothing=label_smoothing)
        return self.lam * loss + (1.0 - self.lam) * other

    @property
    def size(self) -> int:
        return int(self.x.shape[0])


@dataclass
class TrainContext:
    """What a method may know about where training stands."""

    epoch: int                 # global epoch index, 0-based, over the whole run
    stage: int                 # 0-based stage index
    epoch_in_stage: int
    total_epochs: int          # student epochs of the whole run
    tau: float                 # temperature for this epoch (tau schedule applied)
    kd_ramp: float             # KD warm-up factor in [0, 1] (kd_warmup_epochs)
    device: torch.device
    extras: dict = field(default_factory=dict)


class Distiller(nn.Module):
    """Base class: CE on the student; subclasses add their distillation losses."""

    name = "base"
    #: whether the method needs teacher forwards (False for the CE-only baseline)
    needs_teachers = True

    def __init__(self, student: nn.Module, teachers: list[nn.Module], cfg: dict):
        super().__init__()
        self.student = student
        self.teachers = nn.ModuleList(teachers)
        for teacher in self.teachers:
            teacher.eval()
            teacher.requires_grad_(False)
        self.cfg = cfg
        self.ce_alpha = float(cfg.get("ce_alpha", 1.0))
        self.kd_alpha = float(cfg.get("kd_alpha", 0.0))
        self.label_smoothing = float(cfg.get("ce_label_smoothing", 0.0) or 0.0)
        self._epoch_stats: dict[str, float] = {}

    def teachers_used(self) -> list[int]:
        """Indices of the teachers this method's losses read (the run's tag
        ``asib.teachers_used``): every teacher unless the method sets ``self.needed`` (the
        indices a step runs) or overrides this."""
        return sorted(getattr(self, "needed", range(len(self.teachers))))

    # -- training -------------------------------------------------------------
    def train(self, mode: bool = True):
        super().train(mode)
        for teacher in self.teachers:
            teacher.eval()
        return self

    def forward_train(self, batch: Batch, ctx: TrainContext) -> tuple[torch.Tensor, dict]:
        out = self.student(batch.x)
        return out["logit"], {"ce": self.ce_alpha * batch.ce(out["logit"], self.label_smoothing)}

    def forward_test(self, x: torch.Tensor) -> torch.Tensor:
        return self.student(x)["logit"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # deployment / evaluation
        return self.forward_test(x)

    @torch.no_grad()
    def teacher_outputs(self, x: torch.Tensor) -> list[dict]:
        return [teacher(x) for teacher in self.teachers]

    # -- optimisation ---------------------------------------------------------
    def auxiliary_modules(self) -> list[nn.Module]:
        """Trainable modules besides the student (their params join the B-step optimiser)."""
        return []

    def student_parameters(self):
        return [p for p in self.student.parameters() if p.requires_grad]

    def auxiliary_parameters(self):
        seen, params = set(), []
        for module in self.auxiliary_modules():
            for p in module.parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        return params

    # -- hooks ----------------------------------------------------------------
    def pretrain(self, runner) -> None:
        """First stage of two-stage methods (AB, FT, SSKD). Default: none."""

    def stage_start(self, stage: int, runner) -> None:
        """Called before each stage's student epochs (ASIB runs its A-step here)."""

    def record(self, **values: float) -> None:
        """Accumulate per-epoch diagnostics (means are logged once per epoch)."""
        for key, value in values.items():
            total, count = self._epoch_stats.get(key, (0.0, 0))
            self._epoch_stats[key] = (total + float(value), count + 1)

    def pop_epoch_metrics(self) -> dict[str, float]:
        stats = {k: total / max(count, 1) for k, (total, count) in self._epoch_stats.items()}
        self._epoch_stats = {}
        return stats

    def deploy_state(self) -> dict:
        """State needed to evaluate the deployed student (SimKD adds its head)."""
        return {"student": self.student.state_dict()}

    def checkpoint_state(self) -> dict:
        """Everything a resumed run needs; frozen teachers are rebuilt from their files."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("teachers.")}

    def load_checkpoint_state(self, state: dict) -> None:
        missing, unexpected = self.load_state_dict(state, strict=False)
        bad = [k for k in missing if not k.startswith("teachers.")] + list(unexpected)
        if bad:
            raise RuntimeError(f"checkpoint does not match the model: {bad[:10]}")

    def load_deploy_state(self, state: dict) -> None:
        self.student.load_state_dict(state["student"])

    def deployed_model(self) -> nn.Module:
        """The deployable network: a module whose ``forward(x)`` is :meth:`forward_test`,
        without the teachers (it shares its sub-modules with this distiller)."""
        return StudentLogits(self.student)


class StudentLogits(nn.Module):
    """A student as a plain classifier: images in, logits out (its ``logit`` output)."""

    def __init__(self, student: nn.Module):
        super().__init__()
        self.student = student

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student(x)["logit"]
