"""`kmim pipeline tokenize`: every image into training-ready token targets, once.

One output tar per input shard, same keys in the same order. Per sample: the source image bytes
unchanged, the label, `tokens.npy` [V, H/p, W/p] and `views.json` (the V recorded views: view 0 the
center view, views 1..V-1 RandomResizedCrop + flip seeded by (seed, key, view)); or, with `grid_scales`
(token format 2, kmim/contract/grid.py), `grid.npy` + `grid.json`: every render's whole patch grid. While tokenizing, the
token x class co-occurrence of view 0 is counted per shard and reduced on the driver into the TCAS
report. `tcas_report` runs the same workers without writing shards (`kmim eval tcas`).
"""

from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import asdict

import numpy as np
import torch

from kmim import fs
from kmim.atlas import classes_png, usage_png
from kmim.contract.codebook import Codebook
from kmim.contract.grid import GRID_FORMAT_VERSION, make_renders, render_image
from kmim.contract.manifest import digest
from kmim.contract.patches import grid_size
from kmim.contract.schemas import (
    FORMAT_VERSION,
    GRID_MEMBER,
    GRID_META_MEMBER,
    LABEL_MEMBER,
    TOKENS_MEMBER,
    VIEWS_MEMBER,
    ShardEntry,
    token_dtype,
)
from kmim.contract.views import apply_view, center_view, make_views, to_uint8_array
from kmim.data.reader import Dataset, ReadStats, ShardRef, iter_images, open_dataset
from kmim.data.tar import write_tar_shard
from kmim.data.writer import write_indexes
from kmim.errors import InputError
from kmim.extractors import ExtractorSpec
from kmim.pipeline.configs import TokenizeConfig
from kmim.pipeline.executor import ShardStats, ShardWorker, StageRun, run_shards
from kmim.pipeline.ray_runtime import ray_session, worker_count
from kmim.pipeline.stage import ShardStage, StageOutput, StageResult, check_unique_keys, run_shard_stage
from kmim.tcas import tcas, usage
from kmim.tokenizer import Tokenizer, codebook_extractor

log = logging.getLogger(__name__)

REPORT = "report.json"


def encode_npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def decode_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


class TokenizeWorker(ShardWorker):
    """A Ray actor holding the codebook and its extractor; tokenizes whole shards."""

    def setup(self, codebook: str, spec: dict, config: dict, out_url: str | None, fingerprint: str) -> None:
        self.config = TokenizeConfig(**config)
        torch.set_num_threads(max(1, int(self.config.cpus_per_worker)))
        import faiss

        faiss.omp_set_num_threads(max(1, int(self.config.cpus_per_worker)))
        device = "cuda" if self.config.gpus_per_worker > 0 and torch.cuda.is_available() else "cpu"
        grid_spec = self.config.grid_spec()
        self.tokenizer = Tokenizer(
            Codebook.load(codebook), ExtractorSpec.from_json(spec), device, any_size=grid_spec is not None
        )
        self.grid = grid_size(self.tokenizer.view_spec.image_size, self.tokenizer.patch_size)
        self.renders = make_renders(grid_spec, self.grid) if grid_spec is not None else None
        self.dtype = token_dtype(self.tokenizer.k)
        self.out_url, self.fingerprint = out_url, fingerprint

    def process_shard(self, shard: ShardRef) -> ShardStats:
        c, tok = self.config, self.tokenizer
        seconds = dict.fromkeys(("read", "decode", "compute", "write"), 0.0)
        stats = ReadStats()
        cooc: dict[int, np.ndarray] = {}  # label -> token counts of view 0
        codes = np.zeros(tok.k, dtype=np.int64)
        pending: list[tuple] = []
        start = time.perf_counter()

        def count(sample, view0_ids: np.ndarray) -> None:  # noqa: ANN001 - TCAS counts view 0 only
            view0 = np.bincount(view0_ids.ravel().astype(np.int64), minlength=tok.k)
            codes[:] += view0
            if sample.label is not None:
                cooc[sample.label] = cooc.get(sample.label, 0) + view0

        def write(sink, sample, token_members: dict) -> None:  # noqa: ANN001
            members = {sample.ext: sample.image}
            if sample.label is not None:
                members[LABEL_MEMBER] = str(sample.label).encode()
            sink.write(sample.key, {**members, **token_members})

        def flush_views(sink) -> None:  # noqa: ANN001 - format 1: V stored views per sample
            t0 = time.perf_counter()
            ids = tok(np.concatenate([views for *_, views in pending]))  # [B*V, L]
            t1 = time.perf_counter()
            seconds["compute"] += t1 - t0
            for i, (sample, params, size, _) in enumerate(pending):
                grid = (
                    ids[i * c.views : (i + 1) * c.views]
                    .reshape(c.views, self.grid, self.grid)
                    .astype(self.dtype)
                )
                count(sample, grid[0])
                if sink is not None:
                    views_json = {"width": size[0], "height": size[1], "seed": c.seed}
                    views_json["views"] = [p.to_json() for p in params]
                    write(
                        sink,
                        sample,
                        {TOKENS_MEMBER: encode_npy(grid), VIEWS_MEMBER: json.dumps(views_json).encode()},
                    )
            seconds["write"] += time.perf_counter() - t1

        def flush_grid(sink) -> None:  # noqa: ANN001 - format 2: every render's whole patch grid
            renders = self.renders or []
            t0 = time.perf_counter()
            per_render = [tok(np.stack([rendered[r.render] for *_, rendered in pending])) for r in renders]
            t1 = time.perf_counter()
            seconds["compute"] += t1 - t0
            for i, (sample, box, size, _) in enumerate(pending):
                count(sample, per_render[0][i])  # render 0 is view 0
                if sink is not None:
                    flat = np.concatenate([ids[i] for ids in per_render]).astype(self.dtype)
                    meta = {
                        "format": GRID_FORMAT_VERSION,
                        "width": size[0],
                        "height": size[1],
                        "box": box.to_json(),
                        "patch_size": tok.patch_size,
                        "grid": self.grid,
                        "renders": [r.to_json() for r in renders],
                    }
                    write(
                        sink,
                        sample,
                        {GRID_MEMBER: encode_npy(flat), GRID_META_MEMBER: json.dumps(meta).encode()},
                    )
            seconds["write"] += time.perf_counter() - t1

        def flush(sink) -> None:  # noqa: ANN001
            (flush_views if self.renders is None else flush_grid)(sink)
            pending.clear()

        per_sample = c.views if self.renders is None else len(self.renders)

        def run(sink) -> None:  # noqa: ANN001
            for sample, img in iter_images(shard, stats, seconds=seconds):
                t0 = time.perf_counter()
                if self.renders is None:
                    params = make_views(img.width, img.height, tok.view_spec, c.seed, sample.key, c.views)
                    views = np.stack([to_uint8_array(apply_view(img, p)) for p in params])
                    pending.append((sample, params, img.size, views))
                else:
                    box = center_view(img.width, img.height, tok.view_spec)
                    rendered = [
                        to_uint8_array(render_image(img, box, r, tok.patch_size)) for r in self.renders
                    ]
                    pending.append((sample, box, img.size, rendered))
                seconds["decode"] += time.perf_counter() - t0
                if len(pending) * per_sample >= c.batch_size:
                    flush(sink)
            if pending:
                flush(sink)

        output = None
        if self.out_url is None:
            run(None)
        else:
            name = f"{shard.name}.tar"
            with write_tar_shard(fs.join(self.out_url, name), split=shard.split) as sink:
                run(sink)
            entry: ShardEntry = sink.entry  # type: ignore[attr-defined]
            output = {
                "url": name,
                "samples": entry.samples,
                "bytes": entry.bytes,
                "sha256": entry.sha256,
                "split": shard.split,
            }
        classes = max(cooc) + 1 if cooc else 0
        matrix = np.zeros((tok.k, classes), dtype=np.int64)
        for label, counts in cooc.items():
            matrix[:, label] = counts
        result = ShardStats.of_read(shard, self.fingerprint, stats, seconds, start, output)
        if self.out_url is None:
            result.arrays = {"cooc": matrix, "codes": codes}
            return result
        # The counts go next to the stats, so a resumed run can still report TCAS over every shard.
        fs.write_bytes_atomic(fs.join(self.out_url, _counts_name(shard.name)), _npz(cooc=matrix, codes=codes))
        result.commit(self.out_url)
        return result


def _counts_name(shard_name: str) -> str:
    return f"{shard_name}_counts.npz"


def _npz(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _read_counts(url: str) -> tuple[np.ndarray, np.ndarray]:
    filesystem, path = fs.get_fs(url)
    with np.load(io.BytesIO(filesystem.cat_file(path)), allow_pickle=False) as z:
        return z["cooc"], z["codes"]


def reduce_counts(parts: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    classes = max((c.shape[1] for c, _ in parts), default=0)
    cooc = np.zeros((k, classes), dtype=np.int64)
    codes = np.zeros(k, dtype=np.int64)
    for c, n in parts:
        cooc[:, : c.shape[1]] += c
        codes += n
    return cooc, codes


def build_report(cooc: np.ndarray, codes: np.ndarray, codebook: Codebook, form: str, samples: int) -> dict:
    report = {
        "format_version": FORMAT_VERSION,
        "samples": samples,
        "view": 0,
        "usage": usage(codes),
        "codebook": {"k": codebook.k, "extractor": codebook.extractor["name"], "init": codebook.init},
    }
    if cooc.shape[1] == 0 or cooc.sum() == 0:
        report["tcas"] = None
        report["tcas_note"] = "no labels in the data: TCAS needs class labels"
    else:
        report.update(tcas=tcas(cooc, form), cooc_shape=list(cooc.shape))
    return report


def _prepare(input: str, codebook: str, weights: str | None) -> tuple[Dataset, Codebook, ExtractorSpec]:
    dataset = open_dataset(input)
    book = Codebook.load(codebook)
    spec = codebook_extractor(book.meta, weights, codebook)
    return dataset, book, spec


def tokenize(
    input: str,
    output: str,
    codebook: str,
    config: TokenizeConfig = TokenizeConfig(),
    address: str | None = None,
) -> StageResult:
    """Run (or resume) the tokenize stage; an already complete output is returned as it is."""
    dataset, book, spec = _prepare(input, codebook, config.weights)
    meta = book.meta
    grid = grid_size(meta["view"]["image_size"], meta["view"]["patch_size"])
    codebook_fp = fs.read_json(fs.join(codebook, "manifest.json"))["fingerprint"]
    from_codebook = {  # the fingerprint holds the codebook's identity and views, not the path to it
        "codebook_fingerprint": codebook_fp,
        "k": meta["k"],
        "extractor": spec.to_json(),
        "image_size": meta["view"]["image_size"],
        "patch_size": meta["view"]["patch_size"],
        "crop_pct": meta["view"]["crop_pct"],
    }

    def committed(out: StageOutput, shard: ShardRef) -> ShardStats | None:  # its stats and its token counts
        return out.committed(shard) if fs.exists(fs.join(output, _counts_name(shard.name))) else None

    def summarize(run: StageRun) -> dict:
        """The TCAS report over every shard (from the counts files, so reused shards count too) and the indexes."""
        stats = run.all_stats
        cooc, codes = reduce_counts(
            [_read_counts(fs.join(output, _counts_name(s.name))) for s in dataset.shards], book.k
        )
        report = build_report(cooc, codes, book, config.tcas_form, sum(s.samples for s in stats.values()))
        fs.write_bytes_atomic(fs.join(output, "tcas_R.npy"), encode_npy(cooc))
        # the atlas plots of these very tokens (view 0 of every image): usage, and R̄ with TCAS when labelled
        fs.write_bytes_atomic(fs.join(output, "atlas-usage.png"), usage_png(codes))
        if report.get("tcas"):
            fs.write_bytes_atomic(
                fs.join(output, "atlas-classes.png"), classes_png(cooc, report["tcas"]["tcas"])
            )
        fs.write_json_atomic(fs.join(output, REPORT), report)
        outputs = [stats[s.name].output for s in dataset.shards]
        write_indexes(
            output,
            [
                ShardEntry(
                    url=o["url"],
                    samples=o["samples"],
                    bytes=o["bytes"],
                    sha256=o["sha256"],
                    split=o.get("split"),
                )
                for o in outputs
            ],
        )
        return {
            **run.counts(),
            "k": book.k,
            "views": config.views,
            "token_format": 1 if config.grid_spec() is None else GRID_FORMAT_VERSION,
            "renders": None if config.grid_spec() is None else len(make_renders(config.grid_spec(), grid)),
            "tcas": report["tcas"]["tcas"] if report.get("tcas") else None,
            "usage": report["usage"],
        }

    return run_shard_stage(
        ShardStage(
            "tokenize",
            config,
            dataset.shards,
            TokenizeWorker,
            worker_args=lambda fingerprint: (codebook, spec.to_json(), asdict(config), output, fingerprint),
            saved_config={**asdict(config), "codebook": codebook},
            summarize=summarize,
            derived=from_codebook,
            committed=committed,
        ),
        output,
        address,
    )


def tcas_report(
    input: str,
    codebook: str,
    weights: str | None = None,
    form: str = "C",
    address: str | None = None,
    batch_size: int = 64,
) -> dict:
    """The tokenize stage's TCAS report for any codebook on a labelled dataset, writing no shards."""
    dataset, book, spec = _prepare(input, codebook, weights)
    config = TokenizeConfig(views=1, tcas_form=form, weights=weights, batch_size=batch_size)
    with ray_session(address) as resources:
        run = run_shards(
            "tcas",
            dataset.shards,
            TokenizeWorker,
            (codebook, spec.to_json(), asdict(config), None, digest(spec.to_json())),
            committed=lambda s: None,
            num_workers=worker_count(resources, 1, 0, len(dataset.shards)),
            ray_options={"num_cpus": 1},
            max_retries=config.max_retries,
        )
    if run.failed:
        raise InputError(input, "; ".join(f"{k}: {v}" for k, v in sorted(run.failed.items())))
    check_unique_keys("tcas", dataset.shards, run.done)
    stats = [run.done[s.name] for s in dataset.shards]
    cooc, codes = reduce_counts([(s.arrays["cooc"], s.arrays["codes"]) for s in stats], book.k)
    if cooc.sum() == 0:
        raise InputError(input, "has no labels: TCAS needs class labels (.cls members or class folders)")
    report = build_report(cooc, codes, book, form, sum(s.samples for s in stats))
    report["skipped"] = [item for s in stats for item in s.skipped]
    return report


def summary_line(result: StageResult, output: str) -> str:
    s = result.manifest.stats
    if not result.ran:
        return f"tokenize: {output} is already complete ({s['samples']} images); nothing to do"
    tcas_text = f"TCAS {s['tcas']:.4f}" if s.get("tcas") is not None else "no labels, no TCAS"
    per_image = f"{s['renders']} grid renders" if s.get("renders") else f"{s['views']} views"
    return (
        f"tokenize: {s['samples']} images x {per_image} -> {s['shards']} token shards at {output}; "
        f"{tcas_text}; {s['usage']['used_codes']}/{s['k']} codes used (perplexity {s['usage']['perplexity']:.1f}); "
        f"{s['num_skipped']} skipped; {s['shards_reused']} shards reused; {s['wall_seconds']:.1f}s"
    )
