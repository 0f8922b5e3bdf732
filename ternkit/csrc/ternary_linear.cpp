// ternkit::ternary_linear -- y (M, N) = x (M, K) @ (scale * T)^T with T packed 2-bit (TQ2_0 / I2_S style).
//
// Layout (ternkit/quant/packing.py "2bit"): codes 0,1,2 = trit -1,0,+1; each row padded with trit 0
// to a multiple of 128; 32 bytes per 128-trit block, byte j holding trits j, j+32, j+64, j+96 in bits
// 0-1, 2-3, 4-5, 6-7. So (block >> 2s) & 3 gives 32 contiguous codes, no shuffles.
//
// Exact float formula, shared with the Python twin (ternkit/ops/ternary_linear.py); per tensor and per
// row are one group g = 0 holding every column:
//   act_bits 8: s_x = 127 * (1 / max(amax|x[m]|, 1e-5)) (torch's 127.0 / t); q = clamp(rint(x * s_x), -128, 127) (int8);
//               acc[m,n,g] = sum_{k in g} q*T (int32, exact);
//               y[m,n] = (sum_g float(acc[m,n,g]) * scale[n,g]) / s_x[m], groups summed in order g = 0, 1, ...,
//               every product rounded before it is added (no FMA contraction).
//   act_bits 0: y[m,n] = sum_g (sum_{k in g} x*T) * scale[n,g], inner sums in float32 in any order.
//
// The weights are never expanded into a float matrix: the int8 path multiplies 2-bit codes c = T + 1
// with int8 activations (AVX2 maddubs, as bitnet.cpp) and corrects with sum(T*q) = sum(c*q) - sum(q);
// the float path turns 8 codes at a time into {-1, 0, +1} floats in a register. Both keep the token loop
// inside the row loop so one decoded block of weights serves a whole tile of tokens.

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
#define TERNKIT_X86 1
#include <immintrin.h>
#endif

#ifdef TERNKIT_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
// Raw-pointer launcher in cuda/ternary_linear.cu; returns a cudaError_t as int (0 = success).
int ternary_linear_cuda_launch(const float* x, const uint8_t* w, const float* scale, int64_t scale_row_stride,
                               float* y, int8_t* qbuf, float* sx, int64_t M, int64_t N, int64_t K, int64_t G,
                               int64_t gs, int64_t act_bits, cudaStream_t stream);
#endif

// The group epilogue must not fuse a*b+c into an FMA, or it would round differently from the twin.
#if defined(__GNUC__) && !defined(__clang__)
#define TERNKIT_NO_CONTRACT __attribute__((optimize("fp-contract=off")))
#else
#define TERNKIT_NO_CONTRACT
#endif

namespace {

constexpr int64_t kBlock = 128;      // trits per block
constexpr int64_t kBlockBytes = 32;  // bytes per block
constexpr int64_t kRun = 32;         // trits per contiguous run (one byte lane of a block)
constexpr float kAmaxMin = 1e-5f;
constexpr int kTileI8 = 8;   // tokens per tile, int8 path (8 int32 accumulators fit the 16 ymm registers)
constexpr int kTileF32 = 4;  // tokens per tile, float path (2 float accumulators each)

// Shapes of one call. Groups are runs of gs consecutive columns; per tensor / per row is G = 1 with
// gs = Kp so the single group covers the padded row.
struct Geo {
  int64_t M, N, K, KB, Kp;  // Kp = KB * 128
  int64_t G, gs, rpg;       // groups, group size (multiple of 32), runs per group
  const float* scale;
  int64_t scale_stride;     // per row: floats between rows of scale (0 per tensor)
};

bool use_avx2() {
#ifdef TERNKIT_X86
  const char* isa = std::getenv("TERNKIT_ISA");
  if (isa != nullptr && std::strcmp(isa, "scalar") == 0) return false;
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

// ---------------------------------------------------------------------------------------------------
// Activation quantization (int8 path): q (M, Kp) zero padded, s_x (M), qsum (M, G) = sum of q per group.

// 127 * (1 / amax), not 127 / amax: torch evaluates ``127.0 / t`` as ``t.reciprocal() * 127`` and the
// twin (and act_quant_8bit) must round the same way.
inline float act_scale(float amax) {
  const float r = 1.0f / std::max(amax, kAmaxMin);
  return r * 127.0f;
}

void quantize_row_scalar(const float* x, int64_t K, int8_t* q, float* sx) {
  float amax = 0.f;
  for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(x[k]));
  const float s = act_scale(amax);
  for (int64_t k = 0; k < K; ++k) {
    const float r = std::nearbyint(x[k] * s);  // round half to even, as torch.round
    q[k] = static_cast<int8_t>(std::min(127.f, std::max(-128.f, r)));
  }
  *sx = s;
}

#ifdef TERNKIT_X86
// 8 floats -> 8 int32 in [-128, 127]: multiply, round half to even, clamp.
__attribute__((target("avx2,fma"))) inline __m256i q8_avx2(const float* p, __m256 vs, __m256 lo, __m256 hi) {
  const __m256 v = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(p), vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm256_cvtps_epi32(_mm256_min_ps(hi, _mm256_max_ps(lo, v)));
}

__attribute__((target("avx2,fma"))) void quantize_row_avx2(const float* x, int64_t K, int8_t* q, float* sx) {
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 vmax = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) vmax = _mm256_max_ps(vmax, _mm256_and_ps(absmask, _mm256_loadu_ps(x + k)));
  float lanes[8];
  _mm256_storeu_ps(lanes, vmax);
  float amax = 0.f;
  for (int i = 0; i < 8; ++i) amax = std::max(amax, lanes[i]);
  for (; k < K; ++k) amax = std::max(amax, std::fabs(x[k]));
  const float s = act_scale(amax);
  const __m256 vs = _mm256_set1_ps(s), lo = _mm256_set1_ps(-128.f), hi = _mm256_set1_ps(127.f);
  // packs_epi32/epi16 interleave the two 128-bit lanes; this puts the 4-byte groups back in order.
  const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  k = 0;
  for (; k + 32 <= K; k += 32) {
    __m256i ab = _mm256_packs_epi32(q8_avx2(x + k, vs, lo, hi), q8_avx2(x + k + 8, vs, lo, hi));
    __m256i cd = _mm256_packs_epi32(q8_avx2(x + k + 16, vs, lo, hi), q8_avx2(x + k + 24, vs, lo, hi));
    __m256i abcd = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(ab, cd), perm);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + k), abcd);
  }
  for (; k < K; ++k) {
    const float r = std::nearbyint(x[k] * s);
    q[k] = static_cast<int8_t>(std::min(127.f, std::max(-128.f, r)));
  }
  *sx = s;
}
#endif

void quantize_all(const float* x, const Geo& g, bool avx2, int8_t* q, float* sx, int32_t* qsum) {
  at::parallel_for(0, g.M, 4, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      int8_t* qm = q + m * g.Kp;
#ifdef TERNKIT_X86
      if (avx2) quantize_row_avx2(x + m * g.K, g.K, qm, sx + m);
      else quantize_row_scalar(x + m * g.K, g.K, qm, sx + m);
#else
      (void)avx2;
      quantize_row_scalar(x + m * g.K, g.K, qm, sx + m);
#endif
      std::memset(qm + g.K, 0, static_cast<size_t>(g.Kp - g.K));
      for (int64_t j = 0; j < g.G; ++j) {
        const int64_t k0 = j * g.gs, k1 = std::min(g.Kp, k0 + g.gs);
        int32_t s = 0;
        for (int64_t k = k0; k < k1; ++k) s += qm[k];
        qsum[m * g.G + j] = s;
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------------
// Epilogue: y[m, n] from per-group sums of one row n and a tile of tokens (plain scalar code, no FMA).

TERNKIT_NO_CONTRACT void epilogue_i8(const int32_t* acc, const float* sc, int64_t G, float sx, float* out) {
  float y = static_cast<float>(acc[0]) * sc[0];
  for (int64_t j = 1; j < G; ++j) {
    const float p = static_cast<float>(acc[j]) * sc[j];
    y = y + p;
  }
  *out = y / sx;
}

TERNKIT_NO_CONTRACT void epilogue_f32(const float* acc, const float* sc, int64_t G, float* out) {
  float y = acc[0] * sc[0];
  for (int64_t j = 1; j < G; ++j) {
    const float p = acc[j] * sc[j];
    y = y + p;
  }
  *out = y;
}

// ---------------------------------------------------------------------------------------------------
// Scalar kernels (any CPU): the row's trits are decoded once into an int8 buffer of Kp entries.

void decode_row(const uint8_t* w, int64_t KB, int8_t* t) {
  for (int64_t b = 0; b < KB; ++b)
    for (int64_t j = 0; j < kBlockBytes; ++j) {
      const uint8_t v = w[b * kBlockBytes + j];
      for (int s = 0; s < 4; ++s) t[b * kBlock + s * kRun + j] = static_cast<int8_t>(((v >> (2 * s)) & 3) - 1);
    }
}

void row_i8_scalar(const int8_t* t, const int8_t* q, const int32_t* /*qsum*/, const Geo& g, int32_t* acc) {
  for (int64_t j = 0; j < g.G; ++j) {
    const int64_t k0 = j * g.gs, k1 = std::min(g.Kp, k0 + g.gs);
    int32_t s = 0;
    for (int64_t k = k0; k < k1; ++k) s += static_cast<int32_t>(t[k]) * q[k];
    acc[j] = s;
  }
}

void row_f32_scalar(const int8_t* t, const float* x, const Geo& g, float* acc) {
  for (int64_t j = 0; j < g.G; ++j) {
    const int64_t k0 = j * g.gs, k1 = std::min(g.K, k0 + g.gs);
    float s = 0.f;
    for (int64_t k = k0; k < k1; ++k) {
      // add or subtract, never multiply: a trit only picks the sign of the activation
      const int8_t v = t[k];
      s += v > 0 ? x[k] : (v < 0 ? -x[k] : 0.f);
    }
    acc[j] = s;
  }
}

// ---------------------------------------------------------------------------------------------------
// AVX2 kernels: one output row, a tile of T tokens, the blocks [kb0, kb1) of the row. The running vector
// sums live in `st` between calls (the driver walks K in chunks so that a tile's activations stay in L1
// while a block of rows passes over them); acc (T, G) receives each group's sum when the group ends.

#ifdef TERNKIT_X86
__attribute__((target("avx2,fma"))) inline int32_t hsum_i32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

__attribute__((target("avx2,fma"))) inline float hsum_f32(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// int8 path. q points at token 0 of the tile (row stride Kp), qsum at its (G) group sums; st holds T
// int32 vectors.
template <int T>
__attribute__((target("avx2,fma"))) void row_i8_avx2(const uint8_t* w, const int8_t* q, const int32_t* qsum,
                                                     const Geo& g, int64_t kb0, int64_t kb1, int32_t* st,
                                                     int32_t* acc) {
  const __m256i mask3 = _mm256_set1_epi8(3);
  const __m256i ones = _mm256_set1_epi16(1);
  const int64_t Kp = g.Kp;
  __m256i a[T];
  for (int t = 0; t < T; ++t) a[t] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(st + 8 * t));
  if (g.rpg % 4 == 0) {
    // Groups hold whole blocks: the four runs of a block are summed in int16 (|sum| <= 4*2*3*128) first.
    const int64_t bpg = g.rpg / 4;
    int64_t j = kb0 / bpg, cnt = kb0 % bpg;
    for (int64_t b = kb0; b < kb1; ++b) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + b * kBlockBytes));
      const __m256i c0 = _mm256_and_si256(v, mask3);
      const __m256i c1 = _mm256_and_si256(_mm256_srli_epi16(v, 2), mask3);
      const __m256i c2 = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask3);
      const __m256i c3 = _mm256_and_si256(_mm256_srli_epi16(v, 6), mask3);
      const int8_t* qb = q + b * kBlock;
      for (int t = 0; t < T; ++t) {
        const int8_t* qp = qb + t * Kp;
        __m256i p = _mm256_maddubs_epi16(c0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qp)));
        p = _mm256_add_epi16(p, _mm256_maddubs_epi16(c1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qp + 32))));
        p = _mm256_add_epi16(p, _mm256_maddubs_epi16(c2, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qp + 64))));
        p = _mm256_add_epi16(p, _mm256_maddubs_epi16(c3, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qp + 96))));
        a[t] = _mm256_add_epi32(a[t], _mm256_madd_epi16(p, ones));
      }
      if (++cnt == bpg || b == g.KB - 1) {
        if (j < g.G)
          for (int t = 0; t < T; ++t) acc[t * g.G + j] = hsum_i32(a[t]) - qsum[t * g.G + j];
        for (int t = 0; t < T; ++t) a[t] = _mm256_setzero_si256();
        ++j;
        cnt = 0;
      }
    }
  } else {
    // Groups end inside blocks (group_size 32, 64, 96, 160, ...): check for a group end after every run.
    int64_t j = 4 * kb0 / g.rpg, cnt = (4 * kb0) % g.rpg;
    for (int64_t b = kb0; b < kb1; ++b) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + b * kBlockBytes));
      const int8_t* qb = q + b * kBlock;
      for (int s = 0; s < 4; ++s) {
        const __m256i c = _mm256_and_si256(_mm256_srl_epi16(v, _mm_cvtsi32_si128(2 * s)), mask3);
        for (int t = 0; t < T; ++t) {
          const __m256i qv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qb + t * Kp + s * kRun));
          a[t] = _mm256_add_epi32(a[t], _mm256_madd_epi16(_mm256_maddubs_epi16(c, qv), ones));
        }
        // a group ends here, or the row does (the padded tail of the last group)
        if (++cnt == g.rpg || (b == g.KB - 1 && s == 3)) {
          if (j < g.G)
            for (int t = 0; t < T; ++t) acc[t * g.G + j] = hsum_i32(a[t]) - qsum[t * g.G + j];
          for (int t = 0; t < T; ++t) a[t] = _mm256_setzero_si256();
          ++j;
          cnt = 0;
        }
      }
    }
  }
  for (int t = 0; t < T; ++t) _mm256_storeu_si256(reinterpret_cast<__m256i*>(st + 8 * t), a[t]);
}

// float path. x points at token 0 of the tile (row stride Kp, zero padded); st holds T*A float vectors.
// Codes become floats through a permute of the table {-1, 0, 1, 2} (the index uses 3 bits; the third,
// from the next trit, is neutralized by repeating the table).
constexpr int f32_chains(int T) { return T == 1 ? 4 : 2; }  // independent FMA chains per token

template <int T>
__attribute__((target("avx2,fma"))) void row_f32_avx2(const uint8_t* w, const float* x, const Geo& g, int64_t kb0,
                                                      int64_t kb1, float* st, float* acc) {
  constexpr int A = f32_chains(T);
  const __m256 lut = _mm256_setr_ps(-1.f, 0.f, 1.f, 2.f, -1.f, 0.f, 1.f, 2.f);
  const int64_t Kp = g.Kp;
  __m256 a[T][A];
  for (int t = 0; t < T; ++t)
    for (int i = 0; i < A; ++i) a[t][i] = _mm256_loadu_ps(st + 8 * (t * A + i));
  int64_t j = 4 * kb0 / g.rpg, cnt = (4 * kb0) % g.rpg;
  for (int64_t b = kb0; b < kb1; ++b) {
    const uint8_t* wb = w + b * kBlockBytes;
    __m256i e[4];
    for (int i = 0; i < 4; ++i)
      e[i] = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(wb + 8 * i)));
    const float* xb = x + b * kBlock;
    for (int s = 0; s < 4; ++s) {
      const __m128i sh = _mm_cvtsi32_si128(2 * s);
      for (int i = 0; i < 4; ++i) {
        const __m256 wv = _mm256_permutevar8x32_ps(lut, _mm256_srl_epi32(e[i], sh));
        for (int t = 0; t < T; ++t)
          a[t][i % A] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xb + t * Kp + s * kRun + 8 * i), a[t][i % A]);
      }
      if (++cnt == g.rpg || (b == g.KB - 1 && s == 3)) {
        if (j < g.G)
          for (int t = 0; t < T; ++t) {
            __m256 sum = a[t][0];
            for (int i = 1; i < A; ++i) sum = _mm256_add_ps(sum, a[t][i]);
            acc[t * g.G + j] = hsum_f32(sum);
          }
        for (int t = 0; t < T; ++t)
          for (int i = 0; i < A; ++i) a[t][i] = _mm256_setzero_ps();
        ++j;
        cnt = 0;
      }
    }
  }
  for (int t = 0; t < T; ++t)
    for (int i = 0; i < A; ++i) _mm256_storeu_ps(st + 8 * (t * A + i), a[t][i]);
}

void dispatch_i8(int T, const uint8_t* w, const int8_t* q, const int32_t* qsum, const Geo& g, int64_t kb0,
                 int64_t kb1, int32_t* st, int32_t* acc) {
  switch (T) {
    case 1: return row_i8_avx2<1>(w, q, qsum, g, kb0, kb1, st, acc);
    case 2: return row_i8_avx2<2>(w, q, qsum, g, kb0, kb1, st, acc);
    case 3: return row_i8_avx2<3>(w, q, qsum, g, kb0, kb1, st, acc);
    case 4: return row_i8_avx2<4>(w, q, qsum, g, kb0, kb1, st, acc);
    case 5: return row_i8_avx2<5>(w, q, qsum, g, kb0, kb1, st, acc);
    case 6: return row_i8_avx2<6>(w, q, qsum, g, kb0, kb1, st, acc);
    case 7: return row_i8_avx2<7>(w, q, qsum, g, kb0, kb1, st, acc);
    default: return row_i8_avx2<8>(w, q, qsum, g, kb0, kb1, st, acc);
  }
}

void dispatch_f32(int T, const uint8_t* w, const float* x, const Geo& g, int64_t kb0, int64_t kb1, float* st,
                  float* acc) {
  switch (T) {
    case 1: return row_f32_avx2<1>(w, x, g, kb0, kb1, st, acc);
    case 2: return row_f32_avx2<2>(w, x, g, kb0, kb1, st, acc);
    case 3: return row_f32_avx2<3>(w, x, g, kb0, kb1, st, acc);
    default: return row_f32_avx2<4>(w, x, g, kb0, kb1, st, acc);
  }
}
#endif

// Rows per parallel chunk: enough work per chunk to pay for the thread hand-off, and small enough that
// 4096 rows split over every thread.
int64_t row_grain(const Geo& g) {
  const int64_t work = std::max<int64_t>(1, g.M * g.Kp);
  return std::max<int64_t>(1, std::min<int64_t>(64, (int64_t{1} << 16) / work));
}

// Cache blocking of the AVX2 drivers: kRowBlock rows walk a tile's activations chunk by chunk of K, a
// chunk being at most kChunkBytes of activations (L1-resident). A tile that fits whole (one token) runs
// each row in one call.
constexpr int64_t kRowBlock = 32;
constexpr int64_t kChunkBytes = 16384;

// Runs `kernel(n, m0, T, kb0, kb1, state_of_row, acc_of_row)` over rows [n0, n1) in blocks of rows,
// tiles of tokens and chunks of K, then `finish(n, m0, T, acc_of_row)` once per row and tile.
template <typename Acc, typename Kernel, typename Finish>
void blocked_rows(const Geo& g, int64_t n0, int64_t n1, int tile, int64_t state_per_row, int64_t act_bytes,
                  Kernel kernel, Finish finish) {
  std::vector<Acc> state(static_cast<size_t>(kRowBlock * state_per_row));
  std::vector<Acc> acc(static_cast<size_t>(kRowBlock * tile * g.G));
  for (int64_t nb = n0; nb < n1; nb += kRowBlock) {
    const int64_t nrows = std::min(kRowBlock, n1 - nb);
    for (int64_t m0 = 0; m0 < g.M; m0 += tile) {
      const int T = static_cast<int>(std::min<int64_t>(tile, g.M - m0));
      std::fill(state.begin(), state.end(), Acc(0));
      const int64_t chunk = std::max<int64_t>(1, kChunkBytes / (T * kBlock * act_bytes));
      for (int64_t kb0 = 0; kb0 < g.KB; kb0 += chunk) {
        const int64_t kb1 = std::min(g.KB, kb0 + chunk);
        for (int64_t r = 0; r < nrows; ++r)
          kernel(nb + r, m0, T, kb0, kb1, state.data() + r * state_per_row, acc.data() + r * tile * g.G);
      }
      for (int64_t r = 0; r < nrows; ++r) finish(nb + r, m0, T, acc.data() + r * tile * g.G);
    }
  }
}

void run_i8(const float* x, const uint8_t* w, const Geo& g, float* y, bool avx2) {
  std::vector<int8_t> q(static_cast<size_t>(g.M * g.Kp));
  std::vector<float> sx(static_cast<size_t>(g.M));
  std::vector<int32_t> qsum(static_cast<size_t>(g.M * g.G));
  quantize_all(x, g, avx2, q.data(), sx.data(), qsum.data());
  auto finish = [&](int64_t n, int64_t m0, int T, const int32_t* acc) {
    const float* sc = g.scale + n * g.scale_stride;
    for (int i = 0; i < T; ++i) epilogue_i8(acc + i * g.G, sc, g.G, sx[m0 + i], y + (m0 + i) * g.N + n);
  };
  at::parallel_for(0, g.N, row_grain(g), [&](int64_t n0, int64_t n1) {
#ifdef TERNKIT_X86
    if (avx2) {
      blocked_rows<int32_t>(g, n0, n1, kTileI8, 8 * kTileI8, 1,
          [&](int64_t n, int64_t m0, int T, int64_t kb0, int64_t kb1, int32_t* st, int32_t* acc) {
            dispatch_i8(T, w + n * g.KB * kBlockBytes, q.data() + m0 * g.Kp, qsum.data() + m0 * g.G, g, kb0, kb1,
                        st, acc);
          }, finish);
      return;
    }
#endif
    std::vector<int32_t> acc(static_cast<size_t>(kTileI8 * g.G));
    std::vector<int8_t> t(static_cast<size_t>(g.Kp));
    for (int64_t n = n0; n < n1; ++n) {
      decode_row(w + n * g.KB * kBlockBytes, g.KB, t.data());
      for (int64_t m0 = 0; m0 < g.M; m0 += kTileI8) {
        const int T = static_cast<int>(std::min<int64_t>(kTileI8, g.M - m0));
        for (int i = 0; i < T; ++i)
          row_i8_scalar(t.data(), q.data() + (m0 + i) * g.Kp, nullptr, g, acc.data() + i * g.G);
        finish(n, m0, T, acc.data());
      }
    }
  });
}

void run_f32(const float* x, const uint8_t* w, const Geo& g, float* y, bool avx2) {
  // The AVX2 loop reads whole blocks of activations: pad x to Kp columns unless it already is.
  std::vector<float> xpad;
  const float* xp = x;
  if (g.Kp != g.K) {
    xpad.assign(static_cast<size_t>(g.M * g.Kp), 0.f);
    for (int64_t m = 0; m < g.M; ++m) std::memcpy(xpad.data() + m * g.Kp, x + m * g.K, sizeof(float) * g.K);
    xp = xpad.data();
  }
  auto finish = [&](int64_t n, int64_t m0, int T, const float* acc) {
    const float* sc = g.scale + n * g.scale_stride;
    for (int i = 0; i < T; ++i) epilogue_f32(acc + i * g.G, sc, g.G, y + (m0 + i) * g.N + n);
  };
  at::parallel_for(0, g.N, row_grain(g), [&](int64_t n0, int64_t n1) {
#ifdef TERNKIT_X86
    if (avx2) {
      blocked_rows<float>(g, n0, n1, kTileF32, 8 * 4 * kTileF32, 4,
          [&](int64_t n, int64_t m0, int T, int64_t kb0, int64_t kb1, float* st, float* acc) {
            dispatch_f32(T, w + n * g.KB * kBlockBytes, xp + m0 * g.Kp, g, kb0, kb1, st, acc);
          }, finish);
      return;
    }
#endif
    std::vector<float> acc(static_cast<size_t>(kTileF32 * g.G));
    std::vector<int8_t> t(static_cast<size_t>(g.Kp));
    for (int64_t n = n0; n < n1; ++n) {
      decode_row(w + n * g.KB * kBlockBytes, g.KB, t.data());
      for (int64_t m0 = 0; m0 < g.M; m0 += kTileF32) {
        const int T = static_cast<int>(std::min<int64_t>(kTileF32, g.M - m0));
        for (int i = 0; i < T; ++i) row_f32_scalar(t.data(), xp + (m0 + i) * g.Kp, g, acc.data() + i * g.G);
        finish(n, m0, T, acc.data());
      }
    }
  });
}

// Checks shared by the CPU and CUDA entry points; fills the geometry.
Geo make_geo(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, int64_t K, int64_t group_size,
             int64_t act_bits) {
  TORCH_CHECK(act_bits == 0 || act_bits == 8, "ternary_linear: act_bits must be 0 or 8, got ", act_bits);
  TORCH_CHECK(K > 0, "ternary_linear: in_features must be positive, got ", K);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, "ternary_linear: x must be (M, in_features=", K, "), got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous(), "ternary_linear: x must be contiguous float32");
  const int64_t KB = (K + kBlock - 1) / kBlock;
  TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 2 && w.size(1) == KB * kBlockBytes && w.is_contiguous(),
              "ternary_linear: w_packed must be contiguous uint8 (N, ", KB * kBlockBytes, "), got ", w.sizes());
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous(),
              "ternary_linear: scale must be contiguous float32");
  TORCH_CHECK(x.device() == w.device() && x.device() == scale.device(),
              "ternary_linear: x, w_packed and scale must be on one device");
  TORCH_CHECK(group_size >= 0 && group_size % kRun == 0,
              "ternary_linear: group_size must be 0 or a positive multiple of 32, got ", group_size);
  Geo g{};
  g.M = x.size(0);
  g.N = w.size(0);
  g.K = K;
  g.KB = KB;
  g.Kp = KB * kBlock;
  g.scale = nullptr;
  if (group_size > 0) {
    g.G = (K + group_size - 1) / group_size;
    g.gs = group_size;
    TORCH_CHECK(scale.numel() == g.N * g.G, "ternary_linear: per-group scale must be (N, ceil(K/group_size)) = (",
                g.N, ", ", g.G, "), got ", scale.sizes());
    g.scale_stride = g.G;
  } else {
    g.G = 1;
    g.gs = g.Kp;
    TORCH_CHECK(scale.numel() == 1 || scale.numel() == g.N,
                "ternary_linear: scale must have 1 (per tensor) or N (per row) elements, got ", scale.sizes());
    g.scale_stride = scale.numel() == 1 ? 0 : 1;
  }
  g.rpg = g.gs / kRun;
  return g;
}

at::Tensor ternary_linear_cpu(const at::Tensor& x, const at::Tensor& w_packed, const at::Tensor& scale,
                              int64_t in_features, int64_t group_size, int64_t act_bits) {
  Geo g = make_geo(x, w_packed, scale, in_features, group_size, act_bits);
  at::Tensor y = at::empty({g.M, g.N}, x.options());
  if (g.M == 0 || g.N == 0) return y;
  g.scale = scale.data_ptr<float>();
  const bool avx2 = use_avx2();
  if (act_bits == 8)
    run_i8(x.data_ptr<float>(), w_packed.data_ptr<uint8_t>(), g, y.data_ptr<float>(), avx2);
  else
    run_f32(x.data_ptr<float>(), w_packed.data_ptr<uint8_t>(), g, y.data_ptr<float>(), avx2);
  return y;
}

#ifdef TERNKIT_WITH_CUDA
at::Tensor ternary_linear_cuda(const at::Tensor& x, const at::Tensor& w_packed, const at::Tensor& scale,
                               int64_t in_features, int64_t group_size, int64_t act_bits) {
  Geo g = make_geo(x, w_packed, scale, in_features, group_size, act_bits);
  at::Tensor y = at::empty({g.M, g.N}, x.options());
  if (g.M == 0 || g.N == 0) return y;
  at::Tensor qbuf = at::empty({act_bits == 8 ? g.M * g.K : 0}, x.options().dtype(at::kChar));
  at::Tensor sx = at::empty({act_bits == 8 ? g.M : 0}, x.options());
  const int64_t gs = group_size > 0 ? group_size : g.K;
  const int err = ternary_linear_cuda_launch(
      x.data_ptr<float>(), w_packed.data_ptr<uint8_t>(), scale.data_ptr<float>(), g.scale_stride,
      y.data_ptr<float>(), qbuf.data_ptr<int8_t>(), sx.data_ptr<float>(), g.M, g.N, g.K, g.G, gs, act_bits,
      c10::cuda::getCurrentCUDAStream(x.device().index()).stream());
  TORCH_CHECK(err == 0, "ternary_linear: CUDA launch failed with error ", err);
  return y;
}
#endif

}  // namespace

TORCH_LIBRARY_FRAGMENT(ternkit, m) {
  m.def("ternary_linear(Tensor x, Tensor w_packed, Tensor scale, int in_features, int group_size, int act_bits) -> Tensor");
}

TORCH_LIBRARY_IMPL(ternkit, CPU, m) { m.impl("ternary_linear", &ternary_linear_cpu); }

#ifdef TERNKIT_WITH_CUDA
TORCH_LIBRARY_IMPL(ternkit, CUDA, m) { m.impl("ternary_linear", &ternary_linear_cuda); }
#endif
