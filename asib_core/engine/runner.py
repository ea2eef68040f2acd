"""A training run: stages of epochs, validation, checkpoints, resume, SAFE-RETRY.

Used by distillation (a :class:`~asib_core.methods.Distiller`) and, with the CE
method around a teacher, by fine-tuning. Flow of :meth:`TrainingRun.fit`:

    resume (if a checkpoint of this run exists) -> method pre-training stage (once)
    -> per stage: stage_start hook (ASIB's A-step) -> student epochs:
         train epoch -> validation -> one log_metrics call -> LR step
         -> atomic checkpoint -> early stopping check
    -> best-on-validation student restored for the final numbers.

A checkpoint is written after every epoch (and after the pre-training stage and each
stage_start hook), so a run killed at any moment restarts from the last completed
epoch (``last.pt``; the checkpoint before it is kept as ``prev.pt`` and used when ``last.pt``
is unreadable, see state.py); on CPU with a fixed seed it then ends with the same metrics as an
uninterrupted run (batches and mixing are drawn from per-epoch seeded generators and
the global RNG state is saved).

SAFE-RETRY (decisions.md): a non-finite loss restores the last good state (models,
optimiser, scheduler, epoch), switches AMP off, verifies the config lock and goes on;
a second failure ends the run with the reason.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from asib_core.config.lock import ConfigLock
from asib_core.contract import Distiller, TrainContext
from asib_core.faults import calls_fault_point, fault_point

from .amp import Precision
from .distributed import DistContext
from .loop import EpochSettings, NonFiniteLoss, clamp_binding_message, evaluate, train_epoch
from .schedules import kd_cap, kd_ramp, tau_for_epoch
from .state import atomic_save, latest_checkpoint_in, load_state, restore_rng, rng_state, save_checkpoint

log = logging.getLogger(__name__)


@dataclass
class FitSpec:
    """What the epoch loop needs besides the model and data."""

    stage_epochs: list[int]
    seed: int = 0
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    grad_clip_norm: float = 0.0
    clamp_cfg: dict = field(default_factory=dict)
    patience: int = 0
    min_delta_pp: float = 0.0   # early_stopping_min_delta: percentage points of validation top-1

    @property
    def total_epochs(self) -> int:
        return int(sum(self.stage_epochs))


@dataclass
class RunState:
    """Everything needed to continue a run; saved every epoch."""

    stage: int = 0
    epoch_in_stage: int = 0
    student_epoch: int = 0          # global student-epoch counter (schedules)
    log_step: int = 0               # MLflow step: every epoch of any kind
    pretrain_done: bool = False
    prepared_stages: list = field(default_factory=list)
    best_val: float = -1.0
    best_epoch: int = -1
    bad_epochs: int = 0
    stopped_early: bool = False
    safe_retries: int = 0
    history: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class _StepModule(nn.Module):
    """Wraps ``distiller.forward_train`` so DDP sees a module call."""

    def __init__(self, distiller: Distiller):
        super().__init__()
        self.distiller = distiller

    def forward(self, batch, ctx):
        return self.distiller.forward_train(batch, ctx)


class TrainingRun:
    def __init__(self, *, cfg: dict, spec: FitSpec, distiller: Distiller, data, device: torch.device,
                 precision: Precision, optimizer, scheduler, state_dir: Path, lock: ConfigLock,
                 tracker=None, dist: DistContext | None = None, title: str = "",
                 plateau_scheduler=None, batch_scheduler=None, val_metric_fn: Callable | None = None):
        self.cfg = cfg
        self.spec = spec
        self.distiller = distiller
        self.data = data
        self.device = device
        self.precision = precision
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.plateau_scheduler = plateau_scheduler
        self.batch_scheduler = batch_scheduler
        self.state_dir = Path(state_dir)
        self.lock = lock
        self.tracker = tracker
        self.dist = dist or DistContext()
        self.title = title
        self.state = RunState()
        self.restored_from: Path | None = None
        #: test hook: (student_epoch, batch, times) poisons that batch's loss `times` times
        self.inject_nonfinite: tuple[int, int, int] | None = None
        self._injected = 0
        self._clamp_warned = False   # clamp_binding_message: said once per run
        #: called after every student epoch with (student_epoch, metrics); may raise to stop
        #: the run (an Optuna pruner raises TrialPruned here)
        self.on_epoch_end: Callable[[int, dict], None] | None = None
        channels_last = bool(cfg.get("use_channels_last"))
        self.channels_last = channels_last
        bs = int(cfg["dataset"]["batch_size"]) // self.dist.world_size
        self.train_loader = data.loader("train", batch_size=bs, rank=self.dist.rank,
                                        world_size=self.dist.world_size, channels_last=channels_last)
        eval_bs = int(cfg.get("eval_batch_size") or 512)
        self.val_loader = data.loader("val", batch_size=eval_bs, channels_last=channels_last)
        self._plain_train_loader = None
        self.step_module = _StepModule(distiller)
        self.ddp_module = self._wrap_ddp()
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.val_metric_fn = val_metric_fn

    # -- files ----------------------------------------------------------------
    @property
    def last_path(self) -> Path:
        return self.state_dir / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.state_dir / "best.pt"

    def _wrap_ddp(self):
        if not self.dist.enabled:
            return self.step_module
        from torch.nn.parallel import DistributedDataParallel as DDP
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(self.step_module, device_ids=ids, find_unused_parameters=True)

    # -- checkpoints ------------------------------------------------------------
    def checkpoint(self) -> None:
        if not self.dist.is_main:
            return
        payload = {
            "model": self.distiller.checkpoint_state(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "plateau": self.plateau_scheduler.state_dict() if self.plateau_scheduler is not None else None,
            "batch_scheduler": self.batch_scheduler.state_dict() if self.batch_scheduler is not None else None,
            "state": self.state.as_dict(),
            "rng": rng_state(),
            "amp_enabled": self.precision.enabled,
            "config_sha256": self.lock.sha256,
            "run_id": getattr(self.tracker, "run_id", None),
        }
        save_checkpoint(payload, self.state_dir)
        fault_point("checkpoint.saved")

    def restore(self) -> bool:
        """Load the newest readable checkpoint (``last.pt``, else ``prev.pt``); False if none."""
        payload, path = latest_checkpoint_in(self.state_dir)
        if payload is None:
            return False
        self.restored_from = path
        self.distiller.load_checkpoint_state(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        for sched, key in ((self.scheduler, "scheduler"), (self.plateau_scheduler, "plateau"),
                           (self.batch_scheduler, "batch_scheduler")):
            if sched is not None and payload.get(key) is not None:
                sched.load_state_dict(payload[key])
        self.state = RunState(**payload["state"])
        restore_rng(payload["rng"])
        if not payload.get("amp_enabled", True):
            self.precision.disable()
        return True

    # -- the run ------------------------------------------------------------
    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        if self.tracker is not None and self.dist.is_main:
            self.tracker.log_metrics(metrics, step=self.state.log_step if step is None else step)

    def context(self) -> TrainContext:
        epoch = self.state.student_epoch
        return TrainContext(
            epoch=epoch, stage=self.state.stage, epoch_in_stage=self.state.epoch_in_stage,
            total_epochs=self.spec.total_epochs, tau=tau_for_epoch(self.cfg, epoch, self.spec.total_epochs),
            kd_ramp=kd_ramp(self.cfg, epoch), device=self.device,
        )

    def fit(self) -> dict:
        if self.restore():
            log.info("resumed from %s at stage %d epoch %d", self.restored_from, self.state.stage,
                     self.state.epoch_in_stage)
        else:
            self.checkpoint()  # the initial state is the first 'last good state'
        if not self.state.pretrain_done:
            self.distiller.pretrain(self)
            self.state.pretrain_done = True
            self.checkpoint()
        n_stages = len(self.spec.stage_epochs)
        while self.state.stage < n_stages and not self.state.stopped_early:
            stage = self.state.stage
            if stage not in self.state.prepared_stages:
                self.distiller.stage_start(stage, self)
                self.state.prepared_stages.append(stage)
                self.checkpoint()
            while self.state.epoch_in_stage < self.spec.stage_epochs[stage] and not self.state.stopped_early:
                self._epoch_with_safe_retry()
            if not self.state.stopped_early:
                self.state.stage += 1
                self.state.epoch_in_stage = 0
                self.checkpoint()
        return self.state.as_dict()

    def _epoch_with_safe_retry(self) -> None:
        """One epoch; a non-finite loss restores the last good state and retries once per run
        (AMP off); a non-finite loss after that stops the run."""
        while True:
            try:
                self._one_epoch()
                return
            except NonFiniteLoss as exc:
                if self.state.safe_retries >= 1:
                    raise RuntimeError(f"SAFE-RETRY failed: the loss became non-finite again after "
                                       f"the retry ({exc}). The run stops.") from exc
                retries = self.state.safe_retries + 1
                log.warning("[SAFE-RETRY] %s -- restoring the last good state, AMP off", exc)
                self.restore()
                self.state.safe_retries = retries
                self.precision.disable()
                self.cfg["use_amp"] = False
                self.lock.verify(self.cfg, "before_safe_retry")
                if self.tracker is not None and self.dist.is_main:
                    self.tracker.set_tags({"asib.safe_retry": str(exc)[:500]})
                self.log_metrics({"safe_retry": float(retries)})

    def _one_epoch(self) -> None:
        st, spec = self.state, self.spec
        ctx = self.context()
        self.distiller.train()
        self.train_loader.set_epoch(st.student_epoch)
        inject = None
        if self.inject_nonfinite and self.inject_nonfinite[0] == st.student_epoch \
                and self._injected < self.inject_nonfinite[2]:
            inject = self.inject_nonfinite[1]
            self._injected += 1
        settings = EpochSettings(
            epoch=st.student_epoch, mixup_alpha=spec.mixup_alpha, cutmix_alpha=spec.cutmix_alpha,
            grad_clip_norm=spec.grad_clip_norm, clamp_cfg=spec.clamp_cfg, seed=spec.seed,
            desc=f"{self.title} stage {st.stage + 1} epoch {st.student_epoch + 1}/{spec.total_epochs}",
            inject_nonfinite_at=inject,
        )
        module, cfg, distiller = self.ddp_module, self.cfg, self.distiller

        def step(batch):
            logits, losses = module(batch, ctx)
            losses, factor = kd_cap(losses, cfg, ctx.epoch, (distiller.ce_alpha, distiller.kd_alpha * ctx.kd_ramp))
            if cfg.get("kd_max_ratio") is not None:
                distiller.record(**{"kd/cap_factor": factor})
            return logits, losses

        step = calls_fault_point(step, "epoch.batch")
        result = train_epoch(step, self.train_loader, self.optimizer,
                             self.params, self.precision, settings, reducer=self.dist.reduce_sum,
                             scheduler_per_batch=self.batch_scheduler)
        if not self._clamp_warned:
            message = clamp_binding_message(result.metrics, spec.clamp_cfg, st.student_epoch)
            if message is not None:
                if self.dist.is_main:
                    log.warning(message)
                self._clamp_warned = True
        self.distiller.eval()
        val = self.validate()
        metrics = {f"train/{k}" if k not in ("img_per_s", "epoch_time") else k: v
                   for k, v in result.metrics.items()}
        metrics.update({"val/acc": val["acc"], "val/loss": val["loss"], "tau": ctx.tau,
                        "kd_ramp": ctx.kd_ramp, "lr": self.optimizer.param_groups[0]["lr"],
                        "stage": st.stage + 1})
        for key, value in self.distiller.pop_epoch_metrics().items():
            metrics[key if "/" in key else f"train/{key}"] = value
        self._step_schedulers(val["acc"])
        self._track_best(val["acc"])
        metrics["val/best_acc"] = st.best_val
        self.log_metrics(metrics)
        st.history.append({"step": st.log_step, **{k: float(v) for k, v in metrics.items()}})
        st.student_epoch += 1
        st.epoch_in_stage += 1
        st.log_step += 1
        self.checkpoint()
        log.info("epoch %d: train loss %.4f acc %.4f | val acc %.4f | %.0f img/s",
                 st.student_epoch, result.metrics["loss"], result.metrics["acc"], val["acc"],
                 result.metrics["img_per_s"])
        if self.on_epoch_end is not None:
            self.on_epoch_end(st.student_epoch, metrics)

    def validate(self) -> dict:
        if len(self.data.val) == 0:
            return {"acc": float("nan"), "loss": float("nan")}
        fn = self.val_metric_fn or self.distiller.forward_test
        return evaluate(fn, self.val_loader, self.precision)

    def _step_schedulers(self, val_acc: float) -> None:
        if self.scheduler is not None:
            self.scheduler.step()
        if self.plateau_scheduler is not None:
            self.plateau_scheduler.step(val_acc)

    def _track_best(self, val_acc: float) -> None:
        st, spec = self.state, self.spec
        delta = spec.min_delta_pp / 100.0   # accuracies are fractions, the key is in points
        if val_acc != val_acc:  # no validation split: the last epoch is the selected one
            self._save_best()
            return
        if val_acc > st.best_val + (delta if st.best_val >= 0 else 0.0):
            st.best_val, st.best_epoch, st.bad_epochs = val_acc, st.student_epoch, 0
            self._save_best()
        else:
            st.bad_epochs += 1
            if spec.patience > 0 and st.bad_epochs >= spec.patience:
                st.stopped_early = True
                log.info("early stopping: no validation gain for %d epochs", st.bad_epochs)

    def _save_best(self) -> None:
        if self.dist.is_main:
            atomic_save({"deploy": self.distiller.deploy_state(), "epoch": self.state.student_epoch},
                        self.best_path)

    def load_best(self) -> None:
        """Put the best-on-validation deployable weights back into the distiller."""
        if not self.best_path.exists():
            return
        deploy = load_state(self.best_path)["deploy"]
        self.distiller.load_deploy_state(deploy)

    def plain_train_loader(self):
        """The training split without augmentation, batched, shuffled and sharded like
        ``train_loader`` (made on first use): for phases that want the images as they are."""
        if self._plain_train_loader is None:
            self._plain_train_loader = self.data.loader(
                "train", batch_size=self.train_loader.batch_size, rank=self.dist.rank,
                world_size=self.dist.world_size, channels_last=self.channels_last, augment=False)
        return self._plain_train_loader

    def run_aux_epochs(self, name: str, step_fn: Callable, params: list, optimizer, epochs: int,
                       *, mix: bool = False, clamp: bool = True, extra_metrics: Callable | None = None,
                       after_backward: Callable | None = None, loader=None,
                       before_epoch: Callable[[int], None] | None = None) -> list[dict]:
        """Epochs of an auxiliary phase (pre-training, A-step): same loop, own optimiser, over
        ``loader`` (default ``train_loader``). ``before_epoch(e)`` runs before epoch ``e``
        (0-based), e.g. to set the phase's learning rate.

        Each epoch is one MLflow step (``log_step``) with metrics under ``name/``. Modules
        trained here are not inside the DDP module: under data parallelism the caller
        synchronises them (``after_backward``: e.g. ``self.dist.average_gradients``).
        """
        loader = self.train_loader if loader is None else loader
        out = []
        for e in range(epochs):
            if before_epoch is not None:
                before_epoch(e)
            loader.set_epoch(10_000 + self.state.log_step)
            settings = EpochSettings(
                epoch=self.state.log_step,
                mixup_alpha=self.spec.mixup_alpha if mix else 0.0,
                cutmix_alpha=self.spec.cutmix_alpha if mix else 0.0,
                grad_clip_norm=self.spec.grad_clip_norm,
                clamp_cfg=self.spec.clamp_cfg if clamp else {}, seed=self.spec.seed + 991,
                desc=f"{self.title} {name} epoch {e + 1}/{epochs}",
            )
            result = train_epoch(lambda batch: step_fn(batch, e), loader, optimizer, params,
                                 self.precision, settings, reducer=self.dist.reduce_sum,
                                 after_backward=after_backward)
            metrics = {f"{name}/{k}": v for k, v in result.metrics.items()}
            if extra_metrics is not None:
                metrics.update(extra_metrics(e))
            for key, value in self.distiller.pop_epoch_metrics().items():
                metrics[key if "/" in key else f"{name}/{key}"] = value
            self.log_metrics(metrics)
            fault_point("aux.epoch")
            self.state.history.append({"step": self.state.log_step, **metrics})
            self.state.log_step += 1
            out.append(metrics)
        return out

