"""Token-class alignment similarity (TCAS, paper eq. 8) and codebook usage.

R [K, C] counts patches of code i with true class j. Codes that never occur are dropped (l1 = codes
that occur). R̄ = R normalised by rows, C = R̄ R̄ᵀ, and

    TCAS = (1/l1) Σ_i (1 − C_ii)² + (1/l1²) Σ_{i≠i'} C_ii'²

The second sum is computed as ‖R̄ᵀR̄‖_F² − Σ_i C_ii², never forming the l1 × l1 matrix, so K = 16,384
costs about what K = 50 does. Eq. 8 also writes the first term as (1 − ‖R̄(i)‖₂)², which differs
(C_ii = ‖R̄(i)‖₂²); `form="C"` (default) uses C_ii, `form="norm"` the other.
"""

from __future__ import annotations

import numpy as np

FORMS = ("C", "norm")


def tcas(cooc: np.ndarray, form: str = "C") -> dict:
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    r = np.asarray(cooc, dtype=np.float64)
    k = r.shape[0]
    r = r[r.sum(axis=1) > 0]
    l1 = r.shape[0]
    if l1 == 0:
        return {"tcas": None, "k": k, "l1": 0, "classes": int(cooc.shape[1]), "form": form}
    rbar = r / r.sum(axis=1, keepdims=True)  # [l1, C]
    diag = (rbar * rbar).sum(axis=1)  # C_ii
    per_code = ((1 - diag) if form == "C" else (1 - np.sqrt(diag))) ** 2
    first = float(per_code.sum() / l1)
    # Not in the paper: eq. 8 weighs every used code alike, so a codebook whose few rare codes are pure and whose
    # one big code is mixed scores well; weighting each code by its share of the patches exposes that.
    weighted_first = float((per_code * r.sum(axis=1)).sum() / r.sum())
    gram = rbar.T @ rbar  # [C, C]; ‖R̄ᵀR̄‖_F² = Σ_{i,i'} C_ii'²
    second = float(max((gram * gram).sum() - (diag * diag).sum(), 0.0) / l1**2)
    return {
        "tcas": first + second,
        "first_term": first,
        "second_term": second,
        "patch_weighted_first_term": weighted_first,
        "k": k,
        "l1": l1,
        "classes": int(cooc.shape[1]),
        "form": form,
    }


def usage(code_counts: np.ndarray) -> dict:
    """Used and dead codes, and the perplexity exp(H) of the code distribution."""
    n = np.asarray(code_counts, dtype=np.float64)
    total = n.sum()
    p = n[n > 0] / total if total else np.zeros(0)
    return {
        "k": len(n),
        "used_codes": int((n > 0).sum()),
        "dead_codes": int((n == 0).sum()),
        "perplexity": float(np.exp(-(p * np.log(p)).sum())) if len(p) else 0.0,
        "patches": int(total),
    }
