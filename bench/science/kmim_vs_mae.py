"""K-MIM PIXEL (token targets) vs MAE (pixel targets) at equal steps, and TCAS vs linear accuracy across K.

Everything runs through a recipe (--recipe, default manifests/recipes/digits.yaml;
bench/science/fashion_mnist.py runs manifests/recipes/fashion-mnist.yaml) with `kmim.lineage.runner.run_recipe`, so
the artifacts land under ROOT/<stage>/<fingerprint>/ and a rerun reuses every finished stage:
1. for each seed in --seeds: the recipe's two variants (`kmim-pixel-k50`: `tokens` target, K = 50;
   `mae`: `pixel` target, norm_pix_loss) with `--set train.seed=S`, same schedule (equal steps by
   construction), then the recipe's k-NN (k = 20) and linear probes (30 epochs) on the val split; reported
   as mean ± sample std (n - 1) over seeds;
2. for each K in --ks and each seed in --sweep-seeds, a tokens-target run with `--set cluster.k=K`, its
   TCAS (the tokenize stage's report.json: train split, view 0) and probes; Pearson and Spearman correlation
   of TCAS with linear (and k-NN) top-1 across K, on the per-K means over seeds (seed noise on digits is as
   large as the effect of K) and on every (K, seed) run: the question of paper Figure 4. K = 50 at a seed of
   step 1 is that run, reused.
The same correlations of paper Table 7's K-MIM PIXEL rows at the same K (ImageNet-100) are computed for
reference. `--sweep-epochs` gives the K sweep a shorter schedule than step 1 (then K = 50 is trained anew).

Run: uv run python -m bench.science.kmim_vs_mae [--seeds 0,1,2] [--ks 10,25,50,100,200] [--sweep-seeds 0,1,2]
     [--epochs 20] [--sweep-epochs E] [--root DIR]
Writes kmim_vs_mae.json, .md, .png next to the root (default bench/science/out/kmim_vs_mae/); `--replot JSON`
redraws the .md and .png of a saved result.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
RECIPE = "manifests/recipes/digits.yaml"  # default --recipe, relative to the repo root
DEFAULT_ROOT = "bench/science/out/kmim_vs_mae/root"
# Paper Table 7, K-MIM PIXEL on ImageNet-100 (k-means 100 epochs at K = 50): K -> (TCAS, linear probing top-1 %).
PAPER_TABLE7_PIXEL = {
    10: (0.69, 42.7),
    25: (0.60, 48.3),
    50: (0.56, 52.7),
    100: (0.52, 50.1),
    200: (0.49, 50.8),
    1000: (0.39, 50.6),
}


def correlations(x: list[float], y: list[float]) -> dict:
    from scipy import stats

    if len(x) < 3:
        return {"n": len(x), "pearson_r": None, "pearson_p": None, "spearman_rho": None, "spearman_p": None}
    p, s = stats.pearsonr(x, y), stats.spearmanr(x, y)
    return {
        "n": len(x),
        "pearson_r": round(float(p.statistic), 3),
        "pearson_p": round(float(p.pvalue), 3),
        "spearman_rho": round(float(s.statistic), 3),
        "spearman_p": round(float(s.pvalue), 3),
    }


def variants(recipe) -> tuple[str, str]:  # noqa: ANN001
    """(tokens-target run, pixel-target run) of the recipe's `runs:`."""
    targets = {run: recipe.train_config(run, "<in>", "<out>").model.target for run in recipe.runs}
    tokens = [r for r, t in targets.items() if t == "tokens"]
    pixel = [r for r, t in targets.items() if t == "pixel"]
    if not tokens or not pixel:
        raise SystemExit(f"{recipe.source}: needs a `tokens` and a `pixel` variant in runs: (has {targets})")
    return tokens[0], pixel[0]


def stage_walls(report, recipe_name: str) -> list[dict]:  # noqa: ANN001
    """Wall time and images/s of every step this invocation ran (reused steps cost nothing)."""
    from kmim import fs

    out = []
    for step in report.steps:
        if step.status not in ("ran", "resumed"):
            continue
        row = {"step": step.name, "status": step.status, "seconds": step.seconds}
        if step.stage in ("extract", "tokenize"):
            stats = fs.read_json(fs.join(step.path, "manifest.json"))["stats"]
            row["images"] = stats["samples"]
        elif step.stage == "train":
            row["images"] = fs.read_json(fs.join(step.path, "train_summary.json"))["images"]
        if row.get("images") and step.seconds:
            row["images_per_s"] = round(row["images"] / step.seconds, 1)
        out.append(row)
    return out


def run(
    recipe_file: str, root: str, sets: list[str], runs: list[str]
) -> tuple[list[dict], float, list[dict]]:
    """One `kmim run` of the recipe (all stages); a row per variant, the wall, and the steps it ran."""
    from kmim import fs
    from kmim.lineage.recipe import load_recipe
    from kmim.lineage.runner import run_recipe

    print(
        f"\n=== kmim run {recipe_file} --root {root} {' '.join('--set ' + s for s in sets)} "
        f"{' '.join('--run ' + r for r in runs)}",
        flush=True,
    )
    recipe = load_recipe(str(REPO / recipe_file), sets)
    start = time.perf_counter()
    report = run_recipe(recipe, root, runs=runs, sets=sets)
    wall = time.perf_counter() - start
    tok = next(s for s in report.steps if s.stage == "tokenize")
    tcas_report = fs.read_json(fs.join(tok.path, "report.json"))
    rows = []
    for name in runs:
        step = report.step(f"train/{name}")
        cfg = recipe.train_config(name, "<in>", "<out>")
        summary = fs.read_json(fs.join(step.path, "train_summary.json"))
        row = {
            "variant": name,
            "target": cfg.model.target,
            "seed": cfg.seed,
            "epochs": cfg.optim.epochs,
            "k": recipe.cluster.k if cfg.model.target != "pixel" else None,
            "tcas": round(tcas_report["tcas"]["tcas"], 4) if cfg.model.target != "pixel" else None,
            "used_codes": tcas_report["usage"]["used_codes"] if cfg.model.target != "pixel" else None,
            "steps": summary["steps"],
            "final_loss": round(summary["final_loss"], 4),
            "train_s": round(summary["seconds"], 1),
            "train_status": step.status,
            "path": step.path,
        }
        for protocol in recipe.evals:
            r = fs.read_json(fs.join(step.path, f"eval-{protocol}.json"))
            row[protocol] = round(100 * r["top1"], 2)
            row[f"{protocol}_s"] = round(r["seconds"], 1)
        rows.append(row)
    return rows, round(wall, 1), stage_walls(report, recipe.name)


def epoch_sets(recipe, epochs: int) -> list[str]:  # noqa: ANN001
    """Overrides for a schedule of `epochs` (none at the recipe's own); warmup shortened if it would not fit."""
    optim = recipe.train_raw["optim"]
    if epochs == int(optim["epochs"]):
        return []
    sets = [f"train.optim.epochs={epochs}"]
    if optim.get("warmup_epochs", 0) >= epochs:
        sets.append(f"train.optim.warmup_epochs={max(epochs / 10, 0.1)}")
    return sets


def mean_std(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=np.float64)
    return round(float(a.mean()), 2), round(float(a.std(ddof=1)) if len(a) > 1 else 0.0, 2)


def probe_stats(rows: list[dict]) -> dict:
    """k-NN and linear top-1 of runs that differ only by seed: mean ± sample std, and each seed's value."""
    knn, linear = mean_std([r["knn"] for r in rows]), mean_std([r["linear"] for r in rows])
    return {
        "seeds": [r["seed"] for r in rows],
        "knn_mean": knn[0],
        "knn_std": knn[1],
        "linear_mean": linear[0],
        "linear_std": linear[1],
        "knn_per_seed": [r["knn"] for r in rows],
        "linear_per_seed": [r["linear"] for r in rows],
    }


def summarize_sweep(sweep: list[dict]) -> list[dict]:
    """Per K: TCAS (the codebook does not depend on the training seed) and mean ± std of the probes."""
    out = []
    for k in sorted({r["k"] for r in sweep}):
        rows = [r for r in sweep if r["k"] == k]
        out.append(
            {
                "k": k,
                "tcas": rows[0]["tcas"],
                "used_codes": rows[0]["used_codes"],
                **probe_stats(rows),
                "final_loss": round(float(np.mean([r["final_loss"] for r in rows])), 4),
                "train_s": round(float(np.mean([r["train_s"] for r in rows])), 1),
            }
        )
    return out


def summarize(main_rows: list[dict]) -> list[dict]:
    out = []
    for variant in dict.fromkeys(r["variant"] for r in main_rows):
        rows = [r for r in main_rows if r["variant"] == variant]
        out.append(
            {
                "variant": variant,
                "target": rows[0]["target"],
                "k": rows[0]["k"],
                "tcas": rows[0]["tcas"],
                "steps": rows[0]["steps"],
                **probe_stats(rows),
            }
        )
    return out


def pm(mean: float, std: float) -> str:
    return f"{mean:.2f} ± {std:.2f}"


def markdown(result: dict) -> str:
    lines = [
        f"K-MIM vs MAE, {result.get('dataset', 'digits')}, equal steps ({result['epochs']} epochs; top-1 %, mean ± sample std over seeds)",
        "",
        "| variant | target | K | TCAS | steps | seeds | k-NN top-1 | linear top-1 | k-NN per seed | linear per seed |",
        "|---|---|---:|---:|---:|---|---:|---:|---|---|",
    ]
    for s in result["summary"]:
        lines.append(
            f"| {s['variant']} | {s['target']} | {s['k'] or '-'} | "
            f"{'-' if s['tcas'] is None else format(s['tcas'], '.4f')} | {s['steps']} | "
            f"{','.join(map(str, s['seeds']))} | {pm(s['knn_mean'], s['knn_std'])} | "
            f"{pm(s['linear_mean'], s['linear_std'])} | {', '.join(f'{v:.2f}' for v in s['knn_per_seed'])} | "
            f"{', '.join(f'{v:.2f}' for v in s['linear_per_seed'])} |"
        )
    lines += [
        "",
        f"TCAS vs accuracy across K (tokens target, seeds {','.join(map(str, result['sweep_seeds']))}, "
        f"{result['sweep_epochs']} epochs; top-1 %, mean ± sample std over seeds)",
        "",
        "| K | TCAS | used codes | final loss | k-NN top-1 | linear top-1 | k-NN per seed | linear per seed | train s |",
        "|---:|---:|---:|---:|---:|---:|---|---|---:|",
    ]
    for r in result["sweep_summary"]:
        lines.append(
            f"| {r['k']} | {r['tcas']:.4f} | {r['used_codes']}/{r['k']} | {r['final_loss']:.4f} | "
            f"{pm(r['knn_mean'], r['knn_std'])} | {pm(r['linear_mean'], r['linear_std'])} | "
            f"{', '.join(f'{v:.2f}' for v in r['knn_per_seed'])} | "
            f"{', '.join(f'{v:.2f}' for v in r['linear_per_seed'])} | {r['train_s']:.1f} |"
        )
    if result.get("welch"):
        lines += ["", "| K-MIM − MAE | difference of means | Welch t | p |", "|---|---:|---:|---:|"]
        for protocol, w in result["welch"].items():
            lines.append(f"| {protocol} | {w['diff']:+.2f} | {w['t']:.3f} | {w['p']:.3f} |")
    lines += ["", "| correlation | n | Pearson r | p | Spearman ρ | p |", "|---|---:|---:|---:|---:|---:|"]
    for name, c in result["correlations"].items():
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        lines.append(
            f"| {name} | {c['n']} | {fmt(c['pearson_r'])} | {fmt(c['pearson_p'])} | "
            f"{fmt(c['spearman_rho'])} | {fmt(c['spearman_p'])} |"
        )
    if result.get("stage_walls"):
        lines += ["", "| step (first run) | seconds | images | images/s |", "|---|---:|---:|---:|"]
        for w in result["stage_walls"]:
            lines.append(
                f"| {w['step']} | {w['seconds']:.1f} | {w.get('images', '-')} | {w.get('images_per_s', '-')} |"
            )
    return "\n".join(lines)


def welch(main_rows: list[dict], tokens_run: str, mae_run: str) -> dict:
    """K-MIM minus MAE per protocol: difference of the seed means, Welch's t and its two-sided p."""
    from scipy import stats

    out = {}
    for protocol in ("linear", "knn"):
        a = [r[protocol] for r in main_rows if r["variant"] == tokens_run]
        b = [r[protocol] for r in main_rows if r["variant"] == mae_run]
        if len(a) < 2 or len(b) < 2:
            continue
        t = stats.ttest_ind(a, b, equal_var=False)
        out[protocol] = {
            "diff": round(float(np.mean(a) - np.mean(b)), 2),
            "t": round(float(t.statistic), 3),
            "p": round(float(t.pvalue), 3),
        }
    return out


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    sweep = result["sweep_summary"]
    mae = next((s for s in result["summary"] if s["target"] == "pixel"), None)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, protocol, label in [(axes[0], "linear", "linear probe"), (axes[1], "knn", "k-NN (k=20)")]:
        x, y = [r["tcas"] for r in sweep], [r[f"{protocol}_mean"] for r in sweep]
        ax.errorbar(
            x,
            y,
            yerr=[r[f"{protocol}_std"] for r in sweep],
            fmt="o",
            capsize=3,
            label=f"K-MIM PIXEL, mean ± std over {len(result['sweep_seeds'])} seeds",
        )
        for r in result["sweep"]:
            ax.plot([r["tcas"]], [r[protocol]], ".", color="C0", alpha=0.35)
        for r in sweep:
            ax.annotate(
                f"K={r['k']}",
                (r["tcas"], r[f"{protocol}_mean"]),
                textcoords="offset points",
                xytext=(5, 4),
                fontsize=8,
            )
        if len(x) >= 3 and len(set(x)) > 1:
            slope, icept = np.polyfit(x, y, 1)
            xs = np.linspace(min(x), max(x), 10)
            c = result["correlations"][f"TCAS vs {protocol} (per-K means)"]
            ax.plot(
                xs, slope * xs + icept, "-", alpha=0.5, label=f"least squares (Pearson r = {c['pearson_r']})"
            )
        if mae is not None:
            m, s = mae[f"{protocol}_mean"], mae[f"{protocol}_std"]
            ax.axhline(m, color="grey", linestyle="--", label=f"MAE, {len(mae['seeds'])} seeds (± std)")
            ax.axhspan(m - s, m + s, color="grey", alpha=0.15)
        ax.xaxis.set_major_locator(MaxNLocator(5))
        ax.set_xlabel("TCAS of the K-means tokenizer (train split)")
        ax.set_ylabel(f"{label} top-1 % (val)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(
        f"{result.get('dataset', 'digits')}, vit_micro_patch4_32: val accuracy vs TCAS across K ({result.get('sweep_epochs', result['epochs'])} "
        f"epochs; MAE band: {result['epochs']} epochs)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=RECIPE, help="a recipe with a tokens and a pixel variant")
    ap.add_argument("--dataset", default="digits", help="the data's name in titles")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--ks", default="10,25,50,100,200")
    ap.add_argument("--sweep-seeds", default="0,1,2", help="training seeds of each K in the sweep")
    ap.add_argument("--epochs", type=int, default=None, help="training epochs (default: the recipe's)")
    ap.add_argument(
        "--sweep-epochs", type=int, default=None, help="training epochs of the K sweep (default: --epochs)"
    )
    ap.add_argument("--root", default=DEFAULT_ROOT)
    ap.add_argument("--out", default=None, help="where the JSON/MD/PNG go (default: the root's parent)")
    ap.add_argument(
        "--replot", metavar="JSON", help="only redraw the PNG (and the .md) of a saved kmim_vs_mae.json"
    )
    args = ap.parse_args(argv)
    if args.replot:
        with open(args.replot) as f:
            result = json.load(f)
        folder = os.path.dirname(os.path.abspath(args.replot))
        with open(os.path.join(folder, "kmim_vs_mae.md"), "w") as f:
            f.write(markdown(result) + "\n")
        plot(result, os.path.join(folder, "kmim_vs_mae.png"))
        print(markdown(result))
        return result
    from kmim.lineage.recipe import load_recipe

    recipe = load_recipe(str(REPO / args.recipe))
    tokens_run, mae_run = variants(recipe)
    default_epochs = int(recipe.train_raw["optim"]["epochs"])
    epochs = args.epochs or default_epochs
    sweep_epochs = args.sweep_epochs or epochs
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    ks = sorted({int(k) for k in args.ks.split(",") if k.strip()})
    out = args.out or os.path.dirname(os.path.abspath(args.root.rstrip("/")))
    start = time.perf_counter()
    main_rows, walls, steps = [], [], []
    for seed in seeds:
        rows, wall, ran = run(
            args.recipe, args.root, epoch_sets(recipe, epochs) + [f"train.seed={seed}"], [tokens_run, mae_run]
        )
        main_rows += rows
        steps += ran
        walls.append({"what": f"seed {seed}: {tokens_run} + {mae_run}", "wall_s": wall})
    sweep_seeds = [int(s) for s in args.sweep_seeds.split(",") if s.strip()]
    sweep = []
    for k in ks:
        for seed in sweep_seeds:
            rows, wall, ran = run(
                args.recipe,
                args.root,
                epoch_sets(recipe, sweep_epochs) + [f"cluster.k={k}", f"train.seed={seed}"],
                [tokens_run],
            )
            sweep += rows
            steps += ran
            walls.append({"what": f"K={k} ({tokens_run}, seed {seed})", "wall_s": wall})
    sweep_summary = summarize_sweep(sweep)
    corr = {}
    for p in ("linear", "knn"):
        corr[f"TCAS vs {p} (per-K means)"] = correlations(
            [r["tcas"] for r in sweep_summary], [r[f"{p}_mean"] for r in sweep_summary]
        )
        corr[f"TCAS vs {p} (every run)"] = correlations([r["tcas"] for r in sweep], [r[p] for r in sweep])
    paper_ks = [k for k in ks if k in PAPER_TABLE7_PIXEL]
    corr["paper Table 7 PIXEL, TCAS vs linear (same K)"] = correlations(
        [PAPER_TABLE7_PIXEL[k][0] for k in paper_ks], [PAPER_TABLE7_PIXEL[k][1] for k in paper_ks]
    )
    result = {
        "script": "bench.science.kmim_vs_mae",
        "recipe": args.recipe,
        "dataset": args.dataset,
        "root": args.root,
        "seeds": seeds,
        "ks": ks,
        "sweep_seeds": sweep_seeds,
        "epochs": epochs,
        "sweep_epochs": sweep_epochs,
        "recipe_epochs": default_epochs,
        "runs": main_rows,
        "summary": summarize(main_rows),
        "sweep": sweep,
        "sweep_summary": sweep_summary,
        "correlations": corr,
        "welch": welch(main_rows, tokens_run, mae_run),
        "walls": walls,
        "stage_walls": steps,
        "wall_s": round(time.perf_counter() - start, 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
    }
    table = markdown(result)
    print()
    print(table)
    print(
        f"\n{epochs} epochs ({main_rows[0]['steps']} steps) per seed run, {sweep_epochs} epochs ({sweep[0]['steps']} steps) "
        f"per K-sweep run; total wall {result['wall_s']}s on {result['machine']}"
    )
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "kmim_vs_mae.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(out, "kmim_vs_mae.md"), "w") as f:
        f.write(table + "\n")
    plot(result, os.path.join(out, "kmim_vs_mae.png"))
    print(f"wrote {out}/kmim_vs_mae.json, .md, .png")
    return result


if __name__ == "__main__":
    main()
