"""Which GGML type each tensor of a GGUF file gets, for a file type (llama.cpp's "ftype").

The rules follow llama.cpp's quantizer (`llama_tensor_get_type`) for dense Llama-style
models without an importance matrix, so that a quantkit file and a llama.cpp file of the
same type hold the same tensor types and have the same size:

* 1-D tensors (norms, biases) stay F32, and so do routers of experts (ffn_gate_inp).
* Float file types (F32/F16/BF16) store every 2-D tensor in that type.
* The output head (or `token_embd` when the head is tied to it) gets Q6_K; Q8_0 in a Q8_0
  file or when its rows are not a multiple of 256.
* K-quant mixes raise some tensors (layer index i of n, `more(i, n)` = i < n/8 or
  i >= 7n/8 or (i - n/8) % 3 == 2, the first and last eighth and every third in between;
  for 70B-style models, 80 layers with grouped kv heads, an attn_v of Q3_K/Q4_K becomes Q5_K):

      type    base   attn_v                     attn_output  ffn_down
      Q2_K    Q2_K   Q3_K (Q4_K if n_gqa >= 4)  Q3_K         Q3_K
      Q3_K_S  Q3_K   -                          -            -
      Q3_K_M  Q3_K   Q5_K if i < 2 else Q4_K    Q4_K         Q5_K if i < n/16 else Q4_K
      Q3_K_L  Q3_K   Q5_K                       Q5_K         Q5_K
      Q4_K_S  Q4_K   Q5_K if i < 4              -            Q5_K if i < n/8
      Q4_K_M  Q4_K   Q6_K if more(i, n)         -            Q6_K if more(i, n)
      Q5_K_S  Q5_K   -                          -            -
      Q5_K_M  Q5_K   Q6_K if more(i, n)         -            Q6_K if more(i, n)
      Q6_K    Q6_K   -                          -            -

* A tensor whose rows are not a multiple of the type's block (256 for K-quants) falls back
  as llama.cpp does (`tensor_type_fallback` in llama-quant.cpp): Q2_K/Q3_K -> Q4_0,
  Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, and a legacy type that still does not divide ->
  F16. (SmolLM2's width 576 is not a multiple of 256, so its K-quant files are mostly these
  fallbacks, in llama.cpp's files too.)

Checked against the llama.cpp that llama-cpp-python 0.3.36 vendors
(benchmarks/gguf_llamacpp.py prints both files' tensor types side by side).
"""
from __future__ import annotations

import re

from ..errors import SchemeError
from ..formats.ggml import GGML_TYPES
from ..scheme import GGUF_FALLBACK as _FALLBACK

# file type name -> general.file_type value (llama.cpp's llama_ftype)
FTYPES: dict[str, int] = {
    "F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9,
    "Q2_K": 10, "Q3_K_S": 11, "Q3_K_M": 12, "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15,
    "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18, "BF16": 32,
}
_FLOAT = ("F32", "F16", "BF16")
_BASE = {"Q2_K": "Q2_K", "Q3_K_S": "Q3_K", "Q3_K_M": "Q3_K", "Q3_K_L": "Q3_K", "Q4_K_S": "Q4_K",
         "Q4_K_M": "Q4_K", "Q5_K_S": "Q5_K", "Q5_K_M": "Q5_K", "Q6_K": "Q6_K"}
_LAYER = re.compile(r"^blk\.(\d+)\.")


def more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _raised(gname: str, ftype: str, i: int, n: int, n_gqa: int) -> str | None:
    """The type llama.cpp raises tensor `gname` of layer i (of n) to in a file of `ftype`, or None."""
    if gname.endswith("attn_v.weight"):
        t = _attn_v(ftype, i, n, n_gqa) or _BASE.get(ftype, ftype)
        if n == 80 and n_gqa > 1 and t in ("Q3_K", "Q4_K"):  # llama.cpp's 70B rule (80 layers, grouped kv)
            return "Q5_K"
        return t
    return _raised_other(gname, ftype, i, n)


def _attn_v(ftype: str, i: int, n: int, n_gqa: int) -> str | None:
    return {"Q2_K": "Q4_K" if n_gqa >= 4 else "Q3_K",
            "Q3_K_M": "Q5_K" if i < 2 else "Q4_K",
            "Q3_K_L": "Q5_K",
            "Q4_K_S": "Q5_K" if i < 4 else None,
            "Q4_K_M": "Q6_K" if more_bits(i, n) else None,
            "Q5_K_M": "Q6_K" if more_bits(i, n) else None}.get(ftype)


def _raised_other(gname: str, ftype: str, i: int, n: int) -> str | None:
    if gname.endswith("attn_output.weight"):
        return {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K"}.get(ftype)
    if gname.endswith("ffn_down.weight"):
        return {"Q2_K": "Q3_K",
                "Q3_K_M": "Q5_K" if i < n // 16 else "Q4_K",
                "Q3_K_L": "Q5_K",
                "Q4_K_S": "Q5_K" if i < n // 8 else None,
                "Q4_K_M": "Q6_K" if more_bits(i, n) else None,
                "Q5_K_M": "Q6_K" if more_bits(i, n) else None}.get(ftype)
    return None


def _fits(t: str, ncols: int) -> str:
    """The type itself, or llama.cpp's fallback when ncols is not a multiple of its block."""
    seen = set()
    while t not in _FLOAT:
        if t not in GGML_TYPES:
            raise SchemeError(f"GGML type {t} is not implemented in quantkit yet")
        if ncols % GGML_TYPES[t].block == 0:
            return t
        if t in seen:
            break
        seen.add(t)
        t = _FALLBACK.get(t, "F16")
    return t


def tensor_type(gname: str, shape: tuple[int, ...], ftype: str, n_blocks: int, has_output: bool,
                n_gqa: int = 1) -> str:
    """GGML type of tensor `gname` (llama.cpp name) of HF shape (out, in) in a file of `ftype`."""
    if ftype not in FTYPES:
        raise SchemeError(f"unknown GGUF file type {ftype!r}; choose one of {', '.join(FTYPES)}")
    if len(shape) < 2:
        return "F32"
    if ftype in _FLOAT:
        return ftype
    if gname.endswith("ffn_gate_inp.weight"):  # a mixture's router: llama.cpp's quantizer never rounds it
        return "F32"
    ncols = shape[-1]
    if gname == "output.weight" or (not has_output and gname == "token_embd.weight"):
        return "Q8_0" if ftype == "Q8_0" or ncols % GGML_TYPES["Q6_K"].block else "Q6_K"
    base = _BASE.get(ftype, ftype)
    m = _LAYER.match(gname)
    t = (_raised(gname, ftype, int(m.group(1)), n_blocks, n_gqa) if m else None) or base
    return _fits(t, ncols)
