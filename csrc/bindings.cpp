// The single PYBIND11_MODULE of the bertforge_C extension.  The functions are defined in the
// per-op bindings (layer_norm.cpp, softmax.cpp, lamb.cpp); pretrain/ops wraps them in
// torch.library custom ops.
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
                                       bool store_sum);
std::vector<at::Tensor> layer_norm_bwd(const at::Tensor& dy, const at::Tensor& s,
                                       const at::Tensor& mean, const at::Tensor& rstd,
                                       const at::Tensor& weight,
                                       const std::optional<at::Tensor>& dsum,
                                       bool want_dbias_add);
at::Tensor softmax_fwd(const at::Tensor& x, const std::optional<at::Tensor>& mask, double scale);
at::Tensor softmax_bwd(const at::Tensor& y, const at::Tensor& dy, double scale);
}  // namespace bertforge

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "bertforge fused CUDA kernels (LayerNorm, scaled masked softmax, multi-tensor LAMB)";
  m.attr("LN_MAX_HIDDEN") = BF_LN_MAX_HIDDEN;
  m.attr("SOFTMAX_MASKED_THRESHOLD") = BF_SOFTMAX_MASKED_THRESHOLD;
  m.def("layer_norm_fwd", &bertforge::layer_norm_fwd, "LayerNorm forward (fused bias + residual)",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("residual"),
        py::arg("bias_add"), py::arg("eps"), py::arg("store_sum"));
  m.def("layer_norm_bwd", &bertforge::layer_norm_bwd, "LayerNorm backward", py::arg("dy"),
        py::arg("s"), py::arg("mean"), py::arg("rstd"), py::arg("weight"), py::arg("dsum"),
        py::arg("want_dbias_add"));
  m.def("softmax_fwd", &bertforge::softmax_fwd, "scaled masked softmax forward", py::arg("x"),
        py::arg("mask"), py::arg("scale"));
  m.def("softmax_bwd", &bertforge::softmax_bwd, "scaled masked softmax backward", py::arg("y"),
        py::arg("dy"), py::arg("scale"));
}
