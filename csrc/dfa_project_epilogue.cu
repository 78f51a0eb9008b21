// dfa_project's epilogue on the CUDA backend: out[:, site] *= g'(state) for all sites in ONE launch.
//
// Math (Nøkland 2016): the projection P = e F_all^T is a cuBLAS GEMM issued by the binding on the
// caller's stream (cuBLAS reaches peak GEMM throughput; a hand GEMM would not); this kernel then turns
// every claimed site's block into delta_s = P[:, block_s] * g_s'(a_s) in place, reading the producer's
// saved state (1-byte ReLU mask, h for tanh/sigmoid, a for GELU). PyTorch equivalent:
// triton_kernels/dfa_project.py::dfa_project_reference.
//
// Grid: x over 256-element chunks of the widest site's N*rows block, y over sites; a block beyond its
// site's size returns at once (the per-site imbalance costs one empty block per short site and chunk).
#include "activations.cuh"
#include "kernels.h"

namespace fastdfa {

template <typename T>
__global__ void dfa_project_epilogue_kernel(T* __restrict__ out,              // [n, ld]
                                            int64_t ld, int64_t n,
                                            const EpilogueSite* __restrict__ sites) {  // [n_sites]
  const EpilogueSite site = sites[blockIdx.y];
  if (site.activation == kNone || site.state == 0) return;
  const int64_t size = n * site.rows;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < size; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t row = i / site.rows, col = i % site.rows;
    float s;
    if (site.activation == kRelu) {
      s = (float)reinterpret_cast<const uint8_t*>(site.state)[row * site.state_stride + col];
    } else {
      s = to_float<T>(reinterpret_cast<const T*>(site.state)[row * site.state_stride + col]);
    }
    T* p = out + row * ld + site.offset + col;
    *p = from_float<T>(to_float<T>(*p) * derivative_of_state(s, (int)site.activation));
  }
}

cudaError_t launch_dfa_project_epilogue(int dtype, void* out, int64_t ld, int64_t n, const EpilogueSite* sites,
                                        int n_sites, int64_t max_rows, cudaStream_t stream) {
  if (n_sites == 0 || n == 0) return cudaSuccess;
  const int threads = 256;
  // Enough chunks to cover the widest site, capped: the grid-stride loop does the rest.
  const int64_t chunks = (n * max_rows + threads - 1) / threads;
  const dim3 grid((unsigned)(chunks < 4096 ? (chunks > 0 ? chunks : 1) : 4096), (unsigned)n_sites);
  switch (dtype) {
    case kFloat32: dfa_project_epilogue_kernel<float><<<grid, threads, 0, stream>>>((float*)out, ld, n, sites); break;
    case kFloat16: dfa_project_epilogue_kernel<__half><<<grid, threads, 0, stream>>>((__half*)out, ld, n, sites); break;
    case kBFloat16:
      dfa_project_epilogue_kernel<__nv_bfloat16><<<grid, threads, 0, stream>>>((__nv_bfloat16*)out, ld, n, sites);
      break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace fastdfa
