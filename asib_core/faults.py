"""Deterministic kill points for the fault-injection tests (a no-op unless ``ASIB_FAULT_AT`` is set).

``ASIB_FAULT_AT="<point>"`` or ``"<point>#<n>"`` makes the n-th call (default: the first) of
``fault_point("<point>")`` in a process SIGKILL that process: no ``finally`` block, no atexit
handler, no flush runs - exactly what a power cut, the OOM killer or ``kill -9`` leaves behind.
With ``ASIB_FAULT_GROUP=1`` the whole process group is killed (``main`` and the steps it
launched, as a scheduler that kills a job does). ``ASIB_FAULT_SIGNAL=INT`` (or ``TERM``) sends
that signal to the process instead, a Ctrl-C or a scheduler's stop at an exact moment. Child
processes inherit the variables, so a point reached only in a child (``epoch.batch`` under
``main``) fires there.

The points, in the order a run reaches them:

=====================  ====================================================================
``store.create``       a new sqlite store's tables are built, not yet published
``run.created``        the MLflow run exists (created or resumed), nothing else done yet
``checkpoint.write``   a checkpoint file is written to its temporary name, not yet renamed
``checkpoint.saved``   ``last.pt`` was replaced (once per checkpoint of the training state)
``epoch.batch``        a training batch of a student epoch was computed (counted over the run)
``aux.epoch``          an auxiliary epoch (pre-training, ASIB's A-step) ended and was logged
``final.eval``         training is over, the final test metrics are being computed
=====================  ====================================================================
"""
from __future__ import annotations

import os
import signal

FAULT_ENV = "ASIB_FAULT_AT"
GROUP_ENV = "ASIB_FAULT_GROUP"
SIGNAL_ENV = "ASIB_FAULT_SIGNAL"
POINTS = ("store.create", "run.created", "checkpoint.write", "checkpoint.saved", "epoch.batch",
          "aux.epoch", "final.eval")
_calls: dict[str, int] = {}


def fault_point(name: str) -> None:
    """SIGKILL this process (or its group; or send ``$ASIB_FAULT_SIGNAL``) if ``ASIB_FAULT_AT``
    names this call."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    point, _, nth = spec.partition("#")
    if point != name:
        return
    _calls[name] = _calls.get(name, 0) + 1
    if _calls[name] != int(nth or 1):
        return
    sig = getattr(signal, "SIG" + os.environ.get(SIGNAL_ENV, "KILL").upper())
    if os.environ.get(GROUP_ENV) == "1":
        os.killpg(os.getpgrp(), sig)
    os.kill(os.getpid(), sig)


def calls_fault_point(fn, name: str):
    """``fn`` followed by ``fault_point(name)`` at every call (``fn`` itself when no fault is armed)."""
    if not os.environ.get(FAULT_ENV, "").startswith(name):
        return fn

    def wrapped(*args, **kwargs):
        out = fn(*args, **kwargs)
        fault_point(name)
        return out
    return wrapped
