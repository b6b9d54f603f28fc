"""Upper bounds on scenario input, so absurd or hostile files get a clear error instead of a crash.

The bounds are sanity limits far beyond any real study (they are not tuned to a machine): they keep a
typo such as ``n_users: 10**100`` or a YAML alias bomb from turning into a traceback, a hang or a
MemoryError. Every numeric bound is a pydantic ``Field(ge=..., le=...)`` constraint, so ``recloop
schema`` shows it.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

# -- the YAML document ---------------------------------------------------------------------------
MAX_FILE_BYTES = 1 << 20  #: a scenario file (and each file it extends) is at most 1 MiB
MAX_YAML_DEPTH = 64  #: nesting levels of mappings and lists (after alias expansion)
MAX_YAML_NODES = 100_000  #: YAML nodes after alias expansion ("billion laughs" guard)
MAX_EXTENDS = 16  #: files in one ``extends:`` chain

# -- messages ------------------------------------------------------------------------------------
MAX_ECHO = 200  #: characters of a user's value echoed in an error message
MAX_MESSAGE = 2000  #: characters of a whole error message

# -- numbers -------------------------------------------------------------------------------------
MAX_SEED = 2**32 - 1  #: seeds are 32-bit: numpy's legacy RandomState, implicit and scikit-learn need that
MAX_REPLICATES = 1000
MAX_STEPS = 1_000_000  #: cycles of a run (and any "every n cycles" period)
MAX_K = 10_000  #: slate size, candidate lists, sampled slates
MAX_USERS = 100_000_000  #: users of a world (and any per-cycle user sample)
MAX_ITEMS = 10_000_000  #: items of a world (and any item count such as new items per cycle)
MAX_DIM = 4096  #: latent dimensions, factors, clusters' dimension
MAX_CLUSTERS = 100_000  #: clusters, creators' groups
MAX_CREATORS = 1_000_000
MAX_ITERATIONS = 100_000  #: training iterations, retries, shuffles, windows
MAX_THREADS = 1024
MAX_SAMPLE = 100_000_000  #: sampled users or pairs for metrics, initial-log interactions per user, batch sizes
MAX_TOKENS = 1_000_000  #: tokens or characters of one LLM answer
MAX_BUDGET = 10**15  #: LLM budgets (calls, tokens)
POLICY_NAME_PATTERN = r"^[A-Za-z0-9_.-]{1,100}$"  #: names under ``policies:`` (they name files of a run)

Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
