"""Shared command-line plumbing for the thin entry points."""
from __future__ import annotations

import contextlib
import errno
import math
import shlex
import sys

USER_ERROR_EXIT = 2
INTERRUPTED_EXIT = 130      # the shell's code for a process ended by SIGINT
INTERRUPTED = ("any run this command had open was ended KILLED, not left RUNNING. Run the same command "
               "again to go on: a step with a checkpoint resumes from it.")


def parse_exp_args(argv: list[str], default_exp: str | None = None) -> tuple[str, list[str]]:
    """``exp=NAME`` plus Hydra overrides; an ``overrides="a=1 b=2"`` item is split."""
    from asib_core.config import ConfigError

    exp = default_exp
    overrides: list[str] = []
    for item in argv:
        if item.startswith("exp="):
            exp = item.split("=", 1)[1]
        elif item.startswith("overrides="):
            overrides.extend(shlex.split(item.split("=", 1)[1]))
        elif item:
            overrides.append(item)
    if not exp:
        from asib_core.config import list_experiments
        raise ConfigError(
            "no experiment given: pass exp=NAME, one of " + ", ".join(list_experiments()) + "."
        )
    return exp, overrides


HELP_FLAGS = ("--help", "-h", "help")


def exit_on_help(argv: list[str], doc: str | None, entry_point: str) -> None:
    """With ``--help`` (or ``-h``) anywhere in argv: print the entry point's usage (its module
    docstring) and its MLproject parameters, then exit 0, before anything else happens."""
    if not any(item in HELP_FLAGS for item in argv):
        return
    print("usage:\n" + (doc or "").strip("\n"))
    params = mlproject_parameters(entry_point)
    if params:
        print(f"\nparameters (as NAME=VALUE; `mlflow run . -e {entry_point} -P NAME=VALUE`):")
        for name, spec in params.items():
            default = spec.get("default", "(required)") if isinstance(spec, dict) else "(required)"
            print(f"  {name:<20} default: {default!r}" if default != "(required)" else f"  {name:<20} (required)")
    raise SystemExit(0)


def mlproject_parameters(entry_point: str) -> dict:
    """The parameters the MLproject file declares for ``entry_point`` ({} without the file)."""
    from pathlib import Path

    import yaml

    path = Path(__file__).resolve().parents[1] / "MLproject"
    if not path.is_file():
        return {}
    spec = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return dict((spec.get("entry_points", {}).get(entry_point) or {}).get("parameters") or {})


def enter_workdir() -> None:
    """``mlflow run`` starts entry points in the project directory; a chained step runs in
    the directory its ``main`` was started from (``$ASIB_WORKDIR``), where relative paths
    (data, checkpoints, the default tracking store) belong."""
    import os

    workdir = os.environ.get("ASIB_WORKDIR")
    if workdir:
        os.chdir(workdir)


def pop_option(argv: list[str], name: str, default: str) -> str:
    """Remove ``name=VALUE`` from argv and return VALUE (or the default)."""
    for i, item in enumerate(argv):
        if item.startswith(f"{name}="):
            del argv[i]
            return item.split("=", 1)[1] or default
    return default


# Command-line parameters that are not config keys: (smallest value, what the number is).
# MLflow passes the MLproject's float parameters as e.g. "2.0", so whole floats are accepted.
COUNT_OPTIONS = {
    "nproc": (1, "the number of training processes on this machine"),
    "n_trials": (1, "the number of trials the study should hold in total"),
    "sampler_seed": (0, "the seed of the Optuna sampler"),
    "worker": (0, "this sweep worker's index (0, 1, ...)"),
    "heartbeat": (1, "the seconds between a sweep trial's heartbeats on a database storage"),
    "max_retry": (0, "how often a dead worker's trial is retried"),
}
ENV_MANAGERS = ("local", "virtualenv", "uv", "conda")


def whole_number(name: str, text: str) -> int:
    """``text`` as the whole number of the command-line parameter ``name`` (see COUNT_OPTIONS)."""
    from asib_core.config import ConfigError

    minimum, meaning = COUNT_OPTIONS[name]
    try:
        value = float(text)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value) or value != int(value) or value < minimum:
        raise ConfigError(
            f"{name}={text!r} is not allowed: {name} is {meaning}, a whole number >= {minimum} "
            f"(for example {name}={max(minimum, 1) + 1})."
        )
    return int(value)


def count_option(argv: list[str], name: str, default: int) -> int:
    """Remove ``name=N`` from argv and return N, refusing anything but a whole number in range."""
    return whole_number(name, pop_option(argv, name, str(default)))


def choice_option(argv: list[str], name: str, default: str, choices: tuple[str, ...]) -> str:
    """Remove ``name=VALUE`` from argv and return VALUE, refusing a value not in ``choices``."""
    from asib_core.config import ConfigError

    value = pop_option(argv, name, default)
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not allowed: use one of {', '.join(choices)}.")
    return value


def relaunch_distributed(argv: list[str], module: str) -> None:
    """With ``nproc=N`` (N > 1) outside torchrun, re-exec this module under torchrun."""
    import os
    import sys

    nproc = count_option(argv, "nproc", 1)
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        # torchrun of this interpreter (a `torchrun` on PATH may belong to another environment)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", module, *argv]
        os.execv(cmd[0], cmd)


@contextlib.contextmanager
def user_errors(interrupted: str = INTERRUPTED):
    """Turn user errors (bad config, missing data/checkpoint) into exit code 2, and Ctrl-C or
    SIGTERM into one paragraph (``interrupted``: what became of the command's work) and exit 130;
    neither prints a traceback. The runs were already ended KILLED on the way out (``open_run``)."""
    import signal

    from asib_core.config.errors import ConfigError, ConfigLockError

    def _terminate(signum, frame):  # `kill` / a scheduler's stop: end the run KILLED, not RUNNING
        raise KeyboardInterrupt(f"terminated by signal {signum}")

    signal.signal(signal.SIGTERM, _terminate)
    enter_workdir()
    try:
        yield
    except KeyboardInterrupt as exc:
        print(f"interrupted ({exc or 'Ctrl-C'}): {interrupted}", file=sys.stderr)
        raise SystemExit(INTERRUPTED_EXIT) from None
    except (ConfigError, ConfigLockError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(USER_ERROR_EXIT) from None
    except Exception as exc:
        from asib_core.errors import user_error_types
        if isinstance(exc, user_error_types()):
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(USER_ERROR_EXIT) from None
        problem = unwritable(exc)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            raise SystemExit(USER_ERROR_EXIT) from None
        raise


# errno values that say "this place cannot be written" (permissions, read-only file system, a file
# where a folder is needed, a full disk) rather than "the program is wrong"
_UNWRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST, errno.EISDIR,
               errno.ENOSPC, errno.EDQUOT}
def unwritable(exc: BaseException) -> str | None:
    """The sentence for a file or folder the command cannot write (None: another error). The
    tracking store and the run's folders are checked before a run is created
    (``check_writable_store``, ``check_writable_dir``); this catches the other places. A run that
    was open when it happened has already been ended FAILED by ``open_run``."""
    if isinstance(exc, OSError) and exc.errno in _UNWRITABLE and exc.filename:
        return (f"cannot write {exc.filename}: {exc.strerror}. A place this command writes to (the "
                "tracking store of MLFLOW_TRACKING_URI, checkpoint_dir, results_dir, finetune_ckpt_path, "
                "a report's out folder) is read-only, full, or a file stands where a folder is needed; "
                "make it writable or point the setting at a writable folder.")
    return None
