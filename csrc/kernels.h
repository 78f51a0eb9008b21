// Host launchers of the fastdfa CUDA kernels: plain C++ (no torch types), so the .cu files compile
// standalone and only the one binding file (fastdfa_C.cpp) includes torch. Every launcher enqueues on
// the stream it is given: the binding passes the caller's current stream, so multi-stream scheduling
// does not silently serialise (docs/design.md section 4).
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace fastdfa {

// Activation codes (triton_kernels/_common.py uses the same numbers) and storage dtypes.
enum Activation : int { kNone = 0, kRelu = 1, kTanh = 2, kSigmoid = 3, kGelu = 4 };
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// One site of the projection epilogue, as an entry of a device array (see dfa_project_epilogue.cu).
struct EpilogueSite {
  int64_t offset;        // first column of the site in out
  int64_t rows;          // the site's features (columns of out)
  int64_t activation;    // Activation code of the producing layer (0: no epilogue)
  int64_t state;         // address of the [N, rows] state (uint8 mask, or storage dtype), 0 if none
  int64_t state_stride;  // row stride of the state, in elements
};

// out[:, site] *= g'(state) for every site, in place. out: [n, ld] storage dtype.
cudaError_t launch_dfa_project_epilogue(int dtype, void* out, int64_t ld, int64_t n, const EpilogueSite* sites,
                                        int n_sites, int64_t max_rows, cudaStream_t stream);

// GrAPE's alignment step for every (site, column) in ONE kernel: column sums of <B,J>, |J|^2, |B|^2,
// one gradient step on 1 - mean column cosine, column normalisation; B updated in place.
// feedback: [R, k] storage dtype, row stride ldf; j: [R, k] fp32 (J_hat^T of every site, stacked like B);
// site_offsets/site_rows: [n_sites] device int64; cosines: [n_sites, k] fp32 out (before the step).
cudaError_t launch_align_step(int dtype, void* feedback, int64_t ldf, const float* j, int64_t k,
                              const int64_t* site_offsets, const int64_t* site_rows, int n_sites, float lr,
                              float* cosines, cudaStream_t stream);

// The dual-number epilogue: h = g(a), dh_t = g'(a) * u_t for t < n_tangents, and the state, in one pass.
// a: [n, m] pre-activations (bias included); u: [n_tangents, n, m] tangent pre-activations;
// h, dh like a / u; state: uint8 mask (relu), a copy of a (gelu) or unused.
cudaError_t launch_dual_activation(int dtype, int activation, const void* a, const void* u, int64_t numel,
                                   int n_tangents, void* h, void* dh, void* state, cudaStream_t stream);

}  // namespace fastdfa
