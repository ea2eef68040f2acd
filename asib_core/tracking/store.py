"""Where runs go: MLflow 3.x defaults (``sqlite:///mlflow.db`` in the project root,
artifacts under ``./mlruns``) unless ``MLFLOW_TRACKING_URI`` says otherwise.

Two guarantees on top of MLflow's own store handling:

* **A sqlite store is created atomically.** MLflow builds a new store's tables in place, by
  a series of schema migrations that are not one transaction: a process killed in the middle
  leaves a file every later command fails on ("table ... already exists"), and two processes
  that start on a fresh store race on the same migrations. Here a new store is built under
  a temporary name (``.<file>.init-<pid>``), complete with its default experiment, and only
  then linked to its real name, while an exclusive ``flock`` on the store's folder keeps a
  second process waiting. A store that an earlier, interrupted creation left half-built
  (schema not at MLflow's head revision, no runs) is moved aside as
  ``<file>.interrupted-<time>`` and created again, with one warning saying so.
* **A tracking server that does not answer fails fast.** Before any work, an ``http(s)``
  tracking URI gets up to :data:`PROBE_TRIES` requests to its ``/health`` endpoint within
  ``ASIB_TRACKING_TIMEOUT`` seconds (default :data:`DEFAULT_TIMEOUT_S`); if none answers,
  :class:`~asib_core.errors.TrackingUnavailable` names the URI (exit code 2). Later requests of
  the command follow MLflow's own settings (``MLFLOW_HTTP_REQUEST_TIMEOUT``,
  ``MLFLOW_HTTP_REQUEST_MAX_RETRIES``).
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import sqlite3
import time
from pathlib import Path
from urllib.parse import unquote

import mlflow

from asib_core.errors import TrackingUnavailable, check_writable_store
from asib_core.faults import fault_point

log = logging.getLogger(__name__)

DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlruns"
TIMEOUT_ENV = "ASIB_TRACKING_TIMEOUT"
DEFAULT_TIMEOUT_S = 10.0
PROBE_TRIES = 3


def configure_tracking(workdir: str | Path | None = None) -> str:
    """Set the tracking URI (env wins), make sure its store can be used, and return it."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no bars in logs
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        root = Path(workdir or os.getcwd()).resolve()
        uri = f"sqlite:///{root / DEFAULT_DB}"
        os.environ["MLFLOW_TRACKING_URI"] = uri
    check_writable_store(uri)  # a read-only store is refused before any run is created (#14)
    mlflow.set_tracking_uri(uri)
    if uri.startswith("sqlite:"):
        path = sqlite_path(uri)
        if path is not None:
            ensure_sqlite_store(uri, path)
    elif uri.startswith(("http://", "https://")):
        check_server(uri)
    return uri


def artifact_root(workdir: str | Path | None = None) -> str | None:
    """Artifact location for new experiments on a local store (None for a server)."""
    uri = mlflow.get_tracking_uri()
    if uri.startswith(("http://", "https://", "databricks")):
        return None
    root = Path(os.environ.get("ASIB_ARTIFACT_ROOT") or Path(workdir or os.getcwd()) / DEFAULT_ARTIFACTS)
    return root.resolve().as_uri()


# -- sqlite: atomic creation ---------------------------------------------------------
def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for an in-memory database)."""
    rest = uri.split("sqlite://", 1)[1].split("?", 1)[0]
    if not rest.startswith("/") or rest in ("/", "/:memory:"):
        return None
    return Path(unquote(rest[1:]))


@functools.lru_cache(maxsize=1)
def _head_revision() -> str:
    from mlflow.store.db.utils import _get_latest_schema_revision
    return _get_latest_schema_revision()


def store_state(path: Path) -> str:
    """``complete`` (schema at MLflow's head), ``interrupted`` (not at head and no runs: a
    creation that was cut off) or ``older`` (not at head but holding runs: MLflow asks for
    ``mlflow db upgrade``)."""
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=60)
    except sqlite3.Error:
        return "interrupted"
    try:
        tables = {row[0] for row in con.execute("select name from sqlite_master where type='table'")}
        version = None
        if "alembic_version" in tables:
            row = con.execute("select version_num from alembic_version").fetchone()
            version = row[0] if row else None
        leftovers = any(t.startswith("_alembic_tmp") for t in tables)
        if version == _head_revision() and not leftovers:
            return "complete"
        runs = con.execute("select count(*) from runs").fetchone()[0] if "runs" in tables else 0
        return "older" if runs else "interrupted"
    except sqlite3.DatabaseError:  # not a database at all (garbage, truncated header)
        return "interrupted"
    finally:
        con.close()


def ensure_sqlite_store(uri: str, path: Path) -> None:
    """Create the store at ``path`` atomically if it does not exist (see the module docstring)."""
    if path.exists() and store_state(path) in ("complete", "older"):
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with _folder_lock(path.parent):
        for stale in path.parent.glob(f".{path.name}.init-*"):   # of creators that were killed
            with contextlib.suppress(OSError):
                stale.unlink()
        if path.exists():
            state = store_state(path)
            if state != "interrupted":
                return
            aside = path.with_name(f"{path.name}.interrupted-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(path, aside)
            log.warning("the tracking store %s was left half-created by an interrupted command and "
                        "holds no runs: moved it to %s and created it again", path, aside.name)
        tmp = path.with_name(f".{path.name}.init-{os.getpid()}")
        try:
            _build_store(f"sqlite:///{tmp.resolve()}")
            fault_point("store.create")
            os.link(tmp, path)
        except FileExistsError:
            pass  # created meanwhile by a process that does not take the folder lock (mlflow CLI)
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()


def _build_store(tmp_uri: str) -> None:
    """All tables, the schema version and the default experiment, as MLflow itself makes them."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
    from mlflow.tracking._tracking_service.utils import _get_sqlalchemy_store

    store = _get_sqlalchemy_store(tmp_uri, None)
    store.engine.dispose()
    SqlAlchemyStore._engine_map.pop(tmp_uri, None)


@contextlib.contextmanager
def _folder_lock(folder: Path):
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# -- http: fail fast --------------------------------------------------------------
def tracking_timeout() -> float:
    try:
        return max(0.5, float(os.environ.get(TIMEOUT_ENV) or DEFAULT_TIMEOUT_S))
    except ValueError:
        return DEFAULT_TIMEOUT_S


def check_server(uri: str) -> None:
    """Raise :class:`TrackingUnavailable` unless the server answers within the timeout."""
    import requests

    budget = tracking_timeout()
    start = time.monotonic()
    url = uri.rstrip("/") + "/health"
    reason = "no answer"
    for attempt in range(PROBE_TRIES):
        left = budget - (time.monotonic() - start)
        if left <= 0:
            break
        try:
            response = requests.get(url, timeout=max(0.2, left / (PROBE_TRIES - attempt)))
            if response.status_code < 500:
                return
            reason = f"HTTP {response.status_code}"
        except requests.exceptions.ConnectionError as exc:
            reason = "connection refused" if "refused" in str(exc).lower() else "connection failed"
        except requests.exceptions.Timeout:
            reason = "no answer (timed out)"
        if attempt + 1 < PROBE_TRIES:
            time.sleep(min(0.5 * 2 ** attempt, max(0.0, budget - (time.monotonic() - start))))
    elapsed = time.monotonic() - start
    raise TrackingUnavailable(
        f"the MLflow tracking server {uri} (MLFLOW_TRACKING_URI) does not answer: {reason} after "
        f"{attempt + 1} tries in {elapsed:.1f} s ({TIMEOUT_ENV}={budget:g}). Start the server "
        "(mlflow server --host HOST --port PORT) or unset MLFLOW_TRACKING_URI to track into "
        "./mlflow.db."
    )
