"""The evaluation step: a finished distill (or finetune) run's model on the TEST split.

A distill run is evaluated through its MLflow model (``runs:/<id>/model``; any model URI such as
``models:/<name>/<version>`` is accepted too), so no teacher checkpoint is needed; a run logged
with ``log_model: false`` is rebuilt from ``model/student.pt`` and its teachers, a finetune run
from its checkpoint. Reports ``test/acc`` (the name distill and finetune runs use), top-5, NLL,
ECE, per-class accuracy (CSV), one prediction per test image (``predictions.csv``), confusion
matrix (PNG), agreement with each teacher (when the teachers can still be found), parameter
count of the deployed network, FLOPs and inference images/s, in its own run tagged with the
source run id; the headline numbers are also copied onto the source run (``eval/...``).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import yaml  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from asib_core.data import build_data  # noqa: E402
from asib_core.engine.amp import Precision, resolve_device  # noqa: E402
from asib_core.engine.loop import collect_logits  # noqa: E402
from asib_core.engine.state import load_state  # noqa: E402
from asib_core.errors import CheckpointError, MissingArtifactError  # noqa: E402
from asib_core.methods import build_distiller  # noqa: E402
from asib_core.models import count_parameters  # noqa: E402
from asib_core.tracking import configure_tracking, open_run  # noqa: E402
from asib_core.tracking.params import log_config_params  # noqa: E402

from .common import run_tags, setup_logging  # noqa: E402
from .distill import STUDENT_ARTIFACT, StepResult  # noqa: E402
from .models import build_student, load_teacher  # noqa: E402
from .student_model import MODEL_TAG, is_model_uri, load_student_model, model_source  # noqa: E402

log = logging.getLogger("asib.evaluate")
ECE_BINS = 15


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    """ECE with equal-width confidence bins: sum_b |B|/N * |acc(B) - conf(B)|."""
    conf, pred = probs.max(1)
    correct = (pred == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        mask = (conf > lo) & (conf <= hi)
        if mask.any():
            ece += float(mask.float().mean()) * abs(float(correct[mask].mean()) - float(conf[mask].mean()))
    return ece


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    probs = F.softmax(logits, 1)
    top5 = logits.topk(min(5, num_classes), 1).indices
    return {
        "acc": float((logits.argmax(1) == labels).float().mean()),
        "top5": float((top5 == labels[:, None]).any(1).float().mean()),
        "nll": float(F.cross_entropy(logits, labels)),
        "ece": expected_calibration_error(probs, labels),
    }


def per_class_table(logits, labels, class_names) -> pd.DataFrame:
    pred = logits.argmax(1)
    rows = []
    for c, name in enumerate(class_names):
        mask = labels == c
        rows.append({"class_index": c, "class_name": name, "count": int(mask.sum()),
                     "accuracy": float((pred[mask] == c).float().mean()) if mask.any() else float("nan")})
    return pd.DataFrame(rows)


def prediction_table(logits, labels) -> pd.DataFrame:
    """One row per test image, in test-split order: its label and the predicted class."""
    return pd.DataFrame({"index": np.arange(len(labels)), "label": labels.numpy(),
                         "predicted": logits.argmax(1).numpy()})


def confusion_figure(logits, labels, class_names):
    n = len(class_names)
    matrix = np.zeros((n, n), dtype=np.int64)
    np.add.at(matrix, (labels.numpy(), logits.argmax(1).numpy()), 1)
    fig, ax = plt.subplots(figsize=(max(5, n * 0.35), max(4, n * 0.3)))
    im = ax.imshow(matrix, cmap="Blues")
    ax.set_xlabel("predicted"); ax.set_ylabel("true"); ax.set_title("confusion matrix (test)")
    if n <= 20:
        ax.set_xticks(range(n), class_names, rotation=90, fontsize=7)
        ax.set_yticks(range(n), class_names, fontsize=7)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return fig


def flops_per_image(model_fn, device) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 3, 32, 32, device=device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model_fn(x)
    return float(counter.get_total_flops())


def inference_rate(model_fn, loader, repeats: int = 2) -> float:
    with torch.no_grad():
        for x, _, _ in loader:  # warm-up batch
            model_fn(x)
            break
        start, seen = time.perf_counter(), 0
        for _ in range(repeats):
            for x, _, _ in loader:
                model_fn(x)
                seen += int(x.shape[0])
    return seen / max(time.perf_counter() - start, 1e-9)


def _download(run_id: str, path: str) -> Path:
    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path))
    except Exception as exc:  # noqa: BLE001
        raise MissingArtifactError(
            f"run {run_id} has no artifact '{path}' ({exc}); evaluate needs a FINISHED distill or "
            "finetune run of this project (see `mlflow ui` for run ids)."
        ) from None


def _source(run_id: str):
    client = MlflowClient()
    try:
        run = client.get_run(run_id)
    except Exception:  # noqa: BLE001
        raise MissingArtifactError(
            f"no run with id '{run_id}' in the tracking store {mlflow.get_tracking_uri()}; pass the id "
            "of a FINISHED distill or finetune run (listed in `mlflow ui`)."
        ) from None
    step = run.data.tags.get("step")
    if step not in ("distill", "finetune") or run.info.status != "FINISHED":
        raise MissingArtifactError(
            f"run {run_id} is a '{step}' run with status {run.info.status}; evaluate takes a FINISHED "
            "distill or finetune run."
        )
    cfg = yaml.safe_load(_download(run_id, "config/effective_config.yaml").read_text())
    return run, step, cfg


def _teacher_paths(run, cfg) -> list[tuple[str, Path]]:
    out = []
    for role in ("teacher1", "teacher2"):
        path = cfg.get(f"{role}_ckpt")
        if path and Path(path).exists():
            out.append((role, Path(path)))
        elif run.data.tags.get(f"{role}_run"):
            teacher_run = MlflowClient().get_run(run.data.tags[f"{role}_run"])
            out.append((role, _download(teacher_run.info.run_id, teacher_run.data.tags["asib.teacher_artifact"])))
    return out


def _teachers(run, cfg, data, device) -> list:
    return [load_teacher(cfg, role, path, data.num_classes)[0].to(device).eval()
            for role, path in _teacher_paths(run, cfg)]


def _reachable_teachers(run, cfg, data, device) -> list:
    """The source run's teachers if their checkpoints can still be found (for the agreement
    numbers only): evaluating a logged student needs no teacher."""
    try:
        return _teachers(run, cfg, data, device)
    except (MissingArtifactError, CheckpointError, OSError, KeyError) as exc:
        log.info("teacher agreement left out: the teachers of run %s are not reachable (%s)", run.info.run_id, exc)
        return []


def _load_model(run, step, cfg, data, device, model_uri: str | None):
    """(logits function, deployed module, teachers) of the source run."""
    if model_uri:
        module = load_student_model(model_uri, device)
        return module, module, _reachable_teachers(run, cfg, data, device)
    if step == "finetune":
        payload = load_state(_download(run.info.run_id, run.data.tags["asib.teacher_artifact"]))
        tcfg = {**cfg, "teacher1": {"name": cfg["teacher_type"]}, "method_name": "ce"}
        model, _ = load_teacher(tcfg, "teacher1", _write_tmp(payload), data.num_classes)
        model = model.to(device).eval()
        return (lambda x: model(x)["logit"]), model, []
    # a distill run logged without its MLflow model (log_model: false): rebuild it
    payload = load_state(_download(run.info.run_id, STUDENT_ARTIFACT))
    teachers = _teachers(run, cfg, data, device)
    student = build_student(cfg, data.num_classes).to(device)
    distiller = build_distiller(cfg, student, teachers).to(device)
    distiller.load_deploy_state(payload["deploy"])
    distiller.eval()
    return distiller.forward_test, distiller.deployed_model(), teachers


def resolve_target(target: str) -> tuple[str, str | None]:
    """(source run id, MLflow model URI or None) of a run id or a model URI."""
    if is_model_uri(target):
        return model_source(target), target
    run_id = target
    try:
        uri = MlflowClient().get_run(run_id).data.tags.get(MODEL_TAG)
    except Exception:  # noqa: BLE001 - reported by _source with the run id
        uri = None
    return run_id, uri


def _write_tmp(payload) -> Path:
    import tempfile
    path = Path(tempfile.mkdtemp()) / "teacher.pt"
    torch.save(payload, path)
    return path


def run_evaluate(target: str, *, parent_run_id: str | None = None) -> StepResult:
    """Evaluate ``target`` on the test split: the id of a FINISHED distill or finetune run, or the
    URI of a student's MLflow model (``runs:/<id>/model``, ``models:/<name>/<version>``)."""
    setup_logging()
    configure_tracking()
    run_id, model_uri = resolve_target(target)
    source, step, cfg = _source(run_id)
    device = resolve_device(cfg.get("device"))
    data_cfg = cfg if "dataset" in cfg else {**cfg, "dataset": {"name": cfg.get("dataset_name")}}
    data = build_data(data_cfg, device)
    model_fn, module, teachers = _load_model(source, step, cfg, data, device, model_uri)
    precision = Precision(device, False)
    loader = data.loader("test", batch_size=256)
    logits, labels = collect_logits(model_fn, loader, precision)
    metrics = {f"test/{k}": v for k, v in classification_metrics(logits, labels, data.num_classes).items()}
    for i, teacher in enumerate(teachers, start=1):
        t_logits, _ = collect_logits(lambda x, t=teacher: t(x)["logit"], loader, precision)
        metrics[f"test/agreement_teacher{i}"] = float((t_logits.argmax(1) == logits.argmax(1)).float().mean())
        metrics[f"test/teacher{i}_acc"] = float((t_logits.argmax(1) == labels).float().mean())
    deployed_params = count_parameters(module)
    metrics.update({"params": float(deployed_params), "flops_per_image": flops_per_image(model_fn, device),
                    "inference_img_per_s": inference_rate(model_fn, loader)})
    tags = run_tags({**cfg, "exp": cfg.get("exp", cfg.get("recipe", ""))}, "evaluate",
                    source.data.tags.get("config_sha256", ""), source_run=run_id,
                    teachers=source.data.tags.get("teachers", ""), student=source.data.tags.get("student", ""),
                    model_uri=model_uri)
    tags["method"] = source.data.tags.get("method", "")
    if source.data.tags.get("teacher"):
        tags["teacher"] = source.data.tags["teacher"]
    tags["asib.identity"] = f"evaluate-{run_id}"
    experiment = MlflowClient().get_experiment(source.info.experiment_id).name
    with open_run(experiment=experiment, run_name=f"evaluate {source.info.run_name}", tags=tags,
                  nested=parent_run_id is not None, parent_run_id=parent_run_id) as run:
        log_config_params(run.run_id, cfg)  # the source's params: evaluate runs compare like it
        run.log_metrics(metrics, step=0)
        client = MlflowClient()
        client.log_text(run.run_id, prediction_table(logits, labels).to_csv(index=False), "predictions.csv")
        client.log_text(run.run_id, per_class_table(logits, labels, data.class_names).to_csv(index=False),
                        "per_class_accuracy.csv")
        fig = confusion_figure(logits, labels, list(data.class_names))
        client.log_figure(run.run_id, fig, "confusion_matrix.png")
        plt.close(fig)
        for key in ("test/acc", "test/top5", "test/nll", "test/ece", "params", "flops_per_image",
                    "inference_img_per_s"):
            client.log_metric(run_id, f"eval/{key.split('/')[-1]}", metrics[key])
        client.set_tag(run_id, "asib.evaluated_by", run.run_id)
        log.info("evaluate %s: %s", run_id, {k: round(v, 4) for k, v in metrics.items()})
        return StepResult(run_id=run.run_id, metrics=metrics)


__all__ = ["run_evaluate", "classification_metrics", "expected_calibration_error"]
