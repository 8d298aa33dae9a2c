// The direction stream of the directional family, shared by the C++ and CUDA kernels (the torch reference
// and the Triton kernels follow the same definition; see stabkernels/_stream.py):
//   Philox4x32-10 as in Triton's tl.randint4x: key (k0, k1) = the two halves of a 64-bit key, counter
//   (c_lo, c_hi, 0, 0) with c = element index / 4; words (w0, w1) give elements 4c, 4c + 1 and (w2, w3)
//   elements 4c + 2, 4c + 3 through box_muller below: float32 Box-Muller made of IEEE-exact operations only
//   (+, -, *, /, sqrt, exact integer-to-float conversions, in a fixed order, no FMA contraction), so every
//   CPU implementation, vectorised or not, produces the same bits.
#pragma once
#include <cstdint>
#include <cmath>
#include <cstring>

#ifdef __CUDACC__
#define STABKERNELS_HD __host__ __device__ __forceinline__
#else
// static: each CPU ISA level's translation unit keeps its own copy (csrc/cpu/isa/), none shared at link time.
#define STABKERNELS_HD static inline
#endif

namespace stabkernels {

constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
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


// One IEEE round-to-nearest float32 operation each. On CUDA the intrinsics forbid nvcc's contraction of a
// multiply and an add into an FMA (nvcc contracts by default, -fmad=true), which would round once where the
// stream rounds twice and change the bits of some normals; on CPU the plain operators suffice (every CPU
// source is compiled with -ffp-contract=off, setup.py).
#ifdef __CUDA_ARCH__
__device__ __forceinline__ float rn_add(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ float rn_sub(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ float rn_mul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ float rn_div(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ float rn_sqrt(float a) { return __fsqrt_rn(a); }
#else
STABKERNELS_HD float rn_add(float a, float b) { return a + b; }
STABKERNELS_HD float rn_sub(float a, float b) { return a - b; }
STABKERNELS_HD float rn_mul(float a, float b) { return a * b; }
STABKERNELS_HD float rn_div(float a, float b) { return a / b; }
STABKERNELS_HD float rn_sqrt(float a) { return std::sqrt(a); }
#endif

// The constants of box_muller, float32 values written exactly (hex).
constexpr float kLn2 = 0x1.62e43p-1f;       // ln 2
constexpr float kSqrt2 = 0x1.6a09e6p+0f;    // sqrt 2
constexpr float kL3 = 0x1.555556p-1f, kL5 = 0x1.99999ap-2f, kL7 = 0x1.24924ap-2f, kL9 = 0x1.c71c72p-3f;  // 2/k
constexpr float kPiOver4 = 0x1.921fb6p-1f;  // pi / 4
constexpr float kS3 = -0x1.555556p-3f, kS5 = 0x1.111112p-7f, kS7 = -0x1.a01a02p-13f, kS9 = 0x1.71de3ap-19f;
constexpr float kC2 = -0x1p-1f, kC4 = 0x1.555556p-5f, kC6 = -0x1.6c16c2p-10f, kC8 = 0x1.a01a02p-16f,
                kC10 = -0x1.27e4fcp-22f;  // (-1)^(k/2) / k! for sin (odd k) and cos (even k)
constexpr float kTwoPowMinus24 = 0x1p-24f;

// Two standard normals from two Philox words (the stream's step 3):
//   radius: x = 2 (wa >> 9) + 1, u = x 2^-24 in (0, 1); x = 2^e m with m in [1, 2), halved (e + 1) when
//     m >= sqrt 2; s = (m - 1) / (m + 1), z = s^2, ln m ~ s (2 + z (2/3 + z (2/5 + z (2/7 + z 2/9)))),
//     ln u = (e - 24) ln 2 + ln m, r = sqrt(-2 ln u);
//   angle: octant o = wb >> 29, k = (wb >> 6) & (2^23 - 1), reflected (k = 2^23 - 1 - k) in odd octants;
//     x = ((2k + 1) 2^-24) pi/4 in (0, pi/4), y = x^2, sin x ~ x (1 + y (S3 + y (S5 + y (S7 + y S9)))),
//     cos x ~ 1 + y (C2 + y (C4 + y (C6 + y (C8 + y C10)))); (A, B) = (cos x, sin x), swapped when
//     (o ^ o >> 1) & 1, A negated for o in 2..5, B negated for o >= 4: (A, B) = (cos, sin) of the angle
//     2 pi (o + f) / 8 with f the unreflected fraction;
//   (a, b) = (r A, r B). Every operation above, in that order, rounded to float32 (rn_* above: no FMA).
// Accuracy: the normals are within about 1e-7 (relative) of exact Box-Muller on the same uniforms.
STABKERNELS_HD void box_muller(uint32_t wa, uint32_t wb, float& a, float& b) {
  const float x = static_cast<float>(2 * (wa >> 9) + 1);
  uint32_t bits;
  memcpy(&bits, &x, sizeof bits);
  int e = static_cast<int>(bits >> 23) - 127;
  bits = (bits & 0x7FFFFFu) | 0x3F800000u;
  float m;
  memcpy(&m, &bits, sizeof m);
  if (m >= kSqrt2) m = rn_mul(m, 0.5f), e += 1;
  const float s = rn_div(rn_sub(m, 1.0f), rn_add(m, 1.0f));
  const float z = rn_mul(s, s);
  const float poly =
      rn_add(2.0f, rn_mul(z, rn_add(kL3, rn_mul(z, rn_add(kL5, rn_mul(z, rn_add(kL7, rn_mul(z, kL9))))))));
  const float ln_u = rn_add(rn_mul(static_cast<float>(e - 24), kLn2), rn_mul(s, poly));
  const float r = rn_sqrt(rn_mul(-2.0f, ln_u));
  const uint32_t o = wb >> 29;
  uint32_t k = (wb >> 6) & 0x7FFFFFu;
  if (o & 1u) k = 0x7FFFFFu - k;
  const float t = rn_mul(rn_mul(static_cast<float>(2 * k + 1), kTwoPowMinus24), kPiOver4);
  const float y = rn_mul(t, t);
  const float sn =
      rn_mul(t, rn_add(1.0f, rn_mul(y, rn_add(kS3, rn_mul(y, rn_add(kS5, rn_mul(y, rn_add(kS7, rn_mul(y, kS9)))))))));
  const float cs_tail = rn_add(kC6, rn_mul(y, rn_add(kC8, rn_mul(y, kC10))));  // the innermost terms first
  const float cs = rn_add(1.0f, rn_mul(y, rn_add(kC2, rn_mul(y, rn_add(kC4, rn_mul(y, cs_tail))))));
  const bool swap = ((o ^ (o >> 1)) & 1u) != 0;
  float A = swap ? sn : cs, B = swap ? cs : sn;
  if (((o + 2) & 4u) != 0) A = -A;
  if ((o & 4u) != 0) B = -B;
  a = rn_mul(r, A);
  b = rn_mul(r, B);
}

// The four normals of Philox counter `ctr` of stream key `key`: elements 4 ctr .. 4 ctr + 3.
STABKERNELS_HD void stream_normals4(uint64_t key, uint64_t ctr, float n[4]) {
  uint32_t w[4];
  philox4x32_10(static_cast<uint32_t>(key), static_cast<uint32_t>(key >> 32), ctr, w);
  box_muller(w[0], w[1], n[0], n[1]);
  box_muller(w[2], w[3], n[2], n[3]);
}

// Step 4: the unit-norm scale s = 1 / (sqrt(S) + kStreamUnitEps) of a tensor's normals from their float64 sum
// of squares S, rounded to float32 so that summing S in another order does not change it (host code: the CPU
// kernels per tensor, the CUDA glue elementwise; stabkernels/_stream.py: UNIT_EPS, unit_scale_from_sum).
constexpr double kStreamUnitEps = 1e-12;
static inline float stream_unit_scale(double sq_sum) {
  return static_cast<float>(1.0 / (std::sqrt(sq_sum) + kStreamUnitEps));
}

}  // namespace stabkernels
