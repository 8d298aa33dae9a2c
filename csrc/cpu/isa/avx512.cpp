// The CPU kernels for AVX-512 (F, BW, VL, DQ with FMA and F16C), compiled with ATen's AVX512 flags
// (setup.py: ISA_FLAGS) and only on x86-64; see avx2.cpp for how its code stays apart from the baseline's.
#if defined(__x86_64__) || defined(_M_X64)
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "kernels.h"
#endif
