#!/usr/bin/env bash
# The warm-vs-cold headline and the burst on real pods: `warmpool serve --backend kubernetes`
# (the release binary) against the node of scripts/kube-node.sh, and `warmpool bench --pods`.
#
#   scripts/bench-node.sh [OUT_DIR]       default OUT_DIR: target/bench-node
#
# Needs the node started (scripts/kube-node.sh start) and target/release/warmpool built
# (cargo build --release --bin warmpool). It builds the agent image warmpool-agent:release from
# that binary (scripts/agent-image.sh --release), then, in the namespace warmpool-bench
# (created when missing; $WARMPOOL_BENCH_NAMESPACE):
#   1. AgentPools `warm` and `cold`, identical but for minIdle ($WARM_MIN_IDLE, default 4, and
#      0: with maxUses 1 each warm job uses up a pod, and a new one takes about a second to
#      connect, so 2 idle agents run out at concurrency 2), maxUses 1, maxTotal
#      $MAX_TOTAL (default 45: pods being deleted count, and on this node each takes 10-20 s
#      to go; a lower cap starves the warm pool), a provisioning pace that never throttles;
#      `warmpool bench` alternates $JOBS jobs (default 100) of `echo hi` between them at
#      concurrency 2:
#      OUT_DIR/warm-cold.txt (.json, and the plot .svg), and the split of the cold first byte
#      into pod created -> agent container started (dockerd's events) -> agent connected ->
#      first byte: OUT_DIR/cold-split.txt;
#   2. once their pods are gone, AgentPool `burst`: minIdle 4, maxTotal 10, maxUses 1; once 4
#      agents are idle, 20 leases at once (`--jobs 20 --concurrency 20`): OUT_DIR/burst.txt.
# `--pods` adds the pods created, each pool's peak of pods that count toward maxTotal, and the
# split of cold starts (docs/BENCHMARKS.md, "On a real node"). The pools are deleted at the
# end (their pods go through the garbage collector); serve's log is OUT_DIR/serve.log.
set -euo pipefail

log() { echo "bench-node: $*" >&2; }
die() { log "error: $*"; exit 1; }
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root/target/bench-node}
ns=${WARMPOOL_BENCH_NAMESPACE:-warmpool-bench}
jobs=${JOBS:-100}
max_total=${MAX_TOTAL:-45}
warm_min_idle=${WARM_MIN_IDLE:-4}
burst_min_idle=${BURST_MIN_IDLE:-4}
burst_max_total=${BURST_MAX_TOTAL:-10}
# The agent container's CPU request. Without one a pod is BestEffort: its cgroup's CPU weight is
# 2 against 1024 for the kubelet and dockerd. 20m for up to 90 pods fits the node's 2 CPUs.
cpu=${AGENT_CPU_REQUEST:-20m}
bin=$root/target/release/warmpool
image=warmpool-agent:release
[ -x "$bin" ] || die "no $bin (cargo build --release --bin warmpool)"
eval "$("$root/scripts/kube-node.sh" env)"
kubectl get node "$WARMPOOL_NODE_NAME" > /dev/null || die "no node (scripts/kube-node.sh start)"
mkdir -p "$out"
"$root/scripts/agent-image.sh" --release --tag "$image" "$bin" > /dev/null

kubectl get namespace "$ns" > /dev/null 2>&1 || kubectl create namespace "$ns" > /dev/null
until kubectl -n "$ns" get serviceaccount default -o jsonpath='{.secrets[0].name}' 2>/dev/null | grep -q .; do
  sleep 0.5
done
kubectl apply -f "$root/manifests/crd.yaml" > /dev/null
kubectl wait --for condition=Established crd/agentpools.warmpool.dev --timeout 60s > /dev/null

# pool NAME MIN_IDLE MAX_TOTAL: an AgentPool whose agents run $image on the host's network.
pool() {
  cat <<YAML
apiVersion: warmpool.dev/v1alpha1
kind: AgentPool
metadata: {name: $1, namespace: $ns}
spec:
  labels: [linux, bench, $1]
  minIdle: $2
  maxTotal: $3
  maxUses: 1
  provisioning: {perSecond: 50, burst: 20, maxConcurrent: 20}
  template:
    spec:
      hostNetwork: true
      containers:
        - name: agent
          image: $image
          imagePullPolicy: Never
          command: [/usr/local/bin/warmpool, agent]
          resources: {requests: {cpu: $cpu}}
---
YAML
}

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
server=http://127.0.0.1:$port
"$bin" serve --backend kubernetes --namespace "$ns" --leader-elect false \
  --listen "127.0.0.1:$port" --hub-url "ws://127.0.0.1:$port/v1/agents/connect" \
  2> "$out/serve.log" &
serve=$!
cleanup() {
  kill -TERM "$serve" 2> /dev/null && wait "$serve" 2> /dev/null
  kubectl -n "$ns" delete agentpool warm cold burst --ignore-not-found --wait=false > /dev/null || true
}
trap cleanup EXIT
export WARMPOOL_SERVER=$server

# wait_idle POOL N: until POOL has N idle agents.
wait_idle() {
  local i
  for i in $(seq 1 600); do
    "$bin" status -o json 2> /dev/null | python3 -c '
import json, sys
p = {x["name"]: x for x in json.load(sys.stdin)}
sys.exit(0 if sys.argv[1] in p and p[sys.argv[1]]["idle"] >= int(sys.argv[2]) else 1)' "$1" "$2" && return 0
    sleep 0.2
  done
  die "pool $1: not $2 idle agents after 120 s"
}

parts=${PARTS:-warm-cold burst}
if [[ " $parts " == *" warm-cold "* ]]; then
log "1. warm vs cold: $jobs jobs of 'echo hi' at concurrency 2"
{ pool warm "$warm_min_idle" "$max_total"; pool cold 0 "$max_total"; } | kubectl apply -f - > /dev/null
wait_idle warm "$warm_min_idle"
# When each agent container started, from the node's dockerd (its clock is this machine's),
# streamed during the run: dockerd keeps only its last 256 events for `--since`.
docker events --filter type=container --filter event=start \
  --filter label=io.kubernetes.container.name=agent \
  --format '{{.TimeNano}} {{index .Actor.Attributes "io.kubernetes.pod.name"}}' \
  > "$out/container-starts.txt" &
events=$!
"$bin" bench --server "$server" --pods "$ns" \
  --warm-selector 'bench && warm' --cold-selector 'bench && cold' \
  --jobs "$jobs" --concurrency 2 --command 'echo hi' --plot "$out/warm-cold.svg" \
  --json "$out/warm-cold.json" | tee "$out/warm-cold.txt"
kill "$events"; wait "$events" 2> /dev/null || true
python3 - "$out/warm-cold.json" "$out/container-starts.txt" <<'PY' | tee "$out/cold-split.txt"
# The split of each cold job's first byte, in ms from its lease request: pod created (bench's
# pod watch) -> agent container started (dockerd's start event) -> agent connected and leased
# (the lease's 201) -> first byte.
import json, math, sys
r = json.load(open(sys.argv[1]))
starts = {}
for line in open(sys.argv[2]):
    ns, pod = line.split()
    starts.setdefault(pod, int(ns) / 1e6)
origin, pods = r["startedUnixMs"], r["pods"]["pods"]
rows = []
for s in r["samples"]:
    p = pods.get(s.get("agent") or "")
    if s["target"] != "cold" or s.get("error") or not p or p["before"] or p["seenS"] < s["atS"]:
        continue
    if s["agent"] not in starts:
        continue
    t0 = origin + s["atS"] * 1000
    rows.append((p["seenS"] * 1000 - s["atS"] * 1000, starts[s["agent"]] - t0, s["leaseMs"], s["ttfbMs"]))
def pct(v, q):
    v = sorted(v)
    return v[min(len(v), max(1, math.ceil(q / 100 * len(v)))) - 1]
print(f"cold jobs with a new pod: {len(rows)}; ms from the lease request")
print(f"{'milestone':50} {'p50':>8} {'p90':>8} {'p99':>8}")
names = ["pod created", "agent container started", "agent connected, leased", "first byte"]
for i, n in enumerate(names):
    v = [r[i] for r in rows]
    print(f"{n:50} {pct(v, 50):8.1f} {pct(v, 90):8.1f} {pct(v, 99):8.1f}")
print("stages (per job, then percentiles)")
for i in range(4):
    a = "lease request" if i == 0 else names[i - 1]
    v = [r[i] - (r[i - 1] if i else 0) for r in rows]
    print(f"  {a + ' -> ' + names[i]:48} {pct(v, 50):8.1f} {pct(v, 90):8.1f} {pct(v, 99):8.1f}")
PY
kubectl -n "$ns" delete agentpool warm cold --wait=false > /dev/null
# The burst starts on a quiet node: the garbage collector and the kubelet are done with these.
kubectl -n "$ns" wait --for=delete pod -l 'warmpool.dev/pool in (warm,cold)' --timeout 600s > /dev/null 2>&1 || true
fi

if [[ " $parts " == *" burst "* ]]; then
log "2. burst: 20 leases at once on a warm pool of $burst_min_idle (maxTotal $burst_max_total)"
pool burst "$burst_min_idle" "$burst_max_total" | kubectl apply -f - > /dev/null
wait_idle burst "$burst_min_idle"
# Each agent container's start, exit and removal, from dockerd, during the burst.
docker events --filter type=container --filter event=start --filter event=die \
  --filter event=destroy --filter label=io.kubernetes.container.name=agent \
  --format '{{.TimeNano}} {{.Action}} {{index .Actor.Attributes "io.kubernetes.pod.name"}}' \
  > "$out/burst-containers.txt" &
events=$!
"$bin" bench --server "$server" --pods "$ns" --selector 'burst=bench && burst' \
  --jobs 20 --concurrency 20 --command 'echo hi' --json "$out/burst.json" | tee "$out/burst.txt"
sleep 1
kill "$events"; wait "$events" 2> /dev/null || true
fi
log "done: $out"
