"""docs/BENCHMARKS.md from the benches' JSON results: every ratio against its target, and an ImageNet-1k
projection from the measured per-core rates.

Reads bench/results/{kmeans,extract,tokenize,train}.json (written by `uv run python -m bench.<name>`) and,
when present, bench/results/gpu_check.json (`uv run python -m bench.gpu_check --out bench/results`). A
missing result reads "not measured".

gpu_check.json: its `ratios` ({name, median, min, max, rounds, target}) are tabled like the benches' (met is
judged here when absent; with fewer than 3 rounds their spread says nothing, and the table says so). Its
machine comes from its `environment` step. Measured GPU rates replace the projection's assumed GPU
speed-ups: a top-level `rates` dict (`kmeans_multiply_adds_per_s_per_gpu`, `extract_images_per_s_per_gpu`,
`tokenize_images_per_s_per_gpu`, `loader_images_per_s_per_gpu`) when it has one; else, from a full (not
--cpu-smoke) run whose k-means step ran on a GPU, our epoch's multiply-adds per second per GPU
(`ours_macs_per_s` over the GPUs its workers held). Its extract and tokenize figures are for a ViT
extractor, not the pixel work projected here, so they are not used.
Run: uv run python -m bench.report [--results bench/results] [--out docs/BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench.harness import MIN_ROUNDS, RESULTS_DIR, SPREAD_LIMIT, WITHIN, target_met

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "BENCHMARKS.md"
BENCHES = ("kmeans", "extract", "tokenize", "train")
TITLES = {
    "kmeans": "k-means (`bench/kmeans.py`)",
    "extract": "extract (`bench/extract.py`)",
    "tokenize": "tokenize (`bench/tokenize.py`)",
    "train": "train input path (`bench/train.py`)",
    "gpu_check": "GPU check (`bench/gpu_check.py`)",
}

# The projection's assumptions, all stated in the text it writes.
IMAGES = 1_281_167  # ImageNet-1k train
CORES_PER_NODE = 96  # CPU cores of one 8-GPU node that the stages can use
GPUS_PER_NODE = 8
NODES = (1, 4)
PATCHES_PER_IMAGE = 16  # k-means features sampled per image (extract --patches-per-image)
KMEANS_EPOCHS = 20  # the cluster stage's default
# One GPU against one CPU core at the same work; used only until gpu_check.json measures the rate.
GPU_SPEEDUP = {"kmeans": 200.0, "extract": 1.0, "tokenize": 1.0, "loader": 1.0}


def load_results(results_dir: str | Path) -> dict[str, dict | None]:
    d = Path(results_dir)
    out: dict[str, dict | None] = {}
    for name in (*BENCHES, "gpu_check"):
        p = d / f"{name}.json"
        out[name] = json.loads(p.read_text()) if p.exists() else None
    return out


def _num(v: Any, precise: bool = False) -> str:
    if v is None:
        return "-"
    return f"{v:.6f}" if precise else f"{v:.3g}"


def ratio_row(r: dict) -> str:
    target = r.get("target")
    precise = bool(target and WITHIN.match(target))
    met = r.get("met")
    if "met" not in r and target and r.get("median") is not None:
        try:
            met = target_met(r["median"], target)
        except ValueError:
            met = None
    rounds = r.get("rounds") or 0
    if "trustworthy" in r:
        spread, limit, trusted = r.get("spread"), r.get("spread_limit", SPREAD_LIMIT), r["trustworthy"]
    elif rounds >= MIN_ROUNDS and r.get("median"):
        spread, limit = (r["max"] - r["min"]) / abs(r["median"]), SPREAD_LIMIT
        trusted = spread <= limit
    else:
        spread, limit, trusted = None, SPREAD_LIMIT, None
    if trusted:
        trust = "yes"
    elif trusted is None:
        trust = f"unknown ({rounds} round{'s' if rounds != 1 else ''}, not interleaved)"
    else:
        trust = f"no (spread {spread:.2f} > {limit:g})" if spread is not None else "no"
    verdict = {True: "yes", False: "no", None: "-"}[met]
    return (
        f"| {r['name']} | {_num(r.get('median'), precise)} | {_num(r.get('min'), precise)}–"
        f"{_num(r.get('max'), precise)} | {rounds or '-'} | {target or 'none'} | {verdict} | {trust} |"
    )


def _step(result: dict, name: str) -> dict | None:
    return next((st for st in result.get("steps") or [] if st.get("name") == name), None)


def gpu_check_machine(result: dict) -> dict | None:
    """gpu_check.json's machine, from its environment step, in the benches' `machine` shape."""
    env = _step(result, "environment")
    if not env:
        return None
    f = env.get("figures") or {}
    gpus = f.get("gpus") or []
    return {
        "cpu_model": f"host {result.get('host', '?')}",
        "cpus_usable": f.get("cpus_usable", f.get("cpu_count")),
        "gpu": f"{len(gpus)} x {gpus[0]['name']}" if gpus else "none (CUDA not available)",
        "load_start": f.get("load_avg"),
        "load_end": None,
        "python": f.get("python"),
        "torch": f.get("torch"),
        "faiss": f.get("faiss"),
        "date": result.get("started_at"),
    }


def gpu_rates(result: dict | None) -> dict[str, float]:
    """Rates measured on a GPU (see the module's docstring); empty when none were."""
    if not result:
        return {}
    if result.get("rates"):
        return dict(result["rates"])
    rates: dict[str, float] = {}
    km = _step(result, "kmeans")
    if result.get("mode") == "full" and km and km.get("status") == "ok":
        f = km.get("figures") or {}
        gpus = (f.get("workers") or 0) * (f.get("gpus_per_worker") or 0)
        if gpus > 0 and f.get("ours_macs_per_s"):
            rates["kmeans_multiply_adds_per_s_per_gpu"] = f["ours_macs_per_s"] / gpus
    return rates


def machine_line(m: dict | None) -> str:
    if not m:
        return "Machine: not recorded."
    load = m.get("load_start"), m.get("load_end")
    loads = " -> ".join(f"{x[0]:.2f}" if x else "?" for x in load)
    gpu = f", GPU {m.get('gpu') or m.get('device')}" if m.get("gpu") or m.get("device") else ""
    return (
        f"Machine: {m.get('cpu_model', '?')}, {m.get('cpus_usable', m.get('cpu_count', '?'))} CPUs{gpu}; "
        f"1-min load average {loads} (start -> end); Python {m.get('python', '?')}, torch {m.get('torch', '?')}, "
        f"faiss {m.get('faiss', '?')}; run {m.get('date', '?')}."
    )


def bench_section(name: str, result: dict | None) -> list[str]:
    lines = [f"## {TITLES[name]}", ""]
    if result is None:
        cmd = "bench/gpu_check.py" if name == "gpu_check" else f"`uv run python -m bench.{name}`"
        return [*lines, f"Not measured (no `bench/results/{name}.json`; run {cmd}).", ""]
    m = result.get("machine") or (gpu_check_machine(result) if name == "gpu_check" else None)
    lines += [machine_line(m), ""]
    if result.get("command"):
        lines += [f"Command: `{result['command']}`", ""]
    ratios = result.get("ratios") or []
    if not ratios:
        return [*lines, "No ratios recorded.", ""]
    lines += [
        "| ratio | median | min–max | rounds | target | met | trustworthy |",
        "|---|---|---|---|---|---|---|",
        *(ratio_row(r) for r in ratios),
        "",
    ]
    return lines


def _hours(work: float, rate: float | None, units: float) -> float | None:
    return None if not rate else work / (rate * units) / 3600


def _h(v: float | None) -> str:
    return "not measured" if v is None else f"{v:.3g}"


def _measured_at(key: str, r: dict) -> str:
    """The conditions a per-core rate was measured under (they hold for the projection too)."""
    if not r:
        return "-"
    if key == "extract":
        return f"view {r.get('extract_view_px', '?')} px of {r.get('extract_source_px', '?')}-px JPEGs"
    if key == "kmeans":
        return f"D = {r.get('kmeans_dim', '?')}, K = {r.get('kmeans_k', '?')}"
    if key == "tokenize":
        return f"V = {r.get('tokenize_views', '?')}, K = {r.get('tokenize_k', '?')}, view {r.get('tokenize_view_px', '?')} px"
    return (
        f"view {r.get('loader_view_px', '?')} px, V = {r.get('loader_views', '?')}, "
        f"{r.get('loader_source_px', '?')}-px JPEGs"
    )


def projection(results: dict[str, dict | None]) -> list[str]:
    rates = {n: (results.get(n) or {}).get("rates", {}) for n in BENCHES}
    measured_gpu_rates = gpu_rates(results.get("gpu_check"))
    km = rates["kmeans"]
    dim, k = km.get("kmeans_dim", 768), km.get("kmeans_k", 4096)
    vectors = IMAGES * PATCHES_PER_IMAGE
    macs = vectors * k * dim * KMEANS_EPOCHS
    stages = [  # label, work, unit, key, measured rate per core, its conditions
        ("extract (pixel features)", IMAGES, "images", "extract", "extract_images_per_s_per_core", "extract"),
        (f"k-means ({KMEANS_EPOCHS} epochs)", macs, "multiply-adds", "kmeans",
         "kmeans_multiply_adds_per_s_per_core", "kmeans"),
        ("tokenize", IMAGES, "images", "tokenize", "tokenize_images_per_s_per_core", "tokenize"),
        ("train loader, one epoch", IMAGES, "images", "loader", "loader_images_per_s_per_core", "train"),
    ]  # fmt: skip
    gpu_keys = {
        "kmeans": "kmeans_multiply_adds_per_s_per_gpu",
        "extract": "extract_images_per_s_per_gpu",
        "tokenize": "tokenize_images_per_s_per_gpu",
        "loader": "loader_images_per_s_per_gpu",
    }
    used = sorted(k for k in gpu_keys if measured_gpu_rates.get(gpu_keys[k]))
    gpu_note = (
        f"- measured GPU rates from bench/results/gpu_check.json replace the assumed factor for: {', '.join(used)};"
        if used
        else "- no GPU rate has been measured yet (no usable bench/results/gpu_check.json): every GPU figure "
        "below is an assumption;"
    )
    lines = [
        "## Projection: ImageNet-1k",
        "",
        "**Projection until a GPU run replaces it.** Hours for the 1,281,167 ImageNet-1k training images on one "
        f"8-GPU node and on {NODES[-1]} such nodes, computed from the per-core rates measured above (a stage's "
        "images/s over the CPUs it ran on; k-means: multiply-adds per second of our epoch, n·K·D over its "
        "seconds, per worker core), each at the conditions it was measured under. Assumptions:",
        "",
        f"- one node: {GPUS_PER_NODE} GPUs and {CORES_PER_NODE} CPU cores that the stages use; the per-core rate "
        f"of the bench machine holds on the node's cores; {NODES[-1]} nodes scale linearly (no reduction, "
        "network or storage limit is modelled);",
        f"- k-means: {PATCHES_PER_IMAGE} patch features per image ({vectors:,} vectors) of dimension {dim}, "
        f"K = {k} (those of the k-means rate measured at the largest K; 768 and 4096 when not measured), "
        f"{KMEANS_EPOCHS} Lloyd epochs: {macs:.3g} multiply-adds in all;",
        "- GPU speed-up factors, one GPU against one CPU core at the same work, **assumed, not measured**: "
        + ", ".join(f"{name} {f:g}x" for name, f in GPU_SPEEDUP.items())
        + ". 1x: the stage is bound by JPEG decoding and view rendering on the CPU, which a GPU does not "
        "shorten. Each stage runs on whichever is faster, the node's cores or its GPUs;",
        gpu_note,
        "- the loader row is one pass over the images (one training epoch); it is not part of the total.",
        "",
        f"| stage | work | measured at | rate per core | rate per GPU | runs on | 1 node (h) | {NODES[-1]} nodes (h) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    totals = {n: 0.0 for n in NODES}
    missing = False
    for label, work, unit, key, rate_key, bench in stages:
        core_rate = rates[bench].get(rate_key)
        measured_gpu = measured_gpu_rates.get(gpu_keys[key])
        if measured_gpu:
            gpu_rate, gpu_src = measured_gpu, f"{measured_gpu:.3g}/s, measured (gpu_check.json)"
        elif core_rate and GPU_SPEEDUP[key] > 1:
            gpu_rate = GPU_SPEEDUP[key] * core_rate
            gpu_src = f"{gpu_rate:.3g}/s, assumed ({GPU_SPEEDUP[key]:g}x a core)"
        else:
            gpu_rate, gpu_src = None, ("not used (assumed 1x a core)" if core_rate else "not measured")
        cpu_node, gpu_node = (core_rate or 0) * CORES_PER_NODE, (gpu_rate or 0) * GPUS_PER_NODE
        per_node = max(cpu_node, gpu_node)
        runs_on = (
            "-"
            if not per_node
            else (f"{GPUS_PER_NODE} GPUs" if gpu_node > cpu_node else f"{CORES_PER_NODE} cores")
        )
        hours = {n: _hours(work, per_node or None, n) for n in NODES}
        if key != "loader":
            for n in NODES:
                if hours[n] is None:
                    missing = True
                else:
                    totals[n] += hours[n]
        rate = "not measured" if not core_rate else f"{core_rate:.3g} {unit}/s"
        lines.append(
            f"| {label} | {work:.3g} {unit} | {_measured_at(key, rates[bench])} | {rate} | {gpu_src} | {runs_on} | "
            f"{_h(hours[NODES[0]])} | {_h(hours[NODES[-1]])} |"
        )
    lines.append(
        "| extract + k-means + tokenize | | | | | | "
        + " | ".join("incomplete" if missing else _h(totals[n]) for n in NODES)
        + " |"
    )
    lines.append("")
    return lines


def render(results: dict[str, dict | None]) -> str:
    lines = [
        "# Benchmarks",
        "",
        "Generated by `uv run python -m bench.report` from `bench/results/*.json`; do not edit by hand. Every "
        "bench runs its subject and its reference in rotation (A B A B ..., at least 3 rounds; "
        "`bench/harness.py`) and takes each ratio within a round: the table gives the median, min and max of "
        "the per-round ratios. A ratio whose spread (max - min) / median exceeds the limit (0.25 unless "
        "stated) is marked not trustworthy: the machine was too noisy for it, whatever its median says. "
        "`met` judges the median against the target.",
        "",
    ]
    for name in BENCHES:
        lines += bench_section(name, results.get(name))
    if results.get("gpu_check") is not None:
        lines += bench_section("gpu_check", results["gpu_check"])
    lines += projection(results)
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=str(RESULTS_DIR))
    ap.add_argument("--out", default=str(DOC))
    args = ap.parse_args(argv)
    text = render(load_results(args.results))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")
    return text


if __name__ == "__main__":
    main()
