# shellcheck shell=bash
# Sourced by scripts/kube-assets.sh and scripts/kube-node.sh: Debian bookworm's `kubernetes`
# source package (v1.20.2), prepared once for a GOPATH-mode golang-1.19 build, and a builder for
# its commands that stamps the version. Both scripts use one prepared tree and one Go cache per
# run, so kube-node.sh builds kube-apiserver, kubelet, kube-scheduler and kube-controller-manager
# from a single preparation on a fresh machine.
#
# The vendored reflect2 1.0.1 crashes under Go >= 1.18 the first time a custom resource is
# written, so the vendored reflect2 and json-iterator are replaced by Debian's packaged versions.
#
# The caller defines `log` (progress to stderr) and runs as root (apt-get).

KUBE_VERSION=v1.20.2

# Adds the deb-src entries (once) and installs the build dependencies plus any packages given.
kube_src_deps() {
  export DEBIAN_FRONTEND=noninteractive
  local src_list=/etc/apt/sources.list.d/warmpool-bookworm-src.sources
  if [ ! -f "$src_list" ]; then
    log "adding deb-src entries for bookworm and bookworm-security"
    cat > "$src_list" <<'SOURCES'
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
SOURCES
  fi
  log "installing build dependencies"
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends \
    golang-1.19-go rsync dpkg-dev make openssl \
    golang-github-modern-go-reflect2-dev golang-github-json-iterator-go-dev "$@" >&2
}

# Fetches and unpacks the source under $1 (an empty work directory), replaces the vendored
# reflect2 and json-iterator, generates the OpenAPI definitions, and leaves the shell in the
# tree with GOPATH, GOCACHE ($1/gocache) and PATH set for `kube_src_build`.
kube_src_prepare() {
  local work=$1
  cd "$work"
  log "fetching the kubernetes source package"
  apt-get source -qq --download-only kubernetes >&2
  dpkg-source --no-check -x ./kubernetes_*.dsc src >&2
  export GOPATH="$work/gopath" GO111MODULE=off GOCACHE="$work/gocache"
  export PATH="/usr/lib/go-1.19/bin:$PATH"
  unset GOFLAGS
  mkdir -p "$GOPATH/src/k8s.io"
  ln -s "$work/src" "$GOPATH/src/k8s.io/kubernetes"
  cd "$GOPATH/src/k8s.io/kubernetes"

  log "replacing the vendored reflect2 and json-iterator with Debian's"
  local pkg
  for pkg in github.com/modern-go/reflect2 github.com/json-iterator/go; do
    rm -rf "vendor/$pkg"
    mkdir -p "vendor/$pkg"
    cp -r "/usr/share/gocode/src/$pkg/." "vendor/$pkg/"
  done

  log "generating the OpenAPI definitions (not in the tarball)"
  make gen_openapi >&2
}

# Builds command $1 (e.g. kube-apiserver, from ./cmd/$1) into file $2, from the prepared tree.
kube_src_build() {
  local cmd=$1 out=$2
  # The version is stamped into both packages Kubernetes' own build stamps
  # (hack/lib/version.sh): `--version` reads component-base, the apiserver's /version reads
  # client-go.
  local ldflags="-s -w" pkg
  for pkg in k8s.io/kubernetes/vendor/k8s.io/component-base/version \
             k8s.io/kubernetes/vendor/k8s.io/client-go/pkg/version; do
    ldflags="$ldflags -X $pkg.gitVersion=$KUBE_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=20"
    ldflags="$ldflags -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  log "building $cmd $KUBE_VERSION"
  local t0=$SECONDS
  go build -ldflags "$ldflags" -o "$out" "./cmd/$cmd" >&2
  log "built $cmd in $((SECONDS - t0)) s"
}

# The cache kube-assets.sh fills: $WARMPOOL_KUBE_ASSETS, default ~/.cache/warmpool/kube-v1.20.2.
kube_assets_cache() {
  echo "${WARMPOOL_KUBE_ASSETS:-$HOME/.cache/warmpool/kube-$KUBE_VERSION}"
}

# True when directory $1 holds kube-apiserver and etcd.
kube_assets_have() { [ -x "$1/kube-apiserver" ] && [ -x "$1/etcd" ]; }

# From the prepared tree, builds kube-apiserver and copies Debian's etcd (package etcd-server)
# into the assets cache $1, atomically.
kube_assets_install() {
  local cache=$1
  rm -rf "$cache.partial"
  mkdir -p "$cache.partial"
  kube_src_build kube-apiserver "$cache.partial/kube-apiserver"
  cp /usr/bin/etcd "$cache.partial/etcd"
  rm -rf "$cache"
  mv "$cache.partial" "$cache"
  log "ready: $cache"
}
