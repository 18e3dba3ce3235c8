// Compile-check sample: templates instantiated by name expression, fp16/bf16, libcu++ and wmma.
#include <mma.h>

#include "sample_common.cuh"

// y[m, n] = sum_k x[m, k] * (w4[n, k] - 8) * scale[n]; one warp per output column n,
// M_TILE rows of x per block. w is packed 8 nibbles per uint32 along k.
template <typename T, int M_TILE>
__global__ void sample_gemv(const T* __restrict__ x, const cuda::std::uint32_t* __restrict__ w,
                            const T* __restrict__ scale, T* __restrict__ y, int n, int k) {
    const int col = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (col >= n) return;
    float acc[M_TILE] = {};
    for (int kw = lane; kw < k / 8; kw += 32) {
        const cuda::std::uint32_t packed = w[static_cast<size_t>(col) * (k / 8) + kw];
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const float wv = sample::nibble(packed, i);
#pragma unroll
            for (int m = 0; m < M_TILE; ++m) acc[m] += sample::to_float(x[m * k + kw * 8 + i]) * wv;
        }
    }
    const float s = sample::to_float(scale[col]);
#pragma unroll
    for (int m = 0; m < M_TILE; ++m) {
        float v = acc[m];
        for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
        if (lane == 0) y[m * n + col] = sample::from_float<T>(v * s);
    }
}

// c[16 x 16] = a[16 x k] @ b[k x 16] with one warp of tensor cores (k a multiple of 16).
template <typename T>
__global__ void sample_wmma(const T* __restrict__ a, const T* __restrict__ b, float* __restrict__ c,
                            int k) {
    using namespace nvcuda;
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> fc;
    wmma::fill_fragment(fc, 0.0f);
    for (int k0 = 0; k0 < k; k0 += 16) {
        wmma::load_matrix_sync(fa, a + k0, k);
        wmma::load_matrix_sync(fb, b + k0 * 16, 16);
        wmma::mma_sync(fc, fa, fb, fc);
    }
    wmma::store_matrix_sync(c, fc, 16, wmma::mem_row_major);
}
