"""Data loaders for the data-set worlds: MovieLens-100K from the installed ``recbole`` wheel and any
delimited interactions file, parsed into a :class:`RatingsTable` with contiguous user/item codes.

Loaders are cached (per files, or per path, modification time and columns), so the truth fit
(:mod:`recloop.sim.truth`), which keys its cache on the table object, is shared between worlds.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from recloop.errors import RecloopInputError

ML100K = "MovieLens-100K"
INSTALL_HINT = "pip install --no-deps recbole==1.2.1"


@dataclass(eq=False)  # hashed by identity: loaders are cached, so the fit cache keys on the table
class RatingsTable:
    """A parsed interaction data set with contiguous codes (users 0..U-1, items 0..I-1)."""

    name: str
    source: str
    user: np.ndarray  # (n,) int64
    item: np.ndarray  # (n,) int64
    rating: np.ndarray | None  # (n,) float64, None = every row is a positive
    timestamp: np.ndarray  # (n,) float64 (file order when the data has none)
    user_ids: list[str]  # original ids
    item_ids: list[str]
    titles: list[str] | None = None  # (I,) real titles
    item_genres: list[list[str]] | None = None  # (I,) genre labels per item
    user_attributes: dict[str, np.ndarray] = field(default_factory=dict)



# -- MovieLens-100K ----------------------------------------------------------------------------
def recbole_ml100k_dir() -> Path | None:
    """Where the installed ``recbole`` wheel keeps ml-100k (``dataset_example/ml-100k``), or None.

    Looks the package up with ``importlib.util.find_spec`` without importing it (recbole needs torch).
    """
    try:
        spec = importlib.util.find_spec("recbole")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "dataset_example" / "ml-100k"


def ml100k_files() -> dict[str, Path]:
    root = recbole_ml100k_dir()
    if root is None:
        raise RecloopInputError(
            f"the {ML100K} data set needs the 'recbole' package, which is not installed; it ships the data "
            f"under recbole/dataset_example/ml-100k/. Install it with `{INSTALL_HINT}` (no other "
            "dependencies are needed: recloop reads the files without importing recbole).",
            key="world.type",
        )
    files = {kind: root / f"ml-100k.{kind}" for kind in ("inter", "item", "user")}
    missing = [str(path) for path in files.values() if not path.is_file()]
    if missing:
        raise RecloopInputError(
            f"the {ML100K} data set is incomplete: expected {', '.join(missing)} in {root}. "
            "Reinstall it with `pip install --force-reinstall --no-deps recbole==1.2.1`.",
            key="world.type",
        )
    return files


def _read_atomic(path: Path) -> dict[str, list[str]]:
    """A RecBole atomic file (tab-separated, typed header ``name:type``) as columns of strings."""
    import polars as pl

    try:
        df = pl.read_csv(path, separator="\t", quote_char=None, infer_schema=False, encoding="utf8-lossy")
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad data file
        raise RecloopInputError(f"cannot read {ML100K} file {path}: {exc}.") from exc
    return {name.split(":", 1)[0]: df[name].fill_null("").to_list() for name in df.columns}


def _ml_title(title: str, year: str) -> str:
    """The MovieLens title as in the original u.item, e.g. 'Toy Story (1995)'.

    RecBole splits the year off; item 267 is 'unknown' in the original (RecBole: 'unkonwn').
    """
    if title == "unkonwn" and year == "unkonwn":
        return "unknown"
    return f"{title} ({year})" if year else title


@functools.lru_cache(maxsize=2)
def load_ml100k(inter: Path, item: Path, user: Path) -> RatingsTable:
    """Parse MovieLens-100K from RecBole's atomic files into a :class:`RatingsTable`."""
    it, us, ra = _read_atomic(item), _read_atomic(user), _read_atomic(inter)
    for cols, need, path in ((it, ("item_id", "movie_title", "release_year", "class"), item),
                             (us, ("user_id", "age", "gender", "occupation"), user),
                             (ra, ("user_id", "item_id", "rating", "timestamp"), inter)):
        lost = [c for c in need if c not in cols]
        if lost:
            raise RecloopInputError(f"{ML100K} file {path} lacks the column(s) {', '.join(lost)}.")
    item_ids = it["item_id"]
    user_ids = us["user_id"]
    i_code = {v: k for k, v in enumerate(item_ids)}
    u_code = {v: k for k, v in enumerate(user_ids)}
    try:
        users = np.array([u_code[v] for v in ra["user_id"]], np.int64)
        items = np.array([i_code[v] for v in ra["item_id"]], np.int64)
    except KeyError as exc:
        raise RecloopInputError(f"{ML100K} file {inter} names an unknown user or item {exc}.") from exc
    return RatingsTable(
        name=ML100K,
        source=str(inter.parent),
        user=users,
        item=items,
        rating=np.asarray(ra["rating"], dtype=np.float64),
        timestamp=np.asarray(ra["timestamp"], dtype=np.float64),
        user_ids=user_ids,
        item_ids=item_ids,
        titles=[_ml_title(t, y) for t, y in zip(it["movie_title"], it["release_year"], strict=True)],
        item_genres=[c.split() for c in it["class"]],
        user_attributes={
            "age": np.asarray(us["age"], dtype=np.int64),
            "gender": np.asarray(us["gender"], dtype=str),
            "occupation": np.asarray(us["occupation"], dtype=str),
        },
    )



# -- bring your own data set ----------------------------------------------------------------
@functools.lru_cache(maxsize=2)
def load_csv(
    path: str, mtime: float, sep: str, user_col: str, item_col: str, rating_col: str | None,
    timestamp_col: str | None, title_col: str | None, genre_col: str | None, genre_sep: str,
) -> RatingsTable:
    """Parse a delimited interactions file (cached per path, modification time and columns)."""
    import polars as pl

    try:
        df = pl.read_csv(path, separator=sep, infer_schema=False, encoding="utf8-lossy")
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad data file
        raise RecloopInputError(f"cannot read it as a table separated by {sep!r}: {exc}.", file=path) from exc
    wanted = {"user_col": user_col, "item_col": item_col, "rating_col": rating_col,
              "timestamp_col": timestamp_col, "title_col": title_col, "genre_col": genre_col}
    for key, col in wanted.items():
        if col is not None and col not in df.columns:
            raise RecloopInputError(
                f"no column '{col}' (set by {key}); the file's columns are {', '.join(df.columns)}.",
                file=path, key=f"world.{key}",
            )
    df = df.filter(pl.col(user_col).is_not_null() & pl.col(item_col).is_not_null())
    if df.height == 0:
        raise RecloopInputError("the file has no rows with both a user and an item.", file=path)
    user_ids, user = np.unique(np.asarray(df[user_col].to_list(), dtype=str), return_inverse=True)
    item_ids, item = np.unique(np.asarray(df[item_col].to_list(), dtype=str), return_inverse=True)

    def numeric(col: str, key: str) -> np.ndarray:
        try:
            return df[col].str.strip_chars().cast(pl.Float64).fill_null(np.nan).to_numpy()
        except Exception as exc:  # noqa: BLE001 - a non-numeric cell
            raise RecloopInputError(f"column '{col}' must hold numbers.", file=path, key=f"world.{key}") from exc

    rating = numeric(rating_col, "rating_col") if rating_col else None
    ts = numeric(timestamp_col, "timestamp_col") if timestamp_col else np.arange(df.height, dtype=np.float64)
    first_row = np.zeros(len(item_ids), np.int64)
    first_row[item[::-1]] = np.arange(len(item))[::-1]  # each item's first row
    titles = genres = None
    if title_col:
        col = df[title_col].fill_null("").to_list()
        titles = [col[r] or f"Item {item_ids[j]}" for j, r in enumerate(first_row)]
    if genre_col:
        col = df[genre_col].fill_null("").to_list()
        genres = [[g.strip() for g in col[r].split(genre_sep) if g.strip()] for r in first_row]
    return RatingsTable(
        name=os.path.basename(path),
        source=path,
        user=user.astype(np.int64),
        item=item.astype(np.int64),
        rating=rating,
        timestamp=ts,
        user_ids=user_ids.tolist(),
        item_ids=item_ids.tolist(),
        titles=titles,
        item_genres=genres,
    )
