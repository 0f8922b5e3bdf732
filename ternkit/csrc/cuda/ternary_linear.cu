// CUDA kernels of ternkit::ternary_linear; launchers take raw pointers (no torch headers), so
// `nvcc -c ternkit/csrc/cuda/ternary_linear.cu` compiles anywhere. The float formula is the one of
// ternkit/csrc/ternary_linear.cpp (and the twin ternkit/ops/ternary_linear.py):
//   act_bits 8: s_x = 127 * (1 / max(amax, 1e-5)); q = clamp(rint(x * s_x), -128, 127);
//               y = (sum_g float(acc_g) * scale_g) / s_x, groups in order, products rounded (no FMA);
//   act_bits 0: y = sum_g (sum_{k in g} x * T) * scale_g.
// Explicit __fmul_rn / __fadd_rn / __fdiv_rn keep nvcc from contracting the epilogue into FMAs.

#include <cuda_runtime.h>
#include <cstdint>

namespace {

constexpr int kWarp = 32;
constexpr int kRowsPerBlock = 8;  // one warp per output row

// One block per token: absmax over K, the int8 codes and the scale s_x.
__global__ void quantize_kernel(const float* __restrict__ x, int64_t K, int8_t* __restrict__ q,
                                float* __restrict__ sx) {
  __shared__ float red[256];
  const int64_t m = blockIdx.x;
  const float* xm = x + m * K;
  float amax = 0.f;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) amax = fmaxf(amax, fabsf(xm[k]));
  red[threadIdx.x] = amax;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) red[threadIdx.x] = fmaxf(red[threadIdx.x], red[threadIdx.x + s]);
    __syncthreads();
  }
  const float s = __fmul_rn(__fdiv_rn(1.0f, fmaxf(red[0], 1e-5f)), 127.0f);
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    const float r = rintf(__fmul_rn(xm[k], s));  // round half to even
    q[m * K + k] = static_cast<int8_t>(fminf(127.f, fmaxf(-128.f, r)));
  }
  if (threadIdx.x == 0) sx[m] = s;
}

__device__ __forceinline__ int trit_at(const uint8_t* __restrict__ wrow, int64_t k) {
  // byte (k % 32) of block k / 128 holds trit k in bits 2 * ((k / 32) % 4)
  const uint8_t v = wrow[(k >> 7) * 32 + (k & 31)];
  return static_cast<int>((v >> (2 * ((k >> 5) & 3))) & 3) - 1;
}

// One warp per (row n); the warp walks every token and group. Lanes stride over a group's columns.
__global__ void linear_kernel(const float* __restrict__ x, const int8_t* __restrict__ q,
                              const float* __restrict__ sx, const uint8_t* __restrict__ w,
                              const float* __restrict__ scale, int64_t scale_row_stride, float* __restrict__ y,
                              int64_t M, int64_t N, int64_t K, int64_t G, int64_t gs, int act_bits) {
  const int lane = threadIdx.x;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.y;
  if (n >= N) return;
  const int64_t row_bytes = ((K + 127) / 128) * 32;
  const uint8_t* wrow = w + n * row_bytes;
  const float* sc = scale + n * scale_row_stride;
  for (int64_t m = 0; m < M; ++m) {
    float out = 0.f;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t k0 = g * gs;
      const int64_t k1 = (k0 + gs < K) ? k0 + gs : K;
      float part;
      if (act_bits == 8) {
        int acc = 0;
        for (int64_t k = k0 + lane; k < k1; k += kWarp) acc += trit_at(wrow, k) * static_cast<int>(q[m * K + k]);
        for (int off = kWarp / 2; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
        part = __fmul_rn(__int2float_rn(acc), sc[g]);
      } else {
        float acc = 0.f;
        for (int64_t k = k0 + lane; k < k1; k += kWarp) {
          const int t = trit_at(wrow, k);
          const float xv = x[m * K + k];
          acc += t > 0 ? xv : (t < 0 ? -xv : 0.f);
        }
        for (int off = kWarp / 2; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
        part = __fmul_rn(acc, sc[g]);
      }
      out = g == 0 ? part : __fadd_rn(out, part);
    }
    if (lane == 0) y[m * N + n] = act_bits == 8 ? __fdiv_rn(out, sx[m]) : out;
  }
}

}  // namespace

// x (M, K) float32, w (N, ceil(K/128)*32) uint8, scale: element (n, g) at scale[n * scale_row_stride + g]
// (stride 0: per tensor), y (M, N) float32; qbuf (M*K int8) and sx (M floats) are scratch for act_bits 8.
// gs: columns per group (K for per-tensor/per-row, G = 1). Returns the cudaError_t as int (0 = success).
int ternary_linear_cuda_launch(const float* x, const uint8_t* w, const float* scale, int64_t scale_row_stride,
                               float* y, int8_t* qbuf, float* sx, int64_t M, int64_t N, int64_t K, int64_t G,
                               int64_t gs, int64_t act_bits, cudaStream_t stream) {
  if (M == 0 || N == 0) return 0;
  if (act_bits == 8) {
    quantize_kernel<<<static_cast<unsigned>(M), 256, 0, stream>>>(x, K, qbuf, sx);
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return static_cast<int>(e);
  }
  const dim3 block(kWarp, kRowsPerBlock);
  const dim3 grid(static_cast<unsigned>((N + kRowsPerBlock - 1) / kRowsPerBlock));
  linear_kernel<<<grid, block, 0, stream>>>(x, qbuf, sx, w, scale, scale_row_stride, y, M, N, K, G, gs,
                                            static_cast<int>(act_bits));
  return static_cast<int>(cudaGetLastError());
}
