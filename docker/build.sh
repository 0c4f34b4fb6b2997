#!/usr/bin/env bash
# Build kmim's two images and smoke-test the CPU one, with podman (docker where a daemon runs).
#
#   docker/build.sh [--only cpu|cuda] [--no-smoke] [--base IMAGE] [--python managed|system] [--work DIR]
#
# 1. Base: --base, else `debian:bookworm-slim` when it can be pulled, else a Debian bookworm minbase made with
#    debootstrap from the machine's own Debian mirror and imported as localhost/kmim-debian:bookworm (reused).
# 2. Python: `managed` (uv's CPython 3.11.18, downloaded from GitHub) when GitHub answers, else `system`
#    (Debian's python3); both images get the same one (Ray wants the same Python on every node).
# 3. Images: ghcr.io/kmim-project/kmim:<version>-cpu and -cuda, <version> from pyproject.toml, the tags the
#    manifests use (tests/test_manifests.py checks it).
# 4. Smoke test of the CPU image: `kmim --version`; the digits recipe's data, extract, cluster and tokenize
#    stages in the container (host network, output on a mounted folder); `kmim train` for a few steps on the
#    tokens. The CUDA image: import torch and faiss in it (and report CUDA if a GPU is mapped).
# 5. Report: build seconds, image sizes and what dominates them, in WORK/build-report.json.
#
# Podman runs with a private store under WORK (--root/--runroot), runc, host networking and explicit ulimits:
# the traps of ../shared/INFRA.md. A proxy's CA bundle (SSL_CERT_FILE) is mounted for the build only.
set -euo pipefail
cd "$(dirname "$0")/.."

ONLY="cpu cuda"
SMOKE=1
BASE=""
PYTHON_SOURCE=""
WORK="${KMIM_BUILD_DIR:-$PWD/build/containers}"
while [ $# -gt 0 ]; do
  case "$1" in
    --only) ONLY="$2"; shift 2 ;;
    --no-smoke) SMOKE=0; shift ;;
    --base) BASE="$2"; shift 2 ;;
    --python) PYTHON_SOURCE="$2"; shift 2 ;;
    --work) WORK="$2"; shift 2 ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "build.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml | head -n 1)
REPO=ghcr.io/kmim-project/kmim
REPORT="$WORK/build-report.json"
log() { printf '[build.sh %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# --- the engine ------------------------------------------------------------------------------------------------
ENGINE=()
BUILD_EXTRA=()
if command -v podman >/dev/null; then
  mkdir -p "$WORK/storage" "$WORK/run"
  cat > "$WORK/containers.conf" <<'EOF'
[containers]
default_ulimits=["nofile=20000:20000","nproc=32768:32768"]
netns="host"
[engine]
runtime="runc"
EOF
  export CONTAINERS_CONF="$WORK/containers.conf"
  ENGINE=(podman --root "$WORK/storage" --runroot "$WORK/run")
  BUILD_EXTRA=(--network host --ulimit nofile=20000:20000 --ulimit nproc=32768:32768)
  CA="${SSL_CERT_FILE:-}"
  if [ -n "$CA" ] && [ -f "$CA" ]; then  # a proxy's CA for the build's downloads; a mount, not a layer
    BUILD_EXTRA+=(-v "$CA:/run/kmim-build-ca.crt:ro" --build-arg BUILD_CA_BUNDLE=/run/kmim-build-ca.crt)
  fi
elif command -v docker >/dev/null && docker info >/dev/null 2>&1; then
  ENGINE=(docker)
  BUILD_EXTRA=(--network host)
else
  echo "build.sh: neither podman nor a running docker daemon (apt-get install podman buildah runc debootstrap)" >&2
  exit 1
fi
RUN_FLAGS=(--rm --network host)
log "engine: ${ENGINE[*]}"

# --- the base image --------------------------------------------------------------------------------------------
base_seconds=0
if [ -z "$BASE" ]; then
  t0=$(now)
  if timeout 120 "${ENGINE[@]}" pull -q docker.io/library/debian:bookworm-slim >/dev/null 2>&1; then
    BASE=docker.io/library/debian:bookworm-slim
    log "base: pulled $BASE"
  else
    BASE=localhost/kmim-debian:bookworm
    if "${ENGINE[@]}" image exists "$BASE" 2>/dev/null; then
      log "base: no registry answered; reusing $BASE"
    else
      command -v debootstrap >/dev/null || { echo "build.sh: no base image could be pulled and debootstrap is missing (apt-get install debootstrap)" >&2; exit 1; }
      MIRROR=$(sed -n 's/^URIs: *\(http[^ ]*debian\)$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n 1)
      [ -n "$MIRROR" ] || MIRROR=$(awk '$1 == "deb" && $2 ~ /debian\/?$/ { print $2; exit }' /etc/apt/sources.list 2>/dev/null || true)
      MIRROR=${MIRROR:-http://deb.debian.org/debian}
      ROOTFS="$WORK/rootfs"
      rm -rf "$ROOTFS"
      log "base: no registry answered; debootstrap bookworm minbase from $MIRROR"
      debootstrap --variant=minbase bookworm "$ROOTFS" "$MIRROR" > "$WORK/debootstrap.log" 2>&1 \
        || { tail -n 20 "$WORK/debootstrap.log" >&2; exit 1; }
      rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*
      tar -C "$ROOTFS" -c . | "${ENGINE[@]}" import -q --change 'CMD ["/bin/bash"]' - "$BASE" >/dev/null
      rm -rf "$ROOTFS"
    fi
  fi
  base_seconds=$(since "$t0")
fi

if [ -z "$PYTHON_SOURCE" ]; then
  if timeout 15 curl -sfI https://github.com >/dev/null 2>&1; then PYTHON_SOURCE=managed; else PYTHON_SOURCE=system; fi
  log "python: $PYTHON_SOURCE ($( [ "$PYTHON_SOURCE" = managed ] && echo "uv's CPython from GitHub" || echo "GitHub out of reach: the base's python3"))"
fi

# --- build -----------------------------------------------------------------------------------------------------
declare -A SECONDS_OF SIZE_OF
for kind in $ONLY; do
  tag="$REPO:$VERSION-$kind"
  t0=$(now)
  log "building $tag (docker/Dockerfile.$kind, base $BASE)"
  "${ENGINE[@]}" build "${BUILD_EXTRA[@]}" -f "docker/Dockerfile.$kind" \
    --build-arg "BASE_IMAGE=$BASE" --build-arg "PYTHON_SOURCE=$PYTHON_SOURCE" -t "$tag" . \
    > "$WORK/build-$kind.log" 2>&1 || { tail -n 30 "$WORK/build-$kind.log" >&2; exit 1; }
  SECONDS_OF[$kind]=$(since "$t0")
  SIZE_OF[$kind]=$("${ENGINE[@]}" image inspect --format '{{.Size}}' "$tag")
  log "built $tag in ${SECONDS_OF[$kind]} s, $(awk -v b="${SIZE_OF[$kind]}" 'BEGIN { printf "%.2f GB", b / 1e9 }')"
done

# --- what dominates each image ---------------------------------------------------------------------------------
largest() {  # the ten largest installed packages of an image, "MB name" per line
  "${ENGINE[@]}" run "${RUN_FLAGS[@]}" --entrypoint sh "$1" -c \
    'du -sm /opt/kmim/.venv/lib/python3*/site-packages/* /opt/python /usr/lib/python3* 2>/dev/null | sort -rn | head -n 10'
}
declare -A LARGEST
for kind in $ONLY; do
  LARGEST[$kind]=$(largest "$REPO:$VERSION-$kind" | awk '{ n = split($2, p, "/"); printf "%s%s MB %s", (NR > 1 ? "; " : ""), $1, p[n] }')
  log "$kind image, largest parts: ${LARGEST[$kind]}"
done

# --- smoke tests -----------------------------------------------------------------------------------------------
smoke_cpu=skipped
smoke_cuda=skipped
smoke_seconds=0
if [ "$SMOKE" = 1 ]; then
  t0=$(now)
  if [[ " $ONLY " == *" cpu "* ]]; then
    tag="$REPO:$VERSION-cpu"
    out="$WORK/smoke"
    rm -rf "$out" && mkdir -p "$out" && chmod 0777 "$out"  # the image runs as uid 1000
    run=("${ENGINE[@]}" run "${RUN_FLAGS[@]}" --shm-size=1g -v "$out:/out" "$tag")
    log "smoke: kmim --version"
    "${run[@]}" --version
    log "smoke: the digits recipe's data, extract, cluster, tokenize in the container (output in $out)"
    "${run[@]}" run /opt/kmim/manifests/recipes/digits.yaml --root /out/root --stages data,extract,cluster,tokenize
    tokens=$(cd "$out/root" && ls -d tokenize/*/ | head -n 1)
    log "smoke: kmim train for a few steps on /out/root/${tokens}train.shards.json"
    "${run[@]}" train --config /opt/kmim/manifests/recipes/digits-tiny.yaml \
      --data "/out/root/${tokens}train.shards.json" --output /out/train \
      optim.epochs=1 data.samples_per_epoch=256 data.loader_workers=0 log_every=1
    test -f "$out/train/train_summary.json"
    smoke_cpu=passed
  fi
  if [[ " $ONLY " == *" cuda "* ]]; then
    log "smoke: torch and faiss in the CUDA image"
    "${ENGINE[@]}" run "${RUN_FLAGS[@]}" --entrypoint python "$REPO:$VERSION-cuda" -c \
      "import faiss, torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'available', torch.cuda.is_available(), 'faiss', faiss.__version__, 'GPUs', faiss.get_num_gpus())"
    smoke_cuda=passed
  fi
  smoke_seconds=$(since "$t0")
fi

# --- report ----------------------------------------------------------------------------------------------------
{
  printf '{\n  "version": "%s",\n  "engine": "%s",\n  "base": "%s",\n  "base_seconds": %s,\n  "python_source": "%s",\n' \
    "$VERSION" "${ENGINE[0]}" "$BASE" "$base_seconds" "$PYTHON_SOURCE"
  printf '  "images": {'
  sep=""
  for kind in $ONLY; do
    printf '%s\n    "%s": {"tag": "%s", "build_seconds": %s, "size_bytes": %s, "largest": "%s"}' \
      "$sep" "$kind" "$REPO:$VERSION-$kind" "${SECONDS_OF[$kind]}" "${SIZE_OF[$kind]}" "${LARGEST[$kind]}"
    sep=","
  done
  printf '\n  },\n  "smoke": {"cpu": "%s", "cuda": "%s", "seconds": %s}\n}\n' "$smoke_cpu" "$smoke_cuda" "$smoke_seconds"
} > "$REPORT"
log "report: $REPORT"
cat "$REPORT"
