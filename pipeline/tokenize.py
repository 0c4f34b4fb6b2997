"""`kmim pipeline tokenize`: every image into training-ready token targets, once.

One output tar per input shard, same keys in the same order. Per sample: the source image bytes
unchanged, the label, `tokens.npy` [V, H/p, W/p] and `views.json` (the V recorded views: view 0 the
center view, views 1..V-1 RandomResizedCrop + flip seeded by (seed, key, view)). While tokenizing, the
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
from kmim.contract.codebook import Codebook
from kmim.contract.manifest import digest
from kmim.contract.patches import grid_size
from kmim.contract.schemas import (
    FORMAT_VERSION,
    LABEL_MEMBER,
    TOKENS_MEMBER,
    VIEWS_MEMBER,
    ShardEntry,
    token_dtype,
)
from kmim.contract.views import apply_view, make_views, to_uint8_array
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
        self.tokenizer = Tokenizer(Codebook.load(codebook), ExtractorSpec.from_json(spec), device)
        self.grid = grid_size(self.tokenizer.view_spec.image_size, self.tokenizer.patch_size)
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

        def flush(sink) -> None:
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
                view0 = np.bincount(grid[0].ravel().astype(np.int64), minlength=tok.k)
                codes[:] += view0
                if sample.label is not None:
                    cooc[sample.label] = cooc.get(sample.label, 0) + view0
                if sink is not None:
                    members = {sample.ext: sample.image}
                    if sample.label is not None:
                        members[LABEL_MEMBER] = str(sample.label).encode()
                    members[TOKENS_MEMBER] = encode_npy(grid)
                    members[VIEWS_MEMBER] = json.dumps(
                        {
                            "width": size[0],
                            "height": size[1],
                            "seed": c.seed,
                            "views": [p.to_json() for p in params],
                        }
                    ).encode()
                    sink.write(sample.key, members)
            seconds["write"] += time.perf_counter() - t1
            pending.clear()

        def run(sink) -> None:
            for sample, img in iter_images(shard, stats, seconds=seconds):
                t0 = time.perf_counter()
                params = make_views(img.width, img.height, tok.view_spec, c.seed, sample.key, c.views)
                views = np.stack([to_uint8_array(apply_view(img, p)) for p in params])
                seconds["decode"] += time.perf_counter() - t0
                pending.append((sample, params, img.size, views))
                if len(pending) * c.views >= c.batch_size:
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
    return (
        f"tokenize: {s['samples']} images x {s['views']} views -> {s['shards']} token shards at {output}; "
        f"{tcas_text}; {s['usage']['used_codes']}/{s['k']} codes used (perplexity {s['usage']['perplexity']:.1f}); "
        f"{s['num_skipped']} skipped; {s['shards_reused']} shards reused; {s['wall_seconds']:.1f}s"
    )
