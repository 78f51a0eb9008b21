// fastdfa._C: the one binding file (the only one that includes torch; the .cu kernels stay torch-free).
//
// Every op runs under a device guard on the caller's current CUDA stream
// (c10::cuda::getCurrentCUDAStream), so the stream scheduler and user streams compose.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "kernels.h"

#ifndef FASTDFA_ARCHS
#define FASTDFA_ARCHS "unknown"
#endif

namespace {

int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return fastdfa::kFloat32;
    case at::kHalf: return fastdfa::kFloat16;
    case at::kBFloat16: return fastdfa::kBFloat16;
    default: TORCH_CHECK(false, "fastdfa._C supports float32, float16 and bfloat16, got ", t.scalar_type());
  }
  return -1;
}

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "fastdfa._C: ", name, " must be a CUDA tensor");
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "fastdfa._C.", op, " failed to launch: ", cudaGetErrorString(err));
}

// P = e @ F^T (cuBLAS), then delta_s = P[:, block_s] * g'(state_s) for every site row of site_table.
at::Tensor dfa_project(const at::Tensor& error, const at::Tensor& feedback, const at::Tensor& site_table,
                       int64_t max_rows) {
  check_cuda(error, "error");
  check_cuda(feedback, "feedback");
  check_cuda(site_table, "site_table");
  TORCH_CHECK(site_table.scalar_type() == at::kLong && site_table.dim() == 2 && site_table.size(1) == 5 &&
                  site_table.is_contiguous(),
              "fastdfa._C.dfa_project: site_table must be a contiguous [sites, 5] int64 tensor");
  const c10::cuda::CUDAGuard guard(error.device());
  at::Tensor out = at::mm(error.to(feedback.scalar_type()), feedback.t());
  auto stream = c10::cuda::getCurrentCUDAStream();
  check_launch(fastdfa::launch_dfa_project_epilogue(
                   dtype_code(out), out.data_ptr(), out.stride(0), out.size(0),
                   reinterpret_cast<const fastdfa::EpilogueSite*>(site_table.data_ptr<int64_t>()),
                   static_cast<int>(site_table.size(0)), max_rows, stream.stream()),
               "dfa_project");
  return out;
}

// One alignment step on feedback (in place) against j = J_hat^T stacked like feedback; the cosines
// [sites, k] before the step.
at::Tensor align_step(at::Tensor feedback, const at::Tensor& j, const at::Tensor& offsets, const at::Tensor& rows,
                      double lr) {
  check_cuda(feedback, "feedback");
  check_cuda(j, "j");
  TORCH_CHECK(j.scalar_type() == at::kFloat && j.is_contiguous() && j.sizes() == feedback.sizes(),
              "fastdfa._C.align_step: j must be a contiguous float32 tensor shaped like the feedback");
  TORCH_CHECK(feedback.stride(1) == 1, "fastdfa._C.align_step: the feedback needs a unit column stride");
  TORCH_CHECK(offsets.scalar_type() == at::kLong && rows.scalar_type() == at::kLong && offsets.is_cuda() &&
                  rows.is_cuda() && offsets.numel() == rows.numel() && offsets.is_contiguous() &&
                  rows.is_contiguous(),
              "fastdfa._C.align_step: offsets and rows must be contiguous CUDA int64 tensors of equal length");
  const c10::cuda::CUDAGuard guard(feedback.device());
  at::Tensor cosines = at::empty({offsets.numel(), feedback.size(1)}, feedback.options().dtype(at::kFloat));
  auto stream = c10::cuda::getCurrentCUDAStream();
  check_launch(fastdfa::launch_align_step(dtype_code(feedback), feedback.data_ptr(), feedback.stride(0),
                                          j.data_ptr<float>(), feedback.size(1), offsets.data_ptr<int64_t>(),
                                          rows.data_ptr<int64_t>(), static_cast<int>(offsets.numel()),
                                          static_cast<float>(lr), cosines.data_ptr<float>(), stream.stream()),
               "align_step");
  return cosines;
}

// h = g(a), dh = g'(a) * u, and the state, in one pass. u: [T, *a.shape] (T may be 0).
std::vector<at::Tensor> dual_activation(const at::Tensor& a, const at::Tensor& u, int64_t activation) {
  check_cuda(a, "a");
  TORCH_CHECK(a.is_contiguous() && u.is_contiguous() && u.scalar_type() == a.scalar_type(),
              "fastdfa._C.dual_activation: a and u must be contiguous and of one dtype");
  TORCH_CHECK(u.numel() % std::max<int64_t>(a.numel(), 1) == 0, "fastdfa._C.dual_activation: u is not [T, *a.shape]");
  const c10::cuda::CUDAGuard guard(a.device());
  const int n_tangents = a.numel() == 0 ? 0 : static_cast<int>(u.numel() / a.numel());
  at::Tensor h = at::empty_like(a), dh = at::empty_like(u);
  at::Tensor state;
  if (activation == fastdfa::kRelu) state = at::empty(a.sizes(), a.options().dtype(at::kByte));
  if (activation == fastdfa::kGelu) state = at::empty_like(a);
  auto stream = c10::cuda::getCurrentCUDAStream();
  check_launch(fastdfa::launch_dual_activation(dtype_code(a), static_cast<int>(activation), a.data_ptr(),
                                               u.numel() ? u.data_ptr() : nullptr, a.numel(), n_tangents,
                                               h.data_ptr(), dh.numel() ? dh.data_ptr() : nullptr,
                                               state.defined() ? state.data_ptr() : nullptr, stream.stream()),
               "dual_activation");
  return {h, dh, state.defined() ? state : h};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastdfa CUDA kernels (csrc/): projection epilogue, alignment step, dual-number activation";
  m.def("dfa_project", &dfa_project, "P = e F^T (cuBLAS) with the g' epilogue of every site");
  m.def("align_step", &align_step, "GrAPE's alignment step for all sites, in place; cosines before it");
  m.def("dual_activation", &dual_activation, "h = g(a), dh = g'(a) u and the activation state, in one pass");
  m.def("built_archs", []() { return std::string(FASTDFA_ARCHS); }, "TORCH_CUDA_ARCH_LIST at build time");
}
