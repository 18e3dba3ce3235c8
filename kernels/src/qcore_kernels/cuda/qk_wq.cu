// Weight-only quantized linears (W4A16 and W8A16): y = x @ W^T + bias, with W dequantized
// on the fly from integer codes.
//
// Layout "qk-wq" (built by the provider from the core's "int-packed" layout):
//   qweight uint32 [N, K * BITS / 32]  codes along K; code k sits at bits BITS * (k % PACK)
//                                      of word k / PACK (PACK = 32 / BITS codes per word)
//   scales  T      [N, ceil(K / G)]    one per output channel and group of G inputs
//   zeros   T      [N, ceil(K / G)]    zero points (2^(BITS-1) for symmetric weights)
//   w[n, k] = (code[n, k] - zeros[n, k / G]) * scales[n, k / G]
// Activations x [M, K] and output y [M, N] are T (__half or __nv_bfloat16), row-major.
// The provider guarantees: K % 32 == 0, G % 32 == 0 or G == K, 16-byte aligned pointers.
// Under these rules every 16-byte load of codes lies inside one group.
#include "qk_common.cuh"
#include "qk_mma.cuh"

namespace qk_wq {
constexpr int GEMV_WARPS = 4;  // output channels per GEMV block (one per warp)

// Tiled kernel: a 128 x 128 output tile per block of 8 warps (2 along M x 4 along N,
// each 64 x 32), k-steps of 32. Shared rows are padded to 40 elements (80 bytes) to
// spread shared-memory banks while keeping wmma's 32-byte alignment at k = 0 and 16.
constexpr int BM = 128, BN = 128, BK = 32, LDS = BK + 8, THREADS = 256;
constexpr int WM = 64, WN = 32, FM = WM / 16, FN = WN / 16;
}  // namespace qk_wq

// Word i (0..3) of a 16-byte load; i is a compile-time constant after unrolling.
__device__ __forceinline__ unsigned word_of(const uint4& v, int i) {
    return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// Decode-phase GEMV: one warp per output channel n and MT tokens per block (grid.y walks
// the token tiles). Each lane takes 16 bytes of codes per step (32 four-bit or 16
// eight-bit weights of one group), dequantizes them in float and accumulates w * x.
template <int BITS, typename T, int MT>
__global__ void __launch_bounds__(qk_wq::GEMV_WARPS * 32) qk_wq_gemv(
    const T* __restrict__ x, const unsigned* __restrict__ qweight, const T* __restrict__ scales,
    const T* __restrict__ zeros, const T* __restrict__ bias, T* __restrict__ y,
    int M, int N, int K, int group_size) {
    constexpr int PACK = 32 / BITS;
    constexpr int STEP = 4 * PACK;  // weights per lane per 16-byte load
    constexpr unsigned MASK = (1u << BITS) - 1u;
    const int lane = threadIdx.x % 32;
    const int n = blockIdx.x * qk_wq::GEMV_WARPS + threadIdx.x / 32;
    const int m0 = blockIdx.y * MT;
    if (n >= N) return;  // the whole warp leaves together
    const int n_groups = (K + group_size - 1) / group_size;
    const unsigned* wrow = qweight + static_cast<size_t>(n) * (K / PACK);

    float acc[MT];
#pragma unroll
    for (int i = 0; i < MT; ++i) acc[i] = 0.f;

    for (int k0 = lane * STEP; k0 < K; k0 += 32 * STEP) {
        const uint4 w4 = __ldg(reinterpret_cast<const uint4*>(wrow + k0 / PACK));
        const int g = k0 / group_size;
        const float s = qk::to_float(scales[static_cast<size_t>(n) * n_groups + g]);
        const float z = qk::to_float(zeros[static_cast<size_t>(n) * n_groups + g]);
        // Eight weights at a time (dequantized once, used for every token) keep registers low.
#pragma unroll
        for (int j = 0; j < STEP; j += 8) {
            float w[8];
#pragma unroll
            for (int e = 0; e < 8; ++e)
                w[e] = (static_cast<float>((word_of(w4, (j + e) / PACK) >> (BITS * ((j + e) % PACK))) & MASK) - z) * s;
#pragma unroll
            for (int i = 0; i < MT; ++i) {
                // Rows past M repeat the last row (no branch); their results are not written.
                float xv[8];
                qk::load8(x + static_cast<size_t>(min(m0 + i, M - 1)) * K + k0 + j, xv);
#pragma unroll
                for (int e = 0; e < 8; ++e) acc[i] = fmaf(w[e], xv[e], acc[i]);
            }
        }
    }
    const float b = bias != nullptr ? qk::to_float(bias[n]) : 0.f;
#pragma unroll
    for (int i = 0; i < MT; ++i) {
        const float v = qk::warp_sum(acc[i]);
        if (lane == 0 && m0 + i < M) y[static_cast<size_t>(m0 + i) * N + n] = qk::from_float<T>(v + b);
    }
}

// Dequantize the whole weight to T [N, K] (for large M, followed by a dense GEMM).
// One thread per 32-bit word, grid-stride.
template <int BITS, typename T>
__global__ void __launch_bounds__(256) qk_wq_dequant(
    const unsigned* __restrict__ qweight, const T* __restrict__ scales, const T* __restrict__ zeros,
    T* __restrict__ w, int N, int K, int group_size) {
    constexpr int PACK = 32 / BITS;
    constexpr unsigned MASK = (1u << BITS) - 1u;
    const int words_per_row = K / PACK;
    const int n_groups = (K + group_size - 1) / group_size;
    const long long total = static_cast<long long>(N) * words_per_row;
    const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
    for (long long idx = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += stride) {
        const int n = static_cast<int>(idx / words_per_row);
        const int k0 = static_cast<int>(idx % words_per_row) * PACK;
        const unsigned word = __ldg(qweight + idx);
        const size_t gi = static_cast<size_t>(n) * n_groups + k0 / group_size;
        const float s = qk::to_float(scales[gi]);
        const float z = qk::to_float(zeros[gi]);
        __align__(16) T out[PACK];
#pragma unroll
        for (int i = 0; i < PACK; ++i)
            out[i] = qk::from_float<T>((static_cast<float>((word >> (BITS * i)) & MASK) - z) * s);
        T* dst = w + static_cast<size_t>(n) * K + k0;
        if constexpr (PACK == 8) {
            *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(out);
        } else {
            *reinterpret_cast<uint2*>(dst) = *reinterpret_cast<const uint2*>(out);
        }
    }
}

// Prefill GEMM with fused dequantization: per k-step, the block stages a 128 x 32 tile of
// x and dequantizes a 128 x 32 tile of W into shared memory, then each warp multiplies
// its 64 x 32 part on tensor cores (qk_mma.cuh). Rows beyond M or N are zero-filled and
// never written.
template <int BITS, typename T>
__global__ void __launch_bounds__(qk_wq::THREADS) qk_wq_gemm(
    const T* __restrict__ x, const unsigned* __restrict__ qweight, const T* __restrict__ scales,
    const T* __restrict__ zeros, const T* __restrict__ bias, T* __restrict__ y,
    int M, int N, int K, int group_size) {
    using namespace qk_wq;
    constexpr int PACK = 32 / BITS;
    constexpr unsigned MASK = (1u << BITS) - 1u;
    __shared__ __align__(32) T As[BM * LDS];
    __shared__ __align__(32) T Bs[BN * LDS];
    __shared__ __align__(32) float Cs[THREADS / 32][16 * 16];

    const int tid = threadIdx.x, warp = tid / 32;
    const int wm = warp / (BN / WN), wn = warp % (BN / WN);
    const int m_base = blockIdx.y * BM, n_base = blockIdx.x * BN;
    const int n_groups = (K + group_size - 1) / group_size;
    // Each thread stages 16 elements of one row of each tile.
    const int lrow = tid / 2, lcol = (tid % 2) * 16;
    const int am = m_base + lrow, bn = n_base + lrow;

    qk::WarpTile<T, float, FM, FN> tile;
    tile.zero();

    for (int k0 = 0; k0 < K; k0 += BK) {
        uint4 a0 = make_uint4(0u, 0u, 0u, 0u), a1 = a0;
        if (am < M) {
            const uint4* src = reinterpret_cast<const uint4*>(x + static_cast<size_t>(am) * K + k0 + lcol);
            a0 = src[0];
            a1 = src[1];
        }
        uint4* adst = reinterpret_cast<uint4*>(&As[lrow * LDS + lcol]);
        adst[0] = a0;
        adst[1] = a1;

        __align__(16) T wv[16];
        if (bn < N) {
            const unsigned* src = qweight + static_cast<size_t>(bn) * (K / PACK) + (k0 + lcol) / PACK;
            const size_t gi = static_cast<size_t>(bn) * n_groups + (k0 + lcol) / group_size;
            const float s = qk::to_float(scales[gi]);
            const float z = qk::to_float(zeros[gi]);
#pragma unroll
            for (int w = 0; w < 16 / PACK; ++w) {
                const unsigned word = __ldg(src + w);
#pragma unroll
                for (int i = 0; i < PACK; ++i)
                    wv[w * PACK + i] = qk::from_float<T>((static_cast<float>((word >> (BITS * i)) & MASK) - z) * s);
            }
        } else {
#pragma unroll
            for (int i = 0; i < 16; ++i) wv[i] = qk::from_float<T>(0.f);
        }
        uint4* bdst = reinterpret_cast<uint4*>(&Bs[lrow * LDS + lcol]);
        bdst[0] = reinterpret_cast<const uint4*>(wv)[0];
        bdst[1] = reinterpret_cast<const uint4*>(wv)[1];
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < BK; kk += 16) tile.mma(&As[wm * WM * LDS + kk], LDS, &Bs[wn * WN * LDS + kk], LDS);
        __syncthreads();
    }

    qk::store_tiles(tile, Cs[warp], m_base + wm * WM, n_base + wn * WN, M, N,
                    [&](int m, int n, float v) {
        const float b = bias != nullptr ? qk::to_float(bias[n]) : 0.f;
        y[static_cast<size_t>(m) * N + n] = qk::from_float<T>(v + b);
    });
}
