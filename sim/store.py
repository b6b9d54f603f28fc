"""The run directory (a contract other tools read).

```
DIR/scenario.yaml       the fully resolved scenario
DIR/manifest.json       versions, seed(s), config hash, status, timings (per run and overall)
DIR/metrics.parquet     long format: policy, seed, step, metric, group, value (written at the end)
DIR/metrics.parts/      Parquet parts appended while the run goes (flat memory); merged at the end
DIR/interactions.parquet  what users consumed: policy, seed, step, user, item, position, provenance
                        (position -1: not from the slate; ``output.interactions``, capped per run by
                        ``output.interactions_max_rows``); parts in DIR/interactions.parts/ while running
DIR/checkpoints/        <policy>__seed<N>/step_<t>.npz + step_<t>.json (no pickle), atomic, the latest few kept
```
``metrics.parquet`` only appears when every run is complete, so a partial run never looks complete;
``recloop resume DIR`` continues from the latest checkpoints that verify and drops parts written after them.
Every file is written atomically (a temporary file, fsync, rename) with the permissions the umask allows;
a full disk ends the command with :class:`DiskFullError` and leaves what was written intact and resumable.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote

import polars as pl

from recloop.errors import RecloopInputError
from recloop.sim import checkpoint as ckpt

SCHEMA = {"policy": pl.Utf8, "seed": pl.Int64, "step": pl.Int64, "metric": pl.Utf8, "group": pl.Utf8,
          "value": pl.Float64}
INTERACTION_SCHEMA = {"policy": pl.Utf8, "seed": pl.Int64, "step": pl.Int64, "user": pl.Int64, "item": pl.Int64,
                      "position": pl.Int16, "provenance": pl.Utf8}
#: per-cycle tables besides the metrics: DIR/<name>.parquet, from parts in DIR/<name>.parts/
TABLES = {
    "interactions": INTERACTION_SCHEMA,
    # the homogenization metric's similar-user pairs of each measured cycle (M-HOMOG (ii)), which the
    # cross-run comparison with the ideal policy evaluates in both runs
    "similar_pairs": {"policy": pl.Utf8, "seed": pl.Int64, "step": pl.Int64, "user": pl.Int64, "partner": pl.Int64},
}
RUN_FILES = ("scenario.yaml", "manifest.json", "metrics.parquet", "metrics.parts", "checkpoints", "plots",
             "interactions", "llm_cache", "metrics.png",
             *(f"{name}.{ext}" for name in TABLES for ext in ("parquet", "parts")))
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
_PART = re.compile(r"^(?P<key>.+)__(?P<first>\d+)-(?P<last>\d+)\.parquet$")
_STEP = re.compile(r"^step_(?P<step>\d+)\.(?P<ext>json|npz)$")
_OS_ERROR = re.compile(r"os error (\d+)")


# -------------------------------------------------------------------------------------------- full disk
class DiskFullError(Exception):
    """The disk (or the quota) filled up while a run wrote its files. The CLI prints the one-line message
    and exits with code 1; everything written before stays intact, so the run can be resumed."""

    exit_code = 1

    def __init__(self, root: Path):
        self.root = Path(root)
        resumable = (self.root / "manifest.json").is_file() and (self.root / "scenario.yaml").is_file()
        then = (f"`recloop resume {self.root}` continues the run once space is free" if resumable
                else "run the command again once space is free")
        super().__init__(f"the disk is full (no space left while writing {self.root}); the files written so far "
                         f"are intact, and {then}.")


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or an exception it wraps: cause, context, a worker's cause) is a full disk or quota."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, DiskFullError) or (isinstance(exc, OSError) and exc.errno in DISK_FULL):
            return True
        m = _OS_ERROR.search(str(exc)) if type(exc).__module__.startswith("polars") else None
        if m and int(m.group(1)) in DISK_FULL:  # polars reports IO errors as "... (os error 28)"
            return True
        exc = exc.__cause__ or exc.__context__ or getattr(exc, "cause", None)
    return False


# ------------------------------------------------------------------------------------------ atomic files
def _file_mode() -> int:
    """The mode a plainly created file gets (0o666 less the umask): mkstemp would leave 0o600."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` through ``write(fh)`` into a temporary file, fsync it, then rename it into place:
    readers see the old file or the whole new one, never a torn one (also when the disk fills up)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, _file_mode())
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda fh: fh.write(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


# ------------------------------------------------------------------------------------------------ keys
def run_key(policy: str, seed: int) -> str:
    """The file-name key of one (policy, seed) run: ``<policy>__seed<N>``. Injective: names made of
    ``[A-Za-z0-9_.-]`` are kept as they are, any other character is percent-encoded (``m/f`` → ``m%2Ff``,
    ``m f`` → ``m%20f``, while ``m_f`` stays), and the seed is the last ``__seed`` suffix."""
    safe = quote(policy, safe="").replace("~", "%7E")
    if len(safe) > 150:  # keep file names under 255 bytes; "~" marks the hashed form (never in safe keys)
        import hashlib

        safe = f"{safe[:100]}~{hashlib.sha256(policy.encode('utf-8', 'surrogatepass')).hexdigest()[:24]}"
    return f"{safe}__seed{int(seed)}"


def check_keys(jobs: list[tuple[str, int]], root: Path) -> None:
    """Refuse runs that would share files: equal keys, or keys equal up to case (a case-insensitive file
    system, such as macOS's default, would merge their checkpoint directories)."""
    seen: dict[str, tuple[str, int]] = {}
    for policy, seed in jobs:
        k = run_key(policy, seed).casefold()
        if k in seen and seen[k] != (policy, seed):
            other = seen[k][0]
            raise RecloopInputError(
                f"policies '{other}' and '{policy}' differ only in letter case, so their runs would share files "
                "on a case-insensitive file system. Rename one of them.", file=str(root), key="policies")
        seen[k] = (policy, seed)


@dataclass(frozen=True)
class Checkpoint:
    """One complete checkpoint on disk: its step, its json (written last) and its npz."""

    step: int
    json: Path
    npz: Path


class RunStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    # -- creation -------------------------------------------------------------------------------
    def prepare(self, overwrite: bool = False) -> None:
        """Create the directory; refuse one that holds anything unless ``overwrite``."""
        root = self.root
        if root.exists() and not root.is_dir():
            raise RecloopInputError("exists and is a file, not a directory. Choose another --out.",
                                    file=str(root))
        if root.exists() and any(root.iterdir()):
            holds_run = (root / "manifest.json").exists() or (root / "scenario.yaml").exists()
            if not holds_run:  # --overwrite only ever replaces a run: never advise it for other files
                raise RecloopInputError(
                    "the output directory already holds files that are not a recloop run, and recloop never "
                    "deletes them (not even with --overwrite). Choose an empty or new directory for --out.",
                    file=str(root))
            if not overwrite:
                raise RecloopInputError(
                    "the output directory already holds another run. Pass --overwrite to replace it, "
                    "`recloop resume DIR` to continue it, or choose another --out.", file=str(root))
            self.remove_run_files()
        try:
            root.mkdir(parents=True, exist_ok=True)
            probe = root / ".recloop_write_test"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            if is_disk_full(exc):
                raise DiskFullError(root) from None
            raise RecloopInputError(
                f"the output directory cannot be written ({exc.strerror or exc}). Choose a writable --out.",
                file=str(root)) from None

    def remove_run_files(self) -> None:
        """Delete the files a run writes (never anything else in the directory)."""
        for name in RUN_FILES:
            p = self.root / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()

    # -- manifest -------------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    def read_manifest(self) -> dict[str, Any]:
        try:
            return json.loads(self.manifest_path.read_text())
        except FileNotFoundError:
            raise RecloopInputError("no manifest.json: this is not a recloop run directory.",
                                    file=str(self.root)) from None
        except json.JSONDecodeError as exc:
            raise RecloopInputError(f"manifest.json is not valid JSON ({exc.msg}).", file=str(self.root)) from None

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        atomic_write_text(self.manifest_path, json.dumps(manifest, indent=2, sort_keys=True, default=str))

    # -- metrics --------------------------------------------------------------------------------
    @property
    def parts_dir(self) -> Path:
        return self.root / "metrics.parts"

    @property
    def interaction_parts_dir(self) -> Path:
        return self.table_parts_dir("interactions")

    def table_parts_dir(self, name: str) -> Path:
        return self.root / f"{name}.parts"

    def write_part(self, key: str, first: int, last: int, rows: dict[str, list]) -> None:
        """Append the metric rows of cycles ``first..last`` of run ``key`` as one Parquet part (atomic)."""
        self._write_frame(self.parts_dir, key, first, last, pl.DataFrame(rows, schema=SCHEMA))

    def write_interactions_part(self, key: str, first: int, last: int, frame: pl.DataFrame) -> None:
        """Append the consumed (user, item) rows of cycles ``first..last`` of run ``key`` (atomic)."""
        self.write_table_part("interactions", key, first, last, frame)

    def write_table_part(self, name: str, key: str, first: int, last: int, frame: pl.DataFrame) -> None:
        """Append rows of the per-cycle table ``name`` (see :data:`TABLES`) for cycles ``first..last``."""
        self._write_frame(self.table_parts_dir(name), key, first, last, frame.select(
            [pl.col(c).cast(t) for c, t in TABLES[name].items()]))

    @staticmethod
    def _write_frame(folder: Path, key: str, first: int, last: int, frame: pl.DataFrame) -> None:
        buf = io.BytesIO()  # parts are small; writing them from Python makes a full disk a plain OSError
        frame.write_parquet(buf)
        atomic_write_bytes(folder / f"{key}__{first:07d}-{last:07d}.parquet", buf.getvalue())

    def parts(self, key: str | None = None, folder: Path | None = None) -> list[tuple[Path, int]]:
        """The parts (path, first cycle) of run ``key`` (of every run when None), by file name. The key is
        matched exactly, never by prefix, so no run can see another's parts."""
        folder = self.parts_dir if folder is None else folder
        if not folder.is_dir():
            return []
        out = []
        for p in sorted(folder.iterdir()):
            m = _PART.match(p.name)
            if m and (key is None or m["key"] == key):
                out.append((p, int(m["first"])))
        return out

    def drop_parts_after(self, key: str, step: int) -> None:
        """Remove parts of run ``key`` that start after ``step`` (written after its checkpoint)."""
        for folder in (self.parts_dir, *(self.table_parts_dir(name) for name in TABLES)):
            for p, first in self.parts(key, folder):
                if first > step:
                    p.unlink()

    def interaction_rows(self, key: str) -> int:
        """Rows of ``interactions.parts`` already written for run ``key`` (the cap counts them on resume)."""
        return sum(pl.scan_parquet(p).select(pl.len()).collect().item()
                   for p, _ in self.parts(key, self.interaction_parts_dir))

    def finalize_interactions(self) -> Path | None:
        """Merge the interaction parts into ``interactions.parquet`` (and the other tables likewise)."""
        for name in TABLES:
            if name != "interactions":
                self.finalize_table(name)
        return self.finalize_table("interactions")

    def finalize_table(self, name: str) -> Path | None:
        """Merge the parts of table ``name`` into ``<name>.parquet`` (streaming; by policy, seed, step)."""
        parts = [p for p, _ in self.parts(folder=self.table_parts_dir(name))]
        if not parts:
            return None
        out = self.root / f"{name}.parquet"
        tmp = self.root / f".{name}.parquet.tmp"
        try:  # each part is already in (step, user) order: a stable sort by run keeps it
            pl.scan_parquet([str(p) for p in parts]).sort(["policy", "seed", "step"], maintain_order=True) \
                .sink_parquet(tmp)
            os.replace(tmp, out)
        except BaseException as exc:
            tmp.unlink(missing_ok=True)
            if is_disk_full(exc) and not isinstance(exc, OSError):
                raise OSError(errno.ENOSPC, f"no space left while writing {out}") from exc
            raise
        return out

    def finalize_metrics(self) -> Path:
        """Merge all parts into ``metrics.parquet`` (streaming; sorted by policy, seed, step)."""
        parts = [p for p, _ in self.parts()]
        out = self.root / "metrics.parquet"
        tmp = self.root / ".metrics.parquet.tmp"
        try:
            if parts:
                lf = pl.scan_parquet([str(p) for p in parts]).sort(["policy", "seed", "step", "metric", "group"])
                lf.sink_parquet(tmp)
            else:
                pl.DataFrame(schema=SCHEMA).write_parquet(tmp)
            os.replace(tmp, out)
        except BaseException as exc:
            tmp.unlink(missing_ok=True)
            if is_disk_full(exc) and not isinstance(exc, OSError):
                raise OSError(errno.ENOSPC, f"no space left while writing {out}") from exc
            raise
        return out

    def read_metrics(self) -> pl.DataFrame:
        """Metrics of a finished run, or the parts written so far of an unfinished one."""
        final = self.root / "metrics.parquet"
        if final.exists():
            return pl.read_parquet(final)
        parts = [p for p, _ in self.parts()]
        if not parts:
            raise RecloopInputError("holds no metrics (no metrics.parquet and no metrics.parts/). Run "
                                    "`recloop run` first.", file=str(self.root))
        return pl.read_parquet([str(p) for p in parts])

    # -- checkpoints ----------------------------------------------------------------------------
    def checkpoint_dir(self, key: str) -> Path:
        return self.root / "checkpoints" / key

    def save_checkpoint(self, key: str, step: int, state: dict, run: dict[str, Any], keep: int = 2) -> None:
        """Write the checkpoint of run ``key`` after ``step`` cycles: the npz, then the json that marks it
        complete (``run``: config hash, seed, policy, key, checked on resume); keep the newest ``keep``."""
        d = self.checkpoint_dir(key)
        skeleton, arrays = ckpt.flatten(state)
        npz = d / f"step_{step:07d}.npz"
        atomic_write(npz, lambda fh: ckpt.write_npz(fh, arrays))
        meta = ckpt.make_meta(step=step, skeleton=skeleton, npz_path=npz, run=run)
        atomic_write_text(d / f"step_{step:07d}.json", json.dumps(meta, allow_nan=False, separators=(",", ":")))
        self._rotate(d, keep)

    def _rotate(self, d: Path, keep: int) -> None:
        """Delete all but the newest ``keep`` complete checkpoints (json first: it marks completeness),
        npz files without a json, and temporary files of interrupted writes."""
        kept = {c.npz.name for c in self.checkpoints_in(d)[:keep]}
        for c in self.checkpoints_in(d)[keep:]:
            c.json.unlink(missing_ok=True)
        for p in d.iterdir():
            m = _STEP.match(p.name)
            if (m and m["ext"] == "npz" and p.name not in kept) or p.name.startswith(".step_"):
                p.unlink(missing_ok=True)

    @staticmethod
    def checkpoints_in(d: Path) -> list[Checkpoint]:
        """The complete checkpoints (those with a json) in ``d``, newest first."""
        if not d.is_dir():
            return []
        out = []
        for p in d.iterdir():
            m = _STEP.match(p.name)
            if m and m["ext"] == "json":
                out.append(Checkpoint(int(m["step"]), p, p.with_suffix(".npz")))
        return sorted(out, key=lambda c: c.step, reverse=True)

    def checkpoints(self, key: str) -> list[Checkpoint]:
        """The complete checkpoints of run ``key``, newest first."""
        return self.checkpoints_in(self.checkpoint_dir(key))

    def load_checkpoint(self, ck: Checkpoint, expect: dict[str, Any]) -> dict:
        """The verified state of ``ck`` (sha256, format, step and ``expect``); CheckpointError otherwise."""
        return ckpt.load(ck.json, ck.npz, ck.step, expect)

    def legacy_checkpoints(self) -> list[Path]:
        """Pickle checkpoints of older recloop versions (never loaded: unpickling can run code)."""
        d = self.root / "checkpoints"
        return sorted(d.glob("*/*.pkl")) if d.is_dir() else []
