// Sample SIMT kernels for the CPU harness tests
// (kernels/qcore_kernels_tests/test_harness.py). Plain CUDA:
// the same file compiles with NVRTC.
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cuda/std/cstdint>

constexpr unsigned FULL = 0xffffffffu;

// out[b] = sum of x[b * blockDim.x + t]: a shared-memory tree (blockDim.x a power of two).
__global__ void block_sum(const float* __restrict__ x, float* __restrict__ out, int n) {
    __shared__ float partial[1024];
    const unsigned t = threadIdx.x, i = blockIdx.x * blockDim.x + t;
    partial[t] = i < n ? x[i] : 0.f;
    __syncthreads();
    for (unsigned stride = blockDim.x / 2; stride > 0; stride >>= 1) {
        if (t < stride) partial[t] += partial[t + stride];
        __syncthreads();
    }
    if (t == 0) out[blockIdx.x] = partial[0];
}

// One warp per row (block 32 x rows): row sums by __shfl_xor_sync, row maxima by
// __shfl_down_sync, inclusive prefix sums of the row's first 32 values by __shfl_up_sync.
__global__ void warp_rows(const float* __restrict__ x, float* __restrict__ sums, float* __restrict__ maxima,
                          float* __restrict__ prefix, int rows, int cols) {
    const int row = blockIdx.x * blockDim.y + threadIdx.y, lane = threadIdx.x;
    if (row >= rows) return;  // the whole warp leaves together
    float s = 0.f, m = __int_as_float(0xff800000);  // -inf
    for (int c = lane; c < cols; c += 32) {
        s += x[row * cols + c];
        m = fmaxf(m, x[row * cols + c]);
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) s += __shfl_xor_sync(FULL, s, offset);
    for (int offset = 16; offset > 0; offset >>= 1) m = fmaxf(m, __shfl_down_sync(FULL, m, offset));
    m = __shfl_sync(FULL, m, 0);  // lane 0 holds the maximum after shfl_down
    float p = lane < cols ? x[row * cols + lane] : 0.f;
    for (int offset = 1; offset < 32; offset <<= 1) {
        const float up = __shfl_up_sync(FULL, p, offset);
        if (lane >= offset) p += up;
    }
    sums[row * 32 + lane] = s;
    maxima[row * 32 + lane] = m;
    prefix[row * 32 + lane] = p;
}

// Rounds x to T and back; bits gets T's 16-bit pattern.
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ unsigned short as_bits(__half v) { return __half_as_ushort(v); }
__device__ __forceinline__ unsigned short as_bits(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }

template <typename T>
__global__ void round_trip(const float* __restrict__ x, T* __restrict__ rounded, float* __restrict__ back,
                           int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const T v = from_float<T>(x[i]);
    rounded[i] = v;
    back[i] = to_float(v);
}

// Signed and unsigned four-way byte dot products.
__global__ void dp4a(const int* __restrict__ a, const int* __restrict__ b, const int* __restrict__ c,
                     int* __restrict__ out, unsigned* __restrict__ out_u, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    out[i] = __dp4a(a[i], b[i], c[i]);
    out_u[i] = __dp4a(static_cast<unsigned>(a[i]), static_cast<unsigned>(b[i]), static_cast<unsigned>(c[i]));
}

// A 2-D grid of 2-D blocks: out[r, c] = alpha * a[r, c] + r - 2 c.
__global__ void affine_2d(const float* __restrict__ a, float* __restrict__ out, int rows, int cols,
                          float alpha) {
    const int r = blockIdx.y * blockDim.y + threadIdx.y, c = blockIdx.x * blockDim.x + threadIdx.x;
    if (r < rows && c < cols) out[r * cols + c] = alpha * a[r * cols + c] + r - 2 * c;
}

// Transpose through a padded shared tile (TILE x TILE blocks, 2-D grid).
template <int TILE, typename T>
__global__ void transpose(const T* __restrict__ in, T* __restrict__ out, int rows, int cols) {
    __shared__ T tile[TILE][TILE + 1];
    int r = blockIdx.y * TILE + threadIdx.y, c = blockIdx.x * TILE + threadIdx.x;
    if (r < rows && c < cols) tile[threadIdx.y][threadIdx.x] = in[r * cols + c];
    __syncthreads();
    r = blockIdx.x * TILE + threadIdx.y;
    c = blockIdx.y * TILE + threadIdx.x;
    if (r < cols && c < rows) out[r * rows + c] = tile[threadIdx.x][threadIdx.y];
}

// Histogram with atomicAdd; a 48-thread block has a partial second warp: broadcast lane 0.
__global__ void histogram(const int* __restrict__ x, int* __restrict__ counts, int* __restrict__ lane0,
                          int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) atomicAdd(&counts[x[i]], 1);
    lane0[i] = __shfl_sync(FULL, i, 0);
}

// The order blocks run in: block (x, y) records how many blocks arrived before it.
__global__ void arrival_order(int* counter, int* order) {
    if (threadIdx.x == 0) order[blockIdx.y * gridDim.x + blockIdx.x] = atomicAdd(counter, 1);
}

__global__ void hello(int value) {
    if (threadIdx.x == 0 && blockIdx.x == 1) printf("hello %d from block %d\n", value, blockIdx.x);
}

// Broken on purpose: threads 16.. never reach the barrier.
__global__ void divergent_barrier(int* out) {
    if (threadIdx.x < 16) __syncthreads();
    out[threadIdx.x] = 1;
}

// Broken on purpose: odd and even threads wait at different barriers.
__global__ void split_barriers(int* out) {
    if (threadIdx.x % 2) {
        __syncthreads();
    } else {
        out[threadIdx.x] = 2;
        __syncthreads();
    }
}

// Broken on purpose: lane 5 leaves before the warp's shuffle.
__global__ void missing_lane(float* out) {
    if (threadIdx.x == 5) return;
    out[threadIdx.x] = __shfl_xor_sync(FULL, 1.f, 1);
}

// Broken on purpose: thread 0 spins forever on a flag nobody sets.
__global__ void spin(const volatile int* flag) {
    if (threadIdx.x == 0)
        while (flag[0] == 0) {
        }
}

// Broken on purpose: half of the warp waits at the block barrier, half in a shuffle.
__global__ void crossed_barriers(float* out) {
    float v = threadIdx.x;
    if (threadIdx.x < 16) __syncthreads();
    else v = __shfl_xor_sync(FULL, v, 1);
    out[threadIdx.x] = v;
}

// Stops the launch when it meets a negative value.
__global__ void check_positive(const int* x) {
    if (x[blockIdx.x * blockDim.x + threadIdx.x] < 0) __trap();
}
