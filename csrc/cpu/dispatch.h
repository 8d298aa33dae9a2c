// The ISA level of the CPU kernels in use (csrc/cpu/dispatch.cpp).
#pragma once

#if defined(__x86_64__) || defined(_M_X64)
#define STABKERNELS_X86 1
#else
#define STABKERNELS_X86 0
#endif

namespace stabkernels::cpu {

enum class Isa { DEFAULT = 0, AVX2 = 1, AVX512 = 2 };

// The level whose kernels are registered: the best supported, or the lower one STABKERNELS_CPU_ISA asks for.
Isa active_isa();
// The best level this CPU supports.
Isa best_supported_isa();
const char* isa_name(Isa isa);

}  // namespace stabkernels::cpu
