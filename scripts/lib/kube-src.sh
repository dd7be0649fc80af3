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
# Debian packages are downloaded with a private apt configuration and unpacked into the work
# directory (golang-1.19, the two Go libraries, etcd-server): the system's apt sources are not
# changed and none of them is installed. Only missing host tools (KUBE_HOST_PKGS) are installed,
# as root, each change said first.
#
# The caller defines `log` (progress to stderr).

KUBE_VERSION=v1.20.2

# Host tools the build runs, installed from Debian only when missing: make and rsync (the
# kubernetes Makefile), dpkg-dev (dpkg-source unpacks the source package) and openssl (the
# tests run it: tests/support/kube.rs makes the apiserver's service-account key with it).
KUBE_HOST_PKGS="make rsync dpkg-dev openssl"

# Installs the missing host tools, root only. Installed packages are never upgraded
# (--no-upgrade; `apt-get install openssl` used to upgrade an installed openssl, and libssl3
# with it, to the archive's newest). Says every change before making it: the package-list
# refresh, the packages installed, and any installed package apt must upgrade for them. No
# service is started (policy-rc.d denies starts while apt runs).
kube_src_deps() {
  local missing="" p
  for p in $KUBE_HOST_PKGS; do
    dpkg-query -W -f '${Status}' "$p" 2>/dev/null | grep -q '^install ok installed' || missing="$missing $p"
  done
  if [ -z "$missing" ]; then
    log "host tools present ($KUBE_HOST_PKGS): nothing to install"
    return
  fi
  if [ "$(id -u)" != 0 ]; then
    log "missing Debian packages:$missing; as root: apt-get install --no-install-recommends$missing"
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  log "SYSTEM CHANGE: apt-get update (refreshes the package lists in /var/lib/apt/lists)"
  apt-get update -qq >&2
  local plan new up
  # shellcheck disable=SC2086
  plan=$(apt-get install -s --no-upgrade --no-install-recommends $missing)
  new=$(awk '$1 == "Inst" && $3 !~ /^\[/ { printf " %s", $2 }' <<< "$plan")
  up=$(awk '$1 == "Inst" && $3 ~ /^\[/ { gsub(/[][]/, "", $3); sub(/^\(/, "", $4);
            printf " %s (%s -> %s)", $2, $3, $4 }' <<< "$plan")
  log "SYSTEM CHANGE: installing Debian packages:$new"
  [ -z "$up" ] || log "SYSTEM CHANGE: upgrading installed packages they need:$up"
  local policy_added=
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    log "SYSTEM CHANGE: /usr/sbin/policy-rc.d denies service starts while apt runs (removed after)"
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    policy_added=1
  fi
  # shellcheck disable=SC2086
  { apt-get install -y -qq --no-upgrade --no-install-recommends $missing >&2; } || {
    [ -z "$policy_added" ] || rm -f /usr/sbin/policy-rc.d
    log "apt-get install$missing failed"
    exit 1
  }
  [ -z "$policy_added" ] || rm -f /usr/sbin/policy-rc.d
}

# A private apt configuration in $KUBE_WORK/apt: deb and deb-src entries for bookworm and
# bookworm-security in its own sources list, with its own package lists and download cache.
# Nothing under /etc/apt or /var/lib/apt changes, and it needs no root.
kube_apt_setup() {
  local dir=$KUBE_WORK/apt key=/usr/share/keyrings/debian-archive-keyring.gpg
  mkdir -p "$dir/lists/partial" "$dir/cache/archives/partial" "$dir/sources.list.d" "$KUBE_WORK/debs"
  cat > "$dir/sources.list" <<SOURCES
deb [signed-by=$key] http://deb.debian.org/debian bookworm main
deb-src [signed-by=$key] http://deb.debian.org/debian bookworm main
deb [signed-by=$key] http://deb.debian.org/debian-security bookworm-security main
deb-src [signed-by=$key] http://deb.debian.org/debian-security bookworm-security main
SOURCES
  KUBE_APT_OPTS=(-o "Dir::Etc::SourceList=$dir/sources.list"
    -o "Dir::Etc::SourceParts=$dir/sources.list.d" -o "Dir::State::Lists=$dir/lists"
    -o "Dir::Cache=$dir/cache" -o "APT::Sandbox::User=$(id -un)")
  log "fetching bookworm's package lists into a private apt configuration in $dir (/etc/apt and /var/lib/apt unchanged)"
  apt-get "${KUBE_APT_OPTS[@]}" update -qq >&2
}

# Downloads Debian packages $2... with the private configuration and unpacks them into $1 with
# `dpkg-deb -x`: nothing is installed, no maintainer script runs.
kube_unpack() {
  local root=$1 p
  shift
  mkdir -p "$root"
  (cd "$KUBE_WORK/debs" && apt-get "${KUBE_APT_OPTS[@]}" download "$@" >&2)
  for p in "$@"; do
    dpkg-deb -x "$KUBE_WORK/debs/${p}"_*.deb "$root"
  done
}

# Fetches and unpacks the source under $1 (an empty work directory, KUBE_WORK from then on),
# with golang-1.19 and Debian's reflect2 and json-iterator unpacked (not installed) beside it;
# replaces the vendored reflect2 and json-iterator, generates the OpenAPI definitions, and
# leaves the shell in the tree with GOROOT, GOPATH, GOCACHE ($1/gocache) and PATH set for
# `kube_src_build`.
kube_src_prepare() {
  KUBE_WORK=$1
  cd "$KUBE_WORK"
  kube_apt_setup
  local root=$KUBE_WORK/root
  log "unpacking golang-1.19 and Debian's reflect2 and json-iterator into $root (not installed)"
  kube_unpack "$root" golang-1.19-go golang-1.19-src \
    golang-github-modern-go-reflect2-dev golang-github-json-iterator-go-dev
  log "fetching the kubernetes source package"
  apt-get "${KUBE_APT_OPTS[@]}" source -qq --download-only kubernetes >&2
  dpkg-source --no-check -x ./kubernetes_*.dsc src >&2
  export GOROOT="$root/usr/lib/go-1.19"
  export GOPATH="$KUBE_WORK/gopath" GO111MODULE=off GOCACHE="$KUBE_WORK/gocache"
  export PATH="$GOROOT/bin:$PATH"
  unset GOFLAGS
  mkdir -p "$GOPATH/src/k8s.io"
  ln -s "$KUBE_WORK/src" "$GOPATH/src/k8s.io/kubernetes"
  cd "$GOPATH/src/k8s.io/kubernetes"

  log "replacing the vendored reflect2 and json-iterator with Debian's"
  local pkg
  for pkg in github.com/modern-go/reflect2 github.com/json-iterator/go; do
    rm -rf "vendor/$pkg"
    mkdir -p "vendor/$pkg"
    cp -r "$root/usr/share/gocode/src/$pkg/." "vendor/$pkg/"
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

# From the prepared tree, builds kube-apiserver and takes etcd from Debian's etcd-server
# package, unpacked (not installed: installing it would enable and start a system etcd.service),
# into the assets cache $1, atomically.
kube_assets_install() {
  local cache=$1
  rm -rf "$cache.partial"
  mkdir -p "$cache.partial"
  kube_src_build kube-apiserver "$cache.partial/kube-apiserver"
  log "unpacking etcd from Debian's etcd-server package (not installed)"
  kube_unpack "$KUBE_WORK/etcd-server" etcd-server
  cp "$KUBE_WORK/etcd-server/usr/bin/etcd" "$cache.partial/etcd"
  rm -rf "$cache"
  mv "$cache.partial" "$cache"
  log "ready: $cache"
}
