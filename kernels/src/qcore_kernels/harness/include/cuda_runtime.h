// CPU harness stand-in for <cuda_runtime.h>: everything it provides is in qk_cpu_shim.h.
#pragma once
#include "../qk_cpu_shim.h"
