"""`NativeKernel`: every weight-only layout quantkit stores, through quantkit's C++ ops.

Integer codes of 2-8 bits (per channel, per tensor or in groups, symmetric or affine),
nf4/fp4 blocks with or without double quant, fp8 e4m3/e5m2: `torch.ops.quantkit.wonly_linear`
(kernels/wonly.cpp) decodes each weight row from its stored codes while it multiplies, in
fp32, computing every weight exactly as the codec's dequantize does. So its results are
F.linear(x, dequantized W) up to the order of the fp32 sums, and no float copy of W exists.

The layer's buffers are the storage tensors themselves (st_<part>): the codes of 4-bit
integer, nf4 and fp4 weights with an even row length, and of every byte-wide layout, are used
as stored. 2- and 3-bit codes (and odd row lengths) are repacked once into 4-bit rows
("codes"), from which `unpack` gives the storage back exactly.

The int8-activation option (`QuantLinear.set_activations("int8")`, `quantkit.set_activations`)
runs `torch.ops.quantkit.wonly_linear_a8` instead where a layout has it (integer codes and
16-level codebooks in groups of a multiple of 32): the input quantized per block of 32-128
values to int8 and multiplied with the stored codes in integers (wonly_a8.h), as llama.cpp
does. It is approximate (its cost is measured by benchmarks/decode_speed.py) and serves up to
MAX_FUSED_ROWS input rows; more rows (prefill) keep the exact path, which is faster there
("int8-all" runs every call through it, for quality measurements).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..formats import QuantizedWeight
from ..formats import packing
from ..formats.codebook import LEVELS
from ..formats.integer import from_int_codes, group_len
from ..scheme import Scheme
from . import native
from .cpu import Kernel

INT_NIB, LUT_NIB, U8, S8, E4M3, E5M2 = range(6)
# Input rows up to which the fused decode-and-multiply runs; from here torch's fp32 GEMM on
# weights dequantized a chunk at a time (inside the same op) is faster. Measured on SmolLM2's
# shapes by benchmarks/kernels.py (2-core Xeon with AVX-512, 2026-12-03).
MAX_FUSED_ROWS = 16


def _int_layout(s: Scheme) -> tuple[int, float]:
    """(decode, zconst) of an integer scheme: the stored code's layout and the value its
    symmetric codes are stored offset by (affine codes subtract their stored zero instead)."""
    off = float(2 ** (s.bits - 1)) if s.symmetric and s.bits < 8 else 0.0
    if s.bits <= 4:
        return INT_NIB, off
    return (S8 if s.bits == 8 and s.symmetric else U8), off


def _nibble_rows(codes: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """uint8 codes [n, k] (values < 16) as rows of ceil(k/2) bytes, low nibble first."""
    if k % 2:
        codes = torch.cat([codes, codes.new_zeros(n, 1)], 1)
    return packing.pack(codes.contiguous(), 4).view(n, -1)


# GGUF's legacy block types (32 values, float16 d, codes q): (decode, zconst, stored code = q - qmin).
# w = d * q (+ m): Q8_0 int8 codes; Q4_0 / Q4_1 4-bit rows; Q5_0 / Q5_1 one byte per code.
# Q4_K / Q5_K: per sub-block of 32, fp32 s = d·sc and b = -dmin·m (w = s·q + b), with the blocks'
# 16-byte headers kept to give the bytes back (6.5 / 7.5 bits a weight held, against 4.5 / 5.5).
_GGML = {"Q8_0": (S8, 0.0), "Q4_0": (INT_NIB, 8.0), "Q4_1": (INT_NIB, 0.0), "Q5_0": (U8, 16.0), "Q5_1": (U8, 0.0),
         "Q4_K": (INT_NIB, 0.0), "Q5_K": (U8, 0.0), "IQ4_NL": (LUT_NIB, 0.0)}  # IQ4_NL: d * levels[q]
GGUF_TYPES = tuple(_GGML)  # the GGUF block types NativeKernel runs


def _ggml_split(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """GGUF block bytes -> the kernel's layout: codes (int8 [n, k], 4-bit rows, or uint8 [n, k]), the
    blocks' float16 d ("d16" [n, k/32]) and, for the _1 types, m ("m16"). Same bytes in all
    (Q5_x: one byte per code instead of five bits)."""
    from ..formats.ggml import LINEAR_GRIDS
    from ..formats.ggml_k import K4_TYPES, k4_parts

    (n, k), t = qw.shape, qw.scheme.fp_format
    if t == "IQ4_NL":  # blocks of 32: float16 d, then codes 0..15 low nibbles and 16..31 high
        from ..formats.ggml_k import IQ4_LEVELS

        b = qw.tensors["qweight"].reshape(-1, 18)
        q = torch.cat([b[:, 2:18] & 0x0F, b[:, 2:18] >> 4], dim=1).reshape(n, k)
        return {"codes": _nibble_rows(q, n, k), "d16": b[:, 0:2].contiguous().view(torch.float16).reshape(n, k // 32),
                "lut": IQ4_LEVELS.clone()}
    if t in K4_TYPES:
        b = qw.tensors["qweight"].reshape(-1, 144 if t == "Q4_K" else 176)  # [n * k/256, nbytes]
        q, sc, bias = k4_parts(b, t)
        codes = q.reshape(n, k)
        return {"codes": _nibble_rows(codes.to(torch.uint8), n, k) if t == "Q4_K" else codes.to(torch.uint8).contiguous(),
                "s32": sc.reshape(n, k // 32).contiguous(), "b32": bias.reshape(n, k // 32).contiguous(),
                "hdr": b[:, :16].contiguous().reshape(n, -1)}
    g = LINEAR_GRIDS[t]
    b = qw.tensors["qweight"].reshape(-1, g.nbytes)  # [n * k/32, nbytes]
    q, _, _ = g.unpack(b)  # semantic codes [blocks, 32]
    out = {"d16": b[:, 0:2].contiguous().view(torch.float16).reshape(n, k // 32)}
    if g.affine:
        out["m16"] = b[:, 2:4].contiguous().view(torch.float16).reshape(n, k // 32)
    decode, _ = _GGML[t]
    stored = (q - g.qmin).reshape(n, k)
    if decode == S8:
        out["codes"] = q.reshape(n, k).to(torch.int8).contiguous()
    elif decode == INT_NIB:
        out["codes"] = _nibble_rows(stored.to(torch.uint8), n, k)
    else:
        out["codes"] = stored.to(torch.uint8).contiguous()
    return out


def _ggml_join(buffers, scheme: Scheme, shape) -> QuantizedWeight:
    """The GGUF block bytes back from `_ggml_split`'s layout, exactly."""
    from ..formats.ggml import LINEAR_GRIDS
    from ..formats.ggml_k import K4_TYPES, k4_blocks

    (n, k), t = shape, scheme.fp_format
    c = buffers["codes"]
    if t == "IQ4_NL":
        from ..formats.ggml_k import K_GRIDS

        q = packing.unpack(c.reshape(-1), 4, c.numel() * 2).view(n, -1)[:, :k].reshape(-1, 32)
        raw = K_GRIDS["IQ4_NL"].pack(q, {"d": buffers["d16"].reshape(-1).float()})
        return QuantizedWeight(scheme, tuple(shape), {"qweight": raw.reshape(n, -1).contiguous()})
    if t in K4_TYPES:
        q = (packing.unpack(c.reshape(-1), 4, c.numel() * 2).view(n, -1)[:, :k] if t == "Q4_K" else c).to(torch.int32)
        raw = k4_blocks(buffers["hdr"].reshape(-1, 16), q.reshape(-1, 256), t)
        return QuantizedWeight(scheme, tuple(shape), {"qweight": raw.reshape(n, -1).contiguous()})
    g = LINEAR_GRIDS[t]
    if c.dtype == torch.int8:
        q = c.to(torch.int32)
    elif _GGML[t][0] == INT_NIB:
        q = packing.unpack(c.reshape(-1), 4, c.numel() * 2).view(n, -1)[:, :k].to(torch.int32) + g.qmin
    else:
        q = c.to(torch.int32) + g.qmin
    d = buffers["d16"].reshape(-1).float()
    m = buffers["m16"].reshape(-1).float() if "m16" in buffers else torch.zeros_like(d)
    raw = g.pack_dm(q.reshape(-1, 32), d, m).reshape(n, -1)
    return QuantizedWeight(scheme, tuple(shape), {"qweight": raw.contiguous()})


class _Handle:
    """Unregisters a bound layer (torch.ops.quantkit.wonly_bind) when its layer lets it go."""

    __slots__ = ("handle",)

    def __init__(self, handle: int):
        self.handle = handle

    def __del__(self):
        try:
            torch.ops.quantkit.wonly_unbind(self.handle)
        except Exception:  # interpreter shutdown: the library may be gone already
            pass


class NativeKernel(Kernel):
    name = "native"

    @staticmethod
    def supports(qw):
        s = qw.scheme
        if s.act in ("dynamic", "static") or not native.wonly():
            return False
        if s.kind == "ggml":
            return s.fp_format in _GGML
        if s.kind == "int":
            return 2 <= s.bits <= 8
        if s.kind in ("nf4", "fp4"):
            return qw.shape[1] % s.group_size == 0
        return s.kind == "fp8" and s.fp_format in ("e4m3", "e5m2")

    @staticmethod
    def pack(qw):
        s, (n, k), t = qw.scheme, qw.shape, qw.tensors
        if s.kind == "ggml":
            return _ggml_split(qw)
        b = {f"st_{name}": v for name, v in t.items()}  # the storage itself, not a copy
        if s.kind == "int" and s.bits <= 4 and (s.bits != 4 or k % 2):
            codes = packing.unpack(t["qweight"], s.bits, n * k).view(n, k)
            b["codes"] = _nibble_rows(codes, n, k)
            del b["st_qweight"]
        elif s.kind in ("nf4", "fp4") and k % 2:
            b["codes"] = _nibble_rows(packing.unpack(t["qweight"], 4, n * k).view(n, k), n, k)
            del b["st_qweight"]
        if s.kind in ("nf4", "fp4"):
            b["lut"] = LEVELS[s.kind].clone()
        return b

    @staticmethod
    def unpack(buffers, scheme, shape):
        if scheme.kind == "ggml":
            return _ggml_join(buffers, scheme, shape)
        parts = {name[3:]: v for name, v in buffers.items() if name.startswith("st_")}
        if "codes" in buffers:
            n, k = shape
            codes = packing.unpack(buffers["codes"].reshape(-1), 4, buffers["codes"].numel() * 2).view(n, -1)[:, :k]
            if scheme.kind == "int":
                off = 2 ** (scheme.bits - 1) if scheme.symmetric else 0
                q = codes.to(torch.int32) - off
                qw = from_int_codes(scheme, q, parts["scale"], parts.get("zero"))
                return qw
            parts["qweight"] = packing.pack(codes.contiguous(), 4)
        return QuantizedWeight(scheme, tuple(shape), parts)

    @staticmethod
    @functools.lru_cache(maxsize=None)
    def _layout(scheme: Scheme, shape: tuple, names: frozenset) -> tuple:
        """(buffer names of codes, scale, zero, scale2, offset, lut; then N, K, group, decode,
        zconst, smul) for a scheme, shape and the buffers a layer holds: decided once per
        layer type, not per call (decode runs ~200 matmuls per token)."""
        s, (n, k) = scheme, shape
        codes = "codes" if "codes" in names else "st_qweight"
        zero = scale2 = offset = lut = bias = None
        smul = 1.0
        if s.kind == "ggml":
            decode, zconst = _GGML[s.fp_format][:2]
            if "s32" in names:  # Q4_K / Q5_K
                scale, group, bias = "s32", 32, "b32"
            elif "lut" in names:  # IQ4_NL
                scale, group, lut = "d16", 32, "lut"
            else:
                scale, group, bias = "d16", 32, ("m16" if "m16" in names else None)
        elif s.kind == "int":
            decode, zconst = _int_layout(s)
            scale, zero, group = "st_scale", ("st_zero" if "st_zero" in names else None), group_len(s, k)
        elif s.kind in ("nf4", "fp4"):
            decode, zconst, group, lut = LUT_NIB, 0.0, s.group_size, "lut"
            if "st_scale" in names:
                scale = "st_scale"
            else:
                scale, scale2, offset = "st_scale_q", "st_scale_scale", "st_scale_offset"
        else:  # fp8, one scale per row
            decode = E4M3 if s.fp_format == "e4m3" else E5M2
            zconst, group, scale = 0.0, k, "st_scale"
            smul = 256.0 if decode == E4M3 else 1.0
        return (codes, scale, zero, scale2, offset, lut, bias), (n, k, group, decode, zconst, smul)

    @staticmethod
    def op_args(buffers, scheme: Scheme, shape) -> tuple:
        """The arguments of torch.ops.quantkit.wonly_linear after x (and before isa)."""
        names, consts = NativeKernel._layout(scheme, tuple(shape), frozenset(buffers))
        ts = [None if nm is None else buffers[nm] for nm in names]
        if ts[0].dtype != torch.uint8:  # int8 / float8 codes: the kernel reads their bytes
            ts[0] = ts[0].view(torch.uint8)
        return (*ts, *consts)

    @staticmethod
    def matmul(x, buffers, scheme, shape):
        if x.device.type != "cpu":  # the ops are CPU ops: elsewhere, the exact dequantized weight
            return F.linear(x, NativeKernel.unpack(buffers, scheme, shape).dequantize(x.dtype))
        return NativeKernel.run(x, NativeKernel.bind(buffers, scheme, shape))

    @classmethod
    def embed_rows(cls, buffers, scheme, shape, ids):
        """GGUF tables: the looked-up rows of the kernel's layout (every buffer has one row per
        output row), dequantized by the op; other layouts through the storage."""
        if scheme.kind != "ggml":
            return super().embed_rows(buffers, scheme, shape, ids)
        flat = ids.reshape(-1)
        sub = {name: t[flat] for name, t in buffers.items()}
        r = flat.numel()
        args = list(NativeKernel.op_args(sub, scheme, (r, shape[1])))
        out = torch.ops.quantkit.wonly_dequant(*args, native.wonly_isa(), 0, r)
        return out.reshape(*ids.shape, shape[1])

    @staticmethod
    def int8_activations_ok(args: tuple) -> bool:
        """Whether a layer's layout has the int8-activation path: integer codes or a 16-level
        codebook (not fp8) in groups of a multiple of 32 values."""
        group, decode = args[9], args[10]
        return decode <= S8 and group % 32 == 0

    @staticmethod
    def bind(buffers, scheme, shape, act="exact"):
        """The layer's op arguments registered once with the op library (wonly_bind): each call
        then passes x and a handle (wonly_run), not 15 arguments that Python's dispatch would
        parse and torch.compile guard one by one. (handle, N, K, int8-activation rows, keeper):
        the keeper unregisters the handle when the layer lets this go."""
        if buffers[next(iter(buffers))].device.type != "cpu":
            return None  # moved off the CPU: matmul refuses it there (the ops are CPU ops)
        args = NativeKernel.op_args(buffers, scheme, shape)
        a8_rows = 0  # input rows up to which the int8-activation path runs
        if act != "exact" and NativeKernel.int8_activations_ok(args):
            a8_rows = MAX_FUSED_ROWS if act == "int8" else 2**62
        handle = int(torch.ops.quantkit.wonly_bind(*args, native.wonly_isa(), native.wonly_a8_isa() if a8_rows else 0,
                                                   MAX_FUSED_ROWS, a8_rows))
        return (torch.tensor([handle], dtype=torch.int64), args[7], args[8], a8_rows, _Handle(handle))

    @staticmethod
    def bound_activations(bound):
        return "exact" if not bound[3] else "int8" if bound[3] == MAX_FUSED_ROWS else "int8-all"

    @staticmethod
    def run(x, bound):
        n, k = bound[1], bound[2]
        x2 = x.reshape(-1, k)
        if x2.dtype != torch.float32:
            x2 = x2.float()
        y = torch.ops.quantkit.wonly_run(x2, bound[0], n)
        return y.view(*x.shape[:-1], n) if x.dtype == torch.float32 else y.view(*x.shape[:-1], n).to(x.dtype)

    @staticmethod
    def dequantize_rows(buffers, scheme, shape, r0: int, r1: int, isa: int | None = None) -> torch.Tensor:
        """W[r0:r1] in fp32 as the kernel computes it (bit for bit the codec's dequantize)."""
        return torch.ops.quantkit.wonly_dequant(*NativeKernel.op_args(buffers, scheme, shape),
                                                native.wonly_isa() if isa is None else isa, r0, r1)
