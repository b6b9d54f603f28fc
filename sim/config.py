"""Scenario files: YAML with ``extends:``, validated by pydantic models built from the registry.

Every component block is ``{type: <id>, ...params}``; the scenario model is a discriminated union of
all registered components of each kind, so unknown keys, wrong types and unknown ids are reported with
their path, the file and the allowed values (see :func:`format_validation_error`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import stat
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    Field,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)

from recloop import registry
from recloop.errors import RecloopInputError, clip, did_you_mean, echo
from recloop.limits import (
    MAX_EXTENDS,
    MAX_FILE_BYTES,
    MAX_K,
    MAX_REPLICATES,
    MAX_SAMPLE,
    MAX_SEED,
    MAX_STEPS,
    MAX_YAML_DEPTH,
    MAX_YAML_NODES,
    POLICY_NAME_PATTERN,
    Seed,
)
from recloop.recommenders.llm.service import LLMConfig
from recloop.registry import Params

PositiveInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]
Cycles = Annotated[int, Field(gt=0, le=MAX_STEPS)]  # a period or a count of cycles
OptCycles = Annotated[int, Field(ge=0, le=MAX_STEPS)]  # the same, 0 meaning "never"
SlateSize = Annotated[int, Field(gt=0, le=MAX_K)]
Sample = Annotated[int, Field(gt=0, le=MAX_SAMPLE)]
PolicyName = Annotated[str, StringConstraints(pattern=POLICY_NAME_PATTERN)]


class EngineConfig(Params):
    """Scoring engine: backend switch and chunking (memory is bounded by one chunk)."""

    backend: Literal["auto", "numpy", "numba", "torch", "cupy"] = "auto"
    chunk_rows: Annotated[int, Field(ge=1, le=10_000_000)] | None = Field(
        None, description="users per chunk, rounded up to whole 128-user tiles; default from chunk_mib (memory "
                          "only: results are identical for every value)")
    chunk_mib: Annotated[float, Field(gt=0, le=65536)] = Field(16.0, description="target size of one score block")
    threads: Annotated[int, Field(ge=1, le=256)] | None = Field(
        None, description="thread budget of the engine's workers, BLAS, Numba and torch (default: the usable "
                          "cores, at most 16); results are identical for every value")


class RetrainConfig(Params):
    """When and on what the policy retrains (the Chaney/Mansoury confounding protocol)."""

    every: Cycles = Field(1, description="retrain every n cycles")
    warm_start: bool = Field(True, description="continue from current parameters instead of from scratch")
    full_every: OptCycles = Field(0, description="with warm_start, a from-scratch refit every n cycles (0: never)")
    data: Literal["all", "initial", "window"] = Field(
        "all", description="all logged data so far, the initial log only (control), or a recent window"
    )
    window: Cycles = Field(50, description="cycles kept when data=window")


class InitialLogConfig(Params):
    """The organic log the policy is first trained on (users choosing from random slates)."""

    interactions_per_user: Annotated[int, Field(ge=0, le=MAX_K)] = 10
    slate_size: SlateSize = 20


class UsersConfig(Params):
    """User behaviour: a choice model, state dynamics, arrivals/churn, organic consumption."""

    choice: dict = Field(default_factory=lambda: {"type": "mnl"})
    dynamics: list[dict] = Field(default_factory=list)
    population: dict = Field(default_factory=lambda: {"type": "static"})
    repeat_consumption: bool = Field(False, description="may users consume an item again?")
    organic_rate: Probability = Field(0.0, description="probability per cycle of an organic (non-recommended) pick")


class MetricsConfig(Params):
    """Which metrics to record and how (sampling keeps pairwise/oracle metrics cheap)."""

    include: list[str] | None = Field(None, description="metric component ids; default: all defaults")
    exclude: list[str] = Field(default_factory=list)
    every: Cycles = 1
    pairs: Sample = Field(800, description="fixed random user pairs for homogenization")
    user_sample: Sample = Field(2000, description="users sampled for history-based metrics")
    regret_sample: Annotated[int, Field(ge=0, le=MAX_SAMPLE)] = Field(
        1000, description="users sampled for the oracle regret (0: off)")


class OutputConfig(Params):
    """Run-store behaviour."""

    checkpoint_every: OptCycles = Field(25, description="cycles between checkpoints (0: only at the end)")
    flush_every: Cycles = Field(10, description="cycles between metric flushes to Parquet parts")
    keep_checkpoints: Annotated[int, Field(gt=0, le=MAX_REPLICATES)] = 2
    log_interactions: bool = Field(False, description="write every interaction to DIR/interactions/")


def _component_union(kind: str):
    models = []
    for spec in registry.specs(kind):
        safe = "".join(ch if ch.isalnum() else "_" for ch in f"{kind}_{spec.name}")
        models.append(
            create_model(safe, __base__=spec.params, __doc__=spec.doc or None, type=(Literal[spec.name], ...))
        )
    if not models:
        return dict
    if len(models) == 1:
        return models[0]
    return Annotated[Union[tuple(models)], Field(discriminator="type")]  # noqa: UP007


@functools.lru_cache(maxsize=4)
def _scenario_model(_generation: int = 0):
    Choice = _component_union("choice")
    Dynamics = _component_union("dynamics")
    Population = _component_union("population")
    World = _component_union("world")
    Policy = _component_union("policy")
    Creator = _component_union("creator")

    UsersModel = create_model(
        "Users",
        __base__=UsersConfig,
        choice=(Choice, Field(default_factory=lambda: {"type": "mnl"}, validate_default=True)),
        dynamics=(list[Dynamics], Field(default_factory=list)),
        population=(Population, Field(default_factory=lambda: {"type": "static"}, validate_default=True)),
    )

    class Scenario(Params):
        """A recloop scenario: world, users, creators, policy (or policies to compare), schedule."""

        name: Annotated[str, Field(max_length=200)] = "scenario"
        description: str = ""
        seed: Seed = Field(0, description=f"the run seed (0 to {MAX_SEED}); every component seed derives from it")
        replicates: Annotated[int, Field(gt=0, le=MAX_REPLICATES)] = Field(
            1, description="seeds seed, seed+1, ... (bands across seeds in plots)")
        steps: Cycles = Field(100, description="cycles to simulate")
        k: SlateSize = Field(10, description="slate size")
        world: World  # type: ignore[valid-type]
        users: UsersModel = Field(default_factory=UsersModel)  # type: ignore[valid-type]
        creators: Creator | None = None  # type: ignore[valid-type]
        policy: Policy | None = None  # type: ignore[valid-type]
        policies: dict[PolicyName, Policy] | None = Field(  # type: ignore[valid-type]
            None, description="several policies compared on identical worlds with common random numbers; "
            "names match [A-Za-z0-9_.-]{1,100} (they name files in the run directory)"
        )
        retrain: RetrainConfig = Field(default_factory=RetrainConfig)
        initial_log: InitialLogConfig = Field(default_factory=InitialLogConfig)
        metrics: MetricsConfig = Field(default_factory=MetricsConfig)
        engine: EngineConfig = Field(default_factory=EngineConfig)
        output: OutputConfig = Field(default_factory=OutputConfig)
        llm: LLMConfig | None = Field(None, description="LLM backend, cache, budget and output limits")

        @model_validator(mode="after")
        def _one_policy_key(self):
            if (self.policy is None) == (self.policies is None):
                raise ValueError("give exactly one of 'policy' (one policy) or 'policies' (a comparison)")
            if self.policies is not None and len(self.policies) == 0:
                raise ValueError("'policies' must name at least one policy")
            return self

        @field_validator("replicates")
        @classmethod
        def _seeds_fit(cls, v: int, info: ValidationInfo) -> int:
            seed = info.data.get("seed")
            if isinstance(seed, int) and seed + v - 1 > MAX_SEED:
                raise ValueError(f"the seeds seed, seed+1, ..., seed+replicates-1 must stay at most {MAX_SEED} "
                                 f"(seeds are 32-bit); with seed {seed} use at most {MAX_SEED - seed + 1} replicates")
            return v

        def policy_configs(self) -> dict[str, Any]:
            if self.policies is not None:
                return dict(self.policies)
            return {self.policy.type: self.policy}

        def seeds(self) -> list[int]:
            return [self.seed + r for r in range(self.replicates)]

        def resolved(self) -> dict[str, Any]:
            return self.model_dump(mode="json")

        def config_hash(self) -> str:
            blob = json.dumps(self.resolved(), sort_keys=True).encode()
            return hashlib.sha256(blob).hexdigest()[:16]

    return Scenario


def scenario_model():
    """The pydantic model of a scenario, including every registered component (and plugins)."""
    registry.load_builtins()
    registry.load_plugins()
    return _scenario_model(sum(len(registry.names(k)) for k in registry.KINDS))


def json_schema() -> dict[str, Any]:
    schema = scenario_model().model_json_schema()
    schema["properties"]["extends"] = {"type": "string", "description": "a scenario file (or shipped name) to extend"}
    return schema


# ---------------------------------------------------------------------------------------------
# YAML loading with extends


def _is_file(p: Path) -> bool:
    """``p.is_file()`` that treats unusable names (too long, NUL bytes) as absent instead of raising."""
    try:
        return p.is_file()
    except (OSError, ValueError):
        return False


def _exists(p: Path) -> bool:
    try:
        return p.exists()
    except (OSError, ValueError):
        return False


def shipped_scenario(name: str) -> Path | None:
    """Path of a scenario shipped in ``recloop.scenarios`` (``quickstart`` or ``quickstart.yaml``)."""
    if not name or len(name) > 255 or any(ch in name for ch in "/\\\0"):
        return None
    fname = name if name.endswith((".yaml", ".yml")) else f"{name}.yaml"
    try:
        p = Path(str(resources.files("recloop.scenarios").joinpath(fname)))
    except (ModuleNotFoundError, OSError, ValueError):
        return None
    return p if _is_file(p) else None


def deep_merge(base: dict, over: dict) -> dict:
    """The mapping of a child file (``over``) laid over the file it extends (``base``).

    * mappings merge recursively, key by key: the child adds keys and overrides the parent's values;
      this includes ``policies:`` (the child adds or overrides policies by name) and ``users:``;
    * a component block whose ``type`` changes (``world: {type: gaussian_clusters}`` over a ``chaney``
      world) replaces the parent block instead of merging with it, so no parameter of the old type leaks in;
    * lists (``users.dynamics``, ``metrics.include``) and scalars replace the parent's value whole;
    * ``key: null`` drops the inherited key, so the default applies (``policies: {mf: null}`` removes
      the inherited policy ``mf``; ``creators: null`` removes creators; ``policy: null`` lets a child use
      ``policies:`` instead). A null for a key the parent does not have is kept as written.

    Neither argument is modified.
    """
    out = dict(base)
    for key, val in over.items():
        old = out.get(key)
        if val is None and key in out:
            del out[key]
        elif isinstance(val, dict) and isinstance(old, dict) and val.get("type", old.get("type")) == old.get("type"):
            out[key] = deep_merge(old, val)
        else:
            out[key] = val
    return out


class _Unreadable(Exception):
    """A scenario file that cannot be read; the message says why (completes '<file> ...')."""


def read_text_bounded(path: Path, limit: int = MAX_FILE_BYTES) -> str:
    """The UTF-8 text of ``path`` if it is a regular file of at most ``limit`` bytes.

    Devices (``/dev/zero``), pipes, sockets and directories are refused before anything is read, so a
    hostile ``extends:`` can neither hang the loader nor fill memory.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise _Unreadable("does not exist") from None
    except (OSError, ValueError) as exc:
        raise _Unreadable(f"cannot be read ({clip(getattr(exc, 'strerror', None) or exc)})") from None
    _check_regular(st, limit)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except OSError as exc:
        raise _Unreadable(f"cannot be read ({clip(exc.strerror or exc)})") from None
    with os.fdopen(fd, "rb") as fh:
        _check_regular(os.fstat(fd), limit)  # the file may have been swapped since the stat
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise _Unreadable(f"is larger than {limit} bytes, the limit for a scenario file")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _Unreadable(f"is not UTF-8 text (invalid byte at offset {exc.start})") from None


def _check_regular(st: os.stat_result, limit: int) -> None:
    if stat.S_ISDIR(st.st_mode):
        raise _Unreadable("is a directory, not a scenario YAML file")
    if not stat.S_ISREG(st.st_mode):
        raise _Unreadable("is not a regular file (a device, a pipe or a socket); give a scenario YAML file")
    if st.st_size > limit:
        raise _Unreadable(f"is {st.st_size} bytes; a scenario file may be at most {limit} bytes")


class _TooBig(Exception):
    """A YAML document beyond the nesting or size limits (the message completes the sentence)."""


class _Recursive(Exception):
    """A YAML alias used inside its own anchor (``&a [*a]``): the data would be infinite."""


class _Bounded:
    """``compose_node`` with limits on nesting and on distinct nodes, mixed in before PyYAML's Composer.

    The Composer recurses once per level, so a document nested 1,000 deep would end in a RecursionError;
    the limits stop it first, before any Python object is built.
    """

    _depth = 0
    _nodes = 0

    def compose_node(self, parent, index):
        if self._depth >= MAX_YAML_DEPTH:
            mark = self.peek_event().start_mark
            raise _TooBig(f"nesting deeper than {MAX_YAML_DEPTH} levels (at line {mark.line + 1})")
        if not self.check_event(yaml.AliasEvent):
            self._nodes += 1
            if self._nodes > MAX_YAML_NODES:
                raise _TooBig(f"more than {MAX_YAML_NODES} values")
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


if getattr(yaml, "__with_libyaml__", False):  # libyaml's event parser (fast), PyYAML's composer (bounded)

    from yaml._yaml import CParser as _CParser

    class _BoundedLoader(_Bounded, yaml.composer.Composer, _CParser, yaml.constructor.SafeConstructor,
                         yaml.resolver.Resolver):
        """A safe loader: libyaml events, a depth- and size-bounded composer, safe construction."""

        def __init__(self, stream: str):
            _CParser.__init__(self, stream)
            yaml.constructor.SafeConstructor.__init__(self)
            yaml.resolver.Resolver.__init__(self)
            yaml.composer.Composer.__init__(self)

else:  # pragma: no cover - PyYAML without libyaml

    class _BoundedLoader(_Bounded, yaml.SafeLoader):
        """A safe loader with a depth- and size-bounded composer."""


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def check_node_graph(root: yaml.Node, max_nodes: int = MAX_YAML_NODES, max_depth: int = MAX_YAML_DEPTH) -> None:
    """Refuse a composed YAML graph whose alias expansion is cyclic, too deep or too large.

    Aliases make the graph a DAG (or, for ``&a [*a]``, a cycle); the expanded size is computed per
    distinct node (memoised, iterative), so a "billion laughs" document is measured without expanding it.
    """
    done: dict[int, tuple[int, int]] = {}  # id -> (expanded nodes, expanded depth)
    active = {id(root)}
    stack = [(root, iter(_children(root)))]
    while stack:
        node, todo = stack[-1]
        child = next(todo, None)
        if child is not None:
            if id(child) in done:
                continue
            if id(child) in active:
                raise _Recursive(f"line {child.start_mark.line + 1}")
            active.add(id(child))
            stack.append((child, iter(_children(child))))
            continue
        stack.pop()
        active.discard(id(node))
        kids = [done[id(c)] for c in _children(node)]
        size = 1 + sum(k[0] for k in kids)
        depth = 1 + max((k[1] for k in kids), default=0)
        if size > max_nodes:
            raise _TooBig(f"more than {max_nodes} values once its aliases (*name) are expanded")
        if depth > max_depth:
            raise _TooBig(f"nesting deeper than {max_depth} levels once its aliases (*name) are expanded")
        done[id(node)] = (size, depth)


def parse_yaml(text: str, file: str) -> Any:
    """Parse one YAML document safely: bounded nesting and alias expansion, checked before any object is built."""
    loader = _BoundedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        check_node_graph(node)
        return loader.construct_document(node)
    except _Recursive as exc:
        raise RecloopInputError(f"an alias refers to the anchor that contains it ({exc}), which would make the data "
                                "infinite; scenario files cannot contain recursive aliases.", file=file) from None
    except _TooBig as exc:
        raise RecloopInputError(
            f"the YAML document has {exc}; scenario files are limited to {MAX_YAML_DEPTH} levels of nesting "
            f"and {MAX_YAML_NODES} values after alias expansion.",
            file=file,
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecloopInputError(f"YAML syntax error{where}: {clip(problem)}.", file=file) from None
    except (ValueError, OverflowError, RecursionError) as exc:  # e.g. an int with more than 4300 digits
        raise RecloopInputError(f"a YAML value cannot be read ({clip(exc)}).", file=file) from None
    finally:
        loader.dispose()


def read_yaml(path: Path, via: Path | None = None) -> dict:
    """A scenario file as a mapping (bounded size, nesting and alias expansion; see :mod:`recloop.limits`).

    ``via``: the file whose ``extends:`` names ``path`` (a file that cannot be read is reported there).
    """
    try:
        text = read_text_bounded(path)
    except _Unreadable as exc:
        if via is not None:
            raise RecloopInputError(f"the scenario it extends, {clip(path, 300)}, {exc}.", file=str(via),
                                    key="extends") from None
        what = "file not found. Give the path of a scenario YAML file or the name of a shipped scenario" \
            if str(exc) == "does not exist" else str(exc)
        raise RecloopInputError(f"{what}.", file=str(path)) from None
    if not text.strip():
        raise RecloopInputError(
            "the file is empty. A scenario needs at least 'world:' and 'policy:' (or 'policies:'); "
            "see scenarios/quickstart.yaml or run `recloop schema`.",
            file=str(path),
        )
    data = parse_yaml(text, str(path))
    if not isinstance(data, dict):
        raise RecloopInputError(
            f"the top level must be a mapping of keys (world:, policy:, ...), not {type(data).__name__}.",
            file=str(path),
        )
    return data


def _extends_target(path: Path, parent: str) -> Path:
    """The file that ``extends: parent`` in ``path`` names: relative to ``path``, absolute, or shipped."""
    target = Path(parent)
    if not target.is_absolute():
        target = path.parent / target
    if _exists(target):
        return target
    shipped = shipped_scenario(parent)
    if shipped is None:
        raise RecloopInputError(
            f"the scenario it extends, {echo(parent)}, does not exist (looked for {echo(str(target), 300)} and for a "
            "shipped scenario of that name). Give a path relative to this file.",
            file=str(path),
            key="extends",
        )
    return shipped


def load_raw(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """Read a scenario file and resolve its ``extends:`` chain into one mapping (see :func:`deep_merge`)."""
    path = Path(path)
    if not _seen and not _exists(path) and shipped_scenario(str(path)) is not None:
        path = shipped_scenario(str(path))
    path = path.resolve() if _exists(path) else path
    if path in _seen:
        chain = " -> ".join(clip(p, 300) for p in (*_seen, path))
        raise RecloopInputError(f"'extends' forms a cycle: {chain}.", file=str(_seen[0]), key="extends")
    data = read_yaml(path, _seen[-1] if _seen else None)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise RecloopInputError("'extends' must be a file path (string).", file=str(path), key="extends")
    if len(_seen) + 1 >= MAX_EXTENDS:
        raise RecloopInputError(f"the 'extends' chain is longer than {MAX_EXTENDS} files.", file=str(path),
                                key="extends")
    return deep_merge(load_raw(_extends_target(path, parent), (*_seen, path)), data)


def _strip_optional(tp):
    """``tp`` without ``Annotated`` wrappers and without ``None`` in a union (``X | None`` -> ``X``)."""
    import types
    import typing

    while True:
        origin = typing.get_origin(tp)
        if origin is Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(args) != 1:
                return tp
            tp = args[0]
        else:
            return tp


def _walk(model, loc) -> tuple[list, list[str]]:
    """Follow a pydantic error location through the scenario model.

    Returns the user-facing key path (discriminated-union tags such as ``als`` dropped, dict keys such as
    a policy's name kept) and the field names valid at the last step (for 'did you mean' hints).
    """
    import typing

    cur: Any = model
    clean: list = []
    allowed: list[str] = []
    for part in loc:
        base = _strip_optional(cur)
        if typing.get_origin(base) in (list, dict):  # the part is an index or a key (a policy's name)
            clean.append(part)
            cur = typing.get_args(base)[-1] if typing.get_args(base) else Any
            continue
        members = _models_in(base)
        if isinstance(part, str) and len(members) > 1:  # a discriminated union: the part is the tag
            tagged = [m for m in members if "type" in m.model_fields
                      and typing.get_args(m.model_fields["type"].annotation) == (part,)]
            if tagged:
                cur = tagged[0]
                continue
        clean.append(part)
        if len(members) == 1:
            allowed = [f.alias or n for n, f in members[0].model_fields.items()]
            field = members[0].model_fields.get(part) if isinstance(part, str) else None
            cur = field.annotation if field is not None else Any
        else:
            allowed, cur = [], Any
    return clean, allowed


def _models_in(tp) -> list:
    """The pydantic models a (union) annotation admits, not looking inside lists or dicts."""
    import types
    import typing

    from pydantic import BaseModel

    out, stack = [], [tp]
    while stack:
        t = stack.pop()
        origin = typing.get_origin(t)
        if origin is Annotated:
            stack.append(typing.get_args(t)[0])
        elif origin in (Union, types.UnionType):
            stack.extend(typing.get_args(t))
        elif isinstance(t, type) and issubclass(t, BaseModel):
            out.append(t)
    return out


def _key_text(parts: list) -> str:
    return clip(".".join(str(p) for p in parts) or "(top level)")


def _policy_name_message(loc: list) -> str:
    name = loc[-2] if len(loc) >= 2 else ""
    return (f"key 'policies.{clip(name, 120)}': the policy name {echo(name, 120)} is not allowed: names must match "
            f"{POLICY_NAME_PATTERN[1:-1]} (1 to 100 letters, digits, '_', '.' or '-'), because they name files "
            "of the run directory.")


def _one_error(err: dict, model) -> tuple[str, str]:
    """(dotted key, one sentence) for one pydantic error."""
    loc = list(err["loc"])
    etype = err["type"]
    if loc and loc[-1] == "[key]":
        if len(loc) == 3 and loc[0] == "policies":
            return f"policies.{loc[1]}", _policy_name_message(loc)
        loc = loc[:-1]
    clean, allowed = _walk(model, loc)
    key = _key_text(clean)
    if etype == "extra_forbidden":
        hint = did_you_mean(str(loc[-1]), allowed)
        return key, f"key '{key}' is not allowed here.{hint} Allowed keys: {', '.join(allowed)}."
    if etype in ("union_tag_invalid", "literal_error") and (loc and loc[-1] == "type" or "tag" in etype):
        kind = _kind_at(clean)
        bad = err.get("input")
        bad = bad.get("type") if isinstance(bad, dict) else bad
        opts = registry.names(kind) if kind else []
        return key, (f"key '{key}': unknown {kind or 'component'} type {echo(bad)}.{did_you_mean(str(bad), opts)} "
                     f"Allowed: {', '.join(opts)}.")
    if etype == "union_tag_not_found":
        kind = _kind_at(clean)
        opts = registry.names(kind) if kind else []
        return key, f"key '{key}' needs a 'type:' naming the component. Allowed types: {', '.join(opts)}."
    if etype == "missing":
        return key, f"key '{key}' is required but missing."
    if not clean and etype == "value_error":  # a check across keys (policy vs policies, ...)
        return key, clip(err["msg"].removeprefix("Value error, "), 600) + "."
    got = err.get("input")
    got_s = "a mapping" if isinstance(got, dict) else echo(got)
    return key, f"key '{key}': {clip(err['msg'].removeprefix('Value error, '), 400)} (got {got_s})."


def format_validation_error(exc: ValidationError, file: str | None, model) -> RecloopInputError:
    """Turn pydantic's errors into one paragraph naming the file, the key and what is allowed.

    Echoed values and keys are cut to about 200 characters, and at most four errors are shown.
    """
    errors = exc.errors()
    msgs = [_one_error(err, model)[1] for err in errors[:4]]
    more = len(errors) - 4
    if more > 0:
        msgs.append(f"({more} more error(s) not shown.)")
    return RecloopInputError(" ".join(msgs), file=file)


_KIND_KEYS = {"world": "world", "policy": "policy", "policies": "policy", "creators": "creator",
              "choice": "choice", "dynamics": "dynamics", "population": "population",
              "retrieval": "policy", "ranker": "policy", "base": "policy", "reranker": "reranker"}


def _kind_at(loc: list) -> str | None:
    for part in reversed([p for p in loc if isinstance(p, str)]):
        if part in _KIND_KEYS:
            return _KIND_KEYS[part]
    return None


def _unregistered_type_key(data: Any) -> str | None:
    """The dotted key of the first ``type:`` naming no registered component (for nested blocks such as a
    pipeline's ``retrieval``, whose validators report an unknown type without its place)."""
    known = {n for kind in registry.KINDS for n in registry.names(kind)}
    stack: list[tuple[list, Any]] = [([], data)]
    while stack:
        path, val = stack.pop()
        if isinstance(val, dict):
            t = val.get("type")
            if isinstance(t, str) and t not in known and not any(n.startswith(f"{t}-v") for n in known):
                return _key_text([*path, "type"])
            stack.extend(reversed([([*path, k], v) for k, v in val.items()]))
        elif isinstance(val, list):
            stack.extend(reversed([([*path, i], v) for i, v in enumerate(val)]))
    return None


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def check_numbers(data: Any, file: str | None = None) -> None:
    """Refuse integers outside int64 and non-finite floats anywhere in a scenario mapping.

    The schema bounds every known size and count; this guard also covers parameters without a bound
    (a plugin's, say), so ``10**100`` or ``.nan`` is a one-paragraph error, never a crash downstream.
    """
    stack: list[tuple[list, Any]] = [([], data)]
    while stack:
        path, val = stack.pop()
        if isinstance(val, dict):
            stack.extend(([*path, k], v) for k, v in val.items())
        elif isinstance(val, list):
            stack.extend(([*path, i], v) for i, v in enumerate(val))
        elif isinstance(val, int) and not isinstance(val, bool) and not INT64_MIN <= val <= INT64_MAX:
            raise RecloopInputError(f"the number {echo(val)} is out of range; numbers in a scenario must lie "
                                    f"between {INT64_MIN} and {INT64_MAX}.", file=file, key=_key_text(path))
        elif isinstance(val, float) and not math.isfinite(val):
            raise RecloopInputError(f"{val} is not allowed; give a finite number.", file=file, key=_key_text(path))


def validate_mapping(data: dict, file: str | None = None):
    """Validate a resolved scenario mapping against the scenario model (and :func:`check_numbers`)."""
    model = scenario_model()
    try:
        scenario = model.model_validate(data)
    except ValidationError as exc:
        raise format_validation_error(exc, file, model) from None
    except RecloopInputError as exc:  # raised inside a validator (an unknown nested component type)
        raise RecloopInputError(exc.detail, file=file, key=exc.key or _unregistered_type_key(data)) from None
    check_numbers(data, file)
    return scenario


def load_scenario(path: str | Path, overrides: dict[str, Any] | None = None):
    """Load, resolve ``extends`` and validate a scenario; ``overrides`` are dotted keys (``steps``)."""
    data = load_raw(path)
    for dotted, value in (overrides or {}).items():
        cur = data
        parts = dotted.split(".")
        for p in parts[:-1]:
            cur = cur.setdefault(p, {})
        cur[parts[-1]] = value
    return validate_mapping(data, file=str(path))
