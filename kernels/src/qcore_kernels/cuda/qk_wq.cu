// Weight-only quantized linears (W4A16 and W8A16): y = x @ W^T + bias, with W dequantized
// on the fly from integer codes, on tensor cores (mma.sync m16n8k16, fp32 accumulation).
//
// Layout "qk-wq" (built once per layer by the provider from the core's "int-packed"):
//   qweight uint32 [N, Kp * BITS / 32]  codes along K, 32 / BITS per word; Kp = K rounded up
//                                       to a whole chunk of CHUNK = 16 * 32 / BITS columns
//                                       (128 at 4 bits, 64 at 8; padding codes are 0)
//   scales  T      [N, ceil(K / G)]     one per output channel and group of G inputs
//   zeros   T      [N, ceil(K / G)]     zero points (2^(BITS-1) for symmetric weights)
//   w[n, k] = (code[n, k] - zeros[n, k / G]) * scales[n, k / G]
// Inside each word the even columns come first: value e (bits BITS * e) is column 2e of the
// word for e < REGS and column 2(e - REGS) + 1 otherwise (REGS = 16 / BITS), so that one
// shift and mask yields register pair r = columns 2r, 2r + 1.
//
// The tensor-core kernel multiplies in a column order of its own, the same for A and B (a
// dot product does not depend on the order of its terms): in chunk c, lane q of the four
// lanes sharing a row owns the CHUNK / 4 consecutive columns from c * CHUNK + q * CHUNK / 4,
// that is 16 bytes of codes and 16 or 32 bytes of each row of x; its k16-block j covers
// its columns 4j .. 4j + 3, with mma positions 2q, 2q+1 = columns 4j, 4j+1 (a0/b0) and
// 2q+8, 2q+9 = columns 4j+2, 4j+3 (a2/b1).
// Activations x [M, K] and output y [M, N] are T (__half or __nv_bfloat16), row-major.
// The provider guarantees: K % 32 == 0, G % 32 == 0 or G == K, 16-byte aligned pointers:
// a lane's columns of a chunk lie in one group, and entirely inside or outside K.
#include "qk_common.cuh"
#include "qk_mma.cuh"

// qk_wq_mma's grid: x walks the output channels in tiles of NT * 8, y the tokens in tiles
// of MT * 16, z splits K (the chunks) into gridDim.z ranges; a block is KW warps that
// split its range again.

// Register r's two dequantized weights from a word of codes: (v - zero) * scale with
// v = the codes at value indices r and r + REGS. fp16 (and bf16 at 4 bits) build the
// float from the code's bits (1024 + v in fp16, 128 + v in bf16: exact), subtract the
// biased zero point (exact) and multiply once: the same single rounding as the torch
// reference's (code - zero) * scale in T.
template <int BITS, typename T>
struct Dequant {
    using T2 = typename qk::Pair<T>::type;
    static constexpr int REGS = 16 / BITS;  // register pairs per word
    static constexpr bool MAGIC = qk::Pair<T>::IS_HALF || BITS == 4;
    T2 scale2, zero2;  // zero2: biased (magic + zero) on the magic path

    Dequant() = default;

    __device__ __forceinline__ Dequant(T s, T z) {
        scale2 = qk::Pair<T>::splat(s);
        if constexpr (MAGIC) {
            zero2 = qk::Pair<T>::splat(qk::from_float<T>(qk::to_float(z) + qk::Pair<T>::MAGIC_VALUE));
        } else {
            zero2 = qk::Pair<T>::splat(z);
        }
    }

    __device__ __forceinline__ unsigned reg(unsigned word, int r) const {
        constexpr unsigned MASK = (1u << BITS) - 1u;
        if constexpr (MAGIC) {
            const unsigned pair = ((word >> (BITS * r)) & (MASK | (MASK << 16))) | qk::Pair<T>::MAGIC_BITS;
            return qk::as_bits(qk::Pair<T>::mul(qk::Pair<T>::sub(qk::bits_as<T2>(pair), zero2), scale2));
        } else {
            const float z = qk::to_float(qk::Pair<T>::low(zero2)), s = qk::to_float(qk::Pair<T>::low(scale2));
            const float lo = (static_cast<float>((word >> (BITS * r)) & MASK) - z) * s;
            const float hi = (static_cast<float>((word >> (BITS * (r + REGS))) & MASK) - z) * s;
            return qk::as_bits(qk::Pair<T>::make(qk::from_float<T>(lo), qk::from_float<T>(hi)));
        }
    }
};

// Tokens m0 .. m0 + MT*16 - 1 times output channels n0 .. n0 + NT*8 - 1, over the chunks
// [c_begin, c_end) of split blockIdx.z. Within the block, chunk c goes to warp
// (c - c_begin) % KW; each lane loads 16 bytes of codes per chunk and tile, and the
// chunk's scales and zero points with them (two chunks in flight), dequantizes them into B fragments, and multiplies with A fragments read from x
// (rows past M and columns past K read as zeros). The warps' partial sums are added in
// shared memory; with several splits (gridDim.z > 1) each block stores its sum in
// ``partial`` [splits, M, N] (float) and the last block of a tile to finish adds the splits
// in order 0, 1, ... and writes y: the result does not depend on which block ends last.
// ``tickets`` (one int per (n, m) tile, zero before the launch) counts the finished splits
// and is reset to zero by the last block.
template <int BITS, typename T, int MT, int NT, int KW>
__global__ void __launch_bounds__(KW * 32) qk_wq_mma(
    const T* __restrict__ x, const unsigned* __restrict__ qweight, const T* __restrict__ scales,
    const T* __restrict__ zeros, const T* __restrict__ bias, T* __restrict__ y,
    float* __restrict__ partial, int* __restrict__ tickets, int M, int N, int K, int group_size) {
    constexpr int CHUNK = 16 * 32 / BITS;      // columns per chunk of a row
    constexpr int REGS = 16 / BITS;            // register pairs per word
    constexpr int BLOCKS_PER_WORD = REGS / 2;  // k16-blocks per word
    constexpr int ACC = MT * NT * 4;           // accumulators per lane
    __shared__ float reduce[KW > 1 ? KW / 2 : 1][ACC][32];
    __shared__ int last_split;

    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int g = lane / 4, q = lane % 4;
    const int n0 = blockIdx.x * NT * 8, m0 = blockIdx.y * MT * 16;
    const int chunks = (K + CHUNK - 1) / CHUNK;
    const int splits = gridDim.z;
    const int c_begin = static_cast<int>(static_cast<long long>(chunks) * blockIdx.z / splits);
    const int c_end = static_cast<int>(static_cast<long long>(chunks) * (blockIdx.z + 1) / splits);
    const int n_groups = (K + group_size - 1) / group_size;
    const int words_per_row = chunks * 16;

    float acc[MT][NT][4];
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int t = 0; t < NT; ++t)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][t][e] = 0.f;

    // This lane's row of each tile (rows past N are clamped: their results are dropped).
    int row[NT];
#pragma unroll
    for (int t = 0; t < NT; ++t) row[t] = min(n0 + t * 8 + g, N - 1);

    // A stage: one chunk's codes and the (scale, zero) pair of each of its words, loaded
    // together so that no load waits for another.
    using T2 = typename qk::Pair<T>::type;
    // A stage: one chunk's codes and the (scale, zero) pair of this lane's group, loaded
    // together so that no load waits for another.
    constexpr int LANE_COLS = CHUNK / 4;       // columns of a chunk per lane
    constexpr int X_LOADS = LANE_COLS / 8;     // 16-byte loads of x per row and chunk
    auto load = [&](uint4 (&codes)[NT], unsigned (&sz)[NT], int c) {
        const int grp = min((c * CHUNK + q * LANE_COLS) / group_size, n_groups - 1);
#pragma unroll
        for (int t = 0; t < NT; ++t) {
            codes[t] = __ldg(reinterpret_cast<const uint4*>(qweight + static_cast<size_t>(row[t]) * words_per_row + c * 16 + q * 4));
            const size_t gi = static_cast<size_t>(row[t]) * n_groups + grp;
            sz[t] = qk::as_bits(qk::Pair<T>::make(scales[gi], zeros[gi]));
        }
    };

    auto compute = [&](const uint4 (&codes)[NT], const unsigned (&sz)[NT], int c) {
        const int kb = c * CHUNK + q * LANE_COLS;  // this lane's first column
        // x rows g and g + 8 of each token tile over the lane's columns (zeros past M or K).
        uint4 xs[MT][2][X_LOADS];
#pragma unroll
        for (int i = 0; i < MT; ++i)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int r = m0 + i * 16 + g + 8 * h;
                const bool in = r < M && kb < K;
#pragma unroll
                for (int l = 0; l < X_LOADS; ++l)
                    xs[i][h][l] = in ? __ldg(reinterpret_cast<const uint4*>(x + static_cast<size_t>(r) * K + kb + 8 * l))
                                     : make_uint4(0u, 0u, 0u, 0u);
            }
        Dequant<BITS, T> dq[NT];
#pragma unroll
        for (int t = 0; t < NT; ++t) {
            const T2 pair = qk::bits_as<T2>(sz[t]);
            dq[t] = Dequant<BITS, T>(qk::Pair<T>::low(pair), qk::Pair<T>::high(pair));
        }
#pragma unroll
        for (int w = 0; w < 4; ++w) {
#pragma unroll
            for (int b = 0; b < BLOCKS_PER_WORD; ++b) {
                const int j = w * BLOCKS_PER_WORD + b;  // k16-block: lane columns 4j .. 4j+3
                unsigned a[MT][4];
#pragma unroll
                for (int i = 0; i < MT; ++i) {
                    // columns 4j, 4j+1 are x word 2j of the slice, 4j+2, 4j+3 word 2j+1
                    a[i][0] = qk::word_of(xs[i][0][j / 2], (2 * j) % 4);
                    a[i][1] = qk::word_of(xs[i][1][j / 2], (2 * j) % 4);
                    a[i][2] = qk::word_of(xs[i][0][j / 2], (2 * j + 1) % 4);
                    a[i][3] = qk::word_of(xs[i][1][j / 2], (2 * j + 1) % 4);
                }
#pragma unroll
                for (int t = 0; t < NT; ++t) {
                    const unsigned word = qk::word_of(codes[t], w);
                    const unsigned bfrag[2] = {dq[t].reg(word, 2 * b), dq[t].reg(word, 2 * b + 1)};
#pragma unroll
                    for (int i = 0; i < MT; ++i) qk::mma_16816<T>(acc[i][t], a[i], bfrag);
                }
            }
        }
    };

    // Two stages in flight, ping-pong: while one chunk is computed the next one loads.
    uint4 codes0[NT], codes1[NT];
    unsigned sz0[NT], sz1[NT];
    int c = c_begin + warp;
    if (c < c_end) load(codes0, sz0, c);
    if (c + KW < c_end) load(codes1, sz1, c + KW);
    for (; c < c_end; c += 2 * KW) {
        compute(codes0, sz0, c);
        if (c + 2 * KW < c_end) load(codes0, sz0, c + 2 * KW);
        if (c + KW >= c_end) break;
        compute(codes1, sz1, c + KW);
        if (c + 3 * KW < c_end) load(codes1, sz1, c + 3 * KW);
    }

    // Tree reduction over the KW warps, in shared memory, in a fixed order.
#pragma unroll
    for (int half = KW / 2; half >= 1; half /= 2) {
        if (warp >= half && warp < 2 * half) {
#pragma unroll
            for (int i = 0; i < MT; ++i)
#pragma unroll
                for (int t = 0; t < NT; ++t)
#pragma unroll
                    for (int e = 0; e < 4; ++e) reduce[warp - half][(i * NT + t) * 4 + e][lane] = acc[i][t][e];
        }
        __syncthreads();
        if (warp < half) {
#pragma unroll
            for (int i = 0; i < MT; ++i)
#pragma unroll
                for (int t = 0; t < NT; ++t)
#pragma unroll
                    for (int e = 0; e < 4; ++e) acc[i][t][e] += reduce[warp][(i * NT + t) * 4 + e][lane];
        }
        __syncthreads();
    }

    // C fragment: acc[e] is row g + 8 * (e / 2), column 2q + e % 2 of the 16 x 8 tile.
    if (splits > 1) {
        if (warp == 0) {
#pragma unroll
            for (int t = 0; t < NT; ++t)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int n = n0 + t * 8 + 2 * q + e % 2;
#pragma unroll
                    for (int i = 0; i < MT; ++i) {
                        const int m = m0 + i * 16 + g + 8 * (e / 2);
                        if (n < N && m < M)
                            partial[(static_cast<size_t>(blockIdx.z) * M + m) * N + n] = acc[i][t][e];
                    }
                }
            __threadfence();  // this split's sums are visible before its ticket
        }
        if (!qk::last_split_arrived(tickets + blockIdx.y * gridDim.x + blockIdx.x, splits, last_split)) return;
        if (warp != 0) return;
#pragma unroll
        for (int t = 0; t < NT; ++t)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int n = n0 + t * 8 + 2 * q + e % 2;
#pragma unroll
                for (int i = 0; i < MT; ++i) {
                    const int m = m0 + i * 16 + g + 8 * (e / 2);
                    float sum = 0.f;
                    if (n < N && m < M)
                        for (int z = 0; z < splits; ++z) sum += __ldcg(partial + (static_cast<size_t>(z) * M + m) * N + n);
                    acc[i][t][e] = sum;
                }
            }
    } else if (warp != 0) {
        return;
    }
#pragma unroll
    for (int t = 0; t < NT; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int n = n0 + t * 8 + 2 * q + e % 2;
            if (n >= N) continue;
            const float b = bias != nullptr ? qk::to_float(bias[n]) : 0.f;
#pragma unroll
            for (int i = 0; i < MT; ++i) {
                const int m = m0 + i * 16 + g + 8 * (e / 2);
                if (m < M) y[static_cast<size_t>(m) * N + n] = qk::from_float<T>(acc[i][t][e] + b);
            }
        }
}

// Dequantize the whole weight to T [N, K] (for large M, followed by a dense GEMM). One
// thread per 16 bytes of codes (32 / BITS * 4 consecutive columns of a row, one group),
// written as 16-byte stores; grid-stride.
template <int BITS, typename T>
__global__ void __launch_bounds__(256) qk_wq_dequant(
    const unsigned* __restrict__ qweight, const T* __restrict__ scales, const T* __restrict__ zeros,
    T* __restrict__ w, int N, int K, int group_size) {
    constexpr int CHUNK = 16 * 32 / BITS, REGS = 16 / BITS, COLS = CHUNK / 4;
    const int pieces = (K + CHUNK - 1) / CHUNK * 4;  // 16-byte pieces per row
    const int n_groups = (K + group_size - 1) / group_size;
    const long long total = static_cast<long long>(N) * pieces;
    const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
    for (long long idx = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += stride) {
        const int n = static_cast<int>(idx / pieces);
        const int k0 = static_cast<int>(idx % pieces) * COLS;
        if (k0 >= K) continue;  // padding
        const uint4 codes = __ldg(reinterpret_cast<const uint4*>(qweight) + idx);
        const size_t gi = static_cast<size_t>(n) * n_groups + k0 / group_size;
        const Dequant<BITS, T> dq(scales[gi], zeros[gi]);
        uint4* dst = reinterpret_cast<uint4*>(w + static_cast<size_t>(n) * K + k0);
#pragma unroll
        for (int wd = 0; wd < 4; ++wd) {
            const unsigned word = qk::word_of(codes, wd);
            unsigned pairs[REGS];
#pragma unroll
            for (int r = 0; r < REGS; ++r) pairs[r] = dq.reg(word, r);
            // a word is 32 / BITS columns = REGS pairs: 16 bytes at 4 bits, 8 at 8 bits
            if constexpr (REGS == 4) {
                dst[wd] = make_uint4(pairs[0], pairs[1], pairs[2], pairs[3]);
            } else {
                reinterpret_cast<uint2*>(dst)[wd] = make_uint2(pairs[0], pairs[1]);
            }
        }
    }
}
