#!/usr/bin/env bash
# Provides a real kube-apiserver and etcd for the Kubernetes backend's tests, following the
# envtest convention, and prints the directory that holds both binaries.
#
#   1. $KUBEBUILDER_ASSETS, when it holds kube-apiserver and etcd (a user's envtest binaries);
#   2. otherwise the cache $WARMPOOL_KUBE_ASSETS (default ~/.cache/warmpool/kube-v1.20.2);
#   3. otherwise they are built once into that cache from Debian bookworm's own archive:
#      etcd from the etcd-server package; kube-apiserver v1.20.2 from the `kubernetes` source
#      package, built with golang-1.19 in GOPATH mode (scripts/lib/kube-src.sh, shared with
#      scripts/kube-node.sh, which builds the same cache on its way).
#
# Needs root (apt-get) the first time. Takes a few minutes on 2 cores; everything it writes is
# outside the checkout. Progress goes to stderr; only the directory goes to stdout.
set -euo pipefail

log() { echo "kube-assets: $*" >&2; }
# shellcheck source=lib/kube-src.sh
. "$(dirname "$0")/lib/kube-src.sh"

if [ -n "${KUBEBUILDER_ASSETS:-}" ]; then
  if kube_assets_have "$KUBEBUILDER_ASSETS"; then echo "$KUBEBUILDER_ASSETS"; exit 0; fi
  log "KUBEBUILDER_ASSETS=$KUBEBUILDER_ASSETS lacks kube-apiserver or etcd; building instead"
fi
cache=$(kube_assets_cache)
if kube_assets_have "$cache"; then echo "$cache"; exit 0; fi

if [ "$(id -u)" != 0 ]; then
  log "building kube-apiserver needs root for apt-get (or set KUBEBUILDER_ASSETS)"
  exit 1
fi
kube_src_deps etcd-server
work=$(mktemp -d /tmp/warmpool-kube-build.XXXXXX)
trap 'rm -rf "$work"' EXIT
kube_src_prepare "$work"
kube_assets_install "$cache"
echo "$cache"
