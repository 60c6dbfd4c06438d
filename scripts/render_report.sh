#!/usr/bin/env bash
# Render a persona-harness HTML report in headless Chromium and save a screenshot.
#   scripts/render_report.sh RUN_DIR_OR_REPORT_HTML [OUT.png] [HEIGHT]
# Writes RUN_DIR/report.html first when given a run directory (no model load: --no-compute).
# Needs chromium (Debian: apt-get install -y chromium). Nothing is fetched from the network.
set -euo pipefail
src="${1:?usage: $0 RUN_DIR|REPORT.html [OUT.png] [HEIGHT]}"
out="${2:-report.png}"
height="${3:-3000}"
here="$(cd "$(dirname "$0")/.." && pwd)"
ph="${PERSONA_HARNESS_BIN:-$here/.venv/bin/persona-harness}"
[ -x "$ph" ] || ph="persona-harness"
if [ -d "$src" ]; then
  "$ph" report "$src" --no-compute
  page="$src/report.html"
else
  page="$src"
fi
page="$(cd "$(dirname "$page")" && pwd)/$(basename "$page")"
browser="$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)"
if [ -z "$browser" ]; then
  echo "chromium not found. Fix: apt-get install -y chromium" >&2
  exit 2
fi
profile="$(mktemp -d)"
trap 'rm -rf "$profile"' EXIT
"$browser" --headless --no-sandbox --disable-gpu --disable-background-networking --disable-component-update \
  --disable-sync --no-first-run --user-data-dir="$profile" --hide-scrollbars \
  --screenshot="$out" --window-size="1200,$height" "file://$page" 2>/dev/null
echo "screenshot: $out (page: $page)"
