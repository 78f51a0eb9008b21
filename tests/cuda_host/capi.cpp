// C entry points to csrc/'s host launchers for ctypes (tests/test_csrc_host.py): the launchers take
// no torch types, so the emulated build is just these sources and the headers here.
#include "kernels.h"

extern "C" {

int emu_dfa_project_epilogue(int dtype, void* out, int64_t ld, int64_t n, const void* sites, int n_sites,
                             int64_t max_rows) {
  return fastdfa::launch_dfa_project_epilogue(dtype, out, ld, n, static_cast<const fastdfa::EpilogueSite*>(sites),
                                              n_sites, max_rows, nullptr);
}

int emu_align_step(int dtype, void* feedback, int64_t ldf, const float* j, int64_t k, const int64_t* offsets,
                   const int64_t* rows, int n_sites, float lr, float* cosines) {
  return fastdfa::launch_align_step(dtype, feedback, ldf, j, k, offsets, rows, n_sites, lr, cosines, nullptr);
}

int emu_dual_activation(int dtype, int activation, const void* a, const void* u, int64_t numel, int n_tangents,
                        void* h, void* dh, void* state) {
  return fastdfa::launch_dual_activation(dtype, activation, a, u, numel, n_tangents, h, dh, state, nullptr);
}
}
