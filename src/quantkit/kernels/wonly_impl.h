// One ISA's weight-only kernels; included by wonly.cpp once per ISA, inside a
// `#pragma GCC target` region and a namespace (avx2 / avx512), with QK_AVX512 set to 0 or 1.
// Everything here is static: each inclusion is its own copy, compiled for its own target.
//
// A weight row is decoded 32 codes at a time ("unit") into NV float vectors of W lanes
// (AVX2: 4 x 8, AVX-512: 2 x 16); a group's tail beyond a whole unit is done one code at a
// time. Every decoded weight is w = (v - zf) * s, exactly as the codecs dequantize (see
// wonly.cpp), and is multiplied into up to 4 input rows at once.

#if QK_AVX512
#define QK_W 16
#define QK_NV 2
typedef __m512 vf;
static inline vf vzero() { return _mm512_setzero_ps(); }
static inline vf vset1(float a) { return _mm512_set1_ps(a); }
static inline vf vload(const float* p) { return _mm512_loadu_ps(p); }
static inline void vstore(float* p, vf a) { _mm512_storeu_ps(p, a); }
static inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
static inline vf vsub(vf a, vf b) { return _mm512_sub_ps(a, b); }
static inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
static inline float vsum(vf a) { return _mm512_reduce_add_ps(a); }
static inline vf vload_h(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
static inline vf vload_u8(const uint8_t* p) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p))); }
static inline vf vload_s8(const int8_t* p) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p))); }
struct Lut { __m512 t; };
static inline Lut make_lut(const float* lut) { Lut l; l.t = lut ? _mm512_loadu_ps(lut) : _mm512_setzero_ps(); return l; }
static inline vf from_u8x16(__m128i c, int d, const Lut& l) {  // 16 codes (bytes) -> 16 floats
  __m512i i = _mm512_cvtepu8_epi32(c);
  return d == LUT_NIB ? _mm512_permutexvar_ps(i, l.t) : _mm512_cvtepi32_ps(i);
}
static inline vf from_fp8x16(__m128i b, int d) {  // 16 fp8 bytes -> 16 floats (e4m3: x 2^-8)
  // e4m3: the sign-extended byte shifted by 7 puts sign and payload where fp16 has them, with a
  // copy of the sign in bit 14 that is cleared; e5m2 is the upper byte of an fp16
  __m256i h = d == E4M3 ? _mm256_and_si256(_mm256_slli_epi16(_mm256_cvtepi8_epi16(b), 7), _mm256_set1_epi16(-16385))
                        : _mm256_slli_epi16(_mm256_cvtepu8_epi16(b), 8);
  return _mm512_cvtph_ps(h);
}
template <int d>
static inline void decode_unit(const uint8_t* row, int64_t k, const Lut& l, vf v[QK_NV]) {
  if (d == INT_NIB || d == LUT_NIB) {
    __m128i b = _mm_loadu_si128((const __m128i*)(row + (k >> 1)));
    __m128i m = _mm_set1_epi8(0x0F);
    __m128i lo = _mm_and_si128(b, m), hi = _mm_and_si128(_mm_srli_epi16(b, 4), m);
    v[0] = from_u8x16(_mm_unpacklo_epi8(lo, hi), d, l);
    v[1] = from_u8x16(_mm_unpackhi_epi8(lo, hi), d, l);
  } else if (d == U8 || d == S8) {
    for (int j = 0; j < 2; ++j) {
      __m128i b = _mm_loadu_si128((const __m128i*)(row + k + 16 * j));
      __m512i i = d == U8 ? _mm512_cvtepu8_epi32(b) : _mm512_cvtepi8_epi32(b);
      v[j] = _mm512_cvtepi32_ps(i);
    }
  } else {
    for (int j = 0; j < 2; ++j) v[j] = from_fp8x16(_mm_loadu_si128((const __m128i*)(row + k + 16 * j)), d);
  }
}
// The multiply path's decode: nibble codes come out as [even positions, odd positions] of the
// unit (no interleaving shuffle); the input row is permuted to match once per call (permute_x).
template <int d>
static inline void decode_unit_mm(const uint8_t* row, int64_t k, const Lut& l, vf v[QK_NV]) {
  if (d == INT_NIB || d == LUT_NIB) {
    __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(row + (k >> 1))));
    __m512i lo = _mm512_and_si512(b, _mm512_set1_epi32(15)), hi = _mm512_srli_epi32(b, 4);
    v[0] = d == LUT_NIB ? _mm512_permutexvar_ps(lo, l.t) : _mm512_cvtepi32_ps(lo);
    v[1] = d == LUT_NIB ? _mm512_permutexvar_ps(hi, l.t) : _mm512_cvtepi32_ps(hi);
  } else {
    decode_unit<d>(row, k, l, v);
  }
}
#define QK_PERM_SPAN 32  // nibble positions permuted together
#else
#define QK_W 8
#define QK_NV 4
typedef __m256 vf;
static inline vf vzero() { return _mm256_setzero_ps(); }
static inline vf vset1(float a) { return _mm256_set1_ps(a); }
static inline vf vload(const float* p) { return _mm256_loadu_ps(p); }
static inline void vstore(float* p, vf a) { _mm256_storeu_ps(p, a); }
static inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
static inline vf vsub(vf a, vf b) { return _mm256_sub_ps(a, b); }
static inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
static inline float vsum(vf a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
static inline vf vload_h(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
static inline vf vload_u8(const uint8_t* p) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p))); }
static inline vf vload_s8(const int8_t* p) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p))); }
struct Lut { __m256 lo, hi; };
static inline Lut make_lut(const float* lut) {
  Lut l;
  l.lo = lut ? _mm256_loadu_ps(lut) : _mm256_setzero_ps();
  l.hi = lut ? _mm256_loadu_ps(lut + 8) : _mm256_setzero_ps();
  return l;
}
static inline vf from_u8x8(__m128i c, int d, const Lut& l) {  // the low 8 bytes -> 8 floats
  __m256i i = _mm256_cvtepu8_epi32(c);
  if (d != LUT_NIB) return _mm256_cvtepi32_ps(i);
  // 16 entries from two 8-entry permutes; bit 3 of the code (moved to the sign bit) picks one
  __m256 lo = _mm256_permutevar8x32_ps(l.lo, i), hi = _mm256_permutevar8x32_ps(l.hi, i);
  return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(i, 28)));
}
static inline vf from_fp8x8(__m128i b, int d) {  // the low 8 fp8 bytes -> 8 floats (e4m3: x 2^-8)
  __m128i h = d == E4M3 ? _mm_and_si128(_mm_slli_epi16(_mm_cvtepi8_epi16(b), 7), _mm_set1_epi16(-16385))
                        : _mm_slli_epi16(_mm_cvtepu8_epi16(b), 8);
  return _mm256_cvtph_ps(h);
}
template <int d>
static inline void decode_unit(const uint8_t* row, int64_t k, const Lut& l, vf v[QK_NV]) {
  if (d == INT_NIB || d == LUT_NIB) {
    __m128i b = _mm_loadu_si128((const __m128i*)(row + (k >> 1)));
    __m128i m = _mm_set1_epi8(0x0F);
    __m128i lo = _mm_and_si128(b, m), hi = _mm_and_si128(_mm_srli_epi16(b, 4), m);
    __m128i c0 = _mm_unpacklo_epi8(lo, hi), c1 = _mm_unpackhi_epi8(lo, hi);
    v[0] = from_u8x8(c0, d, l);
    v[1] = from_u8x8(_mm_srli_si128(c0, 8), d, l);
    v[2] = from_u8x8(c1, d, l);
    v[3] = from_u8x8(_mm_srli_si128(c1, 8), d, l);
  } else if (d == U8 || d == S8) {
    for (int j = 0; j < 4; ++j) {
      __m128i b = _mm_loadl_epi64((const __m128i*)(row + k + 8 * j));
      __m256i i = d == U8 ? _mm256_cvtepu8_epi32(b) : _mm256_cvtepi8_epi32(b);
      v[j] = _mm256_cvtepi32_ps(i);
    }
  } else {
    for (int j = 0; j < 4; ++j) v[j] = from_fp8x8(_mm_loadl_epi64((const __m128i*)(row + k + 8 * j)), d);
  }
}
template <int d>
static inline void decode_unit_mm(const uint8_t* row, int64_t k, const Lut& l, vf v[QK_NV]) {
  if (d == INT_NIB || d == LUT_NIB) {
    for (int h = 0; h < 2; ++h) {
      __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(row + (k >> 1) + 8 * h)));
      __m256i lo = _mm256_and_si256(b, _mm256_set1_epi32(15)), hi = _mm256_srli_epi32(b, 4);
      if (d == LUT_NIB) {
        v[2 * h] = _mm256_blendv_ps(_mm256_permutevar8x32_ps(l.lo, lo), _mm256_permutevar8x32_ps(l.hi, lo),
                                    _mm256_castsi256_ps(_mm256_slli_epi32(lo, 28)));
        v[2 * h + 1] = _mm256_blendv_ps(_mm256_permutevar8x32_ps(l.lo, hi), _mm256_permutevar8x32_ps(l.hi, hi),
                                        _mm256_castsi256_ps(_mm256_slli_epi32(hi, 28)));
      } else {
        v[2 * h] = _mm256_cvtepi32_ps(lo);
        v[2 * h + 1] = _mm256_cvtepi32_ps(hi);
      }
    }
  } else {
    decode_unit<d>(row, k, l, v);
  }
}
#define QK_PERM_SPAN 16
#endif

static inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }

static inline float decode_one(const uint8_t* row, int64_t k, int d, const float* lut) {
  switch (d) {
    case INT_NIB: case LUT_NIB: {
      uint8_t b = row[k >> 1];
      int c = (k & 1) ? (b >> 4) : (b & 15);
      return d == LUT_NIB ? lut[c] : (float)c;
    }
    case U8: return (float)row[k];
    case S8: return (float)(int8_t)row[k];
    case E4M3: {
      uint16_t b = row[k];
      return half_to_float((uint16_t)(((b & 0x80) << 8) | ((b & 0x7F) << 7)));
    }
    default: return half_to_float((uint16_t)(row[k] << 8));
  }
}

// Group constants: the scale s (times smul) and the value zf subtracted before scaling.
static inline void group_params(const Args& a, int64_t n, int64_t g, float& s, float& zf) {
  int64_t i = a.per_tensor ? 0 : n * a.groups + g;
  float sv;
  if (a.smode == SCALE_F16) sv = half_to_float(((const uint16_t*)a.scale)[i]);
  else if (a.smode == SCALE_F32) sv = ((const float*)a.scale)[i];
  else {  // double quant: absmax = q * chunk scale + offset, two roundings as the codec does
    float p = (float)((const int8_t*)a.scale)[i] * a.scale2[i / DQ_CHUNK];  // -ffp-contract=off: no fma
    sv = p + a.offset;
  }
  s = sv * a.smul;
  zf = a.zero ? (float)a.zero[a.zero_per_tensor ? 0 : i] : a.zconst;
}

// The additive term b of layouts stored as w = v * s + b (GGUF's Q4_1 / Q5_1: b = the block's m).
static inline float group_bias(const Args& a, int64_t n, int64_t g) {
  const int64_t i = n * a.groups + g;
  return a.bias_f32 ? ((const float*)a.bias)[i] : half_to_float(((const uint16_t*)a.bias)[i]);
}

// One weight exactly as its codec dequantizes it.
static inline float weight_value(const Args& a, float v, float s, float zf, float b, bool zsub) {
  return a.bias ? v * s + b : zsub ? (v - zf) * s : v * s;
}

#if QK_AVX512
static inline vf vload_n(const float* p, int64_t n) { return _mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1), p); }
#else
static inline vf vload_n(const float* p, int64_t n) {
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32((int)n), idx));
}
#endif

// s and s * zf of every group of weight rows [n0, n1) into sb, zb [(n1 - n0) * groups]: the rows'
// scales are contiguous, so plain per-group tensors go W values at a time; per-tensor and
// double-quant scales one by one (the same values either way).
static inline void rows_params(const Args& a, int64_t n0, int64_t n1, float* sb, float* zb) {
  const int64_t G = a.groups, total = (n1 - n0) * G, base = n0 * G;
  int64_t i = 0;
  if (!a.per_tensor && a.smode != SCALE_DQ && (a.zero == nullptr || !a.zero_per_tensor)) {
    const vf mul = vset1(a.smul), zc = vset1(a.zconst);
    for (; i + QK_W <= total; i += QK_W) {
      vf sv = a.smode == SCALE_F16 ? vload_h((const uint16_t*)a.scale + base + i) : vload((const float*)a.scale + base + i);
      sv = vmul(sv, mul);
      vstore(sb + i, sv);
      if (a.bias)
        vstore(zb + i, vsub(vzero(), a.bias_f32 ? vload((const float*)a.bias + base + i)
                                                 : vload_h((const uint16_t*)a.bias + base + i)));
      else
        vstore(zb + i, vmul(sv, a.zero ? vload_u8(a.zero + base + i) : zc));
    }
  }
  if (a.smode == SCALE_DQ && !a.per_tensor) {  // absmax = q * scale2[j / 256] + offset, one 256-run at a time
    const int8_t* q = (const int8_t*)a.scale + base;
    const vf off = vset1(a.offset), mul = vset1(a.smul), zero = vzero();
    while (i < total) {
      const int64_t j = base + i, run_end = std::min(total, i + (DQ_CHUNK - j % DQ_CHUNK));
      const vf ss = vset1(a.scale2[j / DQ_CHUNK]);
      for (; i + QK_W <= run_end; i += QK_W) {
        vstore(sb + i, vmul(vadd(vmul(vload_s8(q + i), ss), off), mul));
        vstore(zb + i, zero);  // codebooks have no zero point
      }
      for (; i < run_end; ++i) {
        sb[i] = ((float)q[i] * a.scale2[j / DQ_CHUNK] + a.offset) * a.smul;
        zb[i] = 0.f;
      }
    }
    return;
  }
  for (int64_t n = n0 + i / G, g = i % G; i < total; ++i) {
    float s, zf;
    group_params(a, n, g, s, zf);
    sb[i] = s;
    zb[i] = a.bias ? -group_bias(a, n, g) : s * zf;
    if (++g == G) { g = 0; ++n; }
  }
}

static inline float dot(const float* p, const float* q, int64_t len) {
  vf acc = vzero();
  int64_t i = 0;
  for (; i + QK_W <= len; i += QK_W) acc = vfma(vload(p + i), vload(q + i), acc);
  if (i < len) acc = vfma(vload_n(p + i, len - i), vload_n(q + i, len - i), acc);
  return vsum(acc);
}

// y[m, n] for MB input rows and one weight row n. xp: the input rows permuted for the nibble
// decode (x itself for byte codes); xs [M, groups]: each group's sum of x over its whole units.
// Per group, the raw codes' dot product with x is scaled once and the zero term subtracted:
//   y = sum_g s_g * (sum_k x_k v_k - zf_g * sum_k x_k)
template <int d, int MB>
static inline void row_dot(const Args& a, const Lut& l, int64_t n, const float* x, const float* xp, const float* xs,
                           float* y, int64_t ystride, const float* sb, const float* zb) {
  const uint8_t* row = a.codes + n * a.row_bytes;
  constexpr bool zsub = (d == INT_NIB || d == U8 || d == S8);
  constexpr int NA = QK_NV;
  if (n + QK_PREFETCH_ROWS < a.N)  // the hardware prefetcher alone leaves half the bandwidth unused
    for (int64_t off = 0; off < a.row_bytes; off += 64) _mm_prefetch((const char*)row + QK_PREFETCH_ROWS * a.row_bytes + off, _MM_HINT_T0);
  const int64_t K = a.K, G = a.groups, L = a.group;
  vf tot[MB][NA];
  float scal[MB];
  for (int m = 0; m < MB; ++m) {
    scal[m] = 0.f;
    for (int j = 0; j < NA; ++j) tot[m][j] = vzero();
  }
  const int64_t units = L / 32;
  if (units) {
    for (int64_t g = 0; g < G; ++g) {
      const int64_t k0 = g * L, kvec = k0 + units * 32;
      vf acc[MB][NA];
      for (int m = 0; m < MB; ++m)
        for (int j = 0; j < NA; ++j) acc[m][j] = vzero();
      for (int64_t k = k0; k < kvec; k += 32) {
        vf v[QK_NV];
        decode_unit_mm<d>(row, k, l, v);
        for (int j = 0; j < QK_NV; ++j)
          for (int m = 0; m < MB; ++m) acc[m][j] = vfma(v[j], vload(xp + m * K + k + j * QK_W), acc[m][j]);
      }
      const vf vs = vset1(sb[g]);
      for (int m = 0; m < MB; ++m)
        for (int j = 0; j < NA; ++j) tot[m][j] = vfma(acc[m][j], vs, tot[m][j]);
    }
    if (zsub || a.bias)
      for (int m = 0; m < MB; ++m) scal[m] -= dot(zb, xs + m * G, G);
  }
  if (L % 32) {  // each group's last codes short of a unit: one at a time, w exactly as dequantized
    for (int64_t g = 0; g < G; ++g) {
      const float s = sb[g];
      float zf = 0.f, s2;
      if (zsub) group_params(a, n, g, s2, zf);
      const float b = a.bias ? group_bias(a, n, g) : 0.f;
      for (int64_t k = g * L + units * 32; k < (g + 1) * L; ++k) {
        float w = weight_value(a, decode_one(row, k, d, a.lut), s, zf, b, zsub);
        for (int m = 0; m < MB; ++m) scal[m] += w * x[m * K + k];
      }
    }
  }
  for (int m = 0; m < MB; ++m) {
    vf t = tot[m][0];
    for (int j = 1; j < NA; ++j) t = vadd(t, tot[m][j]);
    y[m * ystride + n] = vsum(t) + scal[m];
  }
}

// xp: x with each whole unit's nibble positions reordered to [evens, odds] per QK_PERM_SPAN (the
// order decode_unit_mm yields them in); xs: each group's sum of x over its whole units.
static void prepare_x(const Args& a, const float* x, int64_t M, float* xp, float* xs) {
  const int64_t K = a.K, G = a.groups, L = a.group;
  const bool nib = a.decode == INT_NIB || a.decode == LUT_NIB;
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * K;
    float* pr = xp + m * K;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t k0 = g * L, kvec = k0 + (L / 32) * 32;
      float sum = 0.f;
      for (int64_t k = k0; k < kvec; k += QK_PERM_SPAN) {
        for (int i = 0; i < QK_PERM_SPAN; ++i) {
          sum += xr[k + i];
          if (nib) pr[k + (i & 1) * (QK_PERM_SPAN / 2) + (i >> 1)] = xr[k + i];
        }
      }
      xs[m * G + g] = sum;
    }
  }
}

// The dequantized rows [r0, r1) into out [r1 - r0, K] (fp32): bit-identical to the codecs.
template <int d>
static void dequant_rows(const Args& a, int64_t r0, int64_t r1, float* out) {
  constexpr bool zsub = (d == INT_NIB || d == U8 || d == S8);
  const Lut l = make_lut(a.lut);
  const int64_t K = a.K, G = a.groups, L = a.group;
  for (int64_t n = r0; n < r1; ++n) {
    const uint8_t* row = a.codes + n * a.row_bytes;
    float* o = out + (n - r0) * K;
    for (int64_t g = 0; g < G; ++g) {
      float s, zf;
      group_params(a, n, g, s, zf);
      const float b = a.bias ? group_bias(a, n, g) : 0.f;
      const vf vs = vset1(s), vz = vset1(zf), vb = vset1(b);
      const int64_t k0 = g * L, kend = k0 + L, kvec = k0 + (L / 32) * 32;
      for (int64_t k = k0; k < kvec; k += 32) {
        vf v[QK_NV];
        decode_unit<d>(row, k, l, v);
        for (int j = 0; j < QK_NV; ++j)
          vstore(o + k + j * QK_W, a.bias ? vadd(vmul(v[j], vs), vb) : zsub ? vmul(vsub(v[j], vz), vs) : vmul(v[j], vs));
      }
      for (int64_t k = kvec; k < kend; ++k) o[k] = weight_value(a, decode_one(row, k, d, a.lut), s, zf, b, zsub);
    }
  }
}

// y [M, N] = x [M, K] . W^T for M small: every weight row decoded once, into up to 4 x rows at a time.
template <int d>
static void linear_rows_d(const Args& a, const float* x, int64_t M, float* y) {
  const int64_t N = a.N, K = a.K, G = a.groups;
  const bool nib = d == INT_NIB || d == LUT_NIB;
  std::vector<float> xpv(nib ? M * K : 0), xsv(M * G);
  prepare_x(a, x, M, nib ? xpv.data() : nullptr, xsv.data());
  const float* xp = nib ? xpv.data() : x;
  const float* xs = xsv.data();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    const Lut l = make_lut(a.lut);
    constexpr int64_t RB = 32;  // rows whose group constants are worked out together
    std::vector<float> params(2 * RB * G);
    float *sbv = params.data(), *zbv = sbv + RB * G;
    for (int64_t nb = n0; nb < n1; nb += RB) {
      const int64_t ne = std::min(n1, nb + RB);
      rows_params(a, nb, ne, sbv, zbv);
      for (int64_t n = nb; n < ne; ++n) {
        const float *sb = sbv + (n - nb) * G, *zb = zbv + (n - nb) * G;
        int64_t m = 0;
        for (; m + 4 <= M; m += 4) row_dot<d, 4>(a, l, n, x + m * K, xp + m * K, xs + m * G, y + m * N, N, sb, zb);
        switch (M - m) {
          case 3: row_dot<d, 3>(a, l, n, x + m * K, xp + m * K, xs + m * G, y + m * N, N, sb, zb); break;
          case 2: row_dot<d, 2>(a, l, n, x + m * K, xp + m * K, xs + m * G, y + m * N, N, sb, zb); break;
          case 1: row_dot<d, 1>(a, l, n, x + m * K, xp + m * K, xs + m * G, y + m * N, N, sb, zb); break;
          default: break;
        }
      }
    }
  });
}

static void linear_rows(const Args& a, const float* x, int64_t M, float* y) {
  switch (a.decode) {
    case INT_NIB: linear_rows_d<INT_NIB>(a, x, M, y); break;
    case LUT_NIB: linear_rows_d<LUT_NIB>(a, x, M, y); break;
    case U8: linear_rows_d<U8>(a, x, M, y); break;
    case S8: linear_rows_d<S8>(a, x, M, y); break;
    case E4M3: linear_rows_d<E4M3>(a, x, M, y); break;
    default: linear_rows_d<E5M2>(a, x, M, y); break;
  }
}

static void dequant_parallel(const Args& a, int64_t r0, int64_t r1, float* out) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(a.K, 1));
  at::parallel_for(r0, r1, grain, [&](int64_t n0, int64_t n1) {
    float* o = out + (n0 - r0) * a.K;
    switch (a.decode) {
      case INT_NIB: dequant_rows<INT_NIB>(a, n0, n1, o); break;
      case LUT_NIB: dequant_rows<LUT_NIB>(a, n0, n1, o); break;
      case U8: dequant_rows<U8>(a, n0, n1, o); break;
      case S8: dequant_rows<S8>(a, n0, n1, o); break;
      case E4M3: dequant_rows<E4M3>(a, n0, n1, o); break;
      default: dequant_rows<E5M2>(a, n0, n1, o); break;
    }
  });
}

#undef QK_W
#undef QK_NV
#undef QK_PERM_SPAN
