// ternkit::stc_write: the in-place STC (sparse ternary covariance) memory write of the mLSTM,
//   C = f' C + i' k v^T,  n = f' n + i' k   per (batch, head),
// where k and v are STC-quantized (alpha * {-1, 0, +1}, mostly exact zeros).
//
// f' == 1: only the nnz(k) x nnz(v) entries C[r, c] = C[r, c] + i' * (k_r * v_c) are written;
//          everything else keeps its bits. Rows whose v is dense enough are updated as a
//          contiguous AVX2 row with a blend that keeps the v_c == 0 columns untouched.
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

// Row update over the 8-column blocks of v that hold a non-zero (blocks[0:nb] are their first
// columns, all < DV rounded down to 8): a blend stores the old bits back into the v_c == 0 lanes
// (same value, so bit-exact), which needs no data-dependent branch. Columns past the last full
// block (tail[0:nt]) are the scalar remainder.
__attribute__((target("avx2"))) void row_blocks_avx2(float* row, const float* v, const int32_t* blocks, int64_t nb,
                                                     const int32_t* tail, int64_t nt, float i, float kr) {
  const __m256 vi = _mm256_set1_ps(i), vk = _mm256_set1_ps(kr), zero = _mm256_setzero_ps();
  for (int64_t j = 0; j < nb; ++j) {
    const int32_t c = blocks[j];
    const __m256 vv = _mm256_loadu_ps(v + c);
    // NEQ_UQ: nan counts as non-zero, like `v != 0` in torch.
    const __m256 m = _mm256_cmp_ps(vv, zero, _CMP_NEQ_UQ);
    const __m256 cr = _mm256_loadu_ps(row + c);
    const __m256 t = _mm256_mul_ps(vi, _mm256_mul_ps(vk, vv));
    _mm256_storeu_ps(row + c, _mm256_blendv_ps(cr, _mm256_add_ps(cr, t), m));
  }
  row_sparse_scalar(row, v, tail, nt, i, kr);
}

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

// One (batch, head). rows/cols are scratch of DK/DV entries. Returns nnz(k) * nnz(v).
int64_t write_one(float* C, float* n, const float* k, const float* v, float i, float f, int64_t DK, int64_t DV,
                  int32_t* rows, int32_t* cols, bool avx2) {
  const int64_t nr = gather_nz(k, DK, rows);
  const int64_t nc = gather_nz(v, DV, cols);
  if (f == 1.0f) {
    for (int64_t j = 0; j < nr; ++j) {
      const int32_t r = rows[j];
      const float t = i * k[r];
      n[r] = n[r] + t;
    }
    if (nc == 0) return 0;
#if TERNKIT_X86 && defined(__GNUC__)
    if (avx2) {
      if (nc == DV) {
        for (int64_t j = 0; j < nr; ++j) row_add_avx2(C + static_cast<int64_t>(rows[j]) * DV, v, DV, i, k[rows[j]]);
        return nr * nc;
      }
      // The 8-column blocks of v holding a non-zero, and the non-zero columns past the last full block.
      // blocks and tail reuse cols: block j < DV/8 <= j-th nz col position, so writing blocks in
      // place never overtakes the cols still to be read.
      int32_t* blocks = cols;
      int64_t nb = 0, first_tail = nc;
      const int64_t full = DV / 8 * 8;
      for (int64_t j = 0; j < nc; ++j) {
        const int32_t c = cols[j];
        if (c >= full) { first_tail = j; break; }
        const int32_t b = c & ~7;
        if (nb == 0 || blocks[nb - 1] != b) blocks[nb++] = b;
      }
      const int32_t* tail = cols + first_tail;
      const int64_t nt = nc - first_tail;
      for (int64_t j = 0; j < nr; ++j) {
        const int32_t r = rows[j];
        row_blocks_avx2(C + static_cast<int64_t>(r) * DV, v, blocks, nb, tail, nt, i, k[r]);
      }
      return nr * nc;
    }
#endif
    (void)avx2;
    // Portable path: gather the nz columns when v is sparse, a vectorizable masked row otherwise.
    const bool masked_rows = nc * 4 >= DV;
    for (int64_t j = 0; j < nr; ++j) {
      const int32_t r = rows[j];
      float* row = C + static_cast<int64_t>(r) * DV;
      if (masked_rows) row_masked_scalar(row, v, DV, i, k[r]);
      else row_sparse_scalar(row, v, cols, nc, i, k[r]);
    }
    return nr * nc;
  }
  // f' != 1: one fused pass over all of C and n.
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
  return nr * nc;
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

  // Work estimate without gathering: a decayed head costs DK*DV, a kept head at most its nz outer
  // product (bounded cheaply by counting nz of k only: DK_nz * DV). Threads only pay off beyond
  // roughly 64k touched floats in total (a fork/join costs a few microseconds).
  int64_t work = 0;
  for (int64_t bh = 0; bh < BH; ++bh) {
    if (fp[bh] != 1.0f) {
      work += DK * DV;
    } else {
      int64_t nr = 0;
      for (int64_t r = 0; r < DK; ++r) nr += (kp[bh * DK + r] != 0.0f) ? 1 : 0;
      work += nr * DV;
    }
  }
  const int64_t grain = (work < (int64_t(1) << 16) || BH <= 1) ? BH : 1;

  std::vector<int64_t> written(static_cast<size_t>(BH), 0);
  at::parallel_for(0, BH, grain, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> scratch(static_cast<size_t>(DK + DV));
    for (int64_t bh = begin; bh < end; ++bh) {
      written[bh] = write_one(Cp + bh * DK * DV, np + bh * DK, kp + bh * DK, vp + bh * DV, ip[bh], fp[bh], DK, DV,
                              scratch.data(), scratch.data() + DK, avx2);
    }
  });

  int64_t w = 0, d = 0;
  for (int64_t bh = 0; bh < BH; ++bh) {
    w += written[bh];
    d += (fp[bh] != 1.0f) ? DK * DV : 0;
  }
  at::Tensor counts = at::empty({2}, C.options().dtype(at::kLong));
  counts.data_ptr<int64_t>()[0] = w;
  counts.data_ptr<int64_t>()[1] = d;
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
