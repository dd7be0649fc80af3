#!/usr/bin/env bash
# Provides a real kube-apiserver and etcd for the Kubernetes backend's tests, following the
# envtest convention, and prints the directory that holds both binaries.
#
#   1. $KUBEBUILDER_ASSETS, when it holds kube-apiserver and etcd (a user's envtest binaries);
#   2. otherwise the cache $WARMPOOL_KUBE_ASSETS (default ~/.cache/warmpool/kube-v1.20.2);
#   3. otherwise they are built once into that cache from Debian bookworm's own archive:
#      etcd from the etcd-server package; kube-apiserver v1.20.2 from the `kubernetes` source
#      package, built with golang-1.19 in GOPATH mode. The vendored reflect2 1.0.1 crashes under
#      Go >= 1.18 the first time a custom resource is written, so the vendored reflect2 and
#      json-iterator are replaced by Debian's packaged versions.
#
# Needs root (apt-get) the first time. Takes a few minutes on 2 cores; everything it writes is
# outside the checkout. Progress goes to stderr; only the directory goes to stdout.
set -euo pipefail

log() { echo "kube-assets: $*" >&2; }

have() { [ -x "$1/kube-apiserver" ] && [ -x "$1/etcd" ]; }

if [ -n "${KUBEBUILDER_ASSETS:-}" ]; then
  if have "$KUBEBUILDER_ASSETS"; then echo "$KUBEBUILDER_ASSETS"; exit 0; fi
  log "KUBEBUILDER_ASSETS=$KUBEBUILDER_ASSETS lacks kube-apiserver or etcd; building instead"
fi
version=v1.20.2
cache="${WARMPOOL_KUBE_ASSETS:-$HOME/.cache/warmpool/kube-$version}"
if have "$cache"; then echo "$cache"; exit 0; fi

if [ "$(id -u)" != 0 ]; then
  log "building kube-apiserver needs root for apt-get (or set KUBEBUILDER_ASSETS)"
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
src_list=/etc/apt/sources.list.d/warmpool-bookworm-src.sources
if [ ! -f "$src_list" ]; then
  log "adding deb-src entries for bookworm and bookworm-security"
  cat > "$src_list" <<'EOF'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
fi
log "installing build dependencies"
apt-get update -qq >&2
apt-get install -y -qq --no-install-recommends \
  etcd-server golang-1.19-go rsync dpkg-dev make openssl \
  golang-github-modern-go-reflect2-dev golang-github-json-iterator-go-dev >&2

work=$(mktemp -d /tmp/warmpool-kube-build.XXXXXX)
trap 'rm -rf "$work"' EXIT
cd "$work"
log "fetching the kubernetes source package"
apt-get source -qq --download-only kubernetes >&2
dpkg-source --no-check -x ./kubernetes_*.dsc src >&2
export GOPATH="$work/gopath" GO111MODULE=off GOFLAGS=-mod=vendor GOCACHE="$work/gocache"
export PATH="/usr/lib/go-1.19/bin:$PATH"
unset GOFLAGS
mkdir -p "$GOPATH/src/k8s.io"
ln -s "$work/src" "$GOPATH/src/k8s.io/kubernetes"
cd "$GOPATH/src/k8s.io/kubernetes"

log "replacing the vendored reflect2 and json-iterator with Debian's"
for pkg in github.com/modern-go/reflect2 github.com/json-iterator/go; do
  rm -rf "vendor/$pkg"
  mkdir -p "vendor/$pkg"
  cp -r "/usr/share/gocode/src/$pkg/." "vendor/$pkg/"
done

log "generating the OpenAPI definitions (not in the tarball)"
make gen_openapi >&2

log "building kube-apiserver $version"
# The version is stamped into both packages Kubernetes' own build stamps (hack/lib/version.sh):
# `--version` reads component-base, the apiserver's /version reads client-go.
ldflags="-s -w"
for pkg in k8s.io/kubernetes/vendor/k8s.io/component-base/version \
           k8s.io/kubernetes/vendor/k8s.io/client-go/pkg/version; do
  ldflags="$ldflags -X $pkg.gitVersion=$version -X $pkg.gitMajor=1 -X $pkg.gitMinor=20"
  ldflags="$ldflags -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done
mkdir -p "$cache.partial"
go build -ldflags "$ldflags" -o "$cache.partial/kube-apiserver" ./cmd/kube-apiserver >&2
cp /usr/bin/etcd "$cache.partial/etcd"
rm -rf "$cache"
mv "$cache.partial" "$cache"
log "ready: $cache"
echo "$cache"
