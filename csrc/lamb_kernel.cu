// Multi-tensor LAMB: phase 1 (moments + raw update, optional per-tensor sums of squares) and
// phase 2 (trust ratio from given norms + parameter update, optional model-weight copy), each one
// launch over every tensor of the step.  Plain CUDA (no torch headers); the torch binding is
// lamb.cpp and the Python front pretrain/ops/lamb_fused.py.  Contract: launchers.h.
//
// The two phases are separate launches on purpose: LAMB's trust ratio needs the norms of whole
// tensors, which under ZeRO only exist after the caller has all-reduced per-shard sums of squares
// between the phases (pretrain/ops/lamb.py).  Phase 1 can produce those local sums itself
// (sq_out), saving the caller a second read of p and u.
//
// Work decomposition (apex multi_tensor_apply style): every tensor is cut into chunks of
// BF_LAMB_CHUNK elements; block b handles chunks b, b + gridDim.x, ...; a block finds its tensor by
// binary search over the tensors' chunk_begin (tensor metadata lives in device memory, so a single
// launch covers any number of tensors, no kernel-argument size limit).  Each thread handles 4
// consecutive elements per iteration with 16-byte loads when the entry's pointers are aligned (the
// host checks), scalar otherwise; a chunk starts at a multiple of 4 elements, so alignment of the
// tensor base carries over to every vector, and the last partial vector of a tensor is done by
// scalar code.  Everything is computed in float32.
#include "common.cuh"

namespace bertforge {
namespace {

constexpr int kLambBlock = 512;
constexpr int kLambIlp = 4;
constexpr int kLambFinalizeBlock = 256;  // one warp per tensor
static_assert(BF_LAMB_CHUNK % kLambIlp == 0, "chunks must preserve vector alignment");
static_assert(kLambBlock <= kMaxBlock, "team_allreduce scratch is sized for kMaxBlock");

// Index of the tensor owning `chunk`: the last entry with chunk_begin <= chunk (entries are sorted
// by chunk_begin and have >= 1 chunk each).
__device__ __forceinline__ int find_tensor(const bf_lamb_tensor_t* __restrict__ t, int n,
                                           int64_t chunk) {
  int lo = 0, hi = n - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (t[mid].chunk_begin <= chunk) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

struct AdamCoeffs {
  float b1, b2, omb1, omb2, eps, bc1, bc2;
};

template <typename G, bool kSq>
__global__ void __launch_bounds__(kLambBlock)
    lamb_update_kernel(const bf_lamb_tensor_t* __restrict__ tensors, int n, int64_t total_chunks,
                       AdamCoeffs k, const float* __restrict__ gs_ptr, float gs,
                       float* __restrict__ chunk_sq) {
  __shared__ float scratch[2 * kMaxWarps];
  const float scale = gs_ptr != nullptr ? *gs_ptr : gs;
  for (int64_t c = blockIdx.x; c < total_chunks; c += gridDim.x) {  // block-uniform loop
    const bf_lamb_tensor_t& e = tensors[find_tensor(tensors, n, c)];
    const int64_t start = (c - e.chunk_begin) * BF_LAMB_CHUNK;
    const int64_t end = min(start + static_cast<int64_t>(BF_LAMB_CHUNK), e.numel);
    const float* __restrict__ p = static_cast<const float*>(e.p);
    const G* __restrict__ g = static_cast<const G*>(e.g);
    float* __restrict__ m = static_cast<float*>(e.m);
    float* __restrict__ v = static_cast<float*>(e.v);
    float* __restrict__ u = static_cast<float*>(e.u);
    const float wd = e.weight_decay;
    float sp = 0.f, su = 0.f;
    // Same operation order as pretrain/ops/lamb.py:lamb_update_reference.
    auto adam = [&](float pv, float gv, float& mv, float& vv) -> float {
      const float gg = gv / scale;
      mv = k.b1 * mv + k.omb1 * gg;
      vv = k.b2 * vv + k.omb2 * (gg * gg);
      const float uu = (mv / k.bc1) / (sqrtf(vv / k.bc2) + k.eps) + wd * pv;
      if (kSq) {
        sp += pv * pv;
        su += uu * uu;
      }
      return uu;
    };
    if (e.vec) {
      for (int64_t i = start + threadIdx.x * kLambIlp; i < end; i += kLambBlock * kLambIlp) {
        if (i + kLambIlp <= end) {
          const Pack<float, kLambIlp> pp = load_pack<kLambIlp>(p + i);
          const Pack<G, kLambIlp> gp = load_pack<kLambIlp>(g + i);
          Pack<float, kLambIlp> mp = load_pack<kLambIlp>(m + i);
          Pack<float, kLambIlp> vp = load_pack<kLambIlp>(v + i);
          Pack<float, kLambIlp> up;
#pragma unroll
          for (int j = 0; j < kLambIlp; ++j)
            up.v[j] = adam(pp.v[j], to_float(gp.v[j]), mp.v[j], vp.v[j]);
          store_pack<kLambIlp>(m + i, mp);
          store_pack<kLambIlp>(v + i, vp);
          store_pack<kLambIlp>(u + i, up);
        } else {
          for (int64_t j = i; j < end; ++j) {
            float mv = m[j], vv = v[j];
            u[j] = adam(p[j], to_float(g[j]), mv, vv);
            m[j] = mv;
            v[j] = vv;
          }
        }
      }
    } else {
      for (int64_t j = start + threadIdx.x; j < end; j += kLambBlock) {
        float mv = m[j], vv = v[j];
        u[j] = adam(p[j], to_float(g[j]), mv, vv);
        m[j] = mv;
        v[j] = vv;
      }
    }
    if constexpr (kSq) {
      float red[2] = {sp, su};
      team_allreduce<false, 2>(red, scratch);
      if (threadIdx.x == 0) {
        chunk_sq[2 * c] = red[0];
        chunk_sq[2 * c + 1] = red[1];
      }
    }
  }
}

// Per tensor: sum its chunks' partial sums of squares in a fixed order (one warp per tensor).
__global__ void lamb_sq_finalize_kernel(const bf_lamb_tensor_t* __restrict__ tensors, int n,
                                        const float* __restrict__ chunk_sq,
                                        float* __restrict__ sq_out, int64_t sq_stride) {
  const int w = static_cast<int>((static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5);
  const int lane = threadIdx.x & 31;
  if (w >= n) return;  // whole warps exit together; no block-level barrier below
  const bf_lamb_tensor_t& e = tensors[w];
  const int64_t chunks = ceil_div(e.numel, BF_LAMB_CHUNK);
  float a = 0.f, b = 0.f;
  for (int64_t j = lane; j < chunks; j += 32) {
    a += chunk_sq[2 * (e.chunk_begin + j)];
    b += chunk_sq[2 * (e.chunk_begin + j) + 1];
  }
  a = warp_sum(a);
  b = warp_sum(b);
  if (lane == 0) {
    sq_out[e.index] = a;
    sq_out[sq_stride + e.index] = b;
  }
}

template <typename MT, bool kModel>
__global__ void __launch_bounds__(kLambBlock)
    lamb_apply_kernel(const bf_lamb_tensor_t* __restrict__ tensors, int n, int64_t total_chunks,
                      const float* __restrict__ param_norms,
                      const float* __restrict__ update_norms, const float* __restrict__ lr_ptr,
                      float lr, float min_ratio, float max_ratio) {
  const float lrv = lr_ptr != nullptr ? *lr_ptr : lr;
  for (int64_t c = blockIdx.x; c < total_chunks; c += gridDim.x) {
    const bf_lamb_tensor_t& e = tensors[find_tensor(tensors, n, c)];
    const int64_t start = (c - e.chunk_begin) * BF_LAMB_CHUNK;
    const int64_t end = min(start + static_cast<int64_t>(BF_LAMB_CHUNK), e.numel);
    // Trust ratio exactly as pretrain/ops/lamb.py:trust_ratios (NaN norms fail "> 0": ratio 1).
    const float pn = param_norms[e.index];
    const float un = update_norms[e.index];
    float ratio = (pn > 0.f && un > 0.f) ? pn / un : 1.f;
    ratio = fminf(fmaxf(ratio, min_ratio), max_ratio);
    if (!e.adapt) ratio = 1.f;
    const float s = ratio * lrv;
    float* __restrict__ p = static_cast<float*>(e.p);
    const float* __restrict__ u = static_cast<const float*>(e.u);
    MT* __restrict__ model = static_cast<MT*>(e.model);
    if (e.vec) {
      for (int64_t i = start + threadIdx.x * kLambIlp; i < end; i += kLambBlock * kLambIlp) {
        if (i + kLambIlp <= end) {
          const Pack<float, kLambIlp> pp = load_pack<kLambIlp>(p + i);
          const Pack<float, kLambIlp> up = load_pack<kLambIlp>(u + i);
          Pack<float, kLambIlp> np;
#pragma unroll
          for (int j = 0; j < kLambIlp; ++j) np.v[j] = pp.v[j] - up.v[j] * s;
          store_pack<kLambIlp>(p + i, np);
          if (kModel) {
            Pack<MT, kLambIlp> mp;
#pragma unroll
            for (int j = 0; j < kLambIlp; ++j) mp.v[j] = from_float<MT>(np.v[j]);
            store_pack<kLambIlp>(model + i, mp);
          }
        } else {
          for (int64_t j = i; j < end; ++j) {
            const float pv = p[j] - u[j] * s;
            p[j] = pv;
            if (kModel) model[j] = from_float<MT>(pv);
          }
        }
      }
    } else {
      for (int64_t j = start + threadIdx.x; j < end; j += kLambBlock) {
        const float pv = p[j] - u[j] * s;
        p[j] = pv;
        if (kModel) model[j] = from_float<MT>(pv);
      }
    }
  }
}

inline int lamb_grid(int64_t total_chunks) {
  const int64_t cap = static_cast<int64_t>(current_device_sms()) * 64;  // grid-stride beyond
  return static_cast<int>(total_chunks < cap ? total_chunks : cap);
}

template <typename G>
void launch_lamb_update(const bf_lamb_tensor_t* tensors, int n, int64_t total_chunks,
                        const AdamCoeffs& k, const float* gs_ptr, float gs, float* chunk_sq,
                        cudaStream_t stream) {
  const int grid = lamb_grid(total_chunks);
  if (chunk_sq != nullptr) {
    lamb_update_kernel<G, true>
        <<<grid, kLambBlock, 0, stream>>>(tensors, n, total_chunks, k, gs_ptr, gs, chunk_sq);
  } else {
    lamb_update_kernel<G, false>
        <<<grid, kLambBlock, 0, stream>>>(tensors, n, total_chunks, k, gs_ptr, gs, nullptr);
  }
}

template <typename MT, bool kModel>
void launch_lamb_apply(const bf_lamb_tensor_t* tensors, int n, int64_t total_chunks,
                       const float* pn, const float* un, const float* lr_ptr, float lr,
                       float min_ratio, float max_ratio, cudaStream_t stream) {
  lamb_apply_kernel<MT, kModel><<<lamb_grid(total_chunks), kLambBlock, 0, stream>>>(
      tensors, n, total_chunks, pn, un, lr_ptr, lr, min_ratio, max_ratio);
}

}  // namespace
}  // namespace bertforge

using namespace bertforge;

extern "C" cudaError_t bf_lamb_update(const bf_lamb_tensor_t* tensors, int num_tensors,
                                      int64_t total_chunks, double beta1, double beta2,
                                      double eps, double bc1, double bc2,
                                      const float* grad_scale_ptr, float grad_scale,
                                      bf_dtype_t grad_dtype, float* chunk_sq, float* sq_out,
                                      int64_t sq_stride, cudaStream_t stream) {
  if (num_tensors < 0 || total_chunks < 0) return cudaErrorInvalidValue;
  if (sq_out != nullptr && chunk_sq == nullptr) return cudaErrorInvalidValue;
  if (num_tensors == 0 || total_chunks == 0) return cudaSuccess;
  AdamCoeffs k;
  k.b1 = static_cast<float>(beta1);
  k.b2 = static_cast<float>(beta2);
  k.omb1 = static_cast<float>(1.0 - beta1);
  k.omb2 = static_cast<float>(1.0 - beta2);
  k.eps = static_cast<float>(eps);
  k.bc1 = static_cast<float>(bc1);
  k.bc2 = static_cast<float>(bc2);
  float* scratch = sq_out != nullptr ? chunk_sq : nullptr;
  switch (grad_dtype) {
    case BF_FLOAT32:
      launch_lamb_update<float>(tensors, num_tensors, total_chunks, k, grad_scale_ptr, grad_scale,
                                scratch, stream);
      break;
    case BF_FLOAT16:
      launch_lamb_update<__half>(tensors, num_tensors, total_chunks, k, grad_scale_ptr,
                                 grad_scale, scratch, stream);
      break;
    case BF_BFLOAT16:
      launch_lamb_update<__nv_bfloat16>(tensors, num_tensors, total_chunks, k, grad_scale_ptr,
                                        grad_scale, scratch, stream);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || sq_out == nullptr) return err;
  const int warps_per_block = kLambFinalizeBlock / 32;
  const int fgrid = static_cast<int>(ceil_div(num_tensors, warps_per_block));
  lamb_sq_finalize_kernel<<<fgrid, kLambFinalizeBlock, 0, stream>>>(tensors, num_tensors,
                                                                    chunk_sq, sq_out, sq_stride);
  return cudaGetLastError();
}

extern "C" cudaError_t bf_lamb_apply(const bf_lamb_tensor_t* tensors, int num_tensors,
                                     int64_t total_chunks, const float* param_norms,
                                     const float* update_norms, const float* lr_ptr, float lr,
                                     float min_ratio, float max_ratio, bf_dtype_t model_dtype,
                                     int has_model, cudaStream_t stream) {
  if (num_tensors < 0 || total_chunks < 0) return cudaErrorInvalidValue;
  if (num_tensors == 0 || total_chunks == 0) return cudaSuccess;
  if (!has_model) {
    launch_lamb_apply<float, false>(tensors, num_tensors, total_chunks, param_norms, update_norms,
                                    lr_ptr, lr, min_ratio, max_ratio, stream);
  } else {
    switch (model_dtype) {
      case BF_FLOAT32:
        launch_lamb_apply<float, true>(tensors, num_tensors, total_chunks, param_norms,
                                       update_norms, lr_ptr, lr, min_ratio, max_ratio, stream);
        break;
      case BF_FLOAT16:
        launch_lamb_apply<__half, true>(tensors, num_tensors, total_chunks, param_norms,
                                        update_norms, lr_ptr, lr, min_ratio, max_ratio, stream);
        break;
      case BF_BFLOAT16:
        launch_lamb_apply<__nv_bfloat16, true>(tensors, num_tensors, total_chunks, param_norms,
                                               update_norms, lr_ptr, lr, min_ratio, max_ratio,
                                               stream);
        break;
      default:
        return cudaErrorInvalidValue;
    }
  }
  return cudaGetLastError();
}
