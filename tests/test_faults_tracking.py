"""Issue 14, items 2, 4 and 6: the tracking store under kills and concurrency, and a tracking
server that does not answer (real sqlite stores, real subprocesses, real sockets)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading

import pytest
from mlflow.tracking import MlflowClient

from asib_core.errors import TrackingUnavailable
from asib_core.tracking import configure_tracking
from asib_core.tracking.store import check_server, store_state
from pipeline_helpers import all_runs, env_for

OPEN_ONE_RUN = textwrap.dedent("""
    import sys
    from asib_core.tracking import configure_tracking, open_run
    configure_tracking()
    with open_run(experiment="first-use", run_name=sys.argv[1], tags={"step": "probe"}) as run:
        run.log_metrics({"x": float(sys.argv[1])}, step=0)
""")


def _python(args: list[str], workdir, **env_extra) -> subprocess.Popen:
    env = {**env_for(workdir), **env_extra}
    return subprocess.Popen([sys.executable, *args], cwd=workdir, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_concurrent_first_use_of_a_fresh_sqlite_store_does_not_crash(tmp_path):
    procs = [_python(["-c", OPEN_ONE_RUN, str(i)], tmp_path) for i in range(3)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-2000:] for _, err in outs]
    runs = all_runs(tmp_path)
    assert sorted(r.data.metrics["x"] for r in runs) == [0.0, 1.0, 2.0]
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert len(MlflowClient().search_experiments()) == 2          # Default and first-use, once each
    assert not list(tmp_path.glob(".mlflow.db.init-*"))


def test_a_kill_while_the_store_is_created_leaves_nothing_a_later_command_trips_on(tmp_path):
    killed = _python(["-c", OPEN_ONE_RUN, "1"], tmp_path, ASIB_FAULT_AT="store.create")
    killed.communicate(timeout=600)
    assert killed.returncode == -9
    assert not (tmp_path / "mlflow.db").exists()                  # nothing half-built under the real name
    assert len(list(tmp_path.glob(".mlflow.db.init-*"))) == 1
    again = _python(["-c", OPEN_ONE_RUN, "2"], tmp_path)
    _, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-2000:]
    assert [r.data.metrics["x"] for r in all_runs(tmp_path)] == [2.0]
    assert not list(tmp_path.glob(".mlflow.db.init-*"))


def _half_created_store(path) -> None:
    """What a kill in the middle of MLflow's own table creation leaves: the initial tables and
    the schema migrations up to some revision, no runs."""
    import sqlalchemy
    from alembic import command
    from alembic.script import ScriptDirectory
    from mlflow.store.tracking.dbmodels.initial_models import Base as InitialBase
    from mlflow.store.db.utils import _get_alembic_config

    uri = f"sqlite:///{path}"
    engine = sqlalchemy.create_engine(uri)
    InitialBase.metadata.create_all(engine)
    config = _get_alembic_config(uri)
    revisions = list(ScriptDirectory.from_config(config).walk_revisions())   # head first
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revisions[len(revisions) // 2].revision)
    engine.dispose()


def test_a_store_left_half_created_by_an_older_kill_is_moved_aside_and_created_again(workdir, caplog):
    path = workdir / "mlflow.db"
    _half_created_store(path)
    assert store_state(path) == "interrupted"
    with caplog.at_level("WARNING"):
        configure_tracking()
    assert "left half-created by an interrupted command" in caplog.text
    assert store_state(path) == "complete"
    assert len(list(workdir.glob("mlflow.db.interrupted-*"))) == 1
    client = MlflowClient()
    run = client.create_run(client.create_experiment("after-repair"))
    client.set_terminated(run.info.run_id)


@pytest.mark.parametrize("module,args", [
    ("pipelines.distill", ["exp=quickstart"]),
    ("pipelines.main", ["exp=quickstart"]),     # every other entry point goes through the same probe
])
def test_a_dead_tracking_server_fails_fast_with_one_sentence_naming_it(tmp_path, module, args):
    env = env_for(tmp_path)
    env["MLFLOW_TRACKING_URI"] = "http://127.0.0.1:9"
    out = subprocess.run([sys.executable, "-m", module, *args], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    message = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(message) == 1 and "http://127.0.0.1:9" in message[0] and "does not answer" in message[0]
    assert "connection refused" in message[0]


def test_a_server_that_accepts_but_never_answers_times_out(monkeypatch):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    held = []
    stop = threading.Event()

    def accept_and_hold():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept_and_hold, daemon=True)
    thread.start()
    monkeypatch.setenv("ASIB_TRACKING_TIMEOUT", "1.5")
    uri = f"http://127.0.0.1:{listener.getsockname()[1]}"
    try:
        with pytest.raises(TrackingUnavailable) as err:
            check_server(uri)
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        listener.close()
    assert uri in str(err.value) and "timed out" in str(err.value) and "ASIB_TRACKING_TIMEOUT=1.5" in str(err.value)


def test_a_live_server_passes_the_check(tmp_path, monkeypatch):
    """A real `mlflow server` on a free port answers /health."""
    port_probe = socket.socket()
    port_probe.bind(("127.0.0.1", 0))
    port = port_probe.getsockname()[1]
    port_probe.close()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                               "--workers", "1"], cwd=tmp_path, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env=env_for(tmp_path), start_new_session=True)
    monkeypatch.setenv("ASIB_TRACKING_TIMEOUT", "2")
    try:
        uri = f"http://127.0.0.1:{port}"
        for _ in range(150):                       # the server starts (imports, migrations)
            try:
                check_server(uri)
                break
            except TrackingUnavailable:
                if server.poll() is not None:
                    pytest.fail("mlflow server exited")
        else:
            pytest.fail("mlflow server never answered")
    finally:
        os.killpg(server.pid, signal.SIGKILL)    # the CLI and the web server it started
        server.wait()
