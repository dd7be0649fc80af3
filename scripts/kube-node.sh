#!/usr/bin/env bash
# A real single Kubernetes node on this machine, for warmpool's end-to-end tests and benchmarks:
# dockerd, etcd, kube-apiserver, kube-controller-manager, kube-scheduler and a kubelet (v1.20.2,
# dockershim), all on loopback. See docs/KUBERNETES.md, "Testing on a real node".
#
#   scripts/kube-node.sh build   build and cache the binaries, install Debian's docker.io
#   scripts/kube-node.sh start   start the node; returns when it is Ready and untainted
#   scripts/kube-node.sh stop    stop everything start started and restore the machine
#   scripts/kube-node.sh env     shell exports for tests and users: eval "$(scripts/kube-node.sh env)"
#   scripts/kube-node.sh status  which components run
#
# Caches (kept across runs, outside the checkout):
#   ~/.cache/warmpool/kube-v1.20.2      kube-apiserver and etcd (scripts/kube-assets.sh;
#                                       $KUBEBUILDER_ASSETS is honoured as there)
#   ~/.cache/warmpool/node-v1.20.2      kubelet, kube-scheduler, kube-controller-manager, the
#                                       pause binary ($WARMPOOL_NODE_CACHE)
#   ~/.cache/warmpool/node-docker       dockerd's data root: locally built images survive a stop
#                                       ($WARMPOOL_NODE_DOCKER_ROOT)
# Run directory (logs, pids, certificates, tokens, etcd data, the kubelet's root):
#   /tmp/warmpool-node ($WARMPOOL_NODE_RUN). Each component logs to <run>/<component>.log.
#
# Needs root: dockerd and the kubelet are real. Progress goes to stderr.
set -euo pipefail

log() { echo "kube-node: $*" >&2; }
die() { log "error: $*"; exit 1; }
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib/kube-src.sh
. "$here/lib/kube-src.sh"

cache="${WARMPOOL_NODE_CACHE:-$HOME/.cache/warmpool/node-$KUBE_VERSION}"
docker_root="${WARMPOOL_NODE_DOCKER_ROOT:-$HOME/.cache/warmpool/node-docker}"
run="${WARMPOOL_NODE_RUN:-/tmp/warmpool-node}"
# The node's name: it must resolve to 127.0.0.1, because the apiserver reaches the kubelet by
# name (its InternalIP cannot be loopback).
node=localhost
api_port="${WARMPOOL_NODE_API_PORT:-16443}"
etcd_port="${WARMPOOL_NODE_ETCD_PORT:-12379}"
etcd_peer_port=$((etcd_port + 1))
pause_image="warmpool-pause:$KUBE_VERSION"
# The host sysctls the kubelet sets (pkg/kubelet/cm setupKernelTunables); saved before start,
# restored by stop.
sysctls="vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops kernel.keys.root_maxkeys kernel.keys.root_maxbytes"
# Host paths the node creates outside its own directories, whatever the flags say (the
# kubelet's container logs in /var/log/pods with links in /var/log/containers, its device-plugin
# socket in /var/lib/kubelet/device-plugins; dockerd's /run/docker/plugins and its trust key
# /etc/docker/key.json; the container shims' sockets in /run/containerd/s); stop removes the ones
# that did not exist before start.
host_paths="/var/log/pods /var/log/containers /var/lib/kubelet /run/docker /run/containerd /etc/docker/key.json /var/lib/dockershim /etc/kubernetes /usr/libexec/kubernetes"
node_bins="kubelet kube-scheduler kube-controller-manager"

need_root() { [ "$(id -u)" = 0 ] || die "$1 needs root"; }

have_node_bins() {
  local b
  for b in $node_bins pause; do [ -x "$cache/$b" ] || return 1; done
}

# The directory with kube-apiserver and etcd, or empty.
assets_dir() {
  if [ -n "${KUBEBUILDER_ASSETS:-}" ] && kube_assets_have "$KUBEBUILDER_ASSETS"; then
    echo "$KUBEBUILDER_ASSETS"
  elif kube_assets_have "$(kube_assets_cache)"; then
    kube_assets_cache
  fi
}

# The runc wrapper for obstacle 1: this machine's root lacks CAP_SYS_RESOURCE, so no process may
# lower oom_score_adj, and runc fails every container whose OCI config asks for a negative
# oomScoreAdj (the dockershim gives sandboxes -998 and Guaranteed pods -997) with "can't get
# final child's PID from pipe: EOF"; and it fails a privileged container, which asks for every
# capability, with "unable to apply caps: operation not permitted". The wrapper sets a negative
# oomScoreAdj to 0 and, when runc's own bounding set lacks CAP_SYS_RESOURCE, drops that
# capability from the bundle's config; then it execs runc unchanged. Written at each start, into
# the run directory, and set as dockerd's default runtime.
write_runc_wrapper() {
  cat > "$1" <<'WRAPPER'
#!/bin/sh
# warmpool's runc wrapper (scripts/kube-node.sh): this machine cannot lower oom_score_adj nor
# grant CAP_SYS_RESOURCE, so the OCI bundle's config asks for neither; then runc runs as asked.
bundle=
prev=
for a in "$@"; do
  case "$prev" in --bundle|-b) bundle=$a ;; esac
  case "$a" in --bundle=*) bundle=${a#--bundle=} ;; esac
  prev=$a
done
if [ -n "$bundle" ] && [ -f "$bundle/config.json" ]; then
  sed -i -E 's/"oomScoreAdj"[[:space:]]*:[[:space:]]*-[0-9]+/"oomScoreAdj":0/' "$bundle/config.json"
  bnd=$(awk '/^CapBnd:/ {print $2}' /proc/self/status)
  if [ $(( (0x$bnd >> 24) & 1 )) = 0 ]; then
    sed -i 's/,"CAP_SYS_RESOURCE"//g; s/"CAP_SYS_RESOURCE",//g; s/"CAP_SYS_RESOURCE"//g' "$bundle/config.json"
  fi
fi
exec /usr/bin/runc "$@"
WRAPPER
  chmod 755 "$1"
}

cmd_build() {
  need_root build
  export DEBIAN_FRONTEND=noninteractive
  local pkgs="docker.io curl jq gcc libc6-dev openssl" missing="" p
  for p in $pkgs; do
    dpkg-query -W -f '${Status}' "$p" 2>/dev/null | grep -q '^install ok installed' || missing="$missing $p"
  done
  if [ -n "$missing" ]; then
    log "installing from Debian:$missing (docker.io brings dockerd, containerd, runc, tini and the iptables tools; no service is started)"
    local policy_added=
    if [ ! -e /usr/sbin/policy-rc.d ]; then
      # Keep the package scripts from starting a system dockerd with its default bridge network.
      printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
      chmod 755 /usr/sbin/policy-rc.d
      policy_added=1
    fi
    # shellcheck disable=SC2086
    { apt-get update -qq >&2 && apt-get install -y -qq --no-install-recommends $missing >&2; } || {
      [ -z "$policy_added" ] || rm -f /usr/sbin/policy-rc.d
      die "apt-get install$missing failed"
    }
    [ -z "$policy_added" ] || rm -f /usr/sbin/policy-rc.d
  fi

  local assets need_assets=
  assets=$(assets_dir)
  [ -n "$assets" ] || need_assets=1
  if have_node_bins && [ -z "$need_assets" ]; then
    log "cached: $cache and $assets"
    return
  fi
  kube_src_deps
  local work
  work=$(mktemp -d /tmp/warmpool-kube-build.XXXXXX)
  # shellcheck disable=SC2064
  trap "rm -rf '$work'" EXIT
  local t0=$SECONDS
  kube_src_prepare "$work"
  log "source prepared in $((SECONDS - t0)) s"
  if [ -n "$need_assets" ]; then
    kube_assets_install "$(kube_assets_cache)"
  fi
  if ! have_node_bins; then
    rm -rf "$cache.partial"
    mkdir -p "$cache.partial"
    local b
    for b in $node_bins; do kube_src_build "$b" "$cache.partial/$b"; done
    log "building the pause binary (build/pause/linux/pause.c, static)"
    gcc -Os -Wall -Werror -static -DVERSION="$KUBE_VERSION-warmpool" \
      -o "$cache.partial/pause" build/pause/linux/pause.c >&2
    strip "$cache.partial/pause"
    rm -rf "$cache"
    mv "$cache.partial" "$cache"
  fi
  log "built in $((SECONDS - t0)) s: $cache"
}

docker_cli() { /usr/bin/docker -H "unix://$run/docker.sock" "$@"; }

admin_token() { cat "$run/tokens/admin"; }

# GET $1 from the apiserver as admin; prints the body, fails on HTTP errors.
api_get() {
  curl -sf --max-time 5 --cacert "$run/pki/ca.crt" -H "Authorization: Bearer $(admin_token)" \
    "https://127.0.0.1:$api_port$1"
}

# The pid of component $1 when it runs (its pid file names a live process), else nothing.
pid_of() {
  local f="$run/$1.pid" pid
  [ -f "$f" ] || return 1
  pid=$(cat "$f")
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
  echo "$pid"
}

# Starts component $1 with the command that follows, in its own session, logging to
# <run>/$1.log; does nothing when it already runs.
start_component() {
  local name=$1; shift
  if pid=$(pid_of "$name"); then
    log "$name already running (pid $pid)"
    return
  fi
  log "starting $name (log: $run/$name.log)"
  setsid "$@" < /dev/null > "$run/$name.log" 2>&1 &
  echo $! > "$run/$name.pid"
}

# Fails naming component $1 and its log when it is not running.
check_alive() {
  pid_of "$1" > /dev/null && return
  log "error: $1 exited; the end of $run/$1.log:"
  tail -n 20 "$run/$1.log" >&2 || true
  exit 1
}

# Polls `$3...` every 0.5 s until it succeeds, for up to $2 s, while component $1 runs; fails
# naming the component and its log otherwise.
wait_for() {
  local name=$1 timeout=$2; shift 2
  local deadline=$((SECONDS + timeout))
  until "$@" > /dev/null 2>&1; do
    check_alive "$name"
    if [ "$SECONDS" -ge "$deadline" ]; then
      log "error: $name not ready after ${timeout} s ($*); the end of $run/$name.log:"
      tail -n 20 "$run/$name.log" >&2 || true
      exit 1
    fi
    sleep 0.5
  done
}

# Stops component $1: SIGTERM, then SIGKILL after $2 s (default 10).
stop_component() {
  local name=$1 grace=${2:-10} pid
  if pid=$(pid_of "$name"); then
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + grace))
    while kill -0 "$pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then
      log "$name did not stop in ${grace} s; killing it"
      kill -KILL "$pid" 2>/dev/null || true
      while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
    fi
  fi
  rm -f "$run/$name.pid"
}

# A certificate $1.crt/$1.key in <run>/pki signed by the node's CA: subject $2, SANs $3.
issue_cert() {
  local name=$1 subj=$2 sans=${3:-}
  local ext=(-addext "basicConstraints=critical,CA:FALSE"
             -addext "keyUsage=critical,digitalSignature,keyEncipherment"
             -addext "extendedKeyUsage=serverAuth,clientAuth")
  [ -z "$sans" ] || ext+=(-addext "subjectAltName=$sans")
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "$subj" \
    -CA "$run/pki/ca.crt" -CAkey "$run/pki/ca.key" "${ext[@]}" \
    -keyout "$run/pki/$name.key" -out "$run/pki/$name.crt" 2>/dev/null
}

# A kubeconfig <run>/$1.kubeconfig for the user $1 with a bearer token.
write_kubeconfig() {
  local user=$1
  cat > "$run/$user.kubeconfig" <<KUBECONFIG
apiVersion: v1
kind: Config
clusters:
- name: warmpool-node
  cluster:
    server: https://127.0.0.1:$api_port
    certificate-authority: $run/pki/ca.crt
users:
- name: $user
  user:
    token: $(cat "$run/tokens/$user")
contexts:
- name: warmpool-node
  context:
    cluster: warmpool-node
    user: $user
    namespace: default
current-context: warmpool-node
KUBECONFIG
  chmod 600 "$run/$user.kubeconfig"
}

# The CA, serving and client certificates, the service-account key, static tokens and
# kubeconfigs: made once per run directory.
make_credentials() {
  [ -f "$run/admin.kubeconfig" ] && return
  log "making certificates, tokens and kubeconfigs in $run"
  mkdir -p "$run/pki" "$run/tokens"
  chmod 700 "$run/pki" "$run/tokens"
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=warmpool-node-ca" \
    -keyout "$run/pki/ca.key" -out "$run/pki/ca.crt" 2>/dev/null
  issue_cert apiserver "/CN=kube-apiserver" "DNS:localhost,IP:127.0.0.1"
  # The apiserver's client certificate towards the kubelet (logs, exec).
  issue_cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client"
  # The kubelet's serving certificate, for its name: the apiserver checks it.
  issue_cert kubelet "/CN=$node" "DNS:$node,IP:127.0.0.1"
  openssl genrsa -out "$run/pki/sa.key" 2048 2>/dev/null
  local u
  for u in admin node kube-controller-manager kube-scheduler; do
    openssl rand -hex 24 > "$run/tokens/$u"
  done
  # The kubelet authenticates as system:node:<name> (the Node authorizer and NodeRestriction
  # admission apply to it); the controllers as their RBAC-bootstrapped users.
  {
    echo "$(cat "$run/tokens/admin"),admin,admin,\"system:masters\""
    echo "$(cat "$run/tokens/node"),system:node:$node,node-$node,\"system:nodes\""
    echo "$(cat "$run/tokens/kube-controller-manager"),system:kube-controller-manager,kube-controller-manager"
    echo "$(cat "$run/tokens/kube-scheduler"),system:kube-scheduler,kube-scheduler"
  } > "$run/tokens/tokens.csv"
  for u in node kube-controller-manager kube-scheduler admin; do write_kubeconfig "$u"; done
}

# Records what start changes on the host, once (a start after a failed start keeps the first
# record): the kubelet's sysctls, and which of $host_paths and top-level cgroups exist.
save_host_state() {
  if [ ! -f "$run/host.sysctls" ]; then
    log "saving the sysctls the kubelet changes: $sysctls"
    local s
    for s in $sysctls; do echo "$s=$(sysctl -n "$s")"; done > "$run/host.sysctls.partial"
    mv "$run/host.sysctls.partial" "$run/host.sysctls"
  fi
  if [ ! -f "$run/host.paths" ]; then
    local p
    for p in $host_paths /sys/fs/cgroup/*/kubepods /sys/fs/cgroup/*/docker; do
      [ -e "$p" ] && echo "$p"
    done > "$run/host.paths.partial" || true
    mv "$run/host.paths.partial" "$run/host.paths"
  fi
}

node_ready() {
  api_get "/api/v1/nodes/$node" | jq -e '
    ([.status.conditions[] | select(.type == "Ready" and .status == "True")] | length == 1)
    and ([.spec.taints[]? | select(.key | startswith("node.kubernetes.io/"))] | length == 0)'
}

# The `default` service account has its token (pods can be admitted).
default_sa_ready() {
  api_get /api/v1/namespaces/default/serviceaccounts/default | jq -e '(.secrets // []) | length > 0'
}

pause_image_ready() { docker_cli image inspect "$pause_image"; }

build_pause_image() {
  pause_image_ready > /dev/null 2>&1 && return
  log "building the pause image $pause_image (FROM scratch)"
  local ctx
  ctx=$(mktemp -d)
  cp "$cache/pause" "$ctx/pause"
  printf 'FROM scratch\nCOPY pause /pause\nENTRYPOINT ["/pause"]\n' > "$ctx/Dockerfile"
  docker_cli build -q -t "$pause_image" "$ctx" >&2
  rm -rf "$ctx"
}

cmd_start() {
  need_root start
  have_node_bins || die "the node's binaries are not built: run scripts/kube-node.sh build"
  local assets
  assets=$(assets_dir)
  [ -n "$assets" ] || die "kube-apiserver and etcd are missing: run scripts/kube-node.sh build"
  [ -x /usr/sbin/dockerd ] || die "dockerd is missing: run scripts/kube-node.sh build"
  local t0=$SECONDS
  mkdir -p "$run" "$docker_root"
  chmod 700 "$run"
  save_host_state
  make_credentials

  echo '{}' > "$run/docker-daemon.json"
  write_runc_wrapper "$run/runc-wrapper"
  start_component dockerd /usr/sbin/dockerd \
    --config-file "$run/docker-daemon.json" \
    --host "unix://$run/docker.sock" --data-root "$docker_root" --exec-root "$run/docker-exec" \
    --pidfile "$run/docker-exec.pid" --storage-driver overlay2 \
    --bridge=none --iptables=false --ip6tables=false --ip-masq=false --ip-forward=false \
    --userland-proxy=false --exec-opt native.cgroupdriver=cgroupfs \
    --add-runtime "warmpool-runc=$run/runc-wrapper" --default-runtime warmpool-runc \
    --oom-score-adjust 0
  wait_for dockerd 60 docker_cli version
  build_pause_image

  start_component etcd "$assets/etcd" --data-dir "$run/etcd" --name default \
    --listen-client-urls "http://127.0.0.1:$etcd_port" \
    --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$etcd_peer_port" \
    --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer_port" \
    --initial-cluster "default=http://127.0.0.1:$etcd_peer_port"
  wait_for etcd 60 curl -sf --max-time 2 "http://127.0.0.1:$etcd_port/health"

  start_component kube-apiserver "$assets/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:$etcd_port" \
    --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$api_port" \
    --tls-cert-file "$run/pki/apiserver.crt" --tls-private-key-file "$run/pki/apiserver.key" \
    --client-ca-file "$run/pki/ca.crt" --token-auth-file "$run/tokens/tokens.csv" \
    --authorization-mode Node,RBAC --enable-admission-plugins NodeRestriction \
    --allow-privileged=true \
    --service-cluster-ip-range 10.0.0.0/24 --endpoint-reconciler-type none \
    --service-account-issuer https://kubernetes.default.svc \
    --service-account-signing-key-file "$run/pki/sa.key" \
    --service-account-key-file "$run/pki/sa.key" \
    --kubelet-preferred-address-types Hostname \
    --kubelet-certificate-authority "$run/pki/ca.crt" \
    --kubelet-client-certificate "$run/pki/apiserver-kubelet-client.crt" \
    --kubelet-client-key "$run/pki/apiserver-kubelet-client.key"
  wait_for kube-apiserver 90 api_get /readyz

  start_component kube-controller-manager "$cache/kube-controller-manager" \
    --kubeconfig "$run/kube-controller-manager.kubeconfig" \
    --bind-address 127.0.0.1 --port 0 --cert-dir "$run/kube-controller-manager-certs" \
    --flex-volume-plugin-dir "$run/kubelet-plugins" \
    --leader-elect=false --use-service-account-credentials \
    --service-account-private-key-file "$run/pki/sa.key" --root-ca-file "$run/pki/ca.crt"
  start_component kube-scheduler "$cache/kube-scheduler" \
    --kubeconfig "$run/kube-scheduler.kubeconfig" \
    --bind-address 127.0.0.1 --port 0 --cert-dir "$run/kube-scheduler-certs" \
    --leader-elect=false
  wait_for kube-controller-manager 60 default_sa_ready
  check_alive kube-scheduler

  # --kube-api-qps/--kube-api-burst: the kubelet's defaults since Kubernetes 1.27 (50/100,
  # kubernetes/kubernetes#116121); v1.20's 5/10 paced every pod status update and delete to a
  # few a second, so a pod whose agent had exited kept counting toward maxTotal for seconds.
  start_component kubelet "$cache/kubelet" \
    --kubeconfig "$run/node.kubeconfig" --hostname-override "$node" \
    --root-dir "$run/kubelet" --cert-dir "$run/kubelet-pki" \
    --tls-cert-file "$run/pki/kubelet.crt" --tls-private-key-file "$run/pki/kubelet.key" \
    --client-ca-file "$run/pki/ca.crt" --anonymous-auth=false --authorization-mode AlwaysAllow \
    --address 127.0.0.1 --healthz-bind-address 127.0.0.1 --read-only-port 0 \
    --container-runtime docker --docker-endpoint "unix://$run/docker.sock" \
    --experimental-dockershim-root-directory "$run/dockershim" \
    --pod-infra-container-image "$pause_image" \
    --cgroup-driver cgroupfs --fail-swap-on=false --make-iptables-util-chains=false \
    --volume-plugin-dir "$run/kubelet-plugins" \
    --image-gc-high-threshold 100 --image-gc-low-threshold 99 \
    --kube-api-qps 50 --kube-api-burst 100 \
    --eviction-hard "memory.available<100Mi,nodefs.available<5%,imagefs.available<5%"
  wait_for kubelet 120 node_ready
  check_alive kube-scheduler
  check_alive kube-controller-manager
  log "node $node Ready in $((SECONDS - t0)) s; eval \"\$($0 env)\" for KUBECONFIG and DOCKER_HOST"
}

# Removes cgroup directory $1 and everything under it, deepest first (only empty cgroups go).
remove_cgroup_tree() {
  [ -d "$1" ] || return 0
  find "$1" -depth -type d -exec rmdir {} \; 2>/dev/null || true
}

cmd_stop() {
  need_root stop
  [ -d "$run" ] || { log "nothing to stop: no $run"; return; }
  stop_component kubelet 20
  if pid_of dockerd > /dev/null; then
    local ids
    ids=$(docker_cli ps -aq 2>/dev/null || true)
    if [ -n "$ids" ]; then
      log "removing the node's containers: $(echo "$ids" | wc -l)"
      # shellcheck disable=SC2086
      docker_cli rm -f $ids > /dev/null 2>&1 || true
    fi
    docker_cli volume prune -f > /dev/null 2>&1 || true
  fi
  stop_component kube-scheduler
  stop_component kube-controller-manager
  stop_component kube-apiserver
  stop_component etcd
  stop_component dockerd 30
  # Container shims of a killed dockerd, if any.
  local p
  for p in $(pgrep -f "containerd-shim.*$run" || true); do kill -KILL "$p" 2>/dev/null || true; done

  local m
  for m in $(findmnt -rn -o TARGET | grep -E "^($run|$docker_root)(/|$)" | sort -r); do
    log "unmounting $m"
    umount "$m" 2>/dev/null || umount -l "$m" || log "could not unmount $m"
  done

  if [ -f "$run/host.sysctls" ]; then
    log "restoring sysctls: $(tr '\n' ' ' < "$run/host.sysctls")"
    local kv
    while read -r kv; do sysctl -q -w "$kv" > /dev/null || log "could not restore $kv"; done \
      < "$run/host.sysctls"
    rm -f "$run/host.sysctls"
  fi
  if [ -f "$run/host.paths" ]; then
    for p in $host_paths /sys/fs/cgroup/*/kubepods /sys/fs/cgroup/*/docker; do
      if [ -e "$p" ] && ! grep -qx "$p" "$run/host.paths"; then
        log "removing $p (start created it)"
        case "$p" in
          /sys/fs/cgroup/*) remove_cgroup_tree "$p" ;;
          *) rm -rf "$p" ;;
        esac
      fi
    done
    rm -f "$run/host.paths"
  fi
  # Keep the logs for a post-mortem; drop the state (etcd, kubelet, credentials).
  find "$run" -mindepth 1 -maxdepth 1 ! -name '*.log' -exec rm -rf {} +
  log "stopped; logs kept in $run"
}

cmd_env() {
  [ -f "$run/admin.kubeconfig" ] || die "the node is not started (no $run/admin.kubeconfig): run scripts/kube-node.sh start"
  cat <<ENV
export KUBECONFIG=$run/admin.kubeconfig
export WARMPOOL_NODE_KUBECONFIG=$run/admin.kubeconfig
export WARMPOOL_NODE_NAME=$node
export DOCKER_HOST=unix://$run/docker.sock
ENV
}

cmd_status() {
  local c rc=0
  for c in dockerd etcd kube-apiserver kube-controller-manager kube-scheduler kubelet; do
    if pid=$(pid_of "$c"); then echo "$c running (pid $pid)"; else echo "$c stopped"; rc=1; fi
  done
  return $rc
}

case "${1:-}" in
  build) cmd_build ;;
  start) cmd_start ;;
  stop) cmd_stop ;;
  env) cmd_env ;;
  status) cmd_status ;;
  *) echo "usage: $0 build|start|stop|env|status" >&2; exit 2 ;;
esac
