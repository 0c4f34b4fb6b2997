"""`kmim pipeline cluster`: a codebook of K centers by exact, distributed Lloyd epochs on Ray + faiss.

Ray actors each own a disjoint set of feature files (in memory when they fit, streamed from storage
each epoch otherwise). Every epoch each actor assigns its points to the nearest center with faiss and
returns per-center sums (float64), counts and inertia; the driver reduces them in a fixed order and
updates the centers. Every random draw is keyed by (seed, file index, ...), never by which actor holds a
file, so the result does not depend on the number of workers. The state is checkpointed after every
epoch in one atomic file; a killed run resumes from the last finished epoch.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, replace

import faiss
import numpy as np
import ray
import torch
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from kmim import __version__, fs
from kmim.contract import streams
from kmim.contract.codebook import Assigner, Codebook, centers_file, normalize_rows
from kmim.contract.schemas import CODEBOOK_META, CODEBOOK_WEIGHTS, FORMAT_VERSION, safetensors_metadata
from kmim.errors import InputError
from kmim.pipeline.configs import ClusterConfig
from kmim.pipeline.features import FeatureFile, FeatureSet, iter_feature_batches, open_features
from kmim.pipeline.kmeans import (
    accumulate,
    kmeans_plus_plus,
    largest_remainder,
    lloyd_update,
    minibatch_update,
    split_largest,
)
from kmim.pipeline.ray_runtime import ray_session, worker_count
from kmim.pipeline.stage import StageResult, claim_output
from kmim.progress import ProgressReporter

log = logging.getLogger(__name__)

CHECKPOINT = "_checkpoint.safetensors"
CHUNK_ROWS = 65536


# --- the actor -------------------------------------------------------------------------------------


class KMeansWorker:
    """Owns a disjoint set of feature files; answers per-epoch assignment statistics."""

    def __init__(
        self, files: list[dict], dim: int, spherical: bool, in_memory: bool, use_gpu: bool, threads: int
    ):
        faiss.omp_set_num_threads(threads)
        torch.set_num_threads(threads)
        self.files = [FeatureFile(**f) for f in files]
        self.dim, self.spherical, self.in_memory, self.use_gpu = dim, spherical, in_memory, use_gpu
        self.cache: dict[int, np.ndarray] = {}
        self.d2: dict[int, np.ndarray] = {}  # k-means|| distances, per file

    def _prepare(self, x: np.ndarray) -> np.ndarray:
        return normalize_rows(x) if self.spherical else x

    def _file_batches(self, f: FeatureFile):
        if f.index in self.cache:
            x = self.cache[f.index]
            for start in range(0, len(x), CHUNK_ROWS):
                yield start, x[start : start + CHUNK_ROWS]
        else:
            start = 0
            for x in iter_feature_batches(f.url, self.dim, CHUNK_ROWS):
                yield start, self._prepare(x)
                start += len(x)

    def _file(self, f: FeatureFile) -> np.ndarray:
        if f.index in self.cache:
            return self.cache[f.index]
        return np.concatenate([x for _, x in self._file_batches(f)])

    def load(self) -> dict:
        """Read (and cache) every file, checking that all values are finite."""
        bad = []
        rows = 0
        for f in self.files:
            parts = []
            for start, x in self._raw_batches(f):
                finite = np.isfinite(x).all(axis=1)
                if not finite.all():
                    bad.append(
                        {"file": f.url, "row": start + int(np.argmin(finite)), "count": int((~finite).sum())}
                    )
                if self.in_memory:
                    parts.append(self._prepare(x))
                rows += len(x)
            if self.in_memory:
                self.cache[f.index] = np.concatenate(parts) if parts else np.zeros((0, self.dim), np.float32)
        return {"rows": rows, "bad": bad}

    def _raw_batches(self, f: FeatureFile):
        start = 0
        for x in iter_feature_batches(f.url, self.dim, CHUNK_ROWS):
            yield start, x
            start += len(x)

    def lloyd_stats(self, centers: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        assigner = Assigner(centers, self.use_gpu)
        k = len(centers)
        sums = torch.zeros(k, self.dim, dtype=torch.float64)
        counts = np.zeros(k, dtype=np.int64)
        inertia = 0.0
        for f in self.files:
            for _, x in self._file_batches(f):
                d2, labels = assigner.assign(x)
                accumulate(x, labels, k, sums, counts)
                inertia += float(d2.astype(np.float64).sum())
        return sums.numpy(), counts, inertia

    def sample(self, counts: dict[int, int], seed: int) -> dict[int, np.ndarray]:
        """A uniform sample without replacement of counts[file] rows per file, drawn per file."""
        out = {}
        for f in self.files:
            n = counts.get(f.index, 0)
            if n:
                rows = np.sort(
                    streams.rng("kmeans_sample", seed, f.index).choice(f.rows, size=n, replace=False)
                )
                out[f.index] = self._file(f)[rows]
        return out

    def gather(self, rows: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
        return {f.index: self._file(f)[rows[f.index]] for f in self.files if f.index in rows}

    def minibatch_stats(
        self, centers: np.ndarray, rows: dict[int, np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray, float]:
        assigner = Assigner(centers, self.use_gpu)
        k = len(centers)
        sums = torch.zeros(k, self.dim, dtype=torch.float64)
        counts = np.zeros(k, dtype=np.int64)
        inertia = 0.0
        for x in self.gather(rows).values():
            d2, labels = assigner.assign(x)
            accumulate(x, labels, k, sums, counts)
            inertia += float(d2.astype(np.float64).sum())
        return sums.numpy(), counts, inertia

    # k-means|| (Bahmani et al. 2012)
    def parallel_update(self, new_centers: np.ndarray) -> float:
        """Lower every point's distance to the candidate set by the new candidates; returns Σ d²."""
        assigner = Assigner(new_centers, self.use_gpu)
        phi = 0.0
        for f in self.files:
            d2 = np.concatenate([assigner.assign(x)[0] for _, x in self._file_batches(f)]).astype(np.float64)
            self.d2[f.index] = np.minimum(self.d2[f.index], d2) if f.index in self.d2 else d2
            phi += float(self.d2[f.index].sum())
        return phi

    def parallel_oversample(
        self, oversampling: float, phi: float, seed: int, round_: int
    ) -> dict[int, np.ndarray]:
        out = {}
        for f in self.files:
            u = streams.rng("kmeans_oversample", seed, round_, f.index).random(f.rows)
            rows = np.flatnonzero(u < oversampling * self.d2[f.index] / phi)
            if len(rows):
                out[f.index] = self._file(f)[rows]
        return out

    def candidate_weights(self, candidates: np.ndarray) -> np.ndarray:
        assigner = Assigner(candidates, self.use_gpu)
        counts = np.zeros(len(candidates), dtype=np.int64)
        for f in self.files:
            for _, x in self._file_batches(f):
                counts += np.bincount(assigner.assign(x)[1], minlength=len(candidates))
        return counts


# --- the driver ------------------------------------------------------------------------------------


def partition(files: list[FeatureFile], workers: int) -> list[list[FeatureFile]]:
    """Disjoint, balanced by rows: largest file first to the least loaded worker (ties: lowest index)."""
    parts: list[list[FeatureFile]] = [[] for _ in range(workers)]
    load = [0] * workers
    for f in sorted(files, key=lambda f: (-f.rows, f.index)):
        w = min(range(workers), key=lambda i: (load[i], i))
        parts[w].append(f)
        load[w] += f.rows
    return [sorted(p, key=lambda f: f.index) for p in parts if p]


def _by_file(results: list[dict[int, np.ndarray]]) -> np.ndarray:
    merged = {i: x for r in results for i, x in r.items()}
    return np.concatenate([merged[i] for i in sorted(merged)]) if merged else np.zeros((0, 0), np.float32)


def _locate(files: list[FeatureFile], global_rows: np.ndarray) -> dict[int, np.ndarray]:
    bounds = np.cumsum([0] + [f.rows for f in files])
    which = np.searchsorted(bounds, global_rows, side="right") - 1
    return {files[w].index: np.sort(global_rows[which == w] - bounds[w]) for w in np.unique(which)}


class Driver:
    def __init__(self, features: FeatureSet, config: ClusterConfig, actors: list):
        self.features, self.config, self.actors = features, config, actors
        self.files = features.files

    def sample(self, n: int) -> np.ndarray:
        counts = largest_remainder(min(n, self.features.rows), [f.rows for f in self.files])
        request = {f.index: c for f, c in zip(self.files, counts) if c}
        return _by_file(ray.get([a.sample.remote(request, self.config.seed) for a in self.actors]))

    def initial_centers(self) -> np.ndarray:
        c = self.config
        rng = streams.rng("kmeans_init", c.seed)
        if c.init_from:
            return read_centers(c.init_from, c.k, self.features.dim)
        if c.init == "random":
            rows = np.sort(rng.choice(self.features.rows, size=c.k, replace=False))
            request = _locate(self.files, rows)
            return _by_file(ray.get([a.gather.remote(request) for a in self.actors]))
        if c.init == "kmeans++":
            return kmeans_plus_plus(self.sample(max(c.sample_for_init, c.k)), c.k, rng)
        return self.kmeans_parallel(rng)

    def kmeans_parallel(self, rng: np.random.Generator) -> np.ndarray:
        c = self.config
        first = _locate(self.files, np.array([int(rng.integers(self.features.rows))]))
        candidates = [_by_file(ray.get([a.gather.remote(first) for a in self.actors]))]
        phi = sum(ray.get([a.parallel_update.remote(candidates[0]) for a in self.actors]))
        for r in range(c.parallel_rounds):
            if phi <= 0:
                break
            picked = _by_file(
                ray.get([a.parallel_oversample.remote(2.0 * c.k, phi, c.seed, r) for a in self.actors])
            )
            if len(picked):
                candidates.append(picked)
                phi = sum(ray.get([a.parallel_update.remote(picked) for a in self.actors]))
        cand = np.concatenate(candidates)
        if len(cand) < c.k:  # tiny data: top up with a uniform sample
            cand = np.concatenate([cand, self.sample(c.k)])
        weights = sum(ray.get([a.candidate_weights.remote(cand) for a in self.actors])).astype(np.float64)
        centers = kmeans_plus_plus(cand, c.k, rng, np.maximum(weights, 1e-12))
        for _ in range(10):  # weighted Lloyd on the candidates (Bahmani et al., step 8)
            _, labels = Assigner(centers).assign(cand)
            sums = np.zeros_like(centers, dtype=np.float64)
            np.add.at(sums, labels, cand * weights[:, None])
            mass = np.bincount(labels, weights=weights, minlength=c.k)
            centers, _ = lloyd_update(sums, mass, centers, rng, c.spherical)
        return centers

    def lloyd_epoch(self, centers: np.ndarray, epoch: int) -> tuple[np.ndarray, float, int]:
        ref = ray.put(centers)
        results = ray.get([a.lloyd_stats.remote(ref) for a in self.actors])
        sums = np.sum([r[0] for r in results], axis=0)
        counts = np.sum([r[1] for r in results], axis=0)
        inertia = float(sum(r[2] for r in results))
        new, reseeds = lloyd_update(
            sums,
            counts,
            centers,
            streams.rng("kmeans_reseed", self.config.seed, epoch),
            self.config.spherical,
        )
        return new, inertia, reseeds

    def minibatch_epoch(
        self, centers: np.ndarray, seen: np.ndarray, epoch: int
    ) -> tuple[np.ndarray, float, int]:
        c = self.config
        n = self.features.rows
        steps = max(1, -(-n // c.minibatch))
        rng = streams.rng("kmeans_minibatch", c.seed, epoch)
        inertia = 0.0
        centers = centers.copy()
        for _ in range(steps):
            request = _locate(self.files, np.sort(rng.choice(n, size=min(c.minibatch, n), replace=False)))
            ref = ray.put(centers)
            results = ray.get([a.minibatch_stats.remote(ref, request) for a in self.actors])
            sums = np.sum([r[0] for r in results], axis=0)
            counts = np.sum([r[1] for r in results], axis=0)
            inertia += sum(r[2] for r in results)
            minibatch_update(centers, seen, sums, counts, c.spherical)
        empty = [int(j) for j in np.flatnonzero(seen == 0)]
        reseeds = split_largest(centers, seen, empty, streams.rng("kmeans_reseed", c.seed, epoch))
        return centers, inertia * n / (steps * min(c.minibatch, n)), reseeds

    def evaluate(self, centers: np.ndarray) -> tuple[np.ndarray, float]:
        results = ray.get([a.lloyd_stats.remote(ray.put(centers)) for a in self.actors])
        return np.sum([r[1] for r in results], axis=0), float(sum(r[2] for r in results))


def read_centers(url: str, k: int, dim: int) -> np.ndarray:
    """Initial centers from a codebook folder or a .safetensors file holding `centers` [k, dim]."""
    centers = Codebook.load(url).centers
    if centers.shape != (k, dim):
        raise InputError(centers_file(url), f"centers have shape {centers.shape}, expected ({k}, {dim})")
    return centers


def _save_checkpoint(out_url: str, centers: np.ndarray, seen: np.ndarray, state: dict) -> None:
    data = st_save({"centers": centers, "seen": seen}, metadata={"state": json.dumps(state)})
    fs.write_bytes_atomic(fs.join(out_url, CHECKPOINT), data)


def _load_checkpoint(out_url: str, fingerprint: str) -> tuple[np.ndarray, np.ndarray, dict] | None:
    url = fs.join(out_url, CHECKPOINT)
    if not fs.exists(url):
        return None
    filesystem, path = fs.get_fs(url)
    raw = filesystem.cat_file(path)
    state = json.loads(safetensors_metadata(raw)["state"])
    if state.get("fingerprint") != fingerprint:
        return None
    tensors = st_load(raw)
    return tensors["centers"], tensors["seen"], state


MIN_POINTS_PER_CENTROID = 39  # faiss warns below this too


def cluster(features_url: str, output: str, config: ClusterConfig, address: str | None = None) -> StageResult:
    """Run (or resume) the cluster stage; an already complete output is returned as it is."""
    features = open_features(features_url)
    if config.k > features.rows:
        raise InputError(
            features_url, f"k = {config.k} is larger than the number of feature vectors ({features.rows})"
        )
    if features.rows < MIN_POINTS_PER_CENTROID * config.k:
        log.warning(
            "cluster: %d feature vectors for K = %d is %.1f per centroid, fewer than %d: the centers will be "
            "noisy; extract more patches (kmim run: cluster.points_per_centroid; extract: --patches-per-image)",
            features.rows,
            config.k,
            features.rows / config.k,
            MIN_POINTS_PER_CENTROID,
        )
    if config.init_from:
        config = replace(config, init_from_sha256=fs.sha256_of(centers_file(config.init_from)))
    out = claim_output(output, "cluster", config, [f.input_ref() for f in features.files])
    if out.finished:
        log.info("cluster: %s is already complete; nothing to do", output)
        return StageResult(out.manifest, ran=False)
    fs.write_json_atomic(fs.join(output, "config.json"), asdict(config))
    fingerprint = out.manifest.fingerprint
    start = time.monotonic()
    with ray_session(address) as resources:
        workers = config.ray_workers or worker_count(
            resources, config.cpus_per_worker, config.gpus_per_worker, len(features.files)
        )
        parts = partition(features.files, min(workers, len(features.files)))
        budget = (
            config.memory_per_worker_gb * 1024**3
            if config.memory_per_worker_gb is not None
            else 0.5 * resources.get("memory", 8 * 1024**3) / len(parts)
        )
        remote = ray.remote(num_cpus=config.cpus_per_worker, num_gpus=config.gpus_per_worker)(KMeansWorker)
        actors = []
        in_memory = []
        for part in parts:
            fits = sum(f.rows for f in part) * features.dim * 4 <= budget
            in_memory.append(fits)
            actors.append(
                remote.remote(
                    [asdict(f) for f in part],
                    features.dim,
                    config.spherical,
                    fits,
                    config.gpus_per_worker > 0,
                    max(1, int(config.cpus_per_worker)),
                )
            )
        loaded = ray.get([a.load.remote() for a in actors])
        bad = [b for r in loaded for b in r["bad"]]
        if bad:
            raise InputError(
                bad[0]["file"],
                f"{sum(b['count'] for b in bad)} feature vectors hold NaN or Inf "
                f"(first at row {bad[0]['row']})",
            )
        log.info(
            "cluster: %d features x %d dims on %d workers (%s)",
            features.rows,
            features.dim,
            len(actors),
            ", ".join("in memory" if m else "streamed" for m in in_memory),
        )
        driver = Driver(features, config, actors)
        resumed = _load_checkpoint(output, fingerprint)
        if resumed is not None:
            centers, seen, state = resumed
            log.info("cluster: resuming after epoch %d of %d", state["epochs_done"], config.epochs)
        else:
            t0 = time.monotonic()
            centers = driver.initial_centers().astype(np.float32)
            if config.spherical:
                centers = normalize_rows(centers)
            seen = np.zeros(config.k, dtype=np.float64)
            state = {
                "fingerprint": fingerprint,
                "epochs_done": 0,
                "inertia": [],
                "seconds_per_epoch": [],
                "reseeds": [],
                "init_seconds": round(time.monotonic() - t0, 3),
                "stopped_early": False,
            }
            _save_checkpoint(output, centers, seen, state)
        with ProgressReporter("cluster", config.epochs, unit="epochs", item="points") as progress:
            progress.advance(state["epochs_done"], 0)
            while state["epochs_done"] < config.epochs and not state["stopped_early"]:
                epoch = state["epochs_done"]
                t0 = time.monotonic()
                if config.minibatch:
                    centers, inertia, reseeds = driver.minibatch_epoch(centers, seen, epoch)
                else:
                    centers, inertia, reseeds = driver.lloyd_epoch(centers, epoch)
                prev = state["inertia"][-1] if state["inertia"] else None
                state["inertia"].append(inertia)
                state["seconds_per_epoch"].append(round(time.monotonic() - t0, 4))
                state["reseeds"].append(reseeds)
                state["epochs_done"] = epoch + 1
                if config.tol and prev and (prev - inertia) / prev < config.tol:
                    state["stopped_early"] = True
                _save_checkpoint(output, centers, seen, state)
                progress.advance(1, features.rows)
        sizes, final_inertia = driver.evaluate(centers)
    return StageResult(
        _write_codebook(
            out, features, config, centers, sizes, final_inertia, state, len(actors), time.monotonic() - start
        ),
        ran=True,
    )


def _write_codebook(
    out,
    features: FeatureSet,
    config: ClusterConfig,
    centers: np.ndarray,
    sizes: np.ndarray,
    final_inertia: float,
    state: dict,
    workers: int,
    wall: float,
):
    extract_config = features.manifest.config
    meta = {
        "format_version": FORMAT_VERSION,
        "kmim_version": __version__,
        "k": int(centers.shape[0]),
        "dim": int(centers.shape[1]),
        "extractor": extract_config["extractor"],
        "extractor_fingerprint": extract_config["extractor"]["fingerprint"],
        "view": {k: extract_config[k] for k in ("image_size", "patch_size", "crop_pct")},
        "features": {
            "url": features.url,
            "fingerprint": features.manifest.fingerprint,
            "rows": features.rows,
        },
        "init": f"from {config.init_from}" if config.init_from else config.init,
        "seed": config.seed,
        "spherical": config.spherical,
        "minibatch": config.minibatch,
        "epochs_run": state["epochs_done"],
        "stopped_early": state["stopped_early"],
        "inertia_per_epoch": state["inertia"],
        "final_inertia": final_inertia,
        "cluster_sizes": sizes.astype(int).tolist(),
        "empty_cluster_reseeds": int(sum(state["reseeds"])),
        "reseeds_per_epoch": state["reseeds"],
        "seconds_per_epoch": state["seconds_per_epoch"],
        "init_seconds": state["init_seconds"],
        "workers": workers,
    }
    Codebook(centers.astype(np.float32), meta).save(out.url)
    m = out.manifest
    m.outputs = [
        {"url": CODEBOOK_WEIGHTS, "sha256": fs.sha256_of(fs.join(out.url, CODEBOOK_WEIGHTS))},
        {"url": CODEBOOK_META},
    ]
    m.stats = {
        "k": meta["k"],
        "dim": meta["dim"],
        "points": features.rows,
        "epochs_run": meta["epochs_run"],
        "final_inertia": final_inertia,
        "empty_cluster_reseeds": meta["empty_cluster_reseeds"],
        "used_codes": int((sizes > 0).sum()),
        "wall_seconds": round(wall, 3),
        "workers": workers,
    }
    m.write(out.url)
    out.release()
    fs.remove(fs.join(out.url, CHECKPOINT))
    return m


def summary_line(result: StageResult, output: str) -> str:
    s = result.manifest.stats
    if not result.ran:
        return f"cluster: {output} is already complete (K={s['k']}, {s['epochs_run']} epochs); nothing to do"
    return (
        f"cluster: K={s['k']} centers of dim {s['dim']} from {s['points']} features in {s['epochs_run']} epochs "
        f"on {s['workers']} workers; inertia {s['final_inertia']:.6g}; {s['used_codes']} codes used; "
        f"{s['empty_cluster_reseeds']} empty-cluster re-seeds; {s['wall_seconds']:.1f}s -> {output}"
    )
