"""`kmim train` and `kmim export`."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Optional

import typer


def train(
    overrides: Optional[list[str]] = typer.Argument(None, help="key=value overrides, dotted (optim.epochs=5)."),
    config: Optional[str] = typer.Option(None, "--config", help="Recipe YAML (see manifests/recipes/)."),
    data: Optional[str] = typer.Option(None, help="Training shards (overrides data.train)."),
    output: Optional[str] = typer.Option(None, help="Run folder (overrides output)."),
    nproc: int = typer.Option(1, help="Local DDP processes, launched with torchrun (gloo on CPU, NCCL on GPU)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in the output folder from its latest checkpoint."),
) -> None:
    """Masked image modeling pretraining (K-MIM tokens, MAE pixels, or online tokens), DDP."""
    overrides = list(overrides or [])
    if data:
        overrides.append(f"data.train={data}")
    if output:
        overrides.append(f"output={output}")
    if wants_torchrun(nproc):
        sys.exit(relaunch_with_torchrun(nproc))
    from kmim.trainer.config import load_config
    from kmim.trainer.train import train as run

    summary = run(load_config(config, overrides), resume=resume)
    if int(os.environ.get("RANK", 0)) == 0:
        typer.echo(f"train: {summary['steps']} steps, final loss {summary['final_loss']:.4f}, "
                   f"{summary['images_per_s']:.1f} images/s on {summary['world_size']} process(es)")


def relaunch_with_torchrun(nproc: int) -> int:
    """Run this very command line again as `nproc` local DDP processes under torchrun (which sets RANK,
    so the children do the work instead of relaunching)."""
    args, rest = [], iter(sys.argv[1:])
    for arg in rest:  # the children must not relaunch, and torchrun would take `--nproc` for its own option
        if arg == "--nproc":
            next(rest, None)
        elif not arg.startswith("--nproc="):
            args.append(arg)
    # `--` ends torchrun's options: its parser would take e.g. `--run` for an abbreviation of `--run-path`.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "--", "kmim", *args]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))}
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # local processes talk over loopback only
    return subprocess.call(cmd, env=env)


def wants_torchrun(nproc: int) -> bool:
    return nproc > 1 and "RANK" not in os.environ


def export(
    run_dir: str = typer.Argument(..., help="A `kmim train` run folder."),
    out: str = typer.Argument(..., help="Output .safetensors file (local path or fsspec URL)."),
) -> None:
    """Write the pretrained encoder so that timm.create_model(..., pretrained_cfg_overlay=dict(file=OUT)) loads it."""
    from kmim.trainer.export import export_encoder

    r = export_encoder(run_dir, out)
    typer.echo(f"export: {r['tensors']} tensors of {r['encoder']} (step {r['step']}) -> {r['out']}; load with "
               f"timm.create_model('{r['encoder']}', pretrained=True, pretrained_cfg_overlay=dict(file='{r['out']}'), "
               f"num_classes=0, img_size={r['image_size']})")
