// Host emulation of __half (see cuda_runtime.h here): IEEE binary16 storage, round-to-nearest-even
// conversion through the compiler's _Float16 (GCC >= 12 on x86-64).
#pragma once

#include <cstdint>
#include <cstring>

struct __half {
  uint16_t bits;
};

inline float __half2float(__half h) {
  _Float16 v;
  std::memcpy(&v, &h.bits, 2);
  return (float)v;
}

inline __half __float2half_rn(float f) {
  const _Float16 v = (_Float16)f;
  __half h;
  std::memcpy(&h.bits, &v, 2);
  return h;
}
