// CUDA kernel of ternkit::stc_write (see ../stc_write.cpp for the contract):
//   C = f' C + i' k v^T,  n = f' n + i' k   per (batch, head), in place.
// f' == 1: each block gathers the non-zero indices of k and v (ordered, so every block agrees on
//          the pair numbering) into shared memory and the blocks of one (b, h) split the
//          nnz(k) x nnz(v) pairs: only those entries of C are read and written.
// f' != 1: a grid-stride fused pass f' * C + i' * (k_r * v_c) (f' == 0: +0 + ...).
// __fmul_rn/__fadd_rn keep nvcc from contracting into FMAs, so the numbers match the CPU op and the
// pure-torch twin bit for bit. Torch-free on purpose: `nvcc -c` checks this file on any machine.

#include <cuda_runtime.h>
#include <cstdint>

namespace {

constexpr int kThreads = 256;  // a multiple of 32 (the compaction works warp by warp)

// Writes the indices j < D with x[j] != 0 (nan included) to out in increasing order; returns the
// count. Every thread of the block must call it. warp_cnt: shared scratch of 32 ints.
__device__ int64_t compact_nz(const float* __restrict__ x, int64_t D, int* out, int* warp_cnt) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  int64_t base = 0;
  for (int64_t start = 0; start < D; start += blockDim.x) {
    const int64_t j = start + threadIdx.x;
    const bool nz = j < D && x[j] != 0.0f;
    const unsigned mask = __ballot_sync(0xffffffffu, nz);
    if (lane == 0) warp_cnt[warp] = __popc(mask);
    __syncthreads();
    int before = 0, total = 0;
    for (int w = 0; w < nwarps; ++w) {
      const int cnt = warp_cnt[w];
      before += (w < warp) ? cnt : 0;
      total += cnt;
    }
    if (nz) out[base + before + __popc(mask & ((1u << lane) - 1u))] = static_cast<int>(j);
    base += total;
    __syncthreads();  // warp_cnt is reused by the next chunk
  }
  return base;
}

__global__ void __launch_bounds__(kThreads)
stc_write_kernel(float* __restrict__ C, float* __restrict__ n, const float* __restrict__ k,
                 const float* __restrict__ v, const float* __restrict__ i_scale, const float* __restrict__ f_scale,
                 int64_t DK, int64_t DV, unsigned long long* counts) {
  extern __shared__ int smem[];  // rows[DK] then cols[DV]
  __shared__ int warp_cnt[32];
  const int64_t bh = blockIdx.x;
  C += bh * DK * DV;
  n += bh * DK;
  k += bh * DK;
  v += bh * DV;
  const float i = i_scale[bh], f = f_scale[bh];
  const int64_t tid = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.y) * blockDim.x;
  int* rows = smem;
  int* cols = smem + DK;
  int64_t nr = 0, nc = 0;

  if (f != 1.0f) {
    const bool fill = (f == 0.0f);
    const int64_t total = DK * DV;
    for (int64_t idx = tid; idx < total; idx += stride) {
      const int64_t r = idx / DV;
      const float t = __fmul_rn(i, __fmul_rn(k[r], v[idx - r * DV]));
      const float d = fill ? 0.0f : __fmul_rn(f, C[idx]);
      C[idx] = __fadd_rn(d, t);
    }
    if (blockIdx.y == 0) {
      for (int64_t r = threadIdx.x; r < DK; r += blockDim.x) {
        const float t = __fmul_rn(i, k[r]);
        const float d = fill ? 0.0f : __fmul_rn(f, n[r]);
        n[r] = __fadd_rn(d, t);
      }
      // Only the counts are needed here.
      nr = compact_nz(k, DK, rows, warp_cnt);
      nc = compact_nz(v, DV, cols, warp_cnt);
    }
  } else {
    nr = compact_nz(k, DK, rows, warp_cnt);
    nc = compact_nz(v, DV, cols, warp_cnt);
    if (blockIdx.y == 0) {
      for (int64_t j = threadIdx.x; j < nr; j += blockDim.x) {
        const int r = rows[j];
        n[r] = __fadd_rn(n[r], __fmul_rn(i, k[r]));
      }
    }
    const int64_t pairs = nr * nc;
    for (int64_t p = tid; p < pairs; p += stride) {
      const int64_t jr = p / nc;
      const int r = rows[jr];
      const int c = cols[p - jr * nc];
      const int64_t idx = static_cast<int64_t>(r) * DV + c;
      C[idx] = __fadd_rn(C[idx], __fmul_rn(i, __fmul_rn(k[r], v[c])));
    }
  }
  if (blockIdx.y == 0 && threadIdx.x == 0) {
    atomicAdd(&counts[0], static_cast<unsigned long long>(nr * nc));
    if (f != 1.0f) atomicAdd(&counts[1], static_cast<unsigned long long>(DK * DV));
  }
}

}  // namespace

// Launches the write for BH = B * NH heads on `stream`. All pointers are device pointers to
// contiguous float32 data (C: BH*DK*DV, n and k: BH*DK, v: BH*DV, i_scale and f_scale: BH);
// counts: 2 int64 on the device, zeroed by the caller, receive [written, decayed].
cudaError_t ternkit_stc_write_cuda(float* C, float* n, const float* k, const float* v, const float* i_scale,
                                   const float* f_scale, int64_t BH, int64_t DK, int64_t DV, int64_t* counts,
                                   cudaStream_t stream) {
  if (BH <= 0) return cudaSuccess;
  if (BH > 2147483647LL || DK < 0 || DV < 0 || DK > 2147483647LL || DV > 2147483647LL) return cudaErrorInvalidValue;
  int device = 0, sms = 1;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;

  const size_t smem = static_cast<size_t>(DK + DV) * sizeof(int);
  if (smem > 48 * 1024) {
    err = cudaFuncSetAttribute(stc_write_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  // Enough blocks per head to fill the GPU about 4 times over, but at least 4 elements per thread
  // (each extra block re-gathers the nz indices of k and v, DK + DV loads).
  const int64_t per_head = (DK * DV + 4LL * kThreads - 1) / (4LL * kThreads);
  int64_t chunks = (4LL * sms + BH - 1) / BH;
  if (chunks > per_head) chunks = per_head;
  if (chunks < 1) chunks = 1;
  if (chunks > 65535) chunks = 65535;
  const dim3 grid(static_cast<unsigned>(BH), static_cast<unsigned>(chunks));
  stc_write_kernel<<<grid, kThreads, smem, stream>>>(C, n, k, v, i_scale, f_scale, DK, DV,
                                                      reinterpret_cast<unsigned long long*>(counts));
  return cudaGetLastError();
}
