// quantkit's int8 x int8 -> int32 linear for x86-64 CPUs with AVX2 but no VNNI/AMX
// (built on first use by quantkit.kernels.native; see there and kernels/cpu.py W8A8Kernel).
//
// y[m, n] = float(sum_k xq[m, k] * wq[n, k]) * (s_x[m] * s_w[n])  (+ zterm[n])
//
// The activation codes xq are computed here, in one pass, exactly as
// quantkit.formats.integer.quantize_activation does (IEEE division, round half to even,
// clamp): per token (dynamic), or with a frozen scale, symmetric or affine (u - 128).
//
// Exactness: AVX2's vpmaddubsw multiplies unsigned by signed bytes and adds pairs into int16,
// saturating. Feeding it |xq| (<= 128, unsigned) and sign(xq) * wq (|wq| <= 127, the weight
// codes of a symmetric int8 scheme) keeps every pair sum within 2 * 128 * 127 = 32512 < 2^15,
// so nothing saturates; vpmaddwd by ones then widens the pairs into int32 lanes. The result is
// bit-identical to an int32 matmul followed by the same float ops (built with
// -ffp-contract=off, so no fused multiply-add changes the epilogue's rounding). Only the
// float channels of a -oN scheme (a [M, J] x [J, N] product added by torch's BLAS, addmm_,
// or for a few rows by a loop here) are summed in an order of their own.
//
// Weight layout ("panel", from pack): [ceil(N/16)][ceil(K/4)][16 outputs][4 inputs] int8,
// zero padded. One 32-byte load holds 4 consecutive inputs of 8 outputs.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <memory>
#include <vector>

namespace {

constexpr int64_t NR = 16;  // outputs per panel
constexpr int MR = 4;       // activation rows per micro-tile

// acc[r][h] += sum over the panel's k of |a|[r, k] * (sign(a[r, k]) * w[k, 8h..8h+7]) for MR_ rows
template <int MR_>
inline __attribute__((always_inline)) void micro(const uint8_t* au, const int8_t* as, int64_t lda,
                                                 const int8_t* wp, int64_t kq, __m256i (&out)[MR][2]) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i c00 = _mm256_setzero_si256(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00;
  for (int64_t p = 0; p < kq; ++p) {
    const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + p * 64));
    const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + p * 64 + 32));
#define QK_ROW(r, c0, c1)                                                                                   \
  {                                                                                                         \
    int32_t u4, s4;                                                                                         \
    std::memcpy(&u4, au + (r) * lda + 4 * p, 4);                                                            \
    std::memcpy(&s4, as + (r) * lda + 4 * p, 4);                                                            \
    const __m256i ub = _mm256_set1_epi32(u4), sb = _mm256_set1_epi32(s4);                                   \
    c0 = _mm256_add_epi32(c0, _mm256_madd_epi16(_mm256_maddubs_epi16(ub, _mm256_sign_epi8(w0, sb)), ones)); \
    c1 = _mm256_add_epi32(c1, _mm256_madd_epi16(_mm256_maddubs_epi16(ub, _mm256_sign_epi8(w1, sb)), ones)); \
  }
    QK_ROW(0, c00, c01)
    if (MR_ > 1) QK_ROW(1, c10, c11)
    if (MR_ > 2) QK_ROW(2, c20, c21)
    if (MR_ > 3) QK_ROW(3, c30, c31)
#undef QK_ROW
  }
  out[0][0] = c00; out[0][1] = c01;
  out[1][0] = c10; out[1][1] = c11;
  out[2][0] = c20; out[2][1] = c21;
  out[3][0] = c30; out[3][1] = c31;
}

// y[r, n] = float(acc) * (s_x[r] * s_w[n]) (+ zterm[n]), for the panel's ncols outputs
inline void epilogue(const __m256i (&acc)[MR][2], int rows, const float* sx, const float* sw, const float* zt,
                     float* c, int64_t ldc, int ncols) {
  for (int r = 0; r < rows; ++r) {
    alignas(32) float tmp[NR];
    for (int h = 0; h < 2; ++h) {
      const __m256 t = _mm256_mul_ps(_mm256_set1_ps(sx[r]), _mm256_loadu_ps(sw + 8 * h));
      __m256 y = _mm256_mul_ps(_mm256_cvtepi32_ps(acc[r][h]), t);
      if (zt) y = _mm256_add_ps(y, _mm256_loadu_ps(zt + 8 * h));
      _mm256_store_ps(tmp + 8 * h, y);
    }
    std::memcpy(c + r * ldc, tmp, sizeof(float) * ncols);
  }
}

// Codes of one activation row: as = signed code, au = |code| (unsigned); returns how many codes
// sit on the clipping bound. mode 0: dynamic (s computed here), 1: static symmetric,
// 2: static affine (u = round(x/s) + z in [0, 255], stored as u - 128).
int64_t quantize_row(const float* x, int64_t K, int64_t Kp, const int32_t* maskbits, int mode, float s, float z,
                     int8_t* as, uint8_t* au) {
  const __m256 vs = _mm256_set1_ps(s), vz = _mm256_set1_ps(z);
  const __m256 lo = _mm256_set1_ps(mode == 2 ? 0.f : -127.f), hi = _mm256_set1_ps(mode == 2 ? 255.f : 127.f);
  const __m256i off = _mm256_set1_epi32(mode == 2 ? 128 : 0);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  const __m256i bhi = _mm256_set1_epi8(127), blo = _mm256_set1_epi8(mode == 2 ? -128 : -127);
  int64_t clipped = 0, k = 0;
  auto code8 = [&](int64_t j) {
    __m256 v = _mm256_loadu_ps(x + j);
    if (maskbits) v = _mm256_andnot_ps(_mm256_castsi256_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(maskbits + j))), v);
    __m256 q = _mm256_round_ps(_mm256_div_ps(v, vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    if (mode == 2) q = _mm256_add_ps(q, vz);
    q = _mm256_min_ps(_mm256_max_ps(q, lo), hi);  // NaN -> lo: codes stay defined
    return _mm256_sub_epi32(_mm256_cvtps_epi32(q), off);
  };
  for (; k + 32 <= K; k += 32) {
    const __m256i p01 = _mm256_packs_epi32(code8(k), code8(k + 8)), p23 = _mm256_packs_epi32(code8(k + 16), code8(k + 24));
    const __m256i b = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(p01, p23), order);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(as + k), b);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(au + k), _mm256_abs_epi8(b));
    if (mode != 0) {
      const unsigned bits = static_cast<unsigned>(
          _mm256_movemask_epi8(_mm256_or_si256(_mm256_cmpeq_epi8(b, bhi), _mm256_cmpeq_epi8(b, blo))));
      clipped += __builtin_popcount(bits);
    }
  }
  for (; k < K; ++k) {
    float v = (maskbits && maskbits[k]) ? 0.f : x[k];
    float q = std::nearbyint(v / s);
    if (mode == 2) q += z;
    q = std::min(std::max(q, mode == 2 ? 0.f : -127.f), mode == 2 ? 255.f : 127.f);
    if (std::isnan(q)) q = mode == 2 ? 0.f : -127.f;
    const int qi = static_cast<int>(q) - (mode == 2 ? 128 : 0);
    as[k] = static_cast<int8_t>(qi);
    au[k] = static_cast<uint8_t>(qi < 0 ? -qi : qi);
    if (mode != 0) clipped += (qi == 127 || qi == (mode == 2 ? -128 : -127));
  }
  for (; k < Kp; ++k) { as[k] = 0; au[k] = 0; }
  return clipped;
}

float row_scale(const float* x, int64_t K) {
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 m = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) m = _mm256_max_ps(m, _mm256_and_ps(_mm256_loadu_ps(x + k), absmask));
  alignas(32) float t[8];
  _mm256_store_ps(t, m);
  float amax = 0.f;
  for (float v : t) amax = std::max(amax, v);
  for (; k < K; ++k) amax = std::max(amax, std::fabs(x[k]));
  return std::max(amax, 1e-12f) / 127.0f;
}

}  // namespace

// w: int8 [N, K] codes in [-127, 127] -> panel [ceil(N/16), ceil(K/4), 16, 4]
torch::Tensor pack(torch::Tensor w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kInt8, "pack: expected an int8 [N, K] weight");
  const int64_t N = w.size(0), K = w.size(1), Kq = (K + 3) / 4, np = (N + NR - 1) / NR;
  auto out = torch::zeros({np, Kq, NR, 4}, torch::kInt8);
  auto wc = w.contiguous();
  const int8_t* src = wc.data_ptr<int8_t>();
  int8_t* dst = out.data_ptr<int8_t>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t p = n / NR, c = n % NR;
      for (int64_t k = 0; k < K; ++k) dst[((p * Kq + k / 4) * NR + c) * 4 + (k & 3)] = src[n * K + k];
    }
  });
  return out;
}

// x: float32 [M, K]; panel from pack; w_scale: float32 [ceil(N/16) * 16] (zero padded);
// mode 0: dynamic, 1: static symmetric, 2: static affine, with act = float32 [scale, zero];
// zterm: float32 padded like w_scale (the affine correction); maskbits: int32 [K], -1 on the
// float channels (zeroed before quantization); out_idx: int64 [J] those channels and
// w_out_t: float32 [J, padded N] their dequantized weight columns.
// Returns (float32 [M, N], codes on the clipping bound; 0 for mode 0).
std::tuple<torch::Tensor, int64_t> linear(torch::Tensor x, torch::Tensor panel, int64_t N, torch::Tensor w_scale,
                                          int64_t mode, c10::optional<torch::Tensor> act,
                                          c10::optional<torch::Tensor> zterm, c10::optional<torch::Tensor> maskbits,
                                          c10::optional<torch::Tensor> out_idx, c10::optional<torch::Tensor> w_out_t) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "linear: expected float32 [M, K] activations");
  TORCH_CHECK(panel.dim() == 4 && panel.size(2) == NR && panel.size(3) == 4 && panel.is_contiguous(),
              "linear: not a packed panel");
  TORCH_CHECK(mode >= 0 && mode <= 2, "linear: mode is 0 (dynamic), 1 (static) or 2 (static affine)");
  TORCH_CHECK(mode == 0 || (act && act->scalar_type() == torch::kFloat32 && act->numel() == 2),
              "linear: a static mode needs act = float32 [scale, zero]");
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1), np = panel.size(0), Kq = panel.size(1), Kp = Kq * 4, NP = np * NR;
  TORCH_CHECK(Kq == (K + 3) / 4 && np == (N + NR - 1) / NR, "linear: activation/panel shapes disagree");
  auto check_padded = [&](const torch::Tensor& t, const char* what) {
    TORCH_CHECK(t.scalar_type() == torch::kFloat32 && t.is_contiguous() && t.numel() == NP, "linear: ", what,
                " must be float32 [", NP, "]");
  };
  check_padded(w_scale, "w_scale");
  if (zterm) check_padded(*zterm, "zterm");
  TORCH_CHECK(!maskbits || (maskbits->scalar_type() == torch::kInt32 && maskbits->numel() == K && maskbits->is_contiguous()),
              "linear: maskbits must be int32 [K]");
  const int64_t J = out_idx ? out_idx->numel() : 0;
  TORCH_CHECK(!out_idx || (out_idx->scalar_type() == torch::kInt64 && w_out_t && w_out_t->scalar_type() == torch::kFloat32 &&
                           w_out_t->is_contiguous() && w_out_t->size(0) == J && w_out_t->size(1) == NP),
              "linear: out_idx needs int64 indices and w_out_t float32 [J, padded N]");
  const float s_static = mode == 0 ? 0.f : act->data_ptr<float>()[0], z = mode == 2 ? act->data_ptr<float>()[1] : 0.f;
  auto out = torch::empty({M, N}, torch::kFloat32);
  std::unique_ptr<uint8_t[]> au(new uint8_t[M * Kp]);  // every byte written by quantize_row
  std::unique_ptr<int8_t[]> as(new int8_t[M * Kp]);
  std::vector<float> sx(M);
  auto xo = torch::empty({M, J}, torch::kFloat32);  // the float channels, multiplied by BLAS at the end
  float* XO = xo.data_ptr<float>();
  const float* X = x.data_ptr<float>();
  const int32_t* MB = maskbits ? maskbits->data_ptr<int32_t>() : nullptr;
  const int64_t* OI = J ? out_idx->data_ptr<int64_t>() : nullptr;
  for (int64_t j = 0; j < J; ++j) TORCH_CHECK(OI[j] >= 0 && OI[j] < K, "linear: out_idx out of range");
  std::atomic<int64_t> clipped{0};
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    int64_t c = 0;
    for (int64_t m = m0; m < m1; ++m) {
      const float* xr = X + m * K;
      const float s = mode == 0 ? row_scale(xr, K) : s_static;
      sx[m] = s;
      for (int64_t j = 0; j < J; ++j) XO[m * J + j] = xr[OI[j]];
      c += quantize_row(xr, K, Kp, MB, static_cast<int>(mode), s, z, as.get() + m * Kp, au.get() + m * Kp);
    }
    clipped += c;
  });
  // tiles: blocks of MC rows (A stays in L2) x groups of panels (several groups when M is small,
  // so that decode's single row still uses every thread)
  const int64_t MC = std::max<int64_t>(MR, std::min<int64_t>(256, (98304 / (2 * Kp)) / MR * MR));
  const int64_t nblk = (M + MC - 1) / MC, threads = at::get_num_threads();
  const int64_t pg = nblk >= 2 * threads ? np : std::max<int64_t>(1, np / (4 * threads));
  const int64_t ngroups = (np + pg - 1) / pg;
  const int8_t* W = panel.data_ptr<int8_t>();
  const float* SW = w_scale.data_ptr<float>();
  const float* ZT = zterm ? zterm->data_ptr<float>() : nullptr;
  const uint8_t* AU = au.get();
  const int8_t* AS = as.get();
  float* C = out.data_ptr<float>();
  at::parallel_for(0, nblk * ngroups, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / ngroups, g = t % ngroups;
      const int64_t m0 = b * MC, m1 = std::min(M, m0 + MC);
      for (int64_t p = g * pg; p < std::min(np, (g + 1) * pg); ++p) {
        const int ncols = static_cast<int>(std::min<int64_t>(NR, N - p * NR));
        const int8_t* wpp = W + p * Kq * NR * 4;
        const float* swp = SW + p * NR;
        const float* ztp = ZT ? ZT + p * NR : nullptr;
        __m256i acc[MR][2];
        int64_t m = m0;
        for (; m + MR <= m1; m += MR) {
          micro<MR>(AU + m * Kp, AS + m * Kp, Kp, wpp, Kq, acc);
          epilogue(acc, MR, sx.data() + m, swp, ztp, C + m * N + p * NR, N, ncols);
        }
        for (; m < m1; ++m) {
          micro<1>(AU + m * Kp, AS + m * Kp, Kp, wpp, Kq, acc);
          epilogue(acc, 1, sx.data() + m, swp, ztp, C + m * N + p * NR, N, ncols);
        }
      }
    }
  });
  if (J && M > 8) {
    out.addmm_(xo, w_out_t->narrow(1, 0, N));
  } else if (J) {  // decode-sized: a plain loop beats the BLAS call's overhead
    const float* WOT = w_out_t->data_ptr<float>();
    std::vector<float> o(NP);
    for (int64_t m = 0; m < M; ++m) {
      std::fill(o.begin(), o.end(), 0.f);
      for (int64_t j = 0; j < J; ++j) {
        const __m256 v = _mm256_set1_ps(XO[m * J + j]);
        const float* w = WOT + j * NP;
        for (int64_t n = 0; n < NP; n += 8)
          _mm256_storeu_ps(o.data() + n, _mm256_fmadd_ps(v, _mm256_loadu_ps(w + n), _mm256_loadu_ps(o.data() + n)));
      }
      float* y = C + m * N;
      for (int64_t n = 0; n < N; ++n) y[n] += o[n];
    }
  }
  return {out, mode == 0 ? 0 : clipped.load()};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack", &pack, "int8 [N, K] weight codes -> AVX2 panel layout");
  m.def("linear", &linear, "w8a8 linear: quantize activations, int8 x int8 -> int32, scale (+ float channels)");
}
