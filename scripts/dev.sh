#!/usr/bin/env bash
# Set up everything lpm-node needs on a fresh Debian machine (idempotent), then run it.
#   bash scripts/dev.sh test [PYTEST ARGS]   set up, then run the test suite
#   bash scripts/dev.sh ARGS...              set up, then run `lpm-node ARGS...` (e.g. demo, serve)
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(dcmtk orthanc dicom3tools dcm2niix openssl orthanc-dicomweb pixelmed-apps chromium openjdk-17-jdk-headless
              postgresql)
# npm fetches the OHIF build; Debian's npm only where no npm is installed (a NodeSource nodejs ships its own)
command -v npm >/dev/null || APT_PACKAGES+=(npm)
VENV=.venv

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "dev.sh: installing Debian packages: ${missing[*]}" >&2
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "dev.sh: creating $VENV" >&2
  python3 -m venv "$VENV"
fi
stamp="$VENV/.installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "dev.sh: installing lpm-node and its test tools into $VENV (a few minutes the first time)" >&2
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e '.[test]'
  touch "$stamp"
fi

# OHIF for the viewer test: the published build, cached (gitignored); the test skips when it cannot be fetched.
OHIF_VERSION=3.13.2
if [ ! -f .cache/ohif/package/dist/index.html ] && command -v npm >/dev/null; then
  mkdir -p .cache/ohif
  (cd .cache/ohif && npm pack -q "@ohif/app@$OHIF_VERSION" >/dev/null && tar xzf "ohif-app-$OHIF_VERSION.tgz") \
    || echo "dev.sh: could not fetch @ohif/app@$OHIF_VERSION (the viewer test will skip)" >&2
fi

case "${1:-}" in
  test)
    shift
    "$VENV/bin/ruff" check lpm_node tests scripts
    exec "$VENV/bin/python" -m pytest "$@"
    ;;
  "")
    exec "$VENV/bin/lpm-node" --help
    ;;
  *)
    exec "$VENV/bin/lpm-node" "$@"
    ;;
esac
