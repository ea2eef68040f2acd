"""Find the teacher checkpoints a distillation run uses.

Order: an explicit ``teacher{i}_ckpt`` path that exists; else the newest FINISHED
``finetune`` run of that teacher on that dataset (and class subset, for overlap
experiments); else an error that prints the exact fine-tune command.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlflow

from asib_core.errors import MissingArtifactError
from asib_core.tracking import search_finished

TEACHER_ARTIFACT_DIR = "teacher"


def class_subset_tag(cfg: dict, index: int) -> str:
    """'all', or the overlap subset a teacher must have been trained on."""
    pct = cfg.get("overlap_pct")
    if pct is None or float(pct) < 0:
        return "all"
    return f"overlap{float(pct):g}-t{index}-seed{int(cfg.get('seed', 0))}"


def finetune_command(teacher: str, dataset: str, subset: str, cfg: dict) -> str:
    cmd = f"mlflow run . --env-manager local -e finetune -P teacher={teacher} -P dataset={dataset}"
    if subset != "all":
        cmd += f" -P overrides=\"overlap_pct={cfg['overlap_pct']} subset={subset.split('-t')[1][0]} seed={cfg.get('seed', 0)}\""
    return cmd


def default_ckpt(teacher: str, dataset: str) -> str:
    """Where the matching fine-tune recipe writes its checkpoint."""
    return f"checkpoints/teachers/{teacher}_{dataset}.pth"


@dataclass
class TeacherSource:
    role: str
    name: str
    path: Path
    run_id: str | None


def find_finetune_run(teacher: str, dataset: str, subset: str):
    runs = search_finished(
        f"tags.step = 'finetune' and tags.teacher = '{teacher}' and tags.dataset = '{dataset}' "
        f"and tags.class_subset = '{subset}'"
    )
    return runs[0] if runs else None


def resolve_teachers(cfg: dict) -> list[TeacherSource]:
    sources = []
    dataset = cfg["dataset"]["name"]
    for index, role in enumerate(("teacher1", "teacher2"), start=1):
        spec = cfg.get(role)
        if not isinstance(spec, dict) or not spec.get("name"):
            continue
        explicit = cfg.get(f"{role}_ckpt") or default_ckpt(spec["name"], dataset)
        if explicit and Path(explicit).exists():
            sources.append(TeacherSource(role, spec["name"], Path(explicit), None))
            continue
        subset = class_subset_tag(cfg, index)
        run = find_finetune_run(spec["name"], dataset, subset)
        if run is not None:
            artifact = run.data.tags.get("asib.teacher_artifact")
            local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=artifact)
            sources.append(TeacherSource(role, spec["name"], Path(local), run.info.run_id))
            continue
        tried = f"the path {explicit} (no such file) and " if explicit else ""
        raise MissingArtifactError(
            f"no checkpoint for {role} '{spec['name']}' on {dataset}: tried {tried}the tracking "
            f"store {mlflow.get_tracking_uri()} for a FINISHED finetune run with teacher="
            f"{spec['name']}, dataset={dataset}, class_subset={subset}. Fine-tune it first with: "
            f"{finetune_command(spec['name'], dataset, subset, cfg)} (or set "
            f"experiment.{role}_ckpt=/path/to/checkpoint.pth)."
        )
    return sources
