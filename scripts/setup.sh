#!/usr/bin/env bash
# Set up quantkit in ./.venv from the repo's own files.
#   bash scripts/setup.sh         runtime only
#   bash scripts/setup.sh --dev   + test tools
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
