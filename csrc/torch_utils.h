// Helpers shared by the torch bindings (*.cpp).  Never included by the .cu files.
#pragma once

// Deliberately light headers (not torch/extension.h): the CI syntax check compiles these
// files against the CPU torch wheel, and torch/extension.h costs ~1 minute per file there.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <climits>
#include <cstdint>
#include <string>
#include <vector>

#include "launchers.h"

namespace bertforge {

inline bf_dtype_t bf_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return BF_FLOAT32;
    case at::kHalf:
      return BF_FLOAT16;
    case at::kBFloat16:
      return BF_BFLOAT16;
    case at::kBool:
      return BF_BOOL;
    default:
      TORCH_CHECK(false, "bertforge: unsupported dtype ", t);
  }
  return BF_FLOAT32;  // unreachable
}

inline bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

inline void check_cuda_tensor(const at::Tensor& t, const char* name, const at::Tensor& ref) {
  TORCH_CHECK(t.is_cuda(), "bertforge: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == ref.device(), "bertforge: ", name, " is on ", t.device(),
              " but the input is on ", ref.device());
}

inline int checked_int(int64_t v, const char* what) {
  TORCH_CHECK(v >= 0 && v <= INT_MAX, "bertforge: ", what, " = ", v, " does not fit in int32");
  return static_cast<int>(v);
}

inline bool is_aligned_to(const void* p, int bytes) {
  return (reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes)) == 0;
}

// Output i: a fresh tensor, or out[i] when the caller passed preallocated outputs (tests poison
// them with NaN to catch unwritten elements; benchmarks avoid allocator noise).
inline at::Tensor output(const std::optional<std::vector<at::Tensor>>& out, size_t i,
                         at::IntArrayRef sizes, const at::TensorOptions& opts, const char* what) {
  if (!out.has_value()) return at::empty(sizes, opts);
  TORCH_CHECK(i < out->size(), "bertforge: too few preallocated outputs for ", what);
  const at::Tensor& t = (*out)[i];
  TORCH_CHECK(t.sizes() == sizes && t.scalar_type() == opts.dtype().toScalarType() &&
                  t.device() == opts.device() && t.is_contiguous(),
              "bertforge: preallocated ", what, " must be contiguous ", sizes, " ",
              opts.dtype().toScalarType(), " on ", opts.device(), ", got ", t.sizes(), " ",
              t.scalar_type(), " on ", t.device());
  return t;
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

}  // namespace bertforge

#define BF_CHECK_LAUNCH(expr)                                                             \
  do {                                                                                    \
    const cudaError_t bf_err_ = (expr);                                                   \
    TORCH_CHECK(bf_err_ == cudaSuccess, "bertforge: ", #expr, " failed: ",                \
                cudaGetErrorString(bf_err_));                                             \
  } while (0)
