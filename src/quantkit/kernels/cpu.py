"""CPU kernels for packed weights, each checked against dequantize-then-matmul in tests.

Measured on the CPUs we target (see benchmarks/decode_speed.py): torch's packed int8/int4
weight-only matmuls are fast only when fed bf16 activations, so these kernels cast the
input to bf16, run the packed matmul and cast back; the model's residual stream stays in
its own dtype. Kernels keep one copy of the codes in their own layout and can give the
storage `QuantizedWeight` back exactly (`unpack`), so saving never needs a second copy.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

from ..formats import QuantizedWeight
from ..formats.integer import clipped_count, from_int_codes, int_codes, quantize_activation
from ..scheme import Scheme

ACT_DTYPE = torch.bfloat16  # activation dtype of the packed kernels


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


# Largest reduction length whose int8 x int8 partial sums stay exact in float32:
# 127 * 127 * 1040 < 2^24, so any summation order over <= 1040 products is exact.
_F32_EXACT_K = 1040
_INT8_MM_BACKEND: str | None = None


def _int8_mm_float(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a int8 [M, K] @ b int8 [K, N] -> int32, exactly, through float32 matmuls on chunks of K
    short enough that every partial sum is an exactly representable integer."""
    k = a.shape[1]
    out = None
    for i in range(0, k, _F32_EXACT_K):
        part = (a[:, i:i + _F32_EXACT_K].float() @ b[i:i + _F32_EXACT_K].float()).to(torch.int32)
        out = part if out is None else out + part
    return out


def _pick_int8_mm() -> str:
    """"int_mm" (torch._int_mm) where this CPU has int8 dot-product instructions (VNNI/AMX),
    else "avx2" (quantkit's own kernel, kernels/w8a8_avx2.cpp) where it builds, else "float".

    torch._int_mm is fast on CPUs with AVX512-VNNI or AMX, but 20-50x slower than fp32 on
    AVX2-only CPUs, where it has no vectorised path; fbgemm's u8 x s8 kernels saturate 16-bit
    intermediates there unless activations are cut to 7 bits (benchmarks/int8_gemm.py shows
    both). quantkit's AVX2 kernel avoids the saturation by multiplying |x_q| by sign(x_q)·W_q
    (every pair sum stays below 2^15) and quantizes the activations in the same pass. All
    backends give the same int32 results, so the choice only affects speed. It is made from
    the CPU's features, not by timing: a timing probe on a busy machine once picked the 50x
    slower backend. QUANTKIT_INT8_MM=int_mm|avx2|float forces one. The float backend
    converts the int8 weight to float32 on every call (a float copy kept per layer would cost
    4x the weight's memory).
    """
    import os

    forced = os.environ.get("QUANTKIT_INT8_MM")
    if forced in ("int_mm", "float"):
        return forced
    if forced == "avx2":
        from .native import w8a8_avx2, why_not_w8a8_avx2

        if w8a8_avx2() is None:
            from ..errors import QuantkitError

            raise QuantkitError(f"QUANTKIT_INT8_MM=avx2, but quantkit's AVX2 kernel cannot run here: "
                                f"{why_not_w8a8_avx2() or 'its build failed (see the log)'}; unset it or set "
                                "QUANTKIT_INT8_MM=float")
        return forced
    if forced:
        import logging

        logging.getLogger(__name__).warning("QUANTKIT_INT8_MM=%s is not int_mm, avx2 or float; choosing from the CPU",
                                            forced)
    probes = [getattr(torch.cpu, n, None) for n in ("_is_vnni_supported", "_is_amx_tile_supported")]
    if any(p is not None and p() for p in probes):
        return "int_mm"
    from .native import w8a8_avx2

    return "avx2" if w8a8_avx2() is not None else "float"


def int8_backend() -> str:
    """The int8 x int8 backend this process uses: "int_mm", "avx2" or "float"."""
    global _INT8_MM_BACKEND
    if _INT8_MM_BACKEND is None:
        _INT8_MM_BACKEND = _pick_int8_mm()
    return _INT8_MM_BACKEND


def int8_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int8 [M, K] x int8 [K, N] -> int32: torch._int_mm where it is fast, else float32
    matmuls over exact chunks (the "avx2" backend is a whole linear, used by W8A8Kernel)."""
    return torch._int_mm(a, b) if int8_backend() == "int_mm" else _int8_mm_float(a, b)


class Kernel:
    """A matmul for one packed layout. `pack` returns the buffers a QuantLinear holds."""

    name = "base"
    differentiable = False  # True when matmul is built from torch ops autograd can go through (w.r.t. x)
    # True when `pack`'s buffers include the storage tensors themselves (st_<part>) because its
    # layout cannot give them back exactly without probing it; False: `unpack` rebuilds them
    keeps_storage = False

    @staticmethod
    def supports(qw: QuantizedWeight) -> bool:
        raise NotImplementedError

    @staticmethod
    def check(qw: QuantizedWeight) -> None:
        """Refuse (ValueError) a weight this kernel could pick but never run; called when the
        layer is built, so the refusal does not wait for its first forward."""

    @staticmethod
    def pack(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @staticmethod
    def unpack(buffers: dict[str, torch.Tensor], scheme: Scheme, shape: tuple[int, int]) -> QuantizedWeight:
        raise NotImplementedError

    @staticmethod
    def matmul(x: torch.Tensor, buffers: dict[str, torch.Tensor], scheme: Scheme, shape) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def new_stats(scheme: Scheme) -> dict[str, int] | None:
        """Counters this kernel keeps while it runs (passed to matmul as `stats`), or None."""
        return None

    @classmethod
    def embed_rows(cls, buffers: dict[str, torch.Tensor], scheme: Scheme, shape, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` (any shape) of the dequantized weight, fp32 [*ids.shape, in]: an embedding
        lookup. This default dequantizes the looked-up rows of the storage."""
        from ..formats.ggml_types import dequantize_rows

        qw = cls.unpack(buffers, scheme, shape)
        if scheme.kind == "ggml":
            return dequantize_rows(qw.tensors["qweight"][ids], scheme.fp_format)
        return qw.dequantize()[ids]

    @staticmethod
    def bind(buffers: dict[str, torch.Tensor], scheme: Scheme, shape, act: str = "exact") -> object | None:
        """What `run` needs, worked out once per layer (after packing, and after a move to another
        device): for kernels whose per-call argument handling costs more than the matmul itself
        at decode. None (the default): the layer calls `matmul`. `act` is the layer's activation
        mode (ACTIVATIONS); a kernel binds "int8" only where it has that path, else "exact"."""
        return None

    @staticmethod
    def bound_activations(bound) -> str:
        """The activation mode a `bind` result runs."""
        return "exact"

    @staticmethod
    def run(x: torch.Tensor, bound) -> torch.Tensor:
        """matmul through what `bind` returned."""
        raise NotImplementedError


# Activation modes of weight-only layers: "exact" multiplies the float activations with the stored
# weight (the default; every perplexity quantkit reports is on it); "int8" quantizes activations
# per block to int8 first and multiplies in integers (faster, approximate: the explicit option)
# where a call has few rows (decode), keeping the exact path for prefill-sized calls, where it is
# faster; "int8-all" does it for every call (each row is quantized on its own, so a window scored
# this way sees the numerics of decoding it token by token: what quality measurements use).
ACTIVATIONS = ("exact", "int8", "int8-all")


class DequantKernel(Kernel):
    """Fallback for every scheme: dequantize the stored weight, then a float matmul."""

    name = "dequant"
    differentiable = True

    @staticmethod
    def supports(qw):
        return True

    @staticmethod
    def pack(qw):
        return dict(qw.tensors)

    @staticmethod
    def unpack(buffers, scheme, shape):
        return QuantizedWeight(scheme, shape, dict(buffers))

    @staticmethod
    def matmul(x, buffers, scheme, shape):
        w = QuantizedWeight(scheme, shape, buffers).dequantize(x.dtype)
        return F.linear(x, w)


class FloatKernel(Kernel):
    """bf16/fp16/fp32 weights: a plain matmul in the weight's dtype."""

    name = "float"
    differentiable = True

    @staticmethod
    def supports(qw):
        return qw.scheme.kind == "float"

    @staticmethod
    def pack(qw):
        return {"weight": qw.tensors["weight"]}

    @staticmethod
    def unpack(buffers, scheme, shape):
        return QuantizedWeight(scheme, shape, {"weight": buffers["weight"]})

    @staticmethod
    def matmul(x, buffers, scheme, shape):
        w = buffers["weight"]
        xw = x.to(w.dtype)
        if w.dtype != torch.float32 and xw.numel() == shape[1]:  # one row (decode): 16-bit gemv is
            return torch.mv(w, xw.reshape(-1)).reshape(*x.shape[:-1], shape[0]).to(x.dtype)  # ~1.6x faster than mm
        if w.dtype != torch.float32 and w.device.type == "cpu" and xw.numel() >= WIDEN_MIN_ROWS * shape[1] \
                and not _native_16bit_gemm():
            return _widened_linear(xw, w).to(x.dtype)
        return F.linear(xw, w).to(x.dtype)


WIDEN_MIN_ROWS = 32  # from this many input rows, a 16-bit GEMM without native support goes through fp32
WIDEN_CHUNK = 8192  # weight rows widened to fp32 at a time (bounds the temporary copy)
# From this many input rows, on a CPU without a native 16-bit GEMM, the packed int4/int8
# weight-only kernels (which compute in bf16) are slower than dequantizing the weight to fp32
# chunk by chunk and running torch's fp32 GEMM; prefill and calibration passes take that path
# (the exact dequantized weight), decode keeps the packed kernels. Crossovers measured by
# benchmarks/int8_gemm.py (AVX2 EPYC, 2026-11-30).
WIDEN_INT4_MIN_ROWS = 512
WIDEN_INT8_MIN_ROWS = 64
_NATIVE_16BIT: bool | None = None


def _native_16bit_gemm() -> bool:
    """Whether this CPU multiplies bf16/fp16 matrices natively (AVX512-BF16 or AMX). Without,
    torch's 16-bit GEMM is several times slower than widening the weight to fp32 chunk by
    chunk (benchmarks/int8_gemm.py: a 512 x 576 x 49152 bf16 head, 1656 ms vs 255 ms on an
    AVX2 EPYC, 2026-11-30)."""
    global _NATIVE_16BIT
    if _NATIVE_16BIT is None:
        probes = [getattr(torch.cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
        _NATIVE_16BIT = any(p is not None and p() for p in probes)
    return _NATIVE_16BIT


def _widened_linear(xw: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """F.linear(xw, w) for 16-bit xw and w, computed as the 16-bit GEMM defines it: the 16-bit
    operands' exact products summed in fp32 and the result rounded to w.dtype; the weight is
    widened WIDEN_CHUNK rows at a time (the output is built transposed, so each chunk's rows
    are contiguous). Under autograd (QLoRA trains through a 16-bit base) the same product is
    one differentiable float matmul instead (torch.mm with out= has no gradient)."""
    if torch.is_grad_enabled() and (xw.requires_grad or w.requires_grad):
        return F.linear(xw.float(), w.float()).to(w.dtype)
    x2 = xw.reshape(-1, xw.shape[-1]).float().t()
    out = torch.empty(w.shape[0], x2.shape[1], dtype=torch.float32)
    for i in range(0, w.shape[0], WIDEN_CHUNK):
        torch.mm(w[i:i + WIDEN_CHUNK].float(), x2, out=out[i:i + WIDEN_CHUNK])
    return out.t().to(w.dtype).reshape(*xw.shape[:-1], w.shape[0])


class Int8Kernel(Kernel):
    """Integer codes of up to 8 bits with one scale per output row: torch._weight_int8pack_mm.

    Asymmetric codes are shifted to int8 (q - 2^(b-1), centered so the correction stays small
    in bf16) and the zero-point term s*(Z - 2^(b-1))*sum(x) is subtracted after the matmul, so
    affine and symmetric per-channel schemes share the kernel.
    """

    name = "int8pack"

    @staticmethod
    def supports(qw):
        s = qw.scheme
        return s.kind in ("int", "llm-int8") and s.bits >= 5 and s.group_size in (-1, 0)

    @staticmethod
    def pack(qw):
        q, scale, zero, _ = int_codes(qw)  # q int32 [N, K]; scale fp32 [N or 1, 1]
        n = qw.shape[0]
        b = {"scale16": qw.tensors["scale"]}
        if zero is None:
            b["q"] = q.to(torch.int8)
        else:
            off = 2 ** (qw.scheme.bits - 1)  # centre the affine codes: 128 for 8 bits, 16 for 5
            b["q"] = (q - off).to(torch.int8)
            b["zero8"] = qw.tensors["zero"]
            b["zterm"] = (scale * (zero - off)).expand(n, 1).reshape(n).to(ACT_DTYPE)
        b["scale_k"] = scale.expand(n, 1).reshape(n).to(ACT_DTYPE)
        return b

    @staticmethod
    def _rows(buffers, scheme, r0: int, r1: int) -> torch.Tensor:
        """Exact fp32 dequantized weight rows [r0, r1), from the stored fp16 scale and zero."""
        q = buffers["q"][r0:r1].float()
        s16 = buffers["scale16"]
        s = (s16 if s16.shape[0] == 1 else s16[r0:r1]).float()  # [rows or 1, 1]
        zero = buffers.get("zero8")
        if zero is not None:  # stored q - 2^(b-1); w = s * (q + 2^(b-1) - Z)
            z = (zero if zero.shape[0] == 1 else zero[r0:r1]).float()
            return (q + (2 ** (scheme.bits - 1) - z)) * s
        return q * s

    @staticmethod
    def unpack(buffers, scheme, shape):
        q = buffers["q"].to(torch.int32)
        zero = buffers.get("zero8")
        if zero is not None:
            q = q + 2 ** (scheme.bits - 1)
        return from_int_codes(scheme, q, buffers["scale16"], zero)

    @staticmethod
    def matmul(x, buffers, scheme, shape):
        n, k = shape
        if _widen_packed(x, k, WIDEN_INT8_MIN_ROWS):
            y = _widened_rows(_flat(x).float(), n, lambda r0, r1: Int8Kernel._rows(buffers, scheme, r0, r1))
            return y.reshape(*x.shape[:-1], n).to(x.dtype)
        xb = _flat(x).to(ACT_DTYPE)
        y = torch._weight_int8pack_mm(xb, buffers["q"], buffers["scale_k"])
        if "zterm" in buffers:
            y = y - xb.sum(-1, keepdim=True) * buffers["zterm"]
        return y.reshape(*x.shape[:-1], shape[0]).to(x.dtype)


def _int4_rows(buffers: dict, scheme: Scheme, shape, r0: int, r1: int) -> torch.Tensor:
    """Exact fp32 dequantized weight rows [r0, r1) of an Int4Kernel layer, from the storage
    tensors it keeps (st_<part>): equal to those rows of QuantizedWeight.dequantize."""
    n, k = shape
    if (k * scheme.bits) % 8:  # rows do not start on a byte of the packed codes: the whole weight
        return _storage(buffers, scheme, shape).dequantize()[r0:r1]
    return _storage(buffers, scheme, shape, r0, r1).dequantize()


def _storage(buffers: dict, scheme: Scheme, shape, r0: int = 0, r1: "int | None" = None) -> QuantizedWeight:
    """The storage QuantizedWeight of rows [r0, r1) from a layer's st_<part> buffers: tensors
    with one row per output row are sliced, the flat packed codes (`qweight`, rows of
    k·bits/8 bytes) by bytes, per-tensor parameters kept whole."""
    n, k = shape
    r1 = n if r1 is None else r1
    parts = {}
    for name, t in buffers.items():
        if not name.startswith("st_"):
            continue
        if (r0, r1) == (0, n) or t.dim() == 0:
            parts[name[3:]] = t
        elif name == "st_qweight" and t.dim() == 1:
            row = k * scheme.bits // 8
            parts[name[3:]] = t[r0 * row:r1 * row]
        else:
            parts[name[3:]] = t if t.shape[0] != n else t[r0:r1]
    return QuantizedWeight(scheme, (r1 - r0, k), parts)


def _widened_rows(x2: torch.Tensor, n: int, rows) -> torch.Tensor:
    """x2 fp32 [M, K] @ Wᵀ, W built WIDEN_CHUNK rows at a time by rows(r0, r1) -> fp32 [r1-r0, K].

    One chunk (most layers): a plain F.linear, contiguous output. Several: the output is built
    transposed so that each chunk's rows are contiguous, and returned as a transposed view."""
    if n <= WIDEN_CHUNK:
        return F.linear(x2, rows(0, n))
    xt = x2.t()
    out = torch.empty(n, x2.shape[0], dtype=torch.float32)
    for i in range(0, n, WIDEN_CHUNK):
        j = min(i + WIDEN_CHUNK, n)
        torch.mm(rows(i, j), xt, out=out[i:j])
    return out.t()


def _widen_packed(x: torch.Tensor, k: int, min_rows: int) -> bool:
    """Whether an integer weight-only matmul of x [..., k] goes through fp32 (WIDEN_INT4_MIN_ROWS)."""
    return x.numel() >= min_rows * k and x.device.type == "cpu" and not _native_16bit_gemm() \
        and not (x.requires_grad and torch.is_grad_enabled())


def _kernel_group(k: int, group: int) -> int | None:
    for g in (256, 128, 64, 32):
        if group % g == 0 and k % g == 0:
            return g
    return None


class Int4Kernel(Kernel):
    """Integer codes of 2 to 4 bits (any granularity): torch._weight_int4pack_mm_for_cpu.

    The kernel computes w = (c - 8) * scale + zero per group; our grid w = s * (q - Z) maps to
    c = q + 8 - m (affine, m = 2^(b-1), zero = s*(m-Z): codes centred on 8 so the bf16 zero term
    stays small) or c = q + 8 (symmetric, zero = 0). 2- and 3-bit codes use
    the same kernel (held as 4-bit in memory). A group length the kernel lacks (e.g. one
    scale per row of 576) is run as the largest kernel group that divides it, with the scale
    repeated: the same numbers, the kernel's own speed.
    """

    name = "int4pack"
    keeps_storage = True  # torch's int4 layout is internal to torch: the codes are kept as stored

    @staticmethod
    def supports(qw):
        s = qw.scheme
        n, k = qw.shape
        if s.kind != "int" or s.bits > 4 or n % 16 or k % 2:
            return False
        return _kernel_group(k, s.group_for(k)) is not None

    @staticmethod
    def pack(qw):
        s = qw.scheme
        n, k = qw.shape
        q, scale, zero, glen = int_codes(qw)  # q [N, K] int32; scale/zero [N or 1, K/glen]
        if s.group_size == 0:  # per tensor: one scale for every row
            scale = scale.expand(n, scale.shape[1])
            zero = None if zero is None else zero.expand(n, zero.shape[1])
        kg = _kernel_group(k, glen)
        rep = glen // kg
        m = 2 ** (s.bits - 1)
        c = q + 8 - m if zero is not None else q + 8
        zk = torch.zeros_like(scale) if zero is None else scale * (m - zero)
        sk = scale.repeat_interleave(rep, dim=1)  # [N, K/kg]
        zk = zk.repeat_interleave(rep, dim=1)
        sz = torch.stack([sk.t(), zk.t()], -1).contiguous().to(ACT_DTYPE)  # [K/kg, N, 2]
        b = {"packed": torch._convert_weight_to_int4pack_for_cpu(c.to(torch.int32), 1), "sz": sz}
        b.update({f"st_{name}": t for name, t in qw.tensors.items()})  # the storage itself, not a copy
        b["kgroup"] = torch.tensor(kg)
        return b

    @staticmethod
    def unpack(buffers, scheme, shape):
        return _storage(buffers, scheme, shape)

    @staticmethod
    def matmul(x, buffers, scheme, shape):
        n, k = shape
        if _widen_packed(x, k, WIDEN_INT4_MIN_ROWS):
            y = _widened_rows(_flat(x).float(), n, lambda r0, r1: _int4_rows(buffers, scheme, shape, r0, r1))
            return y.reshape(*x.shape[:-1], n).to(x.dtype)
        xb = _flat(x).to(ACT_DTYPE)
        kg = shape[1] // buffers["sz"].shape[0]  # the kernel group, from a shape (no tensor read per call)
        y = torch._weight_int4pack_mm_for_cpu(xb, buffers["packed"], kg, buffers["sz"])
        return y.reshape(*x.shape[:-1], shape[0]).to(x.dtype)


class LLMInt8Kernel(Kernel):
    """LLM.int8() (Dettmers et al. 2022, arXiv:2208.07339) mixed-precision decomposition.

    Input columns whose magnitude exceeds the scheme's threshold (6.0, the paper's and
    bitsandbytes' default; llm-int8-tX sets it) anywhere in the batch go through a
    float matmul with the matching (dequantized) weight columns; the rest are quantized per
    row (vector-wise absmax int8) and multiplied with the int8 weights in int32.
    """

    name = "llm-int8"
    threshold = 6.0

    @staticmethod
    def supports(qw):
        return qw.scheme.kind == "llm-int8"

    @staticmethod
    def pack(qw):
        q, scale, _, _ = int_codes(qw)
        return {"q": q.to(torch.int8), "scale16": qw.tensors["scale"], "scale": scale.reshape(-1)}

    @staticmethod
    def unpack(buffers, scheme, shape):
        return from_int_codes(scheme, buffers["q"].to(torch.int32), buffers["scale16"], None)

    @staticmethod
    def new_stats(scheme):
        return {"outlier_cols": 0, "cols": 0}

    @staticmethod
    def matmul(x, buffers, scheme, shape, threshold=None, stats=None):
        threshold = scheme.threshold if threshold is None else threshold
        x2 = _flat(x).float()
        q, sw = buffers["q"], buffers["scale"]
        outl = x2.abs().amax(0) > threshold  # [K] outlier input columns
        n_out = int(outl.sum())
        if stats is not None:
            stats["outlier_cols"] += n_out
            stats["cols"] += x2.shape[1]
        xi = x2.masked_fill(outl, 0.0) if n_out else x2
        sx = xi.abs().amax(1, keepdim=True).clamp(min=1e-12) / 127.0  # [M, 1] per-row scale
        xq = torch.round(xi / sx).to(torch.int8)
        y = int8_mm(xq, q.t()).float() * sx * sw
        if n_out:
            w_out = q[:, outl].float() * sw[:, None]  # [N, n_out] outlier weight columns
            y = y + x2[:, outl] @ w_out.t()
        return y.reshape(*x.shape[:-1], shape[0]).to(x.dtype)


class W8A8Kernel(Kernel):
    """int8 weights (per output row) x int8 activations -> int32, then scaled: `int8_mm`, or
    on AVX2 CPUs without VNNI quantkit's own kernel (kernels/w8a8_avx2.cpp, one call per linear:
    bit-identical results, the -oN float channels up to their summation order; `_pick_int8_mm`).

    Activations are quantized here, per token at run time (`w8a8-dynamic`: s_x = absmax/127 of
    each row), or with the frozen per-tensor scale of a static scheme (`w8a8-static-*`, the
    "in_scale"/"in_zero" parts its calibration stored). Affine activations x = s(u - z),
    u in [0, 255], run as int8 u - 128 with the correction s_x·s_w·(128 - z)·Σ_k W_q[n, k].
    A -oN static scheme keeps N input channels O (fixed at calibration, "in_outliers") in
    float: they are zeroed before the activation quantization (zero is exact on the int8
    grid) and go through a float matmul with their dequantized weight columns, y += x[:, O] Ŵ[:, O]ᵀ.

        y[m, n] = s_x[m] · s_w[n] · Σ_k x_q[m, k] · W_q[n, k]
    """

    name = "w8a8"

    @staticmethod
    def supports(qw):
        return qw.scheme.act in ("dynamic", "static")

    @staticmethod
    def check(qw):
        s = qw.scheme
        if s.act == "static" and "in_scale" not in qw.tensors:
            raise ValueError(f"{s.name} needs the activation scale that calibration freezes: quantize it with "
                             "calibration data (--calib) rather than on its own")

    @staticmethod
    def pack(qw):
        W8A8Kernel.check(qw)
        q, scale, _, _ = int_codes(qw)
        n, k = q.shape
        npad = -(-n // 16) * 16  # per-output vectors padded to whole 16-output panels

        def padded(v):
            return torch.cat([v.float(), v.new_zeros(npad - n, dtype=torch.float32)]).contiguous()

        b = {"scale16": qw.tensors["scale"], "scale_p": padded(scale.reshape(-1))}
        for key in ("in_scale", "in_zero", "in_outliers"):
            if key in qw.tensors:
                b[key] = qw.tensors[key]
        if "in_scale" in b:  # the frozen activation scale and zero as float32 [2]
            z = b["in_zero"].float().reshape(1) if "in_zero" in b else torch.zeros(1)
            b["act"] = torch.cat([b["in_scale"].float().reshape(1), z]).contiguous()
        if "in_zero" in b:  # (128 - z)·s_x·s_w·rowsum(W_q), folded into one vector
            corr = (128 - b["in_zero"].float()) * b["in_scale"].float()
            b["zterm_p"] = padded(corr * scale.reshape(-1) * q.sum(1).float())
        if "in_outliers" in b:  # the float channels' index and dequantized weight columns, transposed
            b["out_idx"] = b["in_outliers"].long().contiguous()
            w_out = q[:, b["out_idx"]].float() * scale.reshape(-1, 1)  # [n, J]
            b["w_out_t"] = torch.cat([w_out, w_out.new_zeros(npad - n, w_out.shape[1])]).t().contiguous()
        if int8_backend() == "avx2" and int(q.min()) >= -127:  # the kernel's exactness needs |W_q| <= 127
            from .native import w8a8_avx2

            b["panel"] = w8a8_avx2().pack(q.to(torch.int8))
            if "out_idx" in b:  # the kernel zeroes these channels (-1 bits) while it quantizes
                b["in_mask"] = torch.zeros(k, dtype=torch.int32).index_fill_(0, b["out_idx"], -1)
        else:
            b["q"] = q.to(torch.int8)
        return b

    @staticmethod
    def _codes(buffers, shape) -> torch.Tensor:
        """The int8 weight codes [out, in], from whichever layout pack chose."""
        if "q" in buffers:
            return buffers["q"]
        p = buffers["panel"]  # [ceil(out/16), ceil(in/4), 16, 4]
        return p.permute(0, 2, 1, 3).reshape(p.shape[0] * 16, p.shape[1] * 4)[:shape[0], :shape[1]]

    @staticmethod
    def unpack(buffers, scheme, shape):
        qw = from_int_codes(scheme, W8A8Kernel._codes(buffers, shape).to(torch.int32), buffers["scale16"], None)
        for k in ("in_scale", "in_zero", "in_outliers"):
            if k in buffers:
                qw.tensors[k] = buffers[k]
        return qw

    @staticmethod
    def new_stats(scheme):
        # a frozen range can meet inputs far outside it: such values are clipped (never NaN);
        # counted so that reports can say how often
        return {"clipped": 0, "values": 0} if scheme.act == "static" else None

    @staticmethod
    def matmul(x, buffers, scheme, shape, stats=None):
        x2 = _flat(x).float()
        idx = buffers.get("out_idx")
        if "panel" in buffers and x2.device.type == "cpu":
            from .native import w8a8_avx2

            if w8a8_avx2() is not None:
                return W8A8Kernel._matmul_avx2(x, x2, buffers, shape, stats)
        # torch ops: any device, and panel-packed buffers where the kernel cannot run (moved to
        # another device, or unpickled in a process without it)
        n = shape[0]
        if idx is not None:
            xo, x2 = x2.index_select(1, idx), x2.index_fill(1, idx, 0.0)
        xq, sx = quantize_activation(x2, buffers.get("in_scale"), buffers.get("in_zero"))
        if stats is not None:
            stats["clipped"] += int(clipped_count(xq, buffers.get("in_zero")))
            stats["values"] += xq.numel()
        y = int8_mm(xq, W8A8Kernel._codes(buffers, shape).t()).float() * (sx * buffers["scale_p"][:n])
        if "zterm_p" in buffers:
            y = y + buffers["zterm_p"][:n]
        if idx is not None:
            y = y + xo @ buffers["w_out_t"][:, :n]
        return y.reshape(*x.shape[:-1], shape[0]).to(x.dtype)

    @staticmethod
    def _matmul_avx2(x, x2, b, shape, stats):
        """The same product through kernels/w8a8_avx2.cpp, which quantizes the activations
        (zeroing the float channels), applies s_x·s_w and the affine term, and adds the float
        channels' product, in one call."""
        from .native import w8a8_avx2

        mode = 0 if "act" not in b else (2 if "in_zero" in b else 1)
        y, clipped = w8a8_avx2().linear(x2, b["panel"], shape[0], b["scale_p"], mode, b.get("act"), b.get("zterm_p"),
                                        b.get("in_mask"), b.get("out_idx"), b.get("w_out_t"))
        if stats is not None:
            stats["clipped"] += clipped
            stats["values"] += x2.numel()
        return y.reshape(*x.shape[:-1], shape[0]).to(x.dtype)
