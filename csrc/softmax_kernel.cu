// Scaled masked softmax over the last dim of attention scores [batch, heads, q_len, k_len].
// Plain CUDA (no torch headers); the torch binding is softmax.cpp.  Contract: launchers.h.
//
// Forward:  z = scale * x + m (m: additive mask, or 0 / masked for a bool mask), y = softmax(z).
// Masked elements (bool false, or additive m <= BF_SOFTMAX_MASKED_THRESHOLD, -inf included) get
// probability exactly 0; a row without any unmasked element is written as zeros (torch.softmax
// would give NaN for -inf masks, or a uniform row for finite "large negative" ones).
// Backward: dx = scale * y * (dy - sum(dy * y)); masked elements and fully masked rows get 0
// because their y is 0, so the backward needs no mask.
//
// Work layout as in layer_norm_kernel.cu: a team of blockDim.x threads per row, blockDim.y rows
// per block, grid-stride over rows.
//   k_len <= kSmMaxRegK (8192): the row lives in registers (<= 16 elements per thread, team =
//     max(32, pow2ceil(k_len / 16)), so k_len <= 512 is one warp per row); one read of x (and
//     the mask), one write of y.
//   k_len >  kSmMaxRegK: looped path, 512-thread team, any length: pass 1 computes a per-thread
//     online (max, sum of exp) pair, combined across the team; pass 2 re-reads x and writes y.
// Vectorised (16-byte) loads/stores when k_len is a multiple of the vector width and every
// pointer / mask stride is aligned for it; scalar otherwise.
#include "common.cuh"

namespace bertforge {
namespace {

constexpr int kSmPer = 16;                       // row elements per thread on the register path
constexpr int kSmMaxRegK = kSmPer * kMaxBlock;   // 8192
constexpr int kSmBlock = 256;

struct SmConfig {
  int team;
  int rows_per_block;
  bool regs;
};

inline SmConfig sm_config(int k_len) {
  SmConfig c;
  c.regs = k_len <= kSmMaxRegK;
  c.team = c.regs ? team_size_for(ceil_div(k_len, kSmPer)) : kMaxBlock;
  c.rows_per_block = c.team >= kSmBlock ? 1 : kSmBlock / c.team;
  return c;
}

// Mask element -> (keep, additive term).
__device__ __forceinline__ bool mask_keep(uint8_t m, float& add) {
  add = 0.f;
  return m != 0;
}
template <typename M>
__device__ __forceinline__ bool mask_keep(M m, float& add) {
  add = to_float(m);
  return add > BF_SOFTMAX_MASKED_THRESHOLD;  // NaN compares false: treated as masked
}

// Logits of VEC consecutive elements; masked ones are -inf.
template <typename T, typename M, int VEC>
__device__ __forceinline__ void load_logits(const T* xrow, const M* mrow, int c, float scale,
                                            float (&z)[VEC]) {
  const Pack<T, VEC> xp = load_pack<VEC>(xrow + c);
#pragma unroll
  for (int i = 0; i < VEC; ++i) z[i] = scale * to_float(xp.v[i]);
  if (mrow != nullptr) {
    const Pack<M, VEC> mp = load_pack<VEC>(mrow + c);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      float add;
      z[i] = mask_keep(mp.v[i], add) ? z[i] + add : -INFINITY;
    }
  }
}

template <typename T, typename M, int VEC, bool kRegs>
__global__ void __launch_bounds__(kMaxBlock)
    softmax_fwd_kernel(const T* __restrict__ x, const M* __restrict__ mask, T* __restrict__ y,
                       int64_t rows, int heads, int q_len, int k_len, int64_t msb, int64_t msh,
                       int64_t msq, float scale) {
  __shared__ float scratch[kMaxWarps];
  const int team = blockDim.x;
  const int t = threadIdx.x;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.y;

  // Block-uniform trip count (depends on blockIdx only): team_allreduce's barriers are safe.
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.y; base < rows; base += step) {
    const int64_t row = base + threadIdx.y;
    const bool valid = row < rows;
    const int64_t off = valid ? row * k_len : 0;
    const M* mrow = nullptr;
    if (mask != nullptr && valid) {
      const int64_t q = row % q_len;
      const int64_t bh = row / q_len;
      const int64_t h = bh % heads;
      const int64_t b = bh / heads;
      mrow = mask + b * msb + h * msh + q * msq;
    }
    const T* xrow = x + off;
    T* yrow = y + off;

    if constexpr (kRegs) {
      constexpr int NV = kSmPer / VEC;
      float z[kSmPer];
      float red[1] = {-INFINITY};
#pragma unroll
      for (int k = 0; k < NV; ++k) {
        const int c = (k * team + t) * VEC;
        if (valid && c < k_len) {
          float zz[VEC];
          load_logits<T, M, VEC>(xrow, mrow, c, scale, zz);
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            z[k * VEC + i] = zz[i];
            red[0] = fmaxf(red[0], zz[i]);
          }
        } else {
#pragma unroll
          for (int i = 0; i < VEC; ++i) z[k * VEC + i] = -INFINITY;
        }
      }
      team_allreduce<true, 1>(red, scratch);
      const float mx = red[0];
      red[0] = 0.f;
#pragma unroll
      for (int j = 0; j < kSmPer; ++j) {
        // z == -inf: masked, padding, or (when mx == -inf) a fully masked row.  Testing z, not mx,
        // also avoids (-inf) - (-inf) = NaN.
        z[j] = z[j] == -INFINITY ? 0.f : expf(z[j] - mx);
        red[0] += z[j];
      }
      team_allreduce<false, 1>(red, scratch);
      const float inv = red[0] > 0.f ? 1.f / red[0] : 0.f;  // sum >= 1 unless fully masked
      if (valid) {
#pragma unroll
        for (int k = 0; k < NV; ++k) {
          const int c = (k * team + t) * VEC;
          if (c < k_len) {
            Pack<T, VEC> o;
#pragma unroll
            for (int i = 0; i < VEC; ++i) o.v[i] = from_float<T>(z[k * VEC + i] * inv);
            store_pack<VEC>(yrow + c, o);
          }
        }
      }
    } else {
      // Pass 1: online max / sum of exp per thread.
      float m = -INFINITY, s = 0.f;
      if (valid) {
        for (int c = t * VEC; c < k_len; c += team * VEC) {
          float zz[VEC];
          load_logits<T, M, VEC>(xrow, mrow, c, scale, zz);
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            if (zz[i] == -INFINITY) continue;
            if (zz[i] > m) {
              s = s * expf(m - zz[i]) + 1.f;  // first hit: m = -inf, s = 0 -> 0 * 0 + 1
              m = zz[i];
            } else {
              s += expf(zz[i] - m);
            }
          }
        }
      }
      float red[1] = {m};
      team_allreduce<true, 1>(red, scratch);
      const float mx = red[0];
      red[0] = m == -INFINITY ? 0.f : s * expf(m - mx);
      team_allreduce<false, 1>(red, scratch);
      const float inv = red[0] > 0.f ? 1.f / red[0] : 0.f;
      // Pass 2: recompute the logits (bitwise the same as in pass 1) and write.
      if (valid) {
        for (int c = t * VEC; c < k_len; c += team * VEC) {
          float zz[VEC];
          load_logits<T, M, VEC>(xrow, mrow, c, scale, zz);
          Pack<T, VEC> o;
#pragma unroll
          for (int i = 0; i < VEC; ++i)
            o.v[i] = from_float<T>(zz[i] == -INFINITY ? 0.f : expf(zz[i] - mx) * inv);
          store_pack<VEC>(yrow + c, o);
        }
      }
    }
  }
}

template <typename T, int VEC, bool kRegs>
__global__ void __launch_bounds__(kMaxBlock)
    softmax_bwd_kernel(const T* __restrict__ y, const T* __restrict__ dy, T* __restrict__ dx,
                       int64_t rows, int k_len, float scale) {
  __shared__ float scratch[kMaxWarps];
  const int team = blockDim.x;
  const int t = threadIdx.x;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.y;

  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.y; base < rows; base += step) {
    const int64_t row = base + threadIdx.y;
    const bool valid = row < rows;
    const int64_t off = valid ? row * k_len : 0;
    const T* yrow = y + off;
    const T* drow = dy + off;
    T* dxrow = dx + off;

    if constexpr (kRegs) {
      constexpr int NV = kSmPer / VEC;
      float yv[kSmPer], dv[kSmPer];
      float red[1] = {0.f};
#pragma unroll
      for (int k = 0; k < NV; ++k) {
        const int c = (k * team + t) * VEC;
        if (valid && c < k_len) {
          const Pack<T, VEC> yp = load_pack<VEC>(yrow + c);
          const Pack<T, VEC> dp = load_pack<VEC>(drow + c);
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            yv[k * VEC + i] = to_float(yp.v[i]);
            dv[k * VEC + i] = to_float(dp.v[i]);
            red[0] += yv[k * VEC + i] * dv[k * VEC + i];
          }
        } else {
#pragma unroll
          for (int i = 0; i < VEC; ++i) yv[k * VEC + i] = dv[k * VEC + i] = 0.f;
        }
      }
      team_allreduce<false, 1>(red, scratch);
      const float dot = red[0];
      if (valid) {
#pragma unroll
        for (int k = 0; k < NV; ++k) {
          const int c = (k * team + t) * VEC;
          if (c < k_len) {
            Pack<T, VEC> o;
#pragma unroll
            for (int i = 0; i < VEC; ++i)
              o.v[i] = from_float<T>(scale * yv[k * VEC + i] * (dv[k * VEC + i] - dot));
            store_pack<VEC>(dxrow + c, o);
          }
        }
      }
    } else {
      float red[1] = {0.f};
      if (valid) {
        for (int c = t * VEC; c < k_len; c += team * VEC) {
          const Pack<T, VEC> yp = load_pack<VEC>(yrow + c);
          const Pack<T, VEC> dp = load_pack<VEC>(drow + c);
#pragma unroll
          for (int i = 0; i < VEC; ++i) red[0] += to_float(yp.v[i]) * to_float(dp.v[i]);
        }
      }
      team_allreduce<false, 1>(red, scratch);
      const float dot = red[0];
      if (valid) {
        for (int c = t * VEC; c < k_len; c += team * VEC) {
          const Pack<T, VEC> yp = load_pack<VEC>(yrow + c);
          const Pack<T, VEC> dp = load_pack<VEC>(drow + c);
          Pack<T, VEC> o;
#pragma unroll
          for (int i = 0; i < VEC; ++i)
            o.v[i] = from_float<T>(scale * to_float(yp.v[i]) * (to_float(dp.v[i]) - dot));
          store_pack<VEC>(dxrow + c, o);
        }
      }
    }
  }
}

template <typename T, typename M>
cudaError_t softmax_fwd_typed(const void* x, const void* mask, void* y, int64_t rows, int heads,
                              int q_len, int k_len, int64_t msb, int64_t msh, int64_t msq,
                              float scale, cudaStream_t stream) {
  constexpr int V = vec16<T>();
  const SmConfig cfg = sm_config(k_len);
  const dim3 block(cfg.team, cfg.rows_per_block);
  const int threads = cfg.team * cfg.rows_per_block;
  const int grid =
      row_grid(ceil_div(rows, cfg.rows_per_block), current_device_sms(), 2048 / threads);
  bool vec = k_len % V == 0 && is_aligned(x, 16) && is_aligned(y, 16);
  if (mask != nullptr) {
    vec = vec && is_aligned(mask, V * sizeof(M)) && msb % V == 0 && msh % V == 0 && msq % V == 0;
  }
  auto* xt = static_cast<const T*>(x);
  auto* mt = static_cast<const M*>(mask);
  auto* yt = static_cast<T*>(y);
#define BF_LAUNCH_SOFTMAX_FWD(VEC_, REGS_)                                                        \
  softmax_fwd_kernel<T, M, VEC_, REGS_><<<grid, block, 0, stream>>>(xt, mt, yt, rows, heads,     \
                                                                    q_len, k_len, msb, msh, msq, \
                                                                    scale)
  if (cfg.regs) {
    if (vec) BF_LAUNCH_SOFTMAX_FWD(V, true);
    else BF_LAUNCH_SOFTMAX_FWD(1, true);
  } else {
    if (vec) BF_LAUNCH_SOFTMAX_FWD(V, false);
    else BF_LAUNCH_SOFTMAX_FWD(1, false);
  }
#undef BF_LAUNCH_SOFTMAX_FWD
  return cudaGetLastError();
}

template <typename T>
cudaError_t softmax_fwd_mask_dispatch(const void* x, const void* mask, void* y, int64_t rows,
                                      int heads, int q_len, int k_len, int64_t msb, int64_t msh,
                                      int64_t msq, float scale, bf_dtype_t x_dtype,
                                      bf_dtype_t mask_dtype, cudaStream_t stream) {
  if (mask == nullptr || mask_dtype == x_dtype)  // no mask: M is unused, reuse T's kernels
    return softmax_fwd_typed<T, T>(x, mask, y, rows, heads, q_len, k_len, msb, msh, msq, scale,
                                   stream);
  if (mask_dtype == BF_BOOL)
    return softmax_fwd_typed<T, uint8_t>(x, mask, y, rows, heads, q_len, k_len, msb, msh, msq,
                                         scale, stream);
  if (mask_dtype == BF_FLOAT32)
    return softmax_fwd_typed<T, float>(x, mask, y, rows, heads, q_len, k_len, msb, msh, msq,
                                       scale, stream);
  return cudaErrorInvalidValue;
}

template <typename T>
cudaError_t softmax_bwd_typed(const void* y, const void* dy, void* dx, int64_t rows, int k_len,
                              float scale, cudaStream_t stream) {
  constexpr int V = vec16<T>();
  const SmConfig cfg = sm_config(k_len);
  const dim3 block(cfg.team, cfg.rows_per_block);
  const int threads = cfg.team * cfg.rows_per_block;
  const int grid =
      row_grid(ceil_div(rows, cfg.rows_per_block), current_device_sms(), 2048 / threads);
  const bool vec =
      k_len % V == 0 && is_aligned(y, 16) && is_aligned(dy, 16) && is_aligned(dx, 16);
  auto* yt = static_cast<const T*>(y);
  auto* dyt = static_cast<const T*>(dy);
  auto* dxt = static_cast<T*>(dx);
#define BF_LAUNCH_SOFTMAX_BWD(VEC_, REGS_) \
  softmax_bwd_kernel<T, VEC_, REGS_><<<grid, block, 0, stream>>>(yt, dyt, dxt, rows, k_len, scale)
  if (cfg.regs) {
    if (vec) BF_LAUNCH_SOFTMAX_BWD(V, true);
    else BF_LAUNCH_SOFTMAX_BWD(1, true);
  } else {
    if (vec) BF_LAUNCH_SOFTMAX_BWD(V, false);
    else BF_LAUNCH_SOFTMAX_BWD(1, false);
  }
#undef BF_LAUNCH_SOFTMAX_BWD
  return cudaGetLastError();
}

}  // namespace
}  // namespace bertforge

using namespace bertforge;

extern "C" cudaError_t bf_softmax_fwd(const void* x, const void* mask, void* y, int64_t batch,
                                      int heads, int q_len, int k_len, int64_t mask_stride_b,
                                      int64_t mask_stride_h, int64_t mask_stride_q, float scale,
                                      bf_dtype_t x_dtype, bf_dtype_t mask_dtype,
                                      cudaStream_t stream) {
  if (batch < 0 || heads < 0 || q_len < 0 || k_len < 0) return cudaErrorInvalidValue;
  const int64_t rows = batch * heads * q_len;
  if (rows == 0 || k_len == 0) return cudaSuccess;
  switch (x_dtype) {
    case BF_FLOAT32:
      return softmax_fwd_mask_dispatch<float>(x, mask, y, rows, heads, q_len, k_len,
                                              mask_stride_b, mask_stride_h, mask_stride_q, scale,
                                              x_dtype, mask_dtype, stream);
    case BF_FLOAT16:
      return softmax_fwd_mask_dispatch<__half>(x, mask, y, rows, heads, q_len, k_len,
                                               mask_stride_b, mask_stride_h, mask_stride_q, scale,
                                               x_dtype, mask_dtype, stream);
    case BF_BFLOAT16:
      return softmax_fwd_mask_dispatch<__nv_bfloat16>(x, mask, y, rows, heads, q_len, k_len,
                                                      mask_stride_b, mask_stride_h,
                                                      mask_stride_q, scale, x_dtype, mask_dtype,
                                                      stream);
    default:
      return cudaErrorInvalidValue;
  }
}

extern "C" cudaError_t bf_softmax_bwd(const void* y, const void* dy, void* dx, int64_t rows,
                                      int k_len, float scale, bf_dtype_t x_dtype,
                                      cudaStream_t stream) {
  if (rows < 0 || k_len < 0) return cudaErrorInvalidValue;
  if (rows == 0 || k_len == 0) return cudaSuccess;
  switch (x_dtype) {
    case BF_FLOAT32:
      return softmax_bwd_typed<float>(y, dy, dx, rows, k_len, scale, stream);
    case BF_FLOAT16:
      return softmax_bwd_typed<__half>(y, dy, dx, rows, k_len, scale, stream);
    case BF_BFLOAT16:
      return softmax_bwd_typed<__nv_bfloat16>(y, dy, dx, rows, k_len, scale, stream);
    default:
      return cudaErrorInvalidValue;
  }
}
