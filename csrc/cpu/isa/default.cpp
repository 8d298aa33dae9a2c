// The CPU kernels for baseline x86-64 (and any other architecture): no target instructions beyond the
// build's own flags.
#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT
#include "kernels.h"
