// The dual-number activation epilogue on the CUDA backend: primal and tangents in one pass.
//
// Math: with a = x W^T + b and tangent pre-activations u_t = dx_t W^T (the binding issues one cuBLAS
// GEMM over the stacked [x; dx_1; ...] rows, so W is read once), h = g(a) and dh_t = g'(a) * u_t,
// plus the state the DFA backward needs (uint8 mask for ReLU, a for GELU; tanh/sigmoid reuse h).
// PyTorch equivalent: triton_kernels/jvp_linear.py::jvp_linear_reference.
#include "activations.cuh"
#include "kernels.h"

namespace fastdfa {

template <typename T>
__global__ void dual_activation_kernel(const T* __restrict__ a,      // [numel]
                                       const T* __restrict__ u,      // [n_tangents, numel]
                                       int64_t numel, int n_tangents, int act,
                                       T* __restrict__ h,            // [numel]
                                       T* __restrict__ dh,           // [n_tangents, numel]
                                       void* __restrict__ state) {   // [numel] mask (relu) / a (gelu)
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < numel; i += (int64_t)gridDim.x * blockDim.x) {
    const float av = to_float<T>(a[i]);
    h[i] = from_float<T>(activate(av, act));
    if (act == kRelu && state != nullptr) reinterpret_cast<uint8_t*>(state)[i] = av > 0.f ? 1 : 0;
    if (act == kGelu && state != nullptr) reinterpret_cast<T*>(state)[i] = a[i];
    const float d = derivative_of_pre(av, act);
    for (int t = 0; t < n_tangents; ++t) {
      dh[t * numel + i] = from_float<T>(d * to_float<T>(u[t * numel + i]));
    }
  }
}

cudaError_t launch_dual_activation(int dtype, int activation, const void* a, const void* u, int64_t numel,
                                   int n_tangents, void* h, void* dh, void* state, cudaStream_t stream) {
  if (numel == 0) return cudaSuccess;
  const int threads = 256;
  const int64_t blocks64 = (numel + threads - 1) / threads;
  const unsigned blocks = (unsigned)(blocks64 < 65535 ? blocks64 : 65535);  // grid-stride beyond
  switch (dtype) {
    case kFloat32:
      dual_activation_kernel<float><<<blocks, threads, 0, stream>>>((const float*)a, (const float*)u, numel,
                                                                    n_tangents, activation, (float*)h, (float*)dh,
                                                                    state);
      break;
    case kFloat16:
      dual_activation_kernel<__half><<<blocks, threads, 0, stream>>>((const __half*)a, (const __half*)u, numel,
                                                                     n_tangents, activation, (__half*)h,
                                                                     (__half*)dh, state);
      break;
    case kBFloat16:
      dual_activation_kernel<__nv_bfloat16><<<blocks, threads, 0, stream>>>(
          (const __nv_bfloat16*)a, (const __nv_bfloat16*)u, numel, n_tangents, activation, (__nv_bfloat16*)h,
          (__nv_bfloat16*)dh, state);
      break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace fastdfa
