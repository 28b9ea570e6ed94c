// Device-side helpers shared by the bertforge kernels: type conversion, vector packs, and warp /
// team reductions.  Plain CUDA only (no torch headers), see launchers.h.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <cmath>
#include <initializer_list>

#include "launchers.h"

namespace bertforge {

// Largest thread block any bertforge row kernel is launched with.  Kernels declare
// __launch_bounds__(kMaxBlock) so the compiler keeps register use launchable at that size.
constexpr int kMaxBlock = 512;
constexpr int kMaxWarps = kMaxBlock / 32;

// ------------------------------------------------------------------------------ conversions
template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// ------------------------------------------------------------------------------ vector packs
// N contiguous elements loaded/stored with one (or, above 16 bytes, a few) wide memory
// instructions.  The pointer must be aligned to sizeof(Pack); launchers check that before they
// choose a vectorised instantiation.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <int N, typename T>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}

template <int N, typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, N>& v) {
  *reinterpret_cast<Pack<T, N>*>(p) = v;
}

// Elements per 16-byte vector for a storage type.
template <typename T>
constexpr int vec16() {
  return 16 / static_cast<int>(sizeof(T));
}

// True when p is aligned to `bytes` (a power of two); NULL counts as aligned.
inline bool is_aligned(const void* p, int bytes) {
  return (reinterpret_cast<uintptr_t>(p) & static_cast<uintptr_t>(bytes - 1)) == 0;
}

// ------------------------------------------------------------------------------ reductions
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Reduction over a "team": the blockDim.x threads that share one threadIdx.y.  blockDim.x is a
// multiple of 32 and blockDim.x * blockDim.y <= kMaxBlock.  Every thread of the block must call
// this the same number of times (it contains __syncthreads() when blockDim.x > 32); every thread
// of the team receives the result.  `scratch` is shared memory of at least N * kMaxWarps floats.
// The reduction order is fixed, so results are bitwise reproducible.
template <bool kMax, int N>
__device__ __forceinline__ void team_allreduce(float (&v)[N], float* scratch) {
#pragma unroll
  for (int i = 0; i < N; ++i) v[i] = kMax ? warp_max(v[i]) : warp_sum(v[i]);
  if (blockDim.x == 32) return;  // block-uniform branch: one warp per team, no shared memory
  const int warps_per_team = blockDim.x >> 5;
  const int lane = threadIdx.x & 31;
  const int first = threadIdx.y * warps_per_team;  // this team's slots in scratch
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < N; ++i) scratch[i * kMaxWarps + first + (threadIdx.x >> 5)] = v[i];
  }
  __syncthreads();
  const float identity = kMax ? -INFINITY : 0.f;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const float r = lane < warps_per_team ? scratch[i * kMaxWarps + first + lane] : identity;
    v[i] = kMax ? warp_max(r) : warp_sum(r);
  }
  __syncthreads();  // scratch may be reused by the next call
}

// Smallest power of two >= n, at least 32 (team sizes are whole warps).
inline int team_size_for(int64_t n) {
  int t = 32;
  while (t < n) t <<= 1;
  return t;
}

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks for a grid-stride row loop: enough to cover every row group, capped (the loop covers
// the rest) so very large row counts do not create millions of tiny blocks.
inline int row_grid(int64_t row_groups, int device_sms, int blocks_per_sm) {
  int64_t cap = static_cast<int64_t>(device_sms) * (blocks_per_sm > 0 ? blocks_per_sm : 1) * 8;
  if (cap < 1) cap = 1;
  int64_t g = row_groups < cap ? row_groups : cap;
  return static_cast<int>(g < 1 ? 1 : g);
}

inline int current_device_sms() {
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 1;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) return 1;
  return sms > 0 ? sms : 1;
}

}  // namespace bertforge
