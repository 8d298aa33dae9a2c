// Directional family on CPU (SPEC 3.3, 4): random directions generated inside the kernel from the Philox
// stream of csrc/philox.h, never stored; perturbation theta + sigma d into scratch tensors; K directional
// derivatives g . d_k in one read of g; the OrthoGrad projection.
//
// Generation: Philox for 8 counters at a time in AVX-512 integer vectors (scalar elsewhere), then Box-Muller on whole vectors with Sleef's float64 log and sincos (the 3.5-ulp variants:
// 1.6x faster than the 1-ulp ones, and a float64 error of a few ulps changes the float32 normal only when
// it straddles a rounding boundary, about once in 10^8 elements), so normals agree bit for bit with the
// torch reference in practice.
#include <torch/library.h>

#include <cmath>
#include <cstring>

#include "../philox.h"
#include "common.h"

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#include <sleef.h>
#endif

namespace stabkernels::cpu {
namespace {

#if defined(CPU_CAPABILITY_AVX512)
constexpr int kLanes = 8;
inline void box_muller(const double* u0, const double* u1, double* n_cos, double* n_sin) {
  const __m512d r = _mm512_sqrt_pd(_mm512_mul_pd(_mm512_set1_pd(-2.0), Sleef_logd8_u35(_mm512_loadu_pd(u0))));
  const Sleef___m512d_2 sc = Sleef_sincosd8_u35(_mm512_mul_pd(_mm512_set1_pd(kTwoPi), _mm512_loadu_pd(u1)));
  _mm512_storeu_pd(n_cos, _mm512_mul_pd(r, sc.y));
  _mm512_storeu_pd(n_sin, _mm512_mul_pd(r, sc.x));
}
#elif defined(CPU_CAPABILITY_AVX2)
constexpr int kLanes = 4;
inline void box_muller(const double* u0, const double* u1, double* n_cos, double* n_sin) {
  const __m256d r = _mm256_sqrt_pd(_mm256_mul_pd(_mm256_set1_pd(-2.0), Sleef_logd4_u35(_mm256_loadu_pd(u0))));
  const Sleef___m256d_2 sc = Sleef_sincosd4_u35(_mm256_mul_pd(_mm256_set1_pd(kTwoPi), _mm256_loadu_pd(u1)));
  _mm256_storeu_pd(n_cos, _mm256_mul_pd(r, sc.y));
  _mm256_storeu_pd(n_sin, _mm256_mul_pd(r, sc.x));
}
#else
constexpr int kLanes = 4;
inline void box_muller(const double* u0, const double* u1, double* n_cos, double* n_sin) {
  for (int l = 0; l < kLanes; ++l) {
    const double r = std::sqrt(-2.0 * std::log(u0[l])), t = kTwoPi * u1[l];
    n_cos[l] = r * std::cos(t);
    n_sin[l] = r * std::sin(t);
  }
}
#endif

// Elements per generation block: a multiple of 4 * kLanes, small enough to stay in L1.
constexpr int64_t kBlock = 2048;

#if defined(CPU_CAPABILITY_AVX512)
// Philox and the uniforms for kLanes = 8 counters, each 32-bit word in a 64-bit lane (vpmuludq gives the
// full product; hi/lo are a shift and a mask).
inline void philox_uniforms(uint32_t k0, uint32_t k1, int64_t c, double* u0, double* u1, double* u2, double* u3) {
  const __m512i lo32 = _mm512_set1_epi64(0xFFFFFFFFLL);
  const __m512i ctr = _mm512_add_epi64(_mm512_set1_epi64(c), _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7));
  __m512i s0 = _mm512_and_si512(ctr, lo32), s1 = _mm512_srli_epi64(ctr, 32);
  __m512i s2 = _mm512_setzero_si512(), s3 = _mm512_setzero_si512();
  const __m512i ma = _mm512_set1_epi64(kPhiloxRoundA), mb = _mm512_set1_epi64(kPhiloxRoundB);
  uint32_t ka = k0, kb = k1;
  for (int r = 0; r < 10; ++r) {
    const __m512i pa = _mm512_mul_epu32(ma, s0), pb = _mm512_mul_epu32(mb, s2);
    const __m512i n0 = _mm512_xor_si512(_mm512_xor_si512(_mm512_srli_epi64(pb, 32), s1), _mm512_set1_epi64(ka));
    const __m512i n2 = _mm512_xor_si512(_mm512_xor_si512(_mm512_srli_epi64(pa, 32), s3), _mm512_set1_epi64(kb));
    s1 = _mm512_and_si512(pb, lo32);
    s3 = _mm512_and_si512(pa, lo32);
    s0 = n0;
    s2 = n2;
    ka += kPhiloxKeyA;
    kb += kPhiloxKeyB;
  }
  const __m512d half = _mm512_set1_pd(0.5), scale = _mm512_set1_pd(kTwoPowMinus32);
  _mm512_storeu_pd(u0, _mm512_mul_pd(_mm512_add_pd(_mm512_cvtepu64_pd(s0), half), scale));
  _mm512_storeu_pd(u1, _mm512_mul_pd(_mm512_add_pd(_mm512_cvtepu64_pd(s1), half), scale));
  _mm512_storeu_pd(u2, _mm512_mul_pd(_mm512_add_pd(_mm512_cvtepu64_pd(s2), half), scale));
  _mm512_storeu_pd(u3, _mm512_mul_pd(_mm512_add_pd(_mm512_cvtepu64_pd(s3), half), scale));
}
#else
inline void philox_uniforms(uint32_t k0, uint32_t k1, int64_t c, double* u0, double* u1, double* u2, double* u3) {
  for (int l = 0; l < kLanes; ++l) {
    uint32_t w[4];
    philox4x32_10(k0, k1, static_cast<uint64_t>(c + l), w);
    u0[l] = philox_uniform(w[0]), u1[l] = philox_uniform(w[1]);
    u2[l] = philox_uniform(w[2]), u3[l] = philox_uniform(w[3]);
  }
}
#endif

#if defined(CPU_CAPABILITY_AVX512)
inline void interleave(const double (&n)[4][kLanes], float* out) {
  const __m256 a0 = _mm512_cvtpd_ps(_mm512_loadu_pd(n[0])), a1 = _mm512_cvtpd_ps(_mm512_loadu_pd(n[1]));
  const __m256 a2 = _mm512_cvtpd_ps(_mm512_loadu_pd(n[2])), a3 = _mm512_cvtpd_ps(_mm512_loadu_pd(n[3]));
  const __m256 t0 = _mm256_unpacklo_ps(a0, a1), t1 = _mm256_unpackhi_ps(a0, a1);
  const __m256 t2 = _mm256_unpacklo_ps(a2, a3), t3 = _mm256_unpackhi_ps(a2, a3);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  _mm256_store_ps(out, _mm256_permute2f128_ps(u0, u1, 0x20));
  _mm256_store_ps(out + 8, _mm256_permute2f128_ps(u2, u3, 0x20));
  _mm256_store_ps(out + 16, _mm256_permute2f128_ps(u0, u1, 0x31));
  _mm256_store_ps(out + 24, _mm256_permute2f128_ps(u2, u3, 0x31));
}
#else
inline void interleave(const double (&n)[4][kLanes], float* out) {
  for (int l = 0; l < kLanes; ++l)
    for (int j = 0; j < 4; ++j) out[4 * l + j] = static_cast<float>(n[j][l]);
}
#endif

// n[0 .. end - begin) = the stream's normals of elements [begin, end) for `key`; begin % 4 == 0.
void gen_normals(uint64_t key, int64_t begin, int64_t end, float* n) {
  const uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
  for (int64_t c = begin / 4; 4 * c < end; c += kLanes) {
    double u0[kLanes], u1[kLanes], u2[kLanes], u3[kLanes], n_[4][kLanes];
    philox_uniforms(k0, k1, c, u0, u1, u2, u3);
    box_muller(u0, u1, n_[0], n_[1]);
    box_muller(u2, u3, n_[2], n_[3]);
    // Element 4(c + l) + j is n_[j][l]: round to float32 and interleave (a 4 x 8 transpose); only the last
    // batch of a range is cut short.
    alignas(64) float tmp[4 * kLanes];
    interleave(n_, tmp);
    const int64_t e0 = 4 * c;
    std::memcpy(n + (e0 - begin), tmp, sizeof(float) * std::min<int64_t>(4 * kLanes, end - e0));
  }
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
      double s = 0;
      for (int64_t j = 0; j < ch.end - ch.begin; ++j) s += static_cast<double>(buf[j]) * buf[j];
      partial[ci] = s;
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
        // parallel to w, and float32 partial sums would leave only noise. Four independent accumulators per
        // sum keep the adds from serialising.
        const scalar_t* w = params[ch.index].const_data_ptr<scalar_t>();
        const scalar_t* g = grads[ch.index].const_data_ptr<scalar_t>();
        double wg[4] = {0, 0, 0, 0}, ww[4] = {0, 0, 0, 0}, gg[4] = {0, 0, 0, 0};
        int64_t j = ch.begin;
        for (; j + 4 <= ch.end; j += 4)
          for (int l = 0; l < 4; ++l) {
            const double a = static_cast<double>(w[j + l]), b = static_cast<double>(g[j + l]);
            wg[l] += a * b, ww[l] += a * a, gg[l] += b * b;
          }
        for (; j < ch.end; ++j) {
          const double a = static_cast<double>(w[j]), b = static_cast<double>(g[j]);
          wg[0] += a * b, ww[0] += a * a, gg[0] += b * b;
        }
        part[ci * 3] = (wg[0] + wg[1]) + (wg[2] + wg[3]);
        part[ci * 3 + 1] = (ww[0] + ww[1]) + (ww[2] + ww[3]);
        part[ci * 3 + 2] = (gg[0] + gg[1]) + (gg[2] + gg[3]);
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

TORCH_LIBRARY_IMPL(stabkernels_C, CPU, m) {
  m.impl("random_directions", &random_directions_cpu);
  m.impl("perturb", &perturb_cpu);
  m.impl("directional_dots", &directional_dots_cpu);
  m.impl("orthograd_", &orthograd_cpu);
}

}  // namespace stabkernels::cpu
