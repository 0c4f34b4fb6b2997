"""`kmim eval finetune`: layer-wise lr decay, the classifier built from an encoder, runs on digits
(1 process with mixup/cutmix, 2-process gloo DDP), and kill + resume."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.optim._param_groups import param_groups_layer_decay

from kmim.errors import ConfigError
from kmim.trainer.finetune import FinetuneConfig, build_classifier, finetune


@pytest.fixture()
def encoder_file(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("vit_micro_patch4_32", num_classes=0)
    path = tmp_path / "enc" / "encoder.safetensors"
    path.parent.mkdir()
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(path),
        metadata={"encoder": "vit_micro_patch4_32", "image_size": "32", "patch_size": "4"},
    )
    return path, model.state_dict()


def test_classifier_keeps_the_encoder_and_decays_lr_by_layer(encoder_file):
    path, weights = encoder_file
    model, meta = build_classifier(str(path), 10, FinetuneConfig(pool="mean", drop_path=0.2))
    state = model.state_dict()
    for key, value in weights.items():  # every pretrained tensor is loaded, except the norm fc_norm replaces
        if not key.startswith("norm."):
            torch.testing.assert_close(state[key], value)
    assert model.head.out_features == 10 and model.global_pool == "avg" and meta["image_size"] == 32
    assert model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)
    depth = len(model.blocks)
    groups = param_groups_layer_decay(
        model, 0.05, layer_decay=0.75, no_weight_decay_list=model.no_weight_decay()
    )
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    assert scale_of[id(model.patch_embed.proj.weight)] == pytest.approx(0.75 ** (depth + 1))
    assert scale_of[id(model.blocks[0].attn.qkv.weight)] == pytest.approx(0.75**depth)
    assert scale_of[id(model.blocks[-1].mlp.fc2.weight)] == pytest.approx(0.75)
    assert scale_of[id(model.head.weight)] == 1.0
    cls_model, _ = build_classifier(str(path), 10, FinetuneConfig(pool="cls"))
    torch.testing.assert_close(cls_model.state_dict()["norm.weight"], weights["norm.weight"])


@pytest.mark.parametrize(
    "bad",
    [
        dict(layer_decay=0),
        dict(pool="max"),
        dict(mixup=0.8, batch_size=63),
        dict(label_smoothing=1.0),
        dict(num_classes=1),
        dict(amp="fp8"),
    ],
)
def test_bad_config_is_refused(bad):
    with pytest.raises(ConfigError):
        FinetuneConfig(**bad)


@pytest.mark.slow
def test_finetune_with_mixup_cutmix_writes_its_report(encoder_file, digits_dir):
    path, _ = encoder_file
    cfg = FinetuneConfig(
        epochs=2, warmup_epochs=1, mixup=0.8, cutmix=1.0, loader_workers=0, samples_per_epoch=512
    )
    report = finetune(
        str(path), str(digits_dir / "train.shards.json"), str(digits_dir / "val.shards.json"), cfg
    )
    on_disk = json.loads((path.parent / "eval-finetune.json").read_text())
    assert on_disk["top1"] == report["top1"] and 0 <= report["top1"] <= report["top5"] <= 1
    assert report["val_samples"] == 359 and report["classes"] == 10 and report["steps"] == 2 * (512 // 64)
    assert report["config"]["mixup"] == 0.8 and len(report["encoder_fingerprint"]) == 64
    rows = [
        json.loads(line) for line in (path.parent / "finetune" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["epoch"] for r in rows] == [1, 2]


def _cmd(encoder, digits_dir, *extra):
    return [
        sys.executable,
        "-m",
        "kmim",
        "eval",
        "finetune",
        str(encoder),
        "--train",
        str(digits_dir / "train.shards.json"),
        "--val",
        str(digits_dir / "val.shards.json"),
        *extra,
    ]


@pytest.mark.slow
def test_two_process_ddp_finetune_learns_digits(encoder_file, digits_dir):
    path, _ = encoder_file
    proc = subprocess.run(
        _cmd(
            path,
            digits_dir,
            "--nproc",
            "2",
            "--epochs",
            "6",
            "--warmup-epochs",
            "1",
            "--batch-size",
            "32",
            "--blr",
            "2e-3",
            "--drop-path",
            "0",
        ),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((path.parent / "eval-finetune.json").read_text())
    assert report["world_size"] == 2 and report["steps"] == 6 * (1438 // 64) and report["val_samples"] == 359
    assert report["top1"] > 0.2, report["top1"]  # 10 classes: fine-tuning even a random encoder beats chance
    assert "finetune: top-1" in proc.stdout


@pytest.mark.slow
def test_resume_after_a_kill_ends_like_an_uninterrupted_run(encoder_file, digits_dir, tmp_path):
    path, _ = encoder_file
    args = [
        "--epochs",
        "2",
        "--warmup-epochs",
        "1",
        "--loader-workers",
        "1",
        "--mixup",
        "0.5",
        "--samples-per-epoch",
        "384",
    ]
    subprocess.run(_cmd(path, digits_dir, *args), check=True, capture_output=True, timeout=300)
    reference = json.loads((path.parent / "eval-finetune.json").read_text())
    (path.parent / "eval-finetune.json").unlink()
    subprocess.run(["rm", "-rf", str(path.parent / "finetune")], check=True)
    proc = subprocess.Popen(
        _cmd(path, digits_dir, *args),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 200
    while time.monotonic() < deadline and not list((path.parent / "finetune").glob("checkpoint-*.pt")):
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (path.parent / "eval-finetune.json").exists()
    again = subprocess.run(_cmd(path, digits_dir, *args), capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "--resume" in again.stderr  # never silently restarts over a checkpoint
    subprocess.run(_cmd(path, digits_dir, *args, "--resume"), check=True, capture_output=True, timeout=300)
    resumed = json.loads((path.parent / "eval-finetune.json").read_text())
    assert resumed["steps"] == reference["steps"]
    assert resumed["final_train_loss"] == pytest.approx(reference["final_train_loss"], rel=1e-5)
    assert resumed["top1"] == pytest.approx(reference["top1"], abs=1e-9)
