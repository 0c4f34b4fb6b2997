"""bench/harness.py (interleaving, ratios, the trust flag) and bench/report.py on hand-written results.
The benches themselves are not run here: they take minutes."""

from __future__ import annotations

import json

import pytest

from bench import report
from bench.harness import Ratio, Timings, interleave, machine, target_met, write_json


def test_interleave_alternates_cases_every_round():
    calls: list[str] = []

    def case(name: str, seconds: float | None):
        def run():
            calls.append(name)
            return seconds

        return run

    t = interleave({"a": case("a", 2.0), "b": case("b", None), "c": case("c", 1.0)}, rounds=3, verbose=False)
    assert calls == ["a", "b", "c"] * 3 and t.order == calls
    assert t.rounds == 3
    assert t.seconds["a"] == [2.0] * 3 and t.seconds["c"] == [1.0] * 3  # their own measurement
    assert all(0 <= s < 1 for s in t.seconds["b"])  # None: the call itself is timed
    with pytest.raises(ValueError, match="at least 3"):
        interleave({"a": case("a", 1.0)}, rounds=2)


def test_ratio_per_round_median_min_max():
    t = Timings({"ours": [1.0, 2.0, 4.0], "ref": [2.0, 2.0, 2.0], "other": [4.0, 1.0, 8.0]})
    r = t.ratio("ours", "ref")
    assert r.values == (0.5, 1.0, 2.0) and (r.median, r.min, r.max, r.rounds) == (1.0, 0.5, 2.0, 3)
    rate = t.ratio("ours", "ref", rate=True)  # throughput: reference seconds / subject seconds
    assert rate.values == (2.0, 1.0, 0.5)
    fastest = t.ratio("ours", ["ref", "other"])  # the faster reference of each round
    assert fastest.values == (0.5, 2.0, 2.0) and fastest.name == "ours/ref or other"
    assert t.ratio("ours", "ref", rate=True, scale=2.0).values == (4.0, 2.0, 1.0)
    assert t.median("other") == 4.0


def test_trustworthy_flag_and_line():
    wide = Ratio("ours/faiss per epoch", (0.5, 0.9, 1.2))
    assert wide.spread == pytest.approx(0.7 / 0.9) and not wide.trustworthy
    line = wide.line("<= 1.0")
    assert "SPREAD TOO WIDE (0.78, limit 0.25) to trust" in line and "MET" not in line
    assert line.startswith("ours/faiss per epoch: median 0.9 (min 0.5, max 1.2, 3 rounds) target <= 1.0")

    tight = Ratio("ours/faiss per epoch", (0.85, 0.91, 0.97))
    assert tight.trustworthy and tight.met("<= 1.0") and not tight.met("<= 0.9")
    assert tight.line("<= 1.0").endswith("target <= 1.0: MET (spread 0.13 <= 0.25)")
    assert "NOT MET" in tight.line(">= 1.0")
    assert not Ratio("x", (0.85, 0.91, 0.97), limit=0.1).trustworthy  # the limit is a parameter
    assert Ratio("x", (2.0, 2.0, 2.0)).spread == 0.0
    assert Ratio("wait", (0.1, 0.1, 0.1)).to_json(None)["met"] is None


def test_targets():
    assert target_met(0.8, ">= 0.8") and not target_met(0.79, ">= 0.8")
    assert target_met(1.0009, "within 0.1 %") and target_met(0.9991, "within 0.1 %")
    assert not target_met(1.0011, "within 0.1 %")
    assert target_met(3.0, None) is None
    with pytest.raises(ValueError):
        target_met(1.0, "about 1")


def test_machine_and_write_json(tmp_path):
    m = machine()
    assert m["cpu_count"] >= 1 and len(m["load_start"]) == 3 and m["load_end"] is None
    assert {"cpu_model", "python", "torch", "faiss", "date"} <= set(m)
    p = write_json(tmp_path / "sub" / "x.json", {"machine": m, "ratios": []})
    saved = json.loads(p.read_text())
    assert len(saved["machine"]["load_end"]) == 3


def _ratio(name, values, target):
    return Ratio(name, tuple(values)).to_json(target)


def _result(bench, ratios, rates):
    return {
        "bench": bench,
        "command": f"uv run python -m bench.{bench} --tiny",
        "machine": {
            "cpu_model": "Test CPU",
            "cpus_usable": 2,
            "load_start": [1.0, 1.0, 1.0],
            "load_end": [2.0, 1.0, 1.0],
            "python": "3.11",
            "torch": "2.x",
            "faiss": "1.x",
            "date": "2026-01-02T03:04:05+00:00",
        },
        "ratios": ratios,
        "rates": rates,
    }


def _write_two(tmp_path):
    kmeans = _result(
        "kmeans",
        [
            _ratio("K=256 ours/faster of faiss and sklearn per epoch", [0.85, 0.91, 0.97], "<= 1.0"),
            _ratio("K=256 final inertia ours/faiss", [1.0002, 1.0002, 1.0002], "within 0.1 %"),
            _ratio("K=256 streamed/in-memory per epoch", [1.0, 1.62, 1.4], "<= 1.5"),
        ],
        {"kmeans_multiply_adds_per_s_per_core": 2e10, "kmeans_dim": 768, "kmeans_k": 256},
    )
    extract = _result(
        "extract",
        [_ratio("pixel extract / read+decode loop", [0.7, 0.75, 0.72], ">= 0.8")],
        {"extract_images_per_s_per_core": 100.0, "extract_view_px": 224, "extract_source_px": 400},
    )
    (tmp_path / "kmeans.json").write_text(json.dumps(kmeans))
    (tmp_path / "extract.json").write_text(json.dumps(extract))


def test_report_tables_and_not_measured(tmp_path):
    _write_two(tmp_path)
    out = tmp_path / "BENCHMARKS.md"
    text = report.main(["--results", str(tmp_path), "--out", str(out)])
    assert out.read_text() == text
    assert "| ratio | median | min–max | rounds | target | met | trustworthy |" in text
    assert (
        "| K=256 ours/faster of faiss and sklearn per epoch | 0.91 | 0.85–0.97 | 3 | <= 1.0 | yes | yes |"
        in text
    )
    assert (
        "| K=256 final inertia ours/faiss | 1.000200 | 1.000200–1.000200 | 3 | within 0.1 % | yes | yes |"
        in text
    )
    assert (
        "| K=256 streamed/in-memory per epoch | 1.4 | 1–1.62 | 3 | <= 1.5 | yes | no (spread 0.44 > 0.25) |"
        in text
    )
    assert "| pixel extract / read+decode loop | 0.72 | 0.7–0.75 | 3 | >= 0.8 | no | yes |" in text
    assert "Machine: Test CPU, 2 CPUs" in text and "2026-01-02T03:04:05+00:00" in text
    assert "Command: `uv run python -m bench.kmeans --tiny`" in text
    assert "Not measured (no `bench/results/tokenize.json`" in text
    assert "Not measured (no `bench/results/train.json`" in text
    assert "GPU check" not in text
    # projection: extract 1.28M images / (100 img/s x 96 cores) = 0.0371 h; missing stages say so
    assert "## Projection: ImageNet-1k" in text and "Projection until a GPU run replaces it" in text
    assert (
        "| extract (pixel features) | 1.28e+06 images | view 224 px of 400-px JPEGs | 100 images/s | not used (assumed 1x a core) | 96 cores |"
        in text
        and "| 0.0371 | 0.00927 |" in text
    )
    tokenize_row = next(line for line in text.splitlines() if line.startswith("| tokenize"))
    assert tokenize_row.count("not measured") == 4
    assert "| extract + k-means + tokenize | | | | | | incomplete | incomplete |" in text
    assert "no GPU rate has been measured yet" in text


def test_report_reads_gpu_check_shape(tmp_path):
    """bench/gpu_check.py's JSON: one-round ratios without met/trustworthy, the machine in its environment step,
    and our GPU k-means epoch rate in its kmeans step."""
    _write_two(tmp_path)
    gpu = {
        "check": "gpu_check",
        "mode": "full",
        "command": "uv run python -m bench.gpu_check --out bench/results",
        "started_at": "2026-01-03T00:00:00+00:00",
        "host": "gpu-box",
        "steps": [
            {
                "name": "environment",
                "status": "ok",
                "figures": {"python": "3.11", "torch": "2.x", "faiss": "1.x", "cpus_usable": 16,
                            "load_avg": [0.5, 0.5, 0.5], "gpus": [{"name": "NVIDIA H200"}]},
            },
            {"name": "kmeans", "status": "ok",
             "figures": {"workers": 1, "gpus_per_worker": 1.0, "ours_macs_per_s": 1e13}},
        ],
        "ratios": [{"name": "kmeans_macs_vs_faiss", "median": 0.9, "min": 0.9, "max": 0.9, "rounds": 1,
                    "target": ">= 0.8"}],
    }  # fmt: skip
    (tmp_path / "gpu_check.json").write_text(json.dumps(gpu))
    text = report.render(report.load_results(tmp_path))
    assert "## GPU check" in text and "host gpu-box, 16 CPUs, GPU 1 x NVIDIA H200" in text
    assert (
        "| kmeans_macs_vs_faiss | 0.9 | 0.9–0.9 | 1 | >= 0.8 | yes | unknown (1 round, not interleaved) |"
        in text
    )
    kmeans_row = next(line for line in text.splitlines() if line.startswith("| k-means"))
    assert "| 1e+13/s, measured (gpu_check.json) | 8 GPUs |" in kmeans_row
    assert "replace the assumed factor for: kmeans;" in text
    # a --cpu-smoke run measures nothing on a GPU: the assumed factor stays
    gpu["mode"] = "cpu-smoke"
    (tmp_path / "gpu_check.json").write_text(json.dumps(gpu))
    text = report.render(report.load_results(tmp_path))
    kmeans_row = next(line for line in text.splitlines() if line.startswith("| k-means"))
    assert "assumed (200x a core)" in kmeans_row
