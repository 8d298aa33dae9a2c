// row_spread on CPU: per-row max - min of an (N, C) tensor in one pass over memory (SPEC 2.1).
// Three layouts, each read once: rows contiguous (SIMD along a row, parallel over rows), columns
// contiguous (SIMD across rows, e.g. a transposed tensor) and arbitrary strides (scalar).

#include <algorithm>
#include <cmath>
#include <cstring>

#include "common.h"

namespace stabkernels::cpu::CPU_CAPABILITY {
namespace {

// The extremes of one contiguous float32/float64 row with plain max/min (one instruction each, blind to NaN) and a running
// sum beside them: the sum is finite only when no element is NaN or infinite, so a finite sum proves the
// plain extremes exact. Returns false otherwise (a NaN, an infinity, or a sum that overflowed), and the
// caller redoes the row with NaN-propagating extremes. At AVX2, NaN-aware max/min cost three instructions
// each and made the loop compute bound below the memory's speed.
template <typename T>
bool plain_row_extremes(const T* row, int64_t C, acc_t<T>& hi_out, acc_t<T>& lo_out) {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  constexpr int64_t W = vec_width<T>();
  constexpr int U = 4;  // vectors per iteration, each with its own accumulators
  V hi[U], lo[U], sum[U];
  for (int u = 0; u < U; ++u)
    hi[u] = V(-std::numeric_limits<A>::infinity()), lo[u] = V(std::numeric_limits<A>::infinity()), sum[u] = V(A(0));
  int64_t j = 0;
  for (; j + U * W <= C; j += U * W) {
    for (int u = 0; u < U; ++u) {
      const V a = load_acc(row + j + u * W);
      hi[u] = at::vec::clamp_min(a, hi[u]), lo[u] = at::vec::clamp_max(a, lo[u]), sum[u] = sum[u] + a;
    }
  }
  for (; j + W <= C; j += W) {
    const V a = load_acc(row + j);
    hi[0] = at::vec::clamp_min(a, hi[0]), lo[0] = at::vec::clamp_max(a, lo[0]), sum[0] = sum[0] + a;
  }
  for (int u = 1; u < U; ++u)
    hi[0] = at::vec::clamp_min(hi[u], hi[0]), lo[0] = at::vec::clamp_max(lo[u], lo[0]), sum[0] = sum[0] + sum[u];
  A h = lane_max(hi[0]), l = lane_min(lo[0]), s = lane_sum(sum[0]);
  for (; j < C; ++j) {
    const A v = static_cast<A>(row[j]);
    h = std::max(h, v), l = std::min(l, v), s += v;
  }
  hi_out = h, lo_out = l;
  return std::isfinite(s);
}

// The extremes of one contiguous float16 / bfloat16 row on its raw 16-bit patterns, twice as many elements per
// instruction as in float32 and no conversion. Both formats are sign-magnitude, so the key b ^ (b < 0 ?
// 0x7FFF : 0) orders the patterns as int16 the way their values are ordered (-0 just below +0), and a
// negative value's key is -1 - (the key of its magnitude). NaN keys lie beyond the infinities' (above +inf's,
// below -inf's), so a row holds a NaN iff its largest key is above +inf's or its smallest below -inf's; it
// returns false then (the caller redoes the row with NaN-propagating extremes), else the exact extremes.
template <typename T>
bool key_row_extremes(const T* row, int64_t C, float& hi_out, float& lo_out) {
  using V = Vectorized<int16_t>;
  constexpr int64_t W = V::size();
  static_assert(sizeof(T) == 2, "16-bit floating types only");
  const auto* bits = reinterpret_cast<const int16_t*>(row);
  const V magnitude(int16_t{0x7FFF}), zero(int16_t{0});
  V hi0(std::numeric_limits<int16_t>::min()), hi1 = hi0, lo0(std::numeric_limits<int16_t>::max()), lo1 = lo0;
  int64_t j = 0;
  for (; j + 2 * W <= C; j += 2 * W) {
    const V a = V::loadu(bits + j), b = V::loadu(bits + j + W);
    const V ka = a ^ ((a < zero) & magnitude), kb = b ^ ((b < zero) & magnitude);
    hi0 = at::vec::maximum(hi0, ka), hi1 = at::vec::maximum(hi1, kb);
    lo0 = at::vec::minimum(lo0, ka), lo1 = at::vec::minimum(lo1, kb);
  }
  int16_t lanes_hi[W], lanes_lo[W];
  at::vec::maximum(hi0, hi1).store(lanes_hi);
  at::vec::minimum(lo0, lo1).store(lanes_lo);
  int16_t hi = *std::max_element(lanes_hi, lanes_hi + W), lo = *std::min_element(lanes_lo, lanes_lo + W);
  for (; j < C; ++j) {
    const int16_t k = bits[j] < 0 ? static_cast<int16_t>(bits[j] ^ 0x7FFF) : bits[j];
    hi = std::max(hi, k), lo = std::min(lo, k);
  }
  const T inf = std::numeric_limits<T>::infinity();
  int16_t inf_key;
  std::memcpy(&inf_key, &inf, sizeof inf_key);
  if (hi > inf_key || lo < -1 - inf_key) return false;
  auto value = [](int16_t k) {  // the key back to its pattern, and the value in float32
    const int16_t b = k < 0 ? static_cast<int16_t>(k ^ 0x7FFF) : k;
    T t;
    std::memcpy(&t, &b, sizeof t);
    return static_cast<float>(t);
  };
  hi_out = value(hi), lo_out = value(lo);
  return true;
}

// The NaN-propagating extremes of one contiguous row (once NaN, always NaN, as torch.amax/amin).
template <typename T>
void exact_row_extremes(const T* row, int64_t C, acc_t<T>& hi_out, acc_t<T>& lo_out) {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  constexpr int64_t W = vec_width<T>();
  V hi0(-std::numeric_limits<A>::infinity()), hi1 = hi0;
  V lo0(std::numeric_limits<A>::infinity()), lo1 = lo0;
  int64_t j = 0;
  for (; j + 2 * W <= C; j += 2 * W) {
    const V a = load_acc(row + j), b = load_acc(row + j + W);
    hi0 = at::vec::maximum(hi0, a), hi1 = at::vec::maximum(hi1, b);
    lo0 = at::vec::minimum(lo0, a), lo1 = at::vec::minimum(lo1, b);
  }
  A hi = lane_max(at::vec::maximum(hi0, hi1)), lo = lane_min(at::vec::minimum(lo0, lo1));
  for (; j < C; ++j) {
    const A v = static_cast<A>(row[j]);
    hi = nan_max(hi, v), lo = nan_min(lo, v);
  }
  hi_out = hi, lo_out = lo;
}

template <typename T>
void spread_rows_contiguous(const T* x, int64_t N, int64_t C, int64_t s0, acc_t<T>* out) {
  using A = acc_t<T>;
  at::parallel_for(0, N, grain_rows(C), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* row = x + i * s0;
      A hi, lo;
      bool exact;
      if constexpr (sizeof(T) == 2) {
        exact = key_row_extremes(row, C, hi, lo);
      } else {
        exact = plain_row_extremes(row, C, hi, lo);
      }
      if (!exact) exact_row_extremes(row, C, hi, lo);
      out[i] = hi - lo;  // NaN if the row held a NaN
    }
  });
}

template <typename T>
void spread_cols_contiguous(const T* x, int64_t N, int64_t C, int64_t s1, acc_t<T>* out) {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  constexpr int64_t W = vec_width<T>();
  constexpr int64_t ROWS = 16 * W;  // rows per block: the running extremes stay in registers/L1
  const int64_t blocks = (N + ROWS - 1) / ROWS;
  at::parallel_for(0, blocks, std::max<int64_t>(1, grain_rows(C) / ROWS), [&](int64_t b0, int64_t b1) {
    A hi[ROWS], lo[ROWS];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * ROWS, rows = std::min(ROWS, N - r0);
      std::fill(hi, hi + rows, -std::numeric_limits<A>::infinity());
      std::fill(lo, lo + rows, std::numeric_limits<A>::infinity());
      for (int64_t j = 0; j < C; ++j) {
        const T* col = x + r0 + j * s1;
        int64_t r = 0;
        for (; r + W <= rows; r += W) {
          V v = load_acc(col + r);
          at::vec::maximum(V::loadu(hi + r), v).store(hi + r);
          at::vec::minimum(V::loadu(lo + r), v).store(lo + r);
        }
        for (; r < rows; ++r) {
          A v = static_cast<A>(col[r]);
          hi[r] = nan_max(hi[r], v);
          lo[r] = nan_min(lo[r], v);
        }
      }
      for (int64_t r = 0; r < rows; ++r) out[r0 + r] = hi[r] - lo[r];
    }
  });
}

template <typename T>
void spread_strided(const T* x, int64_t N, int64_t C, int64_t s0, int64_t s1, acc_t<T>* out) {
  using A = acc_t<T>;
  at::parallel_for(0, N, grain_rows(C), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      A hi = -std::numeric_limits<A>::infinity(), lo = std::numeric_limits<A>::infinity();
      for (int64_t j = 0; j < C; ++j) {
        A v = static_cast<A>(x[i * s0 + j * s1]);
        hi = nan_max(hi, v);
        lo = nan_min(lo, v);
      }
      out[i] = hi - lo;
    }
  });
}

at::Tensor row_spread_cpu(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2, "row_spread: expected a 2-D tensor, got ", x.dim(), "-D");
  TORCH_CHECK(x.layout() == at::kStrided, "row_spread: expected a dense (strided) tensor");
  TORCH_CHECK(x.size(1) > 0, "row_spread: expected at least one column");
  const int64_t N = x.size(0), C = x.size(1), s0 = x.stride(0), s1 = x.stride(1);
  const auto acc = acc_dtype(x.scalar_type());
  at::Tensor out = at::empty({N}, x.options().dtype(acc));
  if (N == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "row_spread_cpu", [&] {
    const auto* px = x.const_data_ptr<scalar_t>();
    auto* po = out.mutable_data_ptr<acc_t<scalar_t>>();
    if (s1 == 1 || C == 1) {
      spread_rows_contiguous(px, N, C, s0, po);
    } else if (s0 == 1 || N == 1) {
      spread_cols_contiguous(px, N, C, s1, po);
    } else {
      spread_strided(px, N, C, s0, s1, po);
    }
  });
  return out;
}

}  // namespace

void fill_row_spread(CpuKernels& k) {
  k.row_spread = &row_spread_cpu;
}

}  // namespace stabkernels::cpu
