// Directional family on CPU (SPEC 3.3, 4): random directions generated inside the kernel from the Philox
// stream of csrc/philox.h, never stored; perturbation theta + sigma d into scratch tensors; K directional
// derivatives g . d_k in one read of g; the OrthoGrad projection.
//
// Generation: at AVX2 and AVX512 the SIMD stream of stream_simd.h, at DEFAULT the scalar definition itself.
// All use only correctly rounded operations in the definition's order (and the build passes
// -ffp-contract=off), so they agree bit for bit with each other and with the torch reference on every level.

#include <array>
#include <cstring>

#include "../philox.h"
#include "common.h"
#include "../list_checks.h"
#include "../orthograd.h"

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include "stream_simd.h"
#endif

namespace stabkernels::cpu::CPU_CAPABILITY {
namespace {

// Elements per generation block: a multiple of 32, small enough to stay in L1.
constexpr int64_t kBlock = 2048;

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
using stream::gen_normals;
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

// The unit-norm scale of the stream (step 4, csrc/philox.h): rounded to float32 for every dtype, so that
// summing n^2 in another order (last-bit differences in sq) does not change it.
double inv_norm(double sq) { return stream_unit_scale(sq); }

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
    constexpr int U = 4;  // independent accumulators: one fmadd chain would take a tenth of the stream's time
    V agn[U], ann[U];
    for (int u = 0; u < U; ++u) agn[u] = ann[u] = V(0.f);
    int64_t j = 0;
    for (; j + U * L <= len; j += U * L)
      for (int u = 0; u < U; ++u) {
        const V nv = V::loadu(n + j + u * L);
        agn[u] = at::vec::fmadd(load_acc(g + j + u * L), nv, agn[u]);
        ann[u] = at::vec::fmadd(nv, nv, ann[u]);
      }
    for (; j + L <= len; j += L) {
      const V nv = V::loadu(n + j);
      agn[0] = at::vec::fmadd(load_acc(g + j), nv, agn[0]);
      ann[0] = at::vec::fmadd(nv, nv, ann[0]);
    }
    sgn += lane_sum((agn[0] + agn[1]) + (agn[2] + agn[3]));
    snn += lane_sum((ann[0] + ann[1]) + (ann[2] + ann[3]));
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

// (w.g, w.w, g.g) over n elements in float64, over kLanes interleaved partial sums as in sum_sq, in explicit
// float64 vectors: the compiler left the three-accumulator loop scalar (half torch.compile's speed). Blocks
// are widened to float64 in L1 first; products and sums are separate roundings (no FMA), so every level
// adds the same numbers in the same order.
template <typename T>
std::array<double, 3> wg_ww_gg(const T* w, const T* g, int64_t n) {
  using VD = Vectorized<double>;
  constexpr int kV = kLanes / VD::size();  // vectors per set of kLanes partial sums
  static_assert(kLanes % VD::size() == 0);
  constexpr int64_t kWiden = 256;
  VD wg[kV], ww[kV], gg[kV];
  for (int v = 0; v < kV; ++v) wg[v] = ww[v] = gg[v] = VD(0.0);
  alignas(64) double wd[kWiden], gd[kWiden];
  int64_t j = 0;
  for (; j + kLanes <= n; j += kWiden) {
    const int64_t len = std::min<int64_t>(kWiden, (n - j) / kLanes * kLanes);
    for (int64_t i = 0; i < len; ++i) wd[i] = static_cast<double>(w[j + i]), gd[i] = static_cast<double>(g[j + i]);
    for (int64_t i = 0; i < len; i += kLanes)
      for (int v = 0; v < kV; ++v) {
        const VD a = VD::loadu(wd + i + v * VD::size()), b = VD::loadu(gd + i + v * VD::size());
        wg[v] = wg[v] + a * b;
        ww[v] = ww[v] + a * a;
        gg[v] = gg[v] + b * b;
      }
    if (len < kWiden) {
      j += len;
      break;
    }
  }
  double lw[kLanes], lww[kLanes], lgg[kLanes];
  for (int v = 0; v < kV; ++v) {
    wg[v].store(lw + v * VD::size());
    ww[v].store(lww + v * VD::size());
    gg[v].store(lgg + v * VD::size());
  }
  for (int l = 0; j < n; ++j, ++l) {
    const double a = static_cast<double>(w[j]), b = static_cast<double>(g[j]);
    lw[l] += a * b, lww[l] += a * a, lgg[l] += b * b;
  }
  return {lanes_total(lw), lanes_total(lww), lanes_total(lgg)};
}

// grad <- (g - c w) * |g| / (|g - c w| + 1e-30), c = (w . g) / (w . w + 1e-30), per tensor (orthograd.h). One pass sums
// w.g, w.w, g.g (float64); |g - c w|^2 = g.g - 2 c w.g + c^2 w.w follows from them; a second pass writes,
// also in float64. Both cancel when g is nearly parallel to w, which float32 arithmetic would turn to noise.
void orthograd_cpu(at::TensorList params, at::TensorList grads) {
  check_update_lists("orthograd_", params, {{"grads", grads}}, at::kCPU);
  const int64_t T = static_cast<int64_t>(params.size());
  const auto chunks = make_chunks(numels(params), int64_t{1} << 15);
  const int64_t C = static_cast<int64_t>(chunks.size());
  std::vector<double> part(C * 3, 0.0);
  at::parallel_for(0, C, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t ci = b0; ci < b1; ++ci) {
      const Chunk& ch = chunks[ci];
      STABKERNELS_DISPATCH_FLOAT(params[ch.index], "orthograd_sums", [&] {
        const scalar_t* w = params[ch.index].const_data_ptr<scalar_t>();
        const scalar_t* g = grads[ch.index].const_data_ptr<scalar_t>();
        const auto sums = wg_ww_gg(w + ch.begin, g + ch.begin, ch.end - ch.begin);
        std::copy(sums.begin(), sums.end(), part.begin() + ci * 3);
      });
    }
  });
  std::vector<double> wg(T, 0.0), ww(T, 0.0), gg(T, 0.0), c(T), scale(T);
  for (int64_t ci = 0; ci < C; ++ci) {
    wg[chunks[ci].index] += part[ci * 3];
    ww[chunks[ci].index] += part[ci * 3 + 1];
    gg[chunks[ci].index] += part[ci * 3 + 2];
  }
  for (int64_t t = 0; t < T; ++t) {
    const auto k = orthograd::coefficients(wg[t], ww[t], gg[t]);
    c[t] = k.coef, scale[t] = k.scale;
  }
  at::parallel_for(0, C, 1, [&](int64_t b0, int64_t b1) {
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
