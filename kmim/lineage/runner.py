"""`kmim run`: the recipe's stages in order, each in ROOT/<stage>/<fingerprint>/, reusing what is finished.

A stage's fingerprint is computed from its inputs' fingerprints, its config and the kmim version before it
runs, so the path alone says whether the work exists: a second run with the same recipe reuses every
finished stage; changing only `train` re-runs only training; changing K re-runs cluster, tokenize and the
token-target training, not extract (and not the pixel-target MAE baseline, which reads the images). An
unfinished stage is resumed by the stage itself. When only pixel-target runs are asked for (`--run mae`) on
the built-in data, extract, cluster and tokenize are skipped: nothing selected reads their output. Each stage folder gets a `lineage.json` (what made it,
from what) written before the work starts, so `kmim ls` shows unfinished work too.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from dataclasses import asdict, dataclass, field

from kmim import __version__, fs
from kmim.contract.config import fingerprint_config, legacy_config
from kmim.contract.manifest import StageManifest, digest, stage_fingerprint
from kmim.data.reader import open_dataset
from kmim.errors import ConfigError, InputError
from kmim.lineage.recipe import STAGES, PipelineRecipe, write_builtin
from kmim.pipeline.stage import STAGE_CLAIM
from kmim.trainer.distributed import is_main_process, relaunch_ranks, under_launcher

log = logging.getLogger(__name__)
LINEAGE_NAME = "lineage.json"
PATH_DIGITS = 16  # hex digits of the fingerprint in the folder name (64 bits)


@dataclass
class Step:
    stage: str
    name: str
    path: str
    fingerprint: str
    status: str = "planned"  # reused | ran | resumed | skipped
    seconds: float = 0.0
    legacy: str = (
        ""  # the fingerprint kmim 0.1 gave this step (whole config): its folder is reused if finished
    )


@dataclass
class RunReport:
    recipe: str
    root: str
    steps: list[Step] = field(default_factory=list)
    compare_table: str | None = None

    def step(self, name: str) -> Step:
        return next(s for s in self.steps if s.name == name)


@dataclass(frozen=True)
class Artifact:
    stage: str
    fingerprint: str
    path: str
    legacy: str = (
        ""  # the fingerprint kmim 0.1 gave it (whole config, old field names): old roots stay reused
    )

    def __post_init__(self) -> None:
        if not self.legacy:
            object.__setattr__(self, "legacy", self.fingerprint)


def artifact_path(root: str, stage: str, fingerprint: str) -> str:
    return fs.join(root, stage, fingerprint[:PATH_DIGITS])


def write_lineage(art: Artifact, recipe: PipelineRecipe, config: dict, inputs: list[dict]) -> None:
    url = fs.join(art.path, LINEAGE_NAME)
    if fs.exists(url):
        return
    fs.makedirs(art.path)
    fs.write_json_atomic(
        url,
        {
            "stage": art.stage,
            "fingerprint": art.fingerprint,
            "path": art.path,
            "inputs": inputs,
            "config": config,
            "kmim_version": __version__,
            "recipe": recipe.name,
            "recipe_file": recipe.source,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    )


def _ref(art: Artifact) -> dict:
    return {"stage": art.stage, "fingerprint": art.fingerprint, "path": art.path}


class Runner:
    def __init__(
        self,
        recipe: PipelineRecipe,
        root: str,
        stages: list[str],
        runs: list[str] | None,
        nproc: int = 1,
        address: str | None = None,
        sets: list[str] = (),
    ):
        unknown = [s for s in stages if s not in STAGES]
        if unknown:
            raise ConfigError(f"unknown stage(s) {', '.join(unknown)} (stages: {', '.join(STAGES)})")
        missing = [r for r in runs or [] if r not in recipe.runs]
        if missing:
            raise ConfigError(
                f"{recipe.source}: no run(s) {', '.join(missing)} (runs: {', '.join(recipe.runs)})"
            )
        self.recipe, self.root, self.stages = recipe, root.rstrip("/"), stages
        self.runs = runs or list(recipe.runs)
        self.nproc, self.address, self.sets = nproc, address, list(sets)
        self.report = RunReport(recipe.source, self.root)
        self.under_torchrun = (
            under_launcher()
        )  # torchrun or Slurm started this process as one rank of several
        self.is_main = is_main_process()
        self._ray: contextlib.ExitStack | None = None

    # --- bookkeeping ------------------------------------------------------------------------------

    def _begin(self, art: Artifact, name: str, config: dict, inputs: list[dict]) -> Step:
        step = Step(art.stage, name, art.path, art.fingerprint, legacy=art.legacy)
        self.report.steps.append(step)
        if art.stage in self.stages and self.is_main:
            write_lineage(art, self.recipe, config, inputs)
        return step

    def _need(self, step: Step, done: bool) -> bool:
        """Whether to run this step now; a stage not selected must already be finished."""
        if done:
            step.status = "reused"
            self._say(f"{step.name}: reused {step.path}")
            return False
        if step.stage not in self.stages:
            raise InputError(
                step.path,
                f"{step.name} is not finished and --stages does not include {step.stage}; "
                "run that stage first",
            )
        return True

    def _say(self, text: str) -> None:
        if self.is_main:
            print(text, flush=True)

    def _timed(self, step: Step, resumed: bool, fn) -> object:  # noqa: ANN001
        self._say(f"{step.name}: {'resuming' if resumed else 'running'} -> {step.path}")
        start = time.monotonic()
        out = fn()
        step.seconds = round(time.monotonic() - start, 3)
        step.status = "resumed" if resumed else "ran"
        return out

    # --- stages -----------------------------------------------------------------------------------

    def data(self) -> tuple[Artifact, str, str]:
        """(artifact, train spec, val spec); external data is an artifact of its own identity, not a stage."""
        r = self.recipe
        if r.builtin is None:
            ids = [
                [s.input_ref().identity() for s in open_dataset(spec).shards]
                for spec in (r.train_data, r.val_data)
            ]
            art = Artifact("data", digest({"train": ids[0], "val": ids[1]}), r.train_data)  # type: ignore[arg-type]
            return art, r.train_data, r.val_data  # type: ignore[return-value]
        config = {"builtin": r.builtin, **fingerprint_config(r.dataset)}
        art = Artifact("data", stage_fingerprint("data", digest(r.builtin), config), "")
        art = Artifact("data", art.fingerprint, artifact_path(self.root, "data", art.fingerprint))
        step = self._begin(art, "data", config, [{"builtin": r.builtin}])
        if self._need(step, fs.exists(fs.join(art.path, "shards.json"))):
            self._timed(step, False, lambda: write_builtin(r.builtin, art.path, r.dataset))
        return art, fs.join(art.path, "train.shards.json"), fs.join(art.path, "val.shards.json")

    def _artifact(
        self,
        stage: str,
        config: object,
        upstream: list[Artifact],
        done_marker: str,
        fingerprinted: dict | None = None,
        legacy: dict | None = None,
    ) -> Artifact:
        """The artifact's folder from its fingerprint (one rule: `stage_fingerprint` over the output-determining
        config); a finished folder under the fingerprint kmim 0.1 computed (whole config) is reused as it is."""
        fp = stage_fingerprint(
            stage,
            digest([u.fingerprint for u in upstream]),
            config if fingerprinted is None else fingerprinted,
        )
        old = stage_fingerprint(
            stage, digest([u.legacy for u in upstream]), legacy_config(config) if legacy is None else legacy
        )
        art = Artifact(stage, fp, artifact_path(self.root, stage, fp), old)
        old_path = artifact_path(self.root, stage, old)
        if (
            old != fp
            and not fs.exists(fs.join(art.path, done_marker))
            and fs.exists(fs.join(old_path, done_marker))
        ):
            log.info(
                "%s: reusing %s, made by kmim 0.1 with the same output-determining config", stage, old_path
            )
            return Artifact(stage, fp, old_path, old)
        return art

    def _pipeline_stage(self, stage: str, config: object, upstream: list[Artifact], work) -> Artifact:  # noqa: ANN001
        art = self._artifact(stage, config, upstream, "manifest.json")
        step = self._begin(art, stage, asdict(config), [_ref(u) for u in upstream])  # type: ignore[call-overload]
        manifest = StageManifest.read_if_committed(art.path) if fs.exists(art.path) else None
        if self._need(step, manifest is not None):
            resumed = fs.exists(fs.join(art.path, STAGE_CLAIM))
            if self._ray is None:  # one Ray for all pipeline stages that run, none when all are reused
                from kmim.pipeline.ray_runtime import ray_session

                self._ray = contextlib.ExitStack()
                self._ray.enter_context(ray_session(self.address))
            self._timed(step, resumed, lambda: work(art.path))
        return art

    def train(self, run: str, tokens: Artifact | None, data: Artifact, train_spec: str) -> Artifact:
        probe = self.recipe.train_config(run, "<input>", "<output>")
        source = tokens if self._train_source_is_tokens(run, train_spec) else data
        assert source is not None, "token shards are made whenever a selected run reads them"
        data_train = fs.join(source.path, "shards.json") if source is tokens else train_spec
        config = probe.to_json()
        config["data"].pop("train")
        config.pop("output")
        legacy = legacy_config(probe)
        legacy["data"].pop("train")
        legacy.pop("output")
        art = self._artifact(
            "train", probe, [source], "train_summary.json", fingerprint_config(probe), legacy
        )
        step = self._begin(art, f"train/{run}", config, [_ref(source)])
        cfg = self.recipe.train_config(run, data_train, art.path)
        if self._need(step, fs.exists(fs.join(art.path, "train_summary.json"))):
            from kmim.trainer.checkpoint import list_checkpoints

            resumed = bool(list_checkpoints(art.path))  # a killed or requeued run continues where it stopped
            if self.nproc > 1 and not self.under_torchrun:
                self._timed(step, resumed, lambda: self._torchrun_train(run))
            else:
                from kmim.trainer.train import train

                self._timed(step, resumed, lambda: train(cfg, resume=resumed))
        return art

    def _torchrun_train(self, run: str) -> None:
        args = ["run", self.recipe.source, "--root", self.root, "--stages", "train", "--run", run]
        for s in self.sets:
            args += ["--set", s]
        if relaunch_ranks(self.nproc, args) != 0:
            raise ConfigError(f"train/{run}: torchrun with {self.nproc} processes failed (see its log above)")

    def evaluate(self, run: str, art: Artifact, train_spec: str, val_spec: str) -> None:
        from kmim.trainer.encoder import load_encoder
        from kmim.trainer.probe import evaluate

        encoder_fingerprint = None  # the weights' sha256, computed once and only when a report exists
        for protocol, cfg in self.recipe.evals.items():
            step = Step(
                "eval", f"eval/{run}/{protocol}", fs.join(art.path, f"eval-{protocol}.json"), art.fingerprint
            )
            self.report.steps.append(step)
            url = step.path
            done = False
            if fs.exists(url):
                old = fs.read_json(url)
                if (
                    old.get("config") == asdict(cfg)
                    and old.get("train") == train_spec
                    and old.get("val") == val_spec
                ):
                    encoder_fingerprint = encoder_fingerprint or load_encoder(art.path).fingerprint
                    # a report of other weights (a checkpoint replaced in the run folder) is stale
                    done = old.get("encoder_fingerprint") == encoder_fingerprint
            if self._need(step, done):
                r = self._timed(
                    step, False, lambda p=protocol, c=cfg: evaluate(p, art.path, train_spec, val_spec, c)
                )
                self._say(f"{step.name}: top-1 {100 * r['top1']:.2f} %")  # type: ignore[index]

    def compare(self, runs: list[Artifact]) -> None:
        from kmim.trainer.compare import compare

        out = artifact_path(
            self.root, "compare", digest([a.fingerprint for a in runs] + [sorted(self.recipe.evals)])
        )
        table, _ = compare([a.path for a in runs], out)
        self.report.compare_table = table
        self._say(table)
        self._say(f"compare: {out}")

    # --- the whole recipe -------------------------------------------------------------------------

    def run(self) -> RunReport:
        """The whole recipe, holding ROOT's lock: a second `kmim run` on the same root is refused, naming us."""
        from kmim.lock import output_lock

        lock = (
            output_lock(self.root, f"kmim run {self.recipe.source}")
            if self.is_main
            else contextlib.nullcontext()
        )
        with lock:
            return self._run()

    def _run(self) -> RunReport:
        data, train_spec, val_spec = self.data()
        # e.g. `--run mae` alone: pixel targets read the images, so no stage below is needed
        tokens = self._tokens(data, train_spec) if self._needs_tokens(train_spec) else None
        return self._train_and_eval(tokens, data, train_spec, val_spec)

    def _tokens(self, data: Artifact, train_spec: str) -> Artifact:
        """extract -> cluster -> tokenize, in one Ray session opened only if some stage has work to do."""
        r = self.recipe
        from kmim.pipeline.cluster import cluster
        from kmim.pipeline.extract import extract
        from kmim.pipeline.tokenize import tokenize

        extract_config = r.extract_for(open_dataset(train_spec).num_samples)
        if extract_config is not r.extract:
            log.info(
                "extract: %d patches per image: K = %d x %d points per centroid (cluster.points_per_centroid) "
                "over the train images",
                extract_config.patches_per_image,
                r.cluster.k,
                r.points_per_centroid,
            )
        try:
            feats = self._pipeline_stage(
                "extract",
                extract_config,
                [data],
                lambda out: extract(train_spec, out, extract_config, self.address),
            )
            codebook = self._pipeline_stage(
                "cluster", r.cluster, [feats], lambda out: cluster(feats.path, out, r.cluster, self.address)
            )
            return self._pipeline_stage(
                "tokenize",
                r.tokenize,
                [data, codebook],
                lambda out: tokenize(train_spec, out, codebook.path, r.tokenize, address=self.address),
            )
        finally:
            if self._ray is not None:
                self._ray.close()
                self._ray = None

    def _needs_tokens(self, train_spec: str) -> bool:
        return any(self._train_source_is_tokens(run, train_spec) for run in self.runs)

    def _train_source_is_tokens(self, run: str, train_spec: str) -> bool:
        target = self.recipe.train_config(run, "<input>", "<output>").model.target
        return target != "pixel" or not train_spec.endswith(".json")

    def _train_and_eval(
        self, tokens: Artifact | None, data: Artifact, train_spec: str, val_spec: str
    ) -> RunReport:
        trained = []
        if "train" in self.stages or "eval" in self.stages:
            for run in self.runs:
                trained.append(self.train(run, tokens, data, train_spec))
        if "eval" in self.stages and self.is_main and not self.under_torchrun:
            for run, art in zip(self.runs, trained):
                self.evaluate(run, art, train_spec, val_spec)
            self.compare(trained)
        if self.is_main:
            self._write_report()
        return self.report

    def _write_report(self) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        url = fs.join(self.root, "runs", f"{self.recipe.name}-{stamp}-{uuid.uuid4().hex[:8]}.json")
        fs.write_json_atomic(
            url,
            {
                "recipe": self.recipe.source,
                "root": self.root,
                "stages": self.stages,
                "runs": self.runs,
                "kmim_version": __version__,
                "recipe_config": self.recipe.raw,
                "steps": [asdict(s) for s in self.report.steps],
            },
        )


def run_recipe(
    recipe: PipelineRecipe,
    root: str,
    stages: list[str] | None = None,
    runs: list[str] | None = None,
    nproc: int = 1,
    address: str | None = None,
    sets: list[str] = (),
) -> RunReport:
    return Runner(recipe, root, list(stages or STAGES), runs, nproc, address, sets).run()
