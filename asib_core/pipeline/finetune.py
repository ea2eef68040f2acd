"""Teacher fine-tuning with a ``configs/finetune/<teacher>_<dataset>.yaml`` recipe.

compose recipe -> flat config -> checks -> lock -> start run -> data (optionally the
teacher's class subset of an overlap experiment) -> teacher -> the shared epoch loop
(CE with label smoothing, CutMix, AMP, the recipe's LR schedule, early stopping on the
validation split) -> best-on-validation weights -> checkpoint file + MLflow artifact.
"""
from __future__ import annotations

import logging
from pathlib import Path

import mlflow
import torch

from asib_core.config import ConfigLock, compose_finetune, identity_hash
from asib_core.config.casting import cast_numbers
from asib_core.config.compose import list_finetune_recipes, to_container
from asib_core.config.errors import ConfigError
from asib_core.config.finalize import project_defaults
from asib_core.config.validate import validate_config
from asib_core.data import build_data, check_trainable
from asib_core.data.splits import filter_classes, overlap_class_split
from asib_core.engine.amp import Precision, resolve_device
from asib_core.engine.finetune_schedules import build_finetune_schedulers
from asib_core.engine.loop import evaluate
from asib_core.engine.optim import build_optimizer
from asib_core.engine.runner import FitSpec, TrainingRun
from asib_core.errors import check_writable_dir
from asib_core.methods.ce import CEOnly
from asib_core.models import create_model
from asib_core.models.checkpoint import check_shapes
from asib_core.tracking import configure_tracking, experiment_name, open_run
from asib_core.tracking.plots import log_curves

from .common import STATE_TAG, early_stopping, resumable_state, run_tags, run_time_metrics, seed_everything, setup_logging
from .distill import StepResult
from .inputs import log_run_inputs
from .models import save_teacher, teacher_payload, to_device
from .results import apply_log_level, write_results
from .teachers import TEACHER_ARTIFACT_DIR

log = logging.getLogger("asib.finetune")


def recipe_name(teacher: str, dataset: str) -> str:
    return f"{teacher}_{dataset}"


def finetune_config(teacher: str, dataset: str, overrides: list[str]) -> dict:
    name = recipe_name(teacher, dataset)
    if name not in list_finetune_recipes():
        raise ConfigError(
            f"no fine-tune recipe for teacher '{teacher}' on dataset '{dataset}' (looked for "
            f"configs/finetune/{name}.yaml). Known recipes: {', '.join(list_finetune_recipes())}. "
            "Copy the closest one to that name and adjust it."
        )
    raw = to_container(compose_finetune(name, overrides))
    cfg = cast_numbers({k: v for k, v in raw.items() if k not in ("experiment", "anchor", "method", "finetune")})
    defaults = project_defaults()
    for key, value in defaults["dataset"].items():
        cfg.setdefault("dataset", {}).setdefault(key, value)
    cfg.setdefault("overlap_pct", None)
    cfg.setdefault("subset", None)
    cfg.setdefault("teacher_pretrained_file", None)
    cfg.setdefault("eval_batch_size", defaults["eval_batch_size"])
    cfg.setdefault("checkpoint_dir", defaults["checkpoint_dir"])
    cfg.setdefault("finetune_optimizer", "adamw")
    for key, value in SGD_DEFAULTS.items():
        cfg.setdefault(key, value)
    cfg["recipe"] = name
    _reconcile_aliases(cfg, {o.split("=", 1)[0].lstrip("+~") for o in overrides})
    validate_config(cfg, "finetune", context=f"fine-tune recipe {name}")
    cfg["dataset"]["batch_size"] = cfg["batch_size"]  # the data pipeline reads it there
    return cfg


def _reconcile_aliases(cfg: dict, overridden: set[str]) -> None:
    """``data_root``/``dataset_name`` are the recipe's aliases of ``dataset.root``/``.name``.

    An override of either spelling sets both; a recipe whose two spellings disagree (and
    no override says which is meant) is refused.
    """
    ds = cfg["dataset"]
    for alias, key in (("data_root", "root"), ("dataset_name", "name")):
        if f"dataset.{key}" in overridden:
            cfg[alias] = ds[key]
        elif alias in overridden or ds.get(key) is None:
            ds[key] = cfg[alias]
        elif cfg.get(alias) is not None and cfg[alias] != ds[key]:
            raise ConfigError(
                f"{alias}={cfg[alias]!r} disagrees with dataset.{key}={ds[key]!r} in recipe "
                f"{cfg.get('recipe')}; they are the same setting: make them equal or override one."
            )
        cfg[alias] = ds[key]


def class_subset(cfg: dict, num_classes: int) -> tuple[str, list[int] | None]:
    pct, subset = cfg.get("overlap_pct"), cfg.get("subset")
    if pct is None or float(pct) < 0:
        if subset is not None:
            raise ConfigError("subset=1|2 needs overlap_pct (the share of classes both teachers see).")
        return "all", None
    if subset not in (1, 2):
        raise ConfigError(f"overlap_pct={pct} needs subset=1 or subset=2 (which teacher's classes), got {subset!r}.")
    classes = overlap_class_split(num_classes, float(pct), int(cfg["seed"]))[subset - 1]
    return f"overlap{float(pct):g}-t{subset}-seed{int(cfg['seed'])}", list(classes)


def ckpt_path(cfg: dict, subset_tag: str) -> Path:
    path = Path(cfg.get("finetune_ckpt_path") or f"checkpoints/teachers/{cfg['recipe']}.pth")
    return path if subset_tag == "all" else path.with_name(f"{path.stem}-{subset_tag}{path.suffix}")


#: the SGD-only keys' defaults (a recipe that does not choose SGD keeps them; validate.py)
SGD_DEFAULTS = {"finetune_momentum": 0.9, "finetune_nesterov": True}


def finetune_optimizer(cfg: dict, params) -> torch.optim.Optimizer:
    """The recipe's optimiser over the teacher's parameters (``finetune_optimizer``)."""
    return build_optimizer(str(cfg["finetune_optimizer"]), [{"params": list(params), "name": "teacher"}],
                           lr=float(cfg["finetune_lr"]), weight_decay=float(cfg["finetune_weight_decay"]),
                           momentum=float(cfg["finetune_momentum"]), nesterov=bool(cfg["finetune_nesterov"]))


def build_teacher(cfg: dict, num_classes: int):
    model = create_model(cfg["teacher_type"], num_classes=num_classes,
                         pretrained=bool(cfg.get("teacher_pretrained")),
                         small_input=bool(cfg.get("small_input", True)),
                         pretrained_file=cfg.get("teacher_pretrained_file"))
    init = cfg.get("teacher_ckpt_init")
    if init:
        if not Path(init).exists():
            raise ConfigError(f"teacher_ckpt_init={init} does not exist; give a checkpoint written by "
                              "a previous fine-tune (checkpoints/teachers/...) or null.")
        fix = "Give a checkpoint written by a previous fine-tune of this teacher (checkpoints/teachers/...) or null."
        state = teacher_payload(init, cfg["teacher_type"], num_classes, "teacher_ckpt_init", fix)["model"]
        check_shapes(model, state, f"teacher_ckpt_init {init}", fix=fix)
        model.load_state_dict(state)
    if cfg.get("teacher_use_checkpointing"):
        model.activation_checkpointing = True
    return model


def run_finetune(teacher: str, dataset: str, overrides: list[str], *, parent_run_id: str | None = None) -> StepResult:
    setup_logging()
    cfg = finetune_config(teacher, dataset, overrides)
    apply_log_level(cfg)
    lock = ConfigLock(cfg)
    cfg["config_sha256"] = lock.sha256
    configure_tracking()
    seed_everything(int(cfg["seed"]), bool(cfg.get("deterministic", True)))
    device = resolve_device(cfg.get("device"))
    data = build_data(cfg, device)
    check_trainable(data)
    subset_tag, classes = class_subset(cfg, data.num_classes)
    if classes is not None:
        data.train = filter_classes(data.train, classes)
        data.val = filter_classes(data.val, classes)
        data.test = filter_classes(data.test, classes)
    identity = identity_hash(cfg)
    # the same tag keys as distill runs (a fine-tune learns from labels alone: no teachers, and
    # no student: the network trained is the teacher named by the tag `teacher`)
    tags = run_tags({**cfg, "exp": cfg["recipe"], "method_name": "ce"}, "finetune", lock.sha256,
                    teachers="none", student="none", teacher=teacher, class_subset=subset_tag,
                    **{"asib.identity": identity})
    state_dir = Path(cfg["checkpoint_dir"]) / f"finetune-{identity[:20]}"
    check_writable_dir(state_dir, "checkpoint_dir: the run's state folder")  # before the run exists
    check_writable_dir(ckpt_path(cfg, subset_tag).parent, "finetune_ckpt_path: the teacher's folder")
    with resumable_state(state_dir, identity) as (folder, resume_id), \
            open_run(experiment=experiment_name(), run_name=f"finetune {teacher} on {dataset} ({subset_tag})",
                     tags={**tags, STATE_TAG: folder.key}, resume_run_id=resume_id,
                     nested=parent_run_id is not None, parent_run_id=parent_run_id) as run:
        log_run_inputs(run.run_id, cfg, data)
        model = to_device(build_teacher(cfg, data.num_classes), device, bool(cfg.get("use_channels_last")))
        distiller = CEOnly(model, [], {"ce_label_smoothing": float(cfg.get("label_smoothing") or 0.0)}).to(device)
        precision = Precision(device, bool(cfg.get("use_amp")), "bfloat16")
        optimizer = finetune_optimizer(cfg, distiller.student_parameters())
        spec = FitSpec(
            stage_epochs=[int(cfg["finetune_epochs"])], seed=int(cfg["seed"]),
            cutmix_alpha=float(cfg.get("finetune_cutmix_alpha") or 0.0) if cfg.get("finetune_use_cutmix") else 0.0,
            **early_stopping(cfg),
        )
        bs = int(cfg["batch_size"])
        steps = max(1, len(data.train) // bs)
        scheds = build_finetune_schedulers(optimizer, cfg, steps)
        trainer = TrainingRun(cfg=cfg, spec=spec, distiller=distiller, data=data, device=device,
                              precision=precision, optimizer=optimizer, scheduler=scheds.epoch,
                              plateau_scheduler=scheds.plateau, batch_scheduler=scheds.batch,
                              state_dir=state_dir, lock=lock, tracker=run, title=f"finetune {teacher}")
        lock.verify(cfg, "before_run")
        state = trainer.fit()
        lock.verify(cfg, "after_run")
        trainer.load_best()
        test = evaluate(distiller.forward_test, data.loader("test", batch_size=int(cfg["eval_batch_size"])), precision)
        metrics = {"test/acc": test["acc"], "test/loss": test["loss"], "val/best_acc": state["best_val"],
                   "best_epoch": float(state["best_epoch"] + 1), "epochs_trained": float(state["student_epoch"]),
                   **run_time_metrics(trainer.state.history)}
        run.log_metrics(metrics, step=trainer.state.log_step)
        path = ckpt_path(cfg, subset_tag)
        meta = {"teacher": teacher, "dataset": data.name, "num_classes": int(data.num_classes),
                "class_subset": subset_tag, "classes": classes, "config_sha256": lock.sha256,
                "run_id": run.run_id, "val_acc": state["best_val"], "test_acc": test["acc"],
                "data": data.split_record.with_classes(classes).as_dict()}
        save_teacher(model, path, meta)
        mlflow.log_artifact(str(path), artifact_path=TEACHER_ARTIFACT_DIR, run_id=run.run_id)
        run.set_tags({"asib.teacher_artifact": f"{TEACHER_ARTIFACT_DIR}/{path.name}"})
        log_curves(run.run_id, trainer.state.history, f"finetune {teacher} on {dataset}")
        write_results(cfg, run.run_id, metrics, trainer.state.history)
        log.info("teacher %s: val %.4f test %.4f -> %s", teacher, state["best_val"], test["acc"], path)
        return StepResult(run_id=run.run_id, metrics=metrics)



