"""Where a study lives, and the lock that makes "count the trials, then ask for one" atomic.

* ``storage=""`` (the default): an Optuna journal file, ``mlruns/optuna/journal.log`` (under
  ``$ASIB_ARTIFACT_ROOT`` when set), for several worker processes on one machine;
* ``storage=PATH``: a journal file at PATH;
* ``storage=URL`` (``postgresql://user:password@host:port/db``, ``mysql://...``,
  ``sqlite:///file.db``): a database, for workers on many machines.

``n_trials`` is the study's total, not a per-process count. Each worker takes the storage's
*ask lock*, counts the study's trials, and asks for a new trial only while the count is below the
total; the lock is held until the new trial is stored, so two workers can never both take the
last slot (Optuna's ``MaxTrialsCallback`` counts after a trial, so concurrent workers can
overshoot the total). The lock is a ``flock`` on a file next to the journal (or the sqlite
database), a PostgreSQL advisory lock for PostgreSQL; both are released by the operating system
or the server when a worker dies.

Database storages record **heartbeats** of running trials (``heartbeat_interval`` seconds,
stale after ``grace_period``); a stale trial is failed and retried with its parameters
(recovery.py). Optuna 5's journal storage has no heartbeat: on a journal file (one machine) a
dead worker's trial is found through its worker's process instead.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager

from .recovery import RetryDeadTrial

log = logging.getLogger("asib.sweep")

JOURNAL_NAME = "optuna/journal.log"


def default_journal_path() -> Path:
    root = Path(os.environ.get("ASIB_ARTIFACT_ROOT") or "mlruns")
    return root / JOURNAL_NAME


@dataclass
class StudyStorage:
    storage: object                       # an optuna storage
    kind: str                             # "journal" or "rdb"
    description: str                      # printable (password hidden)
    ask_lock: Callable[[str], ContextManager]
    on_dead: RetryDeadTrial               # what becomes of a trial whose worker died
    locked: bool = True                   # ask_lock is a real cross-process lock
    heartbeat: int | None = None          # seconds between heartbeats (database storages)


def is_url(spec: str) -> bool:
    return "://" in spec


def redact(url: str) -> str:
    """A database URL with its password hidden (for logs and run tags)."""
    try:
        from sqlalchemy.engine import make_url
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL sqlalchemy understands: hide everything after '//'
        return url.split("://", 1)[0] + "://***"


DEFAULT_HEARTBEAT = 60           # seconds between two heartbeats of a running trial
DEFAULT_MAX_RETRY = 2            # a trial whose worker died is run at most 1 + 2 times


def grace_for(heartbeat: int) -> int:
    """A trial is stale after three missed heartbeats (Optuna's own default: two)."""
    return 3 * int(heartbeat)


def open_storage(spec: str | None, heartbeat: int = DEFAULT_HEARTBEAT,
                 max_retry: int | None = DEFAULT_MAX_RETRY) -> StudyStorage:
    """The study storage named by ``spec`` ("" = the default journal file, a path, or a URL)."""
    from asib_core.config.errors import ConfigError

    if int(heartbeat) < 1:
        raise ConfigError(f"heartbeat must be at least 1 second, got {heartbeat}.")
    if max_retry is not None and int(max_retry) < 0:
        raise ConfigError(f"max_retry must be 0 or more, got {max_retry}.")
    on_dead = RetryDeadTrial(max_retry)
    spec = (spec or "").strip()
    if spec and is_url(spec):
        return _rdb_storage(spec, on_dead, int(heartbeat))
    path = Path(spec) if spec else default_journal_path()
    return _journal_storage(path, on_dead)


def _journal_storage(path: Path, on_dead: RetryDeadTrial) -> StudyStorage:
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    path = path.resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    storage = JournalStorage(JournalFileBackend(str(path)))
    lock_file = path.with_name(path.name + ".asklock")
    return StudyStorage(storage, "journal", f"journal file {path}", lambda study: _flock(lock_file), on_dead)


def _rdb_storage(url: str, on_dead: RetryDeadTrial, heartbeat: int) -> StudyStorage:
    from optuna.storages import RDBStorage

    from asib_core.config.errors import ConfigError

    try:
        with _creation_lock(url):
            storage = RDBStorage(url, heartbeat_interval=heartbeat, grace_period=grace_for(heartbeat),
                                 heartbeat_stale_trial_callback=on_dead)
    except ImportError as exc:
        raise ConfigError(f"storage {redact(url)} needs a database driver that is not installed ({exc}). "
                          "For PostgreSQL: pip install psycopg2-binary (in the project's dev extra).") from None
    except Exception as exc:  # noqa: BLE001 - unreachable server, bad URL: a user error
        raise ConfigError(f"cannot open the Optuna storage {redact(url)}: {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    dialect = storage.engine.dialect.name
    locked = True
    if dialect == "postgresql":
        def lock(study):
            return _pg_advisory_lock(storage.engine, study)
    elif dialect == "sqlite" and storage.engine.url.database:
        lock_file = Path(storage.engine.url.database + ".asklock").resolve()

        def lock(study):
            return _flock(lock_file)
    else:
        log.warning("storage %s (%s): no cross-process ask lock; with several workers the study can get up "
                    "to one trial per extra worker more than n_trials", redact(url), dialect)

        locked = False

        def lock(study):
            return contextlib.nullcontext()
    return StudyStorage(storage, "rdb", f"database {redact(url)}", lock, on_dead, locked, heartbeat)


@contextlib.contextmanager
def _creation_lock(url: str):
    """PostgreSQL: one worker at a time creates Optuna's tables (concurrent CREATE TABLE collide)."""
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url

    if make_url(url).get_backend_name() != "postgresql":
        yield
        return
    engine = create_engine(url)
    try:
        with _pg_advisory_lock(engine, "\0tables"):
            yield
    finally:
        engine.dispose()


@contextlib.contextmanager
def _flock(path: Path):
    try:
        import fcntl
    except ImportError:  # not POSIX: one worker per study is safe, several may overshoot by one
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def advisory_key(study_name: str) -> int:
    digest = hashlib.sha256(f"asib-sweep:{study_name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


@contextlib.contextmanager
def _pg_advisory_lock(engine, study_name: str):
    from sqlalchemy import text

    key = advisory_key(study_name)
    with engine.connect() as conn:
        conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": key})
        conn.commit()
        try:
            yield
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
            conn.commit()
