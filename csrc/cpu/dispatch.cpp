// Runtime ISA dispatch of the CPU kernels, the way ATen's CPU_CAPABILITY dispatch works: the kernels are
// compiled once per level (csrc/cpu/isa/), and at import the best level this CPU supports registers its
// kernels, or a lower one forced by STABKERNELS_CPU_ISA=DEFAULT|AVX2|AVX512. This file is compiled with
// the baseline flags only, and so is every function a lower level could reach.
#include <torch/library.h>

#include <cstdlib>
#include <cstring>

#include "dispatch.h"
#include "kernels.h"

namespace stabkernels::cpu {

namespace {

const char* const kNames[] = {"DEFAULT", "AVX2", "AVX512"};

// The best level the CPU supports, with every extension the level's flags enable (setup.py: ISA_SOURCES).
// The compiler runtime's detection also checks that the OS saves the vector registers (XGETBV).
Isa supported_isa() {
#if STABKERNELS_X86 && defined(__GNUC__)
  __builtin_cpu_init();  // we run from a static initialiser, possibly before the runtime's own
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return Isa::AVX512;
  if (avx2) return Isa::AVX2;
#endif
  return Isa::DEFAULT;
}

// STABKERNELS_CPU_ISA, if set to a level name (any case); otherwise the best supported. stabkernels/_ext.py
// checks the variable before importing _C and warns about values this falls back from.
Isa chosen_isa() {
  const Isa best = supported_isa();
  const char* env = std::getenv("STABKERNELS_CPU_ISA");
  if (env == nullptr || *env == '\0') return best;
  for (int i = 0; i < 3; ++i)
    if (strcasecmp(env, kNames[i]) == 0) return static_cast<int>(best) < i ? best : static_cast<Isa>(i);
  return best;
}

}  // namespace

Isa active_isa() {
  static const Isa isa = chosen_isa();
  return isa;
}

const char* isa_name(Isa isa) { return kNames[static_cast<int>(isa)]; }

Isa best_supported_isa() { return supported_isa(); }

namespace {

const CpuKernels& kernels(Isa isa) {
  switch (isa) {
#if STABKERNELS_X86
    case Isa::AVX512:
      return *stabkernels_cpu_kernels_AVX512();
    case Isa::AVX2:
      return *stabkernels_cpu_kernels_AVX2();
#endif
    default:
      return *stabkernels_cpu_kernels_DEFAULT();
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(stabkernels_C, CPU, m) {
  const CpuKernels& k = kernels(active_isa());
#define STABKERNELS_REGISTER(op)                                                           \
  TORCH_CHECK(k.op != nullptr, "stabkernels: no CPU kernel for " #op " at ", isa_name(active_isa())); \
  m.impl(#op, k.op);
  STABKERNELS_CPU_OPS(STABKERNELS_REGISTER)
#undef STABKERNELS_REGISTER
}

}  // namespace stabkernels::cpu
