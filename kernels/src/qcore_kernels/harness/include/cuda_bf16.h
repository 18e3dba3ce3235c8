// CPU harness stand-in for <cuda_bf16.h>: everything it provides is in qk_cpu_shim.h.
#pragma once
#include "../qk_cpu_shim.h"
