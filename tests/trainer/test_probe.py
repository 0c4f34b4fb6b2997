"""`kmim eval linear|knn`: the protocols on planted features, and end to end on digits."""

import io
import json

import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from kmim.cli import app
from kmim.data.tar import write_tar_shard
from kmim.errors import InputError
from kmim.trainer.probe import KnnConfig, LinearConfig, evaluate, knn_classify, linear_probe


def _planted(n, generator):
    y = torch.randint(0, 10, (n,), generator=generator)
    x = torch.randn(n, 64, generator=generator)
    x[:, :10] += 5.0 * F.one_hot(y, 10)
    return x, y


def test_probes_on_features_that_carry_the_label_exceed_95_percent():
    g = torch.Generator().manual_seed(0)
    (tx, ty), (vx, vy) = _planted(1400, g), _planted(360, g)
    assert linear_probe(tx, ty, vx, vy, 10, LinearConfig())["top1"] > 0.95
    assert linear_probe(tx, ty, vx, vy, 10, LinearConfig(optimizer="lars", blr=10.0))["top1"] > 0.95
    assert knn_classify(tx, ty, vx, vy, 10, KnnConfig())["top1"] > 0.95
    shuffled = ty[torch.randperm(len(ty), generator=g)]
    assert (
        linear_probe(tx, shuffled, vx, vy, 10, LinearConfig(epochs=20))["top1"] < 0.3
    )  # no signal, no accuracy


@pytest.fixture(scope="module")
def random_encoder(tmp_path_factory):
    torch.manual_seed(0)
    model = timm.create_model("vit_micro_patch4_32", num_classes=0)
    path = tmp_path_factory.mktemp("enc") / "encoder.safetensors"
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(path),
        metadata={"encoder": "vit_micro_patch4_32", "image_size": "32", "patch_size": "4"},
    )
    return path


def test_linear_and_knn_of_a_random_tiny_encoder_on_digits(random_encoder, digits_dir):
    train, val = str(digits_dir / "train.shards.json"), str(digits_dir / "val.shards.json")
    for protocol in ("linear", "knn"):
        result = CliRunner().invoke(
            app, ["eval", protocol, str(random_encoder), "--train", train, "--val", val]
        )
        assert result.exit_code == 0, result.output
        report = json.loads((random_encoder.parent / f"eval-{protocol}.json").read_text())
        assert 0 <= report["top1"] <= report["top5"] <= 1 and report["val_samples"] == 359
        assert (
            report["train_samples"] == 1438
            and report["classes"] == 10
            and len(report["encoder_fingerprint"]) == 64
        )
    assert report["features_cached"]  # the second protocol reused the first one's features
    assert report["top1"] > 0.2  # even random ViT features of digits beat chance (10 %)


def test_unlabelled_data_is_a_clear_error(random_encoder, tmp_path):
    with write_tar_shard(str(tmp_path / "u" / "x-000000.tar")) as sink:
        buf = io.BytesIO()
        Image.new("RGB", (32, 32)).save(buf, format="PNG")
        sink.write("a", {"png": buf.getvalue()})
    with pytest.raises(InputError, match="has no labels"):
        evaluate("knn", str(random_encoder), str(tmp_path / "u"), str(tmp_path / "u"), KnnConfig())


def test_compare_renders_a_table_and_png_plots(digits_tokens, digits_dir, tmp_path):
    from pathlib import Path

    from kmim.trainer.config import load_config
    from kmim.trainer.train import train

    recipe = str(Path(__file__).resolve().parents[2] / "manifests" / "recipes" / "digits-tiny.yaml")
    runs = []
    for target in ("tokens", "pixel"):
        run = tmp_path / target
        train(
            load_config(
                recipe,
                [
                    f"data.train={digits_tokens / 'tokens' / 'train.shards.json'}",
                    f"output={run}",
                    f"model.target={target}",
                    "optim.epochs=1",
                    "data.samples_per_epoch=256",
                    "data.loader_workers=0",
                    "log_every=1",
                ],
            )
        )
        evaluate(
            "knn",
            str(run),
            str(digits_dir / "train.shards.json"),
            str(digits_dir / "val.shards.json"),
            KnnConfig(),
        )
        runs.append(str(run))
    result = CliRunner().invoke(app, ["eval", "compare", *runs, "--output", str(tmp_path / "cmp")])
    assert result.exit_code == 0, result.output
    lines = (tmp_path / "cmp" / "compare.md").read_text().splitlines()
    assert lines[0].startswith("| run | target | K | TCAS | k-NN top-1")
    tokens_row, pixel_row = lines[2].split("|"), lines[3].split("|")
    assert tokens_row[2].strip() == "tokens" and tokens_row[3].strip() == "16" and "%" in tokens_row[5]
    assert pixel_row[2].strip() == "pixel" and pixel_row[3].strip() == "–"
    # the token run links the atlas plots its tokenize stage drew; the pixel run has none
    assert (
        "[usage](" in tokens_row[9] and "atlas-usage.png)" in tokens_row[9] and "[classes](" in tokens_row[9]
    )
    assert pixel_row[9].strip() == "–"
    for png in ("loss_curves.png", "accuracy.png"):
        data = (tmp_path / "cmp" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
