"""The distillation step, top-down:

compose config -> finalize -> lock -> data -> resolve teachers -> check that no teacher
trained on a validation image -> start (or resume) the MLflow run -> build models / method -> verify lock (before_run) -> fit -> verify lock
(after_run) -> best-on-validation student -> test numbers -> log artifacts.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import mlflow
import torch

from asib_core.config import ResolvedConfig, identity_hash, resolve_experiment
from asib_core.config.finalize import finalize_with_runtime
from asib_core.data import build_data, check_trainable
from asib_core.engine.amp import Precision, resolve_device
from asib_core.engine.distributed import DistContext, init_distributed
from asib_core.engine.loop import distill_mixing, evaluate
from asib_core.engine.optim import student_optimizer
from asib_core.engine.runner import FitSpec, TrainingRun
from asib_core.engine.schedules import build_epoch_scheduler
from asib_core.engine.state import atomic_save
from asib_core.errors import check_writable_dir
from asib_core.faults import fault_point
from asib_core.methods import build_distiller, get_method
from asib_core.tracking import configure_tracking, experiment_name, open_run
from asib_core.tracking.plots import log_curves

from .common import (STATE_TAG, TEACHERS_USED_TAG, early_stopping, file_sha256, resumable_state, run_tags,
                     seed_everything, setup_logging, teacher_names)
from .inputs import log_run_inputs
from .results import apply_log_level, write_results
from .models import build_student, load_teacher, read_teacher_checkpoint, to_device
from .student_model import log_student_model
from .teacher_report import log_teacher_report
from .teacher_splits import check_teacher_splits
from .teachers import resolve_teachers

log = logging.getLogger("asib.distill")
STUDENT_ARTIFACT = "model/student.pt"


@dataclass
class StepResult:
    run_id: str
    metrics: dict


def fit_spec(cfg: dict) -> FitSpec:
    mixup_alpha, cutmix_alpha = distill_mixing(cfg)
    return FitSpec(
        stage_epochs=list(cfg["student_epochs_per_stage"]), seed=int(cfg["seed"]),
        mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha,
        grad_clip_norm=float(cfg.get("grad_clip_norm") or 0.0),
        clamp_cfg={k: cfg.get(k) for k in ("use_loss_clamp", "loss_clamp_mode", "loss_clamp_max",
                                           "loss_clamp_warmup_epochs")},
        **early_stopping(cfg),
    )


def run_identity(cfg: dict, teacher_files: list[Path]) -> str:
    return identity_hash(cfg, extra={"teachers": [file_sha256(p) for p in teacher_files]})


def run_name(cfg: dict) -> str:
    teachers = "+".join(teacher_names(cfg)) if get_method(cfg["method_name"]).needs_teachers else "CE"
    return f"{cfg['exp_id']} {cfg['method_name']} {cfg['model']['student']['name']} <- {teachers}"


def deploy_payload(distiller, cfg: dict, data, sha: str) -> dict:
    student_cfg = cfg["model"]["student"]
    return {
        "deploy": distiller.deploy_state(),
        "meta": {
            "method": cfg["method_name"], "student": student_cfg["name"],
            "num_classes": int(data.num_classes), "small_input": bool(cfg.get("small_input", True)),
            "distill_out_dim": cfg.get("distill_out_dim"), "dataset": cfg["dataset"]["name"],
            "class_names": list(data.class_names), "config_sha256": sha,
            "teachers": teacher_names(cfg), "exp": cfg["exp"],
        },
    }


def run_distill(exp: str, overrides: list[str], *, parent_run_id: str | None = None,
                inject_nonfinite: tuple[int, int] | None = None, on_epoch_end=None,
                extra_tags: dict | None = None, state_root: str | Path | None = None) -> StepResult:
    """Run (or resume) one distillation. ``on_epoch_end(epoch, metrics)`` is called after
    every student epoch (an Optuna pruner raises there); ``extra_tags`` go on the run;
    ``state_root`` replaces ``checkpoint_dir`` as the folder of the resumable state (a sweep
    gives every trial its own, so two trials with equal configs never share or resume one)."""
    setup_logging()
    dist = init_distributed()
    resolved: ResolvedConfig = resolve_experiment(exp, overrides)
    cfg, lock = resolved.cfg, resolved.lock
    apply_log_level(cfg)
    configure_tracking()
    seed_everything(int(cfg["seed"]), bool(cfg.get("deterministic", True)))
    device = resolve_device(cfg.get("device"))
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    data = build_data(cfg, device)  # a missing dataset fails here, before any training state
    check_trainable(data, dist.world_size)  # and data that cannot train
    method_cls = get_method(cfg["method_name"])
    sources = resolve_teachers(cfg) if method_cls.needs_teachers else []
    # a wrong teacher file, or a teacher that trained on a validation image, is refused before
    # the run is created
    metas = [read_teacher_checkpoint(cfg, s.role, s.path, data.num_classes, mmap=True).get("meta")
             for s in sources]
    check_teacher_splits(data, sources, metas)
    identity = run_identity(cfg, [s.path for s in sources])
    state_dir = Path(state_root or cfg.get("checkpoint_dir") or "checkpoints/runs") / f"distill-{identity[:20]}"
    check_writable_dir(state_dir, "checkpoint_dir: the run's state folder")  # before the run exists
    tags = run_tags(cfg, "distill", lock.sha256, teachers="+".join(teacher_names(cfg)) if sources else "none",
                    student=cfg["model"]["student"]["name"],
                    **{"asib.identity": identity, "asib.world_size": str(dist.world_size)})
    tags.update({f"{s.role}_run": s.run_id for s in sources if s.run_id})
    tags.update(extra_tags or {})
    hooks = {"inject_nonfinite": inject_nonfinite, "on_epoch_end": on_epoch_end}
    with resumable_state(state_dir, identity, enabled=dist.is_main) as (folder, resume_id):
        resume_id = dist.broadcast_object(resume_id)
        if not dist.is_main:
            return _fit(cfg, lock, sources, data, device, state_dir, dist, None, hooks)
        with open_run(experiment=experiment_name(), run_name=run_name(cfg),
                      tags={**tags, STATE_TAG: folder.key}, resume_run_id=resume_id,
                      nested=parent_run_id is not None, parent_run_id=parent_run_id) as run:
            return _fit(cfg, lock, sources, data, device, state_dir, dist, run, hooks)


def _fit(cfg, lock, sources, data, device, state_dir, dist: DistContext, run, hooks: dict) -> StepResult:
    seed_everything(int(cfg["seed"]), bool(cfg.get("deterministic", True)))
    precision = Precision(device, bool(cfg.get("use_amp")), str(cfg.get("amp_dtype", "bfloat16")))
    finalize_with_runtime(cfg, num_classes=int(data.num_classes),
                          **{f"{s.role}_ckpt": str(s.path) for s in sources})
    channels_last = bool(cfg.get("use_channels_last"))
    teachers = [to_device(load_teacher(cfg, s.role, s.path, data.num_classes)[0], device, channels_last)
                for s in sources]
    student = to_device(build_student(cfg, data.num_classes), device, channels_last)
    distiller = build_distiller(cfg, student, teachers).to(device)
    if run is not None:
        names = teacher_names(cfg) if sources else []
        run.set_tags({TEACHERS_USED_TAG: "+".join(names[i] for i in distiller.teachers_used()) or "none"})
        log_run_inputs(run.run_id, cfg, data)
        log_teacher_report(run, teachers, [s.path for s in sources], data, precision, cfg)
    optimizer = student_optimizer(cfg, distiller.student_parameters(), distiller.auxiliary_parameters())
    spec = fit_spec(cfg)
    scheduler = build_epoch_scheduler(optimizer, cfg.get("schedule") or {}, spec.total_epochs)
    trainer = TrainingRun(cfg=cfg, spec=spec, distiller=distiller, data=data, device=device,
                          precision=precision, optimizer=optimizer, scheduler=scheduler,
                          state_dir=state_dir, lock=lock, tracker=run, dist=dist,
                          title=f"{cfg['exp']}/{cfg['method_name']}")
    trainer.inject_nonfinite = hooks.get("inject_nonfinite")
    trainer.on_epoch_end = hooks.get("on_epoch_end")
    lock.verify(cfg, "before_run")
    state = trainer.fit()
    lock.verify(cfg, "after_run")
    metrics = final_metrics(trainer, data, precision, state)
    if run is not None:
        finish_run(run, trainer, distiller, cfg, data, lock.sha256, metrics)
    dist.barrier()
    return StepResult(run_id=run.run_id if run is not None else "", metrics=metrics)


def final_metrics(trainer: TrainingRun, data, precision, state: dict) -> dict:
    """Test numbers of the last-epoch and of the best-on-validation student."""
    test_loader = data.loader("test", batch_size=int(trainer.cfg.get("eval_batch_size") or 512))
    trainer.distiller.eval()
    last = evaluate(trainer.distiller.forward_test, test_loader, precision)
    fault_point("final.eval")
    trainer.load_best()
    best = evaluate(trainer.distiller.forward_test, test_loader, precision)
    return {
        "test/acc": best["acc"], "test/loss": best["loss"], "test/acc_last": last["acc"],
        "val/best_acc": state["best_val"], "best_epoch": float(state["best_epoch"] + 1),
        "epochs_trained": float(state["student_epoch"]), "safe_retries": float(state["safe_retries"]),
        "stopped_early": float(state["stopped_early"]),
        "train/img_per_s_mean": _mean([h.get("img_per_s") for h in state["history"]]),
        "total_train_time_sec": sum(h.get("epoch_time", 0.0) for h in state["history"]),
    }


def _mean(values) -> float:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else float("nan")


def finish_run(run, trainer: TrainingRun, distiller, cfg: dict, data, sha: str, metrics: dict) -> None:
    step = trainer.state.log_step
    run.log_metrics(metrics, step=step)
    path = trainer.state_dir / "student.pt"
    atomic_save(deploy_payload(distiller, cfg, data, sha), path)
    mlflow.log_artifact(str(path), artifact_path="model", run_id=run.run_id)
    history = trainer.state.history
    mlflow.log_text(json.dumps(history, indent=1), "history.json", run_id=run.run_id)
    log_curves(run.run_id, history, run_name(cfg))
    if cfg.get("log_model", True):
        log_student_model(run, distiller, cfg, data, sha)
    folder = write_results(cfg, run.run_id, metrics, history)
    log.info("results of run %s written to %s", run.run_id, folder)
    run.set_tags({"asib.final_test_acc": f"{metrics['test/acc']:.4f}"})
