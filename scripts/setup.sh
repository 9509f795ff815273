#!/usr/bin/env bash
# Set up quantkit in ./.venv from the repo's own files.
#   bash scripts/setup.sh         runtime only
#   bash scripts/setup.sh --dev   + test tools (and, as root, Debian's chromium for the report test)
# torch is installed first and pinned (constraints.txt) to the CPU build 2.13.0, so pip never
# replaces it with a multi-GB CUDA build while resolving the other requirements.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt torch
.venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".$extras"
# The HTML report's test opens the page in headless Chromium (tests/report): with --dev, install
# Debian's chromium when this runs as root with apt-get and it is not there yet.
if [ -n "$extras" ] && [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; } >/tmp/quantkit-chromium.log 2>&1; then
    echo "warning: could not install chromium (see /tmp/quantkit-chromium.log); the HTML report's browser check will skip" >&2
  fi
fi
