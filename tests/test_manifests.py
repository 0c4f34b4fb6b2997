"""Cluster manifests, container images and the recipes they run, checked without a cluster, docker or network.

Every YAML under manifests/ parses; every kmim image reference carries the package version (`-cuda` on GPU
pods, `-cpu` elsewhere); rayVersion is the installed Ray; every `kmim ...` command line (KubeRay entrypoints,
Kubeflow container args, the Slurm script, torchrun / python -m launchers included) parses against the real
typer app and names a recipe that exists in the repo and loads; the Dockerfiles install from the lock as a
non-root user.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
import typer.main
import yaml

import kmim
from kmim.cli import app
from kmim.trainer.config import load_config

REPO = Path(__file__).resolve().parents[1]
MANIFESTS = REPO / "manifests"
DOCKERFILES = {"cpu": REPO / "docker" / "Dockerfile.cpu", "cuda": REPO / "docker" / "Dockerfile.cuda"}
SBATCH = sorted(MANIFESTS.rglob("*.sbatch"))
IMAGE_REPO = "ghcr.io/kmim-project/kmim"
IMAGE_REF = re.compile(re.escape(IMAGE_REPO) + r"(?P<ref>[:@][^\s\"'`,;)\]}]*)?")
IN_IMAGE = "/opt/kmim/"  # the repo's manifests/ lives there in the images
SECTIONS = ("data", "extract", "cluster", "tokenize", "train")
STAGES = ("data", "extract", "cluster", "tokenize", "train", "eval")
RUN_OPTIONS = ("--root", "--stages", "--run", "--nproc", "--address")  # `kmim run`, as specified (issue 8)
PAPER_GLOBAL_BATCH = 4096  # paper sec. 5.1: pretraining batch size
# Files that must hold at least one `kmim` command: a manifest that silently loses its command is a bug too.
COMMAND_FILES = ("kuberay/rayjob-pipeline.yaml", "kubeflow/pytorchjob-train.yaml", "slurm/train.sbatch")


def _version() -> str:
    return re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.MULTILINE).group(1)


VERSION = _version()
TAGS = {"cpu": f"{IMAGE_REPO}:{VERSION}-cpu", "cuda": f"{IMAGE_REPO}:{VERSION}-cuda"}


# --- reading the manifests ---------------------------------------------------------------------------------


def yaml_files() -> list[Path]:
    return sorted(p for p in MANIFESTS.rglob("*") if p.suffix in (".yaml", ".yml"))


@cache
def documents(path: Path) -> tuple:
    return tuple(d for d in yaml.safe_load_all(path.read_text()) if d is not None)


def walk(node):
    """Every mapping in a YAML document, depth first."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def strings(node):
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from strings(value)


def containers(doc):
    """(container, wants a GPU) for every container of every pod template in a document."""
    for node in walk(doc):
        if not isinstance(node.get("containers"), list):
            continue
        for c in node["containers"]:
            res = c.get("resources") or {}
            gpus = [float((res.get(kind) or {}).get("nvidia.com/gpu", 0)) for kind in ("limits", "requests")]
            yield c, max(gpus) > 0


def resolve_defaults(word: str) -> str:
    """`${VAR:-default}` -> default: the value a script uses when not told otherwise."""
    return re.sub(r"\$\{[A-Za-z0-9_]+:-([^}]*)\}", r"\1", word)


def simple_commands(script: str) -> list[list[str]]:
    """A shell script's simple commands: continuations joined, comments dropped, split at ; && || | & ()."""
    commands = []
    for line in script.replace("\\\n", " ").splitlines():
        lex = shlex.shlex(line, posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        lex.commenters = "#"
        words: list[str] = []
        for token in lex:
            if token and set(token) <= set("();<>|&"):
                commands.append(words)
                words = []
            else:
                words.append(resolve_defaults(token))
        commands.append(words)
    return [c for c in commands if c]


@cache
def torchrun_parser():
    from torch.distributed.run import get_args_parser

    return get_args_parser()


@dataclass(frozen=True)
class Invocation:
    source: str  # file it came from
    argv: tuple[str, ...]  # the arguments after `kmim`
    launcher: str  # "kmim", "python -m" or "torchrun"
    launcher_args: tuple[str, ...] = ()  # torchrun's own arguments


def find_kmim(words: list[str], source: str) -> Invocation | None:
    """The kmim invocation in one simple command: `kmim ...`, `.../bin/kmim ...`, `python -m kmim ...` or
    `torchrun [options] -m kmim ...` (torchrun's options are validated with its own parser)."""
    for i, word in enumerate(words):
        name = word.rsplit("/", 1)[-1]
        rest = words[i + 1 :]
        if name == "torchrun":
            # placeholders for the launcher's own $VARIABLES, so that int options parse
            try:
                ns = torchrun_parser().parse_args([re.sub(r"\$\{?\w+\}?", "1", w) for w in rest])
            except SystemExit:
                raise AssertionError(f"{source}: torchrun does not accept {shlex.join(rest)}") from None
            if not (ns.module and ns.training_script == "kmim"):
                return None
            tail = len(ns.training_script_args)
            split = len(rest) - tail
            return Invocation(source, tuple(rest[split:]), "torchrun", tuple(rest[:split]))
        if re.fullmatch(r"python(3(\.\d+)?)?", name) and rest[:2] == ["-m", "kmim"]:
            return Invocation(source, tuple(rest[2:]), "python -m")
        called = word == "kmim" or word.endswith("/bin/kmim")
        if called and (i == 0 or words[i - 1] not in ("-m", "--module")):
            return Invocation(source, tuple(rest), "kmim")
    return None


@cache
def invocations() -> tuple[Invocation, ...]:
    found = []
    for path in yaml_files():
        source = str(path.relative_to(MANIFESTS))
        for doc in documents(path):
            for text in strings(doc):  # entrypoints and `bash -c` scripts
                if re.search(r"\s", text.strip()):
                    found += [inv for c in simple_commands(text) if (inv := find_kmim(c, source))]
            for c, _ in containers(doc):  # exec-form command + args
                argv = [str(a) for a in (c.get("command") or []) + (c.get("args") or [])]
                if argv and (inv := find_kmim(argv, source)):
                    found.append(inv)
    for path in SBATCH:
        source = str(path.relative_to(MANIFESTS))
        found += [inv for c in simple_commands(path.read_text()) if (inv := find_kmim(c, source))]
    return tuple(found)


def in_repo(arg: str) -> str:
    return str(REPO / arg[len(IN_IMAGE) :]) if arg.startswith(IN_IMAGE) else arg


def parse_run(argv: tuple[str, ...]) -> tuple[str, dict[str, str]]:
    """`run RECIPE [--option value | --option=value ...]`, against the specified options of `kmim run`."""
    assert argv[0] == "run"
    positional, options = [], {}
    args = list(argv[1:])
    while args:
        arg = args.pop(0)
        if arg.startswith("-"):
            key, eq, value = arg.partition("=")
            assert key in RUN_OPTIONS, f"kmim run has no option {key} (options: {', '.join(RUN_OPTIONS)})"
            assert eq or args, f"kmim run {key} needs a value"
            options[key] = value if eq else args.pop(0)
        else:
            positional.append(arg)
    assert len(positional) == 1, f"kmim run takes one RECIPE, got {positional}"
    return positional[0], options


def check_cli(argv: list[str]) -> list[str]:
    """Parse argv exactly as the `kmim` command would (options, arguments, types), without running anything;
    returns the command path. An unknown command or option raises the CLI's usage error. (Duck-typed: recent
    typer vendors its own click, whose groups and errors are not click's classes.)"""
    cmd = typer.main.get_command(app)
    ctx, path, args = None, ["kmim"], list(argv)
    while True:
        ctx = cmd.make_context(path[-1], args, parent=ctx)
        if getattr(cmd, "commands", None) is None:
            return path
        protected = getattr(ctx, "_protected_args", None)  # click >= 8.2; `protected_args` before
        rest = [*(ctx.protected_args if protected is None else protected), *ctx.args]
        assert rest, f"`{' '.join(path)}` needs a subcommand"
        name, cmd, args = cmd.resolve_command(ctx, rest)
        path.append(name)


def run_registered() -> bool:
    return "run" in (getattr(typer.main.get_command(app), "commands", None) or {})


def recipe_of(inv: Invocation) -> Path:
    recipe, _ = parse_run(inv.argv)
    assert recipe.startswith(IN_IMAGE) or not recipe.startswith("/"), f"{inv.source}: {recipe} not in image"
    return Path(in_repo(recipe)) if recipe.startswith("/") else REPO / recipe


def run_invocations() -> list[Invocation]:
    return [inv for inv in invocations() if inv.argv[:1] == ("run",)]


# --- YAML, images, Ray -------------------------------------------------------------------------------------


def test_version_is_the_package_version():
    assert kmim.__version__ == VERSION


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(MANIFESTS)))
def test_yaml_parses(path):
    assert documents(path), f"{path}: no YAML document"


def test_every_image_reference_carries_the_version():
    texts = {p: p.read_text() for p in MANIFESTS.rglob("*") if p.is_file()}
    texts.update({p: p.read_text() for p in DOCKERFILES.values()})
    refs = [(p, m.group(0)) for p, text in texts.items() for m in IMAGE_REF.finditer(text)]
    assert refs
    bad = [f"{p.relative_to(REPO)}: {ref}" for p, ref in refs if ref not in TAGS.values()]
    assert not bad, f"image references must be one of {sorted(TAGS.values())}: {bad}"
    for path in yaml_files():
        for doc in documents(path):
            for node in walk(doc):
                if isinstance(node.get("image"), str):
                    assert node["image"] in TAGS.values(), f"{path.relative_to(REPO)}: image {node['image']}"


def test_build_sh_tags_the_images_the_manifests_run():
    """docker/build.sh builds and tags exactly the two references the manifests use."""
    script = (REPO / "docker" / "build.sh").read_text()
    assert re.search(r"^REPO=" + re.escape(IMAGE_REPO) + "$", script, re.M), "build.sh's REPO"
    assert 'tag="$REPO:$VERSION-$kind"' in script and 'ONLY="cpu cuda"' in script
    assert "pyproject.toml" in re.search(r"^VERSION=.*$", script, re.M).group(0)  # the version the tests use
    built = {kind: f"{IMAGE_REPO}:{VERSION}-{kind}" for kind in ("cpu", "cuda")}
    assert built == TAGS
    for kind in built:
        assert "docker/Dockerfile.$kind" in script and DOCKERFILES[kind].exists()


def test_dockerfiles_share_base_and_python_source():
    """Both images start from the same base and take Python from the same source (build.sh passes both)."""

    def args(path):
        return dict(re.findall(r"^ARG (\w+)=(\S*)$", path.read_text(), re.MULTILINE))

    cpu, cuda = args(DOCKERFILES["cpu"]), args(DOCKERFILES["cuda"])
    for name in ("BASE_IMAGE", "PYTHON_SOURCE"):
        assert cpu.get(name) and cpu[name] == cuda.get(name), name
    for path in DOCKERFILES.values():
        assert "FROM ${BASE_IMAGE}" in path.read_text()


def test_gpu_pods_use_the_cuda_image_and_cpu_pods_the_cpu_image():
    seen = set()
    for path in yaml_files():
        for doc in documents(path):
            for c, gpu in containers(doc):
                kind = "cuda" if gpu else "cpu"
                seen.add(kind)
                assert c.get("image") == TAGS[kind], (
                    f"{path.relative_to(REPO)}: container {c.get('name')} "
                    f"({'GPU' if gpu else 'CPU'}) runs {c.get('image')}"
                )
    assert seen == {"cpu", "cuda"}
    for path in SBATCH:  # Slurm trains on GPUs
        assert {m.group(0) for m in IMAGE_REF.finditer(path.read_text())} <= {TAGS["cuda"]}


def test_ray_version_is_the_installed_ray():
    import ray

    versions = {}
    for path in yaml_files():
        for doc in documents(path):
            for node in walk(doc):
                if "rayVersion" in node:
                    versions[path.relative_to(MANIFESTS)] = str(node["rayVersion"])
    assert {str(p) for p in versions} >= {"kuberay/raycluster.yaml", "kuberay/rayjob-pipeline.yaml"}
    assert set(versions.values()) == {ray.__version__}, versions


def test_ray_auth_mode_is_the_same_on_every_ray_container():
    """Token auth must be on for every Ray container (head, workers, submitter) or for none of them."""
    for path in yaml_files():
        for doc in documents(path):
            if doc.get("kind") in ("RayCluster", "RayJob"):
                modes = {
                    next((e.get("value") for e in c.get("env") or [] if e["name"] == "RAY_AUTH_MODE"), None)
                    for c, _ in containers(doc)
                }
                assert len(modes) == 1, f"{path.relative_to(REPO)}: RAY_AUTH_MODE differs between containers"


# --- kmim commands -----------------------------------------------------------------------------------------


def test_every_command_file_holds_a_kmim_command():
    sources = {inv.source for inv in invocations()}
    for name in COMMAND_FILES:
        assert name in sources, f"manifests/{name}: no `kmim ...` command found"


def test_kmim_commands_parse_against_the_cli():
    for inv in invocations():
        assert not any("$" in a for a in inv.argv), f"{inv.source}: unresolved variable in kmim {inv.argv}"
        argv = [in_repo(a) for a in inv.argv]
        if argv[0] == "run" and not run_registered():
            parse_run(inv.argv)  # not in the app yet: its specified options
            continue
        try:
            check_cli(argv)
        except Exception as e:  # the CLI's usage errors (click's or typer's vendored click)
            message = e.format_message() if hasattr(e, "format_message") else repr(e)
            pytest.fail(f"{inv.source}: kmim {shlex.join(inv.argv)}: {message}")
        if argv[0] == "run":
            parse_run(inv.argv)


def test_torchrun_launches_only_training_of_one_variant():
    torchruns = [inv for inv in invocations() if inv.launcher == "torchrun"]
    assert {inv.source for inv in torchruns} >= {"kubeflow/pytorchjob-train.yaml", "slurm/train.sbatch"}
    for inv in torchruns:
        _, options = parse_run(inv.argv)
        assert options.get("--stages") == "train" and options.get("--run"), f"{inv.source}: {inv.argv}"
        assert "--nproc" not in options, f"{inv.source}: torchrun already starts the processes"


def test_run_commands_name_recipes_that_load():
    for inv in run_invocations():
        path = recipe_of(inv)
        _, options = parse_run(inv.argv)
        assert path.is_file(), f"{inv.source}: recipe {path.relative_to(REPO)} does not exist"
        raw = yaml.safe_load(path.read_text())
        assert isinstance(raw, dict)
        missing = [s for s in SECTIONS if not isinstance(raw.get(s), dict)]
        assert not missing, f"{path.name}: no section(s) {missing}"
        stages = options.get("--stages", ",".join(STAGES)).split(",")
        assert stages and set(stages) <= set(STAGES), f"{inv.source}: --stages {stages}"
        assert stages == [s for s in STAGES if s in stages], f"{inv.source}: stages out of order: {stages}"
        runs = raw.get("runs") or {"": {}}
        if "--run" in options:
            assert options["--run"] in runs, f"{inv.source}: --run {options['--run']} not in {sorted(runs)}"
        root = options.get("--root", "")
        assert root.startswith(("s3://", "gs://")), f"{inv.source}: --root {root!r} is not shared storage"
        for name, overrides in runs.items():
            # the `train:` section, with each variant's dotted overrides, is a valid TrainConfig
            cfg = load_config(str(path), [f"{k}={json.dumps(v)}" for k, v in (overrides or {}).items()])
            assert cfg.model.image_size == raw["extract"]["image_size"], name
            assert cfg.model.patch_size == raw["extract"]["patch_size"], name


def test_pipeline_sections_build_their_stage_configs():
    from kmim.pipeline.cluster import ClusterConfig
    from kmim.pipeline.extract import ExtractConfig
    from kmim.pipeline.tokenize import TokenizeConfig
    from kmim.trainer.probe import KnnConfig, LinearConfig

    for path in {recipe_of(inv) for inv in run_invocations()}:
        raw = yaml.safe_load(path.read_text())
        ExtractConfig(**raw["extract"])
        ClusterConfig(**raw["cluster"])
        TokenizeConfig(**raw["tokenize"])
        protocols = {"knn": KnnConfig, "linear": LinearConfig}
        for protocol, settings in (raw.get("eval") or {}).items():
            assert protocol in protocols, f"{path.name}: eval.{protocol}"
            protocols[protocol](**(settings or {}))


def test_one_root_per_recipe():
    """Training finds the tokenize output under ROOT: all commands running one recipe use the same root."""
    roots: dict[Path, set[str]] = {}
    for inv in run_invocations():
        roots.setdefault(recipe_of(inv), set()).add(parse_run(inv.argv)[1].get("--root"))
    assert roots and all(len(r) == 1 for r in roots.values()), roots


def test_gpu_stages_get_gpu_workers():
    """A Ray job whose recipe asks for GPUs in a stage it runs needs a GPU worker group on the CUDA image."""
    for path in yaml_files():
        for doc in documents(path):
            if doc.get("kind") != "RayJob":
                continue
            entrypoint = doc["spec"]["entrypoint"]
            inv = next(i for c in simple_commands(entrypoint) if (i := find_kmim(c, str(path))))
            _, options = parse_run(inv.argv)
            raw = yaml.safe_load(recipe_of(inv).read_text())
            stages = options["--stages"].split(",")
            assert "train" not in stages, "training runs under torchrun (Kubeflow, Slurm), not in the Ray job"
            wants_gpu = any(float((raw.get(s) or {}).get("gpus_per_worker", 0)) > 0 for s in stages)
            groups = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"]
            gpu_groups = [g for g in groups if any(gpu for _, gpu in containers(g["template"]))]
            assert gpu_groups or not wants_gpu, f"{path.name}: the recipe wants GPUs, no GPU worker group"
            for g in gpu_groups:
                assert all(c["image"] == TAGS["cuda"] for c, _ in containers(g["template"]))


def test_global_batch_is_the_papers():
    """Kubeflow and Slurm launch ranks x train.data.batch_size = 4096 (paper sec. 5.1)."""
    for path in yaml_files():
        for doc in documents(path):
            if doc.get("kind") != "PyTorchJob":
                continue
            spec = doc["spec"]
            nproc = int(spec["nprocPerNode"])
            replicas = spec["pytorchReplicaSpecs"]
            for rs in replicas.values():
                for c, _ in containers(rs["template"]):
                    assert int(c["resources"]["limits"]["nvidia.com/gpu"]) == nproc, "one process per GPU"
                    assert c["name"] == "pytorch", "the operator configures the container named pytorch"
            ranks = nproc * sum(int(rs["replicas"]) for rs in replicas.values())
            inv = next(i for i in invocations() if i.source == str(path.relative_to(MANIFESTS)))
            cfg = load_config(str(recipe_of(inv)))
            assert ranks * cfg.data.batch_size == PAPER_GLOBAL_BATCH, (path.name, ranks, cfg.data.batch_size)
    for path in SBATCH:
        text = path.read_text()
        if "#SBATCH --gpus-per-node" not in text:
            continue  # train-cpu.sbatch: the CPU variant tests/test_slurm.py submits
        nodes = int(re.search(r"^#SBATCH --nodes=(\d+)$", text, re.MULTILINE).group(1))
        gpus = int(re.search(r"^#SBATCH --gpus-per-node=(\d+)$", text, re.MULTILINE).group(1))
        inv = next(i for i in invocations() if i.source == str(path.relative_to(MANIFESTS)))
        assert "--rdzv-backend=c10d" in inv.launcher_args
        assert nodes * gpus * load_config(str(recipe_of(inv))).data.batch_size == PAPER_GLOBAL_BATCH


def test_pipeline_recipe_trains_as_the_standalone_recipe():
    """imagenet100-kmim-pixel-k50.pipeline.yaml's `train:` is imagenet100-vits-kmim-pixel-k50.yaml (less the
    paths `kmim run` sets); its K-means follows the paper (K = 50, k-means++, 100 epochs on ImageNet-100)."""
    recipes = MANIFESTS / "recipes"
    pipeline = yaml.safe_load((recipes / "imagenet100-kmim-pixel-k50.pipeline.yaml").read_text())
    standalone = yaml.safe_load((recipes / "imagenet100-vits-kmim-pixel-k50.yaml").read_text())
    for key in ("model", "optim", "checkpoint", "seed"):
        assert pipeline["train"][key] == standalone[key], key
    assert pipeline["train"]["data"] == {k: v for k, v in standalone["data"].items() if k != "train"}
    kmeans = {k: pipeline["cluster"][k] for k in ("k", "epochs", "init")}
    assert kmeans == {"k": 50, "epochs": 100, "init": "kmeans++"}
    assert pipeline["extract"]["extractor"] == "pixel"
    assert set(pipeline["runs"]) == {"kmim-pixel-k50", "mae"} and set(pipeline["eval"]) == {"knn", "linear"}


# --- Dockerfiles -------------------------------------------------------------------------------------------


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuations joined and comment lines dropped."""
    lines = [ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\s*\n", " ", "\n".join(lines))
    found = re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", joined, re.MULTILINE)
    return [(m.group(1).upper(), m.group(2).strip()) for m in found]


def uv_syncs(path: Path) -> list[str]:
    return [
        part
        for op, args in instructions(path)
        if op == "RUN"
        for part in re.split(r"&&|;", args)
        if re.search(r"\buv sync\b", part)
    ]


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_dockerfile_installs_the_lock_as_non_root(kind):
    path = DOCKERFILES[kind]
    ins = instructions(path)
    copies = [args.split() for op, args in ins if op == "COPY" and not args.startswith("--from")]
    assert any({"pyproject.toml", "uv.lock"} <= set(c[:-1]) for c in copies), "COPY pyproject.toml uv.lock"
    assert any(c[0] == "manifests" for c in copies), "COPY manifests (the recipes the manifests run)"
    syncs = uv_syncs(path)
    assert syncs and all("--locked" in s and "--no-dev" in s for s in syncs), syncs
    assert any("--no-editable" in s for s in syncs), "install the project itself, not a link to sources"
    if any("s3://" in p.read_text() for p in MANIFESTS.rglob("*") if p.is_file()):
        assert all("--extra s3" in s for s in syncs), "the manifests use s3:// URLs: the image needs s3fs"
    users = [args for op, args in ins if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), f"USER {users[-1:]}"
    entrypoints = [args for op, args in ins if op == "ENTRYPOINT"]
    assert entrypoints and json.loads(entrypoints[-1]) == ["kmim"]
    text = path.read_text()
    # KubeRay starts Ray with `bash -lc` (login shell: Debian's /etc/profile resets PATH), probes with wget
    assert "wget" in text and "/etc/profile.d/" in text


def test_dockerfiles_share_python_and_uv():
    """Ray refuses nodes whose Python (to the patch level) differs from the head's: both pin the same."""

    def args(path):
        return dict(re.findall(r"^ARG (\w+)=(\S+)$", path.read_text(), re.MULTILINE))

    cpu, cuda = args(DOCKERFILES["cpu"]), args(DOCKERFILES["cuda"])
    for name in ("PYTHON_VERSION", "UV_VERSION"):
        assert cpu.get(name) and cpu.get(name) == cuda.get(name), name
    assert cpu["PYTHON_VERSION"].startswith("3.11."), "the lock's Python 3.11 resolution (torch, numpy)"


def test_cuda_dockerfile_swaps_faiss_cpu_for_faiss_gpu():
    path = DOCKERFILES["cuda"]
    syncs = uv_syncs(path)
    assert syncs and all("--extra gpu" in s for s in syncs), "the gpu extra (faiss-gpu-cu12, locked)"
    text = re.sub(r"\\\s*\n", " ", path.read_text())
    never_installed = all(re.search(r"--no-install-package[ =]faiss-cpu\b", s) for s in syncs)
    last_sync = max(m.end() for m in re.finditer(r"\buv sync\b", text))
    uninstalled = re.search(r"\buv pip uninstall\b[^\n]*\bfaiss-cpu\b", text[last_sync:])
    assert never_installed or uninstalled, "faiss-cpu and faiss-gpu-cu12 both ship `faiss`: remove faiss-cpu"
    lock = (REPO / "uv.lock").read_text()
    assert re.search(r'^name = "faiss-gpu-cu12"$', lock, re.MULTILINE), "uv.lock has no faiss-gpu-cu12"
    # no CUDA base image: the wheels bring the CUDA libraries; the container toolkit maps the driver when
    # these two are set (what nvidia/cuda's base images set)
    assert "NVIDIA_VISIBLE_DEVICES=all" in text and "NVIDIA_DRIVER_CAPABILITIES=compute,utility" in text


def test_dockerignore_keeps_the_context_small_and_complete():
    ignored = {
        ln.strip().rstrip("/")
        for ln in (REPO / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    }
    assert {".venv", ".git", "out", "runs"} <= ignored
    copied = {
        src
        for path in DOCKERFILES.values()
        for op, args in instructions(path)
        if op == "COPY" and not args.startswith("--from")
        for src in args.split()[:-1]
    }
    assert copied and not copied & ignored, copied & ignored
