// The direction stream of the directional family, shared by the C++ and CUDA kernels (the torch reference
// and the Triton kernels follow the same definition; see stabkernels/directional.py):
//   Philox4x32-10 as in Triton's tl.randint4x: key (k0, k1) = the two halves of a 64-bit key, counter
//   (c_lo, c_hi, 0, 0) with c = element index / 4; each 32-bit word w gives a uniform u = (w + 0.5) 2^-32
//   in (0, 1); Box-Muller in float64 on (u0, u1) and (u2, u3) gives element 4c + j its normal
//   n_j: r cos(2 pi u1), r sin(2 pi u1) with r = sqrt(-2 ln u0), and likewise from (u2, u3); each normal
//   is rounded once to float32.
#pragma once
#include <cstdint>

#ifdef __CUDACC__
#define STABKERNELS_HD __host__ __device__ __forceinline__
#else
#define STABKERNELS_HD inline
#endif

namespace stabkernels {

constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr double kTwoPi = 6.283185307179586;         // 2 pi rounded to double, as every backend uses it
constexpr double kTwoPowMinus32 = 2.3283064365386963e-10;  // 2^-32

// w[0..3] = Philox4x32-10(key = (k0, k1), counter = (lo32(ctr), hi32(ctr), 0, 0)).
STABKERNELS_HD void philox4x32_10(uint32_t k0, uint32_t k1, uint64_t ctr, uint32_t w[4]) {
  uint32_t c0 = static_cast<uint32_t>(ctr), c1 = static_cast<uint32_t>(ctr >> 32), c2 = 0, c3 = 0;
  for (int r = 0; r < 10; ++r) {
    const uint64_t pa = static_cast<uint64_t>(kPhiloxRoundA) * c0;
    const uint64_t pb = static_cast<uint64_t>(kPhiloxRoundB) * c2;
    const uint32_t n0 = static_cast<uint32_t>(pb >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(pa >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(pb);
    c3 = static_cast<uint32_t>(pa);
    c0 = n0;
    c2 = n2;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  w[0] = c0, w[1] = c1, w[2] = c2, w[3] = c3;
}

STABKERNELS_HD double philox_uniform(uint32_t w) { return (static_cast<double>(w) + 0.5) * kTwoPowMinus32; }

}  // namespace stabkernels
