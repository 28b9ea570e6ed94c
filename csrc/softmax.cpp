// Torch binding of the scaled masked softmax kernels (softmax_kernel.cu).  Registered with Python
// in bindings.cpp.
#include "torch_utils.h"

namespace bertforge {

namespace {
std::optional<std::vector<at::Tensor>> opt_list(const std::optional<at::Tensor>& t) {
  if (!t.has_value() || !t->defined()) return std::nullopt;
  return std::vector<at::Tensor>{*t};
}
}  // namespace

// y = softmax(scale * x + mask) over the last dim of x [batch, heads, q, k].  mask (optional):
// 4-D, each of the first three dims 1 or x's, last dim k; bool (true = keep), float32, or x's
// dtype (additive; <= BF_SOFTMAX_MASKED_THRESHOLD means masked).  Fully masked rows give zeros.
// `out` optionally supplies y preallocated.
at::Tensor softmax_fwd(const at::Tensor& x, const std::optional<at::Tensor>& mask, double scale,
                       const std::optional<at::Tensor>& out) {
  TORCH_CHECK(x.is_cuda(), "bertforge.softmax_fwd: scores must be a CUDA tensor");
  TORCH_CHECK(is_float_type(x.scalar_type()),
              "bertforge.softmax_fwd: scores must be float32, float16 or bfloat16, got ",
              x.scalar_type());
  TORCH_CHECK(x.dim() == 4, "bertforge.softmax_fwd: scores must be [batch, heads, q, k], got ",
              x.sizes());
  const int heads = checked_int(x.size(1), "heads");
  const int q_len = checked_int(x.size(2), "q_len");
  const int k_len = checked_int(x.size(3), "k_len");
  const bool has_mask = mask.has_value() && mask->defined();
  at::Tensor mc;
  int64_t strides[3] = {0, 0, 0};
  bf_dtype_t md = bf_dtype(x.scalar_type());
  const c10::cuda::CUDAGuard guard(x.device());
  if (has_mask) {
    check_cuda_tensor(*mask, "mask", x);
    TORCH_CHECK(mask->dim() == 4, "bertforge.softmax_fwd: mask must be 4-D, got ", mask->sizes());
    for (int d = 0; d < 3; ++d) {
      TORCH_CHECK(mask->size(d) == 1 || mask->size(d) == x.size(d),
                  "bertforge.softmax_fwd: mask ", mask->sizes(),
                  " does not broadcast to scores ", x.sizes());
    }
    TORCH_CHECK(mask->size(3) == x.size(3), "bertforge.softmax_fwd: mask's last dim ",
                mask->size(3), " != k_len ", x.size(3));
    const at::ScalarType mt = mask->scalar_type();
    TORCH_CHECK(mt == at::kBool || mt == at::kFloat || mt == x.scalar_type(),
                "bertforge.softmax_fwd: mask dtype must be bool, float32 or the scores' dtype, got ",
                mt);
    mc = (mask->size(3) > 1 && mask->stride(3) != 1) ? mask->contiguous() : *mask;
    for (int d = 0; d < 3; ++d) strides[d] = mc.size(d) == 1 ? 0 : mc.stride(d);
    md = bf_dtype(mt);
  }
  const at::Tensor xc = x.contiguous();
  at::Tensor y = output(opt_list(out), 0, xc.sizes(), xc.options(), "y");
  BF_CHECK_LAUNCH(bf_softmax_fwd(xc.data_ptr(), has_mask ? mc.data_ptr() : nullptr, y.data_ptr(),
                                 xc.size(0), heads, q_len, k_len, strides[0], strides[1],
                                 strides[2], static_cast<float>(scale),
                                 bf_dtype(xc.scalar_type()), md, current_stream()));
  return y;
}

// dx = scale * y * (dy - sum(dy * y, -1)).  `out` optionally supplies dx preallocated.
at::Tensor softmax_bwd(const at::Tensor& y, const at::Tensor& dy, double scale,
                       const std::optional<at::Tensor>& out) {
  TORCH_CHECK(y.is_cuda(), "bertforge.softmax_bwd: y must be a CUDA tensor");
  TORCH_CHECK(is_float_type(y.scalar_type()), "bertforge.softmax_bwd: unsupported dtype ",
              y.scalar_type());
  TORCH_CHECK(y.dim() >= 1, "bertforge.softmax_bwd: y must have at least one dimension");
  check_cuda_tensor(dy, "grad_output", y);
  TORCH_CHECK(dy.sizes() == y.sizes() && dy.scalar_type() == y.scalar_type(),
              "bertforge.softmax_bwd: grad_output must match y in shape and dtype");
  const c10::cuda::CUDAGuard guard(y.device());
  const at::Tensor yc = y.contiguous();
  const at::Tensor dyc = dy.contiguous();
  at::Tensor dx = output(opt_list(out), 0, yc.sizes(), yc.options(), "dx");
  const int k_len = checked_int(yc.size(-1), "k_len");
  const int64_t rows = k_len > 0 ? yc.numel() / k_len : 0;
  BF_CHECK_LAUNCH(bf_softmax_bwd(yc.data_ptr(), dyc.data_ptr(), dx.data_ptr(), rows, k_len,
                                 static_cast<float>(scale), bf_dtype(yc.scalar_type()),
                                 current_stream()));
  return dx;
}

}  // namespace bertforge
