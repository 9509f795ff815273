// quantkit's weight-only linear for the layouts quantkit stores, as torch custom ops:
//
//   quantkit::wonly_linear(x, codes, scale, zero, scale2, offset, lut, N, K, group, decode,
//                          zconst, smul, isa, max_rows) -> y [M, N] = x [M, K] . W^T  (fp32)
//   quantkit::wonly_dequant(codes, ..., isa, r0, r1) -> W[r0:r1] [r1 - r0, K]    (fp32)
//
// W is never held in float: each row is decoded from its stored codes while it is multiplied.
// Every weight is computed exactly as the codecs' dequantize computes it in fp32,
//     w = (v - zf) * s          integer codes ("int": v = stored code, zf = zero point or the
//                               implied offset 2^(b-1) of symmetric codes)
//     w = lut[c] * s            nf4 / fp4 (16-entry level table, s = block absmax)
//     w = fp8(c) * s            fp8 (c's bits widened to fp16 and converted by F16C; e4m3 lands
//                               at 2^-8 of its value, folded into s as smul = 256, exactly)
// so the only difference to F.linear(x, dequantized W) is the order of the fp32 sums.
// wonly_dequant gives the dequantized rows bit for bit (tests compare them with the codecs).
//
// Layouts (`decode`): 0 two 4-bit codes per byte, low nibble first (int 2-4 bits, stored or
// repacked), 1 the same codes through `lut`, 2 one uint8 code per weight, 3 one int8 code,
// 4 fp8 e4m3 bytes, 5 fp8 e5m2 bytes. Rows are `codes.numel() / N` bytes apart.
// Scales (from scale's dtype): float16 or float32 [N, K/group] ([1, 1]: one per tensor), or
// int8 with scale2 float32 [ceil(n/256)] and offset float32 [1] (double quant: the absmax of
// group i is scale[i] * scale2[i / 256] + offset). zero: uint8, like scale, or None (zconst).
// bias: float16 or float32 [N, K/group] or None; with it w = v * s + b (GGUF's Q4_1 / Q5_1, b = the
// block's m; Q4_K / Q5_K, s = d * sc and b = -(dmin * m) of each sub-block of 32).
//
// Few input rows (M <= max_rows: decode, batched decode) run the fused decode-and-multiply,
// every weight row decoded once for up to 4 input rows at a time, threads over output rows.
// More rows (prefill, evaluation) dequantize chunks of rows in fp32 and hand them to torch's
// GEMM, which wins there. ISA: isa 1 = AVX2+FMA+F16C, 2 = AVX-512 (F, BW, VL, DQ), 0 = the
// best this CPU has. Threads are torch's own (at::parallel_for): no second OpenMP pool.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

namespace {

enum Decode { INT_NIB = 0, LUT_NIB = 1, U8 = 2, S8 = 3, E4M3 = 4, E5M2 = 5 };
enum ScaleMode { SCALE_F16 = 0, SCALE_F32 = 1, SCALE_DQ = 2 };
constexpr int64_t DQ_CHUNK = 256;
constexpr int64_t QK_PREFETCH_ROWS = 4;  // weight rows read ahead of the one being multiplied

struct Args {
  const uint8_t* codes;
  int64_t row_bytes, N, K, group, groups;
  int decode, smode;
  const void* scale;
  bool per_tensor, zero_per_tensor;
  const uint8_t* zero;
  const float* scale2;
  float offset, zconst, smul;
  const float* lut;
  const void* bias;  // float16 or float32 [N, groups], or null: w = v * s + b instead of (v - zf) * s
  bool bias_f32;
};

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
#define QK_AVX512 0
#include "wonly_impl.h"
#define QK_VNNI 0
#include "wonly_a8.h"
#undef QK_VNNI
#undef QK_AVX512
}  // namespace avx2
#pragma GCC pop_options

// the int8-activation path with AVX-512 VNNI's vpdpbusd on 256-bit vectors (its float helpers are
// wonly_impl.h's AVX2 ones, compiled again for this target)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512vnni,avx2,fma,f16c")
namespace vnni {
#define QK_AVX512 0
#include "wonly_impl.h"
#define QK_VNNI 1
#include "wonly_a8.h"
#undef QK_VNNI
#undef QK_AVX512
}  // namespace vnni
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
namespace avx512 {
#define QK_AVX512 1
#include "wonly_impl.h"
#undef QK_AVX512
}  // namespace avx512
#pragma GCC pop_options

bool has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

bool has_avx512() {
  __builtin_cpu_init();
  return has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}

bool has_vnni() {
  __builtin_cpu_init();
  return has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512vnni");
}

// isa 1 = AVX2+FMA+F16C, 2 = `wide` (AVX-512 for the exact ops, AVX-512 VNNI for int8 activations),
// 0 = the best this CPU has
int pick(int64_t isa, bool (*has_wide)(), const char* wide) {
  if (isa == 0) {
    if (has_wide()) return 2;
    TORCH_CHECK(has_avx2(), "quantkit native kernels need an x86-64 CPU with AVX2 and FMA");
    return 1;
  }
  TORCH_CHECK(isa == 1 || isa == 2, "isa must be 0 (auto), 1 (avx2) or 2 (", wide, "), got ", isa);
  TORCH_CHECK(isa == 1 ? has_avx2() : has_wide(), "this CPU has no ", isa == 1 ? "AVX2+FMA" : wide);
  return (int)isa;
}

int pick_isa(int64_t isa) { return pick(isa, has_avx512, "AVX-512 (F/BW/VL/DQ)"); }
int pick_isa_a8(int64_t isa) { return pick(isa, has_vnni, "AVX-512 VNNI"); }

Args make_args(const at::Tensor& codes, const at::Tensor& scale, const c10::optional<at::Tensor>& zero,
               const c10::optional<at::Tensor>& scale2, const c10::optional<at::Tensor>& offset,
               const c10::optional<at::Tensor>& lut, const c10::optional<at::Tensor>& bias, int64_t N, int64_t K,
               int64_t group, int64_t decode, double zconst, double smul) {
  TORCH_CHECK(decode >= 0 && decode <= 5, "decode must be 0..5, got ", decode);
  TORCH_CHECK(N > 0 && K > 0 && group > 0 && K % group == 0, "bad shape N=", N, " K=", K, " group=", group);
  TORCH_CHECK(codes.is_contiguous() && codes.element_size() == 1 && codes.device().is_cpu(),
              "codes must be contiguous one-byte CPU tensors");
  TORCH_CHECK(codes.numel() % N == 0, "codes (", codes.numel(), " bytes) do not split into ", N, " rows");
  Args a;
  a.codes = (const uint8_t*)codes.data_ptr();
  a.row_bytes = codes.numel() / N;
  const bool nib = decode <= LUT_NIB;
  TORCH_CHECK(a.row_bytes >= (nib ? (K + 1) / 2 : K), "rows of ", a.row_bytes, " bytes cannot hold ", K, " codes");
  a.N = N; a.K = K; a.group = group; a.groups = K / group;
  a.decode = (int)decode;
  TORCH_CHECK(scale.is_contiguous() && scale.device().is_cpu(), "scale must be a contiguous CPU tensor");
  const auto st = scale.scalar_type();
  a.smode = st == at::kHalf ? SCALE_F16 : st == at::kFloat ? SCALE_F32 : st == at::kChar ? SCALE_DQ : -1;
  TORCH_CHECK(a.smode >= 0, "scale must be float16, float32 or int8 (double quant), got ", st);
  a.per_tensor = scale.numel() == 1;
  TORCH_CHECK(a.per_tensor || scale.numel() == N * a.groups, "scale has ", scale.numel(), " values for ", N, " x ",
              a.groups, " groups");
  a.scale = scale.data_ptr();
  a.scale2 = nullptr; a.offset = 0.f;
  if (a.smode == SCALE_DQ) {
    TORCH_CHECK(scale2.has_value() && offset.has_value(), "double-quant scales need scale2 and offset");
    TORCH_CHECK(scale2->scalar_type() == at::kFloat && scale2->is_contiguous() &&
                scale2->numel() * DQ_CHUNK >= scale.numel(), "scale2 must be float32 [ceil(n/256)]");
    TORCH_CHECK(offset->scalar_type() == at::kFloat && offset->numel() == 1, "offset must be float32 [1]");
    a.scale2 = scale2->data_ptr<float>();
    a.offset = offset->item<float>();
  }
  a.zero = nullptr; a.zero_per_tensor = false;
  if (zero.has_value()) {
    TORCH_CHECK(zero->scalar_type() == at::kByte && zero->is_contiguous() &&
                (zero->numel() == scale.numel() || zero->numel() == 1), "zero must be uint8 shaped like scale");
    a.zero = zero->data_ptr<uint8_t>();
    a.zero_per_tensor = zero->numel() == 1;
  }
  a.lut = nullptr;
  if (decode == LUT_NIB) {
    TORCH_CHECK(lut.has_value() && lut->scalar_type() == at::kFloat && lut->numel() == 16 && lut->is_contiguous(),
                "decode 1 needs lut float32 [16]");
    a.lut = lut->data_ptr<float>();
  }
  a.bias = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK((bias->scalar_type() == at::kHalf || bias->scalar_type() == at::kFloat) && bias->is_contiguous() &&
                bias->numel() == N * a.groups && !a.zero, "bias must be float16 or float32 [N, groups], without a zero point");
    a.bias = bias->data_ptr();
    a.bias_f32 = bias->scalar_type() == at::kFloat;
  }
  a.zconst = (float)zconst; a.smul = (float)smul;
  return a;
}

void dequant_into(const Args& a, int isa, int64_t r0, int64_t r1, float* out) {
  if (isa == 2) avx512::dequant_parallel(a, r0, r1, out);
  else avx2::dequant_parallel(a, r0, r1, out);
}

// many rows: the exact weight in fp32, a chunk of rows at a time (at most ~8 MB), torch's GEMM, into y
void gemm_rows(const Args& a, int isa, const at::Tensor& xc, at::Tensor& y) {
  const int64_t N = a.N, K = a.K;
  const int64_t chunk = std::max<int64_t>(16, (int64_t(8) << 20) / (4 * K));
  at::Tensor w = at::empty({std::min(chunk, N), K}, xc.options());
  for (int64_t r0 = 0; r0 < N; r0 += chunk) {
    const int64_t r1 = std::min(N, r0 + chunk);
    at::Tensor wc = w.narrow(0, 0, r1 - r0);
    dequant_into(a, isa, r0, r1, wc.data_ptr<float>());
    if (r0 == 0 && r1 == N) {
      at::mm_out(y, xc, wc.t());
      return;
    }
    y.narrow(1, r0, r1 - r0).copy_(at::mm(xc, wc.t()));
  }
}

at::Tensor wonly_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                        const c10::optional<at::Tensor>& zero, const c10::optional<at::Tensor>& scale2,
                        const c10::optional<at::Tensor>& offset, const c10::optional<at::Tensor>& lut,
                        const c10::optional<at::Tensor>& bias, int64_t N, int64_t K, int64_t group, int64_t decode, double zconst, double smul, int64_t isa,
                        int64_t max_rows) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "x must be float32 [M, ", K, "] on the CPU");
  Args a = make_args(codes, scale, zero, scale2, offset, lut, bias, N, K, group, decode, zconst, smul);
  const int which = pick_isa(isa);
  const at::Tensor xc = x.contiguous();
  const int64_t M = xc.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0) return y;
  if (M <= max_rows) {
    if (which == 2) avx512::linear_rows(a, xc.data_ptr<float>(), M, y.data_ptr<float>());
    else avx2::linear_rows(a, xc.data_ptr<float>(), M, y.data_ptr<float>());
    return y;
  }
  gemm_rows(a, which, xc, y);
  return y;
}

// The int8-activation option: x quantized per block to int8 (wonly_a8.h), every row count.
at::Tensor wonly_linear_a8(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                           const c10::optional<at::Tensor>& zero, const c10::optional<at::Tensor>& scale2,
                           const c10::optional<at::Tensor>& offset, const c10::optional<at::Tensor>& lut,
                           const c10::optional<at::Tensor>& bias, int64_t N, int64_t K, int64_t group, int64_t decode,
                           double zconst, double smul, int64_t isa) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "x must be float32 [M, ", K, "] on the CPU");
  Args a = make_args(codes, scale, zero, scale2, offset, lut, bias, N, K, group, decode, zconst, smul);
  TORCH_CHECK(decode <= S8, "int8 activations need integer codes or a 16-level codebook, not fp8 (decode ", decode, ")");
  TORCH_CHECK(group % 32 == 0, "int8 activations need groups of a multiple of 32 values, got ", group);
  const int which = pick_isa_a8(isa);
  const at::Tensor xc = x.contiguous();
  const int64_t M = xc.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0) return y;
  if (which == 2) vnni::linear_a8(a, xc.data_ptr<float>(), M, y.data_ptr<float>());
  else avx2::linear_a8(a, xc.data_ptr<float>(), M, y.data_ptr<float>());
  return y;
}

at::Tensor wonly_dequant(const at::Tensor& codes, const at::Tensor& scale, const c10::optional<at::Tensor>& zero,
                         const c10::optional<at::Tensor>& scale2, const c10::optional<at::Tensor>& offset,
                         const c10::optional<at::Tensor>& lut, const c10::optional<at::Tensor>& bias, int64_t N,
                         int64_t K, int64_t group, int64_t decode, double zconst, double smul, int64_t isa, int64_t r0,
                         int64_t r1) {
  Args a = make_args(codes, scale, zero, scale2, offset, lut, bias, N, K, group, decode, zconst, smul);
  TORCH_CHECK(0 <= r0 && r0 <= r1 && r1 <= N, "rows [", r0, ", ", r1, ") outside [0, ", N, ")");
  at::Tensor out = at::empty({r1 - r0, K}, at::TensorOptions().dtype(at::kFloat));
  if (r1 > r0) dequant_into(a, pick_isa(isa), r0, r1, out.data_ptr<float>());
  return out;
}

// Bound layers: a layer's tensors and arguments registered once (wonly_bind), so that each call
// passes x and a handle (wonly_run) instead of 15 arguments, which torch's Python dispatch parses
// in ~3 us and torch.compile guards one by one. Handles are never reused.
struct Bound {
  at::Tensor codes, scale;
  c10::optional<at::Tensor> zero, scale2, offset, lut, bias;
  Args a;
  int isa, isa_a8;
  int64_t max_rows, a8_rows;  // the fused path up to max_rows; int8 activations up to a8_rows
};
std::mutex bound_mu;
std::vector<std::shared_ptr<const Bound>> bound_layers;

int64_t wonly_bind(const at::Tensor& codes, const at::Tensor& scale, const c10::optional<at::Tensor>& zero,
                   const c10::optional<at::Tensor>& scale2, const c10::optional<at::Tensor>& offset,
                   const c10::optional<at::Tensor>& lut, const c10::optional<at::Tensor>& bias, int64_t N, int64_t K,
                   int64_t group, int64_t decode, double zconst, double smul, int64_t isa, int64_t isa_a8,
                   int64_t max_rows, int64_t a8_rows) {
  auto b = std::make_shared<Bound>();
  b->codes = codes; b->scale = scale; b->zero = zero; b->scale2 = scale2; b->offset = offset; b->lut = lut; b->bias = bias;
  b->a = make_args(b->codes, b->scale, b->zero, b->scale2, b->offset, b->lut, b->bias, N, K, group, decode, zconst, smul);
  b->isa = pick_isa(isa);
  b->max_rows = max_rows;
  b->a8_rows = a8_rows;
  if (a8_rows > 0) {
    TORCH_CHECK(decode <= S8 && group % 32 == 0, "this layout has no int8-activation path (decode ", decode, ", group ", group, ")");
    b->isa_a8 = pick_isa_a8(isa_a8);
  } else {
    b->isa_a8 = 0;
  }
  std::lock_guard<std::mutex> g(bound_mu);
  bound_layers.push_back(std::move(b));
  return (int64_t)bound_layers.size() - 1;
}

void wonly_unbind(int64_t handle) {
  std::lock_guard<std::mutex> g(bound_mu);
  if (handle >= 0 && handle < (int64_t)bound_layers.size()) bound_layers[handle].reset();
}

at::Tensor wonly_run(const at::Tensor& x, const at::Tensor& handle_t, int64_t N) {
  TORCH_CHECK(handle_t.scalar_type() == at::kLong && handle_t.numel() == 1 && handle_t.device().is_cpu(),
              "handle must be an int64 CPU tensor of one element");
  const int64_t handle = *handle_t.data_ptr<int64_t>();
  std::shared_ptr<const Bound> b;
  {
    std::lock_guard<std::mutex> g(bound_mu);
    TORCH_CHECK(handle >= 0 && handle < (int64_t)bound_layers.size() && bound_layers[handle], "no bound layer ", handle);
    b = bound_layers[handle];
  }
  const Args& a = b->a;
  TORCH_CHECK(N == a.N, "layer ", handle, " has ", a.N, " outputs, not ", N);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == a.K && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "x must be float32 [M, ", a.K, "] on the CPU");
  const at::Tensor xc = x.contiguous();
  const int64_t M = xc.size(0);
  at::Tensor y = at::empty({M, a.N}, x.options());
  if (M == 0) return y;
  const float* xp = xc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  if (M <= b->a8_rows) {
    if (b->isa_a8 == 2) vnni::linear_a8(a, xp, M, yp);
    else avx2::linear_a8(a, xp, M, yp);
  } else if (M <= b->max_rows) {
    if (b->isa == 2) avx512::linear_rows(a, xp, M, yp);
    else avx2::linear_rows(a, xp, M, yp);
  } else {
    gemm_rows(a, b->isa, xc, y);
  }
  return y;
}

int64_t best_isa() { return has_avx512() ? 2 : has_avx2() ? 1 : 0; }
int64_t best_isa_a8() { return has_vnni() ? 2 : has_avx2() ? 1 : 0; }

}  // namespace

TORCH_LIBRARY_FRAGMENT(quantkit, m) {
  m.def("wonly_linear(Tensor x, Tensor codes, Tensor scale, Tensor? zero, Tensor? scale2, Tensor? offset, "
        "Tensor? lut, Tensor? bias, int N, int K, int group, int decode, float zconst, float smul, int isa, int max_rows) "
        "-> Tensor");
  m.def("wonly_dequant(Tensor codes, Tensor scale, Tensor? zero, Tensor? scale2, Tensor? offset, Tensor? lut, "
        "Tensor? bias, int N, int K, int group, int decode, float zconst, float smul, int isa, int r0, int r1) -> Tensor");
  m.def("wonly_linear_a8(Tensor x, Tensor codes, Tensor scale, Tensor? zero, Tensor? scale2, Tensor? offset, "
        "Tensor? lut, Tensor? bias, int N, int K, int group, int decode, float zconst, float smul, int isa) -> Tensor");
  m.def("wonly_run(Tensor x, Tensor handle, int N) -> Tensor");
  m.def("wonly_bind(Tensor codes, Tensor scale, Tensor? zero, Tensor? scale2, Tensor? offset, Tensor? lut, "
        "Tensor? bias, int N, int K, int group, int decode, float zconst, float smul, int isa, int isa_a8, "
        "int max_rows, int a8_rows) -> int", &wonly_bind);
  m.def("wonly_unbind(int handle) -> ()", &wonly_unbind);
  m.def("wonly_best_isa() -> int", &best_isa);
  m.def("wonly_a8_best_isa() -> int", &best_isa_a8);
}

TORCH_LIBRARY_IMPL(quantkit, CPU, m) {
  m.impl("wonly_linear", &wonly_linear);
  m.impl("wonly_dequant", &wonly_dequant);
  m.impl("wonly_linear_a8", &wonly_linear_a8);
  m.impl("wonly_run", &wonly_run);
}
