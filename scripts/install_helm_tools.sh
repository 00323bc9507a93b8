#!/usr/bin/env bash
# Install the chart test tools, offline-friendly, idempotently:
#   DEST_BIN/helm, DEST_BIN/helm-unittest, DEST_BIN/kubeconform
#       built from the Go module proxy with the versions pinned in deploy/tools/go/go.mod
#       (one module, so helm's large dependency tree is compiled once for both helm and helm-unittest);
#   DEST_BIN/../schemas/
#       kubeconform's JSON schemas: Kubernetes kinds from the kubernetes-validate wheel (PyPI) and the CRDs
#       of LeaderWorkerSet, ServiceMonitor and ScaledObject from their projects' Go module zips.
# GitHub (where these tools and schemas usually come from) is not reachable from CI; PyPI and the Go proxy are.
# Re-running is cheap: a stamp of the inputs skips whatever is already up to date.
#
# usage: bash scripts/install_helm_tools.sh DEST_BIN
set -euo pipefail

dest_bin=${1:?usage: install_helm_tools.sh DEST_BIN}
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$dest_bin"
dest_bin=$(cd "$dest_bin" && pwd)
tools_dir=$(dirname "$dest_bin")
schema_dir="$tools_dir/schemas"
cache_dir="$tools_dir/cache"
gomod_dir="$root/deploy/tools/go"

# Versions of what the schemas come from. Kubernetes: the oldest release the chart supports (Chart.yaml
# kubeVersion) and a recent one, so both an old-API and a removed-field mistake show up.
K8S_SCHEMA_WHEEL="kubernetes-validate==1.37.0"
K8S_VERSIONS="1.30.0 1.36.0"
LWS_MODULE="sigs.k8s.io/lws@v0.9.0"
LWS_CRD="config/crd/bases/leaderworkerset.x-k8s.io_leaderworkersets.yaml"
PROM_MODULE="github.com/prometheus-operator/prometheus-operator@v0.85.0"
PROM_CRD="example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml"
KEDA_MODULE="github.com/kedacore/keda/v2@v2.21.0"
KEDA_CRD="config/crd/bases/keda.sh_scaledobjects.yaml"

step() { printf '  [%s] %s\n' "$(date +%H:%M:%S)" "$*"; }

GO=${GO:-}
if [ -z "$GO" ]; then
  if command -v go >/dev/null 2>&1; then GO=$(command -v go); else GO=/usr/local/go/bin/go; fi
fi
[ -x "$GO" ] || { echo "install_helm_tools: no Go toolchain (set GO=/path/to/go; needs go >= 1.26)" >&2; exit 1; }
export GOFLAGS=-mod=mod
export GOPATH=${GOPATH:-$HOME/go}            # module cache: $HOME/go/pkg/mod, shared across clones
export GOCACHE=${GOCACHE:-$HOME/.cache/go-build}

PYTHON=${PYTHON:-}
if [ -z "$PYTHON" ]; then
  if [ -x "$root/.venv/bin/python" ]; then PYTHON="$root/.venv/bin/python"; else PYTHON=python3; fi
fi

stamp_of() { cat "$@" | sha256sum | cut -d' ' -f1; }

# --- 1. the binaries -------------------------------------------------------------------------------------
bin_stamp=$(stamp_of "$gomod_dir/go.mod" "$gomod_dir/go.sum" "$0")
if [ -x "$dest_bin/helm" ] && [ -x "$dest_bin/helm-unittest" ] && [ -x "$dest_bin/kubeconform" ] \
   && [ "$(cat "$dest_bin/.helm-tools.stamp" 2>/dev/null)" = "$bin_stamp" ]; then
  step "helm, helm-unittest, kubeconform: up to date"
else
  helm_version=$(cd "$gomod_dir" && "$GO" list -m -f '{{.Version}}' helm.sh/helm/v3)
  # The Kubernetes version helm assumes offline (template/lint/unittest capabilities, deprecation checks)
  # is stamped at link time, as helm's own Makefile does; unstamped it would claim Kubernetes 1.20.
  k8s_minor=$(cd "$gomod_dir" && "$GO" list -m -f '{{.Version}}' k8s.io/client-go | cut -d. -f2)
  ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$helm_version"
  for pkg in helm.sh/helm/v3/pkg/chartutil helm.sh/helm/v3/pkg/lint/rules; do
    ldflags="$ldflags -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$k8s_minor"
  done
  step "building helm $helm_version (Kubernetes 1.$k8s_minor), helm-unittest and kubeconform" \
       "with $("$GO" env GOVERSION) (first build: ~3-6 min on 2 cores; later runs reuse $GOCACHE)"
  (cd "$gomod_dir" && GOBIN="$dest_bin" "$GO" install -ldflags "$ldflags" tool)
  echo "$bin_stamp" > "$dest_bin/.helm-tools.stamp"
  step "built: $("$dest_bin/helm" version --short), kubeconform $("$dest_bin/kubeconform" -v)"
fi

# --- 2. the schemas --------------------------------------------------------------------------------------
schema_stamp=$(echo "$K8S_SCHEMA_WHEEL $K8S_VERSIONS $LWS_MODULE $PROM_MODULE $KEDA_MODULE" \
               | cat - "$root/deploy/tools/make_kubeconform_schemas.py" | sha256sum | cut -d' ' -f1)
if [ "$(cat "$schema_dir/.stamp" 2>/dev/null)" = "$schema_stamp" ]; then
  step "kubeconform schemas: up to date"
  exit 0
fi

step "fetching $K8S_SCHEMA_WHEEL (Kubernetes JSON schemas) from PyPI"
mkdir -p "$cache_dir"
"$PYTHON" -m pip download --quiet --no-deps --disable-pip-version-check --dest "$cache_dir" "$K8S_SCHEMA_WHEEL"
wheel=$(ls "$cache_dir"/kubernetes_validate-"${K8S_SCHEMA_WHEEL#*==}"-*.whl | head -n1)

step "fetching CRDs from the Go module proxy: $LWS_MODULE $PROM_MODULE $KEDA_MODULE"
module_dir() {  # module@version -> its unpacked directory in the module cache
  (cd "$cache_dir" && "$GO" mod download -json "$1") | "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["Dir"])'
}
lws_dir=$(module_dir "$LWS_MODULE")
prom_dir=$(module_dir "$PROM_MODULE")
keda_dir=$(module_dir "$KEDA_MODULE")

step "converting schemas into $schema_dir"
rm -rf "$schema_dir.tmp"
k8s_args=()
for v in $K8S_VERSIONS; do k8s_args+=(--k8s-version "$v"); done
"$PYTHON" "$root/deploy/tools/make_kubeconform_schemas.py" --out "$schema_dir.tmp" \
  --k8s-wheel "$wheel" "${k8s_args[@]}" \
  --crd "$lws_dir/$LWS_CRD" --crd "$prom_dir/$PROM_CRD" --crd "$keda_dir/$KEDA_CRD"
echo "$schema_stamp" > "$schema_dir.tmp/.stamp"
rm -rf "$schema_dir"
mv "$schema_dir.tmp" "$schema_dir"
step "schemas ready ($(du -sh "$schema_dir" | cut -f1))"
