"""Package layering: no two-way dependency between engine/ and methods/, no import circle in data/.

The distiller contract (Batch, TrainContext, Distiller) lives in ``asib_core/contract.py`` so that
the engine can drive methods without importing them. These tests read every module's imports
statically (``ast``), so a lazy import inside a function counts too.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "asib_core"


def imported_modules(path: Path, root: Path = ROOT) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved)."""
    package = ".".join(path.relative_to(root.parent).with_suffix("").parts[:-1])
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def package_imports(package: str) -> dict[str, set[str]]:
    return {str(p.relative_to(ROOT.parent)): imported_modules(p) for p in (ROOT / package).rglob("*.py")}


def test_engine_never_imports_a_method():
    offenders = {f: sorted(m for m in mods if m.startswith("asib_core.methods"))
                 for f, mods in package_imports("engine").items()}
    offenders = {f: m for f, m in offenders.items() if m}
    assert not offenders, f"engine modules import methods (two-way dependency): {offenders}"


def test_methods_and_engine_share_the_contract_module():
    engine = set().union(*package_imports("engine").values())
    methods = set().union(*package_imports("methods").values())
    assert "asib_core.contract" in engine and "asib_core.contract" in methods
    assert not (ROOT / "methods" / "base.py").exists()


def test_contract_depends_on_neither_side():
    mods = imported_modules(ROOT / "contract.py")
    assert not {m for m in mods if m.startswith(("asib_core.engine", "asib_core.methods"))}


def test_data_batches_and_bundle_do_not_import_each_other():
    batches = imported_modules(ROOT / "data" / "batches.py")
    bundle = imported_modules(ROOT / "data" / "bundle.py")
    assert "asib_core.data.batches" in bundle  # bundle builds loaders from batches
    assert not {m for m in batches if m.startswith("asib_core.data.bundle")}, batches


def test_imported_modules_sees_lazy_relative_imports(tmp_path):
    """The checker itself: a lazy ``from . import bundle`` inside a function is found."""
    probe = tmp_path / "asib_core" / "data" / "batches.py"
    probe.parent.mkdir(parents=True)
    probe.write_text("def f():\n    from . import bundle\n    return bundle\n")
    assert "asib_core.data.bundle" in imported_modules(probe, tmp_path / "asib_core")
