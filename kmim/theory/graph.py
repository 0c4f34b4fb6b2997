"""Mask graph with tokenized targets and the augmentation graph it induces (paper section 3.2, eq. 3).

The toy data are described by a membership matrix Z [N, S]: Z[x, a] = 1 when point x belongs to class P_a.
A datum picks a class uniformly and then an ordered pair (x1, x2) uniformly from P_a × P_a, so

    M(x1, x2) = (1/S) Σ_a Z[x1, a] Z[x2, a] / n²                       (joint of a complementary pair)
    M(x1, S_i) = Σ_{x2 ∈ S_i} M(x1, x2)                                 (eq. 3, the mask graph)
    p(S_i)     = Σ_{x2 ∈ S_i} M(x2) = Σ_{x1} M(x1, S_i)
    A(x1, x1+) = Σ_i M(x1, S_i) M(x1+, S_i) / p(S_i)                     (= E_{S_i} M(x1|S_i) M(x1+|S_i))
    Ā          = D^{-1/2} A D^{-1/2},  D(x1) = Σ_{x1+} A(x1, x1+) = M(x1)

Everything is dense numpy in float64: the toy model is small, and exactness matters more than speed here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Graphs:
    """The graphs of one (data, tokenizer) pair; N points, l tokens."""

    joint: np.ndarray  # [N, N] M(x1, x2)
    mask: np.ndarray  # [N, l] M(x1, S_i), eq. 3
    token_prob: np.ndarray  # [l] p(S_i)
    aug: np.ndarray  # [N, N] A(x1, x1+)
    degree: np.ndarray  # [N] D(x1) = M(x1)
    norm: np.ndarray  # [N, N] Ā


def one_hot(tokens: np.ndarray) -> np.ndarray:
    """[N] token ids 0..l-1 -> [N, l] indicator of x2 ∈ S_i."""
    tokens = np.asarray(tokens)
    out = np.zeros((len(tokens), int(tokens.max()) + 1))
    out[np.arange(len(tokens)), tokens] = 1.0
    return out


def joint(membership: np.ndarray, n: int) -> np.ndarray:
    """M(x1, x2) [N, N]: both views drawn from one class, the class picked uniformly among S."""
    z = membership.astype(np.float64)
    return z @ z.T / (z.shape[1] * n * n)


def mask_graph(joint: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """M(x1, S_i) [N, l] = Σ_{x2 ∈ S_i} M(x1, x2) (eq. 3), summed literally."""
    return joint @ one_hot(tokens)


def augmentation(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A [N, N] and p(S_i) [l]. Tokens with no point (p = 0) are dropped: they have no edges."""
    p = mask.sum(axis=0)
    keep = p > 0
    mask, p = mask[:, keep], p[keep]
    return (mask / p) @ mask.T, p


def normalize(aug: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ā = D^{-1/2} A D^{-1/2} and D; every toy point has M(x1) > 0, so D is invertible."""
    d = aug.sum(axis=1)
    s = 1.0 / np.sqrt(d)
    return aug * s[:, None] * s[None, :], d


def build(membership: np.ndarray, n: int, tokens: np.ndarray) -> Graphs:
    """The dense graphs, straight from the definitions: the reference the closed forms are checked against."""
    pairs = joint(membership, n)
    mask = mask_graph(pairs, tokens)
    aug, p = augmentation(mask)
    norm, d = normalize(aug)
    return Graphs(joint=pairs, mask=mask, token_prob=p, aug=aug, degree=d, norm=norm)


def eigenvalues(norm: np.ndarray) -> np.ndarray:
    """Eigenvalues of the symmetric Ā, largest first."""
    return np.linalg.eigvalsh(norm)[::-1]


def per_class_counts(membership: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """[S, l]: how many points of class a each token holds (Zᵀ 1_S without the [N, l] one-hot)."""
    k = int(tokens.max()) + 1
    return np.stack([np.bincount(tokens[membership[:, a]], minlength=k) for a in range(membership.shape[1])])


def sum_sq_and_alpha(membership: np.ndarray, n: int, tokens: np.ndarray) -> tuple[float, float]:
    """Σλ² and α of any partition, on the quotient by region, for the many random partitions of Theorem 1.

    M(x1, S_i) depends on x1 only through its row of Z, so A, D and Ā are constant on blocks of points with
    the same classes ("regions", S + S(S-1)/2 of them). With c_r points in region r:
    Σλ² = ‖Ā‖_F² = Σ_{r,r'} c_r c_r' Ā_{rr'}² and α = Σ_{r,r' disjoint} c_r c_r' A_{rr'}: no [N, N] matrix,
    no eigendecomposition. The tests check both against the dense graphs.
    """
    rows, count = np.unique(membership, axis=0, return_counts=True)  # regions [U, S], points per region [U]
    z = rows.astype(np.float64)
    mask = z @ per_class_counts(membership, tokens) / (z.shape[1] * n * n)  # [U, l] M(x1, S_i) per region
    p = count @ mask
    mask, p = mask[:, p > 0], p[p > 0]
    aug = (mask / p) @ mask.T  # [U, U]
    d = aug @ count
    weight = np.outer(count, count)
    sum_sq = float((weight * aug**2 / np.outer(d, d)).sum())
    return sum_sq, float((weight * aug)[(z @ z.T) == 0].sum())


def label_mismatch(aug: np.ndarray, membership: np.ndarray) -> float:
    """α = E_{(x1, x1+) ~ A} 1[y(x1) ≠ y(x1+)], A summing to 1.

    A shared point belongs to two classes, so its label is the set of its classes; two points disagree when
    no class holds both. For S = 2 this counts exactly the (P1∖P2, P2∖P1) pairs, as eq. 19 does
    (α = 2 (n - m)² p12 / 2n); the paper does not spell out α for S > 2.
    """
    z = membership.astype(np.float64)
    disjoint = (z @ z.T) == 0
    return float(aug[disjoint].sum())
