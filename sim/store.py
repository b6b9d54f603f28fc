"""The run directory (a contract other tools read).

```
DIR/scenario.yaml       the fully resolved scenario
DIR/manifest.json       versions, seed(s), config hash, status, timings (per run and overall)
DIR/metrics.parquet     long format: policy, seed, step, metric, group, value (written at the end)
DIR/metrics.parts/      Parquet parts appended while the run goes (flat memory); merged at the end
DIR/checkpoints/        <policy>__seed<N>/step_<t>.pkl, atomic, the latest few kept
```
``metrics.parquet`` only appears when every run is complete, so a partial run never looks complete;
``recloop resume DIR`` continues from the latest checkpoints and drops parts written after them.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import polars as pl

from recloop.errors import RecloopInputError

SCHEMA = {"policy": pl.Utf8, "seed": pl.Int64, "step": pl.Int64, "metric": pl.Utf8, "group": pl.Utf8,
          "value": pl.Float64}
RUN_FILES = ("scenario.yaml", "manifest.json", "metrics.parquet", "metrics.parts", "checkpoints", "plots",
             "interactions", "llm_cache", "metrics.png")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def run_key(policy: str, seed: int) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", policy)
    return f"{safe}__seed{seed}"


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
            if not overwrite:
                what = "another run" if holds_run else "other files"
                raise RecloopInputError(
                    f"the output directory already holds {what}. Pass --overwrite to replace a previous run, "
                    "`recloop resume DIR` to continue it, or choose another --out.", file=str(root))
            if not holds_run:
                raise RecloopInputError(
                    "the output directory holds files that are not a recloop run; refusing to overwrite them "
                    "even with --overwrite. Choose an empty or new directory.", file=str(root))
            self.remove_run_files()
        try:
            root.mkdir(parents=True, exist_ok=True)
            probe = root / ".recloop_write_test"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
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

    def write_part(self, key: str, first: int, last: int, rows: dict[str, list]) -> None:
        df = pl.DataFrame(rows, schema=SCHEMA)
        path = self.parts_dir / f"{key}__{first:07d}-{last:07d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        df.write_parquet(tmp)
        os.replace(tmp, path)

    def drop_parts_after(self, key: str, step: int) -> None:
        """Remove parts of run ``key`` that start after ``step`` (written after its checkpoint)."""
        for p in self.parts_dir.glob(f"{key}__*.parquet"):
            first = int(p.stem.rsplit("__", 1)[1].split("-")[0])
            if first > step:
                p.unlink()

    def finalize_metrics(self) -> Path:
        """Merge all parts into ``metrics.parquet`` (streaming; sorted by policy, seed, step)."""
        parts = sorted(self.parts_dir.glob("*.parquet"))
        out = self.root / "metrics.parquet"
        tmp = self.root / ".metrics.parquet.tmp"
        if parts:
            lf = pl.scan_parquet([str(p) for p in parts]).sort(["policy", "seed", "step", "metric", "group"])
            lf.sink_parquet(tmp)
        else:
            pl.DataFrame(schema=SCHEMA).write_parquet(tmp)
        os.replace(tmp, out)
        return out

    def read_metrics(self) -> pl.DataFrame:
        """Metrics of a finished run, or the parts written so far of an unfinished one."""
        final = self.root / "metrics.parquet"
        if final.exists():
            return pl.read_parquet(final)
        parts = sorted(self.parts_dir.glob("*.parquet"))
        if not parts:
            raise RecloopInputError("holds no metrics (no metrics.parquet and no metrics.parts/). Run "
                                    "`recloop run` first.", file=str(self.root))
        return pl.read_parquet([str(p) for p in parts])

    # -- checkpoints ----------------------------------------------------------------------------
    def checkpoint_dir(self, key: str) -> Path:
        return self.root / "checkpoints" / key

    def save_checkpoint(self, key: str, step: int, state: dict, keep: int = 2) -> None:
        d = self.checkpoint_dir(key)
        atomic_write_bytes(d / f"step_{step:07d}.pkl", pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL))
        ckpts = sorted(d.glob("step_*.pkl"))
        for old in ckpts[:-keep]:
            old.unlink()

    def latest_checkpoint(self, key: str) -> tuple[int, dict] | None:
        d = self.checkpoint_dir(key)
        for p in sorted(d.glob("step_*.pkl"), reverse=True):
            try:
                with open(p, "rb") as fh:
                    return int(p.stem.split("_")[1]), pickle.load(fh)
            except (EOFError, pickle.UnpicklingError):
                continue  # a torn file cannot happen with atomic writes, but never trust it blindly
        return None
