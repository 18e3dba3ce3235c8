// W8A8 linears: int8 weights per output channel, int8 activations per token (dynamic) or
// per tensor (static), int32 accumulation, scales applied in the epilogue:
//   y[m, n] = (sum_k xq[m, k] * wq[n, k]) * xscale[m] * wscale[n] + bias[n]
// Layout "qk-w8a8" (built by the provider from the core's "int-packed" layout):
//   wq     int8  [N, K]  symmetric codes minus 128
//   wscale float [N]
// Activations are quantized by qk_quantize_rows into xq int8 [M, K] and xscale float [M]
// with levels -127..127, rounding half to even, exactly as qcore.grid.fake_quantize_activations.
// The provider guarantees: K % 16 == 0, 16-byte aligned pointers.
#include "qk_common.cuh"
#include "qk_mma.cuh"

namespace qk_w8 {
constexpr int GEMV_WARPS = 4;
// Tiled kernel: 128 x 128 output tile per block of 8 warps (2 x 4, each 64 x 32); a k-step
// of 64 is staged as four 16-column panels (panel-major, 16 bytes per row) so that every
// wmma load starts 32-byte aligned.
constexpr int BM = 128, BN = 128, BK = 64, PANELS = BK / 16, THREADS = 256;
constexpr int WM = 64, WN = 32, FM = WM / 16, FN = WN / 16;
}  // namespace qk_w8

// One block of 256 threads per row: absmax (dynamic) or the given static scale, then
// q = clamp(rint(x / scale), -127, 127). Eight values per 16-byte load (K % 16 == 0).
template <typename T>
__global__ void __launch_bounds__(256) qk_quantize_rows(
    const T* __restrict__ x, signed char* __restrict__ xq, float* __restrict__ xscale,
    const float* __restrict__ static_scale, int M, int K) {
    __shared__ float partial[8];
    const int m = blockIdx.x;
    if (m >= M) return;
    const T* xr = x + static_cast<size_t>(m) * K;
    float scale;
    if (static_scale != nullptr) {
        scale = *static_scale;
    } else {
        float amax = 0.f;
        for (int k = threadIdx.x * 8; k < K; k += blockDim.x * 8) {
            float v[8];
            qk::load8(xr + k, v);
#pragma unroll
            for (int i = 0; i < 8; ++i) amax = fmaxf(amax, fabsf(v[i]));
        }
        amax = qk::warp_max(amax);
        if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = amax;
        __syncthreads();
        amax = 0.f;
        for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) amax = fmaxf(amax, partial[w]);
        scale = amax / 127.f;
        if (!(scale > 0.f)) scale = 1.f;
    }
    if (threadIdx.x == 0) xscale[m] = scale;
    signed char* qr = xq + static_cast<size_t>(m) * K;
    for (int k = threadIdx.x * 8; k < K; k += blockDim.x * 8) {
        float v[8];
        qk::load8(xr + k, v);
        __align__(8) signed char q8[8];
#pragma unroll
        for (int i = 0; i < 8; ++i)
            q8[i] = static_cast<signed char>(static_cast<int>(fminf(fmaxf(rintf(v[i] / scale), -127.f), 127.f)));
        *reinterpret_cast<uint2*>(qr + k) = *reinterpret_cast<const uint2*>(q8);
    }
}

// Decode-phase GEMV: one warp per output channel, MT tokens per block; each lane takes 16
// bytes of weights per step and four dp4a per token.
template <typename T, int MT>
__global__ void __launch_bounds__(qk_w8::GEMV_WARPS * 32) qk_w8a8_gemv(
    const signed char* __restrict__ xq, const float* __restrict__ xscale,
    const signed char* __restrict__ wq, const float* __restrict__ wscale,
    const T* __restrict__ bias, T* __restrict__ y, int M, int N, int K) {
    const int lane = threadIdx.x % 32;
    const int n = blockIdx.x * qk_w8::GEMV_WARPS + threadIdx.x / 32;
    const int m0 = blockIdx.y * MT;
    if (n >= N) return;
    const signed char* wrow = wq + static_cast<size_t>(n) * K;
    int acc[MT];
#pragma unroll
    for (int i = 0; i < MT; ++i) acc[i] = 0;
    for (int k0 = lane * 16; k0 < K; k0 += 32 * 16) {
        const int4 wv = __ldg(reinterpret_cast<const int4*>(wrow + k0));
#pragma unroll
        for (int i = 0; i < MT; ++i) {
            if (m0 + i < M) {
                const int4 xv = *reinterpret_cast<const int4*>(xq + static_cast<size_t>(m0 + i) * K + k0);
                acc[i] = __dp4a(wv.x, xv.x, acc[i]);
                acc[i] = __dp4a(wv.y, xv.y, acc[i]);
                acc[i] = __dp4a(wv.z, xv.z, acc[i]);
                acc[i] = __dp4a(wv.w, xv.w, acc[i]);
            }
        }
    }
    const float ws = wscale[n];
    const float b = bias != nullptr ? qk::to_float(bias[n]) : 0.f;
#pragma unroll
    for (int i = 0; i < MT; ++i) {
        const int v = qk::warp_sum(acc[i]);
        if (lane == 0 && m0 + i < M)
            y[static_cast<size_t>(m0 + i) * N + n] = qk::from_float<T>(static_cast<float>(v) * xscale[m0 + i] * ws + b);
    }
}

// Prefill GEMM on int8 tensor cores (int32 accumulators), scales in the epilogue.
template <typename T>
__global__ void __launch_bounds__(qk_w8::THREADS) qk_w8a8_gemm(
    const signed char* __restrict__ xq, const float* __restrict__ xscale,
    const signed char* __restrict__ wq, const float* __restrict__ wscale,
    const T* __restrict__ bias, T* __restrict__ y, int M, int N, int K) {
    using namespace qk_w8;
    __shared__ __align__(32) signed char As[PANELS][BM * 16];
    __shared__ __align__(32) signed char Bs[PANELS][BN * 16];
    __shared__ __align__(32) int Cs[THREADS / 32][16 * 16];

    const int tid = threadIdx.x, warp = tid / 32;
    const int wm = warp / (BN / WN), wn = warp % (BN / WN);
    const int m_base = blockIdx.y * BM, n_base = blockIdx.x * BN;

    qk::WarpTile<signed char, int, FM, FN> tile;
    tile.zero();

    for (int k0 = 0; k0 < K; k0 += BK) {
        // 128 rows x 4 panels of 16 bytes per tile: two chunks per thread and tile.
#pragma unroll
        for (int c = tid; c < BM * PANELS; c += THREADS) {
            const int row = c / PANELS, panel = c % PANELS;
            const int k = k0 + panel * 16;
            int4 a = make_int4(0, 0, 0, 0), b = a;
            if (k < K) {
                if (m_base + row < M) a = *reinterpret_cast<const int4*>(xq + static_cast<size_t>(m_base + row) * K + k);
                if (n_base + row < N) b = __ldg(reinterpret_cast<const int4*>(wq + static_cast<size_t>(n_base + row) * K + k));
            }
            *reinterpret_cast<int4*>(&As[panel][row * 16]) = a;
            *reinterpret_cast<int4*>(&Bs[panel][row * 16]) = b;
        }
        __syncthreads();
#pragma unroll
        for (int p = 0; p < PANELS; ++p) tile.mma(&As[p][wm * WM * 16], 16, &Bs[p][wn * WN * 16], 16);
        __syncthreads();
    }

    qk::store_tiles(tile, Cs[warp], m_base + wm * WM, n_base + wn * WN, M, N,
                    [&](int m, int n, int v) {
        const float b = bias != nullptr ? qk::to_float(bias[n]) : 0.f;
        y[static_cast<size_t>(m) * N + n] =
            qk::from_float<T>(static_cast<float>(v) * xscale[m] * wscale[n] + b);
    });
}

// Epilogue of an int8 GEMM computed elsewhere (cuBLASLt through torch._int_mm): the same
// scaling as qk_w8a8_gemm's, from the int32 products acc [M, N]. Each thread takes two
// adjacent outputs of a row (N is even on this path); grid-stride.
template <typename T>
__global__ void __launch_bounds__(256) qk_w8a8_scale(
    const int* __restrict__ acc, const float* __restrict__ xscale, const float* __restrict__ wscale,
    const T* __restrict__ bias, T* __restrict__ y, int M, int N) {
    const long long pairs = static_cast<long long>(M) * N / 2;
    const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
    for (long long p = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; p < pairs; p += stride) {
        const int m = static_cast<int>(2 * p / N), n = static_cast<int>(2 * p % N);
        const int2 v = reinterpret_cast<const int2*>(acc)[p];
        const float xs = xscale[m];
        const float b0 = bias != nullptr ? qk::to_float(bias[n]) : 0.f;
        const float b1 = bias != nullptr ? qk::to_float(bias[n + 1]) : 0.f;
        const auto out = qk::Pair<T>::make(qk::from_float<T>(static_cast<float>(v.x) * xs * wscale[n] + b0),
                                           qk::from_float<T>(static_cast<float>(v.y) * xs * wscale[n + 1] + b1));
        reinterpret_cast<typename qk::Pair<T>::type*>(y)[p] = out;
    }
}
