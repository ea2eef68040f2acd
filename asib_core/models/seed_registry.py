"""The seed's model registry files, ``configs/registry_key.yaml`` and ``configs/registry_map.yaml``.

``registry_key.yaml`` lists the seed's student and teacher keys; ``registry_map.yaml`` maps each key to
the seed's factory function. In asib-kd a key is a model config (``configs/model/<role>/<key>.yaml``,
chosen with ``student=KEY`` / ``teacher1=KEY``) whose ``name`` is a model of
:mod:`asib_core.models.registry`. :func:`seed_registry_problems` checks that the two files list the
same keys and that every key is such a config of a registered model (``pipelines.docs`` refuses
to write the docs otherwise; tests/test_models.py runs it)."""
from __future__ import annotations

from omegaconf import OmegaConf

from asib_core.config.compose import config_dir

ROLES = {"student": ("student_keys", "students"), "teacher": ("teacher_keys", "teachers")}


def _load(name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(config_dir() / name), resolve=False) or {}


def seed_registry() -> dict[str, dict[str, str]]:
    """``{"student": {key: registered model name}, "teacher": {...}}`` from the two files."""
    problems = seed_registry_problems()
    if problems:
        raise ValueError("; ".join(problems))
    keys = _load("registry_key.yaml")
    return {role: {key: _model_name(role, key) for key in keys[list_key]} for role, (list_key, _) in ROLES.items()}


def _model_name(role: str, key: str) -> str | None:
    path = config_dir() / "model" / role / f"{key}.yaml"
    if not path.is_file():
        return None
    return (OmegaConf.to_container(OmegaConf.load(path)) or {}).get("name")


def seed_registry_problems() -> list[str]:
    from asib_core.models.registry import list_models

    keys, mapping = _load("registry_key.yaml"), _load("registry_map.yaml")
    known = set(list_models())
    problems = []
    for role, (list_key, map_key) in ROLES.items():
        listed, mapped = list(keys.get(list_key) or []), dict(mapping.get(map_key) or {})
        if set(listed) != set(mapped):
            problems.append(f"registry_key.yaml {list_key} {sorted(listed)} and registry_map.yaml {map_key} "
                            f"{sorted(mapped)} list different keys")
        for key in listed:
            name = _model_name(role, key)
            if name is None:
                problems.append(f"{role} key {key}: no configs/model/{role}/{key}.yaml with a name")
            elif name not in known:
                problems.append(f"{role} key {key}: configs/model/{role}/{key}.yaml names {name!r}, "
                                "which is not a registered model")
    return problems
