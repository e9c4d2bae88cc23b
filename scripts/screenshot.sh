#!/usr/bin/env bash
# Render an HTML report to PNG with headless Chromium (Debian: apt-get install -y chromium), to look at it as a
# user would.  Usage: bash scripts/screenshot.sh runs/demo/report.html out.png [height]
set -euo pipefail
html=$(realpath "$1"); out=${2:-report.png}; h=${3:-2400}
command -v chromium >/dev/null || { echo "chromium is not installed: apt-get install -y chromium" >&2; exit 1; }
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --user-data-dir="$(mktemp -d)" --window-size=1280,"$h" \
  --screenshot="$out" "file://$html" 2>/dev/null
echo "wrote $out"
