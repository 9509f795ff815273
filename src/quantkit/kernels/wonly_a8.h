// The int8-activation weight-only linear (the explicit, approximate option); included by wonly.cpp
// after wonly_impl.h, in the same namespace, once with QK_VNNI 0 (AVX2: vpmaddubsw) and once with
// QK_VNNI 1 (AVX-512 VNNI on 256-bit vectors: vpdpbusd).
//
// Each input row is quantized per block of QB values (the largest of 128, 64, 32 that divides the
// weight's group): d = max|x| / 127, q = round(x * 127 / max|x|) in int8, as llama.cpp's Q8_0 does
// (with blocks as large as the weight's groups, as its Q8_K does for K-quants). A weight row's
// stored codes are multiplied with q in integer arithmetic, 32 at a time, and each block's sum is
// scaled by d * s once:
//   y = lmul * ( sum_g s_g sum_{b in g} d_b (<v', q>_b - zfa sum_b q)  -  sum_g zb_g xs_g ),
//   xs_g = sum_{b in g} d_b sum_{k in b} q_k,
// with v' = v + zfa the codes as the integer instruction takes them (the offset is taken out of
// each block's sum in int32, exactly) and zb the group's zero term from rows_params. Codebooks (nf4 / fp4 / IQ4_NL) go through their levels rounded to int8,
// lut8 = round(lut * 127 / max|lut|), lmul = max|lut| / 127 (IQ4_NL's levels are int8: exact).
// The only approximations are q (and lut8): every product and block sum is exact.

#define QK_A8_SPAN 32  // codes per integer step; nibble layouts permute x per span to [evens, odds]

// offset the integer instruction's operand codes carry (v' = v + zfa)
template <int dc>
constexpr int a8_zfa() {
#if QK_VNNI  // vpdpbusd multiplies unsigned bytes (the weight) by signed ones (x)
  return (dc == S8 || dc == LUT_NIB) ? 128 : 0;
#else        // vpmaddubsw: codes up to 15 as they are; other bytes signed (sign trick), U8 shifted down by 128
  return dc == U8 ? -128 : 0;
#endif
}

struct A8 {
  int64_t qb, blocks;   // activation block size, blocks per row
  float lmul;           // codebook level scale (1 for integer codes)
  __m256i tbl;          // codebooks: the 16 levels as bytes, in both 128-bit lanes
};

static inline int64_t a8_block(int64_t group) { return group % 128 == 0 ? 128 : group % 64 == 0 ? 64 : 32; }

static inline A8 make_a8(const Args& a) {
  A8 t;
  t.qb = a8_block(a.group);
  t.blocks = a.K / t.qb;
  t.lmul = 1.f;
  t.tbl = _mm256_setzero_si256();
  if (a.decode == LUT_NIB) {
    float amax = 0.f;
    for (int i = 0; i < 16; ++i) amax = std::max(amax, std::fabs(a.lut[i]));
    alignas(32) int8_t b[32];
    for (int i = 0; i < 16; ++i) {
      const int v = amax > 0.f ? (int)std::nearbyint(a.lut[i] * 127.f / amax) : 0;
#if QK_VNNI
      b[i] = b[i + 16] = (int8_t)(uint8_t)(v + 128);
#else
      b[i] = b[i + 16] = (int8_t)v;
#endif
    }
    t.tbl = _mm256_load_si256((const __m256i*)b);
    t.lmul = amax / 127.f;
  }
  return t;
}

// x [M, K] -> q [M, K] int8 (nibble layouts: per span, [evens, odds]), d [M, blocks], the blocks'
// sums of q [M, blocks] and xs [M, groups]. q = round-to-nearest-even(x * (127 / max|x|)), the
// same fp32 product and rounding as nearbyint (vcvtps2dq under the default MXCSR).
static void quantize_x_a8(const Args& a, const A8& t, const float* x, int64_t M, int8_t* q, float* d, int32_t* qsum,
                          float* xs) {
  const int64_t K = a.K, QB = t.qb, G = a.groups, bpg = a.group / QB;
  const bool nib = a.decode == INT_NIB || a.decode == LUT_NIB;
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // packs' lane order back to x's
  const __m256i evod = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                        0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * K;
    for (int64_t b = 0; b < t.blocks; ++b) {
      const float* xb = xr + b * QB;
      __m256 mx = _mm256_setzero_ps();
      for (int64_t i = 0; i < QB; i += 8) mx = _mm256_max_ps(mx, _mm256_and_ps(_mm256_loadu_ps(xb + i), absmask));
      __m128 h = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
      h = _mm_max_ps(h, _mm_movehl_ps(h, h));
      h = _mm_max_ss(h, _mm_movehdup_ps(h));
      const float amax = _mm_cvtss_f32(h);
      const __m256 vid = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
      __m256i isum = _mm256_setzero_si256();
      int8_t* out = q + m * K + b * QB;
      for (int64_t s = 0; s < QB; s += 32) {
        __m256i i4[4];
        for (int j = 0; j < 4; ++j) {
          i4[j] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + s + 8 * j), vid));
          isum = _mm256_add_epi32(isum, i4[j]);
        }
        __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i4[0], i4[1]), _mm256_packs_epi32(i4[2], i4[3]));
        p = _mm256_permutevar8x32_epi32(p, order);
        if (nib) p = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(p, evod), 0xD8);
        _mm256_storeu_si256((__m256i*)(out + s), p);
      }
      __m128i hs = _mm_add_epi32(_mm256_castsi256_si128(isum), _mm256_extracti128_si256(isum, 1));
      hs = _mm_add_epi32(hs, _mm_shuffle_epi32(hs, 0x4E));
      hs = _mm_add_epi32(hs, _mm_shuffle_epi32(hs, 0xB1));
      const int sum = _mm_cvtsi128_si32(hs);
      const float db = amax / 127.f;
      d[m * t.blocks + b] = db;
      qsum[m * t.blocks + b] = sum;
      const int64_t g = b / bpg;
      if (b % bpg == 0) xs[m * G + g] = 0.f;
      xs[m * G + g] += db * (float)sum;
    }
  }
}

// 32 weight codes as the integer instruction's first operand.
template <int dc>
static inline __m256i a8_weights(const uint8_t* p, const A8& t) {  // p: the unit's first code byte
  if (dc == INT_NIB || dc == LUT_NIB) {
    const __m128i b = _mm_loadu_si128((const __m128i*)p);
    const __m128i m = _mm_set1_epi8(0x0F);
    const __m256i w = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), m), _mm_and_si128(b, m));
    return dc == LUT_NIB ? _mm256_shuffle_epi8(t.tbl, w) : w;
  }
  const __m256i w = _mm256_loadu_si256((const __m256i*)p);
#if QK_VNNI
  return dc == S8 ? _mm256_xor_si256(w, _mm256_set1_epi8((char)0x80)) : w;
#else
  return dc == U8 ? _mm256_xor_si256(w, _mm256_set1_epi8((char)0x80)) : w;
#endif
}

// acc (8 int32) += the 32 products w * x, summed in fours.
template <int dc>
static inline __m256i a8_dot(__m256i acc, __m256i w, __m256i x) {
#if QK_VNNI
  return _mm256_dpbusd_epi32(acc, w, x);
#else
  const __m256i ones = _mm256_set1_epi16(1);
  if (dc == INT_NIB)  // codes 0..15: two products fit int16 as they are
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), ones));
  // signed bytes: |w| times x with w's sign (|w| <= 128, |x| <= 127: two products fit int16)
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(x, w)), ones));
#endif
}

// y[m, n] for MB input rows and weight row n; QB (the activation block) fixed at compile time so
// that a block's integer steps unroll.
template <int dc, int MB, int QB>
static inline void row_dot_a8(const Args& a, const A8& t, int64_t n, const int8_t* q, const float* xd,
                              const int32_t* qsum, const float* xs, float* y, int64_t ystride, const float* sb,
                              const float* zb) {
  const uint8_t* rp = a.codes + n * a.row_bytes;
  if (n + QK_PREFETCH_ROWS < a.N)
    for (int64_t off = 0; off < a.row_bytes; off += 64) _mm_prefetch((const char*)rp + QK_PREFETCH_ROWS * a.row_bytes + off, _MM_HINT_T0);
  constexpr int U = QB / QK_A8_SPAN;
  constexpr int64_t BB = (dc == INT_NIB || dc == LUT_NIB) ? QB / 2 : QB;  // code bytes per block
  const int64_t K = a.K, G = a.groups, bpg = a.group / QB, nb = t.blocks;
  __m256 tot[MB];
  for (int m = 0; m < MB; ++m) tot[m] = _mm256_setzero_ps();
  const int8_t* qp = q;
  const float* xdp = xd;
  const int32_t* qsp = qsum;
  constexpr int zfa = a8_zfa<dc>();
  for (int64_t g = 0; g < G; ++g) {
    const float s = sb[g];
    for (int64_t bb = 0; bb < bpg; ++bb, rp += BB, qp += QB, ++xdp, ++qsp) {
      __m256i acc[MB];
      for (int m = 0; m < MB; ++m) acc[m] = _mm256_setzero_si256();
#pragma GCC unroll 8
      for (int u = 0; u < U; ++u) {
        const __m256i w = a8_weights<dc>(rp + u * (BB / U), t);
        for (int m = 0; m < MB; ++m)
          acc[m] = a8_dot<dc>(acc[m], w, _mm256_loadu_si256((const __m256i*)(qp + m * K + u * QK_A8_SPAN)));
      }
      if (zfa)
        for (int m = 0; m < MB; ++m) acc[m] = _mm256_sub_epi32(acc[m], _mm256_zextsi128_si256(_mm_cvtsi32_si128(zfa * qsp[m * nb])));
      for (int m = 0; m < MB; ++m)
        tot[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[m]), _mm256_set1_ps(xdp[m * nb] * s), tot[m]);
    }
  }
  for (int m = 0; m < MB; ++m) {  // the zero term enters before the one horizontal sum
    int64_t g = 0;
    for (; g + 8 <= G; g += 8) tot[m] = _mm256_fnmadd_ps(_mm256_loadu_ps(zb + g), _mm256_loadu_ps(xs + m * G + g), tot[m]);
    if (g < G) tot[m] = _mm256_fnmadd_ps(vload_n(zb + g, G - g), vload_n(xs + m * G + g, G - g), tot[m]);
    y[m * ystride + n] = t.lmul * vsum(tot[m]);
  }
}

template <int dc, int QB>
static void linear_a8_q(const Args& a, const A8& t, const int8_t* q, const float* xd, const int32_t* qsum,
                        const float* xs, int64_t M, float* y) {
  const int64_t N = a.N, K = a.K, G = a.groups, nb = t.blocks;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    constexpr int64_t RB = 32;
    std::vector<float> params(2 * RB * G);
    float *sbv = params.data(), *zbv = sbv + RB * G;
    for (int64_t nr = n0; nr < n1; nr += RB) {
      const int64_t ne = std::min(n1, nr + RB);
      rows_params(a, nr, ne, sbv, zbv);
      for (int64_t n = nr; n < ne; ++n) {
        const float *sb = sbv + (n - nr) * G, *zb = zbv + (n - nr) * G;
        int64_t m = 0;
        for (; m + 4 <= M; m += 4)
          row_dot_a8<dc, 4, QB>(a, t, n, q + m * K, xd + m * nb, qsum + m * nb, xs + m * G, y + m * N, N, sb, zb);
        switch (M - m) {
          case 3: row_dot_a8<dc, 3, QB>(a, t, n, q + m * K, xd + m * nb, qsum + m * nb, xs + m * G, y + m * N, N, sb, zb); break;
          case 2: row_dot_a8<dc, 2, QB>(a, t, n, q + m * K, xd + m * nb, qsum + m * nb, xs + m * G, y + m * N, N, sb, zb); break;
          case 1: row_dot_a8<dc, 1, QB>(a, t, n, q + m * K, xd + m * nb, qsum + m * nb, xs + m * G, y + m * N, N, sb, zb); break;
          default: break;
        }
      }
    }
  });
}

template <int dc>
static void linear_a8_d(const Args& a, const float* x, int64_t M, float* y) {
  const A8 t = make_a8(a);
  std::vector<int8_t> qv(M * a.K);
  std::vector<float> dv(M * t.blocks), xsv(M * a.groups);
  std::vector<int32_t> sv(M * t.blocks);
  quantize_x_a8(a, t, x, M, qv.data(), dv.data(), sv.data(), xsv.data());
  switch (t.qb) {
    case 128: linear_a8_q<dc, 128>(a, t, qv.data(), dv.data(), sv.data(), xsv.data(), M, y); break;
    case 64: linear_a8_q<dc, 64>(a, t, qv.data(), dv.data(), sv.data(), xsv.data(), M, y); break;
    default: linear_a8_q<dc, 32>(a, t, qv.data(), dv.data(), sv.data(), xsv.data(), M, y); break;
  }
}

static void linear_a8(const Args& a, const float* x, int64_t M, float* y) {
  switch (a.decode) {
    case INT_NIB: linear_a8_d<INT_NIB>(a, x, M, y); break;
    case LUT_NIB: linear_a8_d<LUT_NIB>(a, x, M, y); break;
    case U8: linear_a8_d<U8>(a, x, M, y); break;
    default: linear_a8_d<S8>(a, x, M, y); break;
  }
}

#undef QK_A8_SPAN
