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

// Word i (0..3) of a 16-byte load; i is a compile-time constant after unrolling.
__device__ __forceinline__ unsigned word_of(const uint4& v, int i) {
    return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// The bits of a 32-bit value as another 32-bit type, and back (a union: CUDA and GCC both
// define this type pun).
template <typename To, typename From>
__device__ __forceinline__ To bit_cast32(From v) {
    static_assert(sizeof(To) == 4 && sizeof(From) == 4, "32-bit types only");
    union { From from; To to; } u;
    u.from = v;
    return u.to;
}
template <typename T2> __device__ __forceinline__ T2 bits_as(unsigned v) { return bit_cast32<T2>(v); }
template <typename T2> __device__ __forceinline__ unsigned as_bits(T2 v) { return bit_cast32<unsigned>(v); }

// Two T in one 32-bit register (low half first), and the exact "magic number" conversion of
// small integers: the bits MAGIC_BITS | v in each half read as MAGIC_VALUE + v, exactly
// for v < 2^10 in fp16 (1024 + v) and v < 2^7 in bf16 (128 + v).
template <typename T> struct Pair;
template <> struct Pair<__half> {
    using type = __half2;
    static constexpr bool IS_HALF = true;
    static constexpr unsigned MAGIC_BITS = 0x64006400u;
    static constexpr float MAGIC_VALUE = 1024.f;
    static __device__ __forceinline__ type splat(__half v) { return __half2half2(v); }
    static __device__ __forceinline__ type make(__half lo, __half hi) { return __halves2half2(lo, hi); }
    static __device__ __forceinline__ __half low(type v) { return __low2half(v); }
    static __device__ __forceinline__ __half high(type v) { return __high2half(v); }
    static __device__ __forceinline__ type sub(type a, type b) { return __hsub2(a, b); }
    static __device__ __forceinline__ type mul(type a, type b) { return __hmul2(a, b); }
};
template <> struct Pair<__nv_bfloat16> {
    using type = __nv_bfloat162;
    static constexpr bool IS_HALF = false;
    static constexpr unsigned MAGIC_BITS = 0x43004300u;
    static constexpr float MAGIC_VALUE = 128.f;
    static __device__ __forceinline__ type splat(__nv_bfloat16 v) { return __bfloat162bfloat162(v); }
    static __device__ __forceinline__ type make(__nv_bfloat16 lo, __nv_bfloat16 hi) { return __halves2bfloat162(lo, hi); }
    static __device__ __forceinline__ __nv_bfloat16 low(type v) { return __low2bfloat16(v); }
    static __device__ __forceinline__ __nv_bfloat16 high(type v) { return __high2bfloat16(v); }
    static __device__ __forceinline__ type sub(type a, type b) { return __hsub2(a, b); }
    static __device__ __forceinline__ type mul(type a, type b) { return __hmul2(a, b); }
};

// Split-K arrival, called by every thread of a block once its partial sums are written and
// fenced: true in the last of the `splits` blocks that share `ticket` (which it resets for
// the next launch), after a fence that makes the other blocks' sums visible; false in the
// others. `last` is the kernel's __shared__ flag.
__device__ __forceinline__ bool last_split_arrived(int* ticket, int splits, int& last) {
    __syncthreads();
    if (threadIdx.x == 0) {
        last = atomicAdd(ticket, 1) == splits - 1;
        if (last) *ticket = 0;  // ready for the next launch
    }
    __syncthreads();
    if (!last) return false;
    __threadfence();
    return true;
}

}  // namespace qk
