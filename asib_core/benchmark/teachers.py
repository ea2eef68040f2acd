"""A benchmark's teachers: fine-tuned once (reused by identity from the store), their checkpoints
pinned to one local path, and one evaluation of them on the validation and test splits (each
teacher, the ensemble, the oracle, their agreement) logged as the metrics of a run tagged
``step=bench_teachers`` - also reused by identity, and read back by the results page."""
from __future__ import annotations

import copy
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import mlflow
import torch

from asib_core.code_version import code_version
from asib_core.config import ConfigError, identity_hash
from asib_core.config.lock import sha256_of
from asib_core.data import build_data
from asib_core.data.archive import unpacked_tarball
from asib_core.data.registry import ROOT_ENV_VAR
from asib_core.engine.amp import Precision, resolve_device
from asib_core.engine.loop import collect_logits
from asib_core.paths import PROJECT_ROOT
from asib_core.pipeline.chain import reusable_run
from asib_core.pipeline.common import file_sha256
from asib_core.pipeline.finetune import finetune_config, run_finetune
from asib_core.pipeline.models import load_teacher, to_device
from asib_core.tracking import experiment_name, open_run

from .spec import TEACHERS_STEP, Benchmark

log = logging.getLogger("asib.benchmark")
TARBALL_ENV = "ASIB_CIFAR10_JPEG_TAR"


@dataclass
class Teacher:
    name: str
    overrides: list[str]
    identity: str
    run_id: str | None = None     # None: not trained yet (a dry run)
    path: Path | None = None      # the pinned checkpoint the student runs name
    reused: bool = False


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "benchmark"


def data_root(bench: Benchmark, *, extract: bool = True) -> str | None:
    """The image folder of the benchmark's ``data`` (None: a built-in data set such as digits):
    ``$ASIB_DATA_ROOT``, else ``folder`` inside the ``tarball`` unpacked once into the cache."""
    if not bench.data.get("tarball"):
        return None
    if os.environ.get(ROOT_ENV_VAR):
        return os.environ[ROOT_ENV_VAR]
    tarball = Path(os.environ.get(TARBALL_ENV) or PROJECT_ROOT / str(bench.data["tarball"]))
    cache_name = tarball.name.split(".")[0]
    if extract:
        base = unpacked_tarball(tarball, cache_name)
    else:
        from asib_core.data.cache import fallback_cache_dir
        base = fallback_cache_dir() / cache_name
    return str(base / str(bench.data.get("folder") or ""))


def plan_teachers(bench: Benchmark, root: str | None, chosen: dict[str, str] | None = None) -> list[Teacher]:
    """Each teacher's fine-tune overrides and identity, and its FINISHED run when the store has one.

    ``chosen`` (teacher name -> finetune run id, the ``teacher_runs`` option) names the run to
    use instead: a teacher trained by an earlier version of the code (whose identity differs)
    is reused that way rather than trained again. The student runs' split check still applies."""
    chosen = dict(chosen or {})
    unknown = sorted(set(chosen) - {spec["teacher"] for spec in bench.teachers})
    if unknown:
        raise ConfigError(f"teacher_runs names {', '.join(unknown)}, which benchmark {bench.key} does not use; "
                          f"its teachers are {', '.join(spec['teacher'] for spec in bench.teachers)}.")
    teachers = []
    for spec in bench.teachers:
        over = ([f"dataset.root={root}"] if root else []) + [str(o) for o in spec.get("overrides") or []]
        cfg = finetune_config(spec["teacher"], bench.dataset, over)
        teacher = Teacher(spec["teacher"], over, identity_hash(cfg))
        if teacher.name in chosen:
            teacher.run_id, teacher.reused = chosen_run(teacher.name, chosen[teacher.name]), True
        elif (found := reusable_run("finetune", teacher.identity)) is not None:
            teacher.run_id, teacher.reused = found.info.run_id, True
        teachers.append(teacher)
    return teachers


def chosen_run(teacher: str, run_id: str) -> str:
    """``run_id`` if it is a FINISHED fine-tune of ``teacher`` in the store, else a clear error."""
    try:
        run = mlflow.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        run = None
    tags = run.data.tags if run is not None else {}
    if run is None or tags.get("step") != "finetune" or run.info.status != "FINISHED" or tags.get("teacher") != teacher:
        state = ("no such run in the store" if run is None else
                 f"step={tags.get('step')}, teacher={tags.get('teacher')}, status={run.info.status}")
        raise ConfigError(f"teacher_runs: {teacher}={run_id} is not a FINISHED fine-tune of {teacher} ({state}); "
                          "give the run id of such a run (mlflow ui, or search_runs with tags.step = 'finetune').")
    return run_id


def train_teachers(bench: Benchmark, teachers: list[Teacher], parent_run_id: str | None, echo) -> None:
    """Fine-tune the teachers the store lacks, then pin every checkpoint under
    ``checkpoints/benchmark/<name>/`` (the path the student runs' identity names)."""
    for teacher in teachers:
        if teacher.run_id is None:
            echo(f"fine-tuning teacher {teacher.name} on {bench.dataset} ({' '.join(teacher.overrides) or 'recipe as is'})")
            teacher.run_id = run_finetune(teacher.name, bench.dataset, teacher.overrides,
                                          parent_run_id=parent_run_id).run_id
        else:
            echo(f"teacher {teacher.name}: reusing finetune run {teacher.run_id}")
        teacher.path = pin_checkpoint(bench, teacher.run_id)


def pinned_path(bench: Benchmark, run_id: str) -> tuple[str, Path]:
    """(the teacher artifact of a finetune run, where the benchmark keeps its local copy)."""
    artifact = mlflow.get_run(run_id).data.tags["asib.teacher_artifact"]
    return artifact, Path("checkpoints") / "benchmark" / slug(bench.name) / Path(artifact).name


def pin_checkpoint(bench: Benchmark, run_id: str) -> Path:
    artifact, path = pinned_path(bench, run_id)
    mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact, dst_path=str(path.parent))
    return path


def evaluation_identity(bench: Benchmark, teachers: list[Teacher], cfg: dict) -> str:
    return sha256_of({"benchmark": bench.name, "teachers": [(t.name, file_sha256(t.path)) for t in teachers],
                      "dataset": cfg["dataset"], "step": TEACHERS_STEP, "code": code_version()})


def evaluate_teachers(bench: Benchmark, teachers: list[Teacher], cfg: dict, parent_run_id: str | None,
                      tags: dict, echo) -> str:
    """The ``bench_teachers`` run of these teacher files on ``cfg``'s data (reused when it exists)."""
    identity = evaluation_identity(bench, teachers, cfg)
    found = reusable_run(TEACHERS_STEP, identity)
    if found is not None:
        echo(f"teachers' evaluation: reusing run {found.info.run_id}")
        return found.info.run_id
    device = resolve_device(cfg.get("device"))
    data = build_data(cfg, device)
    precision = Precision(device, False, "bfloat16")
    run_tags = {**tags, "step": TEACHERS_STEP, "asib.identity": identity, "dataset": cfg["dataset"]["name"],
                "teachers": "+".join(t.name for t in teachers),
                **{f"teacher_run.{t.name}": t.run_id for t in teachers}}
    with open_run(experiment=experiment_name(), run_name=f"{bench.name} teachers", tags=run_tags,
                  nested=parent_run_id is not None, parent_run_id=parent_run_id) as run:
        metrics = teacher_metrics(teachers, cfg, data, device, precision)
        run.log_metrics(metrics, step=0)
        echo("teachers: " + ", ".join(f"{k} {100 * v:.2f}" for k, v in metrics.items()))
        return run.run_id


def teacher_metrics(teachers: list[Teacher], cfg: dict, data, device, precision) -> dict:
    """``teacher/<name>/{val,test}_acc``; with several teachers also ``ensemble/<split>_acc``
    (mean of their softmax probabilities), ``oracle/<split>_acc`` (any teacher right) and
    ``agreement/<split>`` (all teachers predict the same class)."""
    batch = int(cfg.get("eval_batch_size") or 512)
    models = []
    for teacher in teachers:
        role_cfg = copy.deepcopy(cfg)
        role_cfg["teacher1"] = {**(cfg.get("teacher1") or {}), "name": teacher.name}
        models.append(to_device(load_teacher(role_cfg, "teacher1", teacher.path, data.num_classes)[0], device, False))
    metrics = {}
    for split in ("val", "test"):
        probs, labels = [], None
        for teacher, model in zip(teachers, models):
            logits, labels = collect_logits(lambda x, m=model: m(x)["logit"], data.loader(split, batch_size=batch),
                                            precision)
            probs.append(torch.softmax(logits, dim=1))
            metrics[f"teacher/{teacher.name}/{split}_acc"] = _acc(probs[-1], labels)
        if len(probs) > 1:
            preds = torch.stack([p.argmax(1) for p in probs])
            metrics[f"ensemble/{split}_acc"] = _acc(torch.stack(probs).mean(0), labels)
            metrics[f"oracle/{split}_acc"] = float((preds == labels).any(0).float().mean())
            metrics[f"agreement/{split}"] = float((preds == preds[0]).all(0).float().mean())
    return metrics


def _acc(probs: torch.Tensor, labels: torch.Tensor) -> float:
    return float((probs.argmax(1) == labels).float().mean())
