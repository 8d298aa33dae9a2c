// The CPU kernels for AVX2 (with FMA and F16C), compiled with ATen's AVX2 flags (setup.py: ISA_FLAGS) and
// only on x86-64. Its code is in namespace stabkernels::cpu::AVX2 and at::vec::AVX2, and setup.py
// (_localize) makes the header code it instantiates private to it: only its kernel table is exported.
#if defined(__x86_64__) || defined(_M_X64)
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "kernels.h"
#endif
