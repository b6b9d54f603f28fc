"""Generation-phase statistics of one R1 augmenter round (:mod:`.role_augment`): L-HALL rates, the
popularity of the matched titles (LPD, head share, KS to the catalog), cold share and malformed rate.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from recloop.analysis import llm_metrics as L
from recloop.analysis.metrics import short_head_mask

__all__ = ["generation_stats"]


def generation_stats(
    col: dict[str, Any], pop: np.ndarray, phantom: np.ndarray, n_users: int, n_aug: int, n_new: int
) -> dict[str, float]:
    """The statistics of a round from its collected answers (``LLMAugmented._collect``), the items'
    popularity before the round, the phantom flags, and the counts of users, augmented pairs and
    new phantom items."""

    hall_matches, matched_items = col["hall_matches"], col["matched_items"]
    out_pops, ref_pops = col["out_pops"], col["ref_pops"]
    stats: dict[str, float] = {}
    if hall_matches:
        hs = L.hallucination_stats(hall_matches, col["cands_used"])
        stats.update(
            hall_rate=hs["hall_rate"],
            duplicate_rate=hs["duplicate_rate"],
            out_of_candidate_rate=hs["out_of_candidate_rate"],
            match_score=hs["mean_match_score"],
            n_generated=hs["n_generated"],
        )
        stats["lpd"] = L.lpd(out_pops, ref_pops) if out_pops else float("nan")
        real_pop = pop[~phantom[: len(pop)]]
        real_ids = np.flatnonzero(~phantom[: len(pop)])
        if matched_items and real_pop.sum() > 0:
            remap = np.full(len(pop), -1, np.int64)
            remap[real_ids] = np.arange(len(real_ids))
            items = remap[np.asarray(matched_items, np.int64)]
            dist = L.distributional_popbias(items[items >= 0], real_pop, short_head_mask(real_pop))
            stats["head_share"] = dist["head_share"]
            stats["ks_catalog"] = dist["ks_catalog"]
        stats["cold_share"] = col["n_cold_out"] / len(matched_items) if matched_items else float("nan")
    stats["malformed_rate"] = col["n_fallback"] / n_users if n_users else float("nan")
    stats["augmented"] = float(n_aug)
    stats["new_phantoms"] = float(n_new)
    return stats
