"""`kmim run`: content-derived stage folders, reuse across runs, re-running only what a change touches,
`kmim ls` / `kmim show`."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kmim.cli import app
from kmim.errors import ConfigError
from kmim.lineage.recipe import load_recipe
from kmim.lineage.runner import run_recipe

RECIPE = str(Path(__file__).resolve().parents[2] / "manifests" / "recipes" / "digits.yaml")
SMALL = [
    "data.shard_size=256",
    "cluster.epochs=2",
    "train.optim.epochs=1",
    "train.data.samples_per_epoch=256",
    "train.data.loader_workers=0",
    "train.checkpoint.every_steps=2",
    "eval.linear.epochs=2",
]


def _status(report):
    return {s.name: s.status for s in report.steps}


@pytest.mark.slow
def test_reuse_and_partial_reruns(ray_local, tmp_path):
    root = str(tmp_path / "root")
    mae_only = run_recipe(load_recipe(RECIPE, SMALL), root, runs=["mae"])  # pixel targets need no tokens
    assert list(_status(mae_only)) == ["data", "train/mae", "eval/mae/knn", "eval/mae/linear"]
    assert sorted(p.name for p in Path(root).iterdir()) == ["compare", "data", "runs", "train"]

    first = run_recipe(load_recipe(RECIPE, SMALL), root)
    names = [
        "data",
        "extract",
        "cluster",
        "tokenize",
        "train/kmim-pixel-k50",
        "train/mae",
        "eval/kmim-pixel-k50/knn",
        "eval/kmim-pixel-k50/linear",
        "eval/mae/knn",
        "eval/mae/linear",
    ]
    mae_steps = {"data", "train/mae", "eval/mae/knn", "eval/mae/linear"}
    assert list(_status(first)) == names
    assert {n for n, s in _status(first).items() if s == "reused"} == mae_steps
    assert {n for n, s in _status(first).items() if s == "ran"} == set(names) - mae_steps
    assert "| digits/kmim-pixel-k50 | tokens | 50 |" in first.compare_table
    for step in first.steps[:6]:  # ROOT/<stage>/<fingerprint[:16]>
        assert Path(step.path).relative_to(root).parts == (step.stage, step.fingerprint[:16])

    second = run_recipe(load_recipe(RECIPE, SMALL), root)
    assert set(_status(second).values()) == {"reused"}
    assert [s.path for s in second.steps] == [s.path for s in first.steps]

    # execution-only settings (batch sizes, Ray workers, checkpoint cadence) are not in any fingerprint
    execution = [
        "extract.batch_size=128",
        "cluster.ray_workers=1",
        "tokenize.batch_size=16",
        "train.checkpoint.every_steps=7",
        "train.log_every=3",
    ]
    moved = run_recipe(load_recipe(RECIPE, SMALL + execution), root)
    assert set(_status(moved).values()) == {"reused"}
    assert [s.path for s in moved.steps] == [s.path for s in first.steps]

    # a checkpoint replaced in a run folder makes the evaluations made from the old weights stale
    from kmim.trainer.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint

    mae_dir = first.step("train/mae").path
    last, url = list_checkpoints(mae_dir)[-1]
    state = load_checkpoint(url)
    state["model"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in state["model"].items()}
    save_checkpoint(mae_dir, last, state, keep=5)
    stale = _status(run_recipe(load_recipe(RECIPE, SMALL), root))
    assert {n for n, s in stale.items() if s == "ran"} == {"eval/mae/knn", "eval/mae/linear"}

    only_mae = _status(run_recipe(load_recipe(RECIPE, SMALL + ["runs.mae.seed=1"]), root))
    assert {n for n, s in only_mae.items() if s == "ran"} == {"train/mae", "eval/mae/knn", "eval/mae/linear"}

    new_k = run_recipe(load_recipe(RECIPE, SMALL + ["cluster.k=20"]), root)
    ran = {n for n, s in _status(new_k).items() if s == "ran"}
    assert ran == {
        "cluster",
        "tokenize",
        "train/kmim-pixel-k50",
        "eval/kmim-pixel-k50/knn",
        "eval/kmim-pixel-k50/linear",
    }
    assert "| digits/kmim-pixel-k50 | tokens | 20 |" in new_k.compare_table

    listing = CliRunner().invoke(app, ["ls", "--root", root])
    assert listing.exit_code == 0, listing.output
    lines = listing.output.strip().splitlines()
    assert (
        sum(line.startswith("cluster") for line in lines) == 2
        and sum(line.startswith("train") for line in lines) == 4
    )
    assert any("K=20" in line for line in lines) and any("K=50" in line for line in lines)
    extract_line = next(line for line in lines if line.startswith("extract"))
    assert (
        extract_line.count("cluster/") == 2 and "finished" in extract_line
    )  # one extract feeds both codebooks
    cluster_dir = new_k.step("cluster").path
    shown = CliRunner().invoke(app, ["show", cluster_dir])
    assert shown.exit_code == 0, shown.output
    info = json.loads(shown.output)
    assert (
        info["lineage.json"]["inputs"][0]["stage"] == "extract" and info["manifest.json"]["config"]["k"] == 20
    )
    reports = list((Path(root) / "runs").glob("digits-*.json"))
    assert len(reports) == 7 and all(json.loads(r.read_text())["steps"] for r in reports)

    # a root laid out by kmim 0.1 (folders named by its fingerprints of the whole config) is still reused
    made = second.steps[1:6]  # extract, cluster, tokenize, train/kmim-pixel-k50, train/mae
    assert all(s.legacy != s.fingerprint for s in made)
    for s in made:
        Path(s.path).rename(Path(root) / s.stage / s.legacy[:16])
    old_root = run_recipe(load_recipe(RECIPE, SMALL), root)
    assert set(_status(old_root).values()) == {"reused"}
    assert [Path(s.path) for s in old_root.steps[1:6]] == [Path(root) / s.stage / s.legacy[:16] for s in made]


def test_a_bad_recipe_is_refused_before_any_stage(tmp_path):
    with pytest.raises(ConfigError, match="cluster.*k"):
        load_recipe(RECIPE, ["cluster.k=zero"])
    with pytest.raises(ConfigError, match="runs.mae"):
        load_recipe(RECIPE, ["runs.mae.model.target=jpeg"])
    with pytest.raises(ConfigError, match="unknown section"):
        load_recipe(RECIPE, ["trian.seed=1"])
    with pytest.raises(ConfigError, match="unknown stage"):
        run_recipe(load_recipe(RECIPE), str(tmp_path), stages=["extract", "cluser"])


@pytest.mark.slow
def test_a_stage_left_out_must_already_be_finished(ray_local, tmp_path):
    from kmim.errors import InputError

    with pytest.raises(InputError, match="--stages does not include extract"):
        run_recipe(load_recipe(RECIPE, SMALL), str(tmp_path), stages=["data", "cluster"])
    assert (tmp_path / "data").exists()  # the stages asked for did run
