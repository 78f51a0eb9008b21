// Activation functions, their derivatives and the saved-state rule shared by the fastdfa CUDA kernels.
// No torch headers: every .cu here compiles standalone in about a second (docs/design.md section 5).
//
// Codes match triton_kernels/_common.py:
//   0 none     g(a) = a                       state: nothing           g' = 1
//   1 relu     g(a) = max(a, 0)               state: uint8 mask a > 0  g' = mask
//   2 tanh     g(a) = tanh(a)                 state: h                 g' = 1 - h^2
//   3 sigmoid  g(a) = 1 / (1 + e^-a)          state: h                 g' = h (1 - h)
//   4 gelu     g(a) = a Phi(a)  (erf form)    state: a                 g' = Phi(a) + a phi(a)
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

#include "kernels.h"  // the Activation and DType codes

namespace fastdfa {

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ float activate(float a, int act) {
  switch (act) {
    case kRelu: return a > 0.f ? a : 0.f;
    case kTanh: return tanhf(a);
    case kSigmoid: return 1.f / (1.f + __expf(-a));
    case kGelu: return 0.5f * a * (1.f + erff(a * 0.70710678118654752f));
    default: return a;
  }
}

// g'(a) from the pre-activation itself (the dual-number epilogue has a at hand).
__device__ __forceinline__ float derivative_of_pre(float a, int act) {
  switch (act) {
    case kRelu: return a > 0.f ? 1.f : 0.f;
    case kTanh: { float t = tanhf(a); return 1.f - t * t; }
    case kSigmoid: { float s = 1.f / (1.f + __expf(-a)); return s * (1.f - s); }
    case kGelu: return 0.5f * (1.f + erff(a * 0.70710678118654752f)) + a * __expf(-0.5f * a * a) * 0.39894228040143268f;
    default: return 1.f;
  }
}

// g'(a) from the saved state s (the mask as 0/1, h for tanh/sigmoid, a for gelu).
__device__ __forceinline__ float derivative_of_state(float s, int act) {
  switch (act) {
    case kRelu: return s;
    case kTanh: return 1.f - s * s;
    case kSigmoid: return s * (1.f - s);
    case kGelu: return 0.5f * (1.f + erff(s * 0.70710678118654752f)) + s * __expf(-0.5f * s * s) * 0.39894228040143268f;
    default: return 1.f;
  }
}

}  // namespace fastdfa
