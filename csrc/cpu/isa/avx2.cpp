// The CPU kernels for AVX2 (with FMA and F16C), compiled with ATen's AVX2 flags (setup.py: ISA_FLAGS) and
// only on x86-64. All of it stays in namespace stabkernels::cpu::AVX2 or at::vec::AVX2, or has internal
// linkage; the header code it shares with the baseline objects is linked from them (they come first).
#if defined(__x86_64__) || defined(_M_X64)
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "kernels.h"
#endif
