// ternkit::stc_write: the in-place STC (sparse ternary covariance) memory write of the mLSTM,
//   C = f' C + i' k v^T,  n = f' n + i' k   per (batch, head),
// where k and v are STC-quantized (alpha * {-1, 0, +1}, mostly exact zeros).
//
// f' == 1: only the nnz(k) x nnz(v) entries C[r, c] = C[r, c] + i' * (k_r * v_c) are written;
//          everything else keeps its bits. AVX2: at low density the nz columns one by one, else
//          the 8-column blocks of v holding a non-zero with a blend that keeps the v_c == 0
//          columns untouched; rows of a large C are software-prefetched two nz rows ahead.
// The nz rows/columns of every (b, h) are gathered first (branch-free, a lookup table of bit
// positions on AVX2) into per-thread scratch that is reused across calls, so a warm call makes
// one heap allocation (the counts tensor).
// f' != 1: one pass over C, C[r, c] = f' * C[r, c] + i' * (k_r * v_c) (f' == 0: +0 + i' * (k_r * v_c)).
// The expressions and their evaluation order match ternkit/ops/stc_write.py stc_write_reference
// bit for bit, so nothing may be contracted into an FMA: the AVX2 functions target "avx2" only
// (not "fma") and the pragmas below switch contraction off for compilers/targets that default to it.
//
// Returns int64 (2,) = [written, decayed]: sum of nnz(k) * nnz(v), and DK * DV per (b, h) with f' != 1.

#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__) && !defined(__x86_64__)
// (x86-64 needs no pragma: FMA is neither in the baseline ISA nor in the "avx2" target below.)
#pragma GCC optimize("fp-contract=off")
#endif

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define TERNKIT_X86 1
#else
#define TERNKIT_X86 0
#endif

#ifdef TERNKIT_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>
// Raw-pointer launcher in cuda/stc_write.cu; counts (2,) int64 must be zeroed by the caller.
cudaError_t ternkit_stc_write_cuda(float* C, float* n, const float* k, const float* v, const float* i_scale,
                                   const float* f_scale, int64_t BH, int64_t DK, int64_t DV, int64_t* counts,
                                   cudaStream_t stream);
#endif

namespace {

// ---------------------------------------------------------------------------------------------
// ISA selection: AVX2 when the CPU has it, unless TERNKIT_ISA=scalar (read per call).

bool use_avx2() {
#if TERNKIT_X86 && defined(__GNUC__)
  const char* isa = std::getenv("TERNKIT_ISA");
  if (isa != nullptr && std::strcmp(isa, "scalar") == 0) return false;
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
#else
  return false;
#endif
}

// ---------------------------------------------------------------------------------------------
// Scalar building blocks (portable).

// C[r, cols[j]] += i * (kr * v[cols[j]]) for the listed columns.
inline void row_sparse_scalar(float* row, const float* v, const int32_t* cols, int64_t nc, float i, float kr) {
  for (int64_t j = 0; j < nc; ++j) {
    const int32_t c = cols[j];
    const float kv = kr * v[c];
    const float t = i * kv;
    row[c] = row[c] + t;
  }
}

// Contiguous row update that keeps the v[c] == 0 columns (a select the compiler can vectorize).
inline void row_masked_scalar(float* __restrict__ row, const float* __restrict__ v, int64_t DV, float i, float kr) {
  for (int64_t c = 0; c < DV; ++c) {
    const float kv = kr * v[c];
    const float t = i * kv;
    const float x = row[c];
    row[c] = (v[c] != 0.0f) ? x + t : x;
  }
}

// row[c] = f * row[c] + i * (kr * v[c]) over the whole row (FILL: +0 instead of f * row[c]).
template <bool FILL>
inline void row_fused_scalar(float* __restrict__ row, const float* __restrict__ v, int64_t DV, float i, float f, float kr) {
  for (int64_t c = 0; c < DV; ++c) {
    const float kv = kr * v[c];
    const float t = i * kv;
    const float d = FILL ? 0.0f : f * row[c];
    row[c] = d + t;
  }
}

#if TERNKIT_X86 && defined(__GNUC__)
// ---------------------------------------------------------------------------------------------
// AVX2 building blocks (mul and add kept separate: same rounding as the scalar path and the twin).

// Whole-row update when every v[c] is non-zero.
__attribute__((target("avx2"))) void row_add_avx2(float* row, const float* v, int64_t DV, float i, float kr) {
  const __m256 vi = _mm256_set1_ps(i), vk = _mm256_set1_ps(kr);
  int64_t c = 0;
  for (; c + 16 <= DV; c += 16) {
    const __m256 t0 = _mm256_mul_ps(vi, _mm256_mul_ps(vk, _mm256_loadu_ps(v + c)));
    const __m256 t1 = _mm256_mul_ps(vi, _mm256_mul_ps(vk, _mm256_loadu_ps(v + c + 8)));
    _mm256_storeu_ps(row + c, _mm256_add_ps(_mm256_loadu_ps(row + c), t0));
    _mm256_storeu_ps(row + c + 8, _mm256_add_ps(_mm256_loadu_ps(row + c + 8), t1));
  }
  for (; c < DV; ++c) {
    const float kv = kr * v[c];
    const float t = i * kv;
    row[c] = row[c] + t;
  }
}

template <bool FILL>
__attribute__((target("avx2"))) void row_fused_avx2(float* row, const float* v, int64_t DV, float i, float f,
                                                     float kr) {
  const __m256 vi = _mm256_set1_ps(i), vk = _mm256_set1_ps(kr), vf = _mm256_set1_ps(f);
  int64_t c = 0;
  for (; c + 16 <= DV; c += 16) {
    const __m256 t0 = _mm256_mul_ps(vi, _mm256_mul_ps(vk, _mm256_loadu_ps(v + c)));
    const __m256 t1 = _mm256_mul_ps(vi, _mm256_mul_ps(vk, _mm256_loadu_ps(v + c + 8)));
    const __m256 d0 = FILL ? _mm256_setzero_ps() : _mm256_mul_ps(vf, _mm256_loadu_ps(row + c));
    const __m256 d1 = FILL ? _mm256_setzero_ps() : _mm256_mul_ps(vf, _mm256_loadu_ps(row + c + 8));
    _mm256_storeu_ps(row + c, _mm256_add_ps(d0, t0));
    _mm256_storeu_ps(row + c + 8, _mm256_add_ps(d1, t1));
  }
  for (; c + 8 <= DV; c += 8) {
    const __m256 t0 = _mm256_mul_ps(vi, _mm256_mul_ps(vk, _mm256_loadu_ps(v + c)));
    const __m256 d0 = FILL ? _mm256_setzero_ps() : _mm256_mul_ps(vf, _mm256_loadu_ps(row + c));
    _mm256_storeu_ps(row + c, _mm256_add_ps(d0, t0));
  }
  for (; c < DV; ++c) {
    const float kv = kr * v[c];
    const float t = i * kv;
    const float d = FILL ? 0.0f : f * row[c];
    row[c] = d + t;
  }
}
#endif

// Indices of the non-zero entries of x[0:D] into idx; returns their count. `x != 0` is true for nan.
inline int64_t gather_nz(const float* x, int64_t D, int32_t* idx) {
  int64_t cnt = 0;
  for (int64_t j = 0; j < D; ++j) {
    idx[cnt] = static_cast<int32_t>(j);
    cnt += (x[j] != 0.0f) ? 1 : 0;  // branch-free: k and v are ~random in sign and sparsity
  }
  return cnt;
}

#if TERNKIT_X86 && defined(__GNUC__)
// kLut.idx[m] lists the set bits of the 8-bit mask m (then zeros): a branch-free index gather.
struct BitLut {
  alignas(64) uint8_t idx[256][8];
  constexpr BitLut() : idx{} {
    for (int m = 0; m < 256; ++m) {
      int c = 0;
      for (int b = 0; b < 8; ++b)
        if ((m >> b) & 1) idx[m][c++] = static_cast<uint8_t>(b);
    }
  }
};
constexpr BitLut kLut{};

// gather_nz with AVX2: 8 entries per step, each step stores 8 indices at idx + cnt (cnt <= j, so
// never past idx[D - 1]) and advances cnt by the popcount.
__attribute__((target("avx2,popcnt"))) int64_t gather_nz_avx2(const float* x, int64_t D, int32_t* idx) {
  const __m256 zero = _mm256_setzero_ps();
  int64_t cnt = 0, j = 0;
  for (; j + 8 <= D; j += 8) {
    // NEQ_UQ: nan counts as non-zero, like `x != 0`.
    const int m = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + j), zero, _CMP_NEQ_UQ));
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(kLut.idx[m]));
    const __m256i ix = _mm256_add_epi32(_mm256_cvtepu8_epi32(b), _mm256_set1_epi32(static_cast<int32_t>(j)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(idx + cnt), ix);
    cnt += __builtin_popcount(static_cast<unsigned>(m));
  }
  for (; j < D; ++j) {
    idx[cnt] = static_cast<int32_t>(j);
    cnt += (x[j] != 0.0f) ? 1 : 0;
  }
  return cnt;
}

// The nz columns of v (into cols, as gather_nz_avx2) and the first columns of the 8-column blocks
// of v[0:DV/8*8] that hold a non-zero (into blocks, in order; nb returned); tail_nz gets nnz(v)
// past the last full block.
__attribute__((target("avx2,popcnt"))) int64_t v_cols_blocks_avx2(const float* v, int64_t DV, int32_t* cols,
                                                                    int32_t* blocks, int64_t* nc, int64_t* tail_nz) {
  const __m256 zero = _mm256_setzero_ps();
  int64_t nb = 0, cnt = 0, j = 0;
  for (; j + 8 <= DV; j += 8) {
    const int m = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(v + j), zero, _CMP_NEQ_UQ));
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(kLut.idx[m]));
    const __m256i ix = _mm256_add_epi32(_mm256_cvtepu8_epi32(b), _mm256_set1_epi32(static_cast<int32_t>(j)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(cols + cnt), ix);
    cnt += __builtin_popcount(static_cast<unsigned>(m));
    blocks[nb] = static_cast<int32_t>(j);
    nb += (m != 0) ? 1 : 0;
  }
  int64_t t = 0;
  for (; j < DV; ++j) {
    cols[cnt + t] = static_cast<int32_t>(j);
    t += (v[j] != 0.0f) ? 1 : 0;
  }
  *nc = cnt + t;
  *tail_nz = t;
  return nb;
}

// Rows ahead whose touched lines are software-prefetched (measured: 2 beat 1 and 4 at B=8 heads).
constexpr int64_t kPrefetchRows = 2;

// f' == 1 for one (b, h) on the AVX2 path: n[r] += i * k_r and C[r, c] += i * (k_r * v_c) over the
// nz rows x the nz blocks of v. Rows outer and blocks inner: each row is walked in address order
// (the hardware prefetcher follows it) while the lines of the next nz row, whose address nothing
// predicts, are software-prefetched one row ahead. Within a block a blend stores the old bits back
// into the v_c == 0 lanes (same value, so bit-exact) instead of a data-dependent branch.
__attribute__((target("avx2"))) void keep_head_avx2(float* C, float* n, const float* k, const float* v, float i,
                                                    int64_t DV, const int32_t* rows, int64_t nr, const int32_t* cols,
                                                    int64_t nc, const int32_t* blocks, int64_t nb, int64_t tail_nz,
                                                    bool prefetch) {
  for (int64_t j = 0; j < nr; ++j) {
    const int32_t r = rows[j];
    const float t = i * k[r];
    n[r] = n[r] + t;
  }
  if (nc == 0 || nr == 0) return;
  const __m256 vi = _mm256_set1_ps(i), zero = _mm256_setzero_ps();
  if (nc == DV) {
    for (int64_t j = 0; j < nr; ++j) row_add_avx2(C + static_cast<int64_t>(rows[j]) * DV, v, DV, i, k[rows[j]]);
    return;
  }
  // A block costs about two single-column updates here (its 8-wide load/blend/store), so the
  // scattered columns win while v averages fewer than two non-zeros per touched block (~10% density).
  // With about one non-zero column per 64-byte line or more most lines of a row are touched, and
  // one prefetch per line of the whole row is cheaper than one per column.
  const bool prefetch_lines = nc * 16 >= DV;
  if (nc < 2 * nb) {
    for (int64_t j = 0; j < nr; ++j) {
      const int32_t r = rows[j];
      float* row = C + static_cast<int64_t>(r) * DV;
      if (prefetch && j + kPrefetchRows < nr) {
        const float* ahead = C + static_cast<int64_t>(rows[j + kPrefetchRows]) * DV;
        if (prefetch_lines) {
          for (int64_t q = 0; q < DV; q += 16) _mm_prefetch(reinterpret_cast<const char*>(ahead + q), _MM_HINT_T0);
        } else {
          for (int64_t q = 0; q < nc; ++q) _mm_prefetch(reinterpret_cast<const char*>(ahead + cols[q]), _MM_HINT_T0);
        }
      }
      const float kr = k[r];
      for (int64_t q = 0; q < nc; ++q) {
        const int32_t c = cols[q];
        const float kv = kr * v[c];
        const float t = i * kv;
        row[c] = row[c] + t;
      }
    }
    return;
  }
  const int64_t full = DV / 8 * 8;
  for (int64_t j = 0; j < nr; ++j) {
    const int32_t r = rows[j];
    float* row = C + static_cast<int64_t>(r) * DV;
    if (prefetch && j + kPrefetchRows < nr) {
      const float* ahead = C + static_cast<int64_t>(rows[j + kPrefetchRows]) * DV;
      // (Blocks are taken at >= 2 nz per touched block, so most lines are touched: prefetch them all.)
      for (int64_t q = 0; q < DV; q += 16) _mm_prefetch(reinterpret_cast<const char*>(ahead + q), _MM_HINT_T0);
    }
    const float kr = k[r];
    const __m256 vk = _mm256_set1_ps(kr);
    for (int64_t b = 0; b < nb; ++b) {
      const int32_t c = blocks[b];
      const __m256 vv = _mm256_loadu_ps(v + c);
      const __m256 m = _mm256_cmp_ps(vv, zero, _CMP_NEQ_UQ);
      const __m256 cr = _mm256_loadu_ps(row + c);
      const __m256 t = _mm256_mul_ps(vi, _mm256_mul_ps(vk, vv));
      _mm256_storeu_ps(row + c, _mm256_blendv_ps(cr, _mm256_add_ps(cr, t), m));
    }
    if (tail_nz != 0) {
      for (int64_t c = full; c < DV; ++c) {
        if (v[c] != 0.0f) {
          const float kv = kr * v[c];
          const float t = i * kv;
          row[c] = row[c] + t;
        }
      }
    }
  }
}
#endif

// f' == 1 for one (b, h) on the portable path: gathered nz columns when v is sparse, a
// vectorizable masked row otherwise.
void keep_head_scalar(float* C, float* n, const float* k, const float* v, float i, int64_t DV, const int32_t* rows,
                      int64_t nr, const int32_t* cols, int64_t nc) {
  for (int64_t j = 0; j < nr; ++j) {
    const int32_t r = rows[j];
    const float t = i * k[r];
    n[r] = n[r] + t;
  }
  if (nc == 0) return;
  const bool masked_rows = nc * 4 >= DV;
  for (int64_t j = 0; j < nr; ++j) {
    const int32_t r = rows[j];
    float* row = C + static_cast<int64_t>(r) * DV;
    if (masked_rows) row_masked_scalar(row, v, DV, i, k[r]);
    else row_sparse_scalar(row, v, cols, nc, i, k[r]);
  }
}

// f' != 1 for one (b, h): one fused pass over all of C and n.
void decay_head(float* C, float* n, const float* k, const float* v, float i, float f, int64_t DK, int64_t DV,
                bool avx2) {
  const bool fill = (f == 0.0f);
  for (int64_t r = 0; r < DK; ++r) {
    const float t = i * k[r];
    const float d = fill ? 0.0f : f * n[r];
    n[r] = d + t;
  }
  for (int64_t r = 0; r < DK; ++r) {
    float* row = C + r * DV;
    const float kr = k[r];
#if TERNKIT_X86 && defined(__GNUC__)
    if (avx2) {
      if (fill) row_fused_avx2<true>(row, v, DV, i, f, kr);
      else row_fused_avx2<false>(row, v, DV, i, f, kr);
      continue;
    }
#endif
    if (fill) row_fused_scalar<true>(row, v, DV, i, f, kr);
    else row_fused_scalar<false>(row, v, DV, i, f, kr);
  }
  (void)avx2;
}

void check_args(const at::Tensor& C, const at::Tensor& n, const at::Tensor& k, const at::Tensor& v,
                const at::Tensor& i_scale, const at::Tensor& f_scale) {
  TORCH_CHECK(C.dim() == 4, "stc_write: C must be (B, NH, DK, DV), got ", C.sizes());
  const auto B = C.size(0), NH = C.size(1), DK = C.size(2), DV = C.size(3);
  TORCH_CHECK(n.sizes() == at::IntArrayRef({B, NH, DK}), "stc_write: n must be (B, NH, DK), got ", n.sizes());
  TORCH_CHECK(k.sizes() == at::IntArrayRef({B, NH, DK}), "stc_write: k must be (B, NH, DK), got ", k.sizes());
  TORCH_CHECK(v.sizes() == at::IntArrayRef({B, NH, DV}), "stc_write: v must be (B, NH, DV), got ", v.sizes());
  TORCH_CHECK(i_scale.sizes() == at::IntArrayRef({B, NH}), "stc_write: i_scale must be (B, NH), got ",
              i_scale.sizes());
  TORCH_CHECK(f_scale.sizes() == at::IntArrayRef({B, NH}), "stc_write: f_scale must be (B, NH), got ",
              f_scale.sizes());
  TORCH_CHECK(DK < (int64_t(1) << 31) && DV < (int64_t(1) << 31), "stc_write: DK and DV must fit in int32");
  for (const at::Tensor* t : {&C, &n, &k, &v, &i_scale, &f_scale}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat, "stc_write: all tensors must be float32");
    TORCH_CHECK(t->is_contiguous(), "stc_write: all tensors must be contiguous");
    TORCH_CHECK(t->device() == C.device(), "stc_write: all tensors must be on one device");
  }
}

// Per-call scratch, kept per calling thread so that a warm call allocates nothing on the heap:
// per (b, h) DK row indices then DV column indices (or, on the AVX2 path, v's block starts), and
// the plan {nr, nc, nb, tail_nz}.
struct Scratch {
  std::vector<int32_t> idx;
  std::vector<int64_t> plan;
};

// Below this much work (f' == 1: updated entries, an AVX2 block counting as two; f' != 1: DK * DV)
// in one call the heads run on the calling thread. Measured on a 2-vCPU VM under
// OMP_WAIT_POLICY=PASSIVE: waking the pool's halted vCPU costs tens of microseconds, so a second
// thread did not pay off even at B=8, NH=4, DH=512, 10% density (~80k entries, ~190 us).
constexpr int64_t kParallelWork = int64_t(1) << 18;
constexpr int64_t kPrefetchBytes = int64_t(1) << 20;

at::Tensor stc_write_cpu(at::Tensor C, at::Tensor n, const at::Tensor& k, const at::Tensor& v,
                         const at::Tensor& i_scale, const at::Tensor& f_scale) {
  check_args(C, n, k, v, i_scale, f_scale);
  const int64_t BH = C.size(0) * C.size(1), DK = C.size(2), DV = C.size(3);
  float* Cp = C.data_ptr<float>();
  float* np = n.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const float* ip = i_scale.data_ptr<float>();
  const float* fp = f_scale.data_ptr<float>();
  const bool avx2 = use_avx2();

  thread_local Scratch scratch;
  const int64_t stride = DK + DV + DV / 8 + 1;
  if (static_cast<int64_t>(scratch.idx.size()) < BH * stride) scratch.idx.resize(static_cast<size_t>(BH * stride));
  if (static_cast<int64_t>(scratch.plan.size()) < BH * 4) scratch.plan.resize(static_cast<size_t>(BH * 4));
  int32_t* idx = scratch.idx.data();
  int64_t* plan = scratch.plan.data();

  // Gather the nz rows and columns (blocks) of every head first: cheap, and it gives the exact
  // work, which decides whether threads pay off.
  int64_t work = 0, written = 0, decayed = 0;
  for (int64_t bh = 0; bh < BH; ++bh) {
    int32_t* rows = idx + bh * stride;
    int64_t* p = plan + bh * 4;
    int64_t nr = 0, nc = 0, nb = 0, tail_nz = 0;
#if TERNKIT_X86 && defined(__GNUC__)
    if (avx2) {
      nr = gather_nz_avx2(kp + bh * DK, DK, rows);
      nb = v_cols_blocks_avx2(vp + bh * DV, DV, rows + DK, rows + DK + DV, &nc, &tail_nz);
    } else
#endif
    {
      nr = gather_nz(kp + bh * DK, DK, rows);
      nc = gather_nz(vp + bh * DV, DV, rows + DK);
    }
    p[0] = nr, p[1] = nc, p[2] = nb, p[3] = tail_nz;
    written += nr * nc;
    if (fp[bh] != 1.0f) {
      decayed += DK * DV;
      work += DK * DV;
    } else {
      // (AVX2: a block counts as two entries, like the path choice in keep_head_avx2.)
      work += nr * (avx2 ? (nc < 2 * nb ? nc : 2 * nb + tail_nz) : nc);
    }
  }

  // The rows of a large C come from L3 or DRAM at unpredictable addresses: prefetch them. A C that
  // fits in L2 is left alone (the prefetches then only cost issue slots).
  const bool prefetch = BH * DK * DV * int64_t(sizeof(float)) > kPrefetchBytes;
  auto run = [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      float* Ch = Cp + bh * DK * DV;
      float* nh = np + bh * DK;
      const float* kh = kp + bh * DK;
      const float* vh = vp + bh * DV;
      const int32_t* rows = idx + bh * stride;
      const int64_t* p = plan + bh * 4;
      if (fp[bh] != 1.0f) {
        decay_head(Ch, nh, kh, vh, ip[bh], fp[bh], DK, DV, avx2);
        continue;
      }
#if TERNKIT_X86 && defined(__GNUC__)
      if (avx2) {
        keep_head_avx2(Ch, nh, kh, vh, ip[bh], DV, rows, p[0], rows + DK, p[1], rows + DK + DV, p[2], p[3],
                       prefetch);
        continue;
      }
#endif
      keep_head_scalar(Ch, nh, kh, vh, ip[bh], DV, rows, p[0], rows + DK, p[1]);
    }
  };
  if (work < kParallelWork || BH <= 1) run(0, BH);
  else at::parallel_for(0, BH, 1, run);

  at::Tensor counts = at::detail::empty_cpu({2}, at::kLong, std::nullopt, std::nullopt, std::nullopt, std::nullopt);
  counts.data_ptr<int64_t>()[0] = written;
  counts.data_ptr<int64_t>()[1] = decayed;
  return counts;
}

#ifdef TERNKIT_WITH_CUDA
at::Tensor stc_write_cuda(at::Tensor C, at::Tensor n, const at::Tensor& k, const at::Tensor& v,
                          const at::Tensor& i_scale, const at::Tensor& f_scale) {
  check_args(C, n, k, v, i_scale, f_scale);
  const c10::cuda::CUDAGuard guard(C.device());
  const int64_t BH = C.size(0) * C.size(1), DK = C.size(2), DV = C.size(3);
  at::Tensor counts = at::zeros({2}, C.options().dtype(at::kLong));
  if (BH == 0) return counts;
  const cudaError_t err = ternkit_stc_write_cuda(
      C.data_ptr<float>(), n.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), i_scale.data_ptr<float>(),
      f_scale.data_ptr<float>(), BH, DK, DV, counts.data_ptr<int64_t>(), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "stc_write: CUDA launch failed: ", cudaGetErrorString(err));
  return counts;
}
#endif

}  // namespace

TORCH_LIBRARY_FRAGMENT(ternkit, m) {
  m.def(
      "stc_write(Tensor(a!) C, Tensor(b!) n, Tensor k, Tensor v, Tensor i_scale, Tensor f_scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(ternkit, CPU, m) { m.impl("stc_write", &stc_write_cpu); }

#ifdef TERNKIT_WITH_CUDA
TORCH_LIBRARY_IMPL(ternkit, CUDA, m) { m.impl("stc_write", &stc_write_cuda); }
#endif
