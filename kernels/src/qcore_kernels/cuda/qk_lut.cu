// Codebook (vector-quantized) linears, op lut_linear: y = x @ W^T + bias for the core's
// "vq" weights (docs/codebook-format.md), decoding indices through lookup tables.
//
// Layout "qk-lut" (qcore_kernels.lut_layout; the core's "vq-packed" streams, unchanged):
//   codes    uint32 [N, row_words]   indices of one part along each row as qcore.bitpack's
//                                    stream: every 32 indices fill `bits` words, index k of
//                                    a chunk at stream bits k*bits .. k*bits+bits-1 (least
//                                    significant first); row_words = ceil(n_vec/32) * bits
//   codebook __half [rows, V]        fp16, rows <= 2^bits
//   rcodes / rcodebook               optional residual stage (rbits, its own rows), added
//   scale, offset __half [N]         optional: W = W * scale + offset per output channel
// One launch covers one part of the columns (main or outliers): x [M, ldx] holds that
// part's K columns (the host gathers them), vector j covers columns j*V .. j*V+V-1, the
// last one partial when K % V != 0 (its entries past K are dropped).
//
// GEMV (M <= 16, token tiles of MT): persistent blocks, one per multiprocessor, of 32
// (MT = 1), 16 (MT = 4) or 8 warps (MT = 8, 16). Each block converts the codebook(s) into
// shared memory once (dynamic shared memory, opt-in beyond 48 KB), copies its MT rows of x
// there too when they fit, and each warp walks groups of R output channels (R = 1, 2, 2, 3
// by tile; grid-stride) in steps of 8 chunks (256 indices). A step's index words are loaded
// coalesced (4-byte loads, one 128-byte line per warp instruction) into registers one step
// ahead, across channel ends, then stored to a per-warp staging buffer; lane l decodes index
// l of each chunk of each of the R channels from it (two 4-byte reads and a funnel shift,
// any width 1..16), reads the V weights from the shared codebook (one 8/16-byte read for
// V = 4/8, three 4-byte reads for V = 6), and multiplies them with V activations per token,
// each activation read serving the R channels; float accumulation, then a warp reduction.
// The epilogue applies scale, offset (times the token's sum of x, from the host) and bias,
// or writes the raw float dot product for a later launch to add (`addend`): the outlier
// part runs first into a float buffer that the main part adds.
//
// Dequantize (any M, any V): one thread per vector writes its V weights of the dense T
// weight, scale and offset applied, for torch's GEMM.
#include "qk_common.cuh"

namespace qk_lut {
constexpr int STEP_CHUNKS = 8;                  // chunks of 32 indices per warp step
constexpr int STEP = STEP_CHUNKS * 32;          // indices per warp step
constexpr int MAX_BITS = 16;
constexpr int PREFETCH = STEP_CHUNKS * MAX_BITS / 32;  // index words per lane per step (max)
static_assert(PREFETCH == 4, "a step of 16-bit indices is one 16-byte load per lane");

// Staging words per warp for a stream of `bits` (0: none). The 4 spare words keep 16-byte
// alignment and absorb the read one word past a step's last chunk.
__host__ __device__ constexpr int stage_words(int bits) { return bits ? STEP_CHUNKS * bits + 4 : 0; }
// Threads per GEMV block by token tile (registers: 64, 128, 255 per thread).
__host__ __device__ constexpr int threads(int mt) { return mt == 1 ? 1024 : mt <= 4 ? 512 : 256; }
// Output channels a warp computes together by token tile: each activation load then serves
// that many channels (the activations' shared-memory traffic grows with the tokens).
__host__ __device__ constexpr int rows_per_warp(int mt) { return mt >= 16 ? 3 : mt >= 4 ? 2 : 1; }
__host__ __device__ constexpr int align8(int n) { return (n + 7) / 8 * 8; }  // elements, 16 bytes
}  // namespace qk_lut

#ifdef QK_CPU_HARNESS
// The CPU harness has no dynamic shared memory; blocks run one after another, so one static
// buffer stands in for it (the host checks its request against QK_LUT_CPU_SMEM).
#define QK_LUT_CPU_SMEM (256 * 1024)
#endif

// V weights or activations (T) at p, to float; p is aligned to V * 2 bytes (V = 4, 8) or 4
// bytes (even V).
template <typename T, int V>
__device__ __forceinline__ void lut_load(const T* __restrict__ p, float* out) {
    if constexpr (V == 8) {
        const uint4 r = *reinterpret_cast<const uint4*>(p);
        const T* v = reinterpret_cast<const T*>(&r);
#pragma unroll
        for (int e = 0; e < 8; ++e) out[e] = qk::to_float(v[e]);
    } else if constexpr (V == 4) {
        const uint2 r = *reinterpret_cast<const uint2*>(p);
        const T* v = reinterpret_cast<const T*>(&r);
#pragma unroll
        for (int e = 0; e < 4; ++e) out[e] = qk::to_float(v[e]);
    } else if constexpr (V % 2 == 0) {
#pragma unroll
        for (int i = 0; i < V / 2; ++i) {
            const unsigned r = reinterpret_cast<const unsigned*>(p)[i];
            const T* v = reinterpret_cast<const T*>(&r);
            out[2 * i] = qk::to_float(v[0]);
            out[2 * i + 1] = qk::to_float(v[1]);
        }
    } else {
#pragma unroll
        for (int e = 0; e < V; ++e) out[e] = qk::to_float(p[e]);
    }
}

// Codebook row idx (V values at cb + idx * V in shared memory) to float. V = 6: a 12-byte
// row starts 8-byte aligned (even idx) or 4 bytes past (odd idx); one 8-byte and one
// 4-byte read (instead of three 4-byte ones) take fewer bank conflicts on random rows.
template <typename T, int V>
__device__ __forceinline__ void lut_row(const T* cb, unsigned idx, float* out) {
    if constexpr (V == 6) {
        const unsigned* base = reinterpret_cast<const unsigned*>(cb + idx * 6);
        const bool odd = idx & 1u;
        const uint2 a = *reinterpret_cast<const uint2*>(base + (odd ? 1 : 0));  // 8-byte aligned
        const unsigned b = base[odd ? 0 : 2];
        const unsigned words[3] = {odd ? b : a.x, odd ? a.x : a.y, odd ? a.y : b};
#pragma unroll
        for (int i = 0; i < 3; ++i) {
            const T* v = reinterpret_cast<const T*>(&words[i]);
            out[2 * i] = qk::to_float(v[0]);
            out[2 * i + 1] = qk::to_float(v[1]);
        }
    } else {
        lut_load<T, V>(cb + idx * V, out);
    }
}

// Index `lane` of a chunk whose words start at s: the two words around its bits (lw: its
// first word, lo: its shift), funnel-shifted and masked.
__device__ __forceinline__ unsigned lut_extract(const unsigned* s, int lw, int lo, unsigned mask) {
    const unsigned long long win =
        static_cast<unsigned long long>(s[lw]) | (static_cast<unsigned long long>(s[lw + 1]) << 32);
    return static_cast<unsigned>(win >> lo) & mask;
}

// fp16 codebook rows [rows, V] -> T in shared memory (16-byte copies, then the tail).
template <typename T>
__device__ __forceinline__ void lut_fill(T* dst, const __half* __restrict__ src, int count) {
    const int n8 = count / 8;
    for (int i = threadIdx.x; i < n8; i += blockDim.x) {
        const uint4 r = __ldg(reinterpret_cast<const uint4*>(src) + i);
        const __half* h = reinterpret_cast<const __half*>(&r);
        __align__(16) T out[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) out[e] = qk::from_float<T>(__half2float(h[e]));
        reinterpret_cast<uint4*>(dst)[i] = *reinterpret_cast<const uint4*>(out);
    }
    for (int i = n8 * 8 + threadIdx.x; i < count; i += blockDim.x)
        dst[i] = qk::from_float<T>(__half2float(src[i]));
}

template <typename T, int V, int MT>
__global__ void __launch_bounds__(qk_lut::threads(MT), 1) qk_lut_gemv(
    const T* __restrict__ x, int ldx, int K, int x_shared,
    const unsigned* __restrict__ codes, int bits, int row_words,
    const __half* __restrict__ codebook, int cb_rows,
    const unsigned* __restrict__ rcodes, int rbits, int rrow_words,
    const __half* __restrict__ rcodebook, int rcb_rows,
    const float* __restrict__ addend, const __half* __restrict__ scale,
    const __half* __restrict__ offset, const float* __restrict__ xsum,
    const T* __restrict__ bias, T* __restrict__ y, float* __restrict__ y_raw, int M, int N) {
    using namespace qk_lut;
#ifdef QK_CPU_HARNESS
    __shared__ __align__(16) unsigned char smem[QK_LUT_CPU_SMEM];
#else
    extern __shared__ __align__(16) unsigned char smem[];
#endif
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    const int n_vec = (K + V - 1) / V, n_full = K / V;
    const int steps = ((n_vec + 31) / 32 + STEP_CHUNKS - 1) / STEP_CHUNKS;  // per channel
    constexpr int R = rows_per_warp(MT);
    const int groups = (N + R - 1) / R;  // channels n = R * g .. R * g + R - 1
    const int total_warps = gridDim.x * warps;
    const int first_group = blockIdx.x * warps + warp;
    const int my_groups = first_group < groups ? (groups - 1 - first_group) / total_warps + 1 : 0;
    const int total_steps = my_groups * steps;
    const int m0 = blockIdx.y * MT;
    const bool residual = rcodes != nullptr;

    T* s_cb = reinterpret_cast<T*>(smem);
    T* s_rcb = s_cb + align8(cb_rows * V);
    // Per warp: R main staging buffers, then R residual ones.
    unsigned* s_stage = reinterpret_cast<unsigned*>(s_rcb + (residual ? align8(rcb_rows * V) : 0)) +
                        warp * R * (stage_words(bits) + stage_words(residual ? rbits : 0));
    unsigned* s_rstage = s_stage + R * stage_words(bits);
    // x_shared: the block's MT rows of x (rows past M repeat the last one) after the
    // staging buffers, read from shared memory instead of L1 (conflict-free for any V).
    T* s_x = reinterpret_cast<T*>(reinterpret_cast<unsigned*>(s_rcb + (residual ? align8(rcb_rows * V) : 0)) +
                                  warps * R * (stage_words(bits) + stage_words(residual ? rbits : 0)));

    const int step_words = STEP_CHUNKS * bits, rstep_words = STEP_CHUNKS * rbits;
    unsigned pre[R][PREFETCH], rpre[R][PREFETCH];
    // Rows of a whole number of 16-byte words (any width when 128 | 32 * n_chunks * bits,
    // e.g. 8, 12 and 16 bits): each step starts 16-byte aligned, and lane l loads words
    // 4l .. 4l+3 with one 16-byte load; otherwise words l, l+32, ... with 4-byte loads.
    const bool vec = row_words % 4 == 0, rvec = rrow_words % 4 == 0;
    // Index words [0, limit) of one step of one stream into w (zeros past limit).
    auto load_step = [&](const unsigned* src, int limit, bool v16, unsigned* w) {
        if (v16) {
            const uint4 q = 4 * lane < limit ? __ldg(reinterpret_cast<const uint4*>(src) + lane)
                                             : make_uint4(0u, 0u, 0u, 0u);
            w[0] = q.x, w[1] = q.y, w[2] = q.z, w[3] = q.w;
        } else {
#pragma unroll
            for (int i = 0; i < PREFETCH; ++i) w[i] = lane + 32 * i < limit ? __ldg(src + lane + 32 * i) : 0u;
        }
    };
    // The words loaded by load_step into a staging buffer of `count` words.
    auto stage = [&](unsigned* dst, int count, bool v16, const unsigned* w) {
        if (v16) {
            if (4 * lane < count) reinterpret_cast<uint4*>(dst)[lane] = make_uint4(w[0], w[1], w[2], w[3]);
        } else {
#pragma unroll
            for (int i = 0; i < PREFETCH; ++i)
                if (lane + 32 * i < count) dst[lane + 32 * i] = w[i];
        }
    };
    // Index words of warp step t for each channel of its group (zeros past a channel's end,
    // past the last channel or past the last step).
    auto prefetch = [&](int t) {
        const int n0 = (first_group + (t / steps) * total_warps) * R, s = t % steps;
        const bool live = t < total_steps;
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const bool on = live && n0 + r < N;
            load_step(codes + static_cast<size_t>(n0 + r) * row_words + s * step_words,
                      on ? min(step_words, row_words - s * step_words) : 0, vec, pre[r]);
            if (residual)
                load_step(rcodes + static_cast<size_t>(n0 + r) * rrow_words + s * rstep_words,
                          on ? min(rstep_words, rrow_words - s * rstep_words) : 0, rvec, rpre[r]);
        }
    };
    prefetch(0);  // in flight while the codebooks are converted

    lut_fill(s_cb, codebook, cb_rows * V);
    if (residual) lut_fill(s_rcb, rcodebook, rcb_rows * V);
    if (x_shared) {  // ldx is a multiple of 8: 16-byte copies
        const int row16 = ldx / 8;
        for (int i = threadIdx.x; i < MT * row16; i += blockDim.x) {
            const int r = i / row16;
            reinterpret_cast<uint4*>(s_x)[i] =
                __ldg(reinterpret_cast<const uint4*>(x + min(m0 + r, M - 1) * ldx) + i % row16);
        }
    }
    __syncthreads();  // the last block-wide barrier: warps may leave from here on

    const unsigned mask = bits >= 32 ? 0xffffffffu : (1u << bits) - 1u;
    const unsigned rmask = rbits >= 32 ? 0xffffffffu : (1u << rbits) - 1u;
    const int lw = (lane * bits) >> 5, lo = (lane * bits) & 31;
    const int rlw = (lane * rbits) >> 5, rlo = (lane * rbits) & 31;

    // Token i's row of x: min(m0 + i, M - 1) - x0 rows from xb (in shared or global memory).
    const T* xb = x_shared ? s_x : x;
    const int x0 = x_shared ? m0 : 0;

    float acc[R][MT];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int i = 0; i < MT; ++i) acc[r][i] = 0.f;

    for (int t = 0; t < total_steps; ++t) {
        const int s = t % steps;
        const int n0 = (first_group + (t / steps) * total_warps) * R;
#pragma unroll
        for (int r = 0; r < R; ++r) {
            stage(s_stage + r * stage_words(bits), step_words, vec, pre[r]);
            if (residual) stage(s_rstage + r * stage_words(rbits), rstep_words, rvec, rpre[r]);
        }
        __syncwarp();
        prefetch(t + 1);

        const int j0 = s * STEP;
        const int chunks = min(STEP_CHUNKS, (n_vec - j0 + 31) / 32);
#pragma unroll 1
        for (int c = 0; c < chunks; ++c) {
            const int j = j0 + c * 32 + lane;
            if (j < n_vec) {
                float w[R][V];
#pragma unroll
                for (int r = 0; r < R; ++r) {
                    lut_row<T, V>(s_cb, lut_extract(s_stage + r * stage_words(bits) + c * bits, lw, lo, mask), w[r]);
                    if (residual) {
                        float rv[V];
                        lut_row<T, V>(s_rcb, lut_extract(s_rstage + r * stage_words(rbits) + c * rbits,
                                                         rlw, rlo, rmask), rv);
#pragma unroll
                        for (int e = 0; e < V; ++e) w[r][e] += rv[e];
                    }
                }
                if (j < n_full) {
#pragma unroll
                    for (int i = 0; i < MT; ++i) {
                        float xv[V];
                        // Rows past M repeat the last row (no branch); their results are not written.
                        lut_load<T, V>(xb + ((min(m0 + i, M - 1) - x0) * ldx + j * V), xv);
#pragma unroll
                        for (int r = 0; r < R; ++r)
#pragma unroll
                            for (int e = 0; e < V; ++e) acc[r][i] = fmaf(w[r][e], xv[e], acc[r][i]);
                    }
                } else {  // the partial last vector: columns past K are dropped
#pragma unroll
                    for (int i = 0; i < MT; ++i) {
#pragma unroll
                        for (int e = 0; e < V; ++e) {
                            const float xe = j * V + e < K
                                ? qk::to_float(xb[(min(m0 + i, M - 1) - x0) * ldx + j * V + e]) : 0.f;
#pragma unroll
                            for (int r = 0; r < R; ++r) acc[r][i] = fmaf(w[r][e], xe, acc[r][i]);
                        }
                    }
                }
            }
        }

        if (s == steps - 1) {  // the group's channels are done (warp-uniform)
#pragma unroll
            for (int r = 0; r < R; ++r) {
                const int row = n0 + r;
                const bool valid = row < N;  // warp-uniform
                const float sc = valid && scale != nullptr ? __half2float(scale[row]) : 1.f;
                const float of = valid && offset != nullptr ? __half2float(offset[row]) : 0.f;
                const float b = valid && bias != nullptr ? qk::to_float(bias[row]) : 0.f;
#pragma unroll
                for (int i = 0; i < MT; ++i) {
                    float v = qk::warp_sum(acc[r][i]);
                    acc[r][i] = 0.f;
                    const int m = m0 + i;
                    if (lane == 0 && valid && m < M) {
                        const size_t o = static_cast<size_t>(m) * N + row;
                        if (addend != nullptr) v += addend[o];
                        if (y_raw != nullptr) {
                            y_raw[o] = v;
                        } else {
                            v *= sc;
                            if (offset != nullptr) v = fmaf(of, xsum[m], v);
                            y[o] = qk::from_float<T>(v + b);
                        }
                    }
                }
            }
        }
        __syncwarp();  // every lane is done with the staging buffer
    }
}

// Decode one part to the dense weight w [N, ldw] in T: column col of the part goes to
// column cols[col] of w (cols == nullptr: the same column), as (codebook + residual) *
// scale + offset, rounded once. One thread per vector, grid-stride; any vector size.
template <typename T>
__global__ void __launch_bounds__(256) qk_lut_dequant(
    const unsigned* __restrict__ codes, int bits, int row_words, const __half* __restrict__ codebook,
    const unsigned* __restrict__ rcodes, int rbits, int rrow_words,
    const __half* __restrict__ rcodebook, int V, int width, const int* __restrict__ cols,
    const __half* __restrict__ scale, const __half* __restrict__ offset, T* __restrict__ w,
    int ldw, int N) {
    const int n_vec = (width + V - 1) / V;
    const long long total = static_cast<long long>(N) * n_vec;
    const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
    for (long long id = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; id < total; id += stride) {
        const int n = static_cast<int>(id / n_vec), j = static_cast<int>(id % n_vec);
        auto index = [&](const unsigned* stream, int b, int words) {
            const int bit = (j % 32) * b;
            const int word = (j / 32) * b + (bit >> 5);
            const unsigned* row = stream + static_cast<size_t>(n) * words;
            const unsigned long long lo = __ldg(row + word);
            const unsigned long long hi = word + 1 < words ? __ldg(row + word + 1) : 0u;
            return static_cast<unsigned>((lo | (hi << 32)) >> (bit & 31)) & ((1u << b) - 1u);
        };
        const __half* e = codebook + static_cast<size_t>(index(codes, bits, row_words)) * V;
        const __half* r = rcodes != nullptr
            ? rcodebook + static_cast<size_t>(index(rcodes, rbits, rrow_words)) * V : nullptr;
        const float sc = scale != nullptr ? __half2float(scale[n]) : 1.f;
        const float of = offset != nullptr ? __half2float(offset[n]) : 0.f;
        T* dst = w + static_cast<size_t>(n) * ldw;
        for (int k = 0; k < V && j * V + k < width; ++k) {
            float v = __half2float(e[k]);
            if (r != nullptr) v += __half2float(r[k]);
            const int col = j * V + k;
            dst[cols != nullptr ? cols[col] : col] = qk::from_float<T>(fmaf(v, sc, of));
        }
    }
}
