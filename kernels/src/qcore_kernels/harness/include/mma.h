// CPU harness stand-in for <mma.h>.
#error "<mma.h> (WMMA, tensor cores) cannot run in the CPU harness: guard the include and the tensor-core code with #ifndef QK_CPU_HARNESS and list those instances in KernelSource.tensor_core_instances"
