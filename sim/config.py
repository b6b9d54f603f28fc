"""Scenario files: YAML with ``extends:``, validated by pydantic models built from the registry.

Every component block is ``{type: <id>, ...params}``; the scenario model is a discriminated union of
all registered components of each kind, so unknown keys, wrong types and unknown ids are reported with
their path, the file and the allowed values (see :func:`format_validation_error`).
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal, Union

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
from recloop.component import Child
from recloop.errors import RecloopInputError
from recloop.limits import (
    MAX_K,
    MAX_REPLICATES,
    MAX_SAMPLE,
    MAX_SEED,
    MAX_STEPS,
    POLICY_NAME_PATTERN,
    Seed,
)
from recloop.registry import Params
from recloop.sim.llm_settings import LLMConfig
from recloop.sim.scenario_errors import _unregistered_type_key, check_numbers, format_validation_error
from recloop.sim.scenario_yaml import (  # noqa: F401  (re-exported: the public loading API lives here)
    check_node_graph,
    deep_merge,
    load_raw,
    parse_yaml,
    read_text_bounded,
    read_yaml,
    shipped_scenario,
)

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

    include: list[Child("metric", by_name=True)] | None = Field(  # type: ignore[valid-type]
        None, description="metric components: ids, or blocks with parameters ({type: homogenization, "
                          "pairs: 800}); default: every default component")
    exclude: list[str] = Field(default_factory=list, description="metric component ids left out")
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
    interactions: bool = Field(True, description="write what users consumed to DIR/interactions.parquet "
                                                 "(step, user, item, position, provenance)")
    interactions_max_rows: Annotated[int, Field(ge=0, le=10**9)] = Field(
        10**7, description="rows of interactions.parquet kept per (policy, seed) run; later cycles are dropped "
                           "and the manifest says from which step")


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
    return _scenario_model(registry.fingerprint())


def json_schema() -> dict[str, Any]:
    schema = scenario_model().model_json_schema()
    schema["properties"]["extends"] = {"type": "string", "description": "a scenario file (or shipped name) to extend"}
    return schema


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
