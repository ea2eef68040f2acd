"""Print the finalised effective config of an experiment and its lock hash.

    python -m pipelines.config exp=L1_ib [overrides...]

Prints one JSON object: {"exp": ..., "config_sha256": ..., "config": {...}}.
Exit code 2 with a one-paragraph message for an unknown experiment, a malformed
override or a value of the wrong type.
"""
from __future__ import annotations

import json
import sys

from pipelines._cli import exit_on_help, parse_exp_args, user_errors


def main(argv: list[str] | None = None) -> int:
    from asib_core.config import resolve_experiment

    argv = list(sys.argv[1:] if argv is None else argv)
    exit_on_help(argv, __doc__, "config")
    with user_errors():
        exp, overrides = parse_exp_args(argv)
        resolved = resolve_experiment(exp, overrides, for_run=False)
        for note in resolved.notes:
            print(f"note: {note}", file=sys.stderr)
        print(json.dumps({"exp": exp, "config_sha256": resolved.sha256, "config": resolved.cfg},
                         indent=2, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
