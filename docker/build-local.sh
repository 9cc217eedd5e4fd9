#!/usr/bin/env bash
# Build docker/Dockerfile and run it with podman on a machine that has no Docker engine and no
# registry access (only a Debian mirror and PyPI), then check that the container computes the
# same demo table as the host. .ci/run calls this; README "Docker / podman" describes it.
#
#   docker/build-local.sh                 # everything: packages, base image, build, run, compare
#   SKIP_COMPARE=1 docker/build-local.sh  # build only
#
# Steps, each skipped when its result is already there:
#   1. podman, buildah, runc, debootstrap (+ slirp4netns, fuse-overlayfs, uidmap) from Debian;
#   2. /etc/containers/containers.conf: runc (crun refuses this sandbox's hybrid cgroups) and
#      fixed ulimits (the sandbox cannot raise them, podman's default asks to);
#   3. the base image: a debootstrap'ed Debian with python3 whose /usr/local is a venv, imported
#      as $BASE_IMAGE (Docker Hub's python image is out of reach here);
#   4. podman build with the host's CA bundle, pip configuration and local wheel folder
#      bind-mounted (pip inside the build reaches PyPI only through them), torch from
#      $TORCH_INDEX;
#   5. the image runs `blindspots demo` into a folder owned by root (the entrypoint hands it to
#      uid 1000), the host runs the same demo, and the two demo tables must be equal number for
#      number, and equal to README's (tests/report/golden/demo.json).
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-quant-blindspots}
SUITE=${SUITE:-bookworm}
BASE_IMAGE=${BASE_IMAGE:-localhost/quant-blindspots-base:$SUITE}
# PyPI's torch wheel is the multi-GB CUDA build; the machine's pip configuration points at a
# local CPU wheel (find-links), which wins when the index is plain PyPI.
TORCH_INDEX=${TORCH_INDEX:-https://pypi.org/simple}
WORK=${WORK:-/var/tmp/blindspots-image}
HOST_VENV=${HOST_VENV:-.venv}

step() { printf '[build-local %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
timed() { local t0=$SECONDS; "$@"; step "took $((SECONDS - t0)) s: $*"; }

install_packages() {
  local missing=()
  for tool in podman buildah runc debootstrap slirp4netns fuse-overlayfs newuidmap; do
    command -v "$tool" >/dev/null || missing+=("$tool")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  step "installing podman and debootstrap (missing: ${missing[*]})"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    podman buildah runc debootstrap slirp4netns fuse-overlayfs uidmap >/dev/null
}

configure_containers() {
  local conf=/etc/containers/containers.conf
  grep -qs 'runtime = "runc"' "$conf" && return 0
  step "writing $conf"
  mkdir -p /etc/containers
  cat >"$conf" <<'EOF'
# written by quant-blindspots docker/build-local.sh
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
EOF
}

debian_mirror() {
  # The machine's own mirror, from its apt sources (deb822 or one-line format).
  local uri
  uri=$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -v security | head -1)
  [ -n "$uri" ] || uri=$(grep -hs '^deb ' /etc/apt/sources.list | awk '{print $2}' | grep -v security | head -1)
  echo "${uri:-http://deb.debian.org/debian}"
}

base_image() {
  podman image exists "$BASE_IMAGE" && return 0
  local rootfs=$WORK/rootfs-$SUITE
  rm -rf "$rootfs"
  mkdir -p "$WORK"
  step "debootstrap $SUITE from $(debian_mirror) into $rootfs"
  debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    "$SUITE" "$rootfs" "$(debian_mirror)" >"$WORK/debootstrap-$SUITE.log"
  # /usr/local as a venv: `pip install` in the Dockerfile then needs no --break-system-packages
  # and python3/pip on PATH are the venv's, as in Docker Hub's python images.
  chroot "$rootfs" python3 -m venv /usr/local
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  step "importing $rootfs as $BASE_IMAGE"
  tar -C "$rootfs" -c . | podman import - "$BASE_IMAGE" >/dev/null
  rm -rf "$rootfs"
}

build_pip_conf() {
  # What the host's pip knows (CA bundle, version caps, the local wheel folder), as one file
  # for the build's RUN steps; bind-mounted, so nothing of it stays in the image.
  local conf=$WORK/pip.conf
  {
    echo "[global]"
    echo "cert = /etc/ssl/certs/ca-certificates.crt"
    [ -f /etc/xdg/pip/constraints.txt ] && echo "constraint = /etc/xdg/pip/constraints.txt"
    [ -d /opt/wheels ] && echo "find-links = /opt/wheels"
  } >"$conf"
  echo "$conf"
}

build_image() {
  local conf
  conf=$(build_pip_conf)
  local mounts=(-v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro
    -v "$conf:/etc/pip.conf:ro")
  for path in /etc/xdg/pip /opt/wheels; do
    [ -e "$path" ] && mounts+=(-v "$path:$path:ro")
  done
  step "podman build -t $IMAGE (base $BASE_IMAGE, torch from $TORCH_INDEX)"
  podman build --quiet -f docker/Dockerfile -t "$IMAGE" \
    --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg TORCH_INDEX="$TORCH_INDEX" \
    "${mounts[@]}" .
}

compare_tables() {
  local results=$WORK/results host=$WORK/host
  rm -rf "$results" "$host"
  mkdir -p "$results"  # root-owned, as a fresh `docker run -v` folder is
  step "container: blindspots demo (no network)"
  podman run --rm --network none -v "$results:/results" "$IMAGE" demo --out /results/demo >/dev/null
  step "host: blindspots demo"
  "$HOST_VENV/bin/blindspots" demo --out "$host/demo" >/dev/null
  "$HOST_VENV/bin/python" tools/demo_table.py compare "$host/demo" "$results/demo"
  "$HOST_VENV/bin/python" tools/demo_table.py compare tests/report/golden/demo.json "$results/demo"
}

timed install_packages
configure_containers
timed base_image
timed build_image
podman image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -F "$IMAGE" >&2 || true
if [ -z "${SKIP_COMPARE:-}" ]; then
  timed compare_tables
fi
