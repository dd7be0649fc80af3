#!/usr/bin/env bash
# Warm vs cold `warmpool run -- true`, interleaved in one run so machine drift hits both alike.
# Usage: scripts/warm-vs-cold.sh [runs-per-side]   (default 20; builds the release binary)
# warm: minIdle 2 (agents already connected); cold: minIdle 0 (each run starts an agent).
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-20}"
cargo build --release --quiet
bin=target/release/warmpool
dir=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$dir/pools.yaml" <<YAML
pools:
  - name: warm
    labels: [linux, warm]
    minIdle: 2
    maxTotal: 4
    maxUses: 1
  - name: cold
    labels: [linux, cold]
    minIdle: 0
    maxTotal: 4
    maxUses: 1
    provisioning: {perSecond: 100, burst: 100, maxConcurrent: 4}
YAML
"$bin" serve --listen "127.0.0.1:$port" --pools "$dir/pools.yaml" 2>"$dir/serve.log" &
serve=$!
trap 'kill -TERM $serve 2>/dev/null; wait $serve 2>/dev/null; rm -rf "$dir"' EXIT
export WARMPOOL_SERVER="http://127.0.0.1:$port"
until "$bin" status >/dev/null 2>&1 && "$bin" status -o json | python3 -c 'import json,sys; p={x["name"]:x for x in json.load(sys.stdin)}; sys.exit(0 if p["warm"]["idle"]>=2 and p["cold"]["total"]==0 else 1)'; do sleep 0.1; done

# Floor: a bare local spawn of the same command.
time_ms() { local s e; s=$(date +%s%N); "$@" >/dev/null; e=$(date +%s%N); awk -v s="$s" -v e="$e" 'BEGIN { printf "%.2f\n", (e - s) / 1e6 }'; }
wait_settled() { # the previous run's agents are gone and warm is refilled
  until "$bin" status -o json | python3 -c 'import json,sys; p={x["name"]:x for x in json.load(sys.stdin)}; sys.exit(0 if p["warm"]["idle"]>=2 and p["cold"]["total"]==0 else 1)'; do sleep 0.05; done
}
: > "$dir/warm"; : > "$dir/cold"; : > "$dir/bare"
for _ in $(seq "$n"); do
  wait_settled; time_ms "$bin" run --selector warm -- true >> "$dir/warm"
  wait_settled; time_ms "$bin" run --selector cold -- true >> "$dir/cold"
  time_ms sh -c true >> "$dir/bare"
done
median() { sort -n "$1" | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
w=$(median "$dir/warm"); c=$(median "$dir/cold"); b=$(median "$dir/bare")
echo "runs per side: $n"
echo "warm  run -- true   median ${w} ms"
echo "cold  run -- true   median ${c} ms"
echo "bare  sh -c true    median ${b} ms"
awk -v c="$c" -v w="$w" -v b="$b" 'BEGIN { printf "cold/warm ratio: %.1f   warm/bare ratio: %.1f\n", c / w, w / b }'
