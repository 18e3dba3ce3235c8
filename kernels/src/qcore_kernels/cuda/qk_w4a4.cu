// W4A4 linear (SVDQuant / Nunchaku style): y = x_q W_q^T + (x L1^T) L2^T + bias, with
// 4-bit activations quantized at run time per [token, group of 64 columns], 4-bit weights in
// groups of 64, int4 tensor-core products (mma.sync m16n8k64 .s4.s4, int32 per group) and
// the low-rank branch (L1 = lowrank_down [R, K], L2 = lowrank_up [N, R]) fused in: the
// activation kernel computes x L1^T in the same launch as the codes, over the same columns
// of x, and the GEMM's epilogue adds (x L1^T) L2^T and the bias.
//
// Layout "qk-w4a4" (built once per layer by the provider from the core's "int-packed"):
//   qweight  uint32 [Np, K / 8]  signed 4-bit values code - 8 (code ^ 8), eight per word,
//                                column 8w + i in bits 4i .. 4i+3 of word w (the core's
//                                bit order); rows N .. Np - 1 are zero (Np = N rounded up
//                                to 8: whole n8 tiles, 8-byte aligned scale pairs)
//   wscale   float  [G, Np]      weight scales, transposed (G = K / 64 groups)
//   wzero    int    [G, Np]      zero point - 8 (asymmetric weights; absent: symmetric)
//   wsum     int    [G, Np]      sum over the group of code - zero (read for asymmetric
//                                activations)
//   down     T      [Rp, K]      L1, rows R .. Rp - 1 zero (Rp = R rounded up to 32)
//   up       T      [Np, Rp]     L2, zero-padded
// Activations, written by qk_w4a4_quantize for each call:
//   xq       uint32 [M, K / 8]   signed 4-bit codes (symmetric: code in -7..7; asymmetric:
//                                code - 8), in the weights' bit order
//   xscale   float  [M, G]       scales, exactly qcore.grid.quantize_activation_groups'
//   xzero    int    [M, G]       zero point - 8 (asymmetric activations)
//   xsum     int    [M, G]       sum of the stored codes over the group (read for
//                                asymmetric weights)
//   xdown    float  [M, Rp]      x L1^T, float32 accumulation
//
// With A, B the stored signed codes and za, zw the stored zero points (0 when symmetric),
// a group contributes sa * sw * sum_k (A - za)(B - zw), and
//   sum_k (A - za)(B - zw) = sum_k A B - za * wsum - zw * xsum
// (wsum = sum_k (B - zw), xsum = sum_k A): one int4 MMA step per group, then integer
// corrections, then the group's two scales in float32.
//
// Column order inside a group: lane q of the four lanes that share a row owns the 16
// columns 16q .. 16q+15 (words 2q and 2q+1), the same for x, the weights and L1. The int4
// MMA maps its k positions 8q .. 8q+7 to word 2q and 32+8q .. 32+8q+7 to word 2q+1; the
// low-rank MMA (m16n8k16) maps its k16 step j, positions 2q, 2q+1 and 2q+8, 2q+9, to
// columns 16q + 4j .. 16q + 4j + 3. A dot product does not depend on the order of its terms.
//
// The provider guarantees K % 64 == 0 and 16-byte aligned x, down and up.
#include "qk_common.cuh"
#include "qk_mma.cuh"

namespace qk_w4a4 {

constexpr int GROUP = 64;           // columns per group: one m16n8k64 step
constexpr int WORDS = GROUP / 8;    // code words per row and group
constexpr int RANK_TILE = 32;       // low-rank columns per blockIdx.z of qk_w4a4_quantize
constexpr int QUANT_WARPS = 4;      // warps per qk_w4a4_quantize block (they split K)
constexpr int SYM_MAX = 7;          // symmetric 4-bit levels: -7 .. 7 (2^(bits-1) - 1)
constexpr int ASYM_MAX = 15;        // asymmetric 4-bit levels: 0 .. 15

// The 8 T values of a 16-byte load, as float.
template <typename T>
__device__ __forceinline__ void to_floats(const uint4& raw, float* out) {
    const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < 8; ++i) out[i] = qk::to_float(v[i]);
}

// What quantize_group gives each lane.
struct GroupCodes {
    uint2 words;  // stored signed codes of columns 16q .. 16q+7, 16q+8 .. 16q+15
    float scale;
    int zero;     // zero point - 8 (asymmetric), else 0
    int sum;      // sum of the group's stored codes (all four lanes)
};

// One row's group, 16 columns per lane (lanes 4g .. 4g+3 hold the row): the group's scale
// (and zero point) from all 64 values, the lane's 16 codes packed into two words. The
// arithmetic is qcore.grid.quantize_activation_groups' in float32, so that the codes are
// the core's bit for bit: an IEEE division by 7 (15), a true division x / scale (not a
// product with its reciprocal), round half to even.
template <bool ASYM>
__device__ __forceinline__ GroupCodes quantize_group(const float (&v)[16]) {
    GroupCodes out;
    float step, zero = 0.f;
    if constexpr (ASYM) {
        float lo = 0.f, hi = 0.f;  // the range always holds 0
#pragma unroll
        for (int i = 0; i < 16; ++i) {
            lo = fminf(lo, v[i]);
            hi = fmaxf(hi, v[i]);
        }
#pragma unroll
        for (int offset = 1; offset < 4; offset <<= 1) {
            lo = fminf(lo, __shfl_xor_sync(qk::FULL_MASK, lo, offset));
            hi = fmaxf(hi, __shfl_xor_sync(qk::FULL_MASK, hi, offset));
        }
        step = (hi - lo) / static_cast<float>(ASYM_MAX);
        step = step > 0.f ? step : 1.f;  // a group of zeros
        zero = fminf(fmaxf(rintf(-lo / step), 0.f), static_cast<float>(ASYM_MAX));
    } else {
        float amax = 0.f;
#pragma unroll
        for (int i = 0; i < 16; ++i) amax = fmaxf(amax, fabsf(v[i]));
#pragma unroll
        for (int offset = 1; offset < 4; offset <<= 1)
            amax = fmaxf(amax, __shfl_xor_sync(qk::FULL_MASK, amax, offset));
        step = amax / static_cast<float>(SYM_MAX);
        step = step > 0.f ? step : 1.f;
    }
    unsigned words[2] = {0u, 0u};
    int sum = 0;
#pragma unroll
    for (int i = 0; i < 16; ++i) {
        // __float2int_rn rounds half to even, like torch.round
        int code = __float2int_rn(v[i] / step);
        if constexpr (ASYM) {
            code = max(0, min(code + static_cast<int>(zero), ASYM_MAX)) - 8;  // stored as code - 8
        } else {
            code = max(-SYM_MAX, min(code, SYM_MAX));
        }
        sum += code;
        words[i / 8] |= (static_cast<unsigned>(code) & 0xfu) << (4 * (i % 8));
    }
#pragma unroll
    for (int offset = 1; offset < 4; offset <<= 1) sum += __shfl_xor_sync(qk::FULL_MASK, sum, offset);
    out.words = make_uint2(words[0], words[1]);
    out.scale = step;
    out.zero = ASYM ? static_cast<int>(zero) - 8 : 0;
    out.sum = sum;
    return out;
}

}  // namespace qk_w4a4

// Activation quantization and the low-rank projection in one launch.
// Grid: x = token tiles of 16, y = K split into gridDim.y ranges of groups, z = low-rank
// columns in tiles of RANK_TILE (1 without a branch). A block's QUANT_WARPS warps take the
// groups of its range in turn; lane (g, q) reads rows g and g + 8 of the tile, columns
// 16q .. 16q+15 of the group (rows past M read as zeros).
// - Blocks with blockIdx.z == 0 quantize: codes to xq, scales, zero points (ASYM) and, when
//   ``xsum`` is given, the sums of the stored codes.
// - Then, with ``down`` (L1, [rank, K], rank a multiple of RANK_TILE), each warp reads its
//   groups of x again (from cache) and multiplies x's 16 x 64 tile with L1's 32 x 64 tile on
//   tensor cores (m16n8k16, float32); the warps' sums are added in a fixed order;
//   with several K ranges each block stores its sum in ``partial`` [splits, M, rank] and the
//   last block of a (token tile, rank tile) to finish adds them in range order (``tickets``:
//   one int per tile, zero before the launch, reset by that block), so xdown does not
//   depend on which block ends last.
template <typename T, bool ASYM>
__global__ void __launch_bounds__(qk_w4a4::QUANT_WARPS * 32) qk_w4a4_quantize(
    const T* __restrict__ x, unsigned* __restrict__ xq, float* __restrict__ xscale,
    int* __restrict__ xzero, int* __restrict__ xsum, const T* __restrict__ down,
    float* __restrict__ xdown, float* __restrict__ partial, int* __restrict__ tickets, int M,
    int K, int rank) {
    using namespace qk_w4a4;
    constexpr int KW = QUANT_WARPS;
    constexpr int NT = RANK_TILE / 8;  // n8 tiles of low-rank columns
    __shared__ float reduce[KW / 2][NT * 4][32];
    __shared__ int last_split;

    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int g = lane / 4, q = lane % 4;
    const int m0 = blockIdx.x * 16;
    const int groups = K / GROUP, words_per_row = K / 8;
    const int splits = gridDim.y;
    const int g_begin = static_cast<int>(static_cast<long long>(groups) * blockIdx.y / splits);
    const int g_end = static_cast<int>(static_cast<long long>(groups) * (blockIdx.y + 1) / splits);
    const int r0 = blockIdx.z * RANK_TILE;
    const bool quantizes = blockIdx.z == 0;

    // x rows g and g + 8 of the tile, columns 16q .. 16q+15 of group grp (zeros past M)
    auto load_x = [&](uint4 (&xs)[2][2], int grp) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int row = m0 + g + 8 * h;
#pragma unroll
            for (int l = 0; l < 2; ++l)
                xs[h][l] = row < M ? __ldg(reinterpret_cast<const uint4*>(x + static_cast<size_t>(row) * K + grp * GROUP + 16 * q + 8 * l))
                                   : make_uint4(0u, 0u, 0u, 0u);
        }
    };

    // Quantization first, then the low-rank product over the same columns (read again, from
    // cache): the division's slow path is a call, and nothing else is live across it here.
    if (quantizes) {
        for (int grp = g_begin + warp; grp < g_end; grp += KW) {
            uint4 xs[2][2];
            load_x(xs, grp);
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                float v[16];
                to_floats<T>(xs[h][0], v);
                to_floats<T>(xs[h][1], v + 8);
                const GroupCodes c = quantize_group<ASYM>(v);
                const int row = m0 + g + 8 * h;
                if (row < M) {
                    *reinterpret_cast<uint2*>(xq + static_cast<size_t>(row) * words_per_row + grp * WORDS + 2 * q) = c.words;
                    if (q == 0) {
                        const size_t gi = static_cast<size_t>(row) * groups + grp;
                        xscale[gi] = c.scale;
                        if constexpr (ASYM) xzero[gi] = c.zero;
                        if (xsum != nullptr) xsum[gi] = c.sum;
                    }
                }
            }
        }
    }
    if (down == nullptr) return;  // the whole grid: no barrier follows

    float acc[NT][4];
#pragma unroll
    for (int t = 0; t < NT; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[t][e] = 0.f;
    for (int grp = g_begin + warp; grp < g_end; grp += KW) {
        const int col = grp * GROUP + 16 * q;
        uint4 xs[2][2];
        load_x(xs, grp);
        uint4 ls[NT][2];  // L1 rows r0 + 8t + g, the same columns
#pragma unroll
        for (int t = 0; t < NT; ++t)
#pragma unroll
            for (int l = 0; l < 2; ++l)
                ls[t][l] = __ldg(reinterpret_cast<const uint4*>(down + static_cast<size_t>(r0 + 8 * t + g) * K + col + 8 * l));
#pragma unroll
        for (int j = 0; j < 4; ++j) {  // k16 step j: columns 16q + 4j .. 16q + 4j + 3
            const unsigned a[4] = {qk::word_of(xs[0][j / 2], (2 * j) % 4), qk::word_of(xs[1][j / 2], (2 * j) % 4),
                                   qk::word_of(xs[0][j / 2], (2 * j + 1) % 4), qk::word_of(xs[1][j / 2], (2 * j + 1) % 4)};
#pragma unroll
            for (int t = 0; t < NT; ++t) {
                const unsigned b[2] = {qk::word_of(ls[t][j / 2], (2 * j) % 4), qk::word_of(ls[t][j / 2], (2 * j + 1) % 4)};
                qk::mma_16816<T>(acc[t], a, b);
            }
        }
    }

    // Tree reduction over the warps, in shared memory, in a fixed order.
#pragma unroll
    for (int half = KW / 2; half >= 1; half /= 2) {
        if (warp >= half && warp < 2 * half) {
#pragma unroll
            for (int t = 0; t < NT; ++t)
#pragma unroll
                for (int e = 0; e < 4; ++e) reduce[warp - half][t * 4 + e][lane] = acc[t][e];
        }
        __syncthreads();
        if (warp < half) {
#pragma unroll
            for (int t = 0; t < NT; ++t)
#pragma unroll
                for (int e = 0; e < 4; ++e) acc[t][e] += reduce[warp][t * 4 + e][lane];
        }
        __syncthreads();
    }

    // C fragment: acc[t][e] is token m0 + g + 8 * (e / 2), low-rank column r0 + 8t + 2q + e % 2.
    if (splits > 1) {
        if (warp == 0) {
#pragma unroll
            for (int t = 0; t < NT; ++t)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int m = m0 + g + 8 * (e / 2), r = r0 + 8 * t + 2 * q + e % 2;
                    if (m < M) partial[(static_cast<size_t>(blockIdx.y) * M + m) * rank + r] = acc[t][e];
                }
            __threadfence();  // this range's sums are visible before its ticket
        }
        if (!qk::last_split_arrived(tickets + blockIdx.x * gridDim.z + blockIdx.z, splits, last_split)) return;
        if (warp != 0) return;
#pragma unroll
        for (int t = 0; t < NT; ++t)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int m = m0 + g + 8 * (e / 2), r = r0 + 8 * t + 2 * q + e % 2;
                float sum = 0.f;
                if (m < M)
                    for (int s = 0; s < splits; ++s) sum += __ldcg(partial + (static_cast<size_t>(s) * M + m) * rank + r);
                acc[t][e] = sum;
            }
    } else if (warp != 0) {
        return;
    }
#pragma unroll
    for (int t = 0; t < NT; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int m = m0 + g + 8 * (e / 2);
            if (m < M) xdown[static_cast<size_t>(m) * rank + r0 + 8 * t + 2 * q + e % 2] = acc[t][e];
        }
}

// The W4A4 GEMM with the low-rank epilogue: y [M, N] (T) from qk_w4a4_quantize's outputs and
// the qk-w4a4 weight. Grid: x = channel tiles of WN * NT * 8, y = token tiles of MT * 16. A
// block is WN x KW warps: warp (wk, wn) computes tokens m0 .. m0 + MT*16 - 1 times channels
// n0 + wn * NT * 8 .. + NT * 8 - 1 over the groups wk, wk + KW, ...; each lane loads 8 bytes
// of codes per row and group (words 2q, 2q+1) straight into MMA fragments, with the next
// group's loads in flight while the current one computes. Per group, one int4 MMA per
// 16 x 8 tile gives the int32 sum; the zero-point corrections (ZERO) and the two scales turn
// it into float32, added over the groups. The KW warps' sums are added in shared memory in a
// fixed order; warps wk == 0 then add (x L1^T) L2^T on tensor cores (m16n8k16: xdown rounded
// to T, as the unfused branch rounds it, fp32 accumulation) when ``xdown`` is given, and the
// bias, and write y. Rows past M read as zeros and are not written.
template <typename T, bool ZERO, int MT, int NT, int WN, int KW>
__global__ void __launch_bounds__(WN * KW * 32) qk_w4a4_gemm(
    const unsigned* __restrict__ xq, const float* __restrict__ xscale, const int* __restrict__ xzero,
    const int* __restrict__ xsum, const unsigned* __restrict__ wq, const float* __restrict__ wscale,
    const int* __restrict__ wzero, const int* __restrict__ wsum, const float* __restrict__ xdown,
    const T* __restrict__ up, const T* __restrict__ bias, T* __restrict__ y, int M, int N, int K,
    int rank, int n_padded) {
    using namespace qk_w4a4;
    using T2 = typename qk::Pair<T>::type;
    constexpr int ACC = MT * NT * 4;  // accumulators per lane
    constexpr bool SPLIT = KW > 1;    // warps that split K: partial sums in shared memory
    __shared__ float reduce[SPLIT ? KW / 2 : 1][SPLIT ? WN : 1][SPLIT ? ACC : 1][32];

    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int wn = warp % WN, wk = warp / WN;
    const int g = lane / 4, q = lane % 4;
    const int m0 = blockIdx.y * MT * 16;
    const int n0 = (blockIdx.x * WN + wn) * NT * 8;
    const int groups = K / GROUP, words_per_row = K / 8;

    float acc[MT][NT][4];
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int t = 0; t < NT; ++t)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][t][e] = 0.f;

    // This lane's weight row of each n8 tile, and the first of its two scale columns,
    // clamped to the layout's n_padded rows: the results of channels past N are dropped.
    int wrow[NT], wcol[NT];
#pragma unroll
    for (int t = 0; t < NT; ++t) {
        wrow[t] = min(n0 + 8 * t + g, n_padded - 1);
        wcol[t] = min(n0 + 8 * t + 2 * q, n_padded - 2);
    }

    // A stage: one group's fragments and the numbers that scale them.
    struct Stage {
        uint2 a[MT][2];    // x rows g, g + 8 of each token tile: words 2q, 2q+1
        uint2 b[NT];       // weight row n0 + 8t + g: words 2q, 2q+1
        float sa[MT][2];   // x scales of those rows
        float2 sw[NT];     // weight scales of channels n0 + 8t + 2q, + 1
        int za[MT][2], xs[MT][2];
        int2 zw[NT], ws[NT];
    };
    auto load = [&](Stage& s, int grp) {
#pragma unroll
        for (int i = 0; i < MT; ++i)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int row = m0 + i * 16 + g + 8 * h;
                const bool in = row < M;
                const size_t gi = static_cast<size_t>(row) * groups + grp;
                s.a[i][h] = in ? __ldg(reinterpret_cast<const uint2*>(xq + static_cast<size_t>(row) * words_per_row + grp * WORDS + 2 * q))
                               : make_uint2(0u, 0u);
                s.sa[i][h] = in ? __ldg(xscale + gi) : 0.f;
                if constexpr (ZERO) {
                    s.za[i][h] = in && xzero != nullptr ? __ldg(xzero + gi) : 0;
                    s.xs[i][h] = in && xsum != nullptr ? __ldg(xsum + gi) : 0;
                }
            }
#pragma unroll
        for (int t = 0; t < NT; ++t) {
            s.b[t] = __ldg(reinterpret_cast<const uint2*>(wq + static_cast<size_t>(wrow[t]) * words_per_row + grp * WORDS + 2 * q));
            const size_t gi = static_cast<size_t>(grp) * n_padded + wcol[t];
            s.sw[t] = __ldg(reinterpret_cast<const float2*>(wscale + gi));
            if constexpr (ZERO) {
                s.zw[t] = wzero != nullptr ? __ldg(reinterpret_cast<const int2*>(wzero + gi)) : make_int2(0, 0);
                s.ws[t] = wsum != nullptr ? __ldg(reinterpret_cast<const int2*>(wsum + gi)) : make_int2(0, 0);
            }
        }
    };
    auto compute = [&](const Stage& s) {
#pragma unroll
        for (int i = 0; i < MT; ++i) {
            const unsigned a[4] = {s.a[i][0].x, s.a[i][1].x, s.a[i][0].y, s.a[i][1].y};
#pragma unroll
            for (int t = 0; t < NT; ++t) {
                const unsigned b[2] = {s.b[t].x, s.b[t].y};
                int dot[4] = {0, 0, 0, 0};
                qk::mma_s4_16864(dot, a, b);
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int h = e / 2;
                    int sum = dot[e];
                    if constexpr (ZERO) {
                        const int zw = e % 2 ? s.zw[t].y : s.zw[t].x, ws = e % 2 ? s.ws[t].y : s.ws[t].x;
                        sum -= s.za[i][h] * ws + zw * s.xs[i][h];
                    }
                    const float sw = e % 2 ? s.sw[t].y : s.sw[t].x;
                    acc[i][t][e] += static_cast<float>(sum) * (s.sa[i][h] * sw);
                }
            }
        }
    };

    // Two stages in flight, ping-pong: while one group is computed the next one loads.
    Stage s0, s1;
    int grp = wk;
    if (grp < groups) load(s0, grp);
    for (; grp < groups; grp += 2 * KW) {
        if (grp + KW < groups) load(s1, grp + KW);
        compute(s0);
        if (grp + KW >= groups) break;
        if (grp + 2 * KW < groups) load(s0, grp + 2 * KW);
        compute(s1);
    }

    // Tree reduction over the KW warps of each wn, in shared memory, in a fixed order.
#pragma unroll
    for (int half = KW / 2; half >= 1; half /= 2) {
        if (wk >= half && wk < 2 * half) {
#pragma unroll
            for (int i = 0; i < MT; ++i)
#pragma unroll
                for (int t = 0; t < NT; ++t)
#pragma unroll
                    for (int e = 0; e < 4; ++e) reduce[wk - half][wn][(i * NT + t) * 4 + e][lane] = acc[i][t][e];
        }
        __syncthreads();
        if (wk < half) {
#pragma unroll
            for (int i = 0; i < MT; ++i)
#pragma unroll
                for (int t = 0; t < NT; ++t)
#pragma unroll
                    for (int e = 0; e < 4; ++e) acc[i][t][e] += reduce[wk][wn][(i * NT + t) * 4 + e][lane];
        }
        __syncthreads();
    }
    if (wk != 0) return;

    // Low-rank epilogue: acc += xdown[m, :] . up[n, :], k16 steps over the rank.
    if (xdown != nullptr) {
        for (int r = 0; r < rank; r += 16) {
            unsigned a[MT][4];
#pragma unroll
            for (int i = 0; i < MT; ++i)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int row = m0 + i * 16 + g + 8 * h;
                    float2 lo = make_float2(0.f, 0.f), hi = lo;
                    if (row < M) {
                        const float* src = xdown + static_cast<size_t>(row) * rank + r + 2 * q;
                        lo = *reinterpret_cast<const float2*>(src);
                        hi = *reinterpret_cast<const float2*>(src + 8);
                    }
                    a[i][h] = qk::as_bits(qk::Pair<T>::make(qk::from_float<T>(lo.x), qk::from_float<T>(lo.y)));
                    a[i][2 + h] = qk::as_bits(qk::Pair<T>::make(qk::from_float<T>(hi.x), qk::from_float<T>(hi.y)));
                }
#pragma unroll
            for (int t = 0; t < NT; ++t) {
                const T* src = up + static_cast<size_t>(wrow[t]) * rank + r + 2 * q;
                const unsigned b[2] = {qk::as_bits(*reinterpret_cast<const T2*>(src)),
                                       qk::as_bits(*reinterpret_cast<const T2*>(src + 8))};
#pragma unroll
                for (int i = 0; i < MT; ++i) qk::mma_16816<T>(acc[i][t], a[i], b);
            }
        }
    }

    // C fragment: acc[i][t][e] is token m0 + 16i + g + 8 * (e / 2), channel n0 + 8t + 2q + e % 2.
#pragma unroll
    for (int t = 0; t < NT; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int n = n0 + 8 * t + 2 * q + e % 2;
            if (n >= N) continue;
            const float b = bias != nullptr ? qk::to_float(bias[n]) : 0.f;
#pragma unroll
            for (int i = 0; i < MT; ++i) {
                const int m = m0 + i * 16 + g + 8 * (e / 2);
                if (m < M) y[static_cast<size_t>(m) * N + n] = qk::from_float<T>(acc[i][t][e] + b);
            }
        }
}
