#!/usr/bin/env bash
# A separate environment (.venv-peers) with quantkit + the peers that benchmarks/peer_models.py builds:
# torchao, HQQ, optimum-quanto, ONNX Runtime (+ onnx/onnxscript: torch.onnx's exporter makes the graph
# with its KV cache, since optimum-onnx pins transformers<4.58 and quantkit needs transformers>=5),
# bitsandbytes (its CPU backend) and llama-cpp-python (built from source; pip's wheel cache makes a
# rebuild instant, else about 10-15 minutes on 2 cores). Versions are pinned to releases that work with
# the CPU build of torch 2.13.0; every install is constrained by constraints.txt so torch stays that build.
#   bash benchmarks/setup_peers.sh && .venv-peers/bin/python benchmarks/peers.py
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv-peers/bin/python ] || "$python" -m venv .venv-peers
PIP=(.venv-peers/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt)
# torch first, so that resolving the rest never pulls a CUDA build
"${PIP[@]}" "torch==2.13.0"
"${PIP[@]}" -e ".[peers]"
# CPU build; GGML_NATIVE uses this machine's instruction set. -j2 keeps memory modest. On CPUs with AMX
# (Sapphire Rapids and later Xeons) llama.cpp's AMX matmul crashes with SIGSEGV in the VMs here
# (ggml_backend_amx_mul_mat, llama-cpp-python 0.3.36, 2026-12-03), so there the build names the ISA
# itself (AVX-512 with VNNI/BF16, no AMX) instead of -march=native.
default_cmake="-DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF"
if grep -qw amx_tile /proc/cpuinfo 2>/dev/null; then
  default_cmake="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON \
-DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF"
  # an AMX build already installed (e.g. from pip's wheel cache): build again, without AMX
  if .venv-peers/bin/python -c "import llama_cpp, sys; sys.exit(b'AMX_INT8 = 1' not in llama_cpp.llama_print_system_info())" 2>/dev/null; then
    EXTRA_PIP=(--no-cache-dir --force-reinstall --no-deps)
  fi
fi
CMAKE_ARGS="${CMAKE_ARGS:-$default_cmake}" \
CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} \
  "${PIP[@]}" ${EXTRA_PIP[@]+"${EXTRA_PIP[@]}"} "llama-cpp-python==0.3.36"
.venv-peers/bin/python - <<'PY'
from importlib.metadata import version
import torch
assert torch.__version__.startswith("2.13.0"), torch.__version__
import bitsandbytes, hqq, llama_cpp, onnxruntime, onnxscript, optimum.quanto, quantkit, torchao  # noqa: F401
print(" ".join(f"{p}=={version(p)}" for p in ("torch", "torchao", "hqq", "optimum-quanto", "onnxruntime", "onnx",
                                            "onnxscript", "bitsandbytes", "llama_cpp_python", "transformers")))
PY
