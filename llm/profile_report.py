"""The per-refresh report of the R2 profiler (:mod:`.role_profile`): each profiled user's claims scored
against the user's history (L-PROFHALL, stereotyped claims), and the refresh's summary figures that the
``llm_profile`` metric (:mod:`.profile_metrics`) emits.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from recloop.analysis import llm_metrics as L

__all__ = ["refresh_stats", "user_record"]


def user_record(
    u: int,
    claims: list[tuple[str, str]],
    shares: np.ndarray,
    prior: np.ndarray,
    names: list[str],
    side: dict[str, Any],
    *,
    tau_like: float,
    tau_dis: float,
) -> dict[str, Any]:
    """One profiled user's entry of the report: the claims and their L-PROFHALL scores."""

    ph = L.profile_hallucination(
        claims,
        shares,
        names,
        tau_like=tau_like,
        tau_dis=tau_dis,
        side_info=side,
        prior=prior,
    )
    return {
        "user": u,
        "claims": claims,
        "prof_hall": ph["prof_hall"],
        "stereotyped_rate": ph["stereotyped_rate"],
        "n_claims": int(ph["n_claims"]),
        "n_supported": int(ph["n_supported"]),
        "demographic_claims": sum(1 for c in claims if c[0] == "claims"),
        "shares": {names[g]: round(float(s), 4) for g, s in enumerate(shares) if s > 0},
        "demographics": side,
    }


def refresh_stats(
    per_user: list[dict[str, Any]], n_failed: int, n_requested: int, n_profiles: int, stability: float
) -> dict[str, float]:
    """The summary figures of one refresh from its users' entries (:func:`user_record`)."""
    ph_vals = [d["prof_hall"] for d in per_user if np.isfinite(d["prof_hall"])]
    st_vals = [d["stereotyped_rate"] for d in per_user if np.isfinite(d["stereotyped_rate"])]
    n_claims = sum(d["n_claims"] for d in per_user)
    return {
        "prof_hall": float(np.mean(ph_vals)) if ph_vals else float("nan"),
        "prof_hall_micro": (1.0 - sum(d["n_supported"] for d in per_user) / n_claims)
        if n_claims
        else float("nan"),
        "stereotyped_rate": float(np.mean(st_vals)) if st_vals else float("nan"),
        "claims_per_profile": n_claims / len(per_user) if per_user else float("nan"),
        "demographic_claim_share": (sum(d["demographic_claims"] for d in per_user) / n_claims)
        if n_claims
        else float("nan"),
        "no_claim_share": (sum(1 for d in per_user if d["n_claims"] == 0) / len(per_user))
        if per_user
        else float("nan"),
        "malformed_rate": n_failed / n_requested if n_requested else float("nan"),
        "profiles": float(n_profiles),
        "stability": stability,
    }
