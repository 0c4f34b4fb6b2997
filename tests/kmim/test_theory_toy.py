"""`kmim theory toy`: the toy model of paper section 3.3 / appendices B, C against hand computations, the
paper's closed forms over a grid, the Theorem 1 check, config validation and the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from kmim.cli.theory import theory_app
from kmim.errors import ConfigError
from kmim.theory import graph
from kmim.theory.closed_forms import SERIES
from kmim.theory.toy import (
    ToyConfig,
    _ratio_range,
    checks,
    closed_forms,
    measure,
    membership,
    partition,
    render,
    theorem1,
    toy_report,
)

R2 = math.sqrt(2)


def _close(actual, expected):
    np.testing.assert_allclose(
        np.asarray(actual, dtype=float), np.asarray(expected, dtype=float), rtol=1e-12, atol=1e-15
    )


def _row(report_rows, quantity, equation):
    (row,) = [r for r in report_rows if r["quantity"] == quantity and r["equation"] == equation]
    return row


# --- S = 2, n = 2, m = 1, MAE ---------------------------------------------------------------------------
# Points (module order): a = P1 only, b = P2 only, s = shared.  Z = [[1,0],[0,1],[1,1]].
# M(x1, x2) = (1/S) Σ_a [x1∈P_a][x2∈P_a] / n² = Z Zᵀ / 8:
#     [[1,0,1],[0,1,1],[1,1,2]] / 8            (sums to 1)
# MAE: every point its own token, so the mask graph M(x1, S_i) is that same matrix, and
#     p(S_i) = M(x2) = [1/4, 1/4, 1/2].
# A(x1, x1+) = Σ_x2 M(x1,x2) M(x1+,x2) / M(x2):
#     A(a,a) = (1/8)²·4 + (1/8)²·2 = 6/64 = 3/32      A(a,b) = (1/8)²·2 = 1/32
#     A(a,s) = (1/8)²·4 + (1/8)(1/4)·2 = 1/8          A(s,s) = (1/8)²·4·2 + (1/4)²·2 = 1/4
#     A = [[3,1,4],[1,3,4],[4,4,8]] / 32,  D = row sums = [1/4, 1/4, 1/2] = M(x1)
# Ā = D^-1/2 A D^-1/2 = [[3/8, 1/8, √2/4], [1/8, 3/8, √2/4], [√2/4, √2/4, 1/2]]
# Eigenvalues: (1,-1,0) gives 3/8 - 1/8 = 1/4; on span{(1,1,0)/√2, (0,0,1)} Ā is [[1/2,1/2],[1/2,1/2]]:
#     1 and 0.  So {1, 1/4, 0}, Σλ² = 17/16 (= ‖Ā‖_F² = (9+9+1+1)/64 + 4·2/16 + 1/4).
# α = A(a,b) + A(b,a) = 1/16 (only a, b have no class in common).
# w_intra = A(a,a) = 3/32 = (2n-m)/(4n³) (eq. 22);  w_inter = A(a,b) = 1/32 = m/(4n³) (eq. 22).
# Eq. 18 as printed: (n-m)²(p11²+p22²+2p12²) + (n-m)m(p13²+p23²) + m²p33²
#     = (9+9+2)/64 + (1/8+1/8) + 1/4 = 13/16, not 17/16: the (P∖, P∩) blocks must count twice (+1/4).


def test_hand_s2_n2_m1_mae():
    cfg = ToyConfig(n=2, m=1, tokenizer="mae", partitions=0)
    z = membership(cfg)
    _close(z, [[1, 0], [0, 1], [1, 1]])
    r = measure(cfg)
    g = r["graphs"]
    _close(g.joint, np.array([[1, 0, 1], [0, 1, 1], [1, 1, 2]]) / 8)
    _close(g.mask, np.array([[1, 0, 1], [0, 1, 1], [1, 1, 2]]) / 8)
    _close(g.token_prob, [1 / 4, 1 / 4, 1 / 2])
    _close(g.aug, np.array([[3, 1, 4], [1, 3, 4], [4, 4, 8]]) / 32)
    _close(g.degree, [1 / 4, 1 / 4, 1 / 2])
    _close(g.norm, [[3 / 8, 1 / 8, R2 / 4], [1 / 8, 3 / 8, R2 / 4], [R2 / 4, R2 / 4, 1 / 2]])
    _close(r["eigenvalues"], [1, 1 / 4, 0])
    _close(r["sum_sq_eig"], 17 / 16)
    _close(r["alpha"], 1 / 16)
    _close([r["w_intra"], r["w_inter"]], [3 / 32, 1 / 32])
    rows = checks(cfg, r, partition(cfg))
    assert _row(rows, "w_intra", "5/22")["status"] == "ok"
    assert _row(rows, "w_inter", "5/22")["status"] == "ok"
    assert _row(rows, "alpha", "19")["status"] == "ok"
    _close(_row(rows, "sum_sq_eig", "18")["closed_form"], 13 / 16)
    assert _row(rows, "sum_sq_eig", "18")["status"] == "DISAGREE"
    _close(_row(rows, "sum_sq_eig", "18 fixed")["closed_form"], 17 / 16)


# --- S = 2, n = 3, m = 2, class-wise ----------------------------------------------------------------------
# Points: a (P1 only), b (P2 only), s1, s2 (shared).  Tokens: S1 = {a, s1}, S2 = {b, s2} (m/2 = 1 each).
# M(x1, x2) = Z Zᵀ / 18 = [[1,0,1,1],[0,1,1,1],[1,1,2,2],[1,1,2,2]] / 18.
# Mask graph M(x1, S_i) (eq. 3), rows a, b, s1, s2: [[2,1],[1,2],[3,3],[3,3]] / 18; p(S1) = p(S2) = 9/18.
# A = Σ_i M(x1,S_i) M(x1+,S_i) / (1/2) = (2/18²)·(dot products of rows (2,1), (1,2), (3,3)):
#     A = [[5,4,9,9],[4,5,9,9],[9,9,18,18],[9,9,18,18]] / 162,   D = [27,27,54,54]/162 = [1/6,1/6,1/3,1/3]
# Ā: Ā(a,a) = 5/27, Ā(a,b) = 4/27, Ā(a,s) = 9/√(27·54) = √2/6, Ā(s,s') = 18/54 = 1/3.
# Eigenvalues: a-b gives 1/27, s1-s2 gives 0; on span{(a+b)/√2, (s1+s2)/√2}: [[1/3, √2/3], [√2/3, 2/3]],
#     trace 1, det 0: 1 and 0.  So {1, 1/27, 0, 0}, Σλ² = 730/729.
# α = A(a,b) + A(b,a) = 8/162 = 4/81;  w_intra = A(a,a) = 5/162;  w_inter = A(a,b) = 4/162 = 2/81.
# Eq. 24: w_intra = ((n-m/2)² + (m/2)²)/(2n⁴) = 5/162 (agrees); w_inter = m(n-m/2)/(4n⁴) = 1/81, but
#     A(a,b) = (2/18)(1/18)/(1/2) [S1] + (1/18)(2/18)/(1/2) [S2] = 1/81 + 1/81: eq. 24 keeps one share.
# Eq. 18 as printed: p11 = p22 = 5/27, p12 = 4/27, printed p13 = p23 = (2·3/3 + 1·2/3)·√2/18 = 4√2/27:
#     (n-m)²(p11²+p22²+2p12²) = (25+25+32)/729 = 82/729, (n-m)m(p13²+p23²) = 2·64/729 = 128/729,
#     m²p33² = 4/9 = 324/729: 534/729.  Fixed: 82/729 + m(2n-m)/n² = 82/729 + 8/9 = 730/729.


def test_hand_s2_n3_m2_class():
    cfg = ToyConfig(n=3, m=2, tokenizer="class", partitions=0)
    assert list(partition(cfg)) == [0, 1, 0, 1]
    r = measure(cfg)
    g = r["graphs"]
    _close(g.joint, np.array([[1, 0, 1, 1], [0, 1, 1, 1], [1, 1, 2, 2], [1, 1, 2, 2]]) / 18)
    _close(g.mask, np.array([[2, 1], [1, 2], [3, 3], [3, 3]]) / 18)
    _close(g.token_prob, [1 / 2, 1 / 2])
    _close(g.aug, np.array([[5, 4, 9, 9], [4, 5, 9, 9], [9, 9, 18, 18], [9, 9, 18, 18]]) / 162)
    _close(g.degree, [1 / 6, 1 / 6, 1 / 3, 1 / 3])
    s, t = R2 / 6, 1 / 3
    _close(g.norm, [[5 / 27, 4 / 27, s, s], [4 / 27, 5 / 27, s, s], [s, s, t, t], [s, s, t, t]])
    _close(r["eigenvalues"], [1, 1 / 27, 0, 0])
    _close(r["sum_sq_eig"], 730 / 729)
    _close(r["alpha"], 4 / 81)
    _close([r["w_intra"], r["w_inter"]], [5 / 162, 2 / 81])
    rows = checks(cfg, r, partition(cfg))
    assert _row(rows, "w_intra", "6/24")["status"] == "ok"
    _close(_row(rows, "w_inter", "6/24")["closed_form"], 1 / 81)
    assert _row(rows, "w_inter", "6/24")["status"] == "DISAGREE"
    assert _row(rows, "w_inter", "24 fixed")["status"] == "ok"
    _close(_row(rows, "sum_sq_eig", "18")["closed_form"], 534 / 729)
    assert _row(rows, "alpha", "19")["status"] == "ok"


# --- S = 2, n = 4, m = 2, cross-class with l = 2 ------------------------------------------------------------
# Every token holds one P1-only, one P2-only and one shared point (n_{i,1} = n_{i,2} = 2/2, n_{i,3} = 2/2).
# M(x1, x2) = Z Zᵀ / 32.  M(own point, S_i) = (1+1)/32 = 1/16 for both tokens; M(shared, S_i) = 4/32 = 1/8.
# p(S_i) = 4·(1/16) + 2·(1/8) = 1/2.  A(own, own') = 2·(1/16)² / (1/2) = 1/64 = 1/(4n²) for any two own
# points (eq. 26: w_intra = w_inter = 1/(4n²)).  All rows of the mask graph are proportional to (1, 1), so
# Ā has rank 1: eigenvalues {1, 0, ..., 0}, Σλ² = 1.  α = 2 · 2 · 2 · 1/64 = 1/8 (= (n-m)²/(2n²), eq. 19).


def test_hand_s2_n4_m2_cross():
    cfg = ToyConfig(n=4, m=2, tokenizer="cross", l=2, partitions=0)
    assert list(partition(cfg)) == [0, 1, 0, 1, 0, 1]
    r = measure(cfg)
    _close(r["graphs"].mask, np.array([[1, 1]] * 4 + [[2, 2]] * 2) / 16)
    _close(r["graphs"].token_prob, [1 / 2, 1 / 2])
    _close(r["eigenvalues"], [1, 0, 0, 0, 0, 0])
    _close([r["w_intra"], r["w_inter"], r["alpha"]], [1 / 64, 1 / 64, 1 / 8])


# --- S = 3, n = 3, m = 1, MAE: the label-set rule of α for S > 2 -------------------------------------------
# Points: a, b, c (own), ab, ac, bc (shared).  M(x1, x2) = Z Zᵀ / 27;  M(own) = 1/9, M(shared) = 2/9.
# A(a, b): the only common neighbour is ab: (1/27)² / (2/9) = 1/162.
# A(a, bc): x2 must share a class with both: ab (with a in P_a, with bc in P_b) and ac, 1/162 each: 2/162.
# A(a, a) = (1/27)²·9 + 2·(1/27)²·(9/2) = 1/81 + 1/81 = 2/81 = (2n-(s-1)m)/(2sn³) (eq. 28).
# Disjoint label sets: (a,b), (a,c), (b,c) and (a,bc), (b,ac), (c,ab), both orders:
#     α = 2·(3·1/162 + 3·2/162) = 1/9.   w_inter = A(a,b) = 1/162 = m/(2sn³) (eq. 28).


def test_hand_s3_n3_m1_mae_alpha_uses_label_sets():
    cfg = ToyConfig(n=3, m=1, classes=3, tokenizer="mae", partitions=0)
    r = measure(cfg)
    a = r["graphs"].aug
    _close([a[0, 1], a[0, 5], a[0, 0]], [1 / 162, 2 / 162, 2 / 81])
    _close([r["alpha"], r["w_intra"], r["w_inter"]], [1 / 9, 2 / 81, 1 / 162])


GRID = [
    ToyConfig(n=n, m=m, classes=s, tokenizer=tok, l=l, partitions=0)
    for s, n, ms in [(2, 6, (0, 2, 4)), (3, 8, (0, 2)), (4, 10, (2,))]
    for m in ms
    for tok, l in [("mae", None), ("class", None), ("cross", 2)]
]
GRID += [
    ToyConfig(n=7, m=1, tokenizer="mae", partitions=0),
    ToyConfig(n=7, m=1, tokenizer="cross", l=1, partitions=0),
]


@pytest.mark.parametrize("cfg", GRID, ids=lambda c: f"S{c.classes}-n{c.n}-m{c.m}-{c.tokenizer}")
def test_closed_forms_agree_with_numerics_except_the_diagnosed_ones(cfg):
    tokens = partition(cfg)
    numeric = measure(cfg, tokens)
    forms, rows = closed_forms(cfg, tokens), checks(cfg, numeric, tokens)
    for f, row in zip(forms, rows):
        if f.kind == SERIES:
            assert row["status"] == "series"
        elif not f.note:  # every form we do not claim to be wrong, and every "fixed" one, must agree
            assert row["status"] == "ok", row
    status = {(r["quantity"], r["equation"]): r["status"] for r in rows if r["kind"] != SERIES}
    # the printed forms diagnosed wrong do disagree wherever the slip matters
    if cfg.classes == 2 and cfg.m > 0:
        assert status[("sum_sq_eig", "18")] == "DISAGREE"
    if cfg.tokenizer == "class":
        assert status[("w_intra", "29")] == "DISAGREE"
        if cfg.m > 0:
            assert status[("w_inter", "29")] == "DISAGREE"
            if cfg.classes == 2:
                assert status[("w_inter", "6/24")] == "DISAGREE"
    if cfg.tokenizer == "cross" and cfg.l == 2:
        assert status[("B/c", "30")] == "DISAGREE"
        assert status[("w_intra", "30")] == ("ok" if cfg.classes == 2 else "DISAGREE")


def test_numerics_are_consistent():
    cfg = ToyConfig(n=9, m=2, classes=3, tokenizer="class", partitions=0)
    r = measure(cfg)
    g = r["graphs"]
    _close(g.aug.sum(), 1.0)  # A is a joint distribution over (x1, x1+)
    _close(g.degree, membership(cfg).sum(axis=1) / (cfg.classes * cfg.n))  # D(x1) = M(x1)
    _close(r["eigenvalues"][0], 1.0)  # top eigenvalue of a normalized graph
    _close(r["sum_sq_eig"], (g.norm**2).sum())
    _close(graph.sum_sq_and_alpha(membership(cfg), cfg.n, partition(cfg)), [r["sum_sq_eig"], r["alpha"]])
    rng = np.random.default_rng(1)
    for k in (1, 3, 7, cfg.points):  # the quotient shortcut of the Theorem 1 loop on random partitions
        tokens = np.unique(rng.integers(0, k, size=cfg.points), return_inverse=True)[1].reshape(-1)
        dense = measure(cfg, tokens)
        _close(graph.sum_sq_and_alpha(membership(cfg), cfg.n, tokens), [dense["sum_sq_eig"], dense["alpha"]])


def test_theorem1_holds_and_is_reproducible():
    for cfg in (
        ToyConfig(partitions=60),
        ToyConfig(m=0, partitions=60),
        ToyConfig(n=9, m=2, classes=3, partitions=60),
    ):
        thm = theorem1(cfg)
        assert thm["held"] and thm["dominating"] == 0
        assert thm["min_random_sum_sq_eig"] >= 1 - 1e-12  # the top eigenvalue is always 1
        assert thm == theorem1(cfg)
    thm = theorem1(ToyConfig(m=0, partitions=60))
    assert thm["assumption_holds"]
    _close([thm["label"]["sum_sq_eig"], thm["label"]["alpha"]], [2, 0])  # two disconnected classes


def test_ratio_range():
    label = (2.0, 0.0)
    assert _ratio_range(label, [(1.0, 0.5)]) == (2.0, math.inf)  # label wins iff 2 <= 1 + 0.5 ρ
    assert _ratio_range(label, [(1.0, 0.5), (2.5, 0.0)]) == (2.0, math.inf)
    assert _ratio_range(label, [(1.5, 0.0)]) is None  # better Σλ², same α: no constants save the label
    assert _ratio_range((1.0, 0.2), [(1.2, 0.1), (0.9, 0.3)]) == pytest.approx((1.0, 2.0))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"classes": 1}, "classes"),
        ({"n": 0}, "n >= 1"),
        ({"m": -1}, "m >= 0"),
        ({"n": 4, "m": 4}, "point of its own"),
        ({"n": 5, "m": 2, "classes": 4}, "point of its own"),
        ({"tokenizer": "bpe"}, "tokenizer"),
        ({"m": 1}, "even"),
        ({"tokenizer": "mae", "l": 2}, "only applies"),
        ({"tokenizer": "cross", "n": 9, "m": 2, "l": 2}, "divide"),
        ({"tokenizer": "cross", "l": 0}, "positive"),
        ({"partitions": -1}, ">= 0"),
        ({"n": 1500}, "dense"),
        ({"n": True}, "integer"),
        ({"n": 8.0}, "integer"),
    ],
)
def test_bad_configs_raise_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ToyConfig(**kwargs)


def test_cross_default_l_is_resolved():
    assert ToyConfig(tokenizer="cross").l == 2


def test_report_is_json_and_renders():
    report = toy_report(ToyConfig(partitions=20))
    assert json.loads(json.dumps(report, allow_nan=False)) == report
    text = render(report)
    assert "DISAGREE" in text and "Theorem 1 held" in text and "NOT OK" in text


def test_cli_writes_json_and_exits_by_agreement(tmp_path):
    runner = CliRunner()
    out = tmp_path / "toy.json"
    result = runner.invoke(
        theory_app, ["toy", "--n", "6", "--m", "2", "--partitions", "20", "--json", str(out)]
    )
    assert result.exit_code == 1, result.output  # eqs. 18, 24 and 29 disagree for the class tokenizer
    assert "DISAGREE" in result.output
    report = json.loads(out.read_text())
    assert report["config"]["n"] == 6 and report["disagreements"] > 0 and not report["ok"]
    result = runner.invoke(theory_app, ["toy", "--tokenizer", "mae", "--m", "0", "--partitions", "20"])
    assert result.exit_code == 0, result.output
    assert "0 disagreement(s); OK" in result.output
    result = runner.invoke(theory_app, ["toy", "--tokenizer", "cross", "--l", "3"])
    assert isinstance(result.exception, ConfigError)
