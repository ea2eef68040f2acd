"""The version of the code a run executes, for run reuse.

:func:`code_version` is a SHA-256 over the package source that decides a run's result: every
``*.py`` of ``asib_core`` and ``pipelines`` and every file of ``configs`` (relative path and
bytes, in sorted order), the benchmark protocols of ``configs/benchmark`` excepted. Unlike a
git commit it also changes with an uncommitted edit and exists for an installed copy outside
git, so a reused run was always produced by this very code. The git commit itself is a run tag
(``git_commit``) for people.

A benchmark protocol decides no run's result: it only lists runs, and what a row's run does is
its effective config (the protocol's ``common`` and row overrides included), which is hashed
with this version into the run's identity. Left out, a protocol can gain a row (or a comment)
without making every finished run of the other rows unreusable.
"""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = (("asib_core", "*.py"), ("pipelines", "*.py"), ("configs", "*"))
#: folders under SOURCES whose files are not hashed (see the module docstring)
EXCLUDED = (("configs", "benchmark"),)


def source_files(root: Path = ROOT) -> list[Path]:
    files = []
    for folder, pattern in SOURCES:
        base = root / folder
        if base.is_dir():
            files += [p for p in base.rglob(pattern) if p.is_file() and "__pycache__" not in p.parts
                      and p.relative_to(root).parts[:2] not in EXCLUDED]
    return sorted(files)


@functools.lru_cache(maxsize=4)
def code_version(root: Path = ROOT) -> str:
    digest = hashlib.sha256()
    for path in source_files(root):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()
