"""`kmim eval compare`: runs side by side (target, K, TCAS of their tokens, k-NN, linear, fine-tune)
as a Markdown table, and their loss curves and accuracies as PNG plots."""

from __future__ import annotations

import json

from kmim import fs
from kmim.contract.manifest import StageManifest
from kmim.errors import InputError

PROTOCOLS = ("knn", "linear", "finetune")


def _tokens_manifest(train: str) -> StageManifest | None:
    root = fs.dirname(train) if train.endswith(".json") else train
    try:
        m = StageManifest.read_if_committed(root)
    except InputError:
        return None
    return m if m is not None and m.stage == "tokenize" else None


def _atlas_links(train: str) -> list[str]:
    """The token atlas plots the tokenize stage drew beside its report (kmim/atlas.py)."""
    root = fs.dirname(train) if train.endswith(".json") else train
    return [fs.join(root, n) for n in ("atlas-usage.png", "atlas-classes.png") if fs.exists(fs.join(root, n))]


def collect(run_dir: str) -> dict:
    config_url = fs.join(run_dir, "config.json")
    if not fs.exists(config_url):
        raise InputError(run_dir, "no config.json: not a `kmim train` run folder")
    cfg = fs.read_json(config_url)
    tokens = _tokens_manifest(cfg["data"]["train"])
    row = {
        "run": run_dir,
        "name": cfg.get("name") or fs.basename(run_dir),
        "recipe": cfg.get("name"),
        "target": cfg["model"]["target"],
        "encoder": cfg["model"]["encoder"],
        "seed": cfg["seed"],
        "k": tokens.config["k"] if tokens and cfg["model"]["target"] != "pixel" else None,
        "tcas": tokens.stats.get("tcas") if tokens and cfg["model"]["target"] != "pixel" else None,
        "atlas": _atlas_links(cfg["data"]["train"]) if tokens and cfg["model"]["target"] != "pixel" else [],
    }
    for protocol in PROTOCOLS:
        url = fs.join(run_dir, f"eval-{protocol}.json")
        row[protocol] = fs.read_json(url)["top1"] if fs.exists(url) else None
    losses: dict[int, float] = {}
    metrics = fs.join(run_dir, "metrics.jsonl")
    if fs.exists(metrics):
        filesystem, path = fs.get_fs(metrics)
        with filesystem.open(path, "r") as f:
            for line in f:
                record = json.loads(line)
                losses[record["step"]] = record["loss"]  # a resumed run's later record of a step wins
    row["loss_curve"] = sorted(losses.items())
    row["final_loss"] = row["loss_curve"][-1][1] if losses else None
    return row


def markdown_table(rows: list[dict]) -> str:
    def cell(value, fmt: str = "{}") -> str:
        return "–" if value is None else fmt.format(value)

    lines = [
        "| run | target | K | TCAS | k-NN top-1 | linear top-1 | fine-tune top-1 | final loss | token atlas |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['target']} | {cell(r['k'])} | {cell(r['tcas'], '{:.4f}')} | "
            f"{cell(r['knn'] and 100 * r['knn'], '{:.2f} %')} | {cell(r['linear'] and 100 * r['linear'], '{:.2f} %')} | "
            f"{cell(r['finetune'] and 100 * r['finetune'], '{:.2f} %')} | {cell(r['final_loss'], '{:.4f}')} | "
            f"{' · '.join(f'[{fs.basename(u)[6:-4]}]({u})' for u in r.get('atlas') or []) or '–'} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        if r["loss_curve"]:
            steps, losses = zip(*r["loss_curve"])
            ax.plot(steps, losses, label=f"{r['name']} ({r['target']})")
    ax.set(xlabel="step", ylabel="training loss", title="Training loss")
    ax.legend(fontsize=7)
    written.append(_save(fig, fs.join(out_dir, "loss_curves.png")))
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(PROTOCOLS)
    for i, protocol in enumerate(PROTOCOLS):
        ax.bar(
            [j + i * width for j in range(len(rows))],
            [100 * (r[protocol] or 0) for r in rows],
            width,
            label=protocol,
        )
    ax.set_xticks(
        [j + width for j in range(len(rows))], [r["name"] for r in rows], rotation=30, ha="right", fontsize=7
    )
    ax.set(ylabel="top-1 (%)", title="Accuracy")
    ax.legend()
    written.append(_save(fig, fs.join(out_dir, "accuracy.png")))
    return written


def _save(fig, url: str) -> str:
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    fs.write_bytes_atomic(url, buf.getvalue())
    return url


def compare(run_dirs: list[str], out_dir: str) -> tuple[str, list[str]]:
    rows = [collect(r) for r in run_dirs]
    table = markdown_table(rows)
    fs.write_bytes_atomic(fs.join(out_dir, "compare.md"), (table + "\n").encode())
    fs.write_json_atomic(
        fs.join(out_dir, "compare.json"), [{k: v for k, v in r.items() if k != "loss_curve"} for r in rows]
    )
    return table, plot(rows, out_dir)
