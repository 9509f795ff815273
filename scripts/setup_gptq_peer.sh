#!/usr/bin/env bash
# A separate environment (.venv-gptq) with quantkit + the GPTQ layout's peer loader (optimum +
# gptqmodel 7.6.0, the last release that accepts torch 2.13; its dependency pypcre builds a small
# C extension). Runs the test that loads quantkit's GPTQ export through transformers' own loader:
#   bash scripts/setup_gptq_peer.sh && .venv-gptq/bin/python -m pytest tests/io/test_io_export_hf.py -k gptq_loader
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv-gptq/bin/python ] || "$python" -m venv .venv-gptq
.venv-gptq/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt torch
.venv-gptq/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev,gptq-peer]"
