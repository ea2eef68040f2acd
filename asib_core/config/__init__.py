"""Configuration: compose (Hydra) -> effective -> finalize -> lock."""
from .compose import compose_experiment, compose_finetune, config_dir, list_experiments, list_finetune_recipes
from .effective import build_effective, get_dotted, set_dotted
from .errors import ConfigError, ConfigLockError
from .finalize import finalize_config, finalize_with_runtime
from .lock import ConfigLock, config_hash, flatten, identity_hash, sanitize
from .resolve import resolve_experiment, ResolvedConfig

__all__ = [
    "ConfigError", "ConfigLock", "ConfigLockError", "ResolvedConfig", "build_effective",
    "compose_experiment", "compose_finetune", "config_dir", "config_hash", "finalize_config",
    "finalize_with_runtime", "flatten", "get_dotted", "identity_hash", "list_experiments",
    "list_finetune_recipes", "resolve_experiment", "sanitize", "set_dotted",
]
