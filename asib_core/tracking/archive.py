"""Move runs from one tracking store to another through a folder of plain files.

A run archive keeps what the results pages and the benchmark runner read of a set of runs, so
that a table can be rebuilt, checked or continued on another machine (or after a store is
lost), and seeds run on several machines can be merged into one store for one table:

* ``runs.jsonl.gz``: one JSON object per run: its experiment's name, run name, status, start
  and end time, params, tags and every metric's whole history (step, timestamp, value);
* ``artifacts/<run id>/<path>``: the artifacts kept: by default each fine-tune run's teacher
  checkpoint (the file a student run loads; a benchmark pins it from there), so that a teacher
  trained once is reused rather than trained again. Student checkpoints and logged models stay
  behind (``artifacts=all`` keeps every file);
* ``manifest.json``: the format and its version, the selection, and the size and SHA-256 of
  every file, checked before anything is imported.

The export is deterministic (sorted records, a gzip stream without a timestamp): exporting the
same runs twice writes the same bytes, so a committed archive changes only when its runs do.
Every run is written under its original id: an imported run under the id it was made with (its
``asib.archived_from``), and a tag naming another run of the archive by that run's original id.
So a store continued from an archive exports that archive's records unchanged plus its new
runs, and archives exported on several machines from one archive import without duplicates.

Importing creates each run anew (MLflow gives it a new id) with the run's own start and end
time, status, params, tags and metric points, its artifacts, and the tag ``asib.archived_from``
holding its original id; tags whose value is the id of another run of the archive (a parent
run, a student's teacher runs) are rewritten to that run's new id. A run already in the store
(by id, or imported before: same ``asib.archived_from``) is skipped, so importing twice adds
nothing. A run being imported carries ``asib.import_pending`` until it is complete; an import
that is killed leaves such runs RUNNING, the next command of the project closes them as
orphans (owners.py), and the next import deletes them before it starts: no half-imported run
is ever counted.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
from mlflow.entities import Metric, Param, RunTag, ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from asib_core.config.errors import ConfigError
from asib_core.faults import fault_point

from .owners import OWNER_TAG, close_orphans, owner_id
from .runs import ensure_experiment

FORMAT = "asib-kd run archive"
VERSION = 1
RUNS_FILE, MANIFEST_FILE, ARTIFACTS_DIR = "runs.jsonl.gz", "manifest.json", "artifacts"
ARCHIVED_FROM_TAG = "asib.archived_from"
PENDING_TAG = "asib.import_pending"
TEACHER_ARTIFACT_TAG = "asib.teacher_artifact"
ARTIFACT_CHOICES = ("teachers", "all", "none")
#: the tags of a run that belong to the process or store that held it, not to the run's content
LOCAL_TAGS = (OWNER_TAG, PENDING_TAG, ARCHIVED_FROM_TAG)
MAX_BATCH = {"metrics": 1000, "params": 100, "tags": 100}   # MLflow's log_batch limits


@dataclass
class ExportResult:
    out: Path
    runs: int
    points: int
    artifacts: int
    bytes: int


@dataclass
class ImportResult:
    imported: dict[str, str] = field(default_factory=dict)     # original id -> new id
    skipped: list[str] = field(default_factory=list)           # already in the store
    discarded: list[str] = field(default_factory=list)         # half-imported runs deleted first
    teachers: dict[str, str] = field(default_factory=dict)     # teacher name -> run id in this store


# -- selection -------------------------------------------------------------------------------
def _experiment_ids(client: MlflowClient) -> list[str]:
    return [e.experiment_id for e in client.search_experiments()]


def search_all(filter_string: str, view: int = ViewType.ACTIVE_ONLY) -> list:
    """Every run of the store that matches ``filter_string`` (all pages)."""
    client = MlflowClient()
    ids = _experiment_ids(client)
    runs, token = [], None
    while ids:
        page = client.search_runs(ids, filter_string, run_view_type=view, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            break
    return runs


def with_referenced(runs: list) -> list:
    """``runs`` plus, transitively, every ended run one of their tags names by id (a parent
    run, a student's teacher runs). RUNNING runs are left out: an archive holds ended runs."""
    client = MlflowClient()
    chosen = {run.info.run_id: run for run in runs}
    todo = list(chosen.values())
    while todo:
        run = todo.pop()
        for value in run.data.tags.values():
            if len(value) != 32 or value in chosen or not all(c in "0123456789abcdef" for c in value):
                continue
            try:
                other = client.get_run(value)
            except MlflowException:
                continue
            if other.info.status != "RUNNING" and other.info.lifecycle_stage == "active":
                chosen[value] = other
                todo.append(other)
    return list(chosen.values())


# -- export ----------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _artifact_paths(client: MlflowClient, run, which: str) -> list[str]:
    if which == "none":
        return []
    if which == "teachers":
        path = run.data.tags.get(TEACHER_ARTIFACT_TAG)
        return [path] if path and run.data.tags.get("step") == "finetune" else []
    found, todo = [], [None]
    while todo:
        for info in client.list_artifacts(run.info.run_id, todo.pop()):
            (todo if info.is_dir else found).append(info.path)
    return sorted(found)


def origin_ids(runs: list) -> dict[str, str]:
    """id in this store -> the run's original id (``asib.archived_from`` of an imported run)."""
    return {run.info.run_id: run.data.tags.get(ARCHIVED_FROM_TAG) or run.info.run_id for run in runs}


def run_record(client: MlflowClient, run, experiments: dict[str, str], artifacts: list[str],
               origins: dict[str, str]) -> dict:
    """The run as the archive holds it: under its original id, with every tag that names a run
    of the archive naming that run's original id (so re-exporting imported runs changes nothing)."""
    metrics = {}
    for key in sorted(run.data.metrics):
        history = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: (m.step, m.timestamp))
        metrics[key] = [[m.step, m.timestamp, m.value] for m in history]
    return {"run_id": origins[run.info.run_id], "experiment": experiments[run.info.experiment_id],
            "run_name": run.info.run_name, "status": run.info.status,
            "start_time": run.info.start_time, "end_time": run.info.end_time,
            "params": dict(sorted(run.data.params.items())),
            "tags": {k: origins.get(v, v) for k, v in sorted(run.data.tags.items()) if k not in LOCAL_TAGS},
            "metrics": metrics, "artifacts": artifacts}


def export_runs(runs: list, out: str | Path, *, artifacts: str = "teachers", selection: str = "") -> ExportResult:
    """Write ``runs`` as an archive folder ``out`` (replaced whole, atomically)."""
    if artifacts not in ARTIFACT_CHOICES:
        raise ConfigError(f"artifacts={artifacts!r} is not one of {', '.join(ARTIFACT_CHOICES)}.")
    if not runs:
        raise ConfigError(f"no runs to archive in the tracking store {mlflow.get_tracking_uri()} "
                          f"(selection: {selection or 'none'}); check MLFLOW_TRACKING_URI and the selection.")
    client = MlflowClient()
    experiments = {e.experiment_id: e.name for e in client.search_experiments(view_type=ViewType.ALL)}
    out = Path(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / ARTIFACTS_DIR).mkdir(parents=True)
    records, files, points = [], {}, 0
    origins = origin_ids(runs)
    for run in sorted(runs, key=lambda r: (r.info.start_time or 0, origins[r.info.run_id])):
        paths = _artifact_paths(client, run, artifacts)
        for path in paths:
            dst = tmp / ARTIFACTS_DIR / origins[run.info.run_id] / Path(path).parent
            dst.mkdir(parents=True, exist_ok=True)
            mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=path, dst_path=str(dst))
        record = run_record(client, run, experiments, paths, origins)
        points += sum(len(h) for h in record["metrics"].values())
        records.append(record)
    with open(tmp / RUNS_FILE, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as fh:
        for record in records:
            fh.write((json.dumps(record, sort_keys=True) + "\n").encode("utf-8"))
    for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
        files[path.relative_to(tmp).as_posix()] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    manifest = {"format": FORMAT, "version": VERSION, "selection": selection, "runs": len(records),
                "metric_points": points, "files": files}
    (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    n_artifacts = sum(len(r["artifacts"]) for r in records)
    return ExportResult(out, len(records), points, n_artifacts, sum(f["bytes"] for f in files.values()))


def export_matching(filter_string: str, out: str | Path, artifacts: str = "teachers") -> ExportResult:
    """Archive the runs that match ``filter_string`` and every ended run they name, in ``out``."""
    return export_runs(with_referenced(search_all(filter_string)), out, artifacts=artifacts, selection=filter_string)


# -- import ----------------------------------------------------------------------------------
def read_archive(src: str | Path) -> tuple[Path, list[dict]]:
    """The archive's runs, after checking its manifest and every file's size and SHA-256."""
    src = Path(src)
    manifest_path = src / MANIFEST_FILE
    if not manifest_path.is_file():
        raise ConfigError(f"no run archive at {src.resolve()} (no {MANIFEST_FILE} there): give src= the folder "
                          "`python -m pipelines.archive export` wrote, e.g. docs/results/cifar10-lowdata-runs.")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{manifest_path} is not valid JSON ({exc}); export the archive again.") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ConfigError(f"{manifest_path} is not a {FORMAT} of version {VERSION} "
                          f"(format {manifest.get('format')!r}, version {manifest.get('version')!r}); "
                          "export it again with this version of the project.")
    for name, meta in sorted(manifest.get("files", {}).items()):
        path = src / name
        if not path.is_file() or path.stat().st_size != meta["bytes"] or _sha256(path) != meta["sha256"]:
            raise ConfigError(f"{path} is missing or differs from the archive's manifest (size or SHA-256): the "
                              "archive is incomplete or was edited; export it again (or restore it, e.g. git checkout).")
    with gzip.open(src / RUNS_FILE, "rt", encoding="utf-8") as fh:
        records = [json.loads(line) for line in fh if line.strip()]
    return src, records


def discard_partial_imports() -> list[str]:
    """Delete the runs an earlier, killed import left half-written (closed as orphans first)."""
    close_orphans()
    client = MlflowClient()
    gone = []
    for run in search_all(f"tags.`{PENDING_TAG}` LIKE '%'"):
        if run.info.status != "RUNNING":
            client.delete_run(run.info.run_id)
            gone.append(run.info.run_id)
    return gone


def _known_ids() -> dict[str, str]:
    """original id -> id in this store, for every run the store has (its own, or imported)."""
    known = {}
    for run in search_all(""):
        known.setdefault(run.info.run_id, run.info.run_id)
        origin = run.data.tags.get(ARCHIVED_FROM_TAG) or run.data.tags.get(PENDING_TAG)
        if origin:
            known[origin] = run.info.run_id
    return known


def _chunks(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _fill(client: MlflowClient, new_id: str, record: dict, ids: dict[str, str], src: Path) -> None:
    tags = {k: ids.get(v, v) for k, v in record["tags"].items() if k not in LOCAL_TAGS}
    tags[ARCHIVED_FROM_TAG] = record["run_id"]
    params = [Param(k, v) for k, v in record["params"].items()]
    metrics = [Metric(key, value, timestamp, step)
               for key, history in record["metrics"].items() for step, timestamp, value in history]
    for chunk in _chunks(params, MAX_BATCH["params"]):
        client.log_batch(new_id, params=chunk)
    for chunk in _chunks([RunTag(k, v) for k, v in tags.items()], MAX_BATCH["tags"]):
        client.log_batch(new_id, tags=chunk)
    for chunk in _chunks(metrics, MAX_BATCH["metrics"]):
        client.log_batch(new_id, metrics=chunk)
    for path in record["artifacts"]:
        parent = str(Path(path).parent)
        client.log_artifact(new_id, str(src / ARTIFACTS_DIR / record["run_id"] / path),
                            artifact_path=None if parent == "." else parent)


def import_archive(src: str | Path) -> ImportResult:
    """Import the archive's runs that the store lacks (see the module's docstring)."""
    return import_records(*read_archive(src))


def import_records(src: Path, records: list[dict]) -> ImportResult:
    """Import the runs of :func:`read_archive` that the store lacks."""
    client = MlflowClient()
    result = ImportResult(discarded=discard_partial_imports())
    ids = _known_ids()
    todo = []
    try:
        for record in records:          # every run first, so that tags can name any of them
            if record["run_id"] in ids:
                result.skipped.append(record["run_id"])
                continue
            experiment_id = ensure_experiment(record["experiment"])
            run = client.create_run(experiment_id, start_time=record["start_time"], run_name=record["run_name"],
                                    tags={PENDING_TAG: record["run_id"], OWNER_TAG: owner_id()})
            ids[record["run_id"]] = run.info.run_id
            todo.append((record, run.info.run_id))
        for record, new_id in todo:
            _fill(client, new_id, record, ids, src)
            fault_point("archive.import")
            client.set_terminated(new_id, record["status"], end_time=record["end_time"])
            client.delete_tag(new_id, PENDING_TAG)      # last: a run killed before this is discarded
            result.imported[record["run_id"]] = new_id
    except BaseException:        # an error or Ctrl-C: no half-imported run stays (SIGKILL: the next import)
        for _, new_id in todo:
            if new_id not in result.imported.values():
                client.set_terminated(new_id, "KILLED")
                client.delete_run(new_id)
        raise
    for record in records:
        tags = record["tags"]
        if tags.get("step") == "finetune" and tags.get("teacher") and record["status"] == "FINISHED":
            result.teachers[tags["teacher"]] = ids[record["run_id"]]
    return result
