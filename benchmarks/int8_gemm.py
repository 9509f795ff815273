"""The int8 GEMM backends on this CPU, side by side: why `kernels.cpu.int8_mm` picks per host.

For prefill-sized problems (M x K @ K x N of SmolLM2's MLP and attention shapes) it times an
fp32 matmul, a bf16 matmul, torch._int_mm, and quantkit's exact float32-chunk int8 GEMM, and
reports each as a ratio to fp32, and quantkit's AVX2 w8a8 linear (kernels/w8a8_avx2.cpp, where it
builds: activation quantization from fp32, int8 GEMM and scaling, one call, against the fp32
linear on the same shape). It also checks exactness on the worst case (every code 127)
for both int8 backends and for fbgemm's u8 x s8 static linear (torch's quantized engine),
which saturates 16-bit intermediates on CPUs without VNNI. And, for the 16-bit head that
quantized models keep by default, torch's bf16 GEMM against quantkit's widened path
(`kernels.cpu._widened_linear`, used where the CPU has no native bf16 GEMM). Last, the packed
int4/int8 weight-only kernels against their widened path (the exact dequantized weight, fp32
GEMM) by number of rows: where they cross is where `WIDEN_INT4_MIN_ROWS` and
`WIDEN_INT8_MIN_ROWS` are set; and the w8a8 linear by rows (decode is one row) against the
int8 weight-only kernel and fp32.

    python benchmarks/int8_gemm.py [--m 4096] [--repeats 3] [--no-write]
"""
from __future__ import annotations

import argparse
import time
import warnings

import torch

import torch.nn.functional as F

from quantkit.formats import quantize
from quantkit.kernels import cpu, native
from quantkit.kernels.cpu import Int4Kernel, Int8Kernel, _int8_mm_float, _native_16bit_gemm, _pick_int8_mm, _widened_linear

from _common import write_section


def best_time(fn, repeats: int) -> float:
    fn()
    out = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out = min(out, time.perf_counter() - t0)
    return out


def fbgemm_worst_case(k: int = 576, n: int = 64) -> tuple[float, float]:
    """(fbgemm's static u8 x s8 result, the exact value) on a row where every product is 127*127."""
    warnings.filterwarnings("ignore")
    torch.backends.quantized.engine = "fbgemm"
    w = torch.ones(n, k)
    wq = torch.quantize_per_channel(w, torch.full((n,), 1 / 127.0, dtype=torch.double),
                                    torch.zeros(n, dtype=torch.long), 0, torch.qint8)
    packed = torch.ops.quantized.linear_prepack(wq, None)
    x = torch.full((1, k), 127.0)  # uint8 code 255 with zero point 128
    got = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(x, 1.0, 128, packed)
    return float(got[0, 0]), float((x @ w.t())[0, 0])


def weight_only_rows(repeats: int, rows=(1, 16, 64, 256, 512, 1024, 4096)) -> str:
    """Packed bf16 kernel vs widened fp32 path, ms per call, for SmolLM2's MLP up-projection shape."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(1536, 576, generator=g) * 0.02
    lines = ["| scheme (1536 x 576) | rows | packed kernel ms | widened fp32 ms | packed / widened |",
             "|---|---:|---:|---:|---:|"]
    saved = (cpu._NATIVE_16BIT, cpu.WIDEN_INT4_MIN_ROWS, cpu.WIDEN_INT8_MIN_ROWS)
    try:
        cpu._NATIVE_16BIT = False
        for scheme, kernel in (("int4-g64", Int4Kernel), ("int8", Int8Kernel)):
            qw = quantize(w, scheme)
            b = kernel.pack(qw)
            for m in rows:
                x = torch.randn(m, 576, generator=g)
                cpu.WIDEN_INT4_MIN_ROWS = cpu.WIDEN_INT8_MIN_ROWS = 10 ** 9  # packed kernel
                tp = best_time(lambda: kernel.matmul(x, b, qw.scheme, qw.shape), repeats)
                cpu.WIDEN_INT4_MIN_ROWS = cpu.WIDEN_INT8_MIN_ROWS = 1  # widened
                tw = best_time(lambda: kernel.matmul(x, b, qw.scheme, qw.shape), repeats)
                lines.append(f"| {scheme} | {m} | {1e3 * tp:.2f} | {1e3 * tw:.2f} | {tp / tw:.2f} |")
    finally:
        cpu._NATIVE_16BIT, cpu.WIDEN_INT4_MIN_ROWS, cpu.WIDEN_INT8_MIN_ROWS = saved
    return "\n".join(lines) + (f"\n\nSet from this: widen from {cpu.WIDEN_INT4_MIN_ROWS} rows (int4), "
                               f"{cpu.WIDEN_INT8_MIN_ROWS} rows (int8), on CPUs without a native 16-bit GEMM "
                               f"(this one: native {_native_16bit_gemm()}).")


def w8a8_rows(repeats: int, rows=(1, 8, 64, 512, 4096)) -> str:
    """The w8a8 linear (dynamic activations) on each available backend vs the int8 weight-only
    kernel (as decode runs it) and fp32, ms per call, for the MLP up-projection shape."""

    g = torch.Generator().manual_seed(2)
    w = torch.randn(1536, 576, generator=g) * 0.02
    qw, qi = quantize(w, "w8a8-dynamic"), quantize(w, "int8")
    backends = ["float"] + (["avx2"] if native.w8a8_avx2() is not None else [])
    packs = {}
    saved = cpu._INT8_MM_BACKEND
    try:
        for be in backends:
            cpu._INT8_MM_BACKEND = be
            packs[be] = cpu.W8A8Kernel.pack(qw)
    finally:
        cpu._INT8_MM_BACKEND = saved
    bi = Int8Kernel.pack(qi)
    head = "| rows (1536 x 576) | fp32 ms | int8 weight-only ms | " + " | ".join(f"w8a8 {b} ms" for b in backends)
    lines = [head + " | " + " | ".join(f"w8a8 {b} ×fp32" for b in backends) + " |",
             "|---:|---:|---:|" + "---:|" * (2 * len(backends))]
    for m in rows:
        x = torch.randn(m, 576, generator=g)
        t32 = best_time(lambda: F.linear(x, w), repeats)
        ti = best_time(lambda: Int8Kernel.matmul(x, bi, qi.scheme, qi.shape), repeats)
        tb = [best_time(lambda: cpu.W8A8Kernel.matmul(x, packs[b], qw.scheme, qw.shape), repeats) for b in backends]
        lines.append(f"| {m} | {1e3 * t32:.2f} | {1e3 * ti:.2f} | " + " | ".join(f"{1e3 * t:.2f}" for t in tb) + " | "
                     + " | ".join(f"{t32 / t:.2f}" for t in tb) + " |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--m", type=int, default=4096, help="rows (tokens), e.g. 8 x 512")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    kern = native.w8a8_avx2()
    lines = ["| shape M x K x N | fp32 ms | bf16 ×fp32 | torch._int_mm ×fp32 | float32-chunk int8 ×fp32 "
             "| quantkit AVX2 w8a8 linear ×fp32 |", "|---|---:|---:|---:|---:|---:|"]
    for k, n in ((576, 1536), (1536, 576), (576, 576)):
        x, w = torch.randn(a.m, k, generator=g), torch.randn(k, n, generator=g)
        xb, wb = x.bfloat16(), w.bfloat16()
        xq = torch.randint(-127, 128, (a.m, k), dtype=torch.int8, generator=g)
        wq = torch.randint(-127, 128, (k, n), dtype=torch.int8, generator=g)
        t32 = best_time(lambda: x @ w, a.repeats)
        t16 = best_time(lambda: xb @ wb, a.repeats)
        ti = best_time(lambda: torch._int_mm(xq, wq), a.repeats)
        tf = best_time(lambda: _int8_mm_float(xq, wq), a.repeats)
        ta = "–"
        if kern is not None:  # the whole linear from fp32 activations, as W8A8Kernel runs it
            panel, sw, wt = kern.pack(wq.t().contiguous()), torch.rand(-(-n // 16) * 16, generator=g), w.t().contiguous()
            t32l = best_time(lambda: F.linear(x, wt), a.repeats)
            ta = f"{t32l / best_time(lambda: kern.linear(x, panel, n, sw, 0, None, None, None, None, None), a.repeats):.2f}"
        # ×fp32 is a speed ratio: above 1 is faster than fp32
        lines.append(f"| {a.m} x {k} x {n} | {1e3 * t32:.1f} | {t32 / t16:.2f} | {t32 / ti:.2f} | {t32 / tf:.2f} "
                     f"| {ta} |")
    ones = torch.full((32, 4096), 127, dtype=torch.int8)
    exact = 127 * 127 * 4096
    got_f, want = fbgemm_worst_case()
    xh, wh = torch.randn(512, 576, generator=g).bfloat16(), torch.randn(49152, 576, generator=g).bfloat16()
    th = best_time(lambda: F.linear(xh, wh), a.repeats)
    tw = best_time(lambda: _widened_linear(xh, wh), a.repeats)
    notes = [f"Worst case (every product 127·127, K = 4096, exact {exact}): torch._int_mm "
             f"{int(torch._int_mm(ones, ones.t().contiguous())[0, 0])}, float32-chunk "
             f"{int(_int8_mm_float(ones, ones.t().contiguous())[0, 0])}"
             + ("" if kern is None else ", quantkit AVX2 " + str(int(kern.linear(
                 torch.full((32, 4096), 127.0), kern.pack(ones), 32, torch.ones(32), 1, torch.tensor([1.0, 0.0]), None, None,
                 None, None)[0][0, 0])))
             + ".",
             f"fbgemm static u8 x s8 linear, K = 576, every code at the top of the range: {got_f:.1f} "
             f"(exact {want:.1f}).",
             f"`int8_mm` picks here: **{_pick_int8_mm()}**.",
             f"bf16 head, 512 x 576 x 49152: torch bf16 GEMM {1e3 * th:.0f} ms, widened to fp32 in chunks "
             f"{1e3 * tw:.0f} ms ({th / tw:.2f}× faster); FloatKernel widens here: "
             f"**{'no' if _native_16bit_gemm() else 'yes'}** (native 16-bit GEMM: {_native_16bit_gemm()})."]
    body = "\n".join(lines) + "\n\n" + "\n".join(f"- {s}" for s in notes)
    body += "\n\nWeight-only packed kernels vs widened fp32 path, by rows (best of repeats):\n\n"
    body += weight_only_rows(max(a.repeats, 5))
    body += "\n\nw8a8 linear (dynamic activations) by rows, against int8 weight-only and fp32:\n\n"
    body += w8a8_rows(max(a.repeats, 5))
    print(body)
    if not a.no_write:
        write_section("int8-gemm", "int8 GEMM backends", body, per_cpu=True)


if __name__ == "__main__":
    main()
