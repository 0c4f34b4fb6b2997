"""`--layer L` for timm extractors: features of block L (with or without the final norm) equal what a forward
hook on that block of the same model sees; the spec records it, the codebook carries it to tokenize; specs
without it keep the fingerprints they had before it existed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kmim.contract.codebook import Codebook
from kmim.contract.manifest import digest
from kmim.errors import ConfigError
from kmim.extractors import ExtractorSpec, build_extractor
from kmim.pipeline.cluster import ClusterConfig, cluster
from kmim.pipeline.extract import ExtractConfig, extract
from kmim.tokenizer import Tokenizer

VIEWS = np.random.default_rng(0).integers(0, 256, size=(3, 48, 48, 3), dtype=np.uint8)


def _hooked(extractor, block: int, norm: bool) -> torch.Tensor:
    """What blocks[block] outputs in a full forward pass of the extractor's own model (prefix tokens removed)."""
    from kmim.contract.views import normalize

    model, seen = extractor.model, {}
    handle = model.blocks[block].register_forward_hook(lambda m, i, o: seen.setdefault("out", o))
    try:
        with torch.inference_mode():
            model.forward_features(normalize(torch.from_numpy(VIEWS)))
            out = model.norm(seen["out"]) if norm else seen["out"]
    finally:
        handle.remove()
    return out[:, model.num_prefix_tokens :]


@pytest.mark.parametrize("layer,norm", [(0, True), (2, False), (-1, False), (-3, True)])
def test_layer_features_equal_the_blocks_own_output(layer, norm):
    extractor = build_extractor(ExtractorSpec("timm:test_vit", 48, 16, layer=layer, final_norm=norm))
    got = extractor(VIEWS)
    assert got.shape == (3, 9, 64)
    torch.testing.assert_close(got, _hooked(extractor, layer % 6, norm).float())


def test_the_default_is_the_last_block_after_the_norm_and_keeps_its_old_fingerprint():
    spec = ExtractorSpec("timm:test_vit", 48, 16)
    last = build_extractor(spec)(VIEWS)
    torch.testing.assert_close(last, build_extractor(ExtractorSpec("timm:test_vit", 48, 16, layer=-1))(VIEWS))
    # the fingerprint of a spec made before `layer` existed: name, sizes and weights hash only
    old = {"name": "timm:test_vit", "image_size": 48, "patch_size": 16, "weights_sha256": None}
    assert spec.fingerprint == digest(old) and "layer" not in spec.to_json()
    with_layer = ExtractorSpec("timm:test_vit", 48, 16, layer=2)
    assert with_layer.fingerprint != spec.fingerprint and with_layer.to_json()["layer"] == 2
    assert ExtractorSpec.from_json(with_layer.to_json()) == with_layer


def test_bad_layers_are_clear_errors():
    with pytest.raises(ConfigError, match=r"has 6 blocks: layer must be in \[-6, 6\)"):
        build_extractor(ExtractorSpec("timm:test_vit", 48, 16, layer=6))
    with pytest.raises(ConfigError, match="pixel extractor has no layers"):
        ExtractorSpec("pixel", 32, 4, layer=1)


@pytest.mark.slow
def test_the_codebook_carries_the_layer_to_tokenize(digits_dir, ray_local, tmp_path):
    config = ExtractConfig(
        extractor="timm:test_vit",
        image_size=48,
        patch_size=16,
        layer=1,
        final_norm=False,
        patches_per_image=4,
    )
    extract(str(digits_dir / "val.shards.json"), str(tmp_path / "features"), config)
    cluster(str(tmp_path / "features"), str(tmp_path / "codebook"), ClusterConfig(k=8, epochs=2))
    book = Codebook.load(str(tmp_path / "codebook"))
    assert book.meta["extractor"]["layer"] == 1 and book.meta["extractor"]["final_norm"] is False
    tokenizer = Tokenizer.from_codebook(str(tmp_path / "codebook"))
    assert tokenizer.spec.layer == 1 and not tokenizer.spec.final_norm
    features = build_extractor(ExtractorSpec("timm:test_vit", 48, 16, layer=1, final_norm=False))(VIEWS)
    want = book.assign(features.reshape(-1, 64).numpy()).reshape(3, 9)
    np.testing.assert_array_equal(tokenizer(VIEWS), want)
    last = Tokenizer(book, ExtractorSpec("timm:test_vit", 48, 16))  # the last block's features, same centers
    assert not np.array_equal(last(VIEWS), want)
    # the atlas of a ViT codebook cuts each typical patch from view 0 of its source image
    from kmim.atlas import atlas

    doc = atlas(str(tmp_path / "codebook"), str(tmp_path / "atlas"), codes_shown=4, per_code=2)
    assert doc["codes_shown"] and (tmp_path / "atlas" / "atlas-patches.png").stat().st_size > 1000


@pytest.mark.slow
def test_a_finished_kmim_run_is_an_extractor_fingerprinted_by_its_weights(digits_tokens, tmp_path):
    import hashlib
    import shutil
    from pathlib import Path

    import timm

    from kmim.trainer.config import load_config
    from kmim.trainer.train import train

    recipe = str(Path(__file__).resolve().parents[2] / "manifests" / "recipes" / "digits-tiny.yaml")
    run = tmp_path / "mae"
    with pytest.raises(Exception, match="not a finished `kmim train` run"):
        ExtractConfig(extractor=f"run:{run}", image_size=32, patch_size=4)
    overrides = [f"data.train={digits_tokens / 'tokens' / 'train.shards.json'}", f"output={run}"]
    overrides += [
        "model.target=pixel",
        "optim.epochs=1",
        "data.samples_per_epoch=128",
        "data.loader_workers=0",
    ]
    train(load_config(recipe, overrides))
    spec = ExtractConfig(extractor=f"run:{run}", image_size=32, patch_size=4, layer=-2).extractor_spec()
    spec = spec.with_weights_hash()
    weights = run / "encoder.safetensors"
    assert spec.name == "timm:vit_micro_patch4_32" and spec.weights == str(weights) and spec.layer == -2
    assert spec.weights_sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()
    moved = tmp_path / "elsewhere" / "mae"
    shutil.copytree(run, moved)
    (moved / "encoder.safetensors").unlink()  # exported again from the moved run: the same bytes
    again = ExtractConfig(extractor=f"run:{moved}", image_size=32, patch_size=4, layer=-2).extractor_spec()
    assert again.with_weights_hash().fingerprint == spec.fingerprint
    # the features are the trained encoder's, not a random init's
    views = np.random.default_rng(1).integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    got = build_extractor(spec)(views)
    model = timm.create_model(
        "vit_micro_patch4_32", pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=str(weights))
    ).eval()
    from kmim.contract.views import normalize

    with torch.inference_mode():
        (want,) = model.forward_intermediates(
            normalize(torch.from_numpy(views)),
            indices=[len(model.blocks) - 2],
            norm=True,
            output_fmt="NLC",
            intermediates_only=True,
        )
    torch.testing.assert_close(got, want)
    random_init = build_extractor(ExtractorSpec("timm:vit_micro_patch4_32", 32, 4, layer=-2))(views)
    assert not torch.allclose(got, random_init)
    with pytest.raises(ConfigError, match="--weights does not go with"):
        ExtractConfig(extractor=f"run:{run}", weights=str(weights), image_size=32, patch_size=4)
