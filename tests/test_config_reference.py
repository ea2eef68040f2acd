"""The one rule for config keys (decisions.md): every key of every seed config is documented.

1. Every leaf key of every composed seed experiment (plus every method file, every method
   preset, every paper recipe and the fair-baseline anchor) and of every fine-tune recipe is in the key reference
   (asib_core/config/keys.yaml), in its section, and its value has the documented type.
2. docs/configuration.md is the current rendering of keys.yaml.
3. ``check_against_reference`` refuses unknown keys (with a close match), wrong types and
   planned keys set to non-inert values, each time naming the key.

Seed experiments whose ASIB keys are switched on are refused by ``check_against_reference``
today (their keys are ``planned``); that is expected and not asserted here.
"""
from __future__ import annotations

import re

import pytest

from asib_core.config import (
    ConfigError, ConfigLock, build_effective, compose_finetune, config_dir, finalize_config,
    list_experiments, list_finetune_recipes,
)
from asib_core.config.compose import to_container
from asib_core.config.reference import (
    STATUSES, check_against_reference, find_spec, is_inert, leaf_items, load_reference,
)
from asib_core.config.validate import domain_problems, rule_problems
from pipelines import docs

TYPE_TOKENS = {"float", "int", "bool", "str", "list", "dict", "any", "null"}


def _names(group: str) -> list[str]:
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


def _run_cases() -> list[tuple[str, tuple[str, ...]]]:
    cases = [(exp, ()) for exp in list_experiments()]
    cases += [("sota_generic", (f"method={m}",)) for m in _names("experiment/method")]
    cases += [("sota_generic", (f"method_preset={m}",)) for m in _names("method")]
    cases += [("L0_baseline", ("anchor=fair_baseline",))]
    cases += [("sota_generic", (f"recipe={r}",)) for r in _names("recipe") if not r.startswith("_")]
    return cases


RUN_CASES = _run_cases()
FINETUNE_RECIPES = list_finetune_recipes()


@pytest.fixture(scope="module")
def sections():
    return docs.section_specs()


def _problems(cfg: dict, specs: dict, section: str) -> list[str]:
    """Keys missing from the reference, wrong types, and (issue 14) values outside their domain
    or breaking a cross-key rule: every seed config must pass the validator."""
    problems = []
    for key, value in leaf_items(cfg):
        spec = find_spec(key, specs)
        if spec is None:
            problems.append(f"{key}={value!r}: not in the reference")
        elif not spec.accepts(value):
            problems.append(f"{key}={value!r}: not a {spec.type}")
    return problems + domain_problems(cfg, section) + rule_problems(cfg, section)


# Seed values the validator refuses on purpose (the key's meaning documents the refusal).
KNOWN_REFUSALS = {"convnext_l_imagenet32": ["restart_multiplier=0.8"]}


# --------------------------------------------------------------------------- 1. coverage

def test_seed_cases_exist():
    assert RUN_CASES and FINETUNE_RECIPES
    assert {"L0_baseline", "sota_generic"} <= set(list_experiments())


@pytest.mark.parametrize(
    "exp,overrides", RUN_CASES, ids=[" ".join((e,) + o) for e, o in RUN_CASES]
)
def test_every_run_key_is_documented_with_its_type(exp, overrides, sections):
    cfg = finalize_config(build_effective(exp, list(overrides)))
    cfg["config_sha256"] = ConfigLock(cfg).sha256
    problems = _problems(cfg, sections["run"], "run")
    assert not problems, f"{exp} {overrides}: " + "; ".join(problems)


@pytest.mark.parametrize("recipe", FINETUNE_RECIPES)
def test_every_finetune_key_is_documented_with_its_type(recipe, sections):
    cfg = to_container(compose_finetune(recipe))
    problems = [p for p in _problems(cfg, sections["finetune"], "finetune")
                if not p.startswith(tuple(KNOWN_REFUSALS.get(recipe, ())))]
    assert not problems, f"finetune {recipe}: " + "; ".join(problems)


def test_reference_entries_are_well_formed(sections):
    assert set(sections) == {"run", "finetune"}
    for section, specs in sections.items():
        for key, spec in specs.items():
            where = f"{section}.{key}"
            assert spec.status in STATUSES, where
            assert spec.meaning and spec.meaning[-1] in ".)`", f"{where}: meaning missing/unfinished"
            tokens = {t.strip() for t in spec.type.split("|")}
            assert tokens <= TYPE_TOKENS, f"{where}: bad type {spec.type!r}"
            assert isinstance(spec.issue, int) and 2 <= spec.issue <= 16, f"{where}: issue {spec.issue!r}"
            if spec.default is not None:
                assert spec.accepts(spec.default), f"{where}: default {spec.default!r} not a {spec.type}"
            if spec.status == "planned":
                assert spec.inert, f"{where}: a planned key needs its inert values"
                for value in spec.inert:
                    assert value is None or spec.accepts(value), f"{where}: inert {value!r}"
            else:
                assert not spec.inert, f"{where}: inert values only make sense for planned keys"


def test_merged_reference_uses_the_run_meaning_for_shared_keys(sections):
    # load_reference() merges the sections; run configs must see the run entries.
    merged = load_reference()
    for key, spec in sections["run"].items():
        assert merged[key] == spec, key


# --------------------------------------------------------------------------- 2. docs

def test_configuration_page_is_up_to_date():
    assert docs.DOC_FILE.exists(), "docs/configuration.md missing: run `python -m pipelines.docs`"
    assert docs.DOC_FILE.read_text(encoding="utf-8") == docs.render(), (
        "docs/configuration.md is out of date with keys.yaml: run `python -m pipelines.docs`"
    )
    assert docs.main(["--check"]) == 0


def test_configuration_page_lists_every_key(sections):
    text = docs.render()
    for section, specs in sections.items():
        for key, spec in specs.items():
            row = re.search(rf"^\| `{re.escape(key)}` \|.*$", text, flags=re.M)
            assert row, f"{section}.{key} missing from the page"
    row = re.search(r"^\| `use_ib` \|.*$", text, flags=re.M).group(0)
    assert "implemented" in row


def test_check_mode_fails_on_a_stale_page(tmp_path):
    stale = tmp_path / "configuration.md"
    stale.write_text("stale\n", encoding="utf-8")
    assert docs.main(["--check", "--output", str(stale)]) == 1
    assert docs.main(["--output", str(stale)]) == 0
    assert docs.main(["--check", "--output", str(stale)]) == 0


# --------------------------------------------------------------------------- 3. refusals

def _refusal(cfg: dict) -> str:
    with pytest.raises(ConfigError) as info:
        check_against_reference(cfg)
    return str(info.value)


def test_unknown_key_is_refused_with_a_close_match():
    message = _refusal({"ib_betta": 1.0})
    assert "ib_betta" in message and "did you mean" in message and "ib_beta" in message


def test_unknown_nested_key_is_refused():
    message = _refusal({"dataset": {"batch_sise": 64}})
    assert "dataset.batch_sise" in message and "dataset.batch_size" in message


def test_wrong_type_is_refused_naming_the_key():
    message = _refusal({"kd_alpha": "high", "dataset": {"batch_size": 64}})
    assert "kd_alpha" in message and "expected float" in message
    assert "batch_size" not in message
    message = _refusal({"use_amp": 1})
    assert "use_amp" in message and "expected bool" in message


@pytest.fixture
def reference_with_a_planned_key(tmp_path, monkeypatch):
    """A key reference in which one key is still `planned` (every seed key is implemented
    now, but the rule must keep working for the next feature)."""
    import asib_core.config.reference as ref

    keys = tmp_path / "keys.yaml"
    keys.write_text(
        "run:\n"
        "  use_ib:\n    type: bool\n    default: false\n    status: planned\n    issue: 6\n"
        "    inert: [false]\n    meaning: x\n"
        "  dkd_beta:\n    type: float\n    default: 2.0\n    status: planned\n    issue: 5\n"
        "    inert: [2.0]\n    meaning: x\n"
        "  kd_alpha:\n    type: float\n    default: 0.0\n    status: implemented\n    meaning: x\n",
        encoding="utf-8")
    monkeypatch.setattr(ref, "KEYS_FILE", keys)
    ref.load_reference.cache_clear()
    yield
    ref.load_reference.cache_clear()


def test_planned_key_with_a_behaviour_changing_value_is_refused(reference_with_a_planned_key):
    message = _refusal({"use_ib": True})
    assert "use_ib" in message and "#6" in message
    message = _refusal({"dkd_beta": 8.0})
    assert "dkd_beta" in message and "#5" in message
    # at its inert value a planned key passes, and printing a config only notes it
    check_against_reference({"use_ib": False, "dkd_beta": 2.0, "kd_alpha": 0.35})
    notes = check_against_reference({"use_ib": True}, for_run=False)
    assert notes and "use_ib" in notes[0]


def test_valid_keys_pass():
    check_against_reference({
        "use_ib": False, "teacher_adapt_epochs": 0, "feat_kd_alpha": 0.0, "dkd_beta": 2.0,
        "kd_alpha": 0.35, "tau_schedule": None, "dataset": {"batch_size": 64, "name": "cifar100"},
        "anchor": {"_pre_merge": {"tau_schedule": [3.5, 5.0]}},
    })


def test_run_label_smoothing_is_the_synergy_key():
    # `label_smoothing` is the fine-tuning CE smoothing in recipes, but in a run it is the
    # A-step synergy head's: the two sections keep their own meaning.
    spec = find_spec("label_smoothing")
    assert spec.status == "implemented" and spec.issue == 6 and "synergy" in spec.meaning
    check_against_reference({"label_smoothing": 0.3})
