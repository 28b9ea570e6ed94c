// LayerNorm forward/backward with an optional fused (bias_add + residual) before the norm.
// Plain CUDA (no torch headers); the torch binding is layer_norm.cpp.  See launchers.h for the
// contract of the launchers.
//
// Work layout.  A "team" of T threads (T = blockDim.x, a power of two in [32, 512]) owns one row;
// a block holds blockDim.y teams (block size 256, or 512 for the widest rows) and walks rows with
// a grid-stride loop.  Each thread keeps at most kLnPer = 16 row elements in registers, so
// T = max(32, pow2ceil(hidden / 16)): hidden <= 512 is one warp per row with shuffle-only
// reductions, hidden 8192 is a 512-thread team.  Thread t of a team always owns the same columns
// (vector k of the thread covers columns [(k*T + t)*VEC, (k*T + t)*VEC + VEC)), which lets the
// backward keep per-column dgamma/dbeta partial sums in registers across all rows it visits.
//
// Vectorisation.  VEC = 16 bytes / sizeof(x element) when hidden % VEC == 0 and every pointer is
// aligned to its pack size (all common BERT widths); otherwise VEC = 1 (scalar, still coalesced),
// which is what handles hidden sizes like 767 or 4097: with an odd row length consecutive rows
// start at different alignments, so no single vector width fits every row.
//
// Numerics.  Everything is computed in float32.  Mean and variance use two passes over the
// register-resident row (no E[x^2] - E[x]^2 cancellation).  With additions, the float32 sum is
// rounded to the input dtype first, so that y is exactly LN(s) of the s that is returned and
// saved for the backward (what PyTorch computes for LN(x + r) in the same dtype).
//
// Backward.  Kernel 1: per row dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) (+ dsum), with
// g = dy * gamma, and per-thread column partials of dgamma = sum dy * xhat, dbeta = sum dy and
// (optionally) dbias_add = sum dx.  Teams of one block are combined in shared memory in a fixed
// order and each block writes one row of partials to the workspace.  Kernel 2 reduces the
// workspace over blocks in a fixed order.  No atomics: results are bitwise reproducible.
#include "common.cuh"

namespace bertforge {
namespace {

constexpr int kLnPer = 16;         // row elements per thread (registers)
constexpr int kLnBlock = 256;      // threads per block when the team is smaller than this
constexpr int kLnFinalizeRows = 8; // blockDim.y of the finalize kernel

static_assert(kLnPer * kMaxBlock >= BF_LN_MAX_HIDDEN, "a team must cover the widest row");

struct LnConfig {
  int team;
  int rows_per_block;
};

inline LnConfig ln_config(int hidden) {
  LnConfig c;
  c.team = team_size_for(ceil_div(hidden, kLnPer));
  c.rows_per_block = c.team >= kLnBlock ? 1 : kLnBlock / c.team;
  return c;
}

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<T>, TypeTag<W>) for the supported (x dtype, weight dtype) pairs.
template <typename F>
cudaError_t dispatch_ln_types(bf_dtype_t x_dtype, bf_dtype_t w_dtype, F&& f) {
  switch (x_dtype) {
    case BF_FLOAT32:
      if (w_dtype == BF_FLOAT32) return f(TypeTag<float>{}, TypeTag<float>{});
      break;
    case BF_FLOAT16:
      if (w_dtype == BF_FLOAT16) return f(TypeTag<__half>{}, TypeTag<__half>{});
      if (w_dtype == BF_FLOAT32) return f(TypeTag<__half>{}, TypeTag<float>{});
      break;
    case BF_BFLOAT16:
      if (w_dtype == BF_BFLOAT16) return f(TypeTag<__nv_bfloat16>{}, TypeTag<__nv_bfloat16>{});
      if (w_dtype == BF_FLOAT32) return f(TypeTag<__nv_bfloat16>{}, TypeTag<float>{});
      break;
    default:
      break;
  }
  return cudaErrorInvalidValue;
}

// ------------------------------------------------------------------------------ forward
template <typename T, typename W, int VEC>
__global__ void __launch_bounds__(kMaxBlock)
    ln_fwd_kernel(const T* __restrict__ x, const T* __restrict__ residual,
                  const W* __restrict__ bias_add, const W* __restrict__ gamma,
                  const W* __restrict__ beta, T* __restrict__ y, T* __restrict__ sum_out,
                  float* __restrict__ mean_out, float* __restrict__ rstd_out, int64_t rows,
                  int hidden, float eps) {
  constexpr int NV = kLnPer / VEC;  // vectors per thread
  __shared__ float scratch[kMaxWarps];
  const int team = blockDim.x;
  const int t = threadIdx.x;
  const bool has_add = residual != nullptr || bias_add != nullptr;
  const float inv_h = 1.f / static_cast<float>(hidden);
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.y;

  // The loop bound depends only on blockIdx, so every thread of a block runs the same number of
  // iterations and reaches the same __syncthreads() inside team_allreduce.
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.y; base < rows; base += step) {
    const int64_t row = base + threadIdx.y;
    const bool valid = row < rows;
    const int64_t off = valid ? row * hidden : 0;

    float v[kLnPer];
    float red[1] = {0.f};
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int c = (k * team + t) * VEC;
      if (valid && c < hidden) {
        float a[VEC];
        const Pack<T, VEC> xp = load_pack<VEC>(x + off + c);
#pragma unroll
        for (int i = 0; i < VEC; ++i) a[i] = to_float(xp.v[i]);
        if (bias_add != nullptr) {
          const Pack<W, VEC> bp = load_pack<VEC>(bias_add + c);
#pragma unroll
          for (int i = 0; i < VEC; ++i) a[i] += to_float(bp.v[i]);
        }
        if (residual != nullptr) {
          const Pack<T, VEC> rp = load_pack<VEC>(residual + off + c);
#pragma unroll
          for (int i = 0; i < VEC; ++i) a[i] += to_float(rp.v[i]);
        }
        if (has_add) {
          Pack<T, VEC> sp;
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            sp.v[i] = from_float<T>(a[i]);
            a[i] = to_float(sp.v[i]);
          }
          if (sum_out != nullptr) store_pack<VEC>(sum_out + off + c, sp);
        }
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          v[k * VEC + i] = a[i];
          red[0] += a[i];
        }
      } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) v[k * VEC + i] = 0.f;
      }
    }
    team_allreduce<false, 1>(red, scratch);
    const float mean = red[0] * inv_h;

    red[0] = 0.f;
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int c = (k * team + t) * VEC;
      if (valid && c < hidden) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          const float d = v[k * VEC + i] - mean;
          red[0] += d * d;
        }
      }
    }
    team_allreduce<false, 1>(red, scratch);
    const float rstd = rsqrtf(red[0] * inv_h + eps);

    if (valid) {
#pragma unroll
      for (int k = 0; k < NV; ++k) {
        const int c = (k * team + t) * VEC;
        if (c < hidden) {
          const Pack<W, VEC> gp = load_pack<VEC>(gamma + c);
          const Pack<W, VEC> bp = load_pack<VEC>(beta + c);
          Pack<T, VEC> o;
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            o.v[i] = from_float<T>((v[k * VEC + i] - mean) * rstd * to_float(gp.v[i]) +
                                   to_float(bp.v[i]));
          }
          store_pack<VEC>(y + off + c, o);
        }
      }
      if (t == 0) {
        mean_out[row] = mean;
        rstd_out[row] = rstd;
      }
    }
  }
}

// ------------------------------------------------------------------------------ backward
// workspace: [gridDim.x][nacc][hidden] floats; nacc = 3 when dbias_add is wanted, else 2.
// Dynamic shared memory: nacc * hidden floats when blockDim.y > 1, else none.
template <typename T, typename W, int VEC>
__global__ void __launch_bounds__(kMaxBlock)
    ln_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ s,
                  const float* __restrict__ mean, const float* __restrict__ rstd,
                  const W* __restrict__ gamma, const T* __restrict__ dsum, T* __restrict__ dx,
                  float* __restrict__ workspace, int nacc, int64_t rows, int hidden) {
  constexpr int NV = kLnPer / VEC;
  __shared__ float scratch[2 * kMaxWarps];
  extern __shared__ float colbuf[];
  const int team = blockDim.x;
  const int t = threadIdx.x;
  const float inv_h = 1.f / static_cast<float>(hidden);
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.y;

  float acc_g[kLnPer], acc_b[kLnPer], acc_d[kLnPer];
#pragma unroll
  for (int j = 0; j < kLnPer; ++j) acc_g[j] = acc_b[j] = acc_d[j] = 0.f;

  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.y; base < rows; base += step) {
    const int64_t row = base + threadIdx.y;
    const bool valid = row < rows;
    const int64_t off = valid ? row * hidden : 0;
    const float mu = valid ? mean[row] : 0.f;
    const float rs = valid ? rstd[row] : 0.f;

    float xh[kLnPer], gg[kLnPer];
    float red[2] = {0.f, 0.f};
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int c = (k * team + t) * VEC;
      if (valid && c < hidden) {
        const Pack<T, VEC> dp = load_pack<VEC>(dy + off + c);
        const Pack<T, VEC> sp = load_pack<VEC>(s + off + c);
        const Pack<W, VEC> gp = load_pack<VEC>(gamma + c);
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          const int j = k * VEC + i;
          const float d = to_float(dp.v[i]);
          const float xhat = (to_float(sp.v[i]) - mu) * rs;
          const float g = d * to_float(gp.v[i]);
          xh[j] = xhat;
          gg[j] = g;
          red[0] += g;
          red[1] += g * xhat;
          acc_g[j] += d * xhat;
          acc_b[j] += d;
        }
      } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) xh[k * VEC + i] = gg[k * VEC + i] = 0.f;
      }
    }
    team_allreduce<false, 2>(red, scratch);
    const float mg = red[0] * inv_h;
    const float mgx = red[1] * inv_h;

    if (valid) {
#pragma unroll
      for (int k = 0; k < NV; ++k) {
        const int c = (k * team + t) * VEC;
        if (c < hidden) {
          float extra[VEC];
#pragma unroll
          for (int i = 0; i < VEC; ++i) extra[i] = 0.f;
          if (dsum != nullptr) {
            const Pack<T, VEC> ep = load_pack<VEC>(dsum + off + c);
#pragma unroll
            for (int i = 0; i < VEC; ++i) extra[i] = to_float(ep.v[i]);
          }
          Pack<T, VEC> o;
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            const int j = k * VEC + i;
            const float d = rs * (gg[j] - mg - xh[j] * mgx) + extra[i];
            o.v[i] = from_float<T>(d);
            acc_d[j] += d;
          }
          store_pack<VEC>(dx + off + c, o);
        }
      }
    }
  }

  // Column partials of this block -> workspace row blockIdx.x.
  float* wp = workspace + static_cast<int64_t>(blockIdx.x) * nacc * hidden;
  if (blockDim.y == 1) {
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int c = (k * team + t) * VEC;
      if (c < hidden) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          const int j = k * VEC + i;
          wp[c + i] = acc_g[j];
          wp[hidden + c + i] = acc_b[j];
          if (nacc == 3) wp[2 * hidden + c + i] = acc_d[j];
        }
      }
    }
  } else {
    // Every team covers every column exactly once (thread t of each team owns the same columns),
    // so team 0 initialises all of colbuf and teams 1.. add to it, one team at a time.
    for (int r = 0; r < static_cast<int>(blockDim.y); ++r) {
      if (static_cast<int>(threadIdx.y) == r) {
#pragma unroll
        for (int k = 0; k < NV; ++k) {
          const int c = (k * team + t) * VEC;
          if (c < hidden) {
#pragma unroll
            for (int i = 0; i < VEC; ++i) {
              const int j = k * VEC + i;
              if (r == 0) {
                colbuf[c + i] = acc_g[j];
                colbuf[hidden + c + i] = acc_b[j];
                if (nacc == 3) colbuf[2 * hidden + c + i] = acc_d[j];
              } else {
                colbuf[c + i] += acc_g[j];
                colbuf[hidden + c + i] += acc_b[j];
                if (nacc == 3) colbuf[2 * hidden + c + i] += acc_d[j];
              }
            }
          }
        }
      }
      __syncthreads();
    }
    const int nthreads = blockDim.x * blockDim.y;
    const int tid = threadIdx.y * blockDim.x + threadIdx.x;
    for (int idx = tid; idx < nacc * hidden; idx += nthreads) wp[idx] = colbuf[idx];
  }
}

// Sums workspace [num_parts][nacc][hidden] over parts.  Block (32, kLnFinalizeRows): threadIdx.x
// picks the column, threadIdx.y strides over parts, then a fixed-order sum over threadIdx.y.
template <typename W>
__global__ void ln_bwd_finalize_kernel(const float* __restrict__ workspace, int num_parts, int nacc,
                                       int hidden, W* __restrict__ dgamma, W* __restrict__ dbeta,
                                       W* __restrict__ dbias_add) {
  __shared__ float sm[3][kLnFinalizeRows][33];
  const int col = blockIdx.x * 32 + threadIdx.x;
  float a[3] = {0.f, 0.f, 0.f};
  if (col < hidden) {
    for (int p = threadIdx.y; p < num_parts; p += kLnFinalizeRows) {
      const float* w = workspace + static_cast<int64_t>(p) * nacc * hidden + col;
      a[0] += w[0];
      a[1] += w[hidden];
      if (nacc == 3) a[2] += w[2 * hidden];
    }
  }
#pragma unroll
  for (int q = 0; q < 3; ++q) sm[q][threadIdx.y][threadIdx.x] = a[q];
  __syncthreads();
  if (threadIdx.y == 0 && col < hidden) {
    float r[3] = {0.f, 0.f, 0.f};
#pragma unroll
    for (int q = 0; q < 3; ++q) {
#pragma unroll
      for (int p = 0; p < kLnFinalizeRows; ++p) r[q] += sm[q][p][threadIdx.x];
    }
    dgamma[col] = from_float<W>(r[0]);
    dbeta[col] = from_float<W>(r[1]);
    if (nacc == 3) dbias_add[col] = from_float<W>(r[2]);
  }
}

template <typename T, typename W>
bool ln_vectorizable(int hidden, std::initializer_list<const void*> t_ptrs,
                     std::initializer_list<const void*> w_ptrs) {
  constexpr int V = vec16<T>();
  if (hidden % V != 0) return false;
  for (const void* p : t_ptrs)
    if (!is_aligned(p, V * sizeof(T))) return false;
  for (const void* p : w_ptrs)
    if (!is_aligned(p, V * sizeof(W))) return false;
  return true;
}

template <typename T, typename W>
void* ln_bwd_kernel_ptr(bool vec) {
  constexpr int V = vec16<T>();
  return vec ? reinterpret_cast<void*>(&ln_bwd_kernel<T, W, V>)
             : reinterpret_cast<void*>(&ln_bwd_kernel<T, W, 1>);
}

}  // namespace
}  // namespace bertforge

using namespace bertforge;

extern "C" cudaError_t bf_layer_norm_fwd(const void* x, const void* residual, const void* bias_add,
                                         const void* gamma, const void* beta, void* y,
                                         void* sum_out, float* mean_out, float* rstd_out,
                                         int64_t rows, int hidden, float eps, bf_dtype_t x_dtype,
                                         bf_dtype_t w_dtype, cudaStream_t stream) {
  if (hidden < 1 || hidden > BF_LN_MAX_HIDDEN || rows < 0) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  return dispatch_ln_types(x_dtype, w_dtype, [&](auto tt, auto wt) -> cudaError_t {
    using T = typename decltype(tt)::type;
    using W = typename decltype(wt)::type;
    constexpr int V = vec16<T>();
    const LnConfig cfg = ln_config(hidden);
    const dim3 block(cfg.team, cfg.rows_per_block);
    const int threads = cfg.team * cfg.rows_per_block;
    const int grid = row_grid(ceil_div(rows, cfg.rows_per_block), current_device_sms(),
                              2048 / threads);
    const bool vec =
        ln_vectorizable<T, W>(hidden, {x, residual, y, sum_out}, {bias_add, gamma, beta});
    auto* xt = static_cast<const T*>(x);
    auto* rt = static_cast<const T*>(residual);
    auto* bt = static_cast<const W*>(bias_add);
    auto* gt = static_cast<const W*>(gamma);
    auto* bet = static_cast<const W*>(beta);
    auto* yt = static_cast<T*>(y);
    auto* st = static_cast<T*>(sum_out);
    if (vec) {
      ln_fwd_kernel<T, W, V><<<grid, block, 0, stream>>>(xt, rt, bt, gt, bet, yt, st, mean_out,
                                                         rstd_out, rows, hidden, eps);
    } else {
      ln_fwd_kernel<T, W, 1><<<grid, block, 0, stream>>>(xt, rt, bt, gt, bet, yt, st, mean_out,
                                                         rstd_out, rows, hidden, eps);
    }
    return cudaGetLastError();
  });
}

extern "C" int bf_layer_norm_bwd_num_parts(int64_t rows, int hidden, bf_dtype_t x_dtype,
                                           bf_dtype_t w_dtype, int device) {
  if (hidden < 1 || hidden > BF_LN_MAX_HIDDEN || rows <= 0) return 1;
  const LnConfig cfg = ln_config(hidden);
  const int64_t groups = ceil_div(rows, cfg.rows_per_block);
  int sms = 1;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
      sms < 1) {
    sms = 1;
  }
  // Resident blocks per SM of the (vectorised) backward kernel for these dtypes: one block per
  // resident slot keeps the workspace (num_parts * nacc * hidden floats) as small as possible
  // while filling the GPU.  The grid-stride loop covers any number of rows.
  int per_sm = 0;
  const int threads = cfg.team * cfg.rows_per_block;
  const size_t smem = cfg.rows_per_block > 1 ? 3 * sizeof(float) * hidden : 0;
  const cudaError_t err = dispatch_ln_types(x_dtype, w_dtype, [&](auto tt, auto wt) {
    using T = typename decltype(tt)::type;
    using W = typename decltype(wt)::type;
    return cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, ln_bwd_kernel_ptr<T, W>(true),
                                                         threads, smem);
  });
  if (err != cudaSuccess || per_sm < 1) {
    (void)cudaGetLastError();  // clear a non-sticky error from the query
    per_sm = 1;
  }
  const int64_t cap = static_cast<int64_t>(sms) * per_sm;
  const int64_t parts = groups < cap ? groups : cap;
  return static_cast<int>(parts < 1 ? 1 : parts);
}

extern "C" cudaError_t bf_layer_norm_bwd(const void* dy, const void* s, const float* mean,
                                         const float* rstd, const void* gamma, const void* dsum,
                                         void* dx, void* dgamma, void* dbeta, void* dbias_add,
                                         float* workspace, int num_parts, int64_t rows,
                                         int hidden, bf_dtype_t x_dtype, bf_dtype_t w_dtype,
                                         cudaStream_t stream) {
  if (hidden < 1 || hidden > BF_LN_MAX_HIDDEN || rows < 0 || num_parts < 1)
    return cudaErrorInvalidValue;
  return dispatch_ln_types(x_dtype, w_dtype, [&](auto tt, auto wt) -> cudaError_t {
    using T = typename decltype(tt)::type;
    using W = typename decltype(wt)::type;
    const size_t wbytes = sizeof(W) * static_cast<size_t>(hidden);
    if (rows == 0) {  // empty input: parameter gradients are zero
      cudaError_t e = cudaMemsetAsync(dgamma, 0, wbytes, stream);
      if (e == cudaSuccess) e = cudaMemsetAsync(dbeta, 0, wbytes, stream);
      if (e == cudaSuccess && dbias_add != nullptr) e = cudaMemsetAsync(dbias_add, 0, wbytes, stream);
      return e;
    }
    constexpr int V = vec16<T>();
    const LnConfig cfg = ln_config(hidden);
    const int nacc = dbias_add != nullptr ? 3 : 2;
    const dim3 block(cfg.team, cfg.rows_per_block);
    const size_t smem = cfg.rows_per_block > 1 ? sizeof(float) * nacc * hidden : 0;
    const int64_t groups = ceil_div(rows, cfg.rows_per_block);
    // More blocks than row groups would leave idle blocks; fewer is always correct.
    const int grid = static_cast<int>(num_parts < groups ? num_parts : groups);
    const bool vec = ln_vectorizable<T, W>(hidden, {dy, s, dsum, dx}, {gamma});
    auto* dyt = static_cast<const T*>(dy);
    auto* st = static_cast<const T*>(s);
    auto* gt = static_cast<const W*>(gamma);
    auto* dst = static_cast<const T*>(dsum);
    auto* dxt = static_cast<T*>(dx);
    if (vec) {
      ln_bwd_kernel<T, W, V><<<grid, block, smem, stream>>>(dyt, st, mean, rstd, gt, dst, dxt,
                                                            workspace, nacc, rows, hidden);
    } else {
      ln_bwd_kernel<T, W, 1><<<grid, block, smem, stream>>>(dyt, st, mean, rstd, gt, dst, dxt,
                                                            workspace, nacc, rows, hidden);
    }
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
    const dim3 fblock(32, kLnFinalizeRows);
    const int fgrid = static_cast<int>(ceil_div(hidden, 32));
    ln_bwd_finalize_kernel<W><<<fgrid, fblock, 0, stream>>>(
        workspace, grid, nacc, hidden, static_cast<W*>(dgamma), static_cast<W*>(dbeta),
        static_cast<W*>(dbias_add));
    return cudaGetLastError();
  });
}
