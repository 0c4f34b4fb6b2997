"""`kmim theory toy`: the toy model of paper section 3.3 and appendices B, C, computed two ways.

Data (appendix C; S = 2 is section 3.3): S classes P_1..P_S of n points each; every two classes share m points
(|P_a ∩ P_b| = m) and no point is in three classes, so each class keeps E = n - (S-1) m points of its own
and there are N = S n - m S(S-1)/2 points. A datum picks a class uniformly, then an ordered pair (x1, x2)
uniformly from P_a × P_a. Every point is both a possible unmasked view x1 and a masked view x2.

Point order, used by every matrix here: class 0's own points, class 1's, ..., then for each pair a < b (in
itertools.combinations order) its m shared points.

Tokenizers (partitions of the target points into tokens S_i):
- mae: every point its own token (no tokenization);
- class: S tokens; token a holds P_a's own points and half of each P_a ∩ P_b (n_{a,a,b} = m/2; m must be
  even); the first m/2 shared points of a pair a < b go to a, the others to b;
- cross: l tokens splitting every region equally (n_{i,a} = E/l, n_{i,a,b} = m/l): point j of a region goes
  to token j mod l. l must divide E and m; it defaults to 2.

The numerics (kmim.theory.graph) are compared with the paper's closed forms (kmim.theory.closed_forms), and
Theorem 1 is checked against seeded random partitions of the target points.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, replace

import numpy as np

from kmim.contract import streams
from kmim.contract.config import Config, output_field
from kmim.errors import ConfigError
from kmim.theory import graph
from kmim.theory.closed_forms import C3, LIMIT, SERIES, Counts, Form, multi_class_forms, two_class_forms

TOKENIZERS = ("mae", "class", "cross")
DEFAULT_CROSS_L = 2
MAX_POINTS = 2000  # dense N × N matrices and a full eigendecomposition
REL_TOL = 1e-6
TIE_TOL = 1e-9  # Σλ² and α closer than this count as equal in the Theorem 1 comparisons (float noise ~1e-15)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class ToyConfig(Config):
    """n points per class, m shared by every two classes, S classes, the tokenizer, and the Theorem 1 check
    (R random partitions, seeded). l is the number of cross-class tokens (cross only)."""

    n: int = output_field(8, help="Points per class.")
    m: int = output_field(2, help="Points shared by every two classes (t = m/n).")
    classes: int = output_field(2, help="Classes S (2: section 3.3; more: appendix C).")
    tokenizer: str = output_field("class", help="mae (one token per point), class, or cross.")
    l: int | None = output_field(None, help="Cross-class tokens (cross only; default 2).")
    partitions: int = output_field(200, help="Random partitions for Theorem 1 (0: skip).")
    seed: int = output_field(0, help="Seed of the random partitions.")

    def __post_init__(self) -> None:
        for name in ("n", "m", "classes", "partitions", "seed"):
            if not _is_int(getattr(self, name)):
                raise ConfigError(f"{name} must be an integer, got {getattr(self, name)!r}")
        if self.classes < 2:
            raise ConfigError(f"classes must be >= 2 (inter-class edges need two), got {self.classes}")
        if self.n < 1 or self.m < 0:
            raise ConfigError(f"need n >= 1 and m >= 0, got n={self.n}, m={self.m}")
        if self.exclusive < 1:
            raise ConfigError(
                f"every class needs a point of its own: n - (classes-1)*m = {self.exclusive} "
                f"must be >= 1 (n={self.n}, m={self.m}, classes={self.classes})"
            )
        if self.classes * self.n > MAX_POINTS:  # the t→0 checks build the same model with m = 0
            raise ConfigError(
                f"classes * n = {self.classes * self.n} points is more than {MAX_POINTS} "
                f"(dense matrices): lower n or classes"
            )
        if self.partitions < 0 or self.seed < 0:
            raise ConfigError(f"partitions and seed must be >= 0, got {self.partitions} and {self.seed}")
        if self.tokenizer not in TOKENIZERS:
            raise ConfigError(f"tokenizer must be one of {', '.join(TOKENIZERS)}, got {self.tokenizer!r}")
        if self.tokenizer == "class" and self.m % 2:
            raise ConfigError(
                f"the class tokenizer gives m/2 shared points to each of the two classes "
                f"(paper: n_{{i,3}} = m/2), so m must be even, got m={self.m}"
            )
        if self.tokenizer != "cross":
            if self.l is not None:
                has = "one token per point" if self.tokenizer == "mae" else "one token per class"
                raise ConfigError(f"l only applies to the cross tokenizer ({self.tokenizer} has {has})")
            return
        if self.l is None:
            object.__setattr__(self, "l", DEFAULT_CROSS_L)  # resolved, so that the saved config says what ran
        if not _is_int(self.l) or self.l < 1:
            raise ConfigError(f"l must be a positive integer, got {self.l!r}")
        if self.exclusive % self.l or self.m % self.l:
            raise ConfigError(
                f"the cross tokenizer splits every region equally, so l={self.l} must divide "
                f"both n - (classes-1)*m = {self.exclusive} and m = {self.m}"
            )

    @property
    def exclusive(self) -> int:
        """E: points of one class that no other class has."""
        return self.n - (self.classes - 1) * self.m

    @property
    def points(self) -> int:
        return self.classes * self.n - self.m * self.classes * (self.classes - 1) // 2

    @property
    def t(self) -> float:
        return self.m / self.n


def regions(cfg: ToyConfig) -> list[tuple[int, ...]]:
    """The classes holding each point, in the module's point order: (a,) own points, (a, b) shared."""
    own = [(a,) for a in range(cfg.classes) for _ in range(cfg.exclusive)]
    return own + [pair for pair in itertools.combinations(range(cfg.classes), 2) for _ in range(cfg.m)]


def membership(cfg: ToyConfig) -> np.ndarray:
    """Z [N, S] bool: Z[x, a] = x ∈ P_a."""
    z = np.zeros((cfg.points, cfg.classes), dtype=bool)
    for x, classes in enumerate(regions(cfg)):
        z[x, list(classes)] = True
    return z


def partition(cfg: ToyConfig, tokenizer: str | None = None) -> np.ndarray:
    """Token id [N] of every target point under `tokenizer` (default: the config's). For `class` with an odd
    m (only reached by the Theorem 1 check) the first ⌈m/2⌉ shared points of a pair go to the lower class."""
    tokenizer = tokenizer or cfg.tokenizer
    if tokenizer == "mae":
        return np.arange(cfg.points)
    tokens, index = [], {}
    for r in regions(cfg):
        j = index[r] = index.get(r, -1) + 1  # position of this point within its region
        if tokenizer == "class":
            tokens.append(r[0] if len(r) == 1 or j < (cfg.m + 1) // 2 else r[1])
        else:
            tokens.append(j % cfg.l)
    return np.asarray(tokens)


def two_class_counts(cfg: ToyConfig, tokens: np.ndarray) -> Counts:
    """n_{i,1}, n_{i,2}, n_{i,3} of section 3.3 (S = 2 only)."""
    k = int(tokens.max()) + 1
    where = regions(cfg)
    count = {
        r: np.bincount([tok for tok, rr in zip(tokens, where) if rr == r], minlength=k).astype(float)
        for r in ((0,), (1,), (0, 1))
    }
    return Counts(only1=count[(0,)], only2=count[(1,)], shared=count[(0, 1)])


def edge_weights(cfg: ToyConfig, aug: np.ndarray) -> tuple[float, float]:
    """(w_intra, w_inter): mean A(x1, x1+) over own points of one class (self pairs included, as in appendix
    B's constant blocks), averaged over the classes; and over own points of two different classes."""
    e = cfg.exclusive
    block = [slice(a * e, (a + 1) * e) for a in range(cfg.classes)]
    intra = np.mean([aug[b, b].mean() for b in block])
    inter = np.mean([aug[b1, b2].mean() for b1, b2 in itertools.permutations(block, 2)])
    return float(intra), float(inter)


def measure(cfg: ToyConfig, tokens: np.ndarray | None = None) -> dict:
    """The numerics of one tokenizer: graphs, eigenvalues, Σλ², α, edge weights and B/c = Σλ² + c3 α."""
    tokens = partition(cfg) if tokens is None else tokens
    g = graph.build(membership(cfg), cfg.n, tokens)
    eig = graph.eigenvalues(g.norm)
    alpha = graph.label_mismatch(g.aug, membership(cfg))
    intra, inter = edge_weights(cfg, g.aug)
    sum_sq = float((eig**2).sum())
    return {
        "graphs": g,
        "eigenvalues": eig,
        "w_intra": intra,
        "w_inter": inter,
        "alpha": alpha,
        "sum_sq_eig": sum_sq,
        "B/c": sum_sq + C3 * alpha,
    }


def rel_diff(a: float, b: float) -> float:
    """|a - b| / max(|a|, |b|); 0 when both are exactly 0 (the toy's zeros are exact: m = 0 leaves no
    path between classes)."""
    scale = max(abs(a), abs(b))
    return 0.0 if scale == 0 else abs(a - b) / scale


def closed_forms(cfg: ToyConfig, tokens: np.ndarray) -> list[Form]:
    forms = multi_class_forms(cfg.n, cfg.m, cfg.classes, cfg.tokenizer)
    if cfg.classes == 2:
        forms = two_class_forms(cfg.n, cfg.m, cfg.tokenizer, two_class_counts(cfg, tokens)) + forms
    return forms


def checks(cfg: ToyConfig, numeric: dict, tokens: np.ndarray) -> list[dict]:
    """One row per closed form: numeric value, closed form, relative difference, ok / DISAGREE / series."""
    at_t0: dict | None = None
    rows = []
    for f in closed_forms(cfg, tokens):
        if f.kind == LIMIT:
            at_t0 = at_t0 or measure(replace(cfg, m=0))
            value = at_t0[f.quantity]
        else:
            value = numeric[f.quantity]
        diff = rel_diff(value, f.value)
        status = "series" if f.kind == SERIES else ("DISAGREE" if diff > REL_TOL else "ok")
        rows.append(
            {
                "quantity": f.quantity,
                "equation": f.equation,
                "kind": f.kind,
                "numeric": value,
                "closed_form": f.value,
                "rel_diff": diff,
                "status": status,
                "note": f.note if status == "DISAGREE" else "",
            }
        )
    return rows


def _ratio_range(label: tuple[float, float], others: list[tuple[float, float]]) -> tuple[float, float] | None:
    """The c2/c1 for which the label partition minimises c1 Σλ² + c2 α among all of `others` (a closed
    interval [lo, hi], hi = inf when unbounded), or None when no positive c2/c1 makes it the minimum."""
    lo, hi = 0.0, math.inf
    tol = TIE_TOL
    for s, a in others:
        ds, da = label[0] - s, label[1] - a  # label beats (s, a) iff ds + ρ da <= 0
        if abs(da) <= tol:
            if ds > tol:
                return None
        elif da > 0:
            hi = min(hi, -ds / da)
        else:
            lo = max(lo, ds / -da)
    return (lo, hi) if lo <= hi + tol and hi > 0 else None


def _json_range(ratio: tuple[float, float]) -> list[float | None]:
    """JSON has no infinity: an unbounded upper end is null."""
    return [ratio[0], None if math.isinf(ratio[1]) else ratio[1]]


def theorem1(cfg: ToyConfig) -> dict:
    """Theorem 1: the label partition S^y minimises c1 Σ_{i=1}^{N1} λ_i² + c2 α. The constants are those of
    Zhang et al.'s bound and are not given, so with R seeded random partitions of the N target points (a token
    count k uniform in 1..N, then each point's token uniform in 0..k-1) we report:
    - dominating: partitions at least as good on both Σλ² and α and better on one. Any such partition refutes
      the theorem for every c1, c2 > 0; `held` means there is none (the brief's "none beats it on both");
    - the range of c2/c1 for which the label partition is the minimum among the samples, and whether the
      paper's own c2/c1 = c3 = 5/2 (eq. 20) is in it.
    The label partition here is the class tokenizer. The theorem assumes M(x1|x2) > 0 only if y(x1) = y(x2),
    which the toy meets only with m = 0 (a shared point is in two classes); `assumption_holds` says so.
    """
    z = membership(cfg)
    label = graph.sum_sq_and_alpha(z, cfg.n, partition(cfg, "class"))
    rng = streams.rng("theorem1_partitions", cfg.seed)
    samples = []
    for _ in range(cfg.partitions):
        k = int(rng.integers(1, cfg.points + 1))
        tokens = np.unique(rng.integers(0, k, size=cfg.points), return_inverse=True)[1].reshape(-1)
        samples.append((*graph.sum_sq_and_alpha(z, cfg.n, tokens), int(tokens.max()) + 1))
    tol = TIE_TOL
    dominating = sum(
        1
        for s, a, _ in samples
        if s <= label[0] + tol and a <= label[1] + tol and (s < label[0] - tol or a < label[1] - tol)
    )
    ratio = _ratio_range(label, [(s, a) for s, a, _ in samples])

    def point(s: float, a: float, k: int) -> dict:
        return {"tokens": k, "sum_sq_eig": s, "alpha": a, "B/c": s + C3 * a}

    best = min(samples, key=lambda x: x[0] + C3 * x[1]) if samples else None
    return {
        "partitions": cfg.partitions,
        "seed": cfg.seed,
        "assumption_holds": cfg.m == 0,
        "label": point(*label, cfg.classes),
        "best_random": point(*best) if best else None,
        "min_random_sum_sq_eig": min((s for s, _, _ in samples), default=None),
        "min_random_alpha": min((a for _, a, _ in samples), default=None),
        "dominating": dominating,
        "c2_over_c1_range": None if ratio is None else _json_range(ratio),
        "paper_constants_ok": ratio is not None and ratio[0] - 1e-12 <= C3 <= ratio[1] + 1e-12,
        "held": dominating == 0,
    }


def toy_report(cfg: ToyConfig) -> dict:
    """Everything `kmim theory toy` prints, as a JSON-able dict; `ok` is false when a closed form disagrees
    with the numerics or the Theorem 1 check failed."""
    tokens = partition(cfg)
    numeric = measure(cfg, tokens)
    rows = checks(cfg, numeric, tokens)
    eig = numeric["eigenvalues"]
    nonzero = [float(v) for v in eig if abs(v) > 1e-12]
    thm = theorem1(cfg) if cfg.partitions else None
    disagree = sum(r["status"] == "DISAGREE" for r in rows)
    return {
        "config": asdict(cfg),
        "t": cfg.t,
        "points": {"total": cfg.points, "own_per_class": cfg.exclusive, "shared_per_pair": cfg.m},
        "tokens": int(tokens.max()) + 1,
        "numeric": {k: numeric[k] for k in ("w_intra", "w_inter", "alpha", "sum_sq_eig", "B/c")},
        "eigenvalues": nonzero,
        "zero_eigenvalues": len(eig) - len(nonzero),
        "checks": rows,
        "disagreements": disagree,
        "theorem1": thm,
        "ok": disagree == 0 and (thm is None or thm["held"]),
    }


def _g(v: float | None) -> str:
    return "-" if v is None else f"{v:.6g}"


def render(report: dict) -> str:
    """The report as a plain-text table, notes for each disagreement, the spectrum and the Theorem 1 check."""
    c = report["config"]
    header = (
        f"toy model: S={c['classes']} classes, n={c['n']}, m={c['m']} (t={report['t']:.4g}), "
        f"{report['points']['total']} points, tokenizer {c['tokenizer']} ({report['tokens']} tokens)"
    )
    legend = (
        f"B/c = sum_sq_eig + {C3} alpha (eq. 20); 'fixed' rows are our corrections; "
        f"t0 rows compare the series' constant with the model at m = 0; series rows are not checked"
    )
    lines = [header, legend, ""]
    head = ("quantity", "eq.", "kind", "numeric", "closed form", "rel diff", "status")
    body = [
        (
            r["quantity"],
            r["equation"],
            r["kind"],
            f"{r['numeric']:.10g}",
            f"{r['closed_form']:.10g}",
            f"{r['rel_diff']:.2e}",
            r["status"],
        )
        for r in report["checks"]
    ]
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    for row in [head, *body]:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    notes = [r for r in report["checks"] if r["note"]]
    if notes:
        lines += ["", "why we believe the paper's form is wrong:"]
        lines += [f"  eq. {r['equation']} ({r['quantity']}): {r['note']}" for r in notes]
    eig = report["eigenvalues"]
    shown = ", ".join(f"{v:.6g}" for v in eig[:12]) + (", ..." if len(eig) > 12 else "")
    lines += ["", f"eigenvalues of A-bar: {shown} ({len(eig)} nonzero, {report['zero_eigenvalues']} zero)"]
    thm = report["theorem1"]
    if thm:
        lab, best = thm["label"], thm["best_random"]
        rng = thm["c2_over_c1_range"]
        assumption = "holds" if thm["assumption_holds"] else "fails (m > 0)"
        upper = "inf" if rng is None or rng[1] is None else _g(rng[1])
        optimal = "no c2/c1" if rng is None else f"c2/c1 in [{_g(rng[0])}, {upper}]"
        lines += [
            (
                f"Theorem 1 over {thm['partitions']} random partitions (seed {thm['seed']}); assumption "
                f"M(x1|x2) > 0 only within a class: {assumption}"
            ),
            (
                f"  label partition: sum_sq_eig {_g(lab['sum_sq_eig'])}, alpha {_g(lab['alpha'])}, "
                f"B/c {_g(lab['B/c'])}"
            ),
            (
                f"  best random (B/c): {best['tokens']} tokens, sum_sq_eig {_g(best['sum_sq_eig'])}, "
                f"alpha {_g(best['alpha'])}, B/c {_g(best['B/c'])}"
            ),
            (
                f"  lowest random sum_sq_eig {_g(thm['min_random_sum_sq_eig'])}, lowest random alpha "
                f"{_g(thm['min_random_alpha'])}"
            ),
            (
                f"  partitions better on both sum_sq_eig and alpha: {thm['dominating']}; label partition "
                f"optimal for {optimal} (paper's 5/2: {'yes' if thm['paper_constants_ok'] else 'no'})"
            ),
            f"  Theorem 1 {'held' if thm['held'] else 'FAILED'}",
        ]
    lines += ["", f"{report['disagreements']} disagreement(s); {'OK' if report['ok'] else 'NOT OK'}"]
    return "\n".join(lines)
