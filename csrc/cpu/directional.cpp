// Directional family on CPU (SPEC 3.3, 4): random directions generated inside the kernel from the Philox
// stream of csrc/philox.h, never stored; perturbation theta + sigma d into scratch tensors; K directional
// derivatives g . d_k in one read of g; the OrthoGrad projection.
//
// Generation: Philox for 8 counters at a time in AVX-512 integer vectors (4 in AVX2), then the stream's
// float32 Box-Muller (csrc/philox.h) on 16 lanes (8 in AVX2); at DEFAULT the scalar definition itself. All
// use only correctly rounded operations in the definition's order (and the build passes -ffp-contract=off),
// so they agree bit for bit with each other and with the torch reference on every ISA level.

#include <cstring>

#include "../philox.h"
#include "common.h"

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

namespace stabkernels::cpu::CPU_CAPABILITY {
namespace {

// Elements per generation block: a multiple of 32, small enough to stay in L1.
constexpr int64_t kBlock = 2048;

#if defined(CPU_CAPABILITY_AVX512)
// Philox for counters c .. c + 7, each 32-bit word in a 64-bit lane (vpmuludq gives the full product; hi is
// a shift, lo the lane itself), packed to 32-bit lanes: wa = (w0 | w2), wb = (w1 | w3) of the 8 counters.
// Only the low 32 bits of each lane are state: vpmuludq reads the low words of s0 and s2, the packing reads
// the low words, and the xors never carry into them, so the high words may hold anything (no masking).
inline void philox8(uint32_t k0, uint32_t k1, int64_t c, __m512i& wa, __m512i& wb) {
  const __m512i ctr = _mm512_add_epi64(_mm512_set1_epi64(c), _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7));
  __m512i s0 = ctr, s1 = _mm512_srli_epi64(ctr, 32);  // s0: the counter's low word (high ignored)
  __m512i s2 = _mm512_setzero_si512(), s3 = _mm512_setzero_si512();
  const __m512i ma = _mm512_set1_epi64(kPhiloxRoundA), mb = _mm512_set1_epi64(kPhiloxRoundB);
  uint32_t ka = k0, kb = k1;
  for (int r = 0; r < 10; ++r) {
    const __m512i pa = _mm512_mul_epu32(ma, s0), pb = _mm512_mul_epu32(mb, s2);
    const __m512i n0 = _mm512_xor_si512(_mm512_xor_si512(_mm512_srli_epi64(pb, 32), s1), _mm512_set1_epi64(ka));
    const __m512i n2 = _mm512_xor_si512(_mm512_xor_si512(_mm512_srli_epi64(pa, 32), s3), _mm512_set1_epi64(kb));
    s1 = pb;  // the low words; the high ones are never read (see above)
    s3 = pa;
    s0 = n0;
    s2 = n2;
    ka += kPhiloxKeyA;
    kb += kPhiloxKeyB;
  }
  auto pack = [](__m512i lo, __m512i hi) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi64_epi32(lo)), _mm512_cvtepi64_epi32(hi), 1);
  };
  wa = pack(s0, s2);
  wb = pack(s1, s3);
}

// box_muller of csrc/philox.h on 16 lanes, operation for operation.
inline void box_muller16(__m512i wa, __m512i wb, __m512& a, __m512& b) {
  const __m512i one = _mm512_set1_epi32(1);
  const __m512 x = _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_slli_epi32(_mm512_srli_epi32(wa, 9), 1), one));
  const __m512i bits = _mm512_castps_si512(x);
  __m512i e = _mm512_sub_epi32(_mm512_srli_epi32(bits, 23), _mm512_set1_epi32(127));
  __m512 m = _mm512_castsi512_ps(_mm512_or_si512(_mm512_and_si512(bits, _mm512_set1_epi32(0x7FFFFF)),
                                                 _mm512_set1_epi32(0x3F800000)));
  const __mmask16 big = _mm512_cmp_ps_mask(m, _mm512_set1_ps(kSqrt2), _CMP_GE_OQ);
  m = _mm512_mask_mul_ps(m, big, m, _mm512_set1_ps(0.5f));
  e = _mm512_mask_add_epi32(e, big, e, one);
  const __m512 c1 = _mm512_set1_ps(1.0f);
  const __m512 s = _mm512_div_ps(_mm512_sub_ps(m, c1), _mm512_add_ps(m, c1));
  const __m512 z = _mm512_mul_ps(s, s);
  __m512 p = _mm512_mul_ps(z, _mm512_set1_ps(kL9));
  p = _mm512_mul_ps(z, _mm512_add_ps(p, _mm512_set1_ps(kL7)));
  p = _mm512_mul_ps(z, _mm512_add_ps(p, _mm512_set1_ps(kL5)));
  p = _mm512_mul_ps(z, _mm512_add_ps(p, _mm512_set1_ps(kL3)));
  p = _mm512_mul_ps(s, _mm512_add_ps(p, _mm512_set1_ps(2.0f)));
  const __m512 ln_u = _mm512_add_ps(
      _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(e, _mm512_set1_epi32(24))), _mm512_set1_ps(kLn2)), p);
  const __m512 r = _mm512_sqrt_ps(_mm512_mul_ps(_mm512_set1_ps(-2.0f), ln_u));

  const __m512i o = _mm512_srli_epi32(wb, 29);
  __m512i k = _mm512_and_si512(_mm512_srli_epi32(wb, 6), _mm512_set1_epi32(0x7FFFFF));
  k = _mm512_mask_sub_epi32(k, _mm512_test_epi32_mask(o, one), _mm512_set1_epi32(0x7FFFFF), k);
  const __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_slli_epi32(k, 1), one)),
                                 _mm512_set1_ps(kTwoPowMinus24));
  const __m512 t = _mm512_mul_ps(f, _mm512_set1_ps(kPiOver4));
  const __m512 y = _mm512_mul_ps(t, t);
  __m512 sn = _mm512_mul_ps(y, _mm512_set1_ps(kS9));
  sn = _mm512_mul_ps(y, _mm512_add_ps(sn, _mm512_set1_ps(kS7)));
  sn = _mm512_mul_ps(y, _mm512_add_ps(sn, _mm512_set1_ps(kS5)));
  sn = _mm512_mul_ps(y, _mm512_add_ps(sn, _mm512_set1_ps(kS3)));
  sn = _mm512_mul_ps(t, _mm512_add_ps(sn, c1));
  __m512 cs = _mm512_mul_ps(y, _mm512_set1_ps(kC10));
  cs = _mm512_mul_ps(y, _mm512_add_ps(cs, _mm512_set1_ps(kC8)));
  cs = _mm512_mul_ps(y, _mm512_add_ps(cs, _mm512_set1_ps(kC6)));
  cs = _mm512_mul_ps(y, _mm512_add_ps(cs, _mm512_set1_ps(kC4)));
  cs = _mm512_mul_ps(y, _mm512_add_ps(cs, _mm512_set1_ps(kC2)));
  cs = _mm512_add_ps(cs, c1);
  const __mmask16 swap = _mm512_test_epi32_mask(_mm512_xor_si512(o, _mm512_srli_epi32(o, 1)), one);
  const __m512i sign = _mm512_set1_epi32(static_cast<int>(0x80000000u)), four = _mm512_set1_epi32(4);
  __m512i A = _mm512_castps_si512(_mm512_mask_blend_ps(swap, cs, sn));
  __m512i B = _mm512_castps_si512(_mm512_mask_blend_ps(swap, sn, cs));
  A = _mm512_mask_xor_epi32(A, _mm512_test_epi32_mask(_mm512_add_epi32(o, _mm512_set1_epi32(2)), four), A, sign);
  B = _mm512_mask_xor_epi32(B, _mm512_test_epi32_mask(o, four), B, sign);
  a = _mm512_mul_ps(r, _mm512_castsi512_ps(A));
  b = _mm512_mul_ps(r, _mm512_castsi512_ps(B));
}

// n[0 .. end - begin) = the stream's normals of elements [begin, end) for `key`; begin % 4 == 0.
void gen_normals(uint64_t key, int64_t begin, int64_t end, float* n) {
  const uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
  // Lanes 0-7 of (a, b) are elements 4(c + l) and 4(c + l) + 1, lanes 8-15 elements 4(c + l) + 2 and + 3:
  // pairs (a_l, b_l) as 64-bit units, reordered to counter order (l, l + 8) by two permutes.
  const __m512i first = _mm512_setr_epi64(0, 4, 1, 5, 8, 12, 9, 13);
  const __m512i second = _mm512_setr_epi64(2, 6, 3, 7, 10, 14, 11, 15);
  for (int64_t c = begin / 4; 4 * c < end; c += 8) {
    __m512i wa, wb;
    __m512 a, b;
    philox8(k0, k1, c, wa, wb);
    box_muller16(wa, wb, a, b);
    const __m512d lo = _mm512_castps_pd(_mm512_unpacklo_ps(a, b)), hi = _mm512_castps_pd(_mm512_unpackhi_ps(a, b));
    const int64_t e0 = 4 * c;
    float* dst = n + (e0 - begin);
    if (end - e0 >= 32) {
      _mm512_storeu_pd(reinterpret_cast<double*>(dst), _mm512_permutex2var_pd(lo, first, hi));
      _mm512_storeu_pd(reinterpret_cast<double*>(dst + 16), _mm512_permutex2var_pd(lo, second, hi));
    } else {  // the last batch of a range
      alignas(64) float tmp[32];
      _mm512_store_pd(reinterpret_cast<double*>(tmp), _mm512_permutex2var_pd(lo, first, hi));
      _mm512_store_pd(reinterpret_cast<double*>(tmp + 16), _mm512_permutex2var_pd(lo, second, hi));
      std::memcpy(dst, tmp, sizeof(float) * (end - e0));
    }
  }
}
#elif defined(CPU_CAPABILITY_AVX2)
// Philox for counters c .. c + 3 in AVX2 (the AVX-512 philox8 above on half the lanes, with the same
// unmasked high words): wa = (w0 | w2), wb = (w1 | w3) of the 4 counters in 32-bit lanes.
inline void philox4(uint32_t k0, uint32_t k1, int64_t c, __m256i& wa, __m256i& wb) {
  const __m256i ctr = _mm256_add_epi64(_mm256_set1_epi64x(c), _mm256_setr_epi64x(0, 1, 2, 3));
  __m256i s0 = ctr, s1 = _mm256_srli_epi64(ctr, 32);  // s0: the counter's low word (high ignored)
  __m256i s2 = _mm256_setzero_si256(), s3 = _mm256_setzero_si256();
  const __m256i ma = _mm256_set1_epi64x(kPhiloxRoundA), mb = _mm256_set1_epi64x(kPhiloxRoundB);
  uint32_t ka = k0, kb = k1;
  for (int r = 0; r < 10; ++r) {
    const __m256i pa = _mm256_mul_epu32(ma, s0), pb = _mm256_mul_epu32(mb, s2);
    const __m256i n0 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(pb, 32), s1), _mm256_set1_epi64x(ka));
    const __m256i n2 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(pa, 32), s3), _mm256_set1_epi64x(kb));
    s1 = pb;  // the low words; the high ones are never read (see above)
    s3 = pa;
    s0 = n0;
    s2 = n2;
    ka += kPhiloxKeyA;
    kb += kPhiloxKeyB;
  }
  const __m256i low_halves = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
  auto pack = [&](__m256i lo, __m256i hi) {
    return _mm256_blend_epi32(_mm256_permutevar8x32_epi32(lo, low_halves), _mm256_permutevar8x32_epi32(hi, low_halves),
                              0xF0);
  };
  wa = pack(s0, s2);
  wb = pack(s1, s3);
}

// box_muller of csrc/philox.h on 8 lanes, operation for operation (masks as all-ones lanes).
inline void box_muller8(__m256i wa, __m256i wb, __m256& a, __m256& b) {
  const __m256i one = _mm256_set1_epi32(1);
  const __m256 x = _mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_slli_epi32(_mm256_srli_epi32(wa, 9), 1), one));
  const __m256i bits = _mm256_castps_si256(x);
  __m256i e = _mm256_sub_epi32(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(127));
  __m256 m = _mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(bits, _mm256_set1_epi32(0x7FFFFF)),
                                                 _mm256_set1_epi32(0x3F800000)));
  const __m256 big = _mm256_cmp_ps(m, _mm256_set1_ps(kSqrt2), _CMP_GE_OQ);
  m = _mm256_blendv_ps(m, _mm256_mul_ps(m, _mm256_set1_ps(0.5f)), big);
  e = _mm256_sub_epi32(e, _mm256_castps_si256(big));  // + 1 where big (its lanes are -1)
  const __m256 c1 = _mm256_set1_ps(1.0f);
  const __m256 s = _mm256_div_ps(_mm256_sub_ps(m, c1), _mm256_add_ps(m, c1));
  const __m256 z = _mm256_mul_ps(s, s);
  __m256 p = _mm256_mul_ps(z, _mm256_set1_ps(kL9));
  p = _mm256_mul_ps(z, _mm256_add_ps(p, _mm256_set1_ps(kL7)));
  p = _mm256_mul_ps(z, _mm256_add_ps(p, _mm256_set1_ps(kL5)));
  p = _mm256_mul_ps(z, _mm256_add_ps(p, _mm256_set1_ps(kL3)));
  p = _mm256_mul_ps(s, _mm256_add_ps(p, _mm256_set1_ps(2.0f)));
  const __m256 ln_u = _mm256_add_ps(
      _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(e, _mm256_set1_epi32(24))), _mm256_set1_ps(kLn2)), p);
  const __m256 r = _mm256_sqrt_ps(_mm256_mul_ps(_mm256_set1_ps(-2.0f), ln_u));

  const __m256i o = _mm256_srli_epi32(wb, 29);
  const __m256i mant = _mm256_set1_epi32(0x7FFFFF);
  __m256i k = _mm256_and_si256(_mm256_srli_epi32(wb, 6), mant);
  const __m256i odd = _mm256_cmpeq_epi32(_mm256_and_si256(o, one), one);
  k = _mm256_blendv_epi8(k, _mm256_sub_epi32(mant, k), odd);
  const __m256 f = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_slli_epi32(k, 1), one)),
                                 _mm256_set1_ps(kTwoPowMinus24));
  const __m256 t = _mm256_mul_ps(f, _mm256_set1_ps(kPiOver4));
  const __m256 y = _mm256_mul_ps(t, t);
  __m256 sn = _mm256_mul_ps(y, _mm256_set1_ps(kS9));
  sn = _mm256_mul_ps(y, _mm256_add_ps(sn, _mm256_set1_ps(kS7)));
  sn = _mm256_mul_ps(y, _mm256_add_ps(sn, _mm256_set1_ps(kS5)));
  sn = _mm256_mul_ps(y, _mm256_add_ps(sn, _mm256_set1_ps(kS3)));
  sn = _mm256_mul_ps(t, _mm256_add_ps(sn, c1));
  __m256 cs = _mm256_mul_ps(y, _mm256_set1_ps(kC10));
  cs = _mm256_mul_ps(y, _mm256_add_ps(cs, _mm256_set1_ps(kC8)));
  cs = _mm256_mul_ps(y, _mm256_add_ps(cs, _mm256_set1_ps(kC6)));
  cs = _mm256_mul_ps(y, _mm256_add_ps(cs, _mm256_set1_ps(kC4)));
  cs = _mm256_mul_ps(y, _mm256_add_ps(cs, _mm256_set1_ps(kC2)));
  cs = _mm256_add_ps(cs, c1);
  const __m256 swap = _mm256_castsi256_ps(
      _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_xor_si256(o, _mm256_srli_epi32(o, 1)), one), one));
  const __m256i four = _mm256_set1_epi32(4), sign = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  const __m256i neg_a = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_add_epi32(o, _mm256_set1_epi32(2)), four), four);
  const __m256i neg_b = _mm256_cmpeq_epi32(_mm256_and_si256(o, four), four);
  const __m256i A = _mm256_xor_si256(_mm256_castps_si256(_mm256_blendv_ps(cs, sn, swap)), _mm256_and_si256(neg_a, sign));
  const __m256i B = _mm256_xor_si256(_mm256_castps_si256(_mm256_blendv_ps(sn, cs, swap)), _mm256_and_si256(neg_b, sign));
  a = _mm256_mul_ps(r, _mm256_castsi256_ps(A));
  b = _mm256_mul_ps(r, _mm256_castsi256_ps(B));
}

// n[0 .. end - begin) = the stream's normals of elements [begin, end) for `key`; begin % 4 == 0. Two groups
// of 4 counters per iteration give the out-of-order core independent work.
void gen_normals(uint64_t key, int64_t begin, int64_t end, float* n) {
  const uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
  // Lanes 0-3 of (a, b) are elements 4(c + l) and 4(c + l) + 1, lanes 4-7 elements 4(c + l) + 2 and + 3:
  // (a_l, b_l) pairs as 64-bit units, unpacked per 128-bit half and put in counter order by one permute.
  auto emit = [&](int64_t c) {
    __m256i wa, wb;
    __m256 a, b;
    philox4(k0, k1, c, wa, wb);
    box_muller8(wa, wb, a, b);
    const __m256d lo = _mm256_castps_pd(_mm256_unpacklo_ps(a, b)), hi = _mm256_castps_pd(_mm256_unpackhi_ps(a, b));
    const __m256 first = _mm256_castpd_ps(_mm256_permute4x64_pd(lo, 0xD8)), second = _mm256_castpd_ps(_mm256_permute4x64_pd(hi, 0xD8));
    const int64_t e0 = 4 * c;
    float* dst = n + (e0 - begin);
    if (end - e0 >= 16) {
      _mm256_storeu_ps(dst, first);
      _mm256_storeu_ps(dst + 8, second);
    } else {  // the last group of a range
      alignas(32) float tmp[16];
      _mm256_store_ps(tmp, first);
      _mm256_store_ps(tmp + 8, second);
      std::memcpy(dst, tmp, sizeof(float) * (end - e0));
    }
  };
  int64_t c = begin / 4;
  for (; 4 * (c + 4) < end; c += 8) {
    emit(c);
    emit(c + 4);
  }
  for (; 4 * c < end; c += 4) emit(c);
}
#else
void gen_normals(uint64_t key, int64_t begin, int64_t end, float* n) {
  for (int64_t c = begin / 4; 4 * c < end; ++c) {
    float v[4];
    stream_normals4(key, static_cast<uint64_t>(c), v);
    const int64_t e0 = 4 * c;
    std::memcpy(n + (e0 - begin), v, sizeof(float) * std::min<int64_t>(4, end - e0));
  }
}
#endif

// gen_normals for any first element: a partial Philox group at the start is generated whole and cut.
void gen_normals_from(uint64_t key, int64_t begin, int64_t end, float* n) {
  int64_t head = begin;
  if (begin % 4 != 0) {
    head = std::min(end, (begin / 4 + 1) * 4);
    float v[4];
    stream_normals4(key, static_cast<uint64_t>(begin / 4), v);
    std::memcpy(n, v + begin % 4, sizeof(float) * (head - begin));
  }
  if (end > head) gen_normals(key, head, end, n + (head - begin));
}

// float64 sums over kLanes interleaved partial sums (element j into lane j % kLanes), which the compiler
// turns into vectors and whose adds do not form one dependent chain; lanes_total adds the lanes in a fixed
// order, so the result is the same at every ISA level.
constexpr int kLanes = 8;
inline double lanes_total(const double* x) {
  return ((x[0] + x[4]) + (x[1] + x[5])) + ((x[2] + x[6]) + (x[3] + x[7]));
}

// Sum of x[j]^2 in float64 (exact products of float32 values); a serial sum was a third of the time of
// random_directions.
double sum_sq(const float* x, int64_t n) {
  double acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += static_cast<double>(x[j + l]) * x[j + l];
  for (int l = 0; j < n; ++j, ++l) acc[l] += static_cast<double>(x[j]) * x[j];
  return lanes_total(acc);
}

uint64_t key_at(const at::Tensor& keys, int64_t i) {
  return static_cast<uint64_t>(keys.const_data_ptr<int64_t>()[i]);
}

std::vector<int64_t> numels(at::TensorList ts) {
  std::vector<int64_t> n;
  for (const auto& t : ts) n.push_back(t.numel());
  return n;
}

// Sum over each tensor's stream of n^2 (float64), one generation pass, chunks across all tensors.
// When `store` is given, the normals are also written into store[i] (float32/float64 storage).
std::vector<double> stream_sq_norms(const std::vector<int64_t>& sizes, const at::Tensor& keys, int64_t key_offset,
                                    at::TensorList store) {
  const auto chunks = make_chunks(sizes, kBlock);
  std::vector<double> partial(chunks.size(), 0.0);
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t b0, int64_t b1) {
    float buf[kBlock];
    for (int64_t ci = b0; ci < b1; ++ci) {
      const Chunk& ch = chunks[ci];
      gen_normals(key_at(keys, key_offset + ch.index), ch.begin, ch.end, buf);
      partial[ci] = sum_sq(buf, ch.end - ch.begin);
      if (!store.empty()) {
        const at::Tensor& t = store[ch.index];
        if (t.scalar_type() == at::kFloat)
          std::copy(buf, buf + (ch.end - ch.begin), t.mutable_data_ptr<float>() + ch.begin);
        else  // float64: holds the float32 normals exactly
          std::copy(buf, buf + (ch.end - ch.begin), t.mutable_data_ptr<double>() + ch.begin);
      }
    }
  });
  std::vector<double> total(sizes.size(), 0.0);
  for (size_t c = 0; c < chunks.size(); ++c) total[chunks[c].index] += partial[c];
  return total;
}

// The unit-norm scale of the stream (step 4): rounded to float32 for every dtype, so that summing n^2 in
// another order (last-bit differences in sq) does not change it.
double inv_norm(double sq) { return static_cast<float>(1.0 / (std::sqrt(sq) + 1e-12)); }

std::vector<at::Tensor> random_directions_cpu(at::TensorList like, const at::Tensor& keys) {
  TORCH_CHECK(keys.numel() == static_cast<int64_t>(like.size()), "random_directions: one key per tensor");
  std::vector<at::Tensor> out;
  for (const auto& t : like)
    out.push_back(at::empty(t.sizes(), t.options().dtype(acc_dtype(t.scalar_type()))));
  const auto sizes = numels(like);
  const auto sq = stream_sq_norms(sizes, keys, 0, out);  // the normals land in `out`; scale them in place
  const auto chunks = make_chunks(sizes, int64_t{1} << 15);
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t b0, int64_t b1) {
    for (int64_t ci = b0; ci < b1; ++ci) {
      const Chunk& ch = chunks[ci];
      const double inv = inv_norm(sq[ch.index]);
      if (out[ch.index].scalar_type() == at::kFloat) {
        float* p = out[ch.index].mutable_data_ptr<float>();
        const float s = static_cast<float>(inv);
        for (int64_t j = ch.begin; j < ch.end; ++j) p[j] = p[j] * s;
      } else {
        double* p = out[ch.index].mutable_data_ptr<double>();
        for (int64_t j = ch.begin; j < ch.end; ++j) p[j] = p[j] * inv;
      }
    }
  });
  return out;
}

at::Tensor shard_normals_cpu(at::TensorList out, const at::Tensor& keys, at::IntArrayRef offsets) {
  TORCH_CHECK(keys.numel() == static_cast<int64_t>(out.size()) && offsets.size() == out.size(),
              "shard_normals: one key and one offset per output");
  for (const auto& o : out)
    TORCH_CHECK(o.scalar_type() == at::kFloat && o.is_contiguous(), "shard_normals: outputs must be contiguous float32");
  const auto sizes = numels(out);
  const auto chunks = make_chunks(sizes, kBlock);
  std::vector<double> partial(chunks.size(), 0.0);
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t b0, int64_t b1) {
    for (int64_t ci = b0; ci < b1; ++ci) {
      const Chunk& ch = chunks[ci];
      float* n = out[ch.index].mutable_data_ptr<float>() + ch.begin;
      const int64_t off = offsets[ch.index];
      gen_normals_from(key_at(keys, ch.index), off + ch.begin, off + ch.end, n);
      partial[ci] = sum_sq(n, ch.end - ch.begin);
    }
  });
  at::Tensor sums = at::zeros({static_cast<int64_t>(out.size())}, at::TensorOptions().dtype(at::kDouble));
  double* S = sums.mutable_data_ptr<double>();
  for (size_t c = 0; c < chunks.size(); ++c) S[chunks[c].index] += partial[c];
  return sums;
}

// out = theta + sigma * d, with d = n * scale in the math dtype (float32; float64 for float64).
void perturb_cpu(at::TensorList params, const at::Tensor& keys, double sigma, at::TensorList out) {
  TORCH_CHECK(keys.numel() == static_cast<int64_t>(params.size()) && out.size() == params.size(),
              "perturb: one key and one output per parameter");
  const auto sizes = numels(params);
  // float32/float64 outputs hold the normals between the two passes, so the stream is generated once;
  // fp16/bf16 outputs cannot hold them exactly and the second pass generates them again.
  bool all_exact = true;
  for (const auto& o : out) all_exact = all_exact && (o.scalar_type() == at::kFloat || o.scalar_type() == at::kDouble);
  const auto sq = stream_sq_norms(sizes, keys, 0, all_exact ? out : at::TensorList());
  const auto chunks = make_chunks(sizes, kBlock);
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t b0, int64_t b1) {
    float buf[kBlock];
    for (int64_t ci = b0; ci < b1; ++ci) {
      const Chunk& ch = chunks[ci];
      const int64_t i = ch.index;
      const double inv = inv_norm(sq[i]);
      STABKERNELS_DISPATCH_FLOAT(params[i], "perturb_cpu", [&] {
        using T = scalar_t;
        using A = acc_t<T>;
        const T* th = params[i].const_data_ptr<T>();
        T* o = out[i].mutable_data_ptr<T>();
        if (!all_exact) gen_normals(key_at(keys, i), ch.begin, ch.end, buf);
        const A s = static_cast<A>(inv), sg = static_cast<A>(sigma);
        for (int64_t j = ch.begin; j < ch.end; ++j) {
          const A n = all_exact ? static_cast<A>(o[j]) : static_cast<A>(buf[j - ch.begin]);
          const A d = n * s;
          o[j] = static_cast<T>(static_cast<A>(th[j]) + sg * d);
        }
      });
    }
  });
}

// sgn += g . n and snn += n . n over a block (SIMD for float32/fp16/bf16 gradients, float64 scalar).
template <typename T>
void dots_block(const T* g, const float* n, int64_t len, double& sgn, double& snn) {
  if constexpr (std::is_same_v<acc_t<T>, float>) {
    using V = Vectorized<float>;
    constexpr int64_t L = V::size();
    V agn(0.f), ann(0.f);
    int64_t j = 0;
    for (; j + L <= len; j += L) {
      const V nv = V::loadu(n + j);
      agn = at::vec::fmadd(load_acc(g + j), nv, agn);
      ann = at::vec::fmadd(nv, nv, ann);
    }
    sgn += lane_sum(agn);
    snn += lane_sum(ann);
    for (; j < len; ++j) sgn += static_cast<double>(g[j]) * n[j], snn += static_cast<double>(n[j]) * n[j];
  } else {
    for (int64_t j = 0; j < len; ++j) sgn += static_cast<double>(g[j]) * n[j], snn += static_cast<double>(n[j]) * n[j];
  }
}

// out[k] = sum_t (g_t . n_{t,k}) / (|n_{t,k}| + 1e-12): K directional derivatives in one read of the grads.
at::Tensor directional_dots_cpu(at::TensorList grads, const at::Tensor& keys) {
  TORCH_CHECK(keys.dim() == 2 && keys.size(1) == static_cast<int64_t>(grads.size()),
              "directional_dots: keys must be (K, number of tensors)");
  const int64_t K = keys.size(0), T = static_cast<int64_t>(grads.size());
  std::vector<at::Tensor> flat;
  for (const auto& g : grads) flat.push_back(g.contiguous());
  const auto chunks = make_chunks(numels(grads), kBlock);
  std::vector<double> gn(chunks.size() * K, 0.0), nn(chunks.size() * K, 0.0);
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t b0, int64_t b1) {
    float buf[kBlock];
    for (int64_t ci = b0; ci < b1; ++ci) {
      const Chunk& ch = chunks[ci];
      const int64_t len = ch.end - ch.begin;
      STABKERNELS_DISPATCH_FLOAT(flat[ch.index], "directional_dots_cpu", [&] {
        const scalar_t* g = flat[ch.index].const_data_ptr<scalar_t>() + ch.begin;
        for (int64_t k = 0; k < K; ++k) {  // the chunk of g stays in L1 while K probes are generated
          gen_normals(key_at(keys, k * T + ch.index), ch.begin, ch.end, buf);
          double sgn = 0, snn = 0;
          dots_block(g, buf, len, sgn, snn);
          gn[ci * K + k] = sgn;
          nn[ci * K + k] = snn;
        }
      });
    }
  });
  std::vector<double> G(K * T, 0.0), S(K * T, 0.0);
  for (size_t c = 0; c < chunks.size(); ++c)
    for (int64_t k = 0; k < K; ++k) {
      G[k * T + chunks[c].index] += gn[c * K + k];
      S[k * T + chunks[c].index] += nn[c * K + k];
    }
  at::Tensor out = at::zeros({K}, at::TensorOptions().dtype(at::kDouble));
  double* o = out.mutable_data_ptr<double>();
  for (int64_t k = 0; k < K; ++k)
    for (int64_t t = 0; t < T; ++t) o[k] += G[k * T + t] * inv_norm(S[k * T + t]);
  return out.to(grouped_acc_dtype(grads));
}

// grad <- (g - c w) * |g| / (|g - c w| + 1e-30), c = (w . g) / (w . w + 1e-30), per tensor. One pass sums
// w.g, w.w, g.g (float64); |g - c w|^2 = g.g - 2 c w.g + c^2 w.w follows from them; a second pass writes,
// also in float64. Both cancel when g is nearly parallel to w, which float32 arithmetic would turn to noise.
void orthograd_cpu(at::TensorList params, at::TensorList grads) {
  TORCH_CHECK(params.size() == grads.size(), "orthograd_: params and grads differ in length");
  const int64_t T = static_cast<int64_t>(params.size());
  const auto chunks = make_chunks(numels(params), int64_t{1} << 15);
  std::vector<double> part(chunks.size() * 3, 0.0);
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t b0, int64_t b1) {
    for (int64_t ci = b0; ci < b1; ++ci) {
      const Chunk& ch = chunks[ci];
      STABKERNELS_DISPATCH_FLOAT(params[ch.index], "orthograd_sums", [&] {
        // float64 accumulation throughout: |g_perp|^2 = g.g - 2c w.g + c^2 w.w cancels when g is nearly
        // parallel to w, and float32 partial sums would leave only noise. kLanes partial sums each, as in
        // sum_sq (four scalar accumulators ran at half torch.compile's speed).
        const scalar_t* w = params[ch.index].const_data_ptr<scalar_t>();
        const scalar_t* g = grads[ch.index].const_data_ptr<scalar_t>();
        double wg[kLanes] = {}, ww[kLanes] = {}, gg[kLanes] = {};
        int64_t j = ch.begin;
        for (; j + kLanes <= ch.end; j += kLanes)
          for (int l = 0; l < kLanes; ++l) {
            const double a = static_cast<double>(w[j + l]), b = static_cast<double>(g[j + l]);
            wg[l] += a * b, ww[l] += a * a, gg[l] += b * b;
          }
        for (int l = 0; j < ch.end; ++j, ++l) {
          const double a = static_cast<double>(w[j]), b = static_cast<double>(g[j]);
          wg[l] += a * b, ww[l] += a * a, gg[l] += b * b;
        }
        part[ci * 3] = lanes_total(wg);
        part[ci * 3 + 1] = lanes_total(ww);
        part[ci * 3 + 2] = lanes_total(gg);
      });
    }
  });
  std::vector<double> wg(T, 0.0), ww(T, 0.0), gg(T, 0.0), c(T), scale(T);
  for (size_t ci = 0; ci < chunks.size(); ++ci) {
    wg[chunks[ci].index] += part[ci * 3];
    ww[chunks[ci].index] += part[ci * 3 + 1];
    gg[chunks[ci].index] += part[ci * 3 + 2];
  }
  for (int64_t t = 0; t < T; ++t) {
    c[t] = wg[t] / (ww[t] + 1e-30);
    const double perp2 = std::max(0.0, gg[t] - 2 * c[t] * wg[t] + c[t] * c[t] * ww[t]);
    scale[t] = std::sqrt(gg[t]) / (std::sqrt(perp2) + 1e-30);
  }
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t b0, int64_t b1) {
    for (int64_t ci = b0; ci < b1; ++ci) {
      const Chunk& ch = chunks[ci];
      const int64_t t = ch.index;
      STABKERNELS_DISPATCH_FLOAT(params[t], "orthograd_write", [&] {
        // float64: g - c w cancels when g is nearly parallel to w (exact in float64 for float32 inputs)
        const scalar_t* w = params[t].const_data_ptr<scalar_t>();
        scalar_t* g = grads[t].mutable_data_ptr<scalar_t>();
        const double cc = c[t], s = scale[t];
        for (int64_t j = ch.begin; j < ch.end; ++j)
          g[j] = static_cast<scalar_t>((static_cast<double>(g[j]) - cc * static_cast<double>(w[j])) * s);
      });
    }
  });
}

}  // namespace

void fill_directional(CpuKernels& k) {
  k.random_directions = &random_directions_cpu;
  k.perturb = &perturb_cpu;
  k.directional_dots = &directional_dots_cpu;
  k.orthograd_ = &orthograd_cpu;
  k.shard_normals = &shard_normals_cpu;
}

}  // namespace stabkernels::cpu
