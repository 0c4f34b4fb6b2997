"""`kmim train` for real: single process, 2-process gloo DDP, uneven shards, kill + resume, export."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file

from kmim.data.tar import write_tar_shard
from kmim.errors import ConfigError
from kmim.trainer.config import load_config
from kmim.trainer.export import export_encoder
from kmim.trainer.train import train

RECIPE = str(Path(__file__).resolve().parents[2] / "manifests" / "recipes" / "digits-tiny.yaml")


def _losses(run_dir):
    last = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        last[r["step"]] = r["loss"]  # a resumed run rewrites the steps it redoes: keep the last
    return last


def _tree(pid: int) -> set[int]:
    """pid and every process below it (from /proc's parent links)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # not a process, or gone
            continue
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree, grown = {pid}, True
    while grown:
        below = {child for child, parent in parents.items() if parent in tree} - tree
        tree |= below
        grown = bool(below)
    return tree


def _listeners(pid: int) -> set[tuple[str, int]]:
    """(address as the kernel writes it, port) of every listening TCP socket of pid's process tree: only
    ours, so tests running beside this one (pytest -n) cannot add theirs."""
    inodes = set()
    for p in _tree(pid):
        try:
            for fd in Path(f"/proc/{p}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:  # the process ended meanwhile
            continue
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:
                address, port = fields[1].rsplit(":", 1)
                found.add((address, int(port, 16)))
    return found


def _cmd(*args):
    return [sys.executable, "-m", "kmim", "train", "--config", RECIPE, *args]


@pytest.mark.slow
def test_loss_falls_on_digits_and_the_encoder_exports_to_timm(digits_tokens, tmp_path):
    out = tmp_path / "run"
    cfg = load_config(
        RECIPE,
        [
            f"data.train={digits_tokens / 'tokens' / 'train.shards.json'}",
            f"output={out}",
            "optim.epochs=8",
            "log_every=5",
            "data.loader_workers=0",
        ],
    )
    summary = train(cfg)
    losses = list(_losses(out).values())
    assert summary["steps"] == 8 * (1438 // 64) and np.mean(losses[-3:]) < losses[0] - 0.3, losses
    assert (out / "tensorboard").is_dir() and json.loads((out / "config.json").read_text())["optim"][
        "epochs"
    ] == 8
    export_encoder(str(out), str(tmp_path / "enc.safetensors"))
    model = timm.create_model("vit_micro_patch4_32", num_classes=0)
    model.load_state_dict(load_file(str(tmp_path / "enc.safetensors")), strict=True)
    ckpt = torch.load(sorted(out.glob("checkpoint-*.pt"))[-1], weights_only=True)
    assert torch.equal(model.patch_embed.proj.weight, ckpt["model"]["encoder.patch_embed.proj.weight"])
    hub_style = timm.create_model(
        "vit_micro_patch4_32",
        pretrained=True,
        num_classes=0,
        pretrained_cfg_overlay=dict(file=str(tmp_path / "enc.safetensors")),
    )
    assert torch.equal(hub_style.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)


def test_shards_model_mismatch_is_refused_before_the_first_step(digits_tokens, digits_dir, tmp_path):
    data = f"data.train={digits_tokens / 'tokens'}"
    with pytest.raises(ConfigError, match="patch size 4 vs model.patch_size 8"):
        train(
            load_config(
                RECIPE, [data, f"output={tmp_path / 'a'}", "model.patch_size=8", "model.encoder=test_vit"]
            )
        )
    with pytest.raises(ConfigError, match="needs token shards"):
        train(load_config(RECIPE, [f"data.train={digits_dir}", f"output={tmp_path / 'b'}"]))
    assert not (tmp_path / "a" / "metrics.jsonl").exists()


def test_pixel_and_online_targets_run(digits_tokens, tmp_path):
    base = [
        f"data.train={digits_tokens / 'tokens' / 'train.shards.json'}",
        "optim.epochs=1",
        "data.samples_per_epoch=256",
        "data.loader_workers=0",
        "log_every=1",
    ]
    pixel = train(load_config(RECIPE, [*base, "model.target=pixel", f"output={tmp_path / 'p'}"]))
    online = train(
        load_config(
            RECIPE,
            [
                *base,
                "model.target=online",
                f"data.codebook={digits_tokens / 'codebook'}",
                f"output={tmp_path / 'o'}",
            ],
        )
    )
    assert (
        pixel["steps"] == online["steps"] == 4
        and np.isfinite(pixel["final_loss"])
        and online["final_loss"] > 0
    )


@pytest.mark.slow
def test_two_process_gloo_ddp_with_uneven_shards(digits_tokens, tmp_path):
    # Re-pack the token shards very unevenly: 1000, 400, 30 and 8 samples.
    import tarfile

    samples = []
    for tar in sorted((digits_tokens / "tokens").glob("train-*.tar")):
        with tarfile.open(tar) as t:
            current = {}
            for m in t.getmembers():
                key, ext = m.name.split(".", 1)
                if current and current["key"] != key:
                    samples.append(current)
                    current = {}
                current.setdefault("key", key)
                current[ext] = t.extractfile(m).read()
            samples.append(current)
    uneven = tmp_path / "uneven"
    entries, start = [], 0
    for i, size in enumerate([1000, 400, 30, 8]):
        with write_tar_shard(str(uneven / f"train-{i:06d}.tar")) as sink:
            for s in samples[start : start + size]:
                sink.write(s["key"], {k: v for k, v in s.items() if k != "key"})
        entries.append(sink.entry.__dict__)
        start += size
    (uneven / "shards.json").write_text(json.dumps({"shards": entries}))
    manifest = json.loads((digits_tokens / "tokens" / "manifest.json").read_text())
    (uneven / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "ddp"
    proc = subprocess.Popen(
        _cmd(
            "--data",
            str(uneven),
            "--output",
            str(out),
            "--nproc",
            "2",
            "optim.epochs=2",
            "data.loader_workers=1",
            "log_every=5",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    opened = set()
    while proc.poll() is None:  # every socket the launcher and its ranks listen on is on 127.0.0.1
        opened |= _listeners(proc.pid)
        time.sleep(0.1)
    stdout, stderr = proc.communicate()
    proc.stdout, proc.stderr = stdout, stderr
    assert proc.returncode == 0, proc.stderr[-3000:]
    loopback = {
        "0100007F",
        "0000000000000000FFFF00000100007F",
        "00000000000000000000000001000000",
    }  # 127.0.0.1, ::1
    assert opened and {address for address, _ in opened} <= loopback, opened
    summary = json.loads((out / "train_summary.json").read_text())
    plan = json.loads((out / "plan.json").read_text())
    assert summary["world_size"] == 2 and plan["steps_per_epoch"] == 1438 // (64 * 2)
    assert summary["steps"] == 2 * plan["steps_per_epoch"] and "train: " in proc.stdout


@pytest.mark.slow
def test_resume_after_a_kill_follows_the_same_loss_curve(digits_tokens, tmp_path):
    # 3 epochs of 10 steps; killed at step 15, in the middle of epoch 2, with 2 loader workers mid-shard
    args = [
        "--data",
        str(digits_tokens / "tokens" / "train.shards.json"),
        "optim.epochs=3",
        "log_every=1",
        "data.samples_per_epoch=640",
        "checkpoint.every_steps=5",
        "data.loader_workers=2",
        "data.shuffle_buffer=128",
    ]
    reference = tmp_path / "ref"
    subprocess.run(_cmd(*args, "--output", str(reference)), check=True, capture_output=True, timeout=300)
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        _cmd(*args, "--output", str(out)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 200
    while time.monotonic() < deadline and not list(out.glob("checkpoint-00000015.pt")):
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = sorted(out.glob("checkpoint-*.pt"))
    assert done and done[-1].name != "checkpoint-00000030.pt", [p.name for p in done]
    subprocess.run(
        _cmd(*args, "--output", str(out), "--resume"), check=True, capture_output=True, timeout=300
    )
    ref, got = _losses(reference), _losses(out)
    assert sorted(got) == sorted(ref) == list(range(1, 31))
    np.testing.assert_allclose([got[s] for s in range(1, 31)], [ref[s] for s in range(1, 31)], rtol=1e-5)


def test_an_unlabelled_folder_is_not_token_shards(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(Exception, match="no shards.json"):
        train(load_config(RECIPE, [f"data.train={tmp_path / 'x'}", f"output={tmp_path / 'o'}"]))


def _repack(digits_tokens, out, edit):
    """The first token shard re-packed into `out` (with its manifest), `edit(sample)` applied to each sample."""
    import tarfile

    samples, current = [], {}
    with tarfile.open(sorted((digits_tokens / "tokens").glob("train-*.tar"))[0]) as t:
        for m in t.getmembers():
            key, ext = m.name.split(".", 1)
            if current and current["key"] != key:
                samples.append(current)
                current = {}
            current["key"] = key
            current[ext] = t.extractfile(m).read()
    samples.append(current)
    out.mkdir()
    with write_tar_shard(str(out / "train-000000.tar")) as sink:
        for s in samples:
            edit(s)
            sink.write(s["key"], {k: v for k, v in s.items() if k != "key"})
    (out / "shards.json").write_text(json.dumps({"shards": [sink.entry.__dict__]}))
    (out / "manifest.json").write_text((digits_tokens / "tokens" / "manifest.json").read_text())
    return samples


def test_a_token_shard_breaking_the_format_fails_naming_shard_and_key(digits_tokens, tmp_path):
    import io

    from kmim.errors import InputError

    def out_of_range(s):
        if s["key"] == samples_key:
            buf = io.BytesIO()
            np.save(buf, np.full((2, 8, 8), 16, dtype=np.uint16))  # K = 16: ids 0..15
            s["tokens.npy"] = buf.getvalue()

    samples_key = None
    probe = _repack(digits_tokens, tmp_path / "probe", lambda s: None)
    samples_key = probe[3]["key"]
    _repack(digits_tokens, tmp_path / "bad", out_of_range)
    cfg = load_config(
        RECIPE,
        [
            f"data.train={tmp_path / 'bad'}",
            f"output={tmp_path / 'run'}",
            "optim.epochs=1",
            "data.loader_workers=0",
            "data.shuffle_buffer=1",
        ],
    )
    with pytest.raises(
        InputError, match=rf"train-000000\.tar:{samples_key}: token ids span \[16, 16\], outside"
    ):
        train(cfg)


def test_resume_of_a_finished_run_leaves_it_as_it_is(digits_tokens, tmp_path):
    out = tmp_path / "run"
    args = [
        f"data.train={digits_tokens / 'tokens' / 'train.shards.json'}",
        f"output={out}",
        "optim.epochs=1",
        "data.samples_per_epoch=128",
        "data.loader_workers=0",
        "log_every=1",
    ]
    first = train(load_config(RECIPE, args))
    files = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    again = train(
        load_config(RECIPE, [*args, "checkpoint.every_steps=7"]), resume=True
    )  # execution-only: allowed
    assert again == json.loads((out / "train_summary.json").read_text()) and again["steps"] == first["steps"]
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == files


def test_two_identical_runs_write_byte_identical_checkpoints(digits_dir, tmp_path):
    import shutil

    out = tmp_path / "run"
    args = [
        f"data.train={digits_dir / 'train.shards.json'}",
        f"output={out}",
        "model.target=pixel",
        "optim.epochs=1",
        "data.samples_per_epoch=128",
        "data.loader_workers=0",
        "log_every=1",
    ]
    made = []
    for _ in range(2):
        shutil.rmtree(out, ignore_errors=True)
        train(load_config(RECIPE, args))
        made.append({p.name: p.read_bytes() for p in out.glob("checkpoint-*.pt")})
    assert made[0] and made[0] == made[1]


def test_resume_accepts_the_same_shards_by_another_path_and_refuses_other_data(
    digits_tokens, digits_dir, tmp_path
):

    out = tmp_path / "run"
    index = digits_tokens / "tokens" / "train.shards.json"
    args = [f"output={out}", "optim.epochs=1", "data.samples_per_epoch=128", "data.loader_workers=0"]
    first = train(load_config(RECIPE, [f"data.train={index}", *args]))
    relative = os.path.relpath(index)  # the same index, spelled relative to the working directory
    assert train(load_config(RECIPE, [f"data.train={relative}", *args]), resume=True) == first
    other = tmp_path / "other"  # the same layout, one shard's bytes different: other data
    shutil.copytree(index.parent, other)
    first_sha = json.loads(index.read_text())["shards"][0]["sha256"]
    (other / "train.shards.json").write_text(index.read_text().replace(first_sha, "0" * 64))
    with pytest.raises(ConfigError, match="was made with another config"):
        train(load_config(RECIPE, [f"data.train={other / 'train.shards.json'}", *args]), resume=True)
