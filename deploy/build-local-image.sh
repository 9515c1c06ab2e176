#!/usr/bin/env bash
# Build the CPU image (Dockerfile) with podman where no image registry is reachable, and check it:
# debootstrap a minimal Debian bookworm root filesystem with Debian's Python 3.11 (what
# python:3.11-slim-bookworm would give: `python`, `python -m venv`, CA certificates), import it as
# a local base image, build Dockerfile on it, run the container, wait for its HEALTHCHECK, rank
# through /rerank and /v1/rerank, stop it with SIGTERM and check the drain exits 0. Prints the
# time each step took and the image's size. Not part of `make test` (root, minutes, the network).
#
#   sudo deploy/build-local-image.sh [--rebuild-base] [--clean]
#
#   --rebuild-base   debootstrap the base again even if BASE_IMAGE exists (otherwise reused)
#   --clean          build without keeping a layer cache, and remove IMAGE and BASE_IMAGE at the
#                    end (the container is always removed)
#
# Environment: IMAGE (default crossrank:0.1.0), BASE_IMAGE (localhost/crossrank-base:bookworm),
# CROSSRANK_PORT (host port published to the container's 8080; default 8080), DEBIAN_MIRROR
# (default http://deb.debian.org/debian), CA_BUNDLE (default /etc/ssl/certs/ca-certificates.crt).
# Needs root, apt's `podman runc debootstrap`, curl and python3 on the host, and network access
# to the Debian mirror and PyPI.
#
# The podman flags, and why each (found on a Debian 12 host with podman 4.3, cgroup v1 with a
# cgroup2 mount that has a controller enabled, and no CAP_SYS_RESOURCE):
#   --runtime runc        crun (podman's default) refuses that hybrid cgroup layout: "cgroups in
#                         hybrid mode not supported, drop all controllers from cgroupv2"; runc
#                         runs there (and anywhere else podman does).
#   --ulimit nofile/nproc (run only) podman as root asks the runtime to raise both to 1048576,
#                         and raising a hard limit needs CAP_SYS_RESOURCE: "setrlimit RLIMIT_NOFILE:
#                         Operation not permitted". nofile is this shell's hard limit; nproc is
#                         4096, plenty for one uvicorn process and its threads, and under the
#                         32768 that podman sets for itself.
#   --format docker       (build) the OCI image format has no HEALTHCHECK; podman drops it.
#   --volume CA_BUNDLE    (build) the RUN steps trust the CAs this host trusts (pip reaches PyPI
#                         through a TLS-intercepting proxy on some networks); the mount is not
#                         part of any layer, so the image keeps Debian's CA list.
# Not needed: --storage-driver vfs (overlay works), --network host (the default bridge network
# reaches PyPI and -p publishes the port), --cgroup-manager cgroupfs and --events-backend file
# (podman chooses them itself without systemd), --isolation chroot.
# Without systemd podman cannot schedule the HEALTHCHECK (it logs "unable to get systemd
# connection to add healthchecks"), so this script runs it itself with `podman healthcheck run`,
# which runs the image's HEALTHCHECK command and records the container's health.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
die() {
  echo "build-local-image: $*" >&2
  exit 2
}

rebuild_base=0
clean=0
while (($#)); do
  case "$1" in
  --rebuild-base) rebuild_base=1 ;;
  --clean) clean=1 ;;
  -h | --help)
    usage
    exit 0
    ;;
  *) die "unknown argument: $1 (see --help)" ;;
  esac
  shift
done

IMAGE=${IMAGE:-crossrank:0.1.0}
BASE_IMAGE=${BASE_IMAGE:-localhost/crossrank-base:bookworm}
PORT=${CROSSRANK_PORT:-8080}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
CONTAINER=crossrank-local-check
# The drain answers admitted requests within their deadline (60 s by default): README "Deploy".
STOP_TIMEOUT=75

((EUID == 0)) || die "run as root (debootstrap and rootful podman)"
for tool in podman runc debootstrap curl python3; do
  command -v "$tool" >/dev/null || die "$tool not found (apt-get install -y podman runc debootstrap curl)"
done
repo=$(cd "$(dirname "$0")/.." && pwd)
[[ -f $CA_BUNDLE ]] || die "CA_BUNDLE $CA_BUNDLE does not exist"

pm() { podman --runtime runc "$@"; }

work=$(mktemp -d "${TMPDIR:-/tmp}/crossrank-image.XXXXXX")
cleanup() {
  pm rm -f -t 0 "$CONTAINER" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

declare -a timings=()
step_start=0
step() {
  echo
  echo "== $*"
  step_start=$(date +%s.%N)
}
step_done() {
  local took
  took=$(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" \
    "$step_start" "$(date +%s.%N)")
  timings+=("$(printf '%-28s %8s s' "$1" "$took")")
  echo "-- $1: ${took} s"
}
mib() { python3 -c "import sys; print(f'{int(sys.argv[1]) / 2**20:.0f} MiB')" "$1"; }

if ((rebuild_base)) || ! pm image exists "$BASE_IMAGE"; then
  step "debootstrap bookworm (minbase, python3, python3-venv, python-is-python3) from $DEBIAN_MIRROR"
  rootfs=$work/rootfs
  debootstrap --variant=minbase \
    --include=python3,python3-venv,python-is-python3,ca-certificates \
    bookworm "$rootfs" "$DEBIAN_MIRROR" >"$work/debootstrap.log" 2>&1 ||
    {
      tail -20 "$work/debootstrap.log" >&2
      die "debootstrap failed"
    }
  # As Debian's own images: no package cache or lists, and not this host's name or resolver
  # (podman mounts the container's own).
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
    "$rootfs"/var/log/bootstrap.log
  : >"$rootfs/etc/resolv.conf"
  : >"$rootfs/etc/hostname"
  step_done "debootstrap"

  step "import $BASE_IMAGE"
  # python:3.11-slim-bookworm's defaults, which Dockerfile relies on: PATH (its ENV extends it)
  # and a UTF-8 locale.
  tar --numeric-owner -C "$rootfs" -c . |
    pm import \
      --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --change 'ENV LANG=C.UTF-8' \
      --change 'CMD ["python3"]' \
      - "$BASE_IMAGE" >/dev/null
  rm -rf "$rootfs"
  step_done "import base"
else
  echo "reusing $BASE_IMAGE (--rebuild-base to debootstrap it again)"
fi
pm run --rm --ulimit "nofile=$(ulimit -Hn):$(ulimit -Hn)" --ulimit nproc=4096:4096 \
  "$BASE_IMAGE" python -c 'import sys, venv; print("base python", sys.version.split()[0])'

step "podman build $IMAGE from Dockerfile on $BASE_IMAGE"
# Cached layers are kept for the next run, unless everything is to be removed at the end.
layers=true
((clean)) && layers=false
pm build --format docker --layers="$layers" \
  --volume "$CA_BUNDLE:/etc/ssl/certs/ca-certificates.crt:ro" \
  --build-arg "PYTHON_IMAGE=$BASE_IMAGE" \
  -t "$IMAGE" -f "$repo/Dockerfile" "$repo"
step_done "build"

pm rm -f -t 0 "$CONTAINER" >/dev/null 2>&1 || true
step "run $IMAGE on port $PORT and wait for its HEALTHCHECK (/ready)"
echo "(podman logs that it cannot reach systemd for the healthcheck timer: expected, see --help)"
pm run -d --name "$CONTAINER" -p "$PORT:8080" --stop-timeout "$STOP_TIMEOUT" \
  --ulimit "nofile=$(ulimit -Hn):$(ulimit -Hn)" --ulimit nproc=4096:4096 "$IMAGE" >/dev/null
# The HEALTHCHECK's start period is 120 s; past it (and a margin) the container has failed.
deadline=$((SECONDS + 150))
until pm healthcheck run "$CONTAINER" >/dev/null 2>&1; do
  if [[ $(pm inspect "$CONTAINER" --format '{{.State.Running}}') != true ]]; then
    pm logs "$CONTAINER" >&2 || true
    die "the container exited before it was ready"
  fi
  if ((SECONDS > deadline)); then
    pm logs "$CONTAINER" | tail -20 >&2 || true
    die "not ready after 150 s"
  fi
  sleep 1
done
step_done "start to healthy"
health=$(pm inspect "$CONTAINER" --format '{{.State.Health.Status}}')
[[ $health == healthy ]] || die "health status after a passing check: $health"
echo "health: $health"

# check_ranking FILE SCORE_FIELD EXPECTED_INDEX N: the answer ranks passage EXPECTED_INDEX first,
# scores descend, and it has N results.
check_ranking() {
  python3 - "$@" <<'PY'
import json
import sys

path, score_field, expected, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
results = json.load(open(path))["results"]
scores = [r[score_field] for r in results]
print("  ranking:", [(r["index"], round(r[score_field], 3)) for r in results])
if len(results) != count:
    sys.exit(f"expected {count} results, got {len(results)}")
if scores != sorted(scores, reverse=True):
    sys.exit("scores do not descend")
if results[0]["index"] != expected:
    sys.exit(f"expected passage {expected} first, got {results[0]['index']}")
PY
}
post() {
  local route=$1 body=$2 out=$3 status
  status=$(curl -sS -o "$out" -w '%{http_code}' "http://127.0.0.1:$PORT$route" \
    -H 'content-type: application/json' -d "$body")
  [[ $status == 200 ]] || die "POST $route answered $status: $(cat "$out")"
}

step "POST /rerank and /v1/rerank"
post /rerank '{"query": "what is the capital of france", "passages": [
  "The cat sat on the mat.", "Berlin is the capital of Germany.",
  "Paris is the capital and largest city of France.", "France is known for wine and cheese."]}' \
  "$work/rerank.json"
echo "/rerank 'what is the capital of france' (Paris passage = 2):"
check_ranking "$work/rerank.json" score 2 4 || die "/rerank ranked badly"
post /v1/rerank '{"query": "how many legs does a spider have", "top_n": 2, "documents": [
  "Insects have six legs and three body parts.", {"text": "Spiders have eight legs."},
  "The stock market fell sharply on Monday."]}' "$work/v1.json"
echo "/v1/rerank 'how many legs does a spider have' (spider passage = 1, top_n 2):"
check_ranking "$work/v1.json" relevance_score 1 2 || die "/v1/rerank ranked badly"
step_done "rerank requests"

step "podman stop -t $STOP_TIMEOUT (SIGTERM, drain)"
pm stop -t "$STOP_TIMEOUT" "$CONTAINER" >/dev/null
step_done "stop"
exit_code=$(pm inspect "$CONTAINER" --format '{{.State.ExitCode}}')
logs=$(pm logs "$CONTAINER" 2>&1)
[[ $logs == *"signal 15: draining"* ]] || die "no drain in the container's log"
((exit_code == 0)) || die "the container exited with $exit_code after SIGTERM"
echo "exit code after SIGTERM: $exit_code (drained)"

size=$(pm image inspect "$IMAGE" --format '{{.Size}}')
base_size=$(pm image inspect "$BASE_IMAGE" --format '{{.Size}}')
echo
echo "== summary"
printf '%s\n' "${timings[@]}"
echo "image $IMAGE: $(mib "$size") (base $BASE_IMAGE: $(mib "$base_size"))"
if ((clean)); then
  pm rmi -f "$IMAGE" "$BASE_IMAGE" >/dev/null
  echo "removed $IMAGE and $BASE_IMAGE"
fi
echo "OK"
