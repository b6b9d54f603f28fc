"""Seeding: one seed per run, spread to every component, independent of chunking and resume.

Two mechanisms, both pure functions of (seed, component, step, ...):

* :func:`component_rng` gives a ``numpy.random.Generator`` for a component at a step, derived with
  ``SeedSequence(seed, spawn_key=...)`` (the same tree ``SeedSequence.spawn`` builds), so a resumed run
  draws exactly what an uninterrupted one would.
* :func:`hash_uniform` is a counter-based generator (SplitMix64 finaliser) giving a uniform number for
  any (key, a, b) triple, e.g. (step, user, position). Per-user noise therefore does not depend on
  how users are chunked, on the worker count or on which users are active.
"""

from __future__ import annotations

import zlib

import numpy as np

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)


def component_id(name: str) -> int:
    """A stable integer id for a component name (crc32; stable across Python runs)."""
    return zlib.crc32(name.encode())


def component_seed(seed: int, name: str, *extra: int) -> np.random.SeedSequence:
    return np.random.SeedSequence(entropy=int(seed), spawn_key=(component_id(name), *map(int, extra)))


def component_rng(seed: int, name: str, *extra: int) -> np.random.Generator:
    """A generator for component ``name`` (at ``extra`` = step, ...): reproducible and independent."""
    return np.random.default_rng(component_seed(seed, name, *extra))


def derive_key(seed: int, name: str, *extra: int) -> np.uint64:
    """A 64-bit key for :func:`hash_uniform`, derived from the run seed and a component name."""
    state = component_seed(seed, name, *extra).generate_state(2, dtype=np.uint64)
    return np.uint64(state[0] ^ state[1])


def _mix(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


def hash_u64(key: np.uint64, a, b=0) -> np.ndarray:
    """64-bit hash of (key, a, b) with broadcasting; a and b are integer arrays."""
    with np.errstate(over="ignore"):
        a = np.asarray(a).astype(np.uint64)
        b = np.asarray(b).astype(np.uint64)
        z = _mix(np.uint64(key) + _GOLDEN * (a + np.uint64(1)))
        return _mix(z ^ (b * _GOLDEN + np.uint64(0x632BE59BD9B4E019)))


def hash_uniform(key: np.uint64, a, b=0, dtype=np.float64) -> np.ndarray:
    """Uniform numbers in the open interval (0, 1) indexed by (key, a, b)."""
    h = hash_u64(key, a, b) >> np.uint64(11)
    return ((h.astype(np.float64) + 0.5) * (1.0 / 9007199254740992.0)).astype(dtype, copy=False)


def hash_gumbel(key: np.uint64, a, b=0, dtype=np.float32) -> np.ndarray:
    """Standard Gumbel noise indexed by (key, a, b) (for Gumbel-max logit sampling)."""
    u = hash_uniform(key, a, b)
    return (-np.log(-np.log(u))).astype(dtype, copy=False)
