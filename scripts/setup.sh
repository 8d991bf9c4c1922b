#!/usr/bin/env bash
# Installs everything ferry and its test suite need on a Debian 12 (or newer)
# machine, idempotently, then builds ferry. Run as root.
#
#   scripts/setup.sh             install + build
#   scripts/setup.sh --demo      install + build, then run `ferry demo`
#   scripts/setup.sh --no-build  install only (scripts/test.sh builds for itself)
#   scripts/setup.sh --install   also install ferry into /usr/local/bin, with its
#                                bash completions and manual pages
#   scripts/setup.sh --install-service
#                                --install, plus the agent's systemd unit and,
#                                if absent, /etc/ferry/agent.toml and its key
#
# CRIU: ferry needs CRIU >= 4.2. Debian 12 ships CRIU 3.17, which fails on
# recent kernels ("vdso: Unexpected rt vDSO area bounds"); CRIU 4.1.1 (Debian
# 13) runs but cannot dump any TCP or UDP socket on kernels >= 6.16
# (getsockopt SO_PASSCRED on inet sockets now answers EOPNOTSUPP), which
# 4.2 handles. Where the distribution's package is >= 4.2 it is installed
# with apt; otherwise CRIU is taken from Debian "testing" (falling back to
# "unstable") with its library closure, unpacked into a private prefix
# (/opt/ferry/criu) without touching the system libc, and started through a
# `criu` wrapper in /usr/local/bin that runs it with that release's dynamic
# loader. The archive URI is derived from this machine's own apt sources,
# never written down.
set -euo pipefail

PREFIX=/opt/ferry/criu
WRAPPER=/usr/local/bin/criu
CRIU_MIN_MAJOR=4
CRIU_MIN_MINOR=2
CRIU_SUITES=(testing unstable)
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUN_DEMO=0
BUILD=1
INSTALL=0
SERVICE=0
for arg in "$@"; do
  case "$arg" in
    --demo) RUN_DEMO=1 ;;
    --no-build) BUILD=0 ;;
    --install) INSTALL=1 ;;
    --install-service) INSTALL=1; SERVICE=1 ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown argument $arg" >&2; exit 2 ;;
  esac
done

log() { echo "setup: $*" >&2; }
die() { echo "setup: error: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (CRIU, runc and Docker need it)"
command -v apt-get >/dev/null || die "this script needs a Debian-based system (apt-get)"

# Packages: runc and iptables (CRIU's network lock) for containers,
# protobuf-compiler for the etcd client crate, docker.io/podman/etcd for the
# container and HA suites, busybox-static for scratch test images, zstd for
# the compression benchmark, iproute2 for namespace "hosts", python3 for the
# tests' ordinary programs, openssl for the etcd TLS test's certificates,
# util-linux for setpriv (an unprivileged racer in the post-copy test) and
# unshare, strace to see that a stop-mode dump syncs before it kills.
PACKAGES=(runc iptables protobuf-compiler libprotobuf-dev pkg-config docker.io podman etcd-server etcd-client
          busybox-static zstd iproute2 procps psmisc ca-certificates curl python3 openssl util-linux
          strace)
export DEBIAN_FRONTEND=noninteractive
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  log "installing ${missing[*]}"
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# Whether version "X.Y[.Z]" is at least the minimum.
new_enough() {
  local major minor
  major=${1%%.*}; minor=${1#*.}; minor=${minor%%.*}
  [ -n "$major" ] && [ -n "$minor" ] || return 1
  [ "$major" -gt "$CRIU_MIN_MAJOR" ] || { [ "$major" -eq "$CRIU_MIN_MAJOR" ] && [ "$minor" -ge "$CRIU_MIN_MINOR" ]; }
}

criu_works() {
  command -v criu >/dev/null 2>&1 || return 1
  local v
  v=$(criu --version 2>/dev/null | sed -n 's/^Version: //p')
  new_enough "$v" || return 1
  criu check >/dev/null 2>&1
}

multiarch() {
  case "$(dpkg --print-architecture)" in
    amd64) echo "x86_64-linux-gnu ld-linux-x86-64.so.2" ;;
    arm64) echo "aarch64-linux-gnu ld-linux-aarch64.so.1" ;;
    *) die "no CRIU recipe for architecture $(dpkg --print-architecture)" ;;
  esac
}

install_criu_from() {
  local suite=$1 work uri triplet loader closure
  read -r triplet loader < <(multiarch)
  work=$(mktemp -d /tmp/ferry-criu.XXXXXX)
  trap 'rm -rf "$work"' RETURN
  uri=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  [ -n "$uri" ] || uri=$(awk '$1 == "deb" && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
  [ -n "$uri" ] || die "cannot find a Debian archive URI in this machine's apt sources"
  mkdir -p "$work/lists/partial" "$work/debs"
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $uri $suite main" > "$work/sources.list"
  local apt_opts=(-o "Dir::Etc::SourceList=$work/sources.list" -o "Dir::Etc::SourceParts=-"
                  -o "Dir::State::Lists=$work/lists" -o "APT::Sandbox::User=root")
  log "fetching CRIU from Debian $suite at $uri"
  apt-get "${apt_opts[@]}" update -q >/dev/null
  closure=$(apt-cache "${apt_opts[@]}" depends --recurse --no-recommends --no-suggests \
      --no-conflicts --no-breaks --no-replaces --no-enhances --no-pre-depends criu \
      | grep -v '^ ' | grep -v '<' | sort -u)
  (cd "$work/debs" && apt-get "${apt_opts[@]}" download $closure >/dev/null)
  rm -rf "$PREFIX.new"
  mkdir -p "$PREFIX.new"
  for deb in "$work"/debs/*.deb; do dpkg-deb -x "$deb" "$PREFIX.new"; done
  [ -x "$PREFIX.new/usr/sbin/criu" ] || { log "the $suite criu package holds no usr/sbin/criu"; return 1; }
  rm -rf "$PREFIX"
  mv "$PREFIX.new" "$PREFIX"
  cat > "$WRAPPER.new" <<WRAP
#!/bin/sh
# CRIU from Debian $suite in a private prefix, run with its own loader and
# libraries (installed by ferry's scripts/setup.sh).
exec "$PREFIX/usr/lib/$triplet/$loader" --library-path "$PREFIX/usr/lib/$triplet" "$PREFIX/usr/sbin/criu" "\$@"
WRAP
  chmod 755 "$WRAPPER.new"
  mv "$WRAPPER.new" "$WRAPPER"
}

if criu_works; then
  log "CRIU $(criu --version | sed -n 's/^Version: //p') already works: $(command -v criu)"
else
  candidate=$(apt-cache policy criu 2>/dev/null | sed -n 's/^ *Candidate: \([0-9.]*\).*/\1/p' | head -1)
  if [ -n "$candidate" ] && new_enough "$candidate"; then
    log "installing the distribution's CRIU package"
    apt-get install -y -q --no-install-recommends criu
  fi
  for suite in "${CRIU_SUITES[@]}"; do
    criu_works && break
    install_criu_from "$suite" || true
  done
  criu_works || die "no CRIU >= $CRIU_MIN_MAJOR.$CRIU_MIN_MINOR that passes 'criu check' could be installed: $(criu check 2>&1 | tail -3)"
  log "CRIU $(criu --version | sed -n 's/^Version: //p') installed: $(command -v criu)"
fi

# Docker's engine is not started by the distribution here: start it (with
# --experimental, which `docker start --checkpoint` needs) unless it runs.
docker_up() {
  [ -S /var/run/docker.sock ] && curl -sf --unix-socket /var/run/docker.sock http://localhost/_ping >/dev/null
}
if ! docker_up; then
  log "starting dockerd --experimental (log: /var/log/ferry-dockerd.log)"
  nohup dockerd --experimental >/var/log/ferry-dockerd.log 2>&1 &
  for _ in $(seq 1 60); do docker_up && break; sleep 0.5; done
  docker_up || die "dockerd did not start: $(tail -5 /var/log/ferry-dockerd.log)"
fi

# podman refuses to start containers on hosts that refuse raising rlimits.
# ferry reads runc's container state: podman's containers run under runc.
if [ ! -f /etc/containers/containers.conf ]; then
  mkdir -p /etc/containers
  printf '[containers]\ndefault_ulimits = []\n\n[engine]\nruntime = "runc"\n' > /etc/containers/containers.conf
elif ! grep -q '^\[engine\]' /etc/containers/containers.conf; then
  printf '\n[engine]\nruntime = "runc"\n' >> /etc/containers/containers.conf
fi

[ "$BUILD" = 1 ] || exit 0
command -v cargo >/dev/null || die "cargo (Rust) is needed to build ferry: install it with rustup"
log "building ferry (release)"
(cd "$REPO" && cargo build --release --workspace --bins)
log "ferry is ready: $REPO/target/release/ferry"

if [ "$INSTALL" = 1 ]; then
  install -m 0755 "$REPO/target/release/ferry" /usr/local/bin/ferry
  mkdir -p /usr/share/bash-completion/completions /usr/local/share/man/man1
  /usr/local/bin/ferry completions bash > /usr/share/bash-completion/completions/ferry
  /usr/local/bin/ferry man /usr/local/share/man/man1 >/dev/null
  chmod 0644 /usr/local/share/man/man1/ferry*.1   # ferry writes root-only files
  log "installed /usr/local/bin/ferry, its bash completions and manual pages"
fi
if [ "$SERVICE" = 1 ]; then
  install -m 0644 "$REPO/scripts/systemd/ferry-agent.service" /etc/systemd/system/ferry-agent.service
  install -d -m 0700 /etc/ferry
  [ -e /etc/ferry/agent.toml ] || install -m 0600 "$REPO/scripts/systemd/agent.toml" /etc/ferry/agent.toml
  [ -e /etc/ferry/key ] || /usr/local/bin/ferry keygen /etc/ferry/key >/dev/null
  if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
  fi
  log "installed ferry-agent.service; edit /etc/ferry/agent.toml (copy /etc/ferry/key to every host), then: systemctl enable --now ferry-agent"
fi

if [ "$RUN_DEMO" = 1 ]; then
  exec "$REPO/target/release/ferry" demo
fi
