"""Which process owns a RUNNING run, and closing the runs whose process is gone.

Every run this project opens carries the tag ``asib.owner`` = ``<host>:<pid>:<start>`` of the
process that runs it (``<start>``: the process start time from ``/proc``, so a recycled pid
is not mistaken for the owner). A process killed by SIGKILL, the OOM killer or a power cut
cannot end its run; the next command that opens a run on the same host closes every RUNNING
run whose owner process no longer exists as KILLED, with the tag ``asib.orphan`` saying why
(:func:`close_orphans`). Runs of other hosts, and runs without the tag (made by other tools),
are never touched. A later command that resumes such a run takes it over (RUNNING again, its
own owner tag, ``asib.orphan`` removed).
"""
from __future__ import annotations

import logging
import os
import socket

from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

OWNER_TAG = "asib.owner"
ORPHAN_TAG = "asib.orphan"
#: epoch milliseconds of the run's last metric points (runs.RunHandle.log_metrics): where a run
#: killed outright stopped working, so its downtime is not counted as run time
ACTIVE_TAG = "asib.last_active_ms"


def _proc_stat(pid: int) -> list[str]:
    """The fields of /proc/<pid>/stat after the command name (state first); [] without /proc."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as fh:
            return fh.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def _start_time(pid: int) -> str:
    """Start time of a process in clock ticks since boot ('' where /proc is not available)."""
    fields = _proc_stat(pid)
    return fields[19] if len(fields) > 19 else ""


def owner_id(pid: int | None = None) -> str:
    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()}:{pid}:{_start_time(pid)}"


def owner_alive(owner: str) -> bool | None:
    """True/False for an owner on this host; None when it cannot be told (other host, bad tag)."""
    try:
        host, pid_text, start = owner.rsplit(":", 2)
        pid = int(pid_text)
    except ValueError:
        return None
    if host != socket.gethostname():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    fields = _proc_stat(pid)
    if not fields:
        return True                       # no /proc: the pid exists, that is all one can tell
    return fields[0] != "Z" and (not start or fields[19] == start)   # a zombie has ended


def close_orphan(run_id: str, reason: str) -> None:
    """End the run KILLED at its last sign of work (its ``ACTIVE_TAG``; now if it has none)."""
    client = MlflowClient()
    client.set_tag(run_id, ORPHAN_TAG, reason[:5000])
    last = client.get_run(run_id).data.tags.get(ACTIVE_TAG, "")
    client.set_terminated(run_id, "KILLED", end_time=int(last) if last.isdigit() else None)
    name = client.get_run(run_id).info.run_name
    log.warning("closed run %s (%s) as KILLED: %s", run_id, name, reason)


def close_orphans() -> list[str]:
    """Close every RUNNING run of this host whose owner process is gone; return their ids."""
    client = MlflowClient()
    experiment_ids = [e.experiment_id for e in client.search_experiments()]
    if not experiment_ids:
        return []
    host = socket.gethostname()
    flt = f"attributes.status = 'RUNNING' and tags.`{OWNER_TAG}` LIKE '{host}:%'"
    closed = []
    for run in client.search_runs(experiment_ids, flt, max_results=1000):
        owner = run.data.tags.get(OWNER_TAG, "")
        if owner_alive(owner) is not False:
            continue
        latest = client.get_run(run.info.run_id)   # taken over meanwhile by a resuming command?
        if latest.info.status != "RUNNING" or latest.data.tags.get(OWNER_TAG) != owner:
            continue
        pid = owner.rsplit(":", 2)[1]
        close_orphan(run.info.run_id, f"the process that ran it (pid {pid} on {host}) ended without "
                                      "closing it (killed)")
        closed.append(run.info.run_id)
    return closed
