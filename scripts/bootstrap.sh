#!/usr/bin/env bash
# Make this machine ready to run `docker compose up`:
#   1. a Docker engine with Compose v2 (scripts/install_docker.sh; installing needs root: the
#      script re-runs itself through sudo when it is not root and no engine answers),
#   2. ./wheelhouse: every runtime wheel, downloaded on the host with pip (the image build then
#      needs no registry and no package index),
#   3. the base image python:3.11-slim: pulled when a registry answers; otherwise a stand-in
#      with the same tag is built from a Debian rootfs (debootstrap),
#   4. the gradwire image (`docker compose build`),
#   and ./certs for TLS compose (scripts/gen_certs.sh; docker-compose.tls.yml), when missing.
# Every step is skipped when its result is already there, so running it again is cheap.
# It never starts the cluster: that is `docker compose up`.
#
# Options: --no-build (stop after steps 1-3), --no-up (accepted; nothing is started anyway).
# Environment:
#   GRADWIRE_SKIP_BUILD=1     same as --no-build
#   GRADWIRE_BASE_IMAGE       base image tag (default python:3.11-slim)
#   GRADWIRE_IMAGE            tag of the gradwire image compose builds and runs (default gradwire:latest)
#   GRADWIRE_CERTS_DIR        where the TLS certificates go (default ./certs)
#   GRADWIRE_DEBIAN_MIRROR    Debian mirror for the stand-in (default: the one apt uses)
#   PIP_* variables           passed to `pip download` (e.g. an index that serves a CPU torch)
set -euo pipefail

for arg in "$@"; do
    case "$arg" in
        --no-build) GRADWIRE_SKIP_BUILD=1 ;;
        --no-up) ;;
        -h|--help) awk 'NR > 1 && /^#/ {print; next} NR > 1 {exit}' "$0"; exit 0 ;;
        *) printf '[bootstrap] unknown option %s (try --help)\n' "$arg" >&2; exit 2 ;;
    esac
done

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

BASE_IMAGE=${GRADWIRE_BASE_IMAGE:-python:3.11-slim}
WHEELHOUSE="$ROOT/wheelhouse"

log() { printf '[bootstrap] %s\n' "$*" >&2; }
die() { printf '[bootstrap] ERROR: %s\n' "$*" >&2; exit 1; }
t0=$(date +%s)

# One bootstrap at a time on this machine (the engine and its images are shared): a second one
# waits here, then finds everything in place.
# Children never get the lock's descriptor (9>&- below, and detach.sh for the daemons), so the lock
# is released when this script exits; the wait is bounded anyway, with a message saying why.
LOCK="${TMPDIR:-/tmp}/gradwire-bootstrap-$(id -u).lock"  # per user: a root-owned file would block others
LOCK_WAIT_S=${GRADWIRE_BOOTSTRAP_LOCK_WAIT_S:-1800}
if command -v flock >/dev/null 2>&1; then
    exec 9>"$LOCK"
    if ! flock -n 9; then
        log "another bootstrap holds $LOCK; waiting up to ${LOCK_WAIT_S} s"
        flock -w "$LOCK_WAIT_S" 9 || die "$LOCK is still held after ${LOCK_WAIT_S} s (holders: $(fuser "$LOCK" 2>/dev/null || echo unknown)); stop them or remove the file"
    fi
fi

# Root is needed only to install or start the engine (and for a stand-in base image). Without
# it, and with no engine this user can reach, run again through sudo when there is one (the
# lock is released first: 9>&-).
if [ "$(id -u)" != 0 ] && ! docker info >/dev/null 2>&1 && command -v sudo >/dev/null 2>&1; then
    log "no Docker engine answers for $(id -un): continuing as root through sudo"
    exec sudo -E bash "$ROOT/scripts/bootstrap.sh" "$@" 9>&-
fi

# 1. engine --------------------------------------------------------------------------------
bash "$ROOT/scripts/install_docker.sh" 9>&-

# 1b. real data offline ----------------------------------------------------------------------
# Fashion-MNIST (70,000 real images) is a Debian package; `--dataset fashion-mnist` reads it from
# /usr/share/datasets/fashion-mnist by default and compose mounts that folder into the containers.
FMNIST=/usr/share/datasets/fashion-mnist
if [ -f "$FMNIST/t10k-labels-idx1-ubyte.gz" ]; then
    log "Fashion-MNIST is in $FMNIST"
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "installing Fashion-MNIST (Debian package dataset-fashion-mnist, 30 MB)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
        || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; } \
        || die "could not install dataset-fashion-mnist from the Debian archive"
else
    log "Fashion-MNIST is not installed ($FMNIST); as root: apt-get install dataset-fashion-mnist"
fi

# 2. wheelhouse ----------------------------------------------------------------------------
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    for cand in python3.11 python3 python; do
        if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import tomllib' 2>/dev/null; then PY=$cand; break; fi
    done
fi
[ -n "$PY" ] || die "need Python >= 3.11 with pip on the host to build the wheelhouse"
mkdir -p "$WHEELHOUSE"
# The runtime requirements are the [project] dependencies of pyproject.toml.
"$PY" - "$ROOT/pyproject.toml" > "$WHEELHOUSE/requirements.txt.new" <<'PYEOF'
import sys, tomllib
with open(sys.argv[1], "rb") as fh:
    deps = tomllib.load(fh)["project"]["dependencies"]
print("\n".join(sorted(deps)))
PYEOF
# setuptools builds gradwire itself inside the image (build-system.requires).
BUILD_REQS="setuptools>=68"
# constraints.txt pins the exact versions (torch's CPU build); it travels with the wheelhouse so
# the image build installs with the same constraints.
cp "$ROOT/constraints.txt" "$WHEELHOUSE/constraints.txt"
stamp=$(cat "$WHEELHOUSE/requirements.txt.new" "$ROOT/constraints.txt"; echo "$BUILD_REQS")
if [ -f "$WHEELHOUSE/.complete" ] && [ "$(cat "$WHEELHOUSE/.complete")" = "$stamp" ] \
        && cmp -s "$WHEELHOUSE/requirements.txt.new" "$WHEELHOUSE/requirements.txt"; then
    rm -f "$WHEELHOUSE/requirements.txt.new"
    log "wheelhouse is up to date ($(ls "$WHEELHOUSE"/*.whl | wc -l) wheels)"
else
    mv "$WHEELHOUSE/requirements.txt.new" "$WHEELHOUSE/requirements.txt"
    rm -f "$WHEELHOUSE/.complete"
    log "downloading wheels into $WHEELHOUSE"
    # Binary wheels for CPython 3.11 only, whatever Python runs this script.
    # shellcheck disable=SC2086
    "$PY" -m pip download --disable-pip-version-check -q \
        --only-binary=:all: --python-version 3.11 --implementation cp \
        -d "$WHEELHOUSE" -r "$WHEELHOUSE/requirements.txt" -c "$ROOT/constraints.txt" $BUILD_REQS \
        2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
    # One wheel per project: drop older versions left by an earlier download.
    "$PY" - "$WHEELHOUSE" <<'PYEOF'
import collections, pathlib, re, sys
try:
    from packaging.version import Version
except ImportError:  # pip vendors it
    from pip._vendor.packaging.version import Version
by_name = collections.defaultdict(list)
for whl in pathlib.Path(sys.argv[1]).glob("*.whl"):
    name, version = whl.name.split("-")[:2]
    by_name[re.sub(r"[-_.]+", "_", name).lower()].append((Version(version), whl))
for wheels in by_name.values():
    for _, old in sorted(wheels)[:-1]:
        old.unlink()
PYEOF
    printf '%s' "$stamp" > "$WHEELHOUSE/.complete"
    log "wheelhouse: $(ls "$WHEELHOUSE"/*.whl | wc -l) wheels, $(du -sh "$WHEELHOUSE" | cut -f1)"
fi

# 3. base image ----------------------------------------------------------------------------
if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    log "base image $BASE_IMAGE is present"
elif timeout 120 docker pull -q "$BASE_IMAGE" >/dev/null 2>&1; then
    log "pulled $BASE_IMAGE"
else
    log "$BASE_IMAGE cannot be pulled (no registry): building a stand-in from a Debian rootfs"
    [ "$(id -u)" = 0 ] || die "building the stand-in base image needs root (debootstrap); run it as root"
    if ! command -v debootstrap >/dev/null 2>&1; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null \
            || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null; }
    fi
    MIRROR=${GRADWIRE_DEBIAN_MIRROR:-}
    [ -n "$MIRROR" ] || MIRROR=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    [ -n "$MIRROR" ] || MIRROR=$(awk '/^deb /{print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
    [ -n "$MIRROR" ] || MIRROR=http://deb.debian.org/debian
    rootfs=$(mktemp -d /tmp/gradwire-rootfs.XXXXXX)
    trap 'rm -rf "$rootfs"' EXIT
    # python3-venv brings ensurepip; the rest of python:3.11-slim's contents are not needed.
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$rootfs" "$MIRROR" >/tmp/gradwire-debootstrap.log 2>&1 \
        || die "debootstrap failed; see /tmp/gradwire-debootstrap.log"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | docker import \
        -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        -c 'ENV LANG=C.UTF-8' -c 'CMD ["python3"]' \
        -m "gradwire stand-in for $BASE_IMAGE (Debian bookworm minbase + python3)" \
        - "$BASE_IMAGE" >/dev/null
    rm -rf "$rootfs"
    trap - EXIT
    log "built stand-in $BASE_IMAGE ($(docker image inspect -f '{{.Size}}' "$BASE_IMAGE" | awk '{printf "%.0f MB", $1/1e6}'))"
fi

# 3b. certificates for TLS compose ------------------------------------------------------------
# docker-compose.tls.yml mounts ./certs (or GRADWIRE_CERTS_DIR): a CA, the PS's certificate
# (subjectAltName ps), one client certificate all workers share and a token. Made once; delete
# the folder to make new ones. They are never copied into the image (.dockerignore).
CERTS=${GRADWIRE_CERTS_DIR:-$ROOT/certs}
if [ -s "$CERTS/server.pem" ] && [ -s "$CERTS/worker.pem" ] && [ -s "$CERTS/token" ]; then
    log "TLS certificates are in $CERTS"
elif command -v openssl >/dev/null 2>&1; then
    bash "$ROOT/scripts/gen_certs.sh" "$CERTS" ps worker >/dev/null 9>&-
    log "wrote TLS certificates and a token to $CERTS (docker-compose.tls.yml)"
else
    log "no openssl: TLS certificates not made (needed only for docker-compose.tls.yml)"
fi

# 4. image ---------------------------------------------------------------------------------
if [ "${GRADWIRE_SKIP_BUILD:-0}" != 1 ]; then
    log "building the gradwire image (docker compose build)"
    docker compose build
    log "image: $(docker image inspect -f '{{.Size}}' "${GRADWIRE_IMAGE:-gradwire:latest}" | awk '{printf "%.0f MB", $1/1e6}')"
fi
log "ready in $(( $(date +%s) - t0 )) s; next: docker compose up"
