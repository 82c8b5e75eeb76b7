#!/usr/bin/env bash
# Run the Archipelago e2e suite (pytest -m e2e) against a kind cluster instead of the local
# KWOK control plane. Needs docker (a running engine), kind and kubectl on PATH; the machines this
# project is developed on have no container engine, so there use `e2e/localcluster.py` (make e2e).
#
#   bash e2e/kind.sh [--keep] [pytest args...]
#
#   --keep               leave the kind cluster running afterwards (default: delete it)
#   KIND_CLUSTER_NAME    cluster name (default archipelago-e2e)
#   KIND_NODE_IMAGE      node image, e.g. kindest/node:v1.34.0 (default: kind's own default)
#
# Steps: create the cluster from e2e/kind-config.yaml; give the three workers GPU shapes
# (8x H100, 8x A100-80GB, 4x L4): GFD labels via `kubectl label`, and nvidia.com/gpu in
# status.capacity/allocatable via a JSON patch on the node's /status subresource (the upstream
# "advertise extended resources for a node" recipe; kubelet keeps extended resources it does not
# manage); install crds/*.yaml and wait for Established; run pytest with ARCHIPELAGO_KUBECONFIG.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
name="${KIND_CLUSTER_NAME:-archipelago-e2e}"
keep=0
if [ "${1:-}" = "--keep" ]; then keep=1; shift; fi

die() { echo "kind.sh: $*" >&2; exit 2; }
for tool in docker kind kubectl; do
  command -v "$tool" >/dev/null || die "$tool not found on PATH (kind.sh needs docker, kind and kubectl)"
done
docker info >/dev/null 2>&1 || die "no container engine answers 'docker info'; use 'python e2e/localcluster.py up' instead"

py="$root/.venv/bin/python"
[ -x "$py" ] || py="$(command -v python3)"
run_dir="${ARCHIPELAGO_RUN_DIR:-${ARCHIPELAGO_CACHE:-$HOME/.cache/archipelago}/clusters}/kind-$name"
mkdir -p "$run_dir"
export KUBECONFIG="$run_dir/kubeconfig"

if kind get clusters 2>/dev/null | grep -qx "$name"; then
  echo "kind.sh: reusing kind cluster $name" >&2
  kind export kubeconfig --name "$name" --kubeconfig "$KUBECONFIG"
else
  image_args=()
  [ -n "${KIND_NODE_IMAGE:-}" ] && image_args=(--image "$KIND_NODE_IMAGE")
  kind create cluster --name "$name" --config "$here/kind-config.yaml" --kubeconfig "$KUBECONFIG" \
    --wait 180s "${image_args[@]}"
fi
if [ "$keep" = 0 ]; then
  trap 'kind delete cluster --name "$name" >/dev/null 2>&1 || true' EXIT
fi

# GPU shapes, one per worker: product count memoryMiB family compute-major compute-minor
# (values as in e2e/fleets/demo.yaml: NVML names and memory totals, GFD family names).
shapes=(
  "NVIDIA-H100-80GB-HBM3 8 81559 hopper 9 0"
  "NVIDIA-A100-SXM4-80GB 8 81920 ampere 8 0"
  "NVIDIA-L4 4 23034 ada-lovelace 8 9"
)
mapfile -t workers < <(kubectl get nodes -l '!node-role.kubernetes.io/control-plane' \
                         -o jsonpath='{range .items[*]}{.metadata.name}{"\n"}{end}' | sort)
[ "${#workers[@]}" -ge "${#shapes[@]}" ] || die "expected ${#shapes[@]} workers, found ${#workers[@]}"

for i in "${!shapes[@]}"; do
  read -r product count mem family major minor <<<"${shapes[$i]}"
  node="${workers[$i]}"
  kubectl label node "$node" --overwrite \
    nvidia.com/gpu.present=true nvidia.com/gpu.product="$product" nvidia.com/gpu.count="$count" \
    nvidia.com/gpu.memory="$mem" nvidia.com/gpu.family="$family" nvidia.com/gpu.replicas=1 \
    nvidia.com/gpu.compute.major="$major" nvidia.com/gpu.compute.minor="$minor" \
    archipelago.dev/fleet=kind archipelago.dev/node-group="gpu-$i" >/dev/null
  # "~1" escapes "/" in a JSON-pointer path.
  kubectl patch node "$node" --subresource=status --type=json -p "[
    {\"op\": \"add\", \"path\": \"/status/capacity/nvidia.com~1gpu\", \"value\": \"$count\"},
    {\"op\": \"add\", \"path\": \"/status/allocatable/nvidia.com~1gpu\", \"value\": \"$count\"}]" >/dev/null
  echo "kind.sh: $node -> ${count}x $product" >&2
done
for i in "${!shapes[@]}"; do
  read -r _ count _ <<<"${shapes[$i]}"
  node="${workers[$i]}"
  for _ in $(seq 1 60); do
    got=$(kubectl get node "$node" -o jsonpath='{.status.allocatable.nvidia\.com/gpu}')
    [ "$got" = "$count" ] && break
    sleep 1
  done
  [ "$got" = "$count" ] || die "node $node does not keep nvidia.com/gpu=$count in allocatable (got '$got')"
done

kubectl apply --server-side --force-conflicts -f "$root/crds/"
kubectl wait --for=condition=Established --timeout=60s -f "$root/crds/"

cd "$root"
ARCHIPELAGO_KUBECONFIG="$KUBECONFIG" "$py" -m pytest e2e -m e2e "$@"
