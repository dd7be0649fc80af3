#!/usr/bin/env bash
# Builds the local images for the node of scripts/kube-node.sh and prints the image's name.
# Nothing is pulled: every image is FROM scratch, made of binaries from this machine.
#
#   scripts/agent-image.sh [--release] [--tag NAME] [BINARY]        the agent image
#   scripts/agent-image.sh --docker-cli [--release] [--tag NAME] [BINARY]
#                                         the agent image plus Debian's docker CLI, for the
#                                         Docker-in-Docker example (default warmpool-agent-docker:dev)
#   scripts/agent-image.sh --dind [--tag NAME]
#                                         the Docker-in-Docker sidecar (default warmpool-dind:dev)
#
#   BINARY     default target/debug/warmpool (target/release/warmpool with --release)
#   --tag      default warmpool-agent:dev
#
# The agent image holds the binary as /usr/local/bin/warmpool (the entrypoint), the shared
# libraries `ldd` lists for it at their paths, Debian's static busybox as /bin/sh and the usual
# tools (jobs' scripts run with `sh -c`), /tmp, and the working directory /agent (the agent's
# workspace is /agent/workspace). It differs from the Dockerfile's image: no Debian base, no
# git, no CA certificates, runs as root. Pods use it with `imagePullPolicy: Never`.
#
# The sidecar holds Debian's docker.io daemon (dockerd, containerd, containerd-shim-runc-v2,
# runc, docker-init, the docker CLI) with their libraries, and busybox. Its entrypoint is
# dockerd with the node's own flags (no bridge, no iptables: pods share the host's network)
# and `--oom-score-adjust 0`; its command `--host=unix:///var/run/dind/docker.sock` (share
# /var/run/dind with the agent container through an emptyDir). Mount an emptyDir at
# /var/lib/docker too (overlay2 cannot nest in the container's own overlay root, and the kubelet
# deletes an emptyDir with its pod). It runs privileged. See docs/KUBERNETES.md, "Testing on a real node".
#
# dockerd: $DOCKER_HOST, else the node's (unix://$WARMPOOL_NODE_RUN/docker.sock, default
# /tmp/warmpool-node). Installs busybox-static with apt-get when /bin/busybox is missing (root).
# Progress goes to stderr; only the image name goes to stdout.
set -euo pipefail

log() { echo "agent-image: $*" >&2; }
die() { log "error: $*"; exit 1; }
root=$(cd "$(dirname "$0")/.." && pwd)

profile=debug kind=agent tag= bin=
while [ $# -gt 0 ]; do
  case "$1" in
    --release) profile=release ;;
    --docker-cli) kind=agent-docker ;;
    --dind) kind=dind ;;
    --tag) tag=$2; shift ;;
    -h|--help) sed -n '2,31p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) die "unknown option $1" ;;
    *) bin=$1 ;;
  esac
  shift
done
case "$kind" in
  agent) tag=${tag:-warmpool-agent:dev} ;;
  agent-docker) tag=${tag:-warmpool-agent-docker:dev} ;;
  dind) tag=${tag:-warmpool-dind:dev} ;;
esac
export DOCKER_HOST="${DOCKER_HOST:-unix://${WARMPOOL_NODE_RUN:-/tmp/warmpool-node}/docker.sock}"
docker=/usr/bin/docker
[ -x "$docker" ] || docker=docker
"$docker" version > /dev/null 2>&1 || die "no dockerd answers at $DOCKER_HOST (scripts/kube-node.sh start)"

if [ ! -x /bin/busybox ]; then
  [ "$(id -u)" = 0 ] || die "/bin/busybox is missing: apt-get install busybox-static"
  log "installing Debian's busybox-static (a static /bin/busybox for the image's shell)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends busybox-static >&2
fi
! ldd /bin/busybox > /dev/null 2>&1 || die "/bin/busybox is not static (busybox-static)"

ctx=$(mktemp -d /tmp/warmpool-agent-image.XXXXXX)
trap 'rm -rf "$ctx"' EXIT
rootfs=$ctx/rootfs
mkdir -p "$rootfs/bin" "$rootfs/tmp" "$rootfs/etc"
chmod 1777 "$rootfs/tmp"

# Copies binary $1 to $2 in the image, with every library it loads (the dynamic loader
# included) at the path it is loaded from.
add_binary() {
  local src=$1 dest=$2 lib
  [ -x "$src" ] || die "$src is missing"
  mkdir -p "$rootfs$(dirname "$dest")"
  cp "$src" "$rootfs$dest"
  for lib in $(ldd "$src" 2>/dev/null | grep -oE '/[^ ]+' | sort -u); do
    [ -e "$rootfs$lib" ] && continue
    mkdir -p "$rootfs$(dirname "$lib")"
    cp -L "$lib" "$rootfs$lib"
  done
}

cp /bin/busybox "$rootfs/bin/busybox"
for applet in $(/bin/busybox --list); do
  [ -e "$rootfs/bin/$applet" ] || ln -s busybox "$rootfs/bin/$applet"
done
echo 'root:x:0:0:root:/root:/bin/sh' > "$rootfs/etc/passwd"
echo 'root:x:0:' > "$rootfs/etc/group"

if [ "$kind" = dind ]; then
  [ -x /usr/sbin/dockerd ] || die "Debian's docker.io is not installed (scripts/kube-node.sh build)"
  for b in /usr/sbin/dockerd /usr/bin/containerd /usr/bin/containerd-shim-runc-v2 /usr/bin/runc \
           /usr/bin/docker-init /usr/bin/docker; do
    add_binary "$b" "/usr/local/bin/$(basename "$b")"
  done
  mkdir -p "$rootfs/var/run/dind" "$rootfs/var/lib/docker"
  cat > "$ctx/Dockerfile" <<'DOCKERFILE'
FROM scratch
COPY rootfs /
ENV PATH=/usr/local/bin:/bin
ENTRYPOINT ["/usr/local/bin/dockerd", "--bridge=none", "--iptables=false", "--ip6tables=false", \
  "--ip-masq=false", "--ip-forward=false", "--userland-proxy=false", "--oom-score-adjust=0", \
  "--exec-opt=native.cgroupdriver=cgroupfs"]
CMD ["--host=unix:///var/run/dind/docker.sock"]
DOCKERFILE
  log "building $tag from Debian's docker.io $(dpkg-query -W -f '${Version}' docker.io)"
else
  bin=${bin:-$root/target/$profile/warmpool}
  [ -x "$bin" ] || die "no warmpool binary at $bin (cargo build --bin warmpool$([ "$profile" = release ] && echo ' --release'))"
  add_binary "$bin" /usr/local/bin/warmpool
  if [ "$kind" = agent-docker ]; then
    [ -x /usr/bin/docker ] || die "Debian's docker.io is not installed (scripts/kube-node.sh build)"
    add_binary /usr/bin/docker /usr/local/bin/docker
  fi
  mkdir -p "$rootfs/agent"
  cat > "$ctx/Dockerfile" <<'DOCKERFILE'
FROM scratch
COPY rootfs /
ENV PATH=/usr/local/bin:/bin
WORKDIR /agent
ENTRYPOINT ["/usr/local/bin/warmpool"]
DOCKERFILE
  log "building $tag from $bin ($(du -h "$bin" | cut -f1))"
fi
"$docker" build -q -t "$tag" "$ctx" > /dev/null
echo "$tag"
