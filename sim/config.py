"""Scenario files: YAML with ``extends:``, validated by pydantic models built from the registry.

Every component block is ``{type: <id>, ...params}``; the scenario model is a discriminated union of
all registered components of each kind, so unknown keys, wrong types and unknown ids are reported with
their path, the file and the allowed values (see :func:`format_validation_error`).
"""

from __future__ import annotations

import functools
import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import Field, ValidationError, create_model, model_validator

from recloop import registry
from recloop.errors import RecloopInputError, did_you_mean
from recloop.recommenders.llm.service import LLMConfig
from recloop.registry import Params

PositiveInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]


class EngineConfig(Params):
    """Scoring engine: backend switch and chunking (memory is bounded by one chunk)."""

    backend: Literal["auto", "numpy", "numba", "torch", "cupy"] = "auto"
    chunk_rows: PositiveInt | None = Field(None, description="users per chunk; default from chunk_mib")
    chunk_mib: Annotated[float, Field(gt=0)] = Field(16.0, description="target size of one score block")


class RetrainConfig(Params):
    """When and on what the policy retrains (the Chaney/Mansoury confounding protocol)."""

    every: PositiveInt = Field(1, description="retrain every n cycles")
    warm_start: bool = Field(True, description="continue from current parameters instead of from scratch")
    full_every: NonNegInt = Field(0, description="with warm_start, a from-scratch refit every n cycles (0: never)")
    data: Literal["all", "initial", "window"] = Field(
        "all", description="all logged data so far, the initial log only (control), or a recent window"
    )
    window: PositiveInt = Field(50, description="cycles kept when data=window")


class InitialLogConfig(Params):
    """The organic log the policy is first trained on (users choosing from random slates)."""

    interactions_per_user: NonNegInt = 10
    slate_size: PositiveInt = 20


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
    every: PositiveInt = 1
    pairs: PositiveInt = Field(800, description="fixed random user pairs for homogenization")
    user_sample: PositiveInt = Field(2000, description="users sampled for history-based metrics")
    regret_sample: NonNegInt = Field(1000, description="users sampled for the oracle regret (0: off)")


class OutputConfig(Params):
    """Run-store behaviour."""

    checkpoint_every: NonNegInt = Field(25, description="cycles between checkpoints (0: only at the end)")
    flush_every: PositiveInt = Field(10, description="cycles between metric flushes to Parquet parts")
    keep_checkpoints: PositiveInt = 2
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

        name: str = "scenario"
        description: str = ""
        seed: int = Field(0, description="the run seed; every component seed derives from it")
        replicates: PositiveInt = Field(1, description="seeds seed, seed+1, ... (bands across seeds in plots)")
        steps: PositiveInt = Field(100, description="cycles to simulate")
        k: PositiveInt = Field(10, description="slate size")
        world: World  # type: ignore[valid-type]
        users: UsersModel = Field(default_factory=UsersModel)  # type: ignore[valid-type]
        creators: Creator | None = None  # type: ignore[valid-type]
        policy: Policy | None = None  # type: ignore[valid-type]
        policies: dict[str, Policy] | None = Field(  # type: ignore[valid-type]
            None, description="several policies compared on identical worlds with common random numbers"
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


def shipped_scenario(name: str) -> Path | None:
    """Path of a scenario shipped in ``recloop.scenarios`` (``quickstart`` or ``quickstart.yaml``)."""
    fname = name if name.endswith((".yaml", ".yml")) else f"{name}.yaml"
    try:
        p = resources.files("recloop.scenarios").joinpath(fname)
    except ModuleNotFoundError:
        return None
    return Path(str(p)) if p.is_file() else None


def deep_merge(base: dict, over: dict) -> dict:
    """Child keys override parent keys; nested mappings merge; lists and scalars replace.

    A component block whose ``type`` changes replaces the parent block instead of merging with it.
    """
    out = dict(base)
    for key, val in over.items():
        if (
            isinstance(val, dict)
            and isinstance(out.get(key), dict)
            and val.get("type", out[key].get("type")) == out[key].get("type")
        ):
            out[key] = deep_merge(out[key], val)
        else:
            out[key] = val
    return out


def read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise RecloopInputError("file not found. Give the path of a scenario YAML file.", file=str(path)) from None
    except IsADirectoryError:
        raise RecloopInputError("is a directory, not a scenario YAML file.", file=str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecloopInputError(f"cannot be read ({exc}).", file=str(path)) from None
    if not text.strip():
        raise RecloopInputError(
            "the file is empty. A scenario needs at least 'world:' and 'policy:' (or 'policies:'); "
            "see scenarios/quickstart.yaml or run `recloop schema`.",
            file=str(path),
        )
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecloopInputError(f"YAML syntax error{where}: {problem}.", file=str(path)) from None
    if not isinstance(data, dict):
        raise RecloopInputError(
            f"the top level must be a mapping of keys (world:, policy:, ...), not {type(data).__name__}.",
            file=str(path),
        )
    return data


def load_raw(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """Read a scenario file and resolve its ``extends:`` chain into one mapping."""
    path = Path(path)
    if not path.exists() and shipped_scenario(str(path)) is not None:
        path = shipped_scenario(str(path))
    path = path.resolve() if path.exists() else path
    if path in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path))
        raise RecloopInputError(f"'extends' forms a cycle: {chain}.", file=str(_seen[0]), key="extends")
    data = read_yaml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise RecloopInputError("'extends' must be a file path (string).", file=str(path), key="extends")
    target = (path.parent / parent) if not Path(parent).is_absolute() else Path(parent)
    if not target.exists():
        shipped = shipped_scenario(parent)
        if shipped is None:
            raise RecloopInputError(
                f"the scenario it extends, '{parent}', does not exist (looked for {target} and for a shipped "
                "scenario of that name). Give a path relative to this file.",
                file=str(path),
                key="extends",
            )
        target = shipped
    return deep_merge(load_raw(target, (*_seen, path)), data)


def _walk(model, loc) -> tuple[list, list[str]]:
    """Follow a pydantic error location through the scenario model.

    Returns the user-facing key path (discriminated-union tags such as ``als`` dropped) and the field
    names valid at the last step (for 'did you mean' hints).
    """
    import typing

    from pydantic import BaseModel

    def models_of(tp):
        return [m for m in _union_members(tp) if isinstance(m, type) and issubclass(m, BaseModel)]

    cur = model
    clean: list = []
    for i, part in enumerate(loc):
        members = models_of(cur)
        if isinstance(part, str) and len(members) > 1:
            tagged = [m for m in members if "type" in m.model_fields
                      and typing.get_args(m.model_fields["type"].annotation) == (part,)]
            if tagged:
                cur = tagged[0]
                continue
        clean.append(part)
        if i == len(loc) - 1:
            break
        origin = typing.get_origin(cur)
        if len(members) == 1 and isinstance(part, str) and part in members[0].model_fields \
                and origin not in (list, dict):
            cur = members[0].model_fields[part].annotation
        else:
            inner = cur
            while typing.get_origin(inner) in (Union, Annotated) or typing.get_origin(inner) is getattr(
                    __import__("types"), "UnionType", None):
                args = [a for a in typing.get_args(inner) if a is not type(None)]
                inner = args[0]
            if typing.get_origin(inner) in (list, dict):
                cur = typing.get_args(inner)[-1]
            else:
                ms = models_of(inner)
                cur = ms[0].model_fields[part].annotation if ms and part in ms[0].model_fields else inner
    allowed = []
    ms = models_of(cur)
    if len(clean) and ms:
        # the last part is the offending key; its parent model lists the valid keys
        allowed = [f.alias or n for n, f in ms[0].model_fields.items()]
    return clean, allowed


def _union_members(tp) -> list:
    import typing

    out = []
    stack = [tp]
    while stack:
        t = stack.pop()
        origin = typing.get_origin(t)
        if origin is Annotated:
            stack.append(typing.get_args(t)[0])
        elif origin in (Union, getattr(__import__("types"), "UnionType", Union)):
            stack.extend(typing.get_args(t))
        elif origin in (list, dict):
            stack.append(typing.get_args(t)[-1])
        elif isinstance(t, type):
            out.append(t)
    return out


def format_validation_error(exc: ValidationError, file: str | None, model) -> RecloopInputError:
    """Turn pydantic's errors into one paragraph naming the file, the key and what is allowed."""
    msgs = []
    first_key = None
    for err in exc.errors()[:4]:
        loc = list(err["loc"])
        clean, allowed = _walk(model, loc)
        key = ".".join(str(p) for p in clean) or "(top level)"
        first_key = first_key or key
        etype = err["type"]
        if etype == "extra_forbidden":
            hint = did_you_mean(str(loc[-1]), allowed)
            msgs.append(f"key '{key}' is not allowed here.{hint} Allowed keys: {', '.join(allowed)}.")
        elif etype in ("union_tag_invalid", "literal_error") and (loc and loc[-1] == "type" or "tag" in etype):
            kind = _kind_at(clean)
            bad = err.get("input")
            bad = bad.get("type") if isinstance(bad, dict) else bad
            opts = registry.names(kind) if kind else []
            msgs.append(
                f"key '{key}': unknown {kind or 'component'} type '{bad}'.{did_you_mean(str(bad), opts)} "
                f"Allowed: {', '.join(opts)}."
            )
        elif etype == "union_tag_not_found":
            kind = _kind_at(clean)
            opts = registry.names(kind) if kind else []
            msgs.append(f"key '{key}' needs a 'type:' naming the component. Allowed types: {', '.join(opts)}.")
        elif etype == "missing":
            msgs.append(f"key '{key}' is required but missing.")
        else:
            got = err.get("input")
            got_s = repr(got) if not isinstance(got, dict) else "a mapping"
            msgs.append(f"key '{key}': {err['msg']} (got {got_s}).")
    more = len(exc.errors()) - 4
    if more > 0:
        msgs.append(f"({more} more error(s) not shown.)")
    return RecloopInputError(" ".join(msgs), file=file)


_KIND_KEYS = {"world": "world", "policy": "policy", "policies": "policy", "creators": "creator",
              "choice": "choice", "dynamics": "dynamics", "population": "population"}


def _kind_at(loc: list) -> str | None:
    for part in reversed([p for p in loc if isinstance(p, str)]):
        if part in _KIND_KEYS:
            return _KIND_KEYS[part]
    return None


def validate_mapping(data: dict, file: str | None = None):
    model = scenario_model()
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise format_validation_error(exc, file, model) from None


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
