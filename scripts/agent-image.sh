#!/usr/bin/env bash
# Builds a local agent image for the node of scripts/kube-node.sh, from a warmpool binary built
# on this machine, and prints the image's name. Nothing is pulled: the image is FROM scratch.
#
#   scripts/agent-image.sh [--release] [--tag NAME] [BINARY]
#
#   BINARY     default target/debug/warmpool (target/release/warmpool with --release)
#   --tag      default warmpool-agent:dev
#
# The image holds the binary as /usr/local/bin/warmpool (the entrypoint), the shared libraries
# `ldd` lists for it at their paths, Debian's static busybox as /bin/sh and the usual tools
# (jobs' scripts run with `sh -c`), /tmp, and the working directory /agent (the agent's
# workspace is /agent/workspace). It differs from the Dockerfile's image: no Debian base, no
# git, no CA certificates, runs as root. Pods use it with `imagePullPolicy: Never`.
#
# dockerd: $DOCKER_HOST, else the node's (unix://$WARMPOOL_NODE_RUN/docker.sock, default
# /tmp/warmpool-node). Installs busybox-static with apt-get when /bin/busybox is missing (root).
# Progress goes to stderr; only the image name goes to stdout.
set -euo pipefail

log() { echo "agent-image: $*" >&2; }
die() { log "error: $*"; exit 1; }
root=$(cd "$(dirname "$0")/.." && pwd)

profile=debug tag=warmpool-agent:dev bin=
while [ $# -gt 0 ]; do
  case "$1" in
    --release) profile=release ;;
    --tag) tag=$2; shift ;;
    -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) die "unknown option $1" ;;
    *) bin=$1 ;;
  esac
  shift
done
bin=${bin:-$root/target/$profile/warmpool}
[ -x "$bin" ] || die "no warmpool binary at $bin (cargo build --bin warmpool${profile/debug/}${profile/release/ --release})"
export DOCKER_HOST="${DOCKER_HOST:-unix://${WARMPOOL_NODE_RUN:-/tmp/warmpool-node}/docker.sock}"
docker=/usr/bin/docker
[ -x "$docker" ] || docker=docker
"$docker" version > /dev/null 2>&1 || die "no dockerd answers at $DOCKER_HOST (scripts/kube-node.sh start)"

if [ ! -x /bin/busybox ]; then
  [ "$(id -u)" = 0 ] || die "/bin/busybox is missing: apt-get install busybox-static"
  log "installing Debian's busybox-static (a static /bin/busybox for the image's shell)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends busybox-static >&2
fi
file -L /bin/busybox 2>/dev/null | grep -q 'statically linked' \
  || ldd /bin/busybox 2>&1 | grep -q 'not a dynamic' || die "/bin/busybox is not static"

ctx=$(mktemp -d /tmp/warmpool-agent-image.XXXXXX)
trap 'rm -rf "$ctx"' EXIT
mkdir -p "$ctx/rootfs/usr/local/bin" "$ctx/rootfs/bin" "$ctx/rootfs/tmp" "$ctx/rootfs/agent"
chmod 1777 "$ctx/rootfs/tmp"
cp "$bin" "$ctx/rootfs/usr/local/bin/warmpool"
# Every library the binary loads, the dynamic loader included, at the path it is loaded from.
libs=$(ldd "$bin" | grep -oE '/[^ ]+' | sort -u)
for lib in $libs; do
  mkdir -p "$ctx/rootfs$(dirname "$lib")"
  cp -L "$lib" "$ctx/rootfs$lib"
done
cp /bin/busybox "$ctx/rootfs/bin/busybox"
for applet in $(/bin/busybox --list); do
  [ -e "$ctx/rootfs/bin/$applet" ] || ln -s busybox "$ctx/rootfs/bin/$applet"
done
cat > "$ctx/Dockerfile" <<'DOCKERFILE'
FROM scratch
COPY rootfs /
ENV PATH=/usr/local/bin:/bin
WORKDIR /agent
ENTRYPOINT ["/usr/local/bin/warmpool"]
DOCKERFILE
log "building $tag from $bin ($(du -h "$bin" | cut -f1); libraries: $(echo "$libs" | tr '\n' ' '))"
"$docker" build -q -t "$tag" "$ctx" >&2
echo "$tag"
