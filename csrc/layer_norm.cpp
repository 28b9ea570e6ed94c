// Torch binding of the LayerNorm kernels (layer_norm_kernel.cu): argument checks, output
// allocation, launch on the current stream.  Registered with Python in bindings.cpp.
#include "torch_utils.h"

#include <tuple>
#include <vector>

namespace bertforge {

// Returns {y, mean, rstd, sum}; `out` optionally supplies them preallocated (same order).  sum is the pre-norm sum x + bias_add + residual (x's dtype and
// shape) when store_sum is set and at least one addition is given, else an empty tensor.
std::vector<at::Tensor> layer_norm_fwd(const at::Tensor& x, const at::Tensor& weight,
                                       const at::Tensor& bias,
                                       const std::optional<at::Tensor>& residual,
                                       const std::optional<at::Tensor>& bias_add, double eps,
                                       bool store_sum,
                                       const std::optional<std::vector<at::Tensor>>& out) {
  TORCH_CHECK(x.is_cuda(), "bertforge.layer_norm_fwd: x must be a CUDA tensor");
  TORCH_CHECK(is_float_type(x.scalar_type()),
              "bertforge.layer_norm_fwd: x must be float32, float16 or bfloat16, got ",
              x.scalar_type());
  TORCH_CHECK(x.dim() >= 1, "bertforge.layer_norm_fwd: x must have at least one dimension");
  const int64_t hidden = x.size(-1);
  TORCH_CHECK(hidden >= 1 && hidden <= BF_LN_MAX_HIDDEN, "bertforge.layer_norm_fwd: hidden size ",
              hidden, " outside [1, ", BF_LN_MAX_HIDDEN, "]");
  check_cuda_tensor(weight, "weight", x);
  check_cuda_tensor(bias, "bias", x);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == hidden && bias.dim() == 1 &&
                  bias.size(0) == hidden,
              "bertforge.layer_norm_fwd: weight and bias must have shape [", hidden, "]");
  TORCH_CHECK(weight.scalar_type() == bias.scalar_type(),
              "bertforge.layer_norm_fwd: weight and bias dtypes differ");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() || weight.scalar_type() == at::kFloat,
              "bertforge.layer_norm_fwd: weight dtype must be float32 or x's dtype");
  const bool has_res = residual.has_value() && residual->defined();
  const bool has_badd = bias_add.has_value() && bias_add->defined();
  if (has_res) {
    check_cuda_tensor(*residual, "residual", x);
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type(),
                "bertforge.layer_norm_fwd: residual must match x in shape and dtype");
  }
  if (has_badd) {
    check_cuda_tensor(*bias_add, "bias_add", x);
    TORCH_CHECK(bias_add->dim() == 1 && bias_add->size(0) == hidden &&
                    bias_add->scalar_type() == weight.scalar_type(),
                "bertforge.layer_norm_fwd: bias_add must have shape [", hidden,
                "] and weight's dtype");
  }

  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  const at::Tensor wc = weight.contiguous();
  const at::Tensor bc = bias.contiguous();
  const at::Tensor rc = has_res ? residual->contiguous() : at::Tensor();
  const at::Tensor bac = has_badd ? bias_add->contiguous() : at::Tensor();
  const int64_t rows = xc.numel() / hidden;

  at::Tensor y = output(out, 0, xc.sizes(), xc.options(), "y");
  at::Tensor mean = output(out, 1, {rows}, xc.options().dtype(at::kFloat), "mean");
  at::Tensor rstd = output(out, 2, {rows}, xc.options().dtype(at::kFloat), "rstd");
  const bool want_sum = store_sum && (has_res || has_badd);
  at::Tensor sum = want_sum ? output(out, 3, xc.sizes(), xc.options(), "sum")
                            : at::empty({0}, xc.options());

  BF_CHECK_LAUNCH(bf_layer_norm_fwd(
      xc.data_ptr(), has_res ? rc.data_ptr() : nullptr, has_badd ? bac.data_ptr() : nullptr,
      wc.data_ptr(), bc.data_ptr(), y.data_ptr(), want_sum ? sum.data_ptr() : nullptr,
      mean.data_ptr<float>(), rstd.data_ptr<float>(), rows, static_cast<int>(hidden),
      static_cast<float>(eps), bf_dtype(xc.scalar_type()), bf_dtype(wc.scalar_type()),
      current_stream()));
  return {y, mean, rstd, sum};
}

// Returns {dx, dweight, dbias, dbias_add}; dbias_add is empty unless want_dbias_add; `out`
// optionally supplies them preallocated (same order).  s is the
// normalised tensor (x, or the saved pre-norm sum); dsum (optional) is added to dx.
std::vector<at::Tensor> layer_norm_bwd(const at::Tensor& dy, const at::Tensor& s,
                                       const at::Tensor& mean, const at::Tensor& rstd,
                                       const at::Tensor& weight,
                                       const std::optional<at::Tensor>& dsum,
                                       bool want_dbias_add,
                                       const std::optional<std::vector<at::Tensor>>& out) {
  TORCH_CHECK(s.is_cuda(), "bertforge.layer_norm_bwd: input must be a CUDA tensor");
  TORCH_CHECK(is_float_type(s.scalar_type()),
              "bertforge.layer_norm_bwd: unsupported dtype ", s.scalar_type());
  TORCH_CHECK(s.dim() >= 1, "bertforge.layer_norm_bwd: input must have at least one dimension");
  const int64_t hidden = s.size(-1);
  TORCH_CHECK(hidden >= 1 && hidden <= BF_LN_MAX_HIDDEN, "bertforge.layer_norm_bwd: hidden size ",
              hidden, " outside [1, ", BF_LN_MAX_HIDDEN, "]");
  const int64_t rows = s.numel() / hidden;
  check_cuda_tensor(dy, "grad_output", s);
  TORCH_CHECK(dy.sizes() == s.sizes() && dy.scalar_type() == s.scalar_type(),
              "bertforge.layer_norm_bwd: grad_output must match the input in shape and dtype");
  check_cuda_tensor(mean, "mean", s);
  check_cuda_tensor(rstd, "rstd", s);
  TORCH_CHECK(mean.scalar_type() == at::kFloat && rstd.scalar_type() == at::kFloat &&
                  mean.numel() == rows && rstd.numel() == rows,
              "bertforge.layer_norm_bwd: mean/rstd must be float32 with ", rows, " elements");
  check_cuda_tensor(weight, "weight", s);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == hidden,
              "bertforge.layer_norm_bwd: weight must have shape [", hidden, "]");
  TORCH_CHECK(weight.scalar_type() == s.scalar_type() || weight.scalar_type() == at::kFloat,
              "bertforge.layer_norm_bwd: weight dtype must be float32 or the input's dtype");
  const bool has_dsum = dsum.has_value() && dsum->defined();
  if (has_dsum) {
    check_cuda_tensor(*dsum, "grad_sum", s);
    TORCH_CHECK(dsum->sizes() == s.sizes() && dsum->scalar_type() == s.scalar_type(),
                "bertforge.layer_norm_bwd: grad of the pre-norm sum must match the input");
  }

  const c10::cuda::CUDAGuard guard(s.device());
  const at::Tensor dyc = dy.contiguous();
  const at::Tensor sc = s.contiguous();
  const at::Tensor mc = mean.contiguous();
  const at::Tensor rc = rstd.contiguous();
  const at::Tensor wc = weight.contiguous();
  const at::Tensor dsc = has_dsum ? dsum->contiguous() : at::Tensor();

  at::Tensor dx = output(out, 0, sc.sizes(), sc.options(), "dx");
  at::Tensor dweight = output(out, 1, {hidden}, wc.options(), "dweight");
  at::Tensor dbias = output(out, 2, {hidden}, wc.options(), "dbias");
  at::Tensor dbias_add = want_dbias_add ? output(out, 3, {hidden}, wc.options(), "dbias_add")
                                        : at::empty({0}, wc.options());
  const bf_dtype_t xd = bf_dtype(sc.scalar_type());
  const bf_dtype_t wd = bf_dtype(wc.scalar_type());
  const int parts =
      bf_layer_norm_bwd_num_parts(rows, static_cast<int>(hidden), xd, wd, s.get_device());
  at::Tensor workspace =
      at::empty({static_cast<int64_t>(parts) * 3 * hidden}, sc.options().dtype(at::kFloat));

  BF_CHECK_LAUNCH(bf_layer_norm_bwd(
      dyc.data_ptr(), sc.data_ptr(), mc.data_ptr<float>(), rc.data_ptr<float>(), wc.data_ptr(),
      has_dsum ? dsc.data_ptr() : nullptr, dx.data_ptr(), dweight.data_ptr(), dbias.data_ptr(),
      want_dbias_add ? dbias_add.data_ptr() : nullptr, workspace.data_ptr<float>(), parts, rows,
      static_cast<int>(hidden), xd, wd, current_stream()));
  return {dx, dweight, dbias, dbias_add};
}

}  // namespace bertforge
