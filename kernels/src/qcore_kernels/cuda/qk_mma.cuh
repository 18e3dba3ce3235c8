// Warp-level tile products, the only tensor-core code of the kernels: WarpTile (wmma, on
// shared memory), and mma_16816 (fp16/bf16) and mma_s4_16864 (int4) on fragments in registers.
//
// WarpTile<In, Acc, FM, FN> holds a warp's FM x FN grid of 16x16 accumulator tiles.
// mma(a, lda, b, ldb) adds one k-step of 16: A rows at a + r * lda (row-major), B stored
// n-major (column n at b + n * ldb, i.e. wmma's col_major). store(i, j, dst) writes tile
// (i, j) row-major with stride 16 to dst. On the GPU these are wmma fragments
// (mma.sync); in the CPU harness (QK_CPU_HARNESS) the same contract is computed in SIMT
// code, so that the loading, dequantization, tiling and epilogue code around it runs
// unchanged on the CPU. Pointers passed to mma/store must be 32-byte aligned and ld a
// multiple of 16 bytes (wmma's rules), in both builds.
#pragma once
#include "qk_common.cuh"
#ifndef QK_CPU_HARNESS
#include <mma.h>
#endif

namespace qk {

__device__ __forceinline__ float widen(__half v) { return __half2float(v); }
__device__ __forceinline__ float widen(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ int widen(signed char v) { return static_cast<int>(v); }

template <typename In, typename Acc, int FM, int FN>
struct WarpTile {
#ifndef QK_CPU_HARNESS
    nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, Acc> acc[FM][FN];

    __device__ __forceinline__ void zero() {
#pragma unroll
        for (int i = 0; i < FM; ++i)
#pragma unroll
            for (int j = 0; j < FN; ++j) nvcuda::wmma::fill_fragment(acc[i][j], Acc(0));
    }

    __device__ __forceinline__ void mma(const In* a, int lda, const In* b, int ldb) {
        using namespace nvcuda;
        wmma::fragment<wmma::matrix_a, 16, 16, 16, In, wmma::row_major> fa[FM];
        wmma::fragment<wmma::matrix_b, 16, 16, 16, In, wmma::col_major> fb[FN];
#pragma unroll
        for (int i = 0; i < FM; ++i) wmma::load_matrix_sync(fa[i], a + i * 16 * lda, lda);
#pragma unroll
        for (int j = 0; j < FN; ++j) wmma::load_matrix_sync(fb[j], b + j * 16 * ldb, ldb);
#pragma unroll
        for (int i = 0; i < FM; ++i)
#pragma unroll
            for (int j = 0; j < FN; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }

    __device__ __forceinline__ void store(int i, int j, Acc* dst) {
        nvcuda::wmma::store_matrix_sync(dst, acc[i][j], 16, nvcuda::wmma::mem_row_major);
    }
#else
    // Lane l owns elements l*8 .. l*8+7 of each row-major 16x16 tile.
    Acc acc[FM][FN][8];

    __device__ void zero() {
        for (int i = 0; i < FM; ++i)
            for (int j = 0; j < FN; ++j)
                for (int e = 0; e < 8; ++e) acc[i][j][e] = Acc(0);
    }

    __device__ void mma(const In* a, int lda, const In* b, int ldb) {
        const int lane = threadIdx.x % WARP;
        for (int i = 0; i < FM; ++i)
            for (int j = 0; j < FN; ++j)
                for (int e = 0; e < 8; ++e) {
                    const int r = (lane * 8 + e) / 16, c = (lane * 8 + e) % 16;
                    Acc sum = acc[i][j][e];
                    for (int kk = 0; kk < 16; ++kk)
                        sum += Acc(widen(a[(i * 16 + r) * lda + kk])) * Acc(widen(b[(j * 16 + c) * ldb + kk]));
                    acc[i][j][e] = sum;
                }
    }

    __device__ void store(int i, int j, Acc* dst) {
        const int lane = threadIdx.x % WARP;
        for (int e = 0; e < 8; ++e) dst[lane * 8 + e] = acc[i][j][e];
    }
#endif
};

// Epilogue of a warp's tiles: each 16x16 accumulator tile goes through the warp's staging
// buffer ``stage`` (256 Acc, row-major), then every in-bounds element (m, n) of the output
// is handed to ``emit(m, n, value)``. (row0, col0) is the warp's first output element.
template <typename In, typename Acc, int FM, int FN, typename Emit>
__device__ __forceinline__ void store_tiles(WarpTile<In, Acc, FM, FN>& tile, Acc* stage, int row0,
                                            int col0, int M, int N, Emit emit) {
    const int lane = threadIdx.x % WARP;
#pragma unroll
    for (int i = 0; i < FM; ++i)
#pragma unroll
        for (int j = 0; j < FN; ++j) {
            tile.store(i, j, stage);
            __syncwarp();
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                const int idx = lane * 8 + e;
                const int m = row0 + i * 16 + idx / 16;
                const int n = col0 + j * 16 + idx % 16;
                if (m < M && n < N) emit(m, n, stage[idx]);
            }
            __syncwarp();
        }
}

// One m16n8k16 tensor-core product, c += a * b, on fragments in registers (PTX
// mma.sync.aligned.m16n8k16.row.col with fp32 accumulation). With g = lane / 4 and
// q = lane % 4: a[0] = A[g][2q..2q+1], a[1] = A[g+8][2q..2q+1], a[2] = A[g][2q+8..2q+9],
// a[3] = A[g+8][2q+8..2q+9]; b[0] = B[2q..2q+1][g], b[1] = B[2q+8..2q+9][g];
// c[e] = C[g + 8 * (e / 2)][2q + e % 2]. Pairs are two T in a 32-bit register, low first.
// The CPU harness computes the same contract in SIMT code, gathering the operands with
// warp shuffles.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
#ifndef QK_CPU_HARNESS
    if constexpr (Pair<T>::IS_HALF) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
            "{%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    } else {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
            "{%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
#else
    using T2 = typename Pair<T>::type;
    const int lane = threadIdx.x % WARP, g = lane / 4, q = lane % 4;
    float arow[2][16], bcol[2][16];  // A rows g and g + 8; B columns 2q and 2q + 1
    for (int src = 0; src < 4; ++src) {
        for (int r = 0; r < 4; ++r) {  // A row g's (g+8's) owners are lanes 4g .. 4g+3
            const T2 v = bits_as<T2>(__shfl_sync(FULL_MASK, a[r], g * 4 + src));
            const int col = 2 * src + 8 * (r / 2);
            arow[r % 2][col] = float(v.x);
            arow[r % 2][col + 1] = float(v.y);
        }
        for (int r = 0; r < 2; ++r)
            for (int cc = 0; cc < 2; ++cc) {  // B column n's owners are lanes 4n .. 4n+3
                const T2 v = bits_as<T2>(__shfl_sync(FULL_MASK, b[r], (2 * q + cc) * 4 + src));
                const int k = 2 * src + 8 * r;
                bcol[cc][k] = float(v.x);
                bcol[cc][k + 1] = float(v.y);
            }
    }
    for (int e = 0; e < 4; ++e) {
        float sum = 0.f;
        for (int k = 0; k < 16; ++k) sum += arow[e / 2][k] * bcol[e % 2][k];
        c[e] += sum;
    }
#endif
}

// One m16n8k64 int4 tensor-core product, c += a * b (PTX mma.sync.aligned.m16n8k64.row.col
// .s32.s4.s4.s32): signed 4-bit values, eight per 32-bit register, element i in bits
// 4i .. 4i+3. With g = lane / 4 and q = lane % 4: a[0] = A[g][8q..8q+7],
// a[1] = A[g+8][8q..8q+7], a[2] = A[g][32+8q..32+8q+7], a[3] = A[g+8][32+8q..32+8q+7];
// b[0] = B[8q..8q+7][g], b[1] = B[32+8q..32+8q+7][g]; c[e] = C[g + 8 * (e / 2)][2q + e % 2]
// (int32, exact: |sum| <= 64 * 64). Available on sm_80 and above. The CPU harness computes
// the same contract in SIMT code, gathering the operands with warp shuffles.
__device__ __forceinline__ void mma_s4_16864(int (&c)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
#ifndef QK_CPU_HARNESS
    asm volatile(
        "mma.sync.aligned.m16n8k64.row.col.s32.s4.s4.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
    const int lane = threadIdx.x % WARP, g = lane / 4, q = lane % 4;
    // element i of a register, sign-extended from its 4 bits
    auto s4 = [](unsigned v, int i) { return static_cast<int>(v << (28 - 4 * i)) >> 28; };
    int arow[2][64], bcol[2][64];  // A rows g and g + 8; B columns 2q and 2q + 1
    for (int src = 0; src < 4; ++src) {
        // one shuffle carries two registers: A rows g and g + 8 of a k-half, B's two k-halves
        for (int half = 0; half < 2; ++half) {  // A row g's (g+8's) owners are lanes 4g .. 4g+3
            const unsigned long long pair = (static_cast<unsigned long long>(a[2 * half + 1]) << 32) | a[2 * half];
            const unsigned long long v = __shfl_sync(FULL_MASK, pair, g * 4 + src);
            for (int i = 0; i < 8; ++i) {
                arow[0][32 * half + 8 * src + i] = s4(static_cast<unsigned>(v), i);
                arow[1][32 * half + 8 * src + i] = s4(static_cast<unsigned>(v >> 32), i);
            }
        }
        for (int cc = 0; cc < 2; ++cc) {  // B column n's owners are lanes 4n .. 4n+3
            const unsigned long long pair = (static_cast<unsigned long long>(b[1]) << 32) | b[0];
            const unsigned long long v = __shfl_sync(FULL_MASK, pair, (2 * q + cc) * 4 + src);
            for (int i = 0; i < 8; ++i) {
                bcol[cc][8 * src + i] = s4(static_cast<unsigned>(v), i);
                bcol[cc][32 + 8 * src + i] = s4(static_cast<unsigned>(v >> 32), i);
            }
        }
    }
    for (int e = 0; e < 4; ++e) {
        int sum = 0;
        for (int k = 0; k < 64; ++k) sum += arow[e / 2][k] * bcol[e % 2][k];
        c[e] += sum;
    }
#endif
}

}  // namespace qk
