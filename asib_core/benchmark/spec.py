"""A benchmark protocol as data: ``configs/benchmark/<key>.yaml`` (or any YAML file with the same
fields), loaded and checked, and the selection of rows and seeds of one invocation.

Fields: ``name`` (the tag value ``asib.benchmark`` and the results page's file name), ``title``,
``data`` (``dataset``; for image folders ``tarball`` and ``folder``), ``teachers`` (``teacher`` +
fine-tune ``overrides``), ``seeds``, ``common`` (overrides of every student row) and ``rows``
(``name``, ``exp``, ``overrides``), ``reference_row`` (the row every other is compared with on
the results page; default the first row) and ``targets`` (optional claims the results page checks:
``{row: NAME, over: NAME or [NAMES], by: POINTS, source: TEXT}``, "row's mean test top-1 is at least
``by`` points (default 0) above the best of ``over``"; ``rows: [NAMES]`` instead of ``row`` states
the same claim for each of them).

``extends: KEY`` starts from another benchmark file: every field given here replaces the
parent's, ``common_extra`` is appended to the parent's ``common``, and a row given as a plain
string is the parent's row of that name (so a slice of a protocol cannot drift from it).
``targets`` are not inherited: they are claims about the rows of the file that states them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from asib_core.config.errors import ConfigError
from asib_core.paths import PROJECT_ROOT

BENCHMARK_DIR = PROJECT_ROOT / "configs" / "benchmark"
#: the tags of a benchmark's runs: its name, the row, the machine and command that made the run
BENCH_TAG, ROW_TAG, MACHINE_TAG, COMMAND_TAG = "asib.benchmark", "asib.bench_row", "asib.machine", "asib.bench_command"
#: the step tag of the run that evaluates the teachers
TEACHERS_STEP = "bench_teachers"


@dataclass(frozen=True)
class Row:
    index: int
    name: str
    exp: str
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class Target:
    """A claim the results page checks: ``row``'s mean test top-1 is at least ``by`` points above
    the best (highest mean) of the rows ``over``."""
    row: str
    over: tuple[str, ...]
    by: float = 0.0
    source: str = ""


@dataclass
class Benchmark:
    key: str                      # the file name without .yaml (or the path given)
    name: str
    title: str
    data: dict
    teachers: list[dict]
    seeds: list[int]
    common: list[str]
    rows: list[Row]
    source: Path = field(default=Path())
    reference_row: str = ""       # the row the results page compares every row with
    targets: list[Target] = field(default_factory=list)

    @property
    def dataset(self) -> str:
        return str(self.data.get("dataset") or "digits")


def list_benchmarks() -> list[str]:
    return sorted(p.stem for p in BENCHMARK_DIR.glob("*.yaml"))


def benchmark_file(name: str) -> Path:
    """``name``: a file of configs/benchmark/ (its stem or its ``name`` field), or a YAML path."""
    if name.endswith((".yaml", ".yml")) and Path(name).is_file():
        return Path(name)
    path = BENCHMARK_DIR / f"{name}.yaml"
    if path.is_file():
        return path
    for stem in list_benchmarks():
        candidate = BENCHMARK_DIR / f"{stem}.yaml"
        if load_yaml(candidate, f"benchmark file {candidate}").get("name") == name:
            return candidate
    raise ConfigError(
        f"no benchmark named {name!r}: known benchmarks (configs/benchmark/) are "
        f"{', '.join(list_benchmarks()) or '(none)'}; a path to a benchmark YAML file works too. "
        "Give one of these names, e.g. cifar10_lowdata (the benchmark entry point reads it as name=, report as benchmark=).")


def flat_overrides(items) -> list[str]:
    """A row's overrides as one flat list: a YAML alias of a shared list (``*ladder_budget``)
    inside a row's list nests, so nested lists are spliced in place."""
    out = []
    for item in items or ():
        out.extend(flat_overrides(item) if isinstance(item, list) else [str(item)])
    return out


def load_yaml(path: Path, where: str) -> dict:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where} is not valid YAML ({' '.join(str(exc).split())}); fix the file.") from None


def read_spec(path: Path, where: str, seen: tuple[Path, ...] = ()) -> dict:
    """The file's fields, with ``extends`` resolved (see the module docstring)."""
    raw = load_yaml(path, where)
    if not raw.get("extends"):
        return raw
    parent_path = benchmark_file(str(raw["extends"]))
    if parent_path in (path, *seen):
        raise ConfigError(f"{where}: `extends: {raw['extends']}` loops back to itself.")
    parent = read_spec(parent_path, f"benchmark file {parent_path}", (path, *seen))
    merged = {**parent, **{k: v for k, v in raw.items() if k not in ("extends", "common_extra")}}
    merged["common"] = [*(parent.get("common") or []), *(raw.get("common_extra") or [])]
    merged["targets"] = raw.get("targets")      # claims about the parent's rows are not inherited
    by_name = {str(r.get("name")): r for r in parent.get("rows") or [] if isinstance(r, dict)}
    rows = []
    for item in merged.get("rows") or []:
        if isinstance(item, str) and item not in by_name:
            raise ConfigError(f"{where}: row {item!r} is not a row of {raw['extends']} "
                              f"(its rows: {', '.join(by_name)}).")
        rows.append(by_name[item] if isinstance(item, str) else item)
    merged["rows"] = rows
    return merged


def load_benchmark(name: str) -> Benchmark:
    path = benchmark_file(name)
    where = f"benchmark file {path}"
    raw = read_spec(path, where)
    rows_raw = raw.get("rows") or []
    if not isinstance(rows_raw, list) or not rows_raw:
        raise ConfigError(f"{where} has no rows: give `rows:` as a list of {{name, exp, overrides}}.")
    rows = []
    for i, item in enumerate(rows_raw):
        if not isinstance(item, dict) or not item.get("name") or not item.get("exp"):
            raise ConfigError(f"{where}: row {i} ({item!r}) needs a `name` and an `exp`.")
        rows.append(Row(i, str(item["name"]), str(item["exp"]), tuple(flat_overrides(item.get("overrides")))))
    names = [r.name for r in rows]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"{where}: row names must be unique; repeated: {', '.join(twice)}.")
    teachers = [dict(t) for t in raw.get("teachers") or []]
    if any(not t.get("teacher") for t in teachers):
        raise ConfigError(f"{where}: every entry of `teachers` needs `teacher: NAME`.")
    reference = str(raw.get("reference_row") or rows[0].name)
    if reference not in names:
        raise ConfigError(f"{where}: reference_row {reference!r} is not one of its rows ({', '.join(names)}); "
                          "name one of them or leave reference_row out (the first row).")
    key = path.stem if path.parent == BENCHMARK_DIR else str(path)
    targets = parse_targets(raw.get("targets"), names, where)
    return Benchmark(key=key, name=str(raw.get("name") or path.stem), title=str(raw.get("title") or path.stem),
                     data=dict(raw.get("data") or {}), teachers=teachers,
                     seeds=[int(s) for s in raw.get("seeds") or [0]], common=[str(o) for o in raw.get("common") or []],
                     rows=rows, source=path, reference_row=reference, targets=targets)


def parse_targets(items, names: list[str], where: str) -> list[Target]:
    """The ``targets`` field (see the module docstring), each name checked against the rows."""
    if items is None:
        return []
    if not isinstance(items, list):
        raise ConfigError(f"{where}: `targets` must be a list of {{row, over, by}}, got {items!r}.")
    targets = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or ("row" in item) == ("rows" in item) or not item.get("over"):
            raise ConfigError(f"{where}: target {i} ({item!r}) needs `row: NAME` (or `rows: [NAMES]`) and "
                              "`over: NAME or [NAMES]`, and optionally `by: POINTS` and `source: TEXT`.")
        rows = item["rows"] if "rows" in item else [item["row"]]
        over = item["over"] if isinstance(item["over"], list) else [item["over"]]
        rows, over = [str(r) for r in rows or []], [str(r) for r in over]
        unknown = [n for n in (*rows, *over) if n not in names]
        if unknown or not rows:
            raise ConfigError(f"{where}: target {i} names {', '.join(map(repr, unknown)) or 'no row'}, which "
                              f"is not a row; its rows are {', '.join(names)}.")
        try:
            by = float(item.get("by", 0.0))
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: target {i} has by={item.get('by')!r}; give test points as a number, "
                              "e.g. by: 6.0 (default 0: at or above).") from None
        targets += [Target(row, tuple(over), by, str(item.get("source") or "")) for row in rows]
    return targets


def select_rows(bench: Benchmark, text: str) -> list[Row]:
    """``rows=``: comma-separated row names or indices (0-based); empty = every row. A row name
    may itself hold commas: the longest run of items that names a row wins."""
    items = [t.strip() for t in (text or "").split(",")]
    if not any(items):
        return list(bench.rows)
    by_name = {r.name: r for r in bench.rows}
    chosen, unknown, i = [], [], 0
    while i < len(items):
        for j in range(len(items), i, -1):
            joined = ", ".join(items[i:j])
            if joined in by_name or ",".join(items[i:j]) in by_name:
                chosen.append(by_name.get(joined) or by_name[",".join(items[i:j])])
                i = j
                break
        else:
            item = items[i]
            if item.isdigit() and int(item) < len(bench.rows):
                chosen.append(bench.rows[int(item)])
            elif item:
                unknown.append(item)
            i += 1
    if unknown:
        listing = "; ".join(f"{r.index}: {r.name}" for r in bench.rows)
        raise ConfigError(
            f"benchmark {bench.key} has no row {', '.join(repr(u) for u in unknown)}. Its rows (index: name) "
            f"are {listing}. Pass rows=NAME,NAME or rows=0,3 (empty: every row).")
    return list(dict.fromkeys(chosen))


def select_seeds(bench: Benchmark, text: str) -> list[int]:
    """``seeds=``: comma-separated whole numbers; empty = the benchmark's own seeds."""
    if not (text or "").strip():
        return list(bench.seeds)
    seeds = []
    for item in text.split(","):
        item = item.strip()
        try:
            seeds.append(int(item))
        except ValueError:
            raise ConfigError(f"seeds={text!r} is not allowed: give comma-separated whole numbers, "
                              f"e.g. seeds={','.join(map(str, bench.seeds))}.") from None
    return list(dict.fromkeys(seeds))
