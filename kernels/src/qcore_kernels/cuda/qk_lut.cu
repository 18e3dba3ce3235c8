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
// Tensor-core GEMV (qk_lut_mma; M <= 16, V = 4, 8-bit indices, codebooks of <= 256 rows, no
// residual: VPTQ's 2-bit default): the codebook, converted to T, is held in shared memory 16
// times over, copy r of row e at 8-byte slot e * 16 + r, and lane l reads copy l % 16, so
// the 16 lanes of a half-warp always hit 16 different bank pairs whatever their indices
// (one wavefront per half-warp; random rows of one copy cost 3-4). A codebook row read
// (4 values, 8 bytes) is a lane's whole B fragment of one mma.sync m16n8k16: with g = lane / 4
// and t = lane % 4, lane (g, t) holds weight row g of the warp's 8-row group at k positions
// 2t, 2t+1, 2t+8, 2t+9, which we let stand for the 4 columns of one vector (the k order of a
// dot product is free when A is permuted alike). Lane t of each row owns 16 consecutive
// indices (one 16-byte load) of a chunk of 64 vectors (256 columns); mma i uses index i of
// every lane, and the A fragment of lane (g, t) is x[token g (and g + 8)] at the 4 columns
// of vector 16t + i. Tokens fill the A rows (M <= MT), the 8 outputs of the group the C
// columns. A block computes a tile of 8 * G output rows: warp w takes chunks w, w + W, ...
// for all G row groups (the chunk's A fragments are read once for the G groups) with the
// next chunk's index words loaded ahead; the warps' partial sums are added in warp order
// in shared memory (deterministic, no atomics), then the epilogue of qk_lut_gemv. x is
// copied to shared memory when it fits (x_shared), skewed by 8 values per 64 columns so that
// the 4 lanes of a row read 16 bytes from 4 different bank groups.
//
// Tensor-core GEMV in blocks of 4 tokens (qk_lut_mma4; M <= 16, the weights of qk_lut_mma): the table
// rows are 256 bytes apart, the 16 copies of codebook row e in bytes [256e, 256e + 128), so
// that the address of lane l's copy of row e is one byte permutation (__byte_perm of the
// index word and l % 16 * 8: e << 8 | l % 16 * 8) and the read is one load with smem's base
// in a uniform register. A lane reads the rows of two vectors p, p + 1 of weight row g (8
// bytes each) straight into its A quad: {W[p] 0-1, W[p] 2-3, W[p+1] 0-1, W[p+1] 2-3} are A
// rows g and g + 8 at k 2t and 2t + 8, i.e. a vector's first column pair is in A row g and
// its second in row g + 8 (no register moves). B column 2m + h holds token m's column pairs
// h at the same k, so C[g][2m] sums the first pairs of token m and C[g + 8][2m + 1] its
// second pairs (the other 12 columns are dropped): 4 tokens per mma, 8 weight rows, 64
// indices. x lives in 128-byte slots (4 per token and 256-column chunk, each lane's B
// fragments of two mmas at 16 bytes, 8 lanes side by side: conflict-free 16-byte reads): in
// the free halves of the table rows when they hold it (1 token up to 16384 columns, 2 up
// to 8192, 4 up to 4096), else after the table (shared memory grows). Lane t owns 16 consecutive indices (one 16-byte load) per chunk and
// row group; every warp runs the same number of chunk steps (steps past the last chunk read
// zero index words and zero x slots), which keeps the loop uniform. The index words stream
// into per-warp shared-memory stages by cp.async, 3 chunk steps ahead and across tiles (or,
// RI, into registers 2 steps ahead: lut_ops.UNMEASURED_SWITCHES); the partial sums of
// consecutive tiles alternate between two buffers (one barrier a tile).
//
// Both tensor-core GEMVs may be launched programmatically (lut_ops.LUT_PDL, sm_90+): they
// load their index words and codebook before lut_grid_wait(), everything else after it.
//
// Dequantize (any M, any V): one thread per vector writes its V weights of the dense T
// weight, scale and offset applied, for torch's GEMM.
#include "qk_common.cuh"
#include "qk_mma.cuh"

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
// qk_lut_mma (tensor-core GEMV, see the header).
constexpr int MMA_V = 4;             // vector size
constexpr int MMA_BITS = 8;          // index bits
constexpr int MMA_ROWS = 256;        // codebook rows (2^MMA_BITS)
static_assert(MMA_ROWS == 1 << MMA_BITS, "one table row per 8-bit index");
constexpr int MMA_COPIES = 16;       // copies of the codebook (one per lane of a half-warp)
constexpr int MMA_CHUNK = 64;        // vectors per row per warp step (16 per lane)
constexpr int MMA_TABLE_BYTES = MMA_ROWS * MMA_COPIES * 8;  // 32 KB
// Skewed x in shared memory: column c at c + (c / 64) * 8; row stride (values) = 32 mod 64.
__host__ __device__ constexpr int mma_x_stride(int chunks) { return (chunks * 288 + 63) / 64 * 64 + 32; }
// Output rows of a block tile: G groups of 16 rows (MT = 8: the weight is the mma's A
// operand, tokens its 8 columns) or of 8 rows (MT = 16: tokens are the 16 A rows).
__host__ __device__ constexpr int mma_tile_rows(int mt, int g) { return (mt == 8 ? 16 : 8) * g; }
__host__ __device__ constexpr int mma_red_bytes(int warps, int mt, int g) { return warps * mt * mma_tile_rows(mt, g) * 4; }
// qk_lut_mma4 (tensor-core GEMV in blocks of 4 tokens, see the header): table rows 256 bytes
// apart, the 16 copies of a codebook row in the first 128 bytes, x in the other 128.
constexpr int MMA4_TOKENS = 4;                              // tokens per block (grid.y tiles)
constexpr int MMA4_ROW_BYTES = 256;                         // table row stride
constexpr int MMA4_TABLE_BYTES = MMA_ROWS * MMA4_ROW_BYTES; // 64 KB, x slots included
constexpr int MMA4_X_SLOTS = MMA_ROWS;                      // 128-byte x slots (4 per chunk and token)
__host__ __device__ constexpr int mma4_red_bytes(int warps, int g) { return warps * MMA4_TOKENS * 8 * g * 4; }
constexpr int MMA4_ZERO_BYTES = 1024;  // 4 zero x slots (after the partial sums) for empty chunk steps
constexpr int MMA4_STAGE_BYTES = 512;  // a row group's index words of one chunk step of a warp (32 x 16)
constexpr int MMA4_STAGES = 4;         // index stages per warp after the table: 3 chunk steps in flight ahead
// qk_lut_mma4<..., RI>: chunk steps whose index words are loaded into registers ahead of the
// one computed (G 16-byte words per lane each; no stages, no shared-memory pass).
constexpr int MMA4_RI_AHEAD = 2;
// Resident warps per multiprocessor the launch bounds ask registers for (lut_ops'
// mma4_warps_per_sm): 24 of one row group with stages (80 registers per thread), else 16
// (128; the index words in registers need more than 80 for one row group too), as 3 or 2
// blocks of 8 warps, or one block of them all.
__host__ __device__ constexpr int mma4_warps_per_sm(int g, bool ri = false) { return g == 1 && !ri ? 24 : 16; }
}  // namespace qk_lut

#ifdef QK_CPU_HARNESS
// The CPU harness has no dynamic shared memory; blocks run one after another, so one static
// buffer stands in for it (the host checks its request against QK_LUT_CPU_SMEM).
#define QK_LUT_CPU_SMEM (256 * 1024)
#define QK_LUT_SHARED_MEMORY(name) __shared__ __align__(16) unsigned char name[QK_LUT_CPU_SMEM]
#else
#define QK_LUT_SHARED_MEMORY(name) extern __shared__ __align__(16) unsigned char name[]
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

// 8 bytes of shared memory at byte `offset` of the block's shared memory `smem`, read through
// a 32-bit shared-window address (`window` = the window address of smem): the table lookups
// of qk_lut_mma then cost one byte extraction and one multiply-add each, without 64-bit
// generic address arithmetic. The harness has no window: it reads smem + offset.
__device__ __forceinline__ unsigned lut_window(const unsigned char* smem) {
#ifndef QK_CPU_HARNESS
    return static_cast<unsigned>(__cvta_generic_to_shared(smem));
#else
    (void)smem;
    return 0u;
#endif
}
__device__ __forceinline__ uint2 lut_lds64(const unsigned char* smem, unsigned address) {
#ifndef QK_CPU_HARNESS
    (void)smem;
    uint2 v;
    asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];\n" : "=r"(v.x), "=r"(v.y) : "r"(address));
    return v;
#else
    return *reinterpret_cast<const uint2*>(smem + address);
#endif
}

// Asks L2 for the line holding p (no register is written; the harness does nothing).
__device__ __forceinline__ void lut_prefetch_l2(const void* p) {
#ifndef QK_CPU_HARNESS
    asm volatile("prefetch.global.L2 [%0];\n" : : "l"(p));
#else
    (void)p;
#endif
}

// 16 bytes of a read-only stream at src into registers, not kept in L1 (the index words of
// qk_lut_mma4<..., RI>), or zeros when !full (nothing is read).
__device__ __forceinline__ uint4 lut_ldg16_stream(const void* src, bool full) {
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
#ifndef QK_CPU_HARNESS
    if (full)
        asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                     : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(src));
#else
    if (full) v = *reinterpret_cast<const uint4*>(src);
#endif
    return v;
}

// 16 bytes from global src to shared byte `offset` of smem without a register (cp.async,
// L1 bypassed), or 16 zero bytes when !full (nothing is read); the harness copies at once.
__device__ __forceinline__ void lut_cp_async16(unsigned char* smem, unsigned offset, const void* src, bool full) {
#ifndef QK_CPU_HARNESS
    const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem + offset));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" : : "r"(dst), "l"(src), "r"(full ? 16 : 0) : "memory");
#else
    *reinterpret_cast<uint4*>(smem + offset) = full ? *reinterpret_cast<const uint4*>(src) : make_uint4(0u, 0u, 0u, 0u);
#endif
}
// Closes this thread's group of async copies issued since the last commit.
__device__ __forceinline__ void lut_cp_commit() {
#ifndef QK_CPU_HARNESS
    asm volatile("cp.async.commit_group;\n" : : : "memory");
#endif
}
// Waits until at most N of this thread's committed groups of async copies are in flight:
// the older ones' bytes are then visible to this thread.
template <int N>
__device__ __forceinline__ void lut_cp_wait() {
#ifndef QK_CPU_HARNESS
    asm volatile("cp.async.wait_group %0;\n" : : "n"(N) : "memory");
#endif
}

// Programmatic dependent launch (sm_90+; lut_ops.LUT_PDL): a grid launched with the
// programmatic-serialization attribute may start while the kernel before it in the stream
// still runs. lut_grid_wait() blocks until that kernel has completed and its writes are
// visible: the tensor-core GEMVs read only the weights (index streams, codebook) before it,
// never x, the addend, the epilogue's tensors or y. lut_grid_trigger() lets the next such
// grid start (its blocks take multiprocessors as ours leave). Without the attribute both
// return at once; older architectures and the harness have neither.
__device__ __forceinline__ void lut_grid_wait() {
#if !defined(QK_CPU_HARNESS) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" : : : "memory");
#endif
}
__device__ __forceinline__ void lut_grid_trigger() {
#if !defined(QK_CPU_HARNESS) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" : : : "memory");
#endif
}

// The epilogue arguments every GEMV takes last (addend: raw sums of an earlier launch to add;
// y_raw non-null: write raw float sums there instead of the epilogue into y).
#define QK_LUT_EPILOGUE_PARAMS(T)                                                              \
    const float* __restrict__ addend, const __half* __restrict__ scale,                        \
        const __half* __restrict__ offset, const float* __restrict__ xsum,                     \
        const T* __restrict__ bias, T* __restrict__ y, float* __restrict__ y_raw, int M, int N
#define QK_LUT_EPILOGUE_ARGS addend, scale, offset, xsum, bias, y, y_raw, M, N

// Output (m, row) of a GEMV from its float dot product v: the addend added, then the epilogue
// (scale, offset times the token's sum of x, bias) into y, or the raw sum to y_raw.
template <typename T>
__device__ __forceinline__ void lut_out(float v, int m, int row, QK_LUT_EPILOGUE_PARAMS(T)) {
    const size_t o = static_cast<size_t>(m) * N + row;
    if (addend != nullptr) v += addend[o];
    if (y_raw != nullptr) {
        y_raw[o] = v;
    } else {
        if (scale != nullptr) v *= __half2float(scale[row]);
        if (offset != nullptr) v = fmaf(__half2float(offset[row]), xsum[m], v);
        if (bias != nullptr) v += qk::to_float(bias[row]);
        y[o] = qk::from_float<T>(v);
    }
}

// A tensor-core GEMV tile's outputs: the warps' partial sums s_red [warp][token][row] (mt
// tokens, rows rows) added in warp order (deterministic), then the addend and the epilogue
// (scale, offset times the token's sum of x, bias), or the raw sum to y_raw.
template <typename T>
__device__ __forceinline__ void lut_tile_out(const float* s_red, int warps, int mt, int rows, int tile,
                                             int m0, int rows_x, QK_LUT_EPILOGUE_PARAMS(T)) {
    for (int i = threadIdx.x; i < mt * rows; i += blockDim.x) {
        const int tok = i / rows, row = tile * rows + i % rows, m = m0 + tok;
        if (tok >= rows_x || row >= N) continue;
        float v = 0.f;
        for (int w = 0; w < warps; ++w) v += s_red[w * mt * rows + i];
        lut_out(v, m, row, QK_LUT_EPILOGUE_ARGS);
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
    QK_LUT_EPILOGUE_PARAMS(T)) {
    using namespace qk_lut;
    QK_LUT_SHARED_MEMORY(smem);
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

// Tensor-core LUT GEMV (see the header): y [M, N] = x [M, K] @ W^T for one part of
// 8-bit-indexed V = 4 codebook weights; same epilogue and raw mode as qk_lut_gemv.
// Grid: (persistent tiles, ceil(M / MT)); any number of warps per block.
template <typename T, int MT, int G>
__global__ void __launch_bounds__(256, 2) qk_lut_mma(
    const T* __restrict__ x, int ldx, int K, int x_shared,
    const unsigned* __restrict__ codes, int row_words,
    const __half* __restrict__ codebook, int cb_rows,
    QK_LUT_EPILOGUE_PARAMS(T)) {
    using namespace qk_lut;
    static_assert(MT == 8 || MT == 16, "token tiles of 8 (the mma's columns) or 16 (its rows)");
    // MT = 8: weights are A (rows g and g + 8 of a 16-row group), x is B (token g);
    // MT = 16: x is A (tokens g and g + 8), weights are B (row g of an 8-row group).
    constexpr bool SWAP = MT == 8;
    constexpr int H = SWAP ? 2 : 1;  // weight rows per lane and group
    QK_LUT_SHARED_MEMORY(smem);
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    const int g = lane / 4, t = lane % 4;
    const int n_vec = (K + MMA_V - 1) / MMA_V;
    const int chunks = (n_vec + MMA_CHUNK - 1) / MMA_CHUNK;
    const int row_bytes = row_words * 4;  // a multiple of 32: a lane's 16 bytes are all in or out
    constexpr int RG = 8 * H;                 // rows per group
    constexpr int ROWS = mma_tile_rows(MT, G);  // output rows per tile
    constexpr int S = 2;  // accumulator sets (even and odd mmas): 2 * G independent chains
    const int tiles = (N + ROWS - 1) / ROWS;
    const int m0 = blockIdx.y * MT;
    const int xs = mma_x_stride(chunks);

    uint2* s_tab = reinterpret_cast<uint2*>(smem);
    float* s_red = reinterpret_cast<float*>(smem + MMA_TABLE_BYTES);
    T* s_x = reinterpret_cast<T*>(smem + MMA_TABLE_BYTES + mma_red_bytes(warps, MT, G));

    // Index words of chunk c for the warp's lane in each row group (zeros past the row's
    // stream, past N or past the last chunk).
    auto load_codes = [&](int tile, int c, uint4 (&w)[G][H]) {
#pragma unroll
        for (int rg = 0; rg < G; ++rg)
#pragma unroll
            for (int h = 0; h < H; ++h) {
                const int n = tile * ROWS + rg * RG + g + 8 * h;
                const int byte = c * MMA_CHUNK + 16 * t;
                w[rg][h] = c < chunks && n < N && byte < row_bytes
                    ? __ldg(reinterpret_cast<const uint4*>(codes + static_cast<size_t>(n) * row_words) + byte / 16)
                    : make_uint4(0u, 0u, 0u, 0u);
            }
    };
    uint4 cur[G][H], nxt[G][H];
    load_codes(blockIdx.x, warp, cur);  // in flight while the tables are built

    // The codebook row of this thread (read first: its latency overlaps the copy of x).
    const int e0 = threadIdx.x;
    const uint2 h0 = e0 < cb_rows ? __ldg(reinterpret_cast<const uint2*>(codebook) + e0) : make_uint2(0u, 0u);
    const int rows_x = min(MT, M - m0);
    lut_grid_wait();  // x and the epilogue's tensors may come from the kernel before
    lut_grid_trigger();
    if (x_shared) {  // ldx is a multiple of 8: 16-byte copies; zeros up to the last chunk's end
        const int row16 = chunks * MMA_CHUNK * MMA_V / 8;
        for (int i = threadIdx.x; i < rows_x * row16; i += blockDim.x) {
            const int r = i / row16, c8 = (i % row16) * 8;
            const uint4 v = c8 < ldx ? __ldg(reinterpret_cast<const uint4*>(x + static_cast<size_t>(m0 + r) * ldx + c8))
                                     : make_uint4(0u, 0u, 0u, 0u);
            *reinterpret_cast<uint4*>(s_x + r * xs + c8 + (c8 / 64) * 8) = v;
        }
    }
    // The codebook, converted to T, 16 times over: at step r, lane l writes copy (r + l) % 16,
    // so the lanes of a half-warp write 16 different bank pairs.
    for (int e = e0; e < MMA_ROWS; e += blockDim.x) {
        const uint2 h = e == e0 ? h0
            : e < cb_rows ? __ldg(reinterpret_cast<const uint2*>(codebook) + e) : make_uint2(0u, 0u);
        const __half2 lo = qk::bits_as<__half2>(h.x), hi = qk::bits_as<__half2>(h.y);
        const uint2 v = make_uint2(
            qk::as_bits(qk::Pair<T>::make(qk::from_float<T>(__low2float(lo)), qk::from_float<T>(__high2float(lo)))),
            qk::as_bits(qk::Pair<T>::make(qk::from_float<T>(__low2float(hi)), qk::from_float<T>(__high2float(hi)))));
#pragma unroll
        for (int r = 0; r < MMA_COPIES; ++r) s_tab[e * MMA_COPIES + (r + lane) % MMA_COPIES] = v;
    }
    __syncthreads();

    // This lane's copy of codebook row e is at window address tab + e * 128.
    const unsigned tab = lut_window(smem) + (lane % MMA_COPIES) * 8;
    for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        float acc[S][G][4] = {};

        for (int c = warp; c < chunks; c += warps) {
            // the next chunk of this tile, or the first of the block's next tile
            const bool last = c + warps >= chunks;
            load_codes(last ? tile + gridDim.x : tile, last ? warp : c + warps, nxt);

            // x fragments: token g (and g + 8) at the 4 columns of vector 16t + i, i < 16
            // (A: a[i][0..3]; MT = 8: B = a[i][0], a[i][2]).
            unsigned a[16][4];
#pragma unroll
            for (int h = 0; h < MT / 8; ++h) {
                const int r = g + 8 * h;  // the A row (token m0 + r)
                const bool on = r < rows_x;
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    const int col = c * MMA_CHUNK * MMA_V + 64 * t + 8 * j;
                    uint4 v = make_uint4(0u, 0u, 0u, 0u);
                    if (on) {
                        if (x_shared)
                            v = *reinterpret_cast<const uint4*>(s_x + r * xs + col + (col / 64) * 8);
                        else if (col < ldx)
                            v = __ldg(reinterpret_cast<const uint4*>(x + static_cast<size_t>(m0 + r) * ldx + col));
                    }
                    a[2 * j][h] = v.x, a[2 * j][2 + h] = v.y;
                    a[2 * j + 1][h] = v.z, a[2 * j + 1][2 + h] = v.w;
                }
            }

            // mma i of every row group back to back, even and odd i into separate
            // accumulators (added at the end): 2G independent chains, so consecutive mmas
            // never wait for each other's results. The order of the sums does not depend on
            // the tiling (G, MT): a token's outputs are the same in any tile.
#pragma unroll
            for (int i = 0; i < 16; ++i) {
                uint2 wv[G][H];  // codebook rows: weight row g (and g + 8) at vector 16t + i
#pragma unroll
                for (int rg = 0; rg < G; ++rg)
#pragma unroll
                    for (int h = 0; h < H; ++h) {
                        const unsigned e = __byte_perm(qk::word_of(cur[rg][h], i / 4), 0u, 0x4440u | (i % 4));
                        wv[rg][h] = lut_lds64(smem, tab + e * (MMA_COPIES * 8));
                    }
#pragma unroll
                for (int rg = 0; rg < G; ++rg) {
                    if constexpr (SWAP) {
                        const unsigned wa[4] = {wv[rg][0].x, wv[rg][H - 1].x, wv[rg][0].y, wv[rg][H - 1].y};
                        const unsigned xb[2] = {a[i][0], a[i][2]};
                        qk::mma_16816<T>(acc[i % S][rg], wa, xb);
                    } else {
                        const unsigned b[2] = {wv[rg][0].x, wv[rg][0].y};
                        qk::mma_16816<T>(acc[i % S][rg], a[i], b);
                    }
                }
            }
#pragma unroll
            for (int rg = 0; rg < G; ++rg)
#pragma unroll
                for (int h = 0; h < H; ++h) cur[rg][h] = nxt[rg][h];
        }

        // Partial sums [warp][token][row] -> shared memory, added in warp order.
        float* red = s_red + warp * MT * ROWS;
#pragma unroll
        for (int rg = 0; rg < G; ++rg)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                // C[g + 8 * (e / 2)][2t + e % 2]: (weight row, token) or (token, weight row)
                const int tok = SWAP ? 2 * t + e % 2 : g + 8 * (e / 2);
                const int row = SWAP ? rg * RG + g + 8 * (e / 2) : rg * RG + 2 * t + e % 2;
                float v = acc[0][rg][e];
#pragma unroll
                for (int k = 1; k < S; ++k) v += acc[k][rg][e];
                red[tok * ROWS + row] = v;
            }
        __syncthreads();
        lut_tile_out<T>(s_red, warps, MT, ROWS, tile, m0, rows_x, QK_LUT_EPILOGUE_ARGS);
        __syncthreads();  // s_red is rewritten by the next tile
    }
}

// Tensor-core LUT GEMV in blocks of 4 tokens (see the header): y [M, N] = x [M, K] @ W^T for
// one part of 8-bit-indexed V = 4 codebook weights, x in the table's free halves (XT; the
// host checks that rows_x * chunks * 4 <= MMA4_X_SLOTS) or after the index stages, the index
// stages after the zero slots or (RI) none: the index words are loaded into registers
// MMA4_RI_AHEAD chunk steps ahead; same epilogue and raw mode as qk_lut_gemv. Grid:
// (persistent tiles of 8 * G rows, ceil(M / 4)).
template <typename T, int G, bool XT, bool RI>
__global__ void __launch_bounds__(32 * qk_lut::mma4_warps_per_sm(G, RI), 1) qk_lut_mma4(
    const T* __restrict__ x, int ldx, int K,
    const unsigned* __restrict__ codes, int row_words,
    const __half* __restrict__ codebook, int cb_rows, int l2, int skip_absent_x,
    QK_LUT_EPILOGUE_PARAMS(T)) {
    using namespace qk_lut;
    constexpr int MT = MMA4_TOKENS, ROWS = 8 * G;
    constexpr int S = 2;  // accumulator sets (even and odd mmas): 2 * G independent chains
    QK_LUT_SHARED_MEMORY(smem);
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    const int g = lane / 4, t = lane % 4;
    const int n_vec = (K + MMA_V - 1) / MMA_V;
    const int chunks = (n_vec + MMA_CHUNK - 1) / MMA_CHUNK;
    const int row_bytes = row_words * 4;  // a multiple of 32: a lane's 16 bytes are all in or out
    const int tiles = (N + ROWS - 1) / ROWS;
    const int m0 = blockIdx.y * MT;
    const int rows_x = min(MT, M - m0);
    constexpr int STAGES = MMA4_STAGES;
    constexpr int AHEAD = RI ? MMA4_RI_AHEAD : STAGES - 1;  // items in flight ahead
    // Shared memory: the table (x in its free halves: XT), two buffers of the warps' partial
    // sums (tiles alternate), the zero x slots, the index stages (!RI), x (!XT).
    const int red_floats = mma4_red_bytes(warps, G) / 4;
    float* s_red = reinterpret_cast<float*>(smem + MMA4_TABLE_BYTES);
    const unsigned zeros = MMA4_TABLE_BYTES + 2 * mma4_red_bytes(warps, G);  // MMA4_ZERO_BYTES of zeros
    // A row group's stage: 512 bytes after the zero slots.
    constexpr unsigned rg_bytes = MMA4_STAGE_BYTES;
    constexpr unsigned slot_bytes = G * rg_bytes;               // one chunk step of a warp
    constexpr unsigned ring_bytes = RI ? 0u : STAGES * slot_bytes;
    const unsigned stage0 = zeros + MMA4_ZERO_BYTES;
    // x slots: in the table's free halves (XT: 256 bytes apart, from byte 128), or 128 bytes
    // apart after the stages (the host sized shared memory accordingly).
    const unsigned x_base = XT ? 128u : stage0 + static_cast<unsigned>(warps) * ring_bytes;
    constexpr unsigned x_slot = XT ? MMA4_ROW_BYTES : 128u;

    // The lane's index words of row group rg of a tile: the 16 bytes of chunk c are at
    // p[rg] + 4c, present while 64c < lim[rg] (0 past N or past the last tile; a row's
    // stream ends before its last chunk's 64 bytes when n_vec % 64 <= 32).
    struct Rows { const uint4* p[G]; int lim[G]; };
    auto rows_of = [&](int tile) {
        Rows r;
#pragma unroll
        for (int rg = 0; rg < G; ++rg) {
            const int n = tile * ROWS + rg * 8 + g;
            const bool in = tile < tiles && n < N;
            r.p[rg] = reinterpret_cast<const uint4*>(codes + static_cast<size_t>(in ? n : 0) * row_words) + t;
            r.lim[rg] = in ? row_bytes - 16 * t : 0;
        }
        return r;
    };
    const int steps = (chunks + warps - 1) / warps;  // chunk steps per warp and tile
    // The warp's steps from..steps-1 of a tile into L2 (no registers held).
    auto prefetch = [&](const Rows& r, int from) {
        for (int s = from; s < steps; ++s)
#pragma unroll
            for (int rg = 0; rg < G; ++rg) {
                const int c = warp + s * warps;
                if (64 * c < r.lim[rg]) lut_prefetch_l2(r.p[rg] + 4 * c);
            }
    };
    // The index stream, asynchronously: item q of a warp is step q % steps of the block's
    // tile q / steps (the same count for every warp: the loop stays uniform), one commit
    // group of G 16-byte copies per lane into stage slot q % STAGES (row group rg at
    // rg * rg_bytes, lane l at 16 l), or (RI) G 16-byte loads per lane into the last of the
    // AHEAD register sets rw (the older ones moved down one first); items past the block's
    // last tile are zeros. AHEAD items are in
    // flight ahead of the one being computed, across tile boundaries; with l2 the tile after
    // the one being issued is also requested into L2.
    const int block_tiles = (tiles - static_cast<int>(blockIdx.x) + gridDim.x - 1) / gridDim.x;
    const unsigned stage_lane = stage0 + static_cast<unsigned>(warp) * ring_bytes + 16u * lane;
    // The next item to issue: step is of the block's tile ij; ip / ib: the lane's sources
    // and 64 * its chunk (present while ib < lim), advanced a step at a time.
    Rows ir = rows_of(blockIdx.x);
    int is = 0, ij = 0, ib = 64 * warp;
    const uint4* ip[G];
#pragma unroll
    for (int rg = 0; rg < G; ++rg) ip[rg] = ir.p[rg] + 4 * warp;
    unsigned islot = 0;  // its slot (byte offset in the warp's ring)
    uint4 rw[RI ? MMA4_RI_AHEAD : 1][G] = {};  // RI: the index words of the next items, oldest first
    auto issue = [&]() {
        if constexpr (RI) {
#pragma unroll
            for (int a = 0; a + 1 < AHEAD; ++a)
#pragma unroll
                for (int rg = 0; rg < G; ++rg) rw[a][rg] = rw[a + 1][rg];
        }
#pragma unroll
        for (int rg = 0; rg < G; ++rg) {
            if constexpr (RI)
                rw[AHEAD - 1][rg] = lut_ldg16_stream(ip[rg], ib < ir.lim[rg]);
            else
                lut_cp_async16(smem, stage_lane + islot + rg * rg_bytes, ip[rg], ib < ir.lim[rg]);
            ip[rg] += 4 * warps;
        }
        if constexpr (!RI) lut_cp_commit();
        ib += 64 * warps;
        islot = islot + slot_bytes == ring_bytes ? 0u : islot + slot_bytes;
        if (++is == steps) {
            is = 0;
            ib = 64 * warp;
            ++ij;
            ir = rows_of(blockIdx.x + ij * gridDim.x);
#pragma unroll
            for (int rg = 0; rg < G; ++rg) ip[rg] = ir.p[rg] + 4 * warp;
            if (l2) prefetch(rows_of(blockIdx.x + (ij + 1) * gridDim.x), 0);
        }
    };
#pragma unroll
    for (int q = 0; q < AHEAD; ++q) issue();  // in flight while the table is built
    if (l2) {
        prefetch(rows_of(blockIdx.x), AHEAD);
        prefetch(rows_of(blockIdx.x + gridDim.x), 0);
    }

    // The codebook rows of this thread, e0 + r * blockDim.x (all of them at once, before x:
    // their latency overlaps the copy of x, and blocks of fewer than 8 warps do not wait
    // for one row after another).
    const int e0 = threadIdx.x;
    constexpr int CB_RANGE = MMA_ROWS / 32;  // rows per thread in a block of one warp
    uint2 h[CB_RANGE];
#pragma unroll
    for (int r = 0; r < CB_RANGE; ++r) {
        const int e = e0 + r * blockDim.x;
        h[r] = e < cb_rows ? __ldg(reinterpret_cast<const uint2*>(codebook) + e) : make_uint2(0u, 0u);
    }
    lut_grid_wait();  // x and the epilogue's tensors may come from the kernel before
    lut_grid_trigger();
    // x into its slots: slot (m * chunks + c) * 4 + j holds, at 16 s, lane slot s = 2t + h's
    // B fragments of mmas 2j and 2j + 1 (the pairs h of vectors 16t + 4j .. 16t + 4j + 3 of
    // chunk c); zeros past ldx. Item i is 32 bytes of x (4 vectors, two slots' 16 bytes); a
    // thread's first XR items are loaded before the table is built and stored after it
    // (their latency overlaps it). Then the zero slots that chunk steps past the last chunk
    // read.
    const int items = rows_x * chunks * 16;
    auto x_load = [&](int i, uint4 (&u)[2]) {
        const int mc = i / 16, c = mc % chunks;
        const int col = c * MMA_CHUNK * MMA_V + 64 * (i % 4) + 16 * (i / 4 % 4);
        const uint4* src = reinterpret_cast<const uint4*>(x + static_cast<size_t>(m0 + mc / chunks) * ldx + col);
        u[0] = col < ldx ? __ldg(src) : make_uint4(0u, 0u, 0u, 0u);
        u[1] = col + 8 < ldx ? __ldg(src + 1) : make_uint4(0u, 0u, 0u, 0u);
    };
    auto x_store = [&](int i, const uint4 (&u)[2]) {
        uint4* slot = reinterpret_cast<uint4*>(smem + x_base + (i / 16 * 4 + i / 4 % 4) * x_slot + 32 * (i % 4));
        slot[0] = make_uint4(u[0].x, u[0].z, u[1].x, u[1].z);
        slot[1] = make_uint4(u[0].y, u[0].w, u[1].y, u[1].w);
    };
    constexpr int XR = 2;  // 512 items on 256 threads: one token of 8192 columns
    uint4 xr[XR][2];
#pragma unroll
    for (int q = 0; q < XR; ++q)
        if (threadIdx.x + q * blockDim.x < items) x_load(threadIdx.x + q * blockDim.x, xr[q]);
    for (int i = threadIdx.x + XR * blockDim.x; i < items; i += blockDim.x) {  // small blocks
        uint4 u[2];
        x_load(i, u);
        x_store(i, u);
    }
    for (int i = threadIdx.x; i < MMA4_ZERO_BYTES / 16; i += blockDim.x)
        reinterpret_cast<uint4*>(smem + zeros)[i] = make_uint4(0u, 0u, 0u, 0u);
    // The codebook, converted to T, 16 times over (two copies per 16-byte store): at step r,
    // lane l writes copies 2 * ((r + l) % 8) and the next, so a quarter-warp's stores hit 8
    // different 16-byte bank groups.
#pragma unroll
    for (int q = 0; q < CB_RANGE; ++q) {
        const int e = e0 + q * blockDim.x;
        if (e >= MMA_ROWS) break;
        const __half2 lo = qk::bits_as<__half2>(h[q].x), hi = qk::bits_as<__half2>(h[q].y);
        const unsigned v0 = qk::as_bits(qk::Pair<T>::make(qk::from_float<T>(__low2float(lo)), qk::from_float<T>(__high2float(lo))));
        const unsigned v1 = qk::as_bits(qk::Pair<T>::make(qk::from_float<T>(__low2float(hi)), qk::from_float<T>(__high2float(hi))));
        uint4* row = reinterpret_cast<uint4*>(smem + e * MMA4_ROW_BYTES);
#pragma unroll
        for (int r = 0; r < MMA_COPIES / 2; ++r) row[(r + lane) % (MMA_COPIES / 2)] = make_uint4(v0, v1, v0, v1);
    }
#pragma unroll
    for (int q = 0; q < XR; ++q)
        if (threadIdx.x + q * blockDim.x < items) x_store(threadIdx.x + q * blockDim.x, xr[q]);
    __syncthreads();

    // Table row e, this lane's copy: byte e << 8 | copy * 8 of smem, one byte permutation of
    // the index word and the lane's copy offset (both single bytes); indexing smem itself
    // keeps the address 32-bit (a shared-window offset).
    const unsigned copy = (lane % MMA_COPIES) * 8;
    // This lane's x: token min(g / 2, rows_x - 1), pair h = g % 2, lane slot 2t + h; chunk c
    // at + 4 * x_slot * c, mma pair j at + x_slot j. The B columns of tokens past rows_x only
    // feed C columns that are dropped: with skip_absent_x their lanes (the quarter-warps of
    // those tokens) read nothing and take zeros, so a 16-byte x read of a warp costs one
    // shared-memory wavefront per token present instead of four (lut_ops.LUT_MMA4_SKIP_ABSENT_X,
    // off until timed: lut_ops.UNMEASURED_SWITCHES).
    const unsigned x_lane = x_base + 16 * (2 * t + g % 2)
        + static_cast<unsigned>(min(g / 2, rows_x - 1) * chunks) * (4 * x_slot);
    const unsigned x_zero = zeros + 16 * (2 * t + g % 2);  // 4 zero slots x_slot apart
    const bool x_reads = !skip_absent_x || g / 2 < rows_x;

    unsigned cslot = 0;  // the slot of the item being computed
    for (int j = 0; j < block_tiles; ++j) {
        const int tile = blockIdx.x + j * gridDim.x;
        float acc[S][G][4] = {};

        // Chunk c with index words w: 8 mmas per row group. Lane (g, t) holds row g's
        // codebook rows of vectors p = 16t + 2i and p + 1 as the A quad {W[p] 0-1, W[p] 2-3,
        // W[p+1] 0-1, W[p+1] 2-3} (A rows g and g + 8 at k 2t and 2t + 8), and as B column
        // 2m + h the pairs h of token m's x at p and p + 1: C[g][2m] sums the pairs 0 of
        // token m, C[g + 8][2m + 1] its pairs 1 (the other columns are dropped). Steps past
        // the last chunk (c >= chunks) have zero index words and read the zero x slots: they
        // add nothing.
        auto chunk = [&](int c, const uint4 (&w)[G]) {
            const unsigned xc = c < chunks ? x_lane + c * (4 * x_slot) : x_zero;
            uint4 b[4];
#pragma unroll
            for (int u = 0; u < 4; ++u)
                b[u] = x_reads ? *reinterpret_cast<const uint4*>(smem + xc + u * x_slot) : make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                const unsigned bf[2] = {qk::word_of(b[i / 2], 2 * (i % 2)), qk::word_of(b[i / 2], 2 * (i % 2) + 1)};
#pragma unroll
                for (int rg = 0; rg < G; ++rg) {
                    const unsigned word = qk::word_of(w[rg], i / 2);
                    const unsigned sel = 0x5504u | (2u * (i % 2)) << 4;
                    const uint2 wp = *reinterpret_cast<const uint2*>(smem + __byte_perm(word, copy, sel));
                    const uint2 wq = *reinterpret_cast<const uint2*>(smem + __byte_perm(word, copy, sel + 0x10u));
                    const unsigned a[4] = {wp.x, wp.y, wq.x, wq.y};
                    qk::mma_16816<T>(acc[i % S][rg], a, bf);
                }
            }
        };
        for (int s = 0; s < steps; ++s) {
            uint4 w[G];
            if constexpr (RI) {
#pragma unroll
                for (int rg = 0; rg < G; ++rg) w[rg] = rw[0][rg];
            } else {
                lut_cp_wait<STAGES - 2>();  // this item's group has landed
#pragma unroll
                for (int rg = 0; rg < G; ++rg)
                    w[rg] = *reinterpret_cast<const uint4*>(smem + stage_lane + cslot + rg * rg_bytes);
            }
            issue();  // into the slot computed one item ago (its words are in registers)
            if constexpr (!RI) cslot = cslot + slot_bytes == ring_bytes ? 0u : cslot + slot_bytes;
            chunk(warp + s * warps, w);
        }

        // Partial sums [warp][token][row] -> this tile's buffer (lane (g, t): token t, row g);
        // tiles alternate between two buffers, so one barrier per tile suffices (a buffer is
        // rewritten two tiles later, after every thread has passed the next tile's barrier).
        float* buf = s_red + (j % 2) * red_floats;
        float* red = buf + warp * MT * ROWS;
#pragma unroll
        for (int rg = 0; rg < G; ++rg) {
            float v = acc[0][rg][0] + acc[0][rg][3];
#pragma unroll
            for (int q = 1; q < S; ++q) v += acc[q][rg][0] + acc[q][rg][3];
            red[t * ROWS + rg * 8 + g] = v;
        }
        __syncthreads();
        lut_tile_out<T>(buf, warps, MT, ROWS, tile, m0, rows_x, QK_LUT_EPILOGUE_ARGS);
    }
    if constexpr (!RI) lut_cp_wait<0>();  // the zero items past the last tile
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
