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
# What the build changes on the system, each said on stderr ("SYSTEM CHANGE: ...") before it is
# done: only when a host tool (make, rsync, dpkg-dev, openssl) is missing, `apt-get update` and
# `apt-get install --no-upgrade` of the missing ones, as root. The etcd-server, golang-1.19 and
# Go library packages, and the kubernetes source, are downloaded with a private apt
# configuration in a temporary directory and unpacked there, not installed: no apt source is
# added, no installed package is upgraded, no etcd.service is enabled or started. Takes a few
# minutes on 2 cores; everything else it writes is outside the checkout, in the cache and a
# temporary directory. Progress goes to stderr; only the directory goes to stdout.
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

log "no kube-apiserver and etcd in $cache: building them there (a few minutes)"
kube_src_deps
work=$(mktemp -d /tmp/warmpool-kube-build.XXXXXX)
trap 'rm -rf "$work"' EXIT
kube_src_prepare "$work"
kube_assets_install "$cache"
echo "$cache"
