// Host emulation of the slice of the CUDA runtime that csrc/ kernels use, so the kernels RUN on a
// CPU in CI (tests/test_csrc_host.py) instead of only compiling. Not part of the build: the test puts
// this directory first on the include path and rewrites each `kernel<<<grid, block, smem, stream>>>(args)`
// into `fastdfa_emu::launch(kernel, grid, block, smem, stream)(args)`.
//
// Semantics kept: every block runs its blockDim threads concurrently (std::thread), so __syncthreads
// (a block-wide std::barrier) and __shfl_down_sync (a per-warp exchange between two warp barriers)
// behave as on the GPU for kernels whose warps converge at each shuffle, as csrc/'s do. Blocks run one
// after another, so a `__shared__` array (function-static here) belongs to the running block.
#pragma once

#include <barrier>
#include <cmath>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

typedef void* cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
inline cudaError_t cudaGetLastError() { return cudaSuccess; }

inline thread_local uint3 threadIdx, blockIdx;
inline thread_local dim3 blockDim, gridDim;

namespace fastdfa_emu {

constexpr int kWarp = 32;

struct Block {
  explicit Block(unsigned threads)
      : sync(threads), warp_slots(threads), n_warps((threads + kWarp - 1) / kWarp) {
    for (unsigned w = 0; w < n_warps; ++w) warps.emplace_back(std::make_unique<std::barrier<>>(kWarp));
  }
  std::barrier<> sync;
  std::vector<float> warp_slots;
  unsigned n_warps;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
};

inline thread_local Block* current_block = nullptr;

template <typename Kernel>
struct Launch {
  Kernel kernel;
  dim3 grid, block;

  template <typename... Args>
  void operator()(Args... args) const {
    const unsigned threads = block.x * block.y * block.z;
    if (threads % kWarp != 0) throw std::invalid_argument("emulated launches need whole warps");
    for (unsigned bz = 0; bz < grid.z; ++bz)
      for (unsigned by = 0; by < grid.y; ++by)
        for (unsigned bx = 0; bx < grid.x; ++bx) {
          Block state(threads);
          std::vector<std::thread> pool;
          pool.reserve(threads);
          for (unsigned t = 0; t < threads; ++t) {
            pool.emplace_back([&, t] {
              threadIdx = {t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
              blockIdx = {bx, by, bz};
              blockDim = block;
              gridDim = grid;
              current_block = &state;
              kernel(args...);
            });
          }
          for (auto& th : pool) th.join();
        }
  }
};

template <typename Kernel>
Launch<Kernel> launch(Kernel kernel, dim3 grid, dim3 block, size_t /*shared bytes*/, cudaStream_t /*stream*/) {
  return Launch<Kernel>{kernel, grid, block};
}

inline unsigned linear_thread() { return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z); }

}  // namespace fastdfa_emu

inline void __syncthreads() { fastdfa_emu::current_block->sync.arrive_and_wait(); }

// Lane i reads lane i + offset of its warp (its own value past the warp's end), as on the GPU.
inline float __shfl_down_sync(unsigned /*mask: full warps only*/, float v, unsigned offset) {
  auto* b = fastdfa_emu::current_block;
  const unsigned t = fastdfa_emu::linear_thread(), lane = t % fastdfa_emu::kWarp, warp = t / fastdfa_emu::kWarp;
  b->warp_slots[t] = v;
  b->warps[warp]->arrive_and_wait();
  const float out = lane + offset < (unsigned)fastdfa_emu::kWarp ? b->warp_slots[t + offset] : v;
  b->warps[warp]->arrive_and_wait();
  return out;
}

inline float __expf(float x) { return std::exp(x); }
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
// erff, sqrtf, tanhf: the C library's, which <cmath> declares globally with glibc.
