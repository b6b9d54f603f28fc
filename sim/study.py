"""Study files: a base scenario, seeds, and factors over its dotted keys, expanded into validated cells.

```yaml
study: retrain-frequency
scenario: quickstart              # a path relative to this file, or a shipped scenario's name
seeds: [1, 2, 3, 4, 5]
baseline: ideal                   # the policy paired differences are taken against (default: the first)
factors:                          # a grid: every combination of the levels ...
  retrain.every: [1, 5, 20]
  users.choice.temperature: [0.02, 0.1]
# points:                         # ... or a list of combinations
#   - {retrain.every: 1, users.choice.temperature: 0.02}
steps: 50                         # optional: overrides the scenario's steps
```

Every cell is the base scenario with its factors set (on the file's mapping, ``extends:`` resolved, as
``load_scenario``'s overrides are) and the study's seeds; it is validated, and checked as ``recloop
validate`` checks a scenario, before any cell runs. The run seed alone fixes the world and every random
draw, so cells sharing a seed start from the identical world under common random numbers. The
scenario's own ``seed`` and ``replicates`` are replaced by the study's ``seeds``.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import hashlib
import itertools
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from recloop.errors import RecloopInputError, clip, did_you_mean, echo
from recloop.limits import MAX_REPLICATES, MAX_STEPS, POLICY_NAME_PATTERN, Seed
from recloop.sim.config import validate_mapping
from recloop.sim.preflight import check_scenario
from recloop.sim.scenario_yaml import load_raw, parse_yaml, read_text_bounded, shipped_scenario

MAX_CELLS = 10_000  #: cells of one study (a grid's product is checked before it is expanded)
#: keys a factor cannot set: the study's ``seeds`` set the seeds
RESERVED = {"seed": "the study's 'seeds:' set the seeds", "replicates": "the study's 'seeds:' set the seeds"}
_LABEL = re.compile(r"[^A-Za-z0-9.+-]+")


class StudyConfig(BaseModel):
    """A study file (extra keys forbidden)."""

    model_config = ConfigDict(extra="forbid")

    study: Annotated[str, StringConstraints(min_length=1, max_length=200)] = Field(description="the study's name")
    description: str = ""
    scenario: Annotated[str, StringConstraints(min_length=1, max_length=4096)] = Field(
        description="the base scenario: a path relative to the study file, or a shipped scenario's name")
    seeds: Annotated[list[Seed], Field(min_length=1, max_length=MAX_REPLICATES)] = Field(
        description="the run seeds; every cell runs every policy under every seed")
    baseline: Annotated[str, StringConstraints(pattern=POLICY_NAME_PATTERN)] | None = Field(
        None, description="the policy paired differences are taken against (default: the first policy)")
    steps: Annotated[int, Field(gt=0, le=MAX_STEPS)] | None = Field(None, description="overrides the scenario's steps")
    factors: dict[str, Annotated[list[Any], Field(min_length=1)]] | None = Field(
        None, description="a grid: dotted scenario key -> levels (every combination is a cell)")
    points: Annotated[list[dict[str, Any]], Field(min_length=1, max_length=MAX_CELLS)] | None = Field(
        None, description="a list of cells, each a mapping dotted scenario key -> value")

    @model_validator(mode="after")
    def _design(self):
        if self.factors is not None and self.points is not None:
            raise ValueError("give 'factors:' (a grid) or 'points:' (a list of combinations), not both")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"'seeds' lists a seed twice ({self.seeds}); give each seed once")
        for key, levels in (self.factors or {}).items():
            if len({_canon(v) for v in levels}) != len(levels):
                raise ValueError(f"factor '{clip(key)}' lists a level twice ({echo(levels)}); give each level once")
        if self.factors:
            n = 1
            for levels in self.factors.values():
                n *= len(levels)
            if n > MAX_CELLS:
                raise ValueError(f"the grid has {n} cells; a study may have at most {MAX_CELLS}")
        if self.points is not None and len({_canon(p) for p in self.points}) != len(self.points):
            raise ValueError("'points' lists the same combination twice; give each once")
        return self


@dataclass
class Cell:
    """One combination of factor levels: its id, the levels as written, and its validated scenario."""

    id: str
    factors: dict[str, Any]  #: dotted key -> the value the study sets (as written)
    values: dict[str, Any]  #: every factor key of the study -> the value the cell's scenario resolves to
    scenario: Any  #: the validated scenario (seeds and steps of the study applied)


@dataclass
class Study:
    """A loaded study: its configuration, base scenario and cells (every one validated)."""

    config: StudyConfig
    file: str
    scenario_file: str  #: the base scenario's path
    base: Any  #: the base scenario, validated, with the study's seeds and steps
    cells: list[Cell]
    keys: list[str]  #: the factor keys, in the order they are first named
    baseline: str
    policies: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.config.study

    @property
    def seeds(self) -> list[int]:
        return list(self.config.seeds)

    @property
    def design(self) -> str:
        return "grid" if self.config.factors is not None else "points" if self.config.points is not None else "single"

    def levels(self) -> dict[str, list]:
        """Each factor's levels as the metric columns hold them (resolved values, in study order)."""
        out: dict[str, list] = {}
        for key in self.keys:
            seen: list = []
            for cell in self.cells:
                v = column_value(cell.values[key])
                if v not in seen:
                    seen.append(v)
            out[key] = seen
        return out

    def resolved(self) -> dict[str, Any]:
        """The study as written out to ``DIR/study.yaml``: baseline filled in, the scenario an absolute path
        (a shipped name stays a name), so the file reruns the same study from anywhere."""
        data = self.config.model_dump(mode="json", exclude_none=True)
        data["baseline"] = self.baseline
        local = Path(self.file).parent / self.config.scenario
        if local.exists() or shipped_scenario(self.config.scenario) is None:
            data["scenario"] = self.scenario_file
        return data

    def fingerprint(self) -> dict[str, str]:
        """What makes two studies the same study (compared when a sweep directory is reused)."""
        def h(obj) -> str:
            return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]

        return {"name": self.name, "seeds": h(self.seeds), "baseline": self.baseline,
                "scenario": self.base.config_hash(), "cells": h([(c.id, c.scenario.config_hash()) for c in self.cells])}


# ------------------------------------------------------------------------------------------- loading
#: folders of ``recloop.scenarios`` that hold shipped studies, searched in this order
STUDY_FOLDERS = ("studies", "papers")


def shipped_study(name: str) -> Path | None:
    """Path of a study shipped in ``recloop.scenarios/studies`` (``retrain-frequency``) or in the reproduction
    gallery ``recloop.scenarios/papers`` (``chaney-2018``)."""
    if not name or len(name) > 255 or any(ch in name for ch in "/\\\0"):
        return None
    fname = name if name.endswith((".yaml", ".yml")) else f"{name}.yaml"
    for folder in STUDY_FOLDERS:
        try:
            p = Path(str(resources.files("recloop.scenarios").joinpath(folder, fname)))
        except (ModuleNotFoundError, OSError, ValueError):
            return None
        if p.is_file():
            return p
    return None


def load_study(path: str | Path, *, preflight: bool = True) -> Study:
    """Read, expand and validate a study; every cell is checked (``preflight``) before this returns."""
    path = Path(path)
    if not path.exists() and shipped_study(str(path)) is not None:
        path = shipped_study(str(path))
    file = str(path)
    cfg = _parse(_read(path), file)
    scen_path = _scenario_path(cfg.scenario, path)
    raw = load_raw(scen_path)
    raw["seed"] = cfg.seeds[0]
    contiguous = cfg.seeds == list(range(cfg.seeds[0], cfg.seeds[0] + len(cfg.seeds)))
    raw["replicates"] = len(cfg.seeds) if contiguous else 1
    if cfg.steps is not None:
        raw["steps"] = cfg.steps
    raw.pop("extends", None)
    base = validate_mapping(copy.deepcopy(raw), file=str(scen_path))
    resolved = base.resolved()
    combos, where = _combinations(cfg)
    keys = list(dict.fromkeys(k for combo in combos for k in combo))
    for key in keys:
        _check_key(key, resolved, file, where[key], str(scen_path))
    cells = [_cell(combo, raw, resolved, keys, file, str(scen_path), where) for combo in combos]
    _check_ids(cells, file)
    policies = list(base.policy_configs())
    baseline = cfg.baseline or policies[0]
    for cell in cells:
        names = list(cell.scenario.policy_configs())
        if baseline not in names:
            raise RecloopInputError(
                f"the baseline policy '{baseline}' is not among the policies of cell '{cell.id}' "
                f"({clip(', '.join(names), 300)}).{did_you_mean(baseline, names)}", file=file, key="baseline")
    study = Study(cfg, file, str(scen_path), base, cells, keys, baseline, policies)
    if preflight:
        for cell in cells:
            with _in_cell(cell.factors, file, where):
                check_scenario(cell.scenario, file=str(scen_path))
    return study


def _read(path: Path) -> dict:
    """A study file as a mapping (bounded size, nesting and alias expansion, as a scenario file)."""
    if not path.exists():
        raise RecloopInputError("file not found. Give the path of a study YAML file or the name of a shipped study "
                                "(such as retrain-frequency).", file=str(path))
    try:
        text = read_text_bounded(path)
    except RecloopInputError:
        raise
    except Exception as exc:  # unreadable: a directory, a device, too large, not UTF-8
        raise RecloopInputError(f"the study file {str(exc).replace('scenario', 'study')}.", file=str(path)) from None
    data = parse_yaml(text, str(path))
    if not isinstance(data, dict):
        raise RecloopInputError("a study file is a mapping with the keys study:, scenario:, seeds: and factors: or "
                                f"points: (got {'an empty file' if data is None else type(data).__name__}).",
                                file=str(path))
    return data


def _parse(data: dict, file: str) -> StudyConfig:
    try:
        return StudyConfig.model_validate(data)
    except ValidationError as exc:
        msgs = []
        for err in exc.errors()[:4]:
            loc = ".".join(str(p) for p in err["loc"])
            msg = clip(err["msg"].removeprefix("Value error, "), 400)
            if err["type"] == "extra_forbidden":
                hint = did_you_mean(str(err["loc"][-1]), StudyConfig.model_fields)
                msgs.append(f"key '{clip(loc)}' is not allowed in a study.{hint} Allowed keys: "
                            f"{', '.join(StudyConfig.model_fields)}.")
            elif err["type"] == "missing":
                msgs.append(f"key '{clip(loc)}' is required but missing.")
            elif not loc:  # a check across keys
                msgs.append(f"{msg}.")
            else:
                got = err.get("input")
                msgs.append(f"key '{clip(loc)}': {msg} (got {'a mapping' if isinstance(got, dict) else echo(got)}).")
        raise RecloopInputError(" ".join(msgs), file=file) from None


def _scenario_path(name: str, study_path: Path) -> Path:
    local = study_path.parent / name
    if local.exists():
        return local.resolve()
    shipped = shipped_scenario(name)
    if shipped is not None:
        return shipped
    raise RecloopInputError(f"the scenario {echo(name)} does not exist (looked for {echo(str(local), 300)} and for "
                            "a shipped scenario of that name). Give a path relative to the study file.",
                            file=str(study_path), key="scenario")


def _combinations(cfg: StudyConfig) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """The cells' factor settings, and for each key the study key that names it (for messages)."""
    if cfg.factors is not None:
        keys = list(cfg.factors)
        combos = [dict(zip(keys, vals)) for vals in itertools.product(*cfg.factors.values())]
        return combos, {k: f"factors.{k}" for k in keys}
    if cfg.points is not None:
        where: dict[str, str] = {}
        for i, p in enumerate(cfg.points):
            for k in p:
                where.setdefault(k, f"points.{i}.{k}")
        return [dict(p) for p in cfg.points], where
    return [{}], {}


# ------------------------------------------------------------------------------------------ dotted keys
def _step(node: Any, parts: list[str]) -> tuple[Any, int] | None:
    """The child of ``node`` the dotted parts start with, and how many parts it took (a policy's name may
    contain dots, so the longest matching key wins); None when there is none."""
    if isinstance(node, dict):
        for j in range(len(parts), 0, -1):
            name = ".".join(parts[:j])
            if name in node:
                return name, j
        return None
    if isinstance(node, list) and parts[0].isdigit() and int(parts[0]) < len(node):
        return int(parts[0]), 1
    return None


def resolve_key(node: Any, key: str) -> tuple[list, Any]:
    """(the path of ``key`` in ``node``, its value); KeyError(prefix, rest) when a part is missing."""
    parts, path = key.split("."), []
    while parts:
        hit = _step(node, parts)
        if hit is None:
            raise KeyError((path, parts))
        name, used = hit
        path.append(name)
        node = node[name]
        parts = parts[used:]
    return path, node


def _flat_keys(node: Any, prefix: str = "", out: list[str] | None = None, limit: int = 5000) -> list[str]:
    out = [] if out is None else out
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        if len(out) >= limit:
            break
        key = f"{prefix}{k}"
        out.append(key)
        _flat_keys(v, f"{key}.", out, limit)
    return out


def _check_key(key: str, resolved: dict, file: str, where: str, scen_file: str) -> None:
    """Refuse a factor key the base scenario does not have, naming the closest keys it has."""
    top = key.split(".", 1)[0]
    if top in RESERVED:
        raise RecloopInputError(f"'{clip(key)}' cannot be a factor: {RESERVED[top]}.", file=file, key=where)
    try:
        resolve_key(resolved, key)
        return
    except KeyError as exc:
        path, rest = exc.args[0]
    at = ".".join(map(str, path))
    parent = resolve_key(resolved, at)[1] if path else resolved
    scen = clip(scen_file, 300)
    if parent is None:
        raise RecloopInputError(
            f"factor key '{clip(key)}': '{at}' is not set in the scenario {scen}, so it has no '{clip(rest[0])}'; "
            f"make the whole block '{at}' the factor instead ({at}: [{{type: ..., ...}}, ...]).", file=file, key=where)
    close = difflib.get_close_matches(key, _flat_keys(resolved), n=3, cutoff=0.6)
    hint = f" Closest keys: {', '.join(close)}." if close else ""
    under = f"under '{at}'" if at else "at the top level"
    if isinstance(parent, dict):
        listing = f" Keys {under}: {clip(', '.join(map(str, parent)), 600)}."
    elif isinstance(parent, list):
        listing = f" '{at}' is a list of {len(parent)} entries (indices 0 to {len(parent) - 1})." if parent else \
            f" '{at}' is an empty list."
    else:
        listing = f" '{at}' holds a single value, not keys."
    raise RecloopInputError(f"factor key '{clip(key)}' is not a key of the scenario {scen} (no "
                            f"'{clip('.'.join(rest))}' {under}).{hint}{listing}", file=file, key=where)


def set_key(data: dict, key: str, value: Any, resolved: dict) -> None:
    """Set dotted ``key`` to ``value`` in a scenario mapping (blocks the file leaves out are created;
    ``resolved`` names the path, so a policy name with dots is one part)."""
    path, _ = resolve_key(resolved, key)
    cur: Any = data
    for i, part in enumerate(path[:-1]):
        if isinstance(cur, dict) and not isinstance(cur.get(part), (dict, list)):
            nxt = resolve_key(resolved, ".".join(map(str, path[: i + 1])))[1]
            cur[part] = copy.deepcopy(nxt) if isinstance(nxt, list) else {}
        cur = cur[part]
    cur[path[-1]] = copy.deepcopy(value)


# ------------------------------------------------------------------------------------------------ cells
def cell_id(factors: dict[str, Any]) -> str:
    """A short readable directory name plus a hash of the settings: ``every-5_temperature-0.1_1a2b3c4d``.
    Never contains '=' (so Hive-partition readers do not take the folder for a column) nor '/'."""
    if not factors:
        return "base"
    digest = hashlib.sha256(_canon(factors).encode()).hexdigest()[:8]
    parts = []
    for key, value in factors.items():
        if isinstance(value, dict):
            value = value.get("type", "map")
        elif isinstance(value, list):
            value = "list"
        text = json.dumps(value) if isinstance(value, bool) or value is None else str(value)
        parts.append(_LABEL.sub("-", f"{key.rsplit('.', 1)[-1]}-{text}").strip("-."))
    return f"{'_'.join(parts)[:60].strip('-_.')}_{digest}"


def _canon(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


@contextlib.contextmanager
def _in_cell(combo: dict[str, Any], file: str, where: dict[str, str]) -> Iterator[None]:
    """Re-issue a scenario error of one cell for the study file, naming the cell and its factors."""
    try:
        yield
    except RecloopInputError as exc:
        named = [exc.key] if exc.key else re.findall(r"key '([^']+)'", exc.detail)
        key = next((where[k] for k in combo for n in named if n == k or n.startswith(f"{k}.")), None)
        setting = ", ".join(f"{k}={clip(echo(v), 80)}" for k, v in combo.items()) or "no factors"
        raise RecloopInputError(f"cell '{cell_id(combo)}' ({setting}) is not a valid scenario: {exc}", file=file,
                                key=key) from None


def _cell(combo: dict[str, Any], raw: dict, base: dict, keys: list[str], file: str, scen_file: str,
          where: dict[str, str]) -> Cell:
    """The cell of ``combo``: the raw mapping with its keys set (``base``: the resolved base names paths)."""
    data = copy.deepcopy(raw)
    for key, value in combo.items():
        set_key(data, key, value, base)
    with _in_cell(combo, file, where):
        scenario = validate_mapping(data, file=scen_file)
    resolved = scenario.resolved()
    values = {}
    for key in keys:
        try:
            values[key] = resolve_key(resolved, key)[1]
        except KeyError:  # a block a factor replaced no longer has the key
            values[key] = None
    return Cell(cell_id(combo), dict(combo), values, scenario)


def _check_ids(cells: list[Cell], file: str) -> None:
    seen: dict[str, Cell] = {}
    for c in cells:
        if c.id.casefold() in seen:  # equal settings were refused already: a hash collision
            raise RecloopInputError(f"cells {seen[c.id.casefold()].factors} and {c.factors} get the same id "
                                    f"'{c.id}'; change one of them.", file=file)
        seen[c.id.casefold()] = c


# ------------------------------------------------------------------------------------------ columns
def column_value(value: Any) -> Any:
    """A factor value as a metric column holds it: scalars as they are, blocks and lists as JSON text."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return _canon(value)


def column_dtype(values: list[Any]):
    """One polars dtype for a factor's column across all cells (Boolean, Int64, Float64 or String)."""
    import polars as pl

    vals = [column_value(v) for v in values if v is not None]
    if vals and all(isinstance(v, bool) for v in vals):
        return pl.Boolean
    if vals and all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
        return pl.Int64
    if vals and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
        return pl.Float64
    return pl.Utf8


def cast_value(value: Any, dtype) -> Any:
    """``value`` converted for a column of ``dtype`` (ints to float in a Float64 column, others as text)."""
    import polars as pl

    v = column_value(value)
    if v is None:
        return None
    if dtype == pl.Float64:
        return float(v)
    if dtype == pl.Utf8 and not isinstance(v, str):
        return json.dumps(v)
    return v
