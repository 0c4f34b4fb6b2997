"""`kmim ls` and `kmim show`: what is under a root, what made each artifact and from what."""

from __future__ import annotations

import json

from kmim import fs
from kmim.lineage.recipe import STAGES
from kmim.lineage.runner import LINEAGE_NAME


def status_of(path: str, stage: str) -> str:
    done_marker = {"data": "shards.json", "train": "train_summary.json"}.get(stage, "manifest.json")
    return "finished" if fs.exists(fs.join(path, done_marker)) else "unfinished"


def _summary(entry: dict) -> str:
    c = entry["config"]
    stage = entry["stage"]
    if stage == "data":
        return f"builtin {c.get('builtin')}"
    if stage == "extract":
        return f"{c['extractor']} {c['image_size']}px/{c['patch_size']}"
    if stage == "cluster":
        return f"K={c['k']}, {c['epochs']} epochs, {c['init']}"
    if stage == "tokenize":
        return f"{c['views']} views"
    if stage == "train":
        return f"{c.get('name', '')} target={c['model']['target']} {c['model']['encoder']} {c['optim']['epochs']} epochs"
    return ""


def list_artifacts(root: str) -> list[dict]:
    """Every artifact under root with a lineage record, in pipeline order."""
    found = []
    for stage in STAGES:
        stage_dir = fs.join(root, stage)
        if not fs.exists(stage_dir):
            continue
        filesystem, stage_path = fs.get_fs(stage_dir)
        for child in sorted(filesystem.ls(stage_path, detail=False)):
            path = fs.join(stage_dir, child.rstrip("/").rsplit("/", 1)[-1])
            lineage_url = fs.join(path, LINEAGE_NAME)
            if fs.exists(lineage_url):
                entry = fs.read_json(lineage_url)
                entry["status"] = status_of(path, stage)
                entry["path"] = path
                found.append(entry)
    return found


def render_ls(entries: list[dict]) -> str:
    """One line per artifact: stage, fingerprint, status, summary, then its inputs and the recipes that use it."""
    used_by: dict[str, list[str]] = {}
    for e in entries:
        for i in e["inputs"]:
            if "fingerprint" in i:
                used_by.setdefault(i["fingerprint"], []).append(f"{e['stage']}/{e['fingerprint'][:12]}")
    lines = []
    for e in entries:
        inputs = (
            ", ".join(
                f"{i['stage']}/{i['fingerprint'][:12]}" if "fingerprint" in i else json.dumps(i)
                for i in e["inputs"]
            )
            or "-"
        )
        users = ", ".join(used_by.get(e["fingerprint"], [])) or "-"
        lines.append(
            f"{e['stage']:<9} {e['fingerprint'][:12]}  {e['status']:<10} {_summary(e):<45} "
            f"from: {inputs}  used by: {users}  ({e['recipe']}, {e['created_at']})"
        )
    return "\n".join(lines) if lines else "(no artifacts)"


def show(path: str) -> dict:
    """A stage folder's lineage, manifest (or training summary/plan) and stats, as one JSON-able dict."""
    path = path.rstrip("/")
    if not fs.exists(path):
        from kmim.errors import InputError

        raise InputError(path, "no such artifact folder")
    out: dict = {"path": path}
    for name in (
        LINEAGE_NAME,
        "manifest.json",
        "_stats.json",
        "train_summary.json",
        "plan.json",
        "report.json",
        "codebook.json",
        "_failures.json",
    ):
        url = fs.join(path, name)
        if fs.exists(url):
            data = fs.read_json(url)
            if name == "manifest.json":  # the per-shard list is long: keep the totals
                data = {
                    **data,
                    "outputs": f"{len(data.get('outputs', []))} shards",
                    "inputs": f"{len(data.get('inputs', []))} inputs",
                }
                data.get("stats", {}).pop("skipped", None)
            out[name] = data
    for protocol in ("knn", "linear", "finetune"):
        url = fs.join(path, f"eval-{protocol}.json")
        if fs.exists(url):
            r = fs.read_json(url)
            out[f"eval-{protocol}"] = {k: r[k] for k in ("top1", "top5", "val_samples") if k in r}
    if len(out) == 1:
        from kmim.errors import InputError

        raise InputError(path, "holds no kmim lineage, manifest or summary")
    return out
