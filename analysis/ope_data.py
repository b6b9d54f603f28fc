"""Logged bandit feedback for off-policy evaluation (:mod:`recloop.analysis.ope`): the log's arrays, the
file format, and the Open Bandit Dataset sample.

A log is one row per **impression**: the item shown (``action``, 0..A-1), the slot it was shown in
(``position``, 0..P-1), the reward it earned (``reward``, a click 0/1 or any value in [0, 1]) and the
logging policy's probability of showing that item in that slot (``pscore``, in (0, 1]); optionally a
context per row. This is the Open Bandit Dataset's layout (Saito et al. 2021): each position of a slate
is its own row, with the marginal propensity of its item at its position.

Files (``recloop ope LOG``): a CSV or Parquet file with columns ``action`` (int), ``position`` (int,
0-based), ``reward`` (float in [0, 1]) and ``pscore`` (float in (0, 1]); other columns are ignored. The
number of actions A and positions P are the largest ids plus one.

The Open Bandit Dataset (OBD) sample -- 10,000 rounds per logging policy and campaign, 80 items, 3
positions, from ZOZOTOWN -- ships inside the ``obp==0.4.1`` wheel (``pip install --no-deps obp==0.4.1``;
``scripts/setup.sh`` does it). recloop reads its CSV files and the Bernoulli-TS prior file directly with
polars and PyYAML: obp's own modules are never imported (they break on current pandas), and nothing is
downloaded at run time.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import yaml

from recloop.errors import RecloopInputError, clip, did_you_mean

__all__ = ["BanditLog", "LOG_COLUMNS", "OBD_BEHAVIORS", "OBD_CAMPAIGNS", "load_log", "load_obd", "obd_dir",
           "obd_prior", "read_log_file"]

LOG_COLUMNS = ("action", "position", "reward", "pscore")
OBD_BEHAVIORS = ("random", "bts")
OBD_CAMPAIGNS = ("all", "men", "women")
OBP_HINT = ("The Open Bandit Dataset sample ships inside the obp wheel: install it with "
            "`python3 -m pip install --no-deps obp==0.4.1` (scripts/setup.sh does).")


@dataclass(frozen=True)
class BanditLog:
    """Logged bandit feedback, one row per impression (see the module docstring).

    ``n_actions``/``n_positions`` default to the largest logged id plus one; ``context`` (n, ...) is carried
    for target policies that use it (the estimators' reward model does not). ``name`` says where it came from.
    """

    action: np.ndarray
    position: np.ndarray
    reward: np.ndarray
    pscore: np.ndarray
    n_actions: int = 0
    n_positions: int = 0
    context: np.ndarray | None = None
    name: str = "log"

    def __post_init__(self) -> None:
        cols = {c: np.asarray(getattr(self, c)) for c in LOG_COLUMNS}
        n = len(cols["action"])
        for c, arr in cols.items():
            if arr.ndim != 1 or len(arr) != n:
                raise RecloopInputError(f"'{c}' must be a 1-D array of the same length as 'action' ({n}).", key=c)
        if n == 0:
            raise RecloopInputError("the log has no rows.", key="action")
        ints = {c: _as_ids(cols[c], c) for c in ("action", "position")}
        floats = {c: cols[c].astype(np.float64) for c in ("reward", "pscore")}
        _check_range(floats["reward"], "reward", 0.0, 1.0, "in [0, 1] (a click 0/1 or a bounded reward)")
        _check_range(floats["pscore"], "pscore", np.nextafter(0.0, 1.0), 1.0,
                     "in (0, 1] (the logging policy's probability of the logged action at its position)")
        for c, v in {**ints, **floats}.items():
            object.__setattr__(self, c, v)
        for attr, c in (("n_actions", "action"), ("n_positions", "position")):
            top = int(ints[c].max()) + 1
            given = int(getattr(self, attr) or top)
            if given < top:
                raise RecloopInputError(f"{attr}={given} but the log has {c} ids up to {top - 1}.", key=c)
            object.__setattr__(self, attr, given)
        if self.context is not None and len(self.context) != n:
            raise RecloopInputError(f"'context' must have one row per log row ({n}).", key="context")

    def __len__(self) -> int:
        return len(self.action)

    @property
    def cell(self) -> np.ndarray:
        """The flat (action, position) index ``action * P + position`` of each row."""
        return self.action * self.n_positions + self.position


def _as_ids(arr: np.ndarray, name: str) -> np.ndarray:
    """``arr`` as int64 ids >= 0 (floats must be whole numbers)."""
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
            raise RecloopInputError("must hold whole numbers (ids).", key=name)
    elif arr.dtype.kind not in "iub":
        raise RecloopInputError(f"must hold integer ids, not {arr.dtype}.", key=name)
    ids = arr.astype(np.int64)
    if ids.min() < 0:
        raise RecloopInputError(f"ids must be >= 0 (found {int(ids.min())}); positions are 0-based.", key=name)
    return ids


def _check_range(x: np.ndarray, name: str, lo: float, hi: float, allowed: str) -> None:
    bad = ~np.isfinite(x) | (x < lo) | (x > hi)
    if bad.any():
        i = int(np.argmax(bad))
        raise RecloopInputError(f"row {i} has {name}={x[i]!r}; every {name} must be {allowed}.", key=name)


# ------------------------------------------------------------------------------------------- files
def read_log_file(path: str | Path) -> BanditLog:
    """A :class:`BanditLog` from a CSV or Parquet file with columns ``action, position, reward, pscore``."""
    path = Path(path)
    if not path.is_file():
        raise RecloopInputError("no such log file. Give a CSV or Parquet file with columns "
                                f"{', '.join(LOG_COLUMNS)}, or obd:random / obd:bts.", file=str(path))
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            df = pl.read_parquet(path)
        else:
            df = pl.read_csv(path, infer_schema_length=10_000)
    except Exception as exc:  # noqa: BLE001 - polars raises many types for unreadable files
        raise RecloopInputError(f"cannot read the log ({clip(exc)}). Give a CSV or Parquet file with columns "
                                f"{', '.join(LOG_COLUMNS)}.", file=str(path)) from None
    missing = [c for c in LOG_COLUMNS if c not in df.columns]
    if missing:
        raise RecloopInputError(f"missing column(s) {', '.join(missing)}; a log needs {', '.join(LOG_COLUMNS)} "
                                f"(found: {clip(', '.join(df.columns))}).", file=str(path))
    try:
        return BanditLog(*(df[c].to_numpy() for c in LOG_COLUMNS), name=path.name)
    except RecloopInputError as exc:
        raise RecloopInputError(exc.detail, file=str(path), key=exc.key) from None


def load_log(spec: str | Path) -> BanditLog:
    """The log named by ``spec``: ``obd:random`` / ``obd:bts`` (campaign ``all``), ``obd:BEHAVIOR:CAMPAIGN``,
    or a path to a CSV/Parquet file (:func:`read_log_file`)."""
    text = str(spec)
    if not text.startswith("obd:"):
        return read_log_file(text)
    parts = text.split(":")
    behavior = parts[1] if len(parts) > 1 else ""
    campaign = parts[2] if len(parts) > 2 else "all"
    if len(parts) > 3 or behavior not in OBD_BEHAVIORS or campaign not in OBD_CAMPAIGNS:
        raise RecloopInputError(
            f"unknown Open Bandit Dataset log {clip(text)!r}.{did_you_mean(text, ['obd:random', 'obd:bts'])} "
            f"Allowed: obd:random, obd:bts (campaign all), or obd:<random|bts>:<{'|'.join(OBD_CAMPAIGNS)}>.",
            key="LOG")
    return load_obd(behavior, campaign)


# ------------------------------------------------------------------------------------ the OBD sample
def obd_dir() -> Path:
    """The folder of the installed obp package (found, not imported), or a :class:`RecloopInputError`."""
    spec = importlib.util.find_spec("obp")
    if spec is None or not spec.submodule_search_locations:
        raise RecloopInputError(f"the obp package is not installed. {OBP_HINT}")
    return Path(list(spec.submodule_search_locations)[0])


def load_obd(behavior: str = "random", campaign: str = "all") -> BanditLog:
    """The OBD sample logged by ``behavior`` (``random`` or ``bts``) for ``campaign``, ordered by time as obp
    orders it; positions 1..3 become 0..2. 10,000 rows, 80 actions, 3 positions for campaign ``all``."""
    path = obd_dir() / "dataset" / "obd" / behavior / campaign / f"{campaign}.csv"
    if not path.is_file():
        raise RecloopInputError(f"the Open Bandit Dataset sample is missing from the obp package. {OBP_HINT}",
                                file=str(path))
    df = pl.read_csv(path, columns=["timestamp", "item_id", "position", "click", "propensity_score"])
    df = df.sort("timestamp", maintain_order=True)
    items = pl.read_csv(path.parent / "item_context.csv", columns=["item_id"])
    return BanditLog(df["item_id"].to_numpy(), df["position"].to_numpy() - 1, df["click"].to_numpy(),
                     df["propensity_score"].to_numpy(), n_actions=int(items["item_id"].max()) + 1,
                     name=f"obd:{behavior}:{campaign}")


def obd_prior(campaign: str = "all") -> tuple[np.ndarray, np.ndarray]:
    """The Beta(alpha_i, beta_i) prior per item that ZOZOTOWN's Bernoulli Thompson sampling started from
    (obp's ``policy/conf/prior_bts.yaml``) for ``campaign``."""
    path = obd_dir() / "policy" / "conf" / "prior_bts.yaml"
    if not path.is_file():
        raise RecloopInputError(f"the Bernoulli-TS prior file is missing from the obp package. {OBP_HINT}",
                                file=str(path))
    data = yaml.safe_load(path.read_text())
    if campaign not in data:
        raise RecloopInputError(f"no prior for campaign {clip(campaign)!r}; allowed: {', '.join(data)}.",
                                file=str(path))
    return (np.asarray(data[campaign]["alpha"], np.float64), np.asarray(data[campaign]["beta"], np.float64))
