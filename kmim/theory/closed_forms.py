"""The paper's closed forms for the toy model (eqs. 5-7, 18, 19, 21-26, 28-30), printed as they are, and the
corrected forms where a printed one is wrong.

Definitions shared with the numerics (kmim.theory.graph), fixed by the MAE rows that do agree:
- w_intra: A(x1, x1+) for two non-shared points of the same class (appendix B's block p11 / 2n);
- w_inter: A(x1, x1+) for non-shared points of two different classes (block p12 / 2n);
- B / c = Σλ² + c3 α with c3 = 5/2 (eq. 20: B = c1 Σλ² + c2 α, written c (Σλ² + c3 α)).

Every printed form is compared as printed. Where we believe one is wrong, its `note` says why, and a row
marked "fixed" gives our derivation, so that the table shows both the disagreement and what does agree.
The B forms are series in t = m/n: their constant term is compared with the numeric B/c of the same model
at m = 0 ("t→0"), the truncated series at the actual t only shown ("series", never flagged).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

C3 = 2.5  # eq. 20: c3 = 5/2

EXACT, LIMIT, SERIES = "exact", "t0", "series"


@dataclass(frozen=True)
class Form:
    """One closed form: which quantity, which equation, its value, how it is compared, why it may be wrong."""

    quantity: str  # w_intra | w_inter | alpha | sum_sq_eig | B/c
    equation: str
    value: float
    kind: str = EXACT  # EXACT: same config; LIMIT: constant term vs numerics at m = 0; SERIES: shown only
    note: str = ""


@dataclass(frozen=True)
class Counts:
    """Per token S_i of a two-class toy: n_{i,1} points of P1∖P2, n_{i,2} of P2∖P1, n_{i,3} of P1∩P2."""

    only1: np.ndarray
    only2: np.ndarray
    shared: np.ndarray

    @property
    def weight(self) -> np.ndarray:
        """n_{i,1} + n_{i,2} + 2 n_{i,3} = 2n p(S_i): a shared point has twice the marginal."""
        return self.only1 + self.only2 + 2 * self.shared


def _blocks(n: int, c: Counts) -> tuple[float, float, float]:
    """p11, p22, p12 of eqs. 11-13 (eq. 13 by its first line: its last line's n_{i,3}² is a slip)."""
    a, b, w = c.only1 + c.shared, c.only2 + c.shared, c.weight
    return (float((a * a / w).sum()) / n**2, float((b * b / w).sum()) / n**2, float((a * b / w).sum()) / n**2)


def alpha_eq19(n: int, m: int, c: Counts) -> float:
    a, b = c.only1 + c.shared, c.only2 + c.shared
    return (n - m) ** 2 / n**3 * float((a * b / c.weight).sum())


def sum_sq_eig_eq18(n: int, m: int, c: Counts) -> float:
    """Eq. 18 as printed, with p13 and p23 from the last lines of eqs. 14-15 and p33 = 1/n (eq. 16)."""
    p11, p22, p12 = _blocks(n, c)
    w = c.weight
    p13 = float(((c.only1 + c.shared) * (c.only1 + 2 * c.shared) / w).sum()) * math.sqrt(2) / (2 * n**2)
    p23 = float(((c.only2 + c.shared) * (c.only2 + 2 * c.shared) / w).sum()) * math.sqrt(2) / (2 * n**2)
    return (n - m) ** 2 * (p11**2 + p22**2 + 2 * p12**2) + (n - m) * m * (p13**2 + p23**2) + m**2 / n**2


def sum_sq_eig_fixed(n: int, m: int, c: Counts) -> float:
    """Σλ² = ‖Ā‖_F² summed block by block. A shared x1+ has M(x1+, S_i) = n_{i,·} weight / 2n² and
    p(S_i) = weight / 2n, so M(x1+|S_i) = 1/n for every token: A(x1, x1+) = M(x1)/n for any x1, hence
    p13 = p23 = √2/(2n) whatever the tokenizer, and the two (P∖, P∩) blocks appear twice in ‖Ā‖_F²."""
    p11, p22, p12 = _blocks(n, c)
    return (n - m) ** 2 * (p11**2 + p22**2 + 2 * p12**2) + m * (2 * n - m) / n**2


NOTE_EQ24 = (
    "both token classes contribute (n-m/2)(m/2)/(4n^4) / p(S_i), p(S_i) = 1/2, so "
    "A = m(n-m/2)/(2n^4): eq. 24 is half of it (appendix B's rule w_inter = p12/4n would also "
    "halve MAE and cross, which do equal p12/2n)"
)
NOTE_EQ18 = (
    "the (P1\\P2, P1^P2) and (P2\\P1, P1^P2) blocks count twice in ||A||_F^2, not once, and "
    "eqs. 14-15 leave the other class's points of S_i out of M(x1+, S_i) for a shared x1+; in fact "
    "M(x1+|S_i) = 1/n, so p13 = p23 = sqrt(2)/(2n) and Σλ² = (n-m)²(p11²+p22²+2p12²) + m(2n-m)/n²"
)
NOTE_EQ25 = (
    "eq. 25's own middle line tends to 1 + c/2 = 9/4 at t = 0 (A-bar has rank 1, so Σλ² = 1, "
    "and α = 1/2); 7/2 would need c = 5"
)
NOTE_EQ29_INTRA = "half of eq. 24 at s = 2, which agrees; exact [(n-(s-1)m/2)² + (s-1)(m/2)²] / (s n^4)"
NOTE_EQ29_INTER = (
    "exact [m(n-(s-1)m/2) + (s-2)m²/4] / (s n^4): both endpoint token classes contribute, and "
    "for s > 2 so does every other S_c, which holds m/2 points shared with each class"
)
NOTE_EQ30_W = (
    "exact 1/(s² n²): every token has p(S_i) = 1/l and M(x1, S_i) = 1/(l s n); eq. 30 holds at s = 2 only"
)
NOTE_EQ30_B = (
    "at t = 0 cross-class A-bar has rank 1 (Σλ² = 1) and α = 1 - 1/s, so "
    "B/c -> 1 + (5/2)(1 - 1/s); 1/2 + 3s/2 gives 7/2 at s = 2, the slip of eq. 25"
)


def two_class_forms(n: int, m: int, tokenizer: str, counts: Counts) -> list[Form]:
    """Section 3.3 / appendix B (S = 2): eqs. 5-7 (= 21-26) for the named tokenizer, eqs. 18-19 for any."""
    t = m / n
    forms: list[Form] = []
    if tokenizer == "mae":
        forms += [
            Form("w_intra", "5/22", (2 * n - m) / (4 * n**3)),
            Form("w_inter", "5/22", m / (4 * n**3)),
            Form("B/c", "5/21", 2.0, LIMIT),
            Form("B/c", "5", 2 - 15 * t / 4, SERIES),
        ]
    elif tokenizer == "class":
        forms += [
            Form("w_intra", "6/24", ((n - m / 2) ** 2 + (m / 2) ** 2) / (2 * n**4)),
            Form("w_inter", "6/24", m * (n - m / 2) / (4 * n**4), note=NOTE_EQ24),
            Form("w_inter", "24 fixed", m * (n - m / 2) / (2 * n**4)),
            Form("B/c", "6/23", 2.0, LIMIT),
            Form("B/c", "6", 2 - 9 * t / 2, SERIES),
        ]
    else:
        forms += [
            Form("w_intra", "7/26", 1 / (4 * n**2)),
            Form("w_inter", "7/26", 1 / (4 * n**2)),
            Form("B/c", "7/25", 3.5, LIMIT, NOTE_EQ25),
            Form("B/c", "25 fixed", 1 + C3 / 2, LIMIT),
            Form("B/c", "7", 3.5 - 27 * t / 4, SERIES),
        ]
    forms += [
        Form("alpha", "19", alpha_eq19(n, m, counts)),
        Form("sum_sq_eig", "18", sum_sq_eig_eq18(n, m, counts), note=NOTE_EQ18),
        Form("sum_sq_eig", "18 fixed", sum_sq_eig_fixed(n, m, counts)),
    ]
    return forms


def multi_class_forms(n: int, m: int, s: int, tokenizer: str) -> list[Form]:
    """Appendix C (any S, the paper's s): eqs. 28-30."""
    t = m / n
    if tokenizer == "mae":
        return [
            Form("w_intra", "28", (2 * n - (s - 1) * m) / (2 * s * n**3)),
            Form("w_inter", "28", m / (2 * s * n**3)),
            Form("B/c", "28", float(s), LIMIT),
            Form("B/c", "28", s - 15 * (s - 1) * t / 4, SERIES),
        ]
    if tokenizer == "class":
        own, half = n - (s - 1) * m / 2, m / 2
        return [
            Form("w_intra", "29", (own**2 + (s - 1) * half**2) / (2 * s * n**4), note=NOTE_EQ29_INTRA),
            Form("w_intra", "29 fixed", (own**2 + (s - 1) * half**2) / (s * n**4)),
            Form("w_inter", "29", m * own / (2 * s * n**4), note=NOTE_EQ29_INTER),
            Form("w_inter", "29 fixed", (m * own + (s - 2) * half**2) / (s * n**4)),
            Form("B/c", "29", float(s), LIMIT),
            Form("B/c", "29", s - 9 * (s - 1) * t / 2, SERIES),
        ]
    forms = [
        Form("w_intra", "30", 1 / (2 * s * n**2), note=NOTE_EQ30_W),
        Form("w_inter", "30", 1 / (2 * s * n**2), note=NOTE_EQ30_W),
    ]
    if s != 2:
        fixed = 1 / (s * s * n**2)
        forms += [Form("w_intra", "30 fixed", fixed), Form("w_inter", "30 fixed", fixed)]
    return forms + [
        Form("B/c", "30", 0.5 + 1.5 * s, LIMIT, NOTE_EQ30_B),
        Form("B/c", "30 fixed", 1 + C3 * (1 - 1 / s), LIMIT),
        Form("B/c", "30", 0.5 + 1.5 * s, SERIES),
    ]
