// The single PYBIND11_MODULE of the bertforge_C extension.  The functions are defined in the
// per-op bindings (layer_norm.cpp, softmax.cpp, lamb.cpp); pretrain/ops wraps them in
// torch.library custom ops.  The optional `out` arguments take preallocated outputs (tests
// poison them with NaN to catch unwritten elements; benchmarks avoid allocator noise).

// torch/csrc/utils/pybind.h brings pybind11 (+ stl casters) and the at::Tensor caster without
// the whole C++ frontend that torch/extension.h includes.
#include <torch/csrc/utils/pybind.h>

#include "launchers.h"

#include <vector>

namespace bertforge {
std::vector<at::Tensor> layer_norm_fwd(const at::Tensor& x, const at::Tensor& weight,
                                       const at::Tensor& bias,
                                       const std::optional<at::Tensor>& residual,
                                       const std::optional<at::Tensor>& bias_add, double eps,
                                       bool store_sum,
                                       const std::optional<std::vector<at::Tensor>>& out);
std::vector<at::Tensor> layer_norm_bwd(const at::Tensor& dy, const at::Tensor& s,
                                       const at::Tensor& mean, const at::Tensor& rstd,
                                       const at::Tensor& weight,
                                       const std::optional<at::Tensor>& dsum,
                                       bool want_dbias_add,
                                       const std::optional<std::vector<at::Tensor>>& out);
at::Tensor softmax_fwd(const at::Tensor& x, const std::optional<at::Tensor>& mask, double scale,
                       const std::optional<at::Tensor>& out);
at::Tensor softmax_bwd(const at::Tensor& y, const at::Tensor& dy, double scale,
                       const std::optional<at::Tensor>& out);
void lamb_update(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                 const std::vector<at::Tensor>& exp_avgs,
                 const std::vector<at::Tensor>& exp_avg_sqs,
                 const std::vector<at::Tensor>& updates, const std::vector<double>& weight_decays,
                 double beta1, double beta2, double eps, double bc1, double bc2,
                 const std::optional<at::Tensor>& grad_scale, double grad_scale_value,
                 const std::optional<at::Tensor>& sq_norms_out);
void lamb_apply(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& updates,
                const std::vector<at::Tensor>& model_params, const at::Tensor& param_norms,
                const at::Tensor& update_norms, const std::vector<bool>& adapt,
                const std::optional<at::Tensor>& lr, double lr_value, double min_trust_ratio,
                double max_trust_ratio);
}  // namespace bertforge

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "bertforge fused CUDA kernels (LayerNorm, scaled masked softmax, multi-tensor LAMB)";
  m.attr("LN_MAX_HIDDEN") = BF_LN_MAX_HIDDEN;
  m.attr("SOFTMAX_MASKED_THRESHOLD") = BF_SOFTMAX_MASKED_THRESHOLD;
  m.def("layer_norm_fwd", &bertforge::layer_norm_fwd, "LayerNorm forward (fused bias + residual)",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("residual"),
        py::arg("bias_add"), py::arg("eps"), py::arg("store_sum"), py::arg("out") = py::none());
  m.def("layer_norm_bwd", &bertforge::layer_norm_bwd, "LayerNorm backward", py::arg("dy"),
        py::arg("s"), py::arg("mean"), py::arg("rstd"), py::arg("weight"), py::arg("dsum"),
        py::arg("want_dbias_add"), py::arg("out") = py::none());
  m.def("softmax_fwd", &bertforge::softmax_fwd, "scaled masked softmax forward", py::arg("x"),
        py::arg("mask"), py::arg("scale"), py::arg("out") = py::none());
  m.def("softmax_bwd", &bertforge::softmax_bwd, "scaled masked softmax backward", py::arg("y"),
        py::arg("dy"), py::arg("scale"), py::arg("out") = py::none());
  m.attr("LAMB_CHUNK") = BF_LAMB_CHUNK;
  m.def("lamb_update", &bertforge::lamb_update,
        "multi-tensor LAMB phase 1 (moments, raw updates, optional per-tensor sums of squares)",
        py::arg("params"), py::arg("grads"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"),
        py::arg("updates"), py::arg("weight_decays"), py::arg("beta1"), py::arg("beta2"),
        py::arg("eps"), py::arg("bc1"), py::arg("bc2"), py::arg("grad_scale"),
        py::arg("grad_scale_value"), py::arg("sq_norms_out"));
  m.def("lamb_apply", &bertforge::lamb_apply,
        "multi-tensor LAMB phase 2 (trust ratios from given norms, parameter update)",
        py::arg("params"), py::arg("updates"), py::arg("model_params"), py::arg("param_norms"),
        py::arg("update_norms"), py::arg("adapt"), py::arg("lr"), py::arg("lr_value"),
        py::arg("min_trust_ratio"), py::arg("max_trust_ratio"));
}
