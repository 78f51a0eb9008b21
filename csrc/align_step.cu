// GrAPE's alignment step on the CUDA backend: column cosines, the gradient step and the column
// normalisation in ONE kernel, one thread block per (site, column).
//
// Math (triton_kernels/align_step.py has the derivation): with J = P^T T / batch (a cuBLAS GEMM issued
// by the binding, written to a [R, k] fp32 buffer -- unlike the Triton kernel, which keeps J in
// registers), per column j of site s:
//   c = <B_j, J_j> / (|B_j| |J_j|),  B_j <- alpha B_j + beta J_j,  alpha = (1 - (lr/k) c) / |B_j|,
//   beta = (lr/k) / |J_j|  (the step on the unit direction B_j / |B_j|), then rescaled to the column's
//   norm before the step, so feedback_scale survives (the norm from the three sums, no 2nd pass)
// A column with J_j = 0 is left as it is. PyTorch equivalent:
// python/fastdfa/ops/align_step.py::align_step_reference.
#include "activations.cuh"
#include "kernels.h"

namespace fastdfa {

constexpr int kAlignThreads = 256;

__device__ __forceinline__ float block_sum(float v, float* shared) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = threadIdx.x < (kAlignThreads / 32) ? shared[threadIdx.x] : 0.f;
  if (warp == 0)
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  if (threadIdx.x == 0) shared[0] = v;
  __syncthreads();
  v = shared[0];
  __syncthreads();  // shared is reused by the next sum
  return v;
}

template <typename T>
__global__ void align_step_kernel(T* __restrict__ feedback, int64_t ldf,       // B: [R, k]
                                  const float* __restrict__ j,                  // J_hat^T: [R, k]
                                  int64_t k, const int64_t* __restrict__ site_offsets,
                                  const int64_t* __restrict__ site_rows, float step,  // step = lr / k
                                  float* __restrict__ cosines) {                // [n_sites, k]
  __shared__ float shared[kAlignThreads / 32];
  const int s = blockIdx.y;
  const int64_t col = blockIdx.x, offset = site_offsets[s], rows = site_rows[s];
  float bj = 0.f, jj = 0.f, bb = 0.f;
  for (int64_t r = threadIdx.x; r < rows; r += blockDim.x) {
    const float b = to_float<T>(feedback[(offset + r) * ldf + col]);
    const float v = j[(offset + r) * k + col];
    bj += b * v;
    jj += v * v;
    bb += b * b;
  }
  bj = block_sum(bj, shared);
  jj = block_sum(jj, shared);
  bb = block_sum(bb, shared);
  const bool live = jj > 0.f && bb > 0.f;
  const float nb = sqrtf(bb), nj = sqrtf(jj);
  const float cos = live ? bj / (nb * nj) : 0.f;
  // the step on the unit direction B/|B| (scale-free), as alpha B + beta J; then back to |B_j|
  const float alpha = live ? (1.f - step * cos) / nb : 1.f;
  const float beta = live ? step / nj : 0.f;
  const float norm2 = alpha * alpha * bb + 2.f * alpha * beta * bj + beta * beta * jj;
  const float scale = norm2 > 0.f ? nb * rsqrtf(norm2) : 1.f;  // the column keeps its norm |B_j|
  for (int64_t r = threadIdx.x; r < rows; r += blockDim.x) {
    T* p = feedback + (offset + r) * ldf + col;
    *p = from_float<T>(scale * (alpha * to_float<T>(*p) + beta * j[(offset + r) * k + col]));
  }
  if (threadIdx.x == 0) cosines[s * k + col] = cos;
}

cudaError_t launch_align_step(int dtype, void* feedback, int64_t ldf, const float* j, int64_t k,
                              const int64_t* site_offsets, const int64_t* site_rows, int n_sites, float lr,
                              float* cosines, cudaStream_t stream) {
  if (n_sites == 0 || k == 0) return cudaSuccess;
  const dim3 grid((unsigned)k, (unsigned)n_sites);
  const float step = lr / (float)k;
  switch (dtype) {
    case kFloat32:
      align_step_kernel<float><<<grid, kAlignThreads, 0, stream>>>((float*)feedback, ldf, j, k, site_offsets,
                                                                   site_rows, step, cosines);
      break;
    case kFloat16:
      align_step_kernel<__half><<<grid, kAlignThreads, 0, stream>>>((__half*)feedback, ldf, j, k, site_offsets,
                                                                    site_rows, step, cosines);
      break;
    case kBFloat16:
      align_step_kernel<__nv_bfloat16><<<grid, kAlignThreads, 0, stream>>>(
          (__nv_bfloat16*)feedback, ldf, j, k, site_offsets, site_rows, step, cosines);
      break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace fastdfa
