"""Errors raised while composing, finalising or locking a configuration.

Every error here is a user error: the message is one paragraph that names the
problem and the fix, and command-line entry points turn it into exit code 2.
"""


class ConfigError(ValueError):
    """A configuration that cannot be run as given (unknown experiment, bad value, ...)."""


class ConfigLockError(RuntimeError):
    """The effective configuration changed after it was locked."""

    def __init__(self, stage: str, locked_hash: str, live_hash: str, changes: list):
        self.stage = stage
        self.locked_hash = locked_hash
        self.live_hash = live_hash
        self.changes = changes
        lines = [f"  {key}: {old!r} -> {new!r}" for key, old, new in changes]
        super().__init__(
            f"config lock violated at '{stage}': the effective config hash changed from "
            f"{locked_hash[:12]} to {live_hash[:12]} after it was locked. Changed keys "
            f"(locked -> now):\n" + "\n".join(lines) + "\nA locked config must not be "
            "mutated during a run; set the value before the run starts (as an override)."
        )
