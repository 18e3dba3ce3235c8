// Local header of the compile-check samples: dtype conversion and 4-bit unpacking.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda/std/cstdint>

namespace sample {

__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}

// The i-th signed 4-bit value (offset 8) of a packed word.
__device__ __forceinline__ float nibble(cuda::std::uint32_t packed, int i) {
    return static_cast<float>(static_cast<int>((packed >> (4 * i)) & 0xFu) - 8);
}

}  // namespace sample
