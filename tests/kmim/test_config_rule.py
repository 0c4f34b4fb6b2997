"""One rule per notion: every config field is declared once as output-determining or execution-only, and that
declaration alone decides the fingerprint, the CLI options and legacy names."""

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from kmim.cli import app
from kmim.contract.config import DERIVED, FOLDED, ROLE, build_config, fingerprint_config, is_execution
from kmim.contract.manifest import digest, stage_fingerprint
from kmim.data.digits import DigitsConfig
from kmim.data.folder import FolderShardConfig
from kmim.data.synthetic import SyntheticConfig
from kmim.errors import ConfigError
from kmim.lineage.recipe import load_recipe
from kmim.lineage.runner import Artifact, Runner
from kmim.pipeline.configs import ClusterConfig, ExtractConfig, TokenizeConfig
from kmim.theory.toy import ToyConfig
from kmim.trainer.config import (
    CheckpointConfig,
    DataConfig,
    FinetuneConfig,
    KnnConfig,
    LinearConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
)

RECIPE = str(Path(__file__).resolve().parents[2] / "manifests" / "recipes" / "digits.yaml")
FLAT = {  # config -> the command whose options are its fields
    ExtractConfig: ("pipeline", "extract"),
    ClusterConfig: ("pipeline", "cluster"),
    TokenizeConfig: ("pipeline", "tokenize"),
    LinearConfig: ("eval", "linear"),
    KnnConfig: ("eval", "knn"),
    FinetuneConfig: ("eval", "finetune"),
    DigitsConfig: ("data", "digits"),
    SyntheticConfig: ("data", "synthetic"),
    FolderShardConfig: ("data", "shard"),
    ToyConfig: ("theory", "toy"),
}
ALL = [*FLAT, ModelConfig, DataConfig, OptimConfig, CheckpointConfig, TrainConfig]
REQUIRED = {ClusterConfig: {"k": 8}, SyntheticConfig: {"num_images": 4}}


def _changed(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1 if not isinstance(value, float) or value < 0.5 else value / 2
    if value is None:
        return 2
    return None  # strings, tuples, nested configs: checked elsewhere


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_every_field_is_declared_and_only_output_fields_change_the_fingerprint(cls):
    base = cls(**REQUIRED.get(cls, {}))
    fp = fingerprint_config(base)
    for f in dataclasses.fields(cls):
        assert f.metadata.get(ROLE) in ("output", "execution"), f"{cls.__name__}.{f.name} is not declared"
        new = _changed(getattr(base, f.name))
        if new is None or f.metadata.get(FOLDED):
            continue
        try:
            other = dataclasses.replace(base, **{f.name: new})
        except ConfigError:
            continue  # e.g. an odd batch size with mixup: the value is refused, nothing to compare
        assert (fingerprint_config(other) == fp) == is_execution(f), f"{cls.__name__}.{f.name}"


@pytest.mark.parametrize("cls", list(FLAT), ids=lambda c: c.__name__)
def test_every_field_is_an_option_of_its_command(cls):
    import typer

    group = typer.main.get_command(app)
    command = group.commands[FLAT[cls][0]].commands[FLAT[cls][1]]
    options = {name for p in command.params for name in p.opts}
    for f in dataclasses.fields(cls):
        if not f.metadata.get(DERIVED):
            assert f"--{f.name.replace('_', '-')}" in options, f"{cls.__name__}.{f.name} has no option"


def test_bounds_name_the_key_one_condition_per_message():
    for values, message in [
        ({"optim": {"clip_grad": -1}}, "optim.clip_grad must be > 0.0, got -1"),
        ({"optim": {"blr": -0.1}}, "optim.blr must be > 0.0, got -0.1"),
        ({"optim": {"lr": float("nan")}}, "optim.lr must be a finite number, got nan"),
        ({"seed": -1}, "seed must be >= 0, got -1"),
        ({"model": {"target": "jpeg"}}, "model.target must be one of tokens, pixel, online"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
            build_config(TrainConfig, values, "config")
    with pytest.raises(ConfigError, match="patch_size must be >= 1, got 0"):
        ExtractConfig(patch_size=0)
    with pytest.raises(
        ConfigError, match="init must be one of kmeans\\+\\+, kmeans-parallel, random, got 'x'"
    ):
        ClusterConfig(k=2, init="x")


def test_earlier_names_are_read_as_the_new_ones():
    assert build_config(DataConfig, {"num_workers": 3}, "data").loader_workers == 3
    assert build_config(ClusterConfig, {"k": 4, "num_workers": 2}, "cluster").ray_workers == 2
    assert build_config(FinetuneConfig, {"num_workers": 0}, "finetune").loader_workers == 0


def test_run_roots_of_kmim_0_1_keep_their_fingerprints():
    """The fingerprints kmim 0.1.0 (commit 05a97fe) gave the digits recipe's folders: `kmim run` still finds them."""
    r = load_recipe(RECIPE)
    runner = Runner(r, "/nonexistent", ["data"], None)
    data = Artifact(
        "data",
        stage_fingerprint("data", digest("digits"), {"builtin": "digits", **fingerprint_config(r.dataset)}),
        "",
    )
    extract = runner._artifact("extract", r.extract, [data], "manifest.json")
    cluster = runner._artifact("cluster", r.cluster, [extract], "manifest.json")
    tokenize = runner._artifact("tokenize", r.tokenize, [data, cluster], "manifest.json")
    assert data.fingerprint.startswith("43c1149fcd3e1172")
    assert extract.legacy.startswith("26243e49135f4b41") and cluster.legacy.startswith("2eb79e17db043970")
    assert tokenize.legacy.startswith("248626447f89ce93")
    assert extract.fingerprint != extract.legacy  # 0.1 also hashed execution-only fields


def _planned(recipe, root: str) -> dict[str, str]:
    runner = Runner(recipe, root, ["data"], None)
    data = Artifact("data", "d" * 64, "")
    extract = runner._artifact("extract", recipe.extract, [data], "manifest.json")
    cluster = runner._artifact("cluster", recipe.cluster, [extract], "manifest.json")
    tokenize = runner._artifact("tokenize", recipe.tokenize, [data, cluster], "manifest.json")
    return {a.stage: a.fingerprint for a in (extract, cluster, tokenize)}


def test_a_weights_file_counts_by_its_bytes_not_its_path(tmp_path):
    first = tmp_path / "a" / "w.safetensors"
    first.parent.mkdir()
    save_file({"x": torch.zeros(4)}, str(first))
    sets = ["extract.extractor=timm:test_vit", "extract.image_size=32", "extract.patch_size=16"]
    before = _planned(load_recipe(RECIPE, sets + [f"extract.weights={first}"]), str(tmp_path))
    moved = tmp_path / "b" / "renamed.safetensors"
    moved.parent.mkdir()
    shutil.move(first, moved)
    assert _planned(load_recipe(RECIPE, sets + [f"extract.weights={moved}"]), str(tmp_path)) == before
    save_file({"x": torch.ones(4)}, str(moved))  # other bytes at the same path
    after = _planned(load_recipe(RECIPE, sets + [f"extract.weights={moved}"]), str(tmp_path))
    assert all(after[stage] != before[stage] for stage in ("extract", "cluster", "tokenize"))


def test_execution_settings_leave_every_folder_where_it_was(tmp_path):
    base = _planned(load_recipe(RECIPE), str(tmp_path))
    sets = [
        "extract.batch_size=128",
        "extract.cpus_per_worker=2",
        "extract.max_retries=5",
        "cluster.ray_workers=1",
        "cluster.memory_per_worker_gb=0.5",
        "tokenize.batch_size=16",
        "tokenize.gpus_per_worker=0.5",
    ]
    assert _planned(load_recipe(RECIPE, sets), str(tmp_path)) == base


def test_a_field_added_later_keeps_old_fingerprints_until_it_is_set():
    """Tokenize outputs made before grid views existed keep their fingerprint (they are reused, not redone);
    setting the new fields changes it."""
    from kmim.pipeline.configs import TokenizeConfig

    plain = fingerprint_config(TokenizeConfig())
    assert not [k for k in plain if k.startswith("grid_")]
    assert plain == {"views": 2, "seed": 0, "tcas_form": "C"}
    grid = fingerprint_config(TokenizeConfig(views=1, grid_scales="1.0,1.5"))
    assert grid["grid_scales"] == "1.0,1.5" and "grid_flip" not in grid
    assert (
        fingerprint_config(TokenizeConfig(views=1, grid_scales="1.0,1.5", grid_flip=True))["grid_flip"]
        is True
    )
