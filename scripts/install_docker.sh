#!/usr/bin/env bash
# Make sure a Docker engine with Compose v2 answers on this machine.
#
# Idempotent: when `docker info` and `docker compose version` already work, it does nothing.
# Otherwise (Debian/Ubuntu, needs root) it installs the engine from the distribution archive
# (docker.io), Compose v2 from Debian trixie when the current suite has none, and starts dockerd
# by hand when no init system does it. Only the configured Debian mirror is contacted.
set -euo pipefail

log() { printf '[install_docker] %s\n' "$*" >&2; }
die() { printf '[install_docker] ERROR: %s\n' "$*" >&2; exit 1; }

engine_up() { docker info >/dev/null 2>&1; }
compose_up() { docker compose version >/dev/null 2>&1; }

if command -v docker >/dev/null 2>&1 && engine_up && compose_up; then
    log "engine $(docker version --format '{{.Server.Version}}' 2>/dev/null || echo '?') and $(docker compose version --short 2>/dev/null || echo 'compose') already answer; nothing to do"
    exit 0
fi

if [ "$(id -u)" != 0 ]; then
    die "no Docker engine with Compose v2 answers, and installing one needs root.
  Either run this script as root, or install Docker Engine + the Compose v2
  plugin yourself (https://docs.docker.com/engine/install/), start it, and make sure
  'docker info' and 'docker compose version' work for your user (e.g. add it to the 'docker' group)."
fi
command -v apt-get >/dev/null 2>&1 || die "no apt-get: this script knows Debian/Ubuntu only; install Docker Engine + Compose v2 by hand"

export DEBIAN_FRONTEND=noninteractive
APT_UPDATED=0
apt_update() { if [ "$APT_UPDATED" = 0 ]; then apt-get update -qq; APT_UPDATED=1; fi; }

if ! command -v dockerd >/dev/null 2>&1; then
    log "installing the engine (docker.io), debootstrap and iptables from the distribution archive"
    apt_update
    apt-get install -y -qq docker.io debootstrap iptables >/dev/null
elif ! command -v debootstrap >/dev/null 2>&1; then
    apt_update
    apt-get install -y -qq debootstrap >/dev/null || log "debootstrap unavailable (only needed for a stand-in base image)"
fi

if ! compose_up; then
    log "installing Compose v2"
    apt_update
    if apt-cache show docker-compose-v2 >/dev/null 2>&1; then          # Ubuntu
        apt-get install -y -qq docker-compose-v2 >/dev/null
    elif apt-cache policy docker-compose 2>/dev/null | grep -qE 'Candidate: 2\.'; then   # Debian >= trixie
        apt-get install -y -qq docker-compose >/dev/null
    else
        # Debian bookworm has only Compose v1; trixie's package is a static Go binary that needs
        # only libc >= 2.34. Take it from the mirror this machine already uses, then drop trixie.
        src=/etc/apt/sources.list.d/debian.sources
        MIRROR=""
        [ -f "$src" ] && MIRROR=$(awk '/^URIs:/{print $2; exit}' "$src")
        [ -n "$MIRROR" ] || MIRROR=$(awk '/^deb /{print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
        [ -n "$MIRROR" ] || MIRROR=http://deb.debian.org/debian
        tmp_src=/etc/apt/sources.list.d/gradwire-trixie.sources
        printf 'Types: deb\nURIs: %s\nSuites: trixie\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
            "$MIRROR" > "$tmp_src"
        trap 'rm -f "$tmp_src"' EXIT
        apt-get update -qq
        apt-get install -y -qq docker-compose/trixie >/dev/null
        rm -f "$tmp_src"
        trap - EXIT
        apt-get update -qq     # do not leave trixie enabled
    fi
fi

if ! engine_up; then
    if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
        log "starting docker with systemd"
        systemctl start docker || true
    fi
fi
if ! engine_up; then
    log "starting dockerd by hand (log: /var/log/dockerd.log)"
    # detach.sh closes inherited descriptors: a dockerd holding bootstrap.sh's lock fd would
    # block every later bootstrap for as long as the engine runs.
    : > /var/log/dockerd.log
    bash "$(dirname "${BASH_SOURCE[0]}")/detach.sh" /var/log/dockerd.log dockerd >/dev/null
    for _ in $(seq 1 90); do engine_up && break; sleep 1; done
fi
engine_up || die "dockerd did not answer within 90 s; see /var/log/dockerd.log"
compose_up || die "'docker compose version' still fails after the install"
log "engine $(docker version --format '{{.Server.Version}}') with $(docker compose version) is up"
