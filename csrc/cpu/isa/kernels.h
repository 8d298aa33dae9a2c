// Every CPU kernel, for the ISA level its includer chose: csrc/cpu/isa/{default,avx2,avx512}.cpp define
// CPU_CAPABILITY (DEFAULT, AVX2, AVX512, the names ATen uses) and CPU_CAPABILITY_<level> (which selects
// ATen's matching Vectorized<T>), are compiled with that level's flags (setup.py) and include this file.
// Each level's code lands in namespace stabkernels::cpu::<level>; its one exported symbol is the table
// stabkernels_cpu_kernels_<level>() (setup.py makes every other symbol of the AVX2/AVX512 objects local, so
// none of their code can stand in for the baseline's); csrc/cpu/dispatch.cpp registers one level at import.
#include "../attention.cpp"
#include "../directional.cpp"
#include "../losses.cpp"
#include "../row_spread.cpp"
#include "../spectral.cpp"
#include "../tangent_spread.cpp"
#include "../update.cpp"

#define STABKERNELS_CONCAT_(a, b) a##b
#define STABKERNELS_CONCAT(a, b) STABKERNELS_CONCAT_(a, b)

extern "C" const stabkernels::cpu::CpuKernels* STABKERNELS_CONCAT(stabkernels_cpu_kernels_, CPU_CAPABILITY)() {
  using namespace stabkernels::cpu::CPU_CAPABILITY;
  static const CpuKernels table = [] {
    CpuKernels k;
    fill_attention(k);
    fill_directional(k);
    fill_losses(k);
    fill_row_spread(k);
    fill_spectral(k);
    fill_tangent_spread(k);
    fill_update(k);
    return k;
  }();
  return &table;
}
