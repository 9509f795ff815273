#!/usr/bin/env bash
# Install the peer used by benchmarks/gguf_llamacpp.py and the llama.cpp tests: llama.cpp's Python
# binding, built from source by pip (the package index only has its source; about 10-15 minutes on
# 2 cores). Run after scripts/setup.sh; installs into .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
# CPU build; GGML_NATIVE uses this machine's instruction set. -j2 keeps memory modest.
CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF}" \
CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} \
  "$PY" -m pip install -c constraints.txt "llama-cpp-python==0.3.36"
"$PY" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"
