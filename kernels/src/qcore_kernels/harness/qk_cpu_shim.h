// CPU shim for CUDA SIMT kernels: the CUDA keywords, built-in variables, types and
// intrinsics that qcore's kernels use, implemented in plain C++20 so that an unchanged .cu
// file compiles with g++ (-include qk_cpu_shim.h -DQK_CPU_HARNESS) and runs on the CPU.
//
// Execution model (see qcore_kernels.harness): every CUDA thread of a block is a real
// thread; the blocks of the grid run one after another, so a static array is per-block
// shared memory. __syncthreads is a barrier over the block, warp intrinsics a barrier over
// the warp's participating lanes with an exchange buffer. Barrier misuse (divergent
// __syncthreads, a thread that returns while others wait for it, threads waiting at
// different barriers) is detected exactly and aborts the launch with a message.
#ifndef QK_CPU_SHIM_H
#define QK_CPU_SHIM_H

#include <math.h>
#include <pthread.h>
#include <sched.h>

#include <atomic>
#include <bit>
#include <chrono>
#include <climits>
#include <cmath>
#include <condition_variable>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <mutex>
#include <source_location>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// ------------------------------------------------------------------------------------------
// Keywords
// ------------------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __constant__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// Blocks run one after another, so one static object is the shared memory of every block.
#define __shared__ static
// Device code compiled by NVRTC always sees __CUDA_ARCH__; take the lowest catalogue arch.
#ifndef __CUDA_ARCH__
#define __CUDA_ARCH__ 800
#endif
// __restrict__ is a g++ keyword; `#pragma unroll` is ignored (-Wno-unknown-pragmas).

// ------------------------------------------------------------------------------------------
// Vector types and launch dimensions
// ------------------------------------------------------------------------------------------
struct __align__(8) int2 { int x, y; };
struct __align__(16) int4 { int x, y, z, w; };
struct __align__(8) uint2 { unsigned x, y; };
struct __align__(16) uint4 { unsigned x, y, z, w; };
struct __align__(8) float2 { float x, y; };
struct __align__(16) float4 { float x, y, z, w; };
struct __align__(4) char4 { signed char x, y, z, w; };
struct __align__(4) uchar4 { unsigned char x, y, z, w; };
struct __align__(4) short2 { short x, y; };
struct uint3 { unsigned x, y, z; };
struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
    constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
    constexpr operator uint3() const { return {x, y, z}; }
};

inline int2 make_int2(int x, int y) { return {x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline char4 make_char4(signed char x, signed char y, signed char z, signed char w) { return {x, y, z, w}; }
inline uchar4 make_uchar4(unsigned char x, unsigned char y, unsigned char z, unsigned char w) {
    return {x, y, z, w};
}
inline short2 make_short2(short x, short y) { return {x, y}; }
inline uint3 make_uint3(unsigned x, unsigned y, unsigned z) { return {x, y, z}; }
inline dim3 make_dim3(unsigned x, unsigned y, unsigned z) { return {x, y, z}; }

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;
constexpr int warpSize = 32;

// ------------------------------------------------------------------------------------------
// __half and __nv_bfloat16: 16-bit storage, arithmetic in float rounded once to 16 bits
// (exact for + - * /: float has more than twice the precision of both formats)
// ------------------------------------------------------------------------------------------
namespace qk_cpu {

// v >> shift rounded to nearest, ties to even (1 <= shift <= 24).
inline uint32_t shift_round_even(uint32_t v, int shift) {
    const uint32_t q = v >> shift, rem = v & ((1u << shift) - 1u), half = 1u << (shift - 1);
    return q + (rem > half || (rem == half && (q & 1u)));
}

inline unsigned short float_to_half_bits(float f) {
    uint32_t x = std::bit_cast<uint32_t>(f);
    const unsigned short sign = (x >> 16) & 0x8000u;
    x &= 0x7fffffffu;
    if (x > 0x7f800000u) return 0x7fffu;             // NaN: the GPU's canonical NaN
    if (x >= 0x477ff000u) return sign | 0x7c00u;     // >= 65520 rounds to infinity
    if (x < 0x38800000u) {                           // below 2^-14: subnormal or zero
        if (x <= 0x33000000u) return sign;           // <= 2^-25 rounds (ties to even) to 0
        const uint32_t mant = (x & 0x7fffffu) | 0x800000u;
        return sign | shift_round_even(mant, 126 - static_cast<int>(x >> 23));  // units of 2^-24
    }
    return sign | shift_round_even(x - 0x38000000u, 13);  // rebias 127 -> 15; carries into exp
}

inline float half_bits_to_float(unsigned short h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu,
                   mant = h & 0x3ffu;
    if (exp == 0x1f) return std::bit_cast<float>(sign | 0x7f800000u | (mant << 13));
    if (exp == 0) return (sign ? -1.f : 1.f) * std::ldexp(static_cast<float>(mant), -24);
    return std::bit_cast<float>(sign | ((exp + 112u) << 23) | (mant << 13));
}

inline unsigned short float_to_bf16_bits(float f) {
    const uint32_t x = std::bit_cast<uint32_t>(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;
    return static_cast<unsigned short>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

inline float bf16_bits_to_float(unsigned short b) {
    return std::bit_cast<float>(static_cast<uint32_t>(b) << 16);
}

}  // namespace qk_cpu

#define QK_CPU_FLOAT16_TYPE(NAME, RAW, ENCODE, DECODE)                                     \
    struct RAW {                                                                           \
        unsigned short x;                                                                  \
    };                                                                                     \
    struct __align__(2) NAME {                                                             \
        unsigned short __x;                                                                \
        NAME() = default;                                                                  \
        constexpr NAME(RAW r) : __x(r.x) {}                                                \
        NAME(float f) : __x(qk_cpu::ENCODE(f)) {}                                          \
        NAME(double f) : NAME(static_cast<float>(f)) {}                                    \
        NAME(int i) : NAME(static_cast<float>(i)) {}                                       \
        NAME(unsigned i) : NAME(static_cast<float>(i)) {}                                  \
        NAME(long long i) : NAME(static_cast<float>(i)) {}                                 \
        NAME(unsigned long long i) : NAME(static_cast<float>(i)) {}                        \
        NAME(short i) : NAME(static_cast<float>(i)) {}                                     \
        NAME(unsigned short i) : NAME(static_cast<float>(i)) {}                            \
        operator float() const { return qk_cpu::DECODE(__x); }                             \
        operator RAW() const { return {__x}; }                                             \
        NAME& operator+=(NAME o) { return *this = NAME(float(*this) + float(o)); }         \
        NAME& operator-=(NAME o) { return *this = NAME(float(*this) - float(o)); }         \
        NAME& operator*=(NAME o) { return *this = NAME(float(*this) * float(o)); }         \
        NAME& operator/=(NAME o) { return *this = NAME(float(*this) / float(o)); }         \
    };                                                                                     \
    inline NAME operator+(NAME a, NAME b) { return NAME(float(a) + float(b)); }            \
    inline NAME operator-(NAME a, NAME b) { return NAME(float(a) - float(b)); }            \
    inline NAME operator*(NAME a, NAME b) { return NAME(float(a) * float(b)); }            \
    inline NAME operator/(NAME a, NAME b) { return NAME(float(a) / float(b)); }            \
    inline NAME operator-(NAME a) { return RAW{static_cast<unsigned short>(a.__x ^ 0x8000u)}; }

QK_CPU_FLOAT16_TYPE(__half, __half_raw, float_to_half_bits, half_bits_to_float)
QK_CPU_FLOAT16_TYPE(__nv_bfloat16, __nv_bfloat16_raw, float_to_bf16_bits, bf16_bits_to_float)
#undef QK_CPU_FLOAT16_TYPE

struct __align__(4) __half2 {
    __half x, y;
    __half2() = default;
    constexpr __half2(__half a, __half b) : x(a), y(b) {}
};
struct __align__(4) __nv_bfloat162 {
    __nv_bfloat16 x, y;
    __nv_bfloat162() = default;
    constexpr __nv_bfloat162(__nv_bfloat16 a, __nv_bfloat16 b) : x(a), y(b) {}
};
using half = __half;
using half2 = __half2;
using nv_bfloat16 = __nv_bfloat16;
using nv_bfloat162 = __nv_bfloat162;

inline float __half2float(__half h) { return float(h); }
inline __half __float2half(float f) { return __half(f); }
inline __half __float2half_rn(float f) { return __half(f); }
inline __half __int2half_rn(int i) { return __half(i); }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __ushort_as_half(unsigned short u) { return __half_raw{u}; }
inline __half2 __halves2half2(__half a, __half b) { return {a, b}; }
inline __half2 __half2half2(__half a) { return {a, a}; }
inline __half2 __floats2half2_rn(float a, float b) { return {__half(a), __half(b)}; }
inline __half2 __float22half2_rn(float2 f) { return {__half(f.x), __half(f.y)}; }
inline float2 __half22float2(__half2 h) { return {float(h.x), float(h.y)}; }
inline __half __low2half(__half2 h) { return h.x; }
inline __half __high2half(__half2 h) { return h.y; }
inline float __low2float(__half2 h) { return float(h.x); }
inline float __high2float(__half2 h) { return float(h.y); }

inline float __bfloat162float(__nv_bfloat16 h) { return float(h); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __int2bfloat16_rn(int i) { return __nv_bfloat16(i); }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { return __nv_bfloat16_raw{u}; }
inline __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 a, __nv_bfloat16 b) { return {a, b}; }
inline __nv_bfloat162 __bfloat162bfloat162(__nv_bfloat16 a) { return {a, a}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return {__nv_bfloat16(a), __nv_bfloat16(b)}; }
inline __nv_bfloat162 __float22bfloat162_rn(float2 f) { return {__nv_bfloat16(f.x), __nv_bfloat16(f.y)}; }
inline float2 __bfloat1622float2(__nv_bfloat162 h) { return {float(h.x), float(h.y)}; }
inline __nv_bfloat16 __low2bfloat16(__nv_bfloat162 h) { return h.x; }
inline __nv_bfloat16 __high2bfloat16(__nv_bfloat162 h) { return h.y; }
inline float __low2float(__nv_bfloat162 h) { return float(h.x); }
inline float __high2float(__nv_bfloat162 h) { return float(h.y); }
// Paired arithmetic: each half rounds once (a product of two 16-bit floats is exact in float).
inline __half2 __hsub2(__half2 a, __half2 b) { return {__half(float(a.x) - float(b.x)), __half(float(a.y) - float(b.y))}; }
inline __half2 __hmul2(__half2 a, __half2 b) { return {__half(float(a.x) * float(b.x)), __half(float(a.y) * float(b.y))}; }
inline __nv_bfloat162 __hsub2(__nv_bfloat162 a, __nv_bfloat162 b) {
    return {__nv_bfloat16(float(a.x) - float(b.x)), __nv_bfloat16(float(a.y) - float(b.y))};
}
inline __nv_bfloat162 __hmul2(__nv_bfloat162 a, __nv_bfloat162 b) {
    return {__nv_bfloat16(float(a.x) * float(b.x)), __nv_bfloat16(float(a.y) * float(b.y))};
}

// ------------------------------------------------------------------------------------------
// Math and bit intrinsics (fmaxf, fminf, fabsf, rintf, roundf, sqrtf, expf: <math.h>)
// ------------------------------------------------------------------------------------------
namespace qk_cpu {
// The GPU's float -> int conversions saturate and map NaN to 0.
inline int saturate_to_int(float r) {
    if (r != r) return 0;
    if (r >= 2147483648.f) return INT_MAX;
    if (r < -2147483648.f) return INT_MIN;
    return static_cast<int>(r);
}
}  // namespace qk_cpu

inline float __expf(float x) { return expf(x); }
inline float __exp2f(float x) { return exp2f(x); }
inline float __logf(float x) { return logf(x); }
inline float __log2f(float x) { return log2f(x); }
inline float __powf(float a, float b) { return powf(a, b); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float rsqrtf(float x) { return 1.f / sqrtf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline float __saturatef(float x) { return x > 0.f ? (x < 1.f ? x : 1.f) : 0.f; }
inline int __float2int_rn(float x) { return qk_cpu::saturate_to_int(std::nearbyint(x)); }
inline int __float2int_rz(float x) { return qk_cpu::saturate_to_int(std::trunc(x)); }
inline int __float2int_rd(float x) { return qk_cpu::saturate_to_int(std::floor(x)); }
inline int __float2int_ru(float x) { return qk_cpu::saturate_to_int(std::ceil(x)); }
inline float __int2float_rn(int i) { return static_cast<float>(i); }
inline float __int_as_float(int i) { return std::bit_cast<float>(i); }
inline int __float_as_int(float f) { return std::bit_cast<int>(f); }
inline unsigned __float_as_uint(float f) { return std::bit_cast<unsigned>(f); }
inline float __uint_as_float(unsigned u) { return std::bit_cast<float>(u); }

inline int min(int a, int b) { return a < b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned min(int a, unsigned b) { return min(static_cast<unsigned>(a), b); }
inline unsigned min(unsigned a, int b) { return min(a, static_cast<unsigned>(b)); }
inline long min(long a, long b) { return a < b ? a : b; }
inline unsigned long min(unsigned long a, unsigned long b) { return a < b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline unsigned max(int a, unsigned b) { return max(static_cast<unsigned>(a), b); }
inline unsigned max(unsigned a, int b) { return max(a, static_cast<unsigned>(b)); }
inline long max(long a, long b) { return a > b ? a : b; }
inline unsigned long max(unsigned long a, unsigned long b) { return a > b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double max(double a, double b) { return fmax(a, b); }

inline int __popc(unsigned x) { return std::popcount(x); }
inline int __popcll(unsigned long long x) { return std::popcount(x); }
inline int __clz(int x) { return std::countl_zero(static_cast<unsigned>(x)); }
inline int __clzll(long long x) { return std::countl_zero(static_cast<unsigned long long>(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
    unsigned r = 0;
    for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
    return r;
}
// Byte i of the result is byte s[4i+2:4i] of the 8-byte value {y, x} (x is bytes 0-3).
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
    const unsigned long long v = (static_cast<unsigned long long>(y) << 32) | x;
    unsigned r = 0;
    for (int i = 0; i < 4; ++i) r |= static_cast<unsigned>((v >> (8 * ((s >> (4 * i)) & 7u))) & 0xffu) << (8 * i);
    return r;
}

// Four-way byte dot product plus c, wrapping like the hardware.
inline int __dp4a(int a, int b, int c) {
    unsigned acc = static_cast<unsigned>(c);
    for (int i = 0; i < 4; ++i)
        acc += static_cast<unsigned>(static_cast<int>(static_cast<int8_t>(a >> (8 * i))) *
                                     static_cast<int>(static_cast<int8_t>(b >> (8 * i))));
    return static_cast<int>(acc);
}
inline unsigned __dp4a(unsigned a, unsigned b, unsigned c) {
    for (int i = 0; i < 4; ++i) c += ((a >> (8 * i)) & 0xffu) * ((b >> (8 * i)) & 0xffu);
    return c;
}
inline int __dp4a(char4 a, char4 b, int c) { return __dp4a(std::bit_cast<int>(a), std::bit_cast<int>(b), c); }
inline unsigned __dp4a(uchar4 a, uchar4 b, unsigned c) {
    return __dp4a(std::bit_cast<unsigned>(a), std::bit_cast<unsigned>(b), c);
}

template <typename T>
inline T __ldg(const T* p) { return *p; }
template <typename T>
inline T __ldcg(const T* p) { return *p; }

// ------------------------------------------------------------------------------------------
// Atomics (std::atomic_ref on the plain object; each returns the old value)
// ------------------------------------------------------------------------------------------
namespace qk_cpu {
template <typename T, typename F>
inline T atomic_update(T* p, F f) {
    std::atomic_ref<T> ref(*p);
    T old = ref.load();
    while (!ref.compare_exchange_weak(old, f(old))) {}
    return old;
}
}  // namespace qk_cpu

inline int atomicAdd(int* p, int v) { return std::atomic_ref<int>(*p).fetch_add(v); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return std::atomic_ref<unsigned>(*p).fetch_add(v); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
    return std::atomic_ref<unsigned long long>(*p).fetch_add(v);
}
inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }
inline double atomicAdd(double* p, double v) { return std::atomic_ref<double>(*p).fetch_add(v); }
inline int atomicSub(int* p, int v) { return std::atomic_ref<int>(*p).fetch_sub(v); }
inline unsigned atomicSub(unsigned* p, unsigned v) { return std::atomic_ref<unsigned>(*p).fetch_sub(v); }
inline int atomicExch(int* p, int v) { return std::atomic_ref<int>(*p).exchange(v); }
inline unsigned atomicExch(unsigned* p, unsigned v) { return std::atomic_ref<unsigned>(*p).exchange(v); }
inline float atomicExch(float* p, float v) { return std::atomic_ref<float>(*p).exchange(v); }
inline int atomicMax(int* p, int v) { return qk_cpu::atomic_update(p, [v](int o) { return o > v ? o : v; }); }
inline unsigned atomicMax(unsigned* p, unsigned v) {
    return qk_cpu::atomic_update(p, [v](unsigned o) { return o > v ? o : v; });
}
inline int atomicMin(int* p, int v) { return qk_cpu::atomic_update(p, [v](int o) { return o < v ? o : v; }); }
inline unsigned atomicMin(unsigned* p, unsigned v) {
    return qk_cpu::atomic_update(p, [v](unsigned o) { return o < v ? o : v; });
}
template <typename T>
inline T atomicCAS(T* p, T compare, T v) {
    std::atomic_ref<T>(*p).compare_exchange_strong(compare, v);
    return compare;
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }

// ------------------------------------------------------------------------------------------
// Execution: one launch = the block's threads looping over the grid's blocks
// ------------------------------------------------------------------------------------------
namespace qk_cpu {

// Thrown through kernel code to unwind a thread once its launch has failed.
struct Abort {};

struct Site {
    const char* op = "";
    const char* file = "";
    unsigned line = 0;
    bool operator==(const Site& o) const {
        return line == o.line && std::strcmp(file, o.file) == 0 && std::strcmp(op, o.op) == 0;
    }
};

inline std::string format(const char* fmt, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    std::vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    return buf;
}

inline std::string describe(Site s) { return format("%s at %s:%u", s.op, s.file, s.line); }

// Barriers: the last thread to arrive bumps the barrier's generation; the others wait for
// that outside the lock (yields, then std::atomic::wait: a futex), so that the wake-up does
// not contend for the lock.
inline void release(std::atomic<unsigned>& generation) {
    generation.fetch_add(1, std::memory_order_release);
    generation.notify_all();
}

struct Warp {
    unsigned present = 0;     // lanes that exist (a partial last warp has fewer than 32)
    unsigned exited = 0;      // lanes that returned from the kernel in the current block
    unsigned arrived = 0;     // lanes waiting in the current collective
    unsigned mask = 0;        // its mask
    Site site;                // where its first lane called it
    std::atomic<unsigned> generation{0};  // completed collectives; parity picks the buffer
    uint64_t exchange[2][32] = {};
};

// The order blocks run in: the grid's linear order, or (QK_CPU_BLOCK_ORDER=reverse in the
// environment at launch time) the reverse, so that a test can check that a kernel's result
// does not depend on which block runs, or finishes, first.
inline bool blocks_reversed() {
    const char* order = std::getenv("QK_CPU_BLOCK_ORDER");
    return order != nullptr && std::strcmp(order, "reverse") == 0;
}

struct Launch {
    Launch(dim3 grid_, dim3 block_, std::function<void()> kernel_)
        : grid(grid_), block(block_), kernel(std::move(kernel_)),
          nthreads(block_.x * block_.y * block_.z), warps((nthreads + 31) / 32),
          running(nthreads), reversed(blocks_reversed()) {
        for (unsigned w = 0; w < warps.size(); ++w)
            warps[w].present = nthreads - 32 * w >= 32 ? 0xffffffffu : (1u << (nthreads - 32 * w)) - 1u;
    }

    const dim3 grid, block;
    const std::function<void()> kernel;
    const unsigned nthreads;
    std::mutex m;
    std::condition_variable done_cv;
    std::vector<Warp> warps;
    unsigned running;             // threads neither waiting at a barrier nor done with the block
    unsigned exited = 0;          // threads done with the current block
    unsigned sync_arrived = 0;    // threads waiting in __syncthreads
    Site sync_site;
    std::atomic<unsigned> sync_generation{0}, block_generation{0};
    unsigned long long block_index = 0, progress = 0;
    unsigned finished_threads = 0;
    std::atomic<bool> aborted{false};
    std::string error;
    const bool reversed;  // blocks run in reverse linear order

    // The index of the b-th block to run.
    uint3 block_idx(unsigned long long b) const {
        if (reversed) b = 1ull * grid.x * grid.y * grid.z - 1 - b;
        return {static_cast<unsigned>(b % grid.x), static_cast<unsigned>(b / grid.x % grid.y),
                static_cast<unsigned>(b / grid.x / grid.y)};
    }
    std::string thread_name(unsigned tid) const {
        const uint3 b = block_idx(block_index);
        return format("thread (%u,%u,%u) of block (%u,%u,%u)", tid % block.x, tid / block.x % block.y,
                      tid / block.x / block.y, b.x, b.y, b.z);
    }
    // Record the first error and wake every waiting thread (caller holds m).
    void fail(const std::string& message) {
        if (aborted) return;
        error = message;
        aborted = true;
        for (auto* g : {&sync_generation, &block_generation}) release(*g);
        for (auto& w : warps) release(w.generation);
        done_cv.notify_all();
    }
    // Who waits where, for a deadlock message (caller holds m).
    std::string waiting() const {
        std::string s;
        if (sync_arrived) s += format("%u thread(s) wait in %s; ", sync_arrived, describe(sync_site).c_str());
        for (unsigned w = 0; w < warps.size(); ++w)
            if (warps[w].arrived)
                s += format("warp %u lanes 0x%08x wait in %s (mask 0x%08x); ", w, warps[w].arrived,
                            describe(warps[w].site).c_str(), warps[w].mask);
        return s + format("%u thread(s) have returned from the kernel", exited);
    }
    // A thread has just started waiting: if nobody runs, nobody can release it (caller holds m).
    void check_progress(unsigned tid) {
        if (running == 0)
            fail(format("deadlock in block (%u,%u,%u) (last to stop: %s): %s", block_idx(block_index).x,
                        block_idx(block_index).y, block_idx(block_index).z, thread_name(tid).c_str(),
                        waiting().c_str()));
    }
};

// Waits until generation moves past old (outside the lock); false when the launch failed.
inline bool await(const Launch& L, const std::atomic<unsigned>& generation, unsigned old) {
    // A few yields first: another thread of the block usually completes the barrier soon.
    for (int i = 0; i < 16 && generation.load(std::memory_order_acquire) == old; ++i) sched_yield();
    generation.wait(old, std::memory_order_acquire);
    return !L.aborted.load();
}

inline thread_local Launch* current = nullptr;
inline thread_local unsigned current_tid = 0;

// Keeps pthread_cancel (used only on threads still running 0.25 s after a launch
// failed) out of the locked barrier code. Re-enabling may act on a pending cancel at once,
// so the destructor may unwind (noexcept(false)); while an Abort unwinds, the thread is
// leaving anyway and cancellation stays off.
struct NoCancel {
    int old;
    NoCancel() { pthread_setcancelstate(PTHREAD_CANCEL_DISABLE, &old); }
    ~NoCancel() noexcept(false) {
        if (std::uncaught_exceptions() == 0) pthread_setcancelstate(old, nullptr);
    }
};

inline void block_barrier(Site site) {
    NoCancel no_cancel;
    Launch& L = *current;
    const unsigned tid = current_tid;
    std::unique_lock lock(L.m);
    if (L.aborted) throw Abort{};
    ++L.progress;
    if (L.exited)
        L.fail(format("%s reaches %s, but %u thread(s) of its block have returned from the kernel "
                      "without reaching it: __syncthreads must be reached by every thread",
                      L.thread_name(tid).c_str(), describe(site).c_str(), L.exited));
    else if (L.sync_arrived && !(site == L.sync_site))
        L.fail(format("divergent __syncthreads: %s reaches %s while %u thread(s) wait in %s",
                      L.thread_name(tid).c_str(), describe(site).c_str(), L.sync_arrived,
                      describe(L.sync_site).c_str()));
    if (L.aborted) throw Abort{};
    if (L.sync_arrived++ == 0) L.sync_site = site;
    if (L.sync_arrived == L.nthreads) {
        L.sync_arrived = 0;
        L.running += L.nthreads - 1;
        release(L.sync_generation);
        return;
    }
    const unsigned generation = L.sync_generation;
    --L.running;
    L.check_progress(tid);
    lock.unlock();
    if (!await(L, L.sync_generation, generation)) throw Abort{};
}

struct Collective {
    const uint64_t* values;  // every lane's contribution
    unsigned lanes;          // the lanes that took part
};

// A warp-wide exchange: waits for every existing lane of `mask`, returns all contributions.
inline Collective warp_collective(Site site, unsigned mask, uint64_t value) {
    NoCancel no_cancel;
    Launch& L = *current;
    const unsigned tid = current_tid, lane = tid % 32, bit = 1u << lane;
    Warp& W = L.warps[tid / 32];
    const unsigned need = mask & W.present;
    std::unique_lock lock(L.m);
    if (L.aborted) throw Abort{};
    ++L.progress;
    if (!(mask & bit))
        L.fail(format("%s calls %s with mask 0x%08x, which leaves out its own lane %u",
                      L.thread_name(tid).c_str(), describe(site).c_str(), mask, lane));
    else if (need & W.exited)
        L.fail(format("%s calls %s (mask 0x%08x), but lane(s) 0x%08x of its warp have returned from "
                      "the kernel", L.thread_name(tid).c_str(), describe(site).c_str(), mask, need & W.exited));
    else if (W.arrived && (W.mask != mask || std::strcmp(W.site.op, site.op) != 0))
        L.fail(format("%s calls %s (mask 0x%08x) while lanes 0x%08x of its warp wait in %s (mask 0x%08x)",
                      L.thread_name(tid).c_str(), describe(site).c_str(), mask, W.arrived,
                      describe(W.site).c_str(), W.mask));
    if (L.aborted) throw Abort{};
    if (!W.arrived) {
        W.mask = mask;
        W.site = site;
    }
    const unsigned generation = W.generation, slot = generation & 1u;
    W.exchange[slot][lane] = value;
    W.arrived |= bit;
    if (W.arrived == need) {
        W.arrived = 0;
        L.running += std::popcount(need) - 1;
        release(W.generation);
    } else {
        --L.running;
        L.check_progress(tid);
        lock.unlock();
        if (!await(L, W.generation, generation)) throw Abort{};
    }
    // The slot is rewritten only two collectives later, after this lane has arrived again.
    return {W.exchange[slot], need};
}

// Marks the thread done with the current block and waits for the others; false once the
// launch has failed.
inline bool finish_block() {
    NoCancel no_cancel;
    Launch& L = *current;
    const unsigned tid = current_tid, bit = 1u << (tid % 32);
    Warp& W = L.warps[tid / 32];
    std::unique_lock lock(L.m);
    if (L.aborted) return false;
    const unsigned generation = L.block_generation;  // before a fail() below bumps it
    ++L.progress;
    ++L.exited;
    W.exited |= bit;
    if (L.exited == L.nthreads) {
        L.exited = 0;
        for (auto& w : L.warps) w.exited = 0;
        L.running = L.nthreads;
        ++L.block_index;
        release(L.block_generation);
        return true;
    }
    if (L.sync_arrived)
        L.fail(format("%s returns from the kernel while %u thread(s) wait for it in %s",
                      L.thread_name(tid).c_str(), L.sync_arrived, describe(L.sync_site).c_str()));
    else if (W.arrived && (W.mask & bit))
        L.fail(format("%s returns from the kernel while lanes 0x%08x of its warp wait for it in %s "
                      "(mask 0x%08x)", L.thread_name(tid).c_str(), W.arrived, describe(W.site).c_str(),
                      W.mask));
    --L.running;
    L.check_progress(tid);
    lock.unlock();
    return await(L, L.block_generation, generation);
}

inline void fail_here(const std::string& message) {
    NoCancel no_cancel;
    std::lock_guard lock(current->m);
    current->fail(current->thread_name(current_tid) + ": " + message);
}

struct ThreadStart {
    Launch* launch;
    unsigned tid;
    std::atomic<bool> finished{false};
};

inline void* thread_main(void* arg) {
    auto& start = *static_cast<ThreadStart*>(arg);
    Launch& L = *start.launch;
    current = &L;
    current_tid = start.tid;
    threadIdx = {start.tid % L.block.x, start.tid / L.block.x % L.block.y, start.tid / L.block.x / L.block.y};
    blockDim = L.block;
    gridDim = L.grid;
    pthread_setcanceltype(PTHREAD_CANCEL_ASYNCHRONOUS, nullptr);
    const unsigned long long blocks = 1ull * L.grid.x * L.grid.y * L.grid.z;
    for (unsigned long long b = 0; b < blocks; ++b) {
        blockIdx = L.block_idx(b);
        try {
            L.kernel();
        } catch (const Abort&) {
            break;
        } catch (const std::exception& e) {
            fail_here(format("C++ exception: %s", e.what()));
            break;
        }
        if (!finish_block()) break;
    }
    pthread_setcancelstate(PTHREAD_CANCEL_DISABLE, nullptr);  // done: never cancelled from here
    std::lock_guard lock(L.m);
    start.finished = true;
    ++L.finished_threads;
    L.done_cv.notify_all();
    return nullptr;
}

constexpr size_t THREAD_STACK_BYTES = 1 << 20;

enum Status : int { OK = 0, FAILED = 1, FAILED_THREADS_LEFT = 2 };

// Runs a launch: OK when it completed, otherwise the error goes to err. A watchdog fails
// the launch when no thread reaches a barrier or returns for timeout_s seconds (an endless
// loop); threads still running 0.25 s later are cancelled, and those that do not stop
// are left running with their Launch leaked (FAILED_THREADS_LEFT).
inline int run(dim3 grid, dim3 block, std::function<void()> kernel, double timeout_s, char* err,
               size_t err_len) {
    auto* launch = new Launch(grid, block, std::move(kernel));
    Launch& L = *launch;
    auto* starts = new std::vector<ThreadStart>(L.nthreads);
    std::vector<pthread_t> threads(L.nthreads);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, THREAD_STACK_BYTES);
    unsigned created = 0;
    for (; created < L.nthreads; ++created) {
        (*starts)[created].launch = launch;
        (*starts)[created].tid = created;
        if (int rc = pthread_create(&threads[created], &attr, thread_main, &(*starts)[created])) {
            std::lock_guard lock(L.m);
            L.fail(format("cannot create CPU thread %u of %u: %s", created, L.nthreads, std::strerror(rc)));
            break;
        }
    }
    pthread_attr_destroy(&attr);

    using clock = std::chrono::steady_clock;
    const auto timeout = std::chrono::duration<double>(timeout_s);
    std::unique_lock lock(L.m);
    unsigned long long seen = L.progress;
    auto last_progress = clock::now(), failed_at = clock::time_point::max();
    while (L.finished_threads < created) {
        L.done_cv.wait_for(lock, std::chrono::milliseconds(20));
        const auto now = clock::now();
        if (L.progress != seen) {
            seen = L.progress;
            last_progress = now;
        } else if (!L.aborted && now - last_progress > timeout) {
            L.fail(format("no thread reached a barrier or returned for %.1f s (an endless loop, or a "
                          "kernel slower than the timeout); %s", timeout_s, L.waiting().c_str()));
        }
        if (L.aborted && failed_at == clock::time_point::max()) failed_at = now;
        if (now - failed_at > std::chrono::milliseconds(250)) break;
    }
    const bool aborted = L.aborted;
    std::snprintf(err, err_len, "%s", L.error.c_str());
    lock.unlock();

    bool left_running = false;
    for (unsigned t = 0; t < created; ++t) {
        if (!(*starts)[t].finished) pthread_cancel(threads[t]);
        timespec deadline;
        clock_gettime(CLOCK_REALTIME, &deadline);
        deadline.tv_sec += 1;
        if (pthread_timedjoin_np(threads[t], nullptr, &deadline) != 0) {
            pthread_detach(threads[t]);
            left_running = true;
        }
    }
    std::fflush(stdout);
    if (left_running) return FAILED_THREADS_LEFT;  // launch and starts stay allocated for them
    delete starts;
    delete launch;
    return aborted ? FAILED : OK;
}

}  // namespace qk_cpu

// ------------------------------------------------------------------------------------------
// Barriers and warp intrinsics
// ------------------------------------------------------------------------------------------
#define QK_CPU_SITE(op) qk_cpu::Site{op, loc.file_name(), loc.line()}
#define QK_CPU_HERE std::source_location loc = std::source_location::current()

inline void __syncthreads(QK_CPU_HERE) { qk_cpu::block_barrier(QK_CPU_SITE("__syncthreads()")); }
inline void __syncwarp(unsigned mask = 0xffffffffu, QK_CPU_HERE) {
    qk_cpu::warp_collective(QK_CPU_SITE("__syncwarp()"), mask, 0);
}
inline void __trap(QK_CPU_HERE) {
    qk_cpu::fail_here(qk_cpu::format("__trap() at %s:%u", loc.file_name(), loc.line()));
    throw qk_cpu::Abort{};
}
inline unsigned __activemask() { return qk_cpu::current->warps[qk_cpu::current_tid / 32].present; }

namespace qk_cpu {
// Exchanges var across the warp and returns the value of lane src (-1, an absent or a
// non-participating lane: the caller's own value, which CUDA leaves undefined for the latter).
template <typename T>
inline T shuffle(Site site, unsigned mask, T var, int src) {
    static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffles move values of up to 8 bytes");
    uint64_t bits = 0;
    std::memcpy(&bits, &var, sizeof(T));
    const Collective c = warp_collective(site, mask, bits);
    if (src < 0 || src > 31 || !((c.lanes >> src) & 1u)) return var;
    T out;
    std::memcpy(&out, &c.values[src], sizeof(T));
    return out;
}
inline int lane() { return static_cast<int>(current_tid % 32); }
inline int segment_start(int width) { return lane() & ~(width - 1); }
}  // namespace qk_cpu

template <typename T>
inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize, QK_CPU_HERE) {
    return qk_cpu::shuffle(QK_CPU_SITE("__shfl_sync()"), mask, var,
                           qk_cpu::segment_start(width) + (src_lane & (width - 1)));
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize, QK_CPU_HERE) {
    const int src = qk_cpu::lane() - static_cast<int>(delta);
    return qk_cpu::shuffle(QK_CPU_SITE("__shfl_up_sync()"), mask, var,
                           src >= qk_cpu::segment_start(width) ? src : -1);
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize, QK_CPU_HERE) {
    const int src = qk_cpu::lane() + static_cast<int>(delta);
    return qk_cpu::shuffle(QK_CPU_SITE("__shfl_down_sync()"), mask, var,
                           src < qk_cpu::segment_start(width) + width ? src : -1);
}
// Lanes may read earlier width-groups but get their own value from later ones (CUDA's rule).
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize, QK_CPU_HERE) {
    const int src = qk_cpu::lane() ^ lane_mask;
    return qk_cpu::shuffle(QK_CPU_SITE("__shfl_xor_sync()"), mask, var,
                           src < qk_cpu::segment_start(width) + width ? src : -1);
}
inline unsigned __ballot_sync(unsigned mask, int predicate, QK_CPU_HERE) {
    const qk_cpu::Collective c = qk_cpu::warp_collective(QK_CPU_SITE("__ballot_sync()"), mask, predicate != 0);
    unsigned ballot = 0;
    for (int l = 0; l < 32; ++l)
        if (((c.lanes >> l) & 1u) && c.values[l]) ballot |= 1u << l;
    return ballot;
}
inline int __any_sync(unsigned mask, int predicate, QK_CPU_HERE) {
    return __ballot_sync(mask, predicate, loc) != 0;
}
inline int __all_sync(unsigned mask, int predicate, QK_CPU_HERE) {
    return __ballot_sync(mask, predicate, loc) == (mask & __activemask());
}
#undef QK_CPU_SITE
#undef QK_CPU_HERE

// ------------------------------------------------------------------------------------------
// Instances: what the harness's generated translation unit exports for each kernel
// ------------------------------------------------------------------------------------------
namespace qk_cpu {

enum Kind : int { POINTER = 0, INTEGER = 1, FLOATING = 2, OTHER = 3 };

template <typename T>
constexpr int kind_of() {
    if constexpr (std::is_pointer_v<T>) return POINTER;
    else if constexpr (std::is_integral_v<T>) return INTEGER;
    else if constexpr (std::is_floating_point_v<T> || std::is_same_v<T, __half> ||
                       std::is_same_v<T, __nv_bfloat16>) return FLOATING;
    else return OTHER;
}

// "... [with T = const __half*]": g++ spells the type for error messages.
template <typename T>
const char* type_name() { return __PRETTY_FUNCTION__; }

struct Instance {
    unsigned nparams;
    const size_t* sizes;
    const int* kinds;
    const char* const* types;
    // Reads parameter i from args[i] (CUDA's kernelParams convention) and runs the launch.
    int (*launch)(void (*kernel)(), dim3 grid, dim3 block, void** args, double timeout_s, char* err,
                  size_t err_len);
    void (*kernel)();
};

template <typename T>
T load_param(void* p) {
    static_assert(std::is_trivially_copyable_v<T>, "kernel parameters are copied bytewise");
    T value;
    std::memcpy(&value, p, sizeof(T));
    return value;
}

template <typename... A, size_t... I>
int launch_with(void (*kernel)(), dim3 grid, dim3 block, void** args, double timeout_s, char* err,
                size_t err_len, std::index_sequence<I...>) {
    // Captured by value: the function outlives this frame when a stuck thread is left running.
    return run(grid, block,
               [fn = reinterpret_cast<void (*)(A...)>(kernel), params = std::tuple<A...>{load_param<A>(args[I])...}] {
                   std::apply(fn, params);
               },
               timeout_s, err, err_len);
}

template <typename... A>
int launch(void (*kernel)(), dim3 grid, dim3 block, void** args, double timeout_s, char* err, size_t err_len) {
    return launch_with<A...>(kernel, grid, block, args, timeout_s, err, err_len, std::index_sequence_for<A...>{});
}

template <typename... A>
Instance instance(void (*kernel)(A...)) {
    static const size_t sizes[] = {sizeof(A)..., 0};
    static const int kinds[] = {kind_of<A>()..., 0};
    static const char* const types[] = {type_name<A>()..., nullptr};
    return {sizeof...(A), sizes, kinds, types, &launch<A...>, reinterpret_cast<void (*)()>(kernel)};
}

}  // namespace qk_cpu

#endif  // QK_CPU_SHIM_H
