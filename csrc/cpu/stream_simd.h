// The direction stream of csrc/philox.h on SIMD lanes: one generic Philox4x32-10 and one generic float32
// Box-Muller, written once over a small traits struct per instruction set (Avx512, Avx2 below), and
// gen_normals, which fills a block of the stream. Included by directional.cpp only.
//
// Philox works on 64-bit lanes (vpmuludq gives the full 32x32 product of each lane's low word: the high
// word of the product is a shift, the low word the lane itself), so a vector holds S::kCounters counters.
// Only the low 32 bits of each lane are state: vpmuludq reads the low words, the packing reads the low
// words, and the xors never carry into them, so the high words may hold anything and are never masked.
// Box-Muller makes the float operations of box_muller of csrc/philox.h in the definition's order (only
// correctly rounded ones; the build passes -ffp-contract=off), so every level produces the definition's
// bits; its integer steps work on whole words with fewer instructions (see box_muller below).
//
// Throughput: a block is generated in two loops, first Philox for all its counters (independent groups
// interleaved round by round: 2 at AVX2, 4 at AVX-512), then Box-Muller over the stored words. Each loop
// body is short enough for the out-of-order core to overlap several iterations of its long dependency
// chains (10 rounds of multiply-shift-xor; divide, polynomial, square root), which one fused loop did not
// allow: 3.0 -> 2.1 ns per normal at AVX2 and 1.43 -> 1.07 at AVX-512 on one core of a Xeon (Ice Lake) at
// about 3.2 GHz. The word-level integer steps (and masks that are a lane's top bit at AVX2) then took
// Box-Muller from 117 to 93 instructions per vector at AVX2: 1.47 -> 1.27 ns per normal per core at AVX2
// and 0.89 -> 0.86 at AVX-512 on a Zen 4 (one block timed alone, both builds run alternately).
#pragma once
#if !defined(CPU_CAPABILITY_AVX512) && !defined(CPU_CAPABILITY_AVX2)
#error "stream_simd.h is for the AVX2 and AVX512 levels"
#endif
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "../philox.h"

namespace stabkernels::cpu::CPU_CAPABILITY {
namespace stream {

#if defined(CPU_CAPABILITY_AVX512)
// 16 float32 lanes; masks are k-registers.
struct Simd {
  using I = __m512i;
  using F = __m512;
  using M = __mmask16;
  static constexpr int kCounters = 8;  // Philox counters per vector (64-bit lanes)
  // Philox groups generated together (4 state vectors each, of 32 registers): 4 against 2 measured 5% faster
  // per normal on a Zen 4, with the two builds interleaved in one process
  static constexpr int kInterleave = 4;
  static I counters(int64_t c) {
    return _mm512_add_epi64(_mm512_set1_epi64(c), _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static I set64(uint64_t x) { return _mm512_set1_epi64(static_cast<long long>(x)); }
  static I mul_lo32(I a, I b) { return _mm512_mul_epu32(a, b); }
  static I high_words(I a) { return _mm512_srli_epi64(a, 32); }
  static I zero() { return _mm512_setzero_si512(); }
  // 32-bit lanes: the low words of lo's 64-bit lanes, then those of hi's
  static I pack_low_words(I lo, I hi) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi64_epi32(lo)), _mm512_cvtepi64_epi32(hi), 1);
  }

  static I set(int32_t x) { return _mm512_set1_epi32(x); }
  static I add(I a, I b) { return _mm512_add_epi32(a, b); }
  static I sub(I a, I b) { return _mm512_sub_epi32(a, b); }
  static I bit_and(I a, I b) { return _mm512_and_si512(a, b); }
  static I bit_or(I a, I b) { return _mm512_or_si512(a, b); }
  static I bit_xor(I a, I b) { return _mm512_xor_si512(a, b); }
  template <int n> static I shr(I a) { return _mm512_srli_epi32(a, n); }
  template <int n> static I shl(I a) { return _mm512_slli_epi32(a, n); }
  static F to_float(I a) { return _mm512_cvtepi32_ps(a); }
  static I bits(F a) { return _mm512_castps_si512(a); }
  static F from_bits(I a) { return _mm512_castsi512_ps(a); }

  static F set(float x) { return _mm512_set1_ps(x); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F div(F a, F b) { return _mm512_div_ps(a, b); }
  static F sqrt(F a) { return _mm512_sqrt_ps(a); }

  static M ge(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_GE_OQ); }
  template <int n> static M bit_set(I a) { return _mm512_test_epi32_mask(a, set(static_cast<int32_t>(1u << n))); }
  static F select(M m, F if_set, F if_clear) { return _mm512_mask_blend_ps(m, if_clear, if_set); }
  static I select(M m, I if_set, I if_clear) { return _mm512_mask_blend_epi32(m, if_clear, if_set); }
  static I add_one_where(M m, I a) { return _mm512_mask_sub_epi32(a, m, a, set(-1)); }
  static I flip_sign_where(M m, I a) { return _mm512_mask_xor_epi32(a, m, a, set(INT32_MIN)); }

  // Writes the normals of counters c .. c + 7 in element order, `count` of them (<= 32): box_muller's
  // lanes 0-7 are elements 4(c + l) and 4(c + l) + 1, lanes 8-15 elements 4(c + l) + 2 and + 3, so pairs
  // (a_l, b_l) as 64-bit units are put in counter order (l, l + 8) by two permutes.
  static void store(F a, F b, float* dst, int64_t count) {
    const __m512d lo = _mm512_castps_pd(_mm512_unpacklo_ps(a, b)), hi = _mm512_castps_pd(_mm512_unpackhi_ps(a, b));
    const __m512d first = _mm512_permutex2var_pd(lo, _mm512_setr_epi64(0, 4, 1, 5, 8, 12, 9, 13), hi);
    const __m512d second = _mm512_permutex2var_pd(lo, _mm512_setr_epi64(2, 6, 3, 7, 10, 14, 11, 15), hi);
    if (count >= 32) {
      _mm512_storeu_pd(reinterpret_cast<double*>(dst), first);
      _mm512_storeu_pd(reinterpret_cast<double*>(dst + 16), second);
    } else {
      alignas(64) float tmp[32];
      _mm512_store_pd(reinterpret_cast<double*>(tmp), first);
      _mm512_store_pd(reinterpret_cast<double*>(tmp + 16), second);
      std::memcpy(dst, tmp, sizeof(float) * count);
    }
  }
};
#else
// 8 float32 lanes; masks are vectors (see ge below).
struct Simd {
  using I = __m256i;
  using F = __m256;
  using M = __m256i;
  static constexpr int kCounters = 4;
  static constexpr int kInterleave = 2;  // of 16 registers; 3 and 4 measured no faster on a Zen 4
  static I counters(int64_t c) { return _mm256_add_epi64(_mm256_set1_epi64x(c), _mm256_setr_epi64x(0, 1, 2, 3)); }
  static I set64(uint64_t x) { return _mm256_set1_epi64x(static_cast<long long>(x)); }
  static I mul_lo32(I a, I b) { return _mm256_mul_epu32(a, b); }
  static I high_words(I a) { return _mm256_srli_epi64(a, 32); }
  static I zero() { return _mm256_setzero_si256(); }
  static I pack_low_words(I lo, I hi) {
    const __m256i low_halves = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
    return _mm256_blend_epi32(_mm256_permutevar8x32_epi32(lo, low_halves), _mm256_permutevar8x32_epi32(hi, low_halves),
                              0xF0);
  }

  static I set(int32_t x) { return _mm256_set1_epi32(x); }
  static I add(I a, I b) { return _mm256_add_epi32(a, b); }
  static I sub(I a, I b) { return _mm256_sub_epi32(a, b); }
  static I bit_and(I a, I b) { return _mm256_and_si256(a, b); }
  static I bit_or(I a, I b) { return _mm256_or_si256(a, b); }
  static I bit_xor(I a, I b) { return _mm256_xor_si256(a, b); }
  template <int n> static I shr(I a) { return _mm256_srli_epi32(a, n); }
  template <int n> static I shl(I a) { return _mm256_slli_epi32(a, n); }
  static F to_float(I a) { return _mm256_cvtepi32_ps(a); }
  static I bits(F a) { return _mm256_castps_si256(a); }
  static F from_bits(I a) { return _mm256_castsi256_ps(a); }

  static F set(float x) { return _mm256_set1_ps(x); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F div(F a, F b) { return _mm256_div_ps(a, b); }
  static F sqrt(F a) { return _mm256_sqrt_ps(a); }

  // a mask is a vector whose lanes' top bits say which lanes are selected (what blendvps reads), so the mask of
  // one bit of a lane is the lane shifted that bit to the top, and a comparison's all-ones lanes are masks too
  static M ge(F a, F b) { return _mm256_castps_si256(_mm256_cmp_ps(a, b, _CMP_GE_OQ)); }
  template <int n> static M bit_set(I a) {
    if constexpr (n == 31) return a;
    else return _mm256_slli_epi32(a, 31 - n);
  }
  static F select(M m, F if_set, F if_clear) { return _mm256_blendv_ps(if_clear, if_set, _mm256_castsi256_ps(m)); }
  static I select(M m, I if_set, I if_clear) {
    return _mm256_castps_si256(
        _mm256_blendv_ps(_mm256_castsi256_ps(if_clear), _mm256_castsi256_ps(if_set), _mm256_castsi256_ps(m)));
  }
  static I add_one_where(M m, I a) { return _mm256_add_epi32(a, _mm256_srli_epi32(m, 31)); }
  static I flip_sign_where(M m, I a) { return _mm256_xor_si256(a, _mm256_and_si256(m, set(INT32_MIN))); }

  // Writes the normals of counters c .. c + 3 in element order, `count` of them (<= 16): lanes 0-3 of
  // (a, b) are elements 4(c + l) and 4(c + l) + 1, lanes 4-7 elements 4(c + l) + 2 and + 3; (a_l, b_l)
  // pairs as 64-bit units are unpacked per 128-bit half and put in counter order by one permute.
  static void store(F a, F b, float* dst, int64_t count) {
    const __m256d lo = _mm256_castps_pd(_mm256_unpacklo_ps(a, b)), hi = _mm256_castps_pd(_mm256_unpackhi_ps(a, b));
    const __m256 first = _mm256_castpd_ps(_mm256_permute4x64_pd(lo, 0xD8));
    const __m256 second = _mm256_castpd_ps(_mm256_permute4x64_pd(hi, 0xD8));
    if (count >= 16) {
      _mm256_storeu_ps(dst, first);
      _mm256_storeu_ps(dst + 8, second);
    } else {
      alignas(32) float tmp[16];
      _mm256_store_ps(tmp, first);
      _mm256_store_ps(tmp + 8, second);
      std::memcpy(dst, tmp, sizeof(float) * count);
    }
  }
};
#endif

using I = Simd::I;
using F = Simd::F;
constexpr int64_t kElems = 4 * Simd::kCounters;  // elements per Philox vector group

// The 10 round keys of a stream key, broadcast to 64-bit lanes: [2r] for word 0, [2r + 1] for word 1.
struct RoundKeys {
  I k[20];
  explicit RoundKeys(uint64_t key) {
    uint32_t ka = static_cast<uint32_t>(key), kb = static_cast<uint32_t>(key >> 32);
    for (int r = 0; r < 10; ++r, ka += kPhiloxKeyA, kb += kPhiloxKeyB) {
      k[2 * r] = Simd::set64(ka);
      k[2 * r + 1] = Simd::set64(kb);
    }
  }
};

// Philox4x32-10 for N groups of counters, c + g kCounters + lane, rounds interleaved (independent chains
// for the out-of-order core):
// wa[g] = (w0 | w2), wb[g] = (w1 | w3) of each group's counters in 32-bit lanes.
template <int N>
inline void philox_groups(const RoundKeys& keys, int64_t c, I* wa, I* wb) {
  I s0[N], s1[N], s2[N], s3[N];
  for (int g = 0; g < N; ++g) {
    s0[g] = Simd::counters(c + g * Simd::kCounters);  // the counter's low word (high ignored)
    s1[g] = Simd::high_words(s0[g]);
    s2[g] = s3[g] = Simd::zero();
  }
  const I ma = Simd::set64(kPhiloxRoundA), mb = Simd::set64(kPhiloxRoundB);
  for (int r = 0; r < 10; ++r)
    for (int g = 0; g < N; ++g) {
      const I pa = Simd::mul_lo32(ma, s0[g]), pb = Simd::mul_lo32(mb, s2[g]);
      const I n0 = Simd::bit_xor(Simd::high_words(pb), Simd::bit_xor(s1[g], keys.k[2 * r]));
      const I n2 = Simd::bit_xor(Simd::high_words(pa), Simd::bit_xor(s3[g], keys.k[2 * r + 1]));
      s1[g] = pb;  // the low words; the high ones are never read
      s3[g] = pa;
      s0[g] = n0;
      s2[g] = n2;
    }
  for (int g = 0; g < N; ++g) {
    wa[g] = Simd::pack_low_words(s0[g], s2[g]);
    wb[g] = Simd::pack_low_words(s1[g], s3[g]);
  }
}

// box_muller of csrc/philox.h on all lanes, with the same correctly rounded float operations in the same order;
// the integer steps are rewritten on whole words (same values, fewer instructions):
//   2 (wa >> 9) + 1 = (wa >> 8) | 1;  (e - 127 [+ 1]) - 24 = (e - 151) [+ 1];
//   octant bits o = wb >> 29: o & 1 = bit 29 of wb, (o ^ o >> 1) & 1 = bit 30 of wb ^ (wb << 1),
//   (o + 2) & 4 = bit 31 of wb + 2^30, o & 4 = bit 31 of wb;
//   (2k + 1) 2^-24 pi/4 in one product: scaling by a power of two is exact here (no subnormals), so
//   x (2^-24 pi/4) rounds as (x 2^-24) pi/4 does.
inline void box_muller(I wa, I wb, F& a, F& b) {
  using S = Simd;
  const I one = S::set(1), mant = S::set(0x7FFFFF);
  const I bits = S::bits(S::to_float(S::bit_or(S::shr<8>(wa), one)));
  I e = S::sub(S::shr<23>(bits), S::set(127 + 24));
  F m = S::from_bits(S::bit_or(S::bit_and(bits, mant), S::set(0x3F800000)));
  const auto big = S::ge(m, S::set(kSqrt2));
  m = S::select(big, S::mul(m, S::set(0.5f)), m);
  e = S::add_one_where(big, e);
  const F c1 = S::set(1.0f);
  const F s = S::div(S::sub(m, c1), S::add(m, c1));
  const F z = S::mul(s, s);
  F p = S::mul(z, S::set(kL9));
  p = S::mul(z, S::add(p, S::set(kL7)));
  p = S::mul(z, S::add(p, S::set(kL5)));
  p = S::mul(z, S::add(p, S::set(kL3)));
  p = S::mul(s, S::add(p, S::set(2.0f)));
  const F ln_u = S::add(S::mul(S::to_float(e), S::set(kLn2)), p);
  const F r = S::sqrt(S::mul(S::set(-2.0f), ln_u));

  I k = S::bit_and(S::shr<6>(wb), mant);
  k = S::select(S::bit_set<29>(wb), S::sub(mant, k), k);
  const F t = S::mul(S::to_float(S::bit_or(S::shl<1>(k), one)), S::set(kTwoPowMinus24 * kPiOver4));
  const F y = S::mul(t, t);
  F sn = S::mul(y, S::set(kS9));
  sn = S::mul(y, S::add(sn, S::set(kS7)));
  sn = S::mul(y, S::add(sn, S::set(kS5)));
  sn = S::mul(y, S::add(sn, S::set(kS3)));
  sn = S::mul(t, S::add(sn, c1));
  F cs = S::mul(y, S::set(kC10));
  cs = S::mul(y, S::add(cs, S::set(kC8)));
  cs = S::mul(y, S::add(cs, S::set(kC6)));
  cs = S::mul(y, S::add(cs, S::set(kC4)));
  cs = S::mul(y, S::add(cs, S::set(kC2)));
  cs = S::add(cs, c1);
  const auto swap = S::bit_set<30>(S::bit_xor(wb, S::shl<1>(wb)));
  const I A = S::flip_sign_where(S::bit_set<31>(S::add(wb, S::set(1 << 30))), S::bits(S::select(swap, sn, cs)));
  const I B = S::flip_sign_where(S::bit_set<31>(wb), S::bits(S::select(swap, cs, sn)));
  a = S::mul(r, S::from_bits(A));
  b = S::mul(r, S::from_bits(B));
}

// Elements per generation block of gen_normals (its word buffer stays in L1).
constexpr int64_t kWordBlock = 2048;
constexpr int kInterleave = Simd::kInterleave;

// n[0 .. end - begin) = the stream's normals of elements [begin, end) for `key`; begin % 4 == 0.
inline void gen_normals(uint64_t key, int64_t begin, int64_t end, float* n) {
  const RoundKeys keys(key);
  constexpr int64_t kGroups = kWordBlock / kElems;
  I wa[kGroups + kInterleave - 1], wb[kGroups + kInterleave - 1];  // philox_groups fills kInterleave at a time
  for (int64_t b0 = begin; b0 < end; b0 += kWordBlock) {
    const int64_t b1 = std::min(end, b0 + kWordBlock), groups = (b1 - b0 + kElems - 1) / kElems;
    for (int64_t g = 0; g < groups; g += kInterleave)
      philox_groups<kInterleave>(keys, b0 / 4 + g * Simd::kCounters, wa + g, wb + g);
    for (int64_t g = 0; g < groups; ++g) {
      F a, b;
      box_muller(wa[g], wb[g], a, b);
      Simd::store(a, b, n + (b0 - begin) + g * kElems, b1 - b0 - g * kElems);
    }
  }
}

}  // namespace stream
}  // namespace stabkernels::cpu::CPU_CAPABILITY
