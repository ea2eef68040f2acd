"""The teachers' numbers a distill run logs before it trains (``compute_teacher_eval``): each
teacher's validation and test accuracy and, for two teachers, how often they disagree and are
both wrong on the validation split.

They depend only on the teachers' files, the two splits and the evaluation settings, so they are
computed once per MLflow experiment: the run tags the key of what it evaluated
(``asib.teacher_eval``); a later run with the same key copies the numbers of the first run that
has them and names it (``asib.teacher_eval_from``), and a resumed run that logged them before its
kill logs nothing again. On the benchmark protocol that spares every row but the first an
evaluation of each teacher on 15,000 images.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path

from mlflow.tracking import MlflowClient

from asib_core.data.identity import split_fingerprint
from asib_core.engine.loop import collect_logits, evaluate

from .common import file_sha256

log = logging.getLogger("asib.distill")
KEY_TAG = "asib.teacher_eval"
FROM_TAG = "asib.teacher_eval_from"
# what else changes the numbers: how the teachers are built and run, how the disagreement is cut
SETTINGS = ("small_input", "use_amp", "amp_dtype", "use_channels_last", "eval_batch_size",
            "disagreement_max_batches", "disagreement_max_samples")


def report_keys(n_teachers: int) -> set[str]:
    keys = {f"teacher{i}/{split}_acc" for i in range(1, n_teachers + 1) for split in ("val", "test")}
    return keys | ({"teachers/disagreement", "teachers/joint_error"} if n_teachers == 2 else set())


def teacher_eval_key(cfg: dict, teacher_files: list[Path], data, device) -> str:
    """SHA-256 of everything the teacher report depends on."""
    parts = {"teachers": [file_sha256(p) for p in teacher_files], "device": device.type,
             "val": split_fingerprint(data, "val"), "test": split_fingerprint(data, "test"),
             "mean": list(data.mean), "std": list(data.std), **{k: cfg.get(k) for k in SETTINGS}}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def log_teacher_report(run, teachers, teacher_files: list[Path], data, precision, cfg) -> None:
    """Log the report on ``run`` (a RunHandle): copied from an earlier run with the same key,
    or computed. Nothing when ``compute_teacher_eval`` is false or there is no teacher."""
    if not teachers or not cfg.get("compute_teacher_eval"):
        return
    wanted = report_keys(len(teachers))
    if wanted <= set(run.logged):      # a resumed run: logged before its kill
        return
    key = teacher_eval_key(cfg, teacher_files, data, precision.device)
    source = _earlier_report(run, key, wanted)
    if source is not None:
        source_id, metrics = source
        log.info("teacher report copied from run %s (same teachers, splits and settings)", source_id)
        run.set_tags({KEY_TAG: key, FROM_TAG: source_id})
    else:
        metrics = teacher_report(teachers, data, precision, cfg)
        run.set_tags({KEY_TAG: key})
    run.log_metrics(metrics, step=0)


def _earlier_report(run, key: str, wanted: set[str]) -> tuple[str, dict] | None:
    found = MlflowClient().search_runs([run.experiment_id], filter_string=f"tags.`{KEY_TAG}` = '{key}'",
                                       order_by=["attributes.start_time ASC"], max_results=50)
    for other in found:
        if other.info.run_id != run.run_id and wanted <= set(other.data.metrics):
            return other.info.run_id, {k: other.data.metrics[k] for k in wanted}
    return None


def teacher_report(teachers, data, precision, cfg) -> dict:
    """Compute the report: each teacher sees each split once; the disagreement counts the first
    validation samples (at most ``disagreement_max_batches`` evaluation batches and
    ``disagreement_max_samples`` samples, counted in whole batches)."""
    batch = int(cfg.get("eval_batch_size") or 512)
    metrics, val_preds = {}, []
    for i, teacher in enumerate(teachers, start=1):
        def logits_of(x, t=teacher):
            return t(x)["logit"]
        logits, labels = collect_logits(logits_of, data.loader("val", batch_size=batch), precision)
        val_preds.append(logits.argmax(1))
        metrics[f"teacher{i}/val_acc"] = float((val_preds[-1] == labels).float().mean())
        metrics[f"teacher{i}/test_acc"] = evaluate(logits_of, data.loader("test", batch_size=batch), precision)["acc"]
    if len(teachers) == 2:
        n = disagreement_samples(len(labels), batch, cfg)
        p1, p2, y = val_preds[0][:n], val_preds[1][:n], labels[:n]
        metrics["teachers/disagreement"] = float((p1 != p2).float().mean())
        metrics["teachers/joint_error"] = float(((p1 != y) & (p2 != y)).float().mean())
    return metrics


def disagreement_samples(total: int, batch: int, cfg: dict) -> int:
    """How many leading validation samples the disagreement counts (whole batches, see keys.yaml)."""
    n = total
    if cfg.get("disagreement_max_batches"):
        n = min(n, int(cfg["disagreement_max_batches"]) * batch)
    if cfg.get("disagreement_max_samples"):
        n = min(n, math.ceil(int(cfg["disagreement_max_samples"]) / batch) * batch)
    return n
