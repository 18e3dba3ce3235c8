// Shared helpers of the qcore kernels: dtype conversion and warp reductions.
//
// Every kernel reads its activations as T (__half or __nv_bfloat16), computes in float
// (or int32 for int8 dot products) and writes T. No fast-math: results follow IEEE
// float rounding so that they can be compared with the torch reference.
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>

namespace qk {

constexpr unsigned FULL_MASK = 0xffffffffu;
constexpr int WARP = 32;

__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int offset = WARP / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(FULL_MASK, v, offset);
    return v;
}

__device__ __forceinline__ int warp_sum(int v) {
#pragma unroll
    for (int offset = WARP / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(FULL_MASK, v, offset);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int offset = WARP / 2; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, offset));
    return v;
}

// Eight T values (16 bytes) to float.
template <typename T>
__device__ __forceinline__ void load8(const T* __restrict__ p, float* out) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < 8; ++i) out[i] = to_float(v[i]);
}

}  // namespace qk
