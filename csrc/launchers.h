// Host-side interface between the torch bindings (*.cpp) and the plain-CUDA kernels (*_kernel.cu).
//
// This header must stay free of torch headers: the .cu files include it and are compiled by plain
// nvcc in CI (no CUDA build of torch there).  Every launcher takes raw device pointers, sizes, a
// dtype code and a cudaStream_t, launches asynchronously on that stream and returns the launch
// status (cudaGetLastError() after the launch, or cudaErrorInvalidValue for arguments it cannot
// handle).  Shapes and dtypes are validated by the .cpp callers; the launchers re-check only what
// would otherwise be memory-unsafe.
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

extern "C" {

// Element types understood by the launchers.
typedef enum {
  BF_FLOAT32 = 0,
  BF_FLOAT16 = 1,
  BF_BFLOAT16 = 2,
  BF_BOOL = 3,  // one byte per element, nonzero = true (torch.bool storage)
} bf_dtype_t;

// ---------------------------------------------------------------------------------------------
// LayerNorm (layer_norm_kernel.cu)
//
// Rows of length `hidden` (1 <= hidden <= BF_LN_MAX_HIDDEN), contiguous.  x/residual/y/sum_out
// have dtype `x_dtype` (float32, float16, bfloat16); gamma/beta/bias_add have dtype `w_dtype`
// (float32 or x_dtype).  Statistics are float32.
//   s = x + bias_add + residual  (each term optional; added in float32, rounded to x_dtype when at
//                                 least one term is present, so that y == LN(s) for the s returned)
//   y = (s - mean(s)) * rsqrt(var(s) + eps) * gamma + beta
// residual, bias_add, sum_out may be NULL.  mean_out/rstd_out: [rows] float32.
#define BF_LN_MAX_HIDDEN 8192

cudaError_t bf_layer_norm_fwd(const void* x, const void* residual, const void* bias_add,
                              const void* gamma, const void* beta, void* y, void* sum_out,
                              float* mean_out, float* rstd_out, int64_t rows, int hidden, float eps,
                              bf_dtype_t x_dtype, bf_dtype_t w_dtype, cudaStream_t stream);

// Backward.  s is the tensor that was normalised (x, or the pre-norm sum when there were
// additions); dsum (may be NULL) is an extra gradient added to dx (the gradient that reached the
// pre-norm sum through return_sum).  dx has x_dtype.  dgamma/dbeta/dbias_add have w_dtype;
// dbias_add may be NULL (then it is not computed).  `workspace` holds num_parts * 3 * hidden
// floats where num_parts comes from bf_layer_norm_bwd_num_parts() for the same arguments; it
// receives per-block column partial sums that a second kernel reduces in a fixed order (the
// result is deterministic).
int bf_layer_norm_bwd_num_parts(int64_t rows, int hidden, bf_dtype_t x_dtype, bf_dtype_t w_dtype,
                                int device);
cudaError_t bf_layer_norm_bwd(const void* dy, const void* s, const float* mean, const float* rstd,
                              const void* gamma, const void* dsum, void* dx, void* dgamma,
                              void* dbeta, void* dbias_add, float* workspace, int num_parts,
                              int64_t rows, int hidden, bf_dtype_t x_dtype, bf_dtype_t w_dtype,
                              cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// Scaled masked softmax (softmax_kernel.cu)
//
// x, y: [batch, heads, q_len, k_len] contiguous, dtype x_dtype.  For each row (b, h, q):
//   z_k = scale * x_k + m_k,  y = softmax(z) over k, where elements whose mask says "masked"
//   (bool mask false, or additive mask <= BF_SOFTMAX_MASKED_THRESHOLD, -inf included) get
//   probability exactly 0, and a row with no unmasked element gives all zeros.
// mask may be NULL; otherwise mask element (b, h, q, k) is at
//   mask + b*mask_stride_b + h*mask_stride_h + q*mask_stride_q + k       (elements, not bytes)
// (a zero stride broadcasts), with mask_dtype BF_BOOL, BF_FLOAT32 or x_dtype.
// -1000, not -10000: BERT's classic -10000 mask rounds to -9984 in bfloat16.  exp() of any value
// this low underflows to 0 in float32 next to realistic logits, so the threshold only decides
// what a row with *no* element above it gives (zeros).
#define BF_SOFTMAX_MASKED_THRESHOLD (-1000.0f)

cudaError_t bf_softmax_fwd(const void* x, const void* mask, void* y, int64_t batch, int heads,
                           int q_len, int k_len, int64_t mask_stride_b, int64_t mask_stride_h,
                           int64_t mask_stride_q, float scale, bf_dtype_t x_dtype,
                           bf_dtype_t mask_dtype, cudaStream_t stream);

// dx = scale * y * (dy - sum_k(dy * y)); all [rows, k_len] contiguous, dtype x_dtype.
cudaError_t bf_softmax_bwd(const void* y, const void* dy, void* dx, int64_t rows, int k_len,
                           float scale, bf_dtype_t x_dtype, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// Multi-tensor LAMB (lamb_kernel.cu)
//
// Each launch covers a list of tensors described by an array of bf_lamb_tensor_t in DEVICE
// memory, sorted by chunk_begin.  Tensor i is split into ceil(numel / BF_LAMB_CHUNK) chunks
// numbered chunk_begin .. chunk_begin + chunks - 1 (one thread block per chunk, grid-stride), so
// one launch steps every tensor.  Entries have numel >= 1.  All element pointers are contiguous;
// p, m, v, u are float32; g has the launch's grad dtype; model has the launch's model dtype.
#define BF_LAMB_CHUNK 65536

typedef struct {
  void* p;             // float32 parameter (master weight)
  const void* g;       // gradient (phase 1)
  void* m;             // float32 exp_avg (phase 1)
  void* v;             // float32 exp_avg_sq (phase 1)
  void* u;             // float32 update: written by phase 1, read by phase 2
  void* model;         // phase 2 only, may be NULL: receives the new p in the model dtype
  int64_t numel;
  int64_t chunk_begin;
  float weight_decay;  // phase 1
  int32_t index;       // position in the caller's tensor lists (norm / sq-norm entries)
  int32_t vec;         // 1: every pointer of this entry is 16-byte aligned (vector path)
  int32_t adapt;       // phase 2: apply the trust ratio (else ratio 1)
} bf_lamb_tensor_t;

// Phase 1: g = grad / grad_scale; m = beta1*m + (1-beta1)*g; v = beta2*v + (1-beta2)*g*g;
// u = (m / bc1) / (sqrt(v / bc2) + eps) + weight_decay * p.  grad_scale is *grad_scale_ptr when
// that is non-NULL (a device scalar, no host sync), else grad_scale.  When sq_out is non-NULL
// (float32 [2][sq_stride], pre-zeroed) it receives per tensor index the sums of squares of p
// (row 0) and u (row 1); chunk_sq is then a scratch of 2 * total_chunks floats (deterministic
// two-stage reduction).
// The hyper-parameters are doubles so that (1 - beta) is formed in double precision and then
// rounded, as PyTorch does for the reference's Python-float arithmetic.
cudaError_t bf_lamb_update(const bf_lamb_tensor_t* tensors, int num_tensors, int64_t total_chunks,
                           double beta1, double beta2, double eps, double bc1, double bc2,
                           const float* grad_scale_ptr, float grad_scale, bf_dtype_t grad_dtype,
                           float* chunk_sq, float* sq_out, int64_t sq_stride, cudaStream_t stream);

// Phase 2: r = (pn > 0 && un > 0) ? pn / un : 1 with pn = param_norms[index], un =
// update_norms[index]; r = min(max(r, min_ratio), max_ratio); r = adapt ? r : 1;
// p -= (r * lr) * u; model = p (cast) when model != NULL.  lr is *lr_ptr when non-NULL.
cudaError_t bf_lamb_apply(const bf_lamb_tensor_t* tensors, int num_tensors, int64_t total_chunks,
                          const float* param_norms, const float* update_norms, const float* lr_ptr,
                          float lr, float min_ratio, float max_ratio, bf_dtype_t model_dtype,
                          int has_model, cudaStream_t stream);

}  // extern "C"
