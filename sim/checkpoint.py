"""Checkpoints without pickle: a nested state becomes a JSON skeleton plus named numpy arrays.

A checkpoint of run ``<key>`` at cycle ``t`` is two files in ``DIR/checkpoints/<key>/``:

``step_<t>.npz``
    the arrays, written with :func:`numpy.savez` and read back with ``allow_pickle=False`` (an object
    array, which would need unpickling, is refused);
``step_<t>.json``
    the format version, the sha256 and size of the npz, the run's config hash, seed, policy and key, the
    step, and the JSON skeleton of the nested state. It is written last, so it marks a complete checkpoint.

The skeleton keeps every value's exact type: ``None``, ``bool``, ``int``, ``str`` and finite ``float`` are
JSON values; lists are JSON arrays; every other node is a one-key object (``{"$dict": {...}}``,
``{"$tuple": [...]}``, ``{"$float": "nan"}``, ``{"$array": "a0"}`` for an ndarray, ``{"$scalar": "a1"}``
for a numpy scalar, both naming an entry of the npz). Nothing else is allowed: a component converts its
objects to these in ``state_dict()`` (and back in ``load_state_dict()``).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import zipfile
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

FORMAT = "recloop-checkpoint/1"
ALLOWED = ("dicts with str keys, lists, tuples, None, bool, int, float, str, numpy arrays (no object dtype) "
           "and numpy scalars")
_TAGS = ("$dict", "$tuple", "$float", "$array", "$scalar")


class CheckpointError(ValueError):
    """A checkpoint on disk cannot be used; the message says which file and what is wrong."""


# ------------------------------------------------------------------------------------------------ flatten
def flatten(state: Any, root: str = "state") -> tuple[Any, dict[str, np.ndarray]]:
    """``state`` as (JSON skeleton, {name: ndarray}); TypeError naming the dotted path of anything else."""
    arrays: dict[str, np.ndarray] = {}
    return _flat(state, root, arrays), arrays


def _unsupported(obj: Any, path: str, why: str = "") -> TypeError:
    kind = f"{type(obj).__module__}.{type(obj).__qualname__}"
    return TypeError(f"cannot checkpoint {path} (a {kind}{why}): checkpoints hold only {ALLOWED}. Convert it to "
                     "those in the component's state_dict() and back in load_state_dict().")


def _flat(obj: Any, path: str, arrays: dict[str, np.ndarray]) -> Any:
    if obj is None or type(obj) in (bool, int, str):
        return obj
    if type(obj) is float:
        return obj if math.isfinite(obj) else {"$float": repr(obj)}
    if type(obj) is list:
        return [_flat(v, f"{path}[{i}]", arrays) for i, v in enumerate(obj)]
    if type(obj) is tuple:
        return {"$tuple": [_flat(v, f"{path}[{i}]", arrays) for i, v in enumerate(obj)]}
    if type(obj) is dict:
        return {"$dict": {_key(k, path): _flat(v, f"{path}.{k}", arrays) for k, v in obj.items()}}
    if type(obj) is np.ndarray or isinstance(obj, np.generic):
        arr = np.asarray(obj)
        if arr.dtype.hasobject:
            raise _unsupported(obj, path, f" of dtype {arr.dtype}")
        name = f"a{len(arrays)}"
        arrays[name] = arr
        return {"$array" if type(obj) is np.ndarray else "$scalar": name}
    raise _unsupported(obj, path)


def _key(k: Any, path: str) -> str:
    if type(k) is not str:
        raise TypeError(f"cannot checkpoint {path}: its dict key {k!r} is a {type(k).__name__}; checkpoints hold "
                        f"only {ALLOWED}. Convert the key in the component's state_dict().")
    return k


# ---------------------------------------------------------------------------------------------- unflatten
def unflatten(skeleton: Any, arrays: dict[str, np.ndarray], root: str = "state") -> Any:
    """The state :func:`flatten` took apart; CheckpointError when the two do not fit together."""
    used: set[str] = set()
    out = _unflat(skeleton, arrays, root, used)
    extra = sorted(set(arrays) - used)
    if extra:
        raise CheckpointError(f"the npz holds arrays the skeleton does not use ({', '.join(extra[:5])})")
    return out


def _unflat(node: Any, arrays: dict[str, np.ndarray], path: str, used: set[str]) -> Any:
    if node is None or type(node) in (bool, int, str, float):
        return node
    if type(node) is list:
        return [_unflat(v, arrays, f"{path}[{i}]", used) for i, v in enumerate(node)]
    if type(node) is not dict or len(node) != 1 or next(iter(node)) not in _TAGS:
        raise CheckpointError(f"malformed skeleton at {path}")
    tag, val = next(iter(node.items()))
    if tag == "$dict" and type(val) is dict:
        return {k: _unflat(v, arrays, f"{path}.{k}", used) for k, v in val.items()}
    if tag == "$tuple" and type(val) is list:
        return tuple(_unflat(v, arrays, f"{path}[{i}]", used) for i, v in enumerate(val))
    if tag == "$float" and val in ("nan", "inf", "-inf"):
        return float(val)
    if tag in ("$array", "$scalar") and type(val) is str:
        return _array(val, arrays, path, used, scalar=tag == "$scalar")
    raise CheckpointError(f"malformed skeleton at {path}")


def _array(name: str, arrays: dict[str, np.ndarray], path: str, used: set[str], scalar: bool) -> Any:
    if name not in arrays:
        raise CheckpointError(f"the npz lacks array '{name}' ({path})")
    if name in used:
        raise CheckpointError(f"array '{name}' is used twice ({path})")
    used.add(name)
    arr = arrays[name]
    if not scalar:
        return arr
    if arr.ndim != 0:
        raise CheckpointError(f"{path} should be a numpy scalar but array '{name}' has shape {arr.shape}")
    return arr[()]


# ---------------------------------------------------------------------------------------------------- files
def write_npz(fh: BinaryIO, arrays: dict[str, np.ndarray]) -> None:
    """Write the arrays as an (uncompressed) npz to an open binary file."""
    np.savez(fh, **arrays)


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of an npz, loaded without pickle; CheckpointError when it is not a clean npz."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except ValueError as exc:  # numpy refuses object arrays without allow_pickle (and bad headers)
        raise CheckpointError(f"{path.name} cannot be read without pickle ({exc})") from None
    except (zipfile.BadZipFile, EOFError, OSError, KeyError) as exc:
        raise CheckpointError(f"{path.name} is not a readable npz ({type(exc).__name__}: {exc})") from None
    odd = [name for name, a in arrays.items() if type(a) is not np.ndarray]
    if odd:
        raise CheckpointError(f"{path.name} holds entries that are not .npy arrays ({', '.join(odd[:5])})")
    return arrays


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def make_meta(*, step: int, skeleton: Any, npz_path: Path, run: dict[str, Any]) -> dict[str, Any]:
    """The json companion of an npz: what it is, whose it is, and how to check it."""
    return {"format": FORMAT, "step": int(step), "npz": npz_path.name, "npz_sha256": sha256_file(npz_path),
            "npz_bytes": npz_path.stat().st_size, **run, "skeleton": skeleton}


def read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path.name} is not readable JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path.name} is not a checkpoint description")
    return meta


def verify(meta: dict[str, Any], npz_path: Path, step: int, expect: dict[str, Any]) -> None:
    """Raise CheckpointError unless the json describes this npz, this step and this run (``expect``)."""
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"format {meta.get('format')!r} is not {FORMAT!r}")
    if meta.get("step") != step:
        raise CheckpointError(f"the json says step {meta.get('step')!r}, the file name says {step}")
    for name, want in expect.items():
        if meta.get(name) != want:
            raise CheckpointError(f"its {name} is {meta.get(name)!r}, this run's is {want!r}")
    if not npz_path.is_file():
        raise CheckpointError(f"{npz_path.name} is missing")
    got = sha256_file(npz_path)
    if got != meta.get("npz_sha256"):
        raise CheckpointError(f"{npz_path.name} does not match the sha256 recorded in the json (the file was "
                              "changed or damaged)")


def load(json_path: Path, npz_path: Path, step: int, expect: dict[str, Any]) -> Any:
    """The verified state of one checkpoint (never unpickles anything)."""
    meta = read_meta(json_path)
    verify(meta, npz_path, step, expect)
    return unflatten(meta.get("skeleton"), read_npz(npz_path))


# ------------------------------------------------------------------------------------------------ helpers
def pack_strings(strings: list[str]) -> dict[str, np.ndarray]:
    """A list of str as two arrays (UTF-8 bytes and offsets): exact, compact, and no object dtype."""
    encoded = [s.encode("utf-8", "surrogatepass") for s in strings]
    offsets = np.zeros(len(encoded) + 1, np.int64)
    np.cumsum(np.fromiter((len(b) for b in encoded), np.int64, len(encoded)), out=offsets[1:])
    return {"utf8": np.frombuffer(b"".join(encoded), np.uint8).copy(), "offsets": offsets}


def unpack_strings(packed: dict[str, np.ndarray]) -> list[str]:
    """The list :func:`pack_strings` packed."""
    data, offsets = bytes(np.asarray(packed["utf8"], np.uint8)), np.asarray(packed["offsets"], np.int64).tolist()
    return [data[a:b].decode("utf-8", "surrogatepass") for a, b in zip(offsets[:-1], offsets[1:])]


def roundtrip(state: Any) -> Any:
    """``state`` after the trip through a checkpoint (npz in memory, JSON skeleton): what a resume sees.
    Used by the conformance kit and the tests."""
    skeleton, arrays = flatten(state)
    buf = io.BytesIO()
    write_npz(buf, arrays)
    buf.seek(0)
    with np.load(buf, allow_pickle=False) as npz:
        loaded = {name: npz[name] for name in npz.files}
    return unflatten(json.loads(json.dumps(skeleton, allow_nan=False)), loaded)
