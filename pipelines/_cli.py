"""Shared command-line plumbing for the thin entry points."""
from __future__ import annotations

import contextlib
import shlex
import sys

USER_ERROR_EXIT = 2


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


def relaunch_distributed(argv: list[str], module: str) -> None:
    """With ``nproc=N`` (N > 1) outside torchrun, re-exec this module under torchrun."""
    import os

    nproc = int(float(pop_option(argv, "nproc", "1")))
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        cmd = ["torchrun", "--standalone", f"--nproc_per_node={nproc}", "-m", module, *argv]
        os.execvp(cmd[0], cmd)


@contextlib.contextmanager
def user_errors():
    """Turn user errors (bad config, missing data/checkpoint) into exit code 2."""
    import signal

    from asib_core.config.errors import ConfigError, ConfigLockError

    def _terminate(signum, frame):  # `kill` / a scheduler's stop: end the run KILLED, not RUNNING
        raise KeyboardInterrupt(f"terminated by signal {signum}")

    signal.signal(signal.SIGTERM, _terminate)
    enter_workdir()
    try:
        yield
    except (ConfigError, ConfigLockError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(USER_ERROR_EXIT) from None
    except Exception as exc:
        from asib_core.errors import user_error_types
        if isinstance(exc, user_error_types()):
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(USER_ERROR_EXIT) from None
        raise
