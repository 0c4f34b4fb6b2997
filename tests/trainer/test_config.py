from pathlib import Path

import pytest

from kmim.errors import ConfigError
from kmim.trainer.config import load_config

RECIPES = sorted((Path(__file__).resolve().parents[2] / "manifests" / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_loads_and_validates(recipe):
    cfg = load_config(str(recipe))
    assert (
        cfg.model.mask_ratio == 0.75
        and cfg.optim.weight_decay == 0.05
        and cfg.name == recipe.name.split(".")[0]
    )


def test_paper_settings_in_the_recipes():
    cfg = load_config(str(RECIPES[0].parent / "imagenet100-vits-kmim-pixel-k50.yaml"))
    assert cfg.model.encoder == "vit_small_patch16_224" and cfg.optim.epochs == 200
    assert (
        cfg.model.decoder_embed_dim == 512 and cfg.model.decoder_depth == 8 and cfg.optim.betas == (0.9, 0.95)
    )
    assert load_config(str(RECIPES[0].parent / "imagenet100-vits-mae.yaml")).model.target == "pixel"


def test_overrides_and_validation(tmp_path):
    recipe = str(RECIPES[0].parent / "digits-tiny.yaml")
    cfg = load_config(
        recipe, ["optim.epochs=3", "model.target=pixel", "data.batch_size=8", "optim.clip_grad=1.0"]
    )
    assert (cfg.optim.epochs, cfg.model.target, cfg.data.batch_size, cfg.optim.clip_grad) == (
        3,
        "pixel",
        8,
        1.0,
    )
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(recipe, ["optim.epoch=3"])
    with pytest.raises(ConfigError, match="model.target"):
        load_config(recipe, ["model.target=dvae"])
    with pytest.raises(ConfigError, match="needs data.codebook"):
        load_config(recipe, ["model.target=online"])
    with pytest.raises(ConfigError, match="not key=value"):
        load_config(recipe, ["epochs"])
    with pytest.raises(ConfigError, match="no such recipe"):
        load_config(str(tmp_path / "missing.yaml"))


@pytest.mark.parametrize(
    "text, message",
    [
        ("train:\n  seed: 1\n  seed: 2\n", r"not valid YAML \(line 3, column 3\): key 'seed' is given twice"),
        ("train:\n  model: {target: pixel\n", r"not valid YAML \(line"),
        ("train: 5\n", r"`train` must be a mapping"),
    ],
)
def test_bad_recipe_files_are_one_line_naming_the_file(tmp_path, text, message):
    from kmim.lineage.recipe import load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    with pytest.raises(ConfigError, match=message) as e:
        load_config(str(recipe))
    assert str(e.value).startswith(str(recipe)) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=message.split(r"\(")[0]):
        load_recipe(str(recipe))
