"""The arithmetic of K-means, apart from how the data is spread: seeding, center updates, assignment.

Everything random takes an explicit numpy Generator, so a run is a pure function of its seed.
"""

from __future__ import annotations

import numpy as np
import torch

from kmim.contract.codebook import Assigner, normalize_rows

__all__ = [  # Assigner: the one nearest-center search (kmim/contract/codebook.py), re-exported here
    "Assigner",
    "accumulate",
    "kmeans_plus_plus",
    "largest_remainder",
    "lloyd_update",
    "minibatch_update",
    "split_largest",
]


def kmeans_plus_plus(
    x: np.ndarray, k: int, rng: np.random.Generator, weights: np.ndarray | None = None
) -> np.ndarray:
    """k-means++ (Arthur & Vassilvitskii 2007) on points x [n, D], optionally weighted: D² sampling."""
    n = len(x)
    w = np.ones(n) if weights is None else weights.astype(np.float64)
    x64 = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    sq = (x64 * x64).sum(1)
    chosen = [int(rng.choice(n, p=w / w.sum()))]
    d2 = torch.clamp(sq - 2 * x64 @ x64[chosen[0]] + sq[chosen[0]], min=0).double().numpy()
    for _ in range(1, k):
        p = w * d2
        total = p.sum()
        if total <= 0:  # fewer distinct points than k: take any point not chosen yet
            rest = np.setdiff1d(np.arange(n), chosen)
            idx = int(rng.choice(rest)) if len(rest) else int(rng.integers(n))
        else:
            idx = int(np.searchsorted(np.cumsum(p), rng.random() * total, side="right"))
            idx = min(idx, n - 1)
        chosen.append(idx)
        new = torch.clamp(sq - 2 * x64 @ x64[idx] + sq[idx], min=0).double().numpy()
        np.minimum(d2, new, out=d2)
    return x[chosen].astype(np.float32)


def accumulate(x: np.ndarray, labels: np.ndarray, k: int, sums: torch.Tensor, counts: np.ndarray) -> None:
    """sums[c] += Σ x[labels == c] (float32 per chunk, float64 across chunks); counts likewise."""
    part = torch.zeros(k, x.shape[1], dtype=torch.float32)
    part.index_add_(0, torch.from_numpy(labels), torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
    sums += part.double()
    counts += np.bincount(labels, minlength=k)


def split_largest(centers: np.ndarray, counts: np.ndarray, empty: list[int], rng: np.random.Generator) -> int:
    """Re-seed each empty cluster by splitting the currently largest one in two (as faiss does)."""
    counts = counts.astype(np.float64).copy()
    for j in empty:
        big = int(np.argmax(counts))
        scale = 1e-3 * (float(np.abs(centers[big]).mean()) + 1e-8)
        delta = scale * rng.standard_normal(centers.shape[1]).astype(np.float32)
        centers[j] = centers[big] + delta
        centers[big] = centers[big] - delta
        counts[j] = counts[big] / 2
        counts[big] -= counts[j]
    return len(empty)


def lloyd_update(
    sums: np.ndarray, counts: np.ndarray, old: np.ndarray, rng: np.random.Generator, spherical: bool
) -> tuple[np.ndarray, int]:
    """New centers = mean of their points; empty ones re-seeded. Returns (centers, re-seeds)."""
    centers = old.copy()
    nonempty = counts > 0
    centers[nonempty] = (sums[nonempty] / counts[nonempty, None]).astype(np.float32)
    reseeds = split_largest(centers, counts, [int(j) for j in np.flatnonzero(~nonempty)], rng)
    if spherical:
        centers = normalize_rows(centers)
    return centers, reseeds


def minibatch_update(
    centers: np.ndarray, seen: np.ndarray, batch_sums: np.ndarray, batch_counts: np.ndarray, spherical: bool
) -> None:
    """Sculley (2010) in batch form: each center moves toward its batch mean with rate m / (seen + m)."""
    hit = batch_counts > 0
    seen[hit] += batch_counts[hit]
    rate = (batch_counts[hit] / seen[hit])[:, None]
    means = batch_sums[hit] / batch_counts[hit, None]
    centers[hit] = ((1 - rate) * centers[hit] + rate * means).astype(np.float32)
    if spherical:
        centers[:] = normalize_rows(centers)  # in place: the caller's array is the state


def largest_remainder(total: int, weights: list[int]) -> list[int]:
    """Split `total` into integer parts proportional to `weights` (deterministic)."""
    w = np.asarray(weights, dtype=np.float64)
    exact = total * w / w.sum()
    parts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - parts), kind="stable")[: total - parts.sum()]:
        parts[i] += 1
    return [int(min(p, wi)) for p, wi in zip(parts, weights)]
