"""bench/science: the TCAS-vs-K script end to end on a tiny setting, and docs/RESULTS.md against the committed
measurements (docs/results/*.json), so the doc cannot drift from what the scripts printed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.science import kmim_vs_mae, tcas_vs_k

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results"
DOC = REPO / "docs" / "RESULTS.md"


@pytest.mark.slow
def test_tcas_vs_k_tiny_writes_table_json_png(tmp_path, capsys):
    out = tmp_path / "out"
    result = tcas_vs_k.main(["--ks", "10", "--epochs", "1", "--random", "random-features", "--out", str(out)])

    saved = json.loads((out / "tcas_vs_k.json").read_text())
    assert saved["rows"] == result["rows"] and saved["kmeans_epochs"] == 1
    assert (out / "tcas_vs_k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "tcas_vs_k.md").read_text()
    assert table.strip() == tcas_vs_k.markdown(result["rows"]) and table.strip() in capsys.readouterr().out

    kmeans = [r for r in result["rows"] if r["codebook"] == "k-means"]
    random = [r for r in result["rows"] if r["codebook"] == "random-features"]
    assert [r["k"] for r in kmeans] == [10] and [r["k"] for r in random] == [50]
    for r in result["rows"]:
        # 10 classes: a code spread evenly over them scores (1 - 1/10)^2 = 0.81 in the first term
        assert 0.0 < r["tcas"] < 1.0 and r["first_term"] <= r["tcas"]
        assert r["patches"] == result["samples"] * 64  # 32 px / patch 4: every patch of every train image
        assert 0 < r["used_codes"] <= r["k"] and 1.0 <= r["perplexity"] <= r["used_codes"]
    assert kmeans[0]["used_codes"] == 10
    assert abs(random[0]["tcas"] - kmeans[0]["tcas"]) > 1e-4


def _doc() -> str:
    return DOC.read_text()


def test_results_doc_holds_the_tcas_vs_k_measurements():
    result = json.loads((RESULTS / "tcas_vs_k.json").read_text())
    doc = _doc()
    assert tcas_vs_k.markdown(result["rows"]) in doc  # the printed table, verbatim
    assert (RESULTS / "tcas_vs_k.md").read_text().strip() == tcas_vs_k.markdown(result["rows"])
    assert f"{result['times']['wall_s']}" in doc and "(results/tcas_vs_k.png)" in doc
    assert (RESULTS / "tcas_vs_k.png").exists()


def test_results_doc_holds_the_kmim_vs_mae_measurements():
    result = json.loads((RESULTS / "kmim_vs_mae.json").read_text())
    doc = _doc()
    table = kmim_vs_mae.markdown(result)
    assert (RESULTS / "kmim_vs_mae.md").read_text().strip() == table
    for block in table.split("\n\n"):  # the three printed tables, each verbatim
        assert block.strip() in doc
    for s in result["summary"]:  # and the headline figures where the text quotes them
        assert kmim_vs_mae.pm(s["linear_mean"], s["linear_std"]) in doc
        assert kmim_vs_mae.pm(s["knn_mean"], s["knn_std"]) in doc
    for c in result["correlations"].values():
        assert f"{c['pearson_r']:.3f}" in doc and f"{c['spearman_rho']:.3f}" in doc
    assert f"{result['wall_s']}" in doc and f"{result['epochs']} epochs" in doc
    assert "(results/kmim_vs_mae.png)" in doc and (RESULTS / "kmim_vs_mae.png").exists()


def test_kmim_vs_mae_replot_rewrites_table_and_png_from_saved_json(tmp_path, capsys):
    saved = tmp_path / "kmim_vs_mae.json"
    saved.write_text((RESULTS / "kmim_vs_mae.json").read_text())
    result = kmim_vs_mae.main(["--replot", str(saved)])
    table = (tmp_path / "kmim_vs_mae.md").read_text().strip()
    assert table == kmim_vs_mae.markdown(result) and table in capsys.readouterr().out
    assert (tmp_path / "kmim_vs_mae.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_kmim_vs_mae_statistics():
    assert kmim_vs_mae.mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)  # sample std (n - 1)
    c = kmim_vs_mae.correlations([0.1, 0.2, 0.3, 0.4], [4.0, 3.0, 2.0, 1.0])
    assert c["pearson_r"] == -1.0 and c["spearman_rho"] == -1.0 and c["n"] == 4
    assert kmim_vs_mae.correlations([0.1, 0.2], [1.0, 2.0])["pearson_r"] is None  # too few points
    summary = kmim_vs_mae.summarize(
        [
            {
                "variant": "a",
                "target": "tokens",
                "k": 50,
                "tcas": 0.5,
                "seed": s,
                "steps": 10,
                "knn": v,
                "linear": v + 10,
            }
            for s, v in [(0, 40.0), (1, 50.0)]
        ]
    )
    assert summary[0]["knn_mean"] == 45.0 and summary[0]["linear_std"] == round(50**0.5, 2)
    sweep = [
        {
            "k": k,
            "seed": s,
            "tcas": 0.8 - k / 1000,
            "used_codes": k,
            "final_loss": 1.0 + s,
            "knn": 50.0 + s,
            "linear": 60.0 + 2 * s,
            "train_s": 10.0,
        }
        for k in (25, 10)
        for s in (0, 1, 2)
    ]
    per_k = kmim_vs_mae.summarize_sweep(sweep)
    assert [r["k"] for r in per_k] == [10, 25] and [r["seeds"] for r in per_k] == [[0, 1, 2]] * 2
    assert per_k[0]["linear_mean"] == 62.0 and per_k[0]["linear_std"] == 2.0 and per_k[0]["final_loss"] == 2.0


def test_results_doc_holds_the_fashion_mnist_measurements():
    result = json.loads((RESULTS / "fashion_mnist.json").read_text())
    doc = _doc()
    table = kmim_vs_mae.markdown(result)
    assert (RESULTS / "fashion_mnist.md").read_text().strip() == table
    for block in table.split("\n\n"):  # every printed table, verbatim
        assert block.strip() in doc
    for s in result["summary"]:
        assert kmim_vs_mae.pm(s["linear_mean"], s["linear_std"]) in doc
    assert f"Welch p = {result['welch']['linear']['p']:.3f}" in doc
    assert f"{result['wall_s']}" in doc and result["dataset"] == "Fashion-MNIST"
    assert "(results/fashion_mnist.png)" in doc and (RESULTS / "fashion_mnist.png").exists()
