"""Helpers of the sweep tests (and of benchmarks/sweep_kill_retry.py): a throwaway PostgreSQL
server, sweep worker processes, and waiting on what a worker has written to the stores."""
from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
from mlflow.tracking import MlflowClient

from tests.pipeline_helpers import default_ctrl_c, env_for


class NoPostgres(RuntimeError):
    """The PostgreSQL server binaries are not installed."""


def _pg_binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    return candidates[-1] if candidates else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def throwaway_postgres():
    """A PostgreSQL server on 127.0.0.1 in a temporary folder (Debian's packages; .ci/run
    installs them); yields its SQLAlchemy URL. Root runs the server as the `postgres` user."""
    initdb, pg_ctl = _pg_binary("initdb"), _pg_binary("pg_ctl")
    if not (initdb and pg_ctl):
        raise NoPostgres("PostgreSQL server binaries (initdb, pg_ctl) not found; install them with "
                         "`apt-get install -y postgresql` (.ci/run does)")
    base = Path(tempfile.mkdtemp(prefix="asib-pg-"))
    prefix: list | None = []
    if os.geteuid() == 0:  # the server refuses to run as root
        user = pwd.getpwnam("postgres")
        os.chown(base, user.pw_uid, user.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"] if shutil.which("runuser") else None
    port = free_port()

    def run(args: list) -> None:
        cmd = prefix + args if prefix is not None else ["su", "postgres", "-s", "/bin/sh", "-c",
                                                        shlex.join(map(str, args))]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{args[0]} failed: {done.stdout}\n{done.stderr}")

    data = base / "data"
    run([initdb, "-D", str(data), "-U", "asib", "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync"])
    run([pg_ctl, "-D", str(data), "-l", str(base / "server.log"), "-w", "-t", "60",
         "-o", f"-h 127.0.0.1 -p {port} -k {base} -F", "start"])
    try:
        yield f"postgresql+psycopg2://asib@127.0.0.1:{port}/postgres"
    finally:
        run([pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"])
        shutil.rmtree(base, ignore_errors=True)


def start_worker(home: Path, args: list[str], worker: int = 0, env: dict | None = None) -> subprocess.Popen:
    """``python -m pipelines.sweep ARGS worker=N`` in ``home`` (its own tracking store), one thread."""
    env = env_for(home) | {"OMP_NUM_THREADS": "1"} | (env or {})
    return subprocess.Popen([sys.executable, "-m", "pipelines.sweep", *args, f"worker={worker}"], cwd=home,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=default_ctrl_c)


def runs_of(study_name: str):
    """Every MLflow run (parents and trials) of a study, in the current tracking store."""
    client = MlflowClient()
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(ids, f"tags.`optuna.study_name` = '{study_name}'", max_results=1000) if ids else []


def trial_runs_of(study_name: str):
    return [r for r in runs_of(study_name) if r.data.tags.get("step") != "sweep"]


def study_trials(study_name: str, storage) -> list:
    """The study's trials, [] while it does not exist yet."""
    try:
        return optuna.load_study(study_name=study_name, storage=storage).get_trials()
    except KeyError:
        return []


def wait_for(condition, proc: subprocess.Popen | None = None, poll: float = 0.05, limit: float = 600.0) -> bool:
    """Poll ``condition()`` until it holds (True) or ``proc`` exits (False). Store reads that
    collide with the worker's writes are retried at the next poll."""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            return False
        with contextlib.suppress(Exception):
            if condition():
                return True
        time.sleep(poll)
    raise TimeoutError("the condition never held")


def trial_run_with_epoch(study_name: str, exclude: set = frozenset()) -> str | None:
    """A RUNNING trial run of the study that has logged a validation accuracy."""
    for run in trial_runs_of(study_name):
        if run.info.status == "RUNNING" and "val/acc" in run.data.metrics and run.info.run_id not in exclude:
            return run.info.run_id
    return None
