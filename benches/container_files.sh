#!/usr/bin/env bash
# What a container's files cost a migration's frozen time.
#
# A Docker container (busybox, no ferry code in it) writes MIB MiB of files
# to its writable layer (one large file and 25 KiB files for the rest) and
# then only counts in its shell. It migrates to an agent on loopback, REPS
# times with its files and REPS times without (--ignore-rootfs), to a new
# container on the same engine. Its files do not change during pre-copy,
# so what they add to the frozen time is the walk that finds nothing
# changed and the manifest that says so.
#
# Usage: bash benches/container_files.sh [MIB] [REPS]   (root, dockerd up,
# a release build: cargo build --release). Prints CSV on stdout:
# mode,run,frozen_ms,dump_ms,files_capture_ms,files_frozen_bytes,files_ahead_bytes,files_ahead_ms
set -euo pipefail
MIB=${1:-100}
REPS=${2:-5}
FERRY=${FERRY:-$(cd "$(dirname "$0")/.." && pwd)/target/release/ferry}
[ -x "$FERRY" ] || { echo "no ferry at $FERRY: cargo build --release first" >&2; exit 2; }
docker info >/dev/null 2>&1 || { echo "dockerd is not reachable: start it (scripts/setup.sh)" >&2; exit 2; }
command -v jq >/dev/null || { echo "jq is needed" >&2; exit 2; }

work=$(mktemp -d /tmp/ferry-bench-files.XXXXXX)
# Costs learned here stay here (not in the host's /var/lib/ferry).
export FERRY_STATE_DIR="$work/state"
tag="ferry-bench-files-$$"
agent_pid=
cleanup() {
    [ -n "$agent_pid" ] && kill "$agent_pid" 2>/dev/null || true
    docker ps -aq --filter "name=$tag" | xargs -r docker rm -f >/dev/null 2>&1 || true
    docker rmi -f "$tag:latest" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

mkdir -p "$work/rootfs/bin" "$work/rootfs/tmp"
cp /bin/busybox "$work/rootfs/bin/busybox"
ln -s busybox "$work/rootfs/bin/sh"
tar -C "$work/rootfs" -c . | docker import - "$tag:latest" >/dev/null
"$FERRY" keygen "$work/key" >/dev/null
mkfifo "$work/agent.out"
"$FERRY" agent --listen 127.0.0.1:0 --key "$work/key" --store "$work/store" >"$work/agent.out" 2>"$work/agent.log" &
agent_pid=$!
read -r first <"$work/agent.out"
addr=${first#ferry agent listening on }
addr=${addr%% *}
# Keep the agent's stdout drained.
cat "$work/agent.out" >/dev/null &

small=$(( (MIB - MIB * 6 / 10) * 1024 / 25 ))
script="b=/bin/busybox; \$b mkdir -p /app/small
\$b head -c $(( MIB * 6 / 10 ))m /dev/urandom > /app/big
i=0; while [ \$i -lt $small ]; do \$b head -c 25k /dev/urandom > /app/small/f\$i; i=\$((i+1)); done
echo ready > /ready
n=0; while true; do n=\$((n+1)); echo \$n > /tmp/counter; \$b sleep 0.05; done"

echo "mode,run,frozen_ms,dump_ms,files_capture_ms,files_frozen_bytes,files_ahead_bytes,files_ahead_ms"
for mode in files none; do
    for run in $(seq 1 "$REPS"); do
        c="$tag-$mode-$run"
        docker run -d --network none --name "$c" "$tag:latest" /bin/busybox sh -c "$script" >/dev/null
        for _ in $(seq 1 600); do
            docker exec "$c" /bin/busybox test -f /ready 2>/dev/null && break
            sleep 0.1
        done
        extra=()
        [ "$mode" = none ] && extra=(--ignore-rootfs --ignore-volumes)
        if ! "$FERRY" migrate --json --docker "$c" --docker-name "$c-copy" --to "$addr" \
            --key "$work/key" --accept-downtime-miss "${extra[@]}" >"$work/report.json" 2>"$work/events.log"; then
            echo "migration $mode $run failed:" >&2
            grep -v '"event"' "$work/events.log" >&2 || true
            tail -5 "$work/agent.log" >&2
            exit 1
        fi
        jq -r --arg mode "$mode" --arg run "$run" \
            '[$mode, $run, .final.frozen_ms, .final.dump_ms, .final.files_capture_ms,
              .final.files_frozen_bytes, (.files_ahead.bytes // 0), (.files_ahead.ms // 0)] | @csv' \
            "$work/report.json" | tr -d '"'
        docker rm -f "$c" "$c-copy" >/dev/null 2>&1 || true
    done
done
