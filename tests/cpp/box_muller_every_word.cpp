// The SIMD Box-Muller of csrc/cpu/stream_simd.h against box_muller of csrc/philox.h (the definition), bit
// for bit, for every value of each input it reads: all 2^23 radius words (wa >> 9) and all 2^26 angle words
// (wb >> 6), each paired with random other bits. Built once per ISA level by tests/test_cpu_isa.py
// (-DCPU_CAPABILITY=AVX2 or AVX512 and that level's flags); prints the count checked and exits 1 on a mismatch.
#include <cstdio>
#include <cstring>
#include <random>

#include "cpu/stream_simd.h"

using namespace stabkernels::cpu::CPU_CAPABILITY;

int main() {
  using S = stream::Simd;
  constexpr int L = sizeof(S::F) / sizeof(float);
  std::mt19937 rng(1);
  long checked = 0, bad = 0;
  uint32_t wa[L], wb[L];
  auto compare = [&] {
    S::I va, vb;
    std::memcpy(&va, wa, sizeof va);
    std::memcpy(&vb, wb, sizeof vb);
    S::F fa, fb;
    stream::box_muller(va, vb, fa, fb);
    float a[L], b[L];
    std::memcpy(a, &fa, sizeof a);
    std::memcpy(b, &fb, sizeof b);
    for (int l = 0; l < L; ++l, ++checked) {
      float ra, rb;
      stabkernels::box_muller(wa[l], wb[l], ra, rb);
      if (std::memcmp(&ra, &a[l], 4) != 0 || std::memcmp(&rb, &b[l], 4) != 0) {
        if (bad++ < 5) std::printf("wa %08x wb %08x: want %a %a, got %a %a\n", wa[l], wb[l], ra, rb, a[l], b[l]);
      }
    }
  };
  for (uint64_t x = 0; x < (uint64_t{1} << 23); x += L) {
    for (int l = 0; l < L; ++l) wa[l] = static_cast<uint32_t>((x + l) << 9) | (rng() & 511), wb[l] = rng();
    compare();
  }
  for (uint64_t x = 0; x < (uint64_t{1} << 26); x += L) {
    for (int l = 0; l < L; ++l) wb[l] = static_cast<uint32_t>((x + l) << 6) | (rng() & 63), wa[l] = rng();
    compare();
  }
  std::printf("%ld checked, %ld mismatches\n", checked, bad);
  return bad != 0;
}
