// Torch binding of the multi-tensor LAMB kernels (lamb_kernel.cu): checks every tensor of the
// lists, builds the per-tensor metadata (pointers, sizes, chunk ranges), uploads it to the device
// and launches one kernel per phase.  Registered with Python in bindings.cpp.
#include "torch_utils.h"

#include <cstring>
#include <vector>

namespace bertforge {
namespace {

void check_member(const at::Tensor& t, const at::Tensor& ref, const char* what, size_t i,
                  at::ScalarType dtype, int64_t numel) {
  TORCH_CHECK(t.is_cuda() && t.device() == ref.device(), "bertforge.lamb: ", what, "[", i,
              "] must be on ", ref.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, "bertforge.lamb: ", what, "[", i, "] must be ", dtype,
              ", got ", t.scalar_type());
  TORCH_CHECK(t.numel() == numel, "bertforge.lamb: ", what, "[", i, "] has ", t.numel(),
              " elements, the parameter has ", numel);
  TORCH_CHECK(t.is_contiguous(), "bertforge.lamb: ", what, "[", i, "] must be contiguous");
}

// Device copy of the metadata, ordered on the current stream before the kernel that reads it.
// The host side is a pinned buffer from torch's caching host allocator: the copy is truly
// asynchronous (no host synchronisation, which a pageable source may cause) and the allocator
// keeps the buffer alive until the copy has completed.
at::Tensor upload(const std::vector<bf_lamb_tensor_t>& metas, const at::Device& device) {
  const int64_t bytes = static_cast<int64_t>(metas.size() * sizeof(bf_lamb_tensor_t));
  at::Tensor host =
      at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr(), metas.data(), static_cast<size_t>(bytes));
  at::Tensor dev = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).device(device));
  dev.copy_(host, /*non_blocking=*/true);
  return dev;
}

const float* scalar_ptr(const std::optional<at::Tensor>& t, const at::Tensor& ref,
                        const char* what) {
  if (!t.has_value() || !t->defined()) return nullptr;
  TORCH_CHECK(t->is_cuda() && t->device() == ref.device() && t->scalar_type() == at::kFloat &&
                  t->numel() == 1,
              "bertforge.lamb: ", what, " must be a one-element float32 tensor on ", ref.device());
  return t->data_ptr<float>();
}

int64_t num_chunks(int64_t numel) { return (numel + BF_LAMB_CHUNK - 1) / BF_LAMB_CHUNK; }

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

}  // namespace

// Phase 1 over all tensors: moments in place, raw updates into `updates` (float32, preallocated,
// shaped like params).  sq_norms_out (optional, float32 [2, n]) receives the per-tensor sums of
// squares of params (row 0) and updates (row 1).
void lamb_update(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                 const std::vector<at::Tensor>& exp_avgs,
                 const std::vector<at::Tensor>& exp_avg_sqs,
                 const std::vector<at::Tensor>& updates, const std::vector<double>& weight_decays,
                 double beta1, double beta2, double eps, double bc1, double bc2,
                 const std::optional<at::Tensor>& grad_scale, double grad_scale_value,
                 const std::optional<at::Tensor>& sq_norms_out) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n &&
                  updates.size() == n && weight_decays.size() == n,
              "bertforge.lamb_update: tensor lists differ in length");
  TORCH_CHECK(n <= static_cast<size_t>(INT_MAX), "bertforge.lamb_update: too many tensors");
  if (n == 0) return;
  const at::Tensor& ref = params[0];
  TORCH_CHECK(ref.is_cuda(), "bertforge.lamb_update: parameters must be CUDA tensors");
  const at::ScalarType gdt = grads[0].scalar_type();
  TORCH_CHECK(is_float_type(gdt), "bertforge.lamb_update: gradients must be float32, float16 or "
              "bfloat16, got ", gdt);
  const c10::cuda::CUDAGuard guard(ref.device());
  const int gbytes = static_cast<int>(grads[0].element_size());

  std::vector<bf_lamb_tensor_t> metas;
  metas.reserve(n);
  int64_t chunks = 0;
  for (size_t i = 0; i < n; ++i) {
    const int64_t numel = params[i].numel();
    check_member(params[i], ref, "params", i, at::kFloat, numel);
    check_member(grads[i], ref, "grads", i, gdt, numel);
    check_member(exp_avgs[i], ref, "exp_avgs", i, at::kFloat, numel);
    check_member(exp_avg_sqs[i], ref, "exp_avg_sqs", i, at::kFloat, numel);
    check_member(updates[i], ref, "updates", i, at::kFloat, numel);
    if (numel == 0) continue;
    bf_lamb_tensor_t e;
    std::memset(&e, 0, sizeof(e));
    e.p = params[i].data_ptr();
    e.g = grads[i].data_ptr();
    e.m = exp_avgs[i].data_ptr();
    e.v = exp_avg_sqs[i].data_ptr();
    e.u = updates[i].data_ptr();
    e.model = nullptr;
    e.numel = numel;
    e.chunk_begin = chunks;
    e.weight_decay = static_cast<float>(weight_decays[i]);
    e.index = static_cast<int32_t>(i);
    e.vec = aligned16(e.p) && aligned16(e.m) && aligned16(e.v) && aligned16(e.u) &&
            is_aligned_to(e.g, 4 * gbytes);
    e.adapt = 0;
    metas.push_back(e);
    chunks += num_chunks(numel);
  }
  const float* gs_ptr = scalar_ptr(grad_scale, ref, "grad_scale");
  float* sq_out = nullptr;
  int64_t sq_stride = 0;
  at::Tensor chunk_sq;
  if (sq_norms_out.has_value() && sq_norms_out->defined()) {
    const at::Tensor& sq = *sq_norms_out;
    TORCH_CHECK(sq.is_cuda() && sq.device() == ref.device() && sq.scalar_type() == at::kFloat &&
                    sq.dim() == 2 && sq.size(0) == 2 && sq.size(1) == static_cast<int64_t>(n) &&
                    sq.is_contiguous(),
                "bertforge.lamb_update: sq_norms_out must be a contiguous float32 [2, ", n,
                "] tensor on ", ref.device());
    sq_norms_out->zero_();  // entries of empty tensors stay 0
    sq_out = sq.data_ptr<float>();
    sq_stride = static_cast<int64_t>(n);
    chunk_sq = at::empty({2 * chunks}, ref.options().dtype(at::kFloat));
  }
  if (metas.empty()) return;
  const at::Tensor dev = upload(metas, ref.device());
  BF_CHECK_LAUNCH(bf_lamb_update(
      reinterpret_cast<const bf_lamb_tensor_t*>(dev.data_ptr()), static_cast<int>(metas.size()),
      chunks, beta1, beta2, eps, bc1, bc2, gs_ptr, static_cast<float>(grad_scale_value),
      bf_dtype(gdt), sq_out != nullptr ? chunk_sq.data_ptr<float>() : nullptr, sq_out, sq_stride,
      current_stream()));
}

// Phase 2 over all tensors: p -= lr * trust_ratio * u, the ratio from the given whole-tensor
// norms (float32 [n]) and clamps; model_params (empty, or one per param, all of one float dtype)
// receive the new values.
void lamb_apply(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& updates,
                const std::vector<at::Tensor>& model_params, const at::Tensor& param_norms,
                const at::Tensor& update_norms, const std::vector<bool>& adapt,
                const std::optional<at::Tensor>& lr, double lr_value, double min_trust_ratio,
                double max_trust_ratio) {
  const size_t n = params.size();
  TORCH_CHECK(updates.size() == n && adapt.size() == n,
              "bertforge.lamb_apply: tensor lists differ in length");
  TORCH_CHECK(model_params.empty() || model_params.size() == n,
              "bertforge.lamb_apply: model_params must be empty or one per parameter");
  TORCH_CHECK(n <= static_cast<size_t>(INT_MAX), "bertforge.lamb_apply: too many tensors");
  if (n == 0) return;
  const at::Tensor& ref = params[0];
  TORCH_CHECK(ref.is_cuda(), "bertforge.lamb_apply: parameters must be CUDA tensors");
  for (const at::Tensor* t : {&param_norms, &update_norms}) {
    TORCH_CHECK(t->is_cuda() && t->device() == ref.device() && t->scalar_type() == at::kFloat &&
                    t->numel() == static_cast<int64_t>(n) && t->is_contiguous(),
                "bertforge.lamb_apply: norms must be contiguous float32 tensors of ", n,
                " elements on ", ref.device());
  }
  const bool has_model = !model_params.empty();
  const at::ScalarType mdt = has_model ? model_params[0].scalar_type() : at::kFloat;
  TORCH_CHECK(is_float_type(mdt), "bertforge.lamb_apply: model_params must be float32, float16 "
              "or bfloat16, got ", mdt);
  const int mbytes = has_model ? static_cast<int>(model_params[0].element_size()) : 4;
  const c10::cuda::CUDAGuard guard(ref.device());

  std::vector<bf_lamb_tensor_t> metas;
  metas.reserve(n);
  int64_t chunks = 0;
  for (size_t i = 0; i < n; ++i) {
    const int64_t numel = params[i].numel();
    check_member(params[i], ref, "params", i, at::kFloat, numel);
    check_member(updates[i], ref, "updates", i, at::kFloat, numel);
    if (has_model) check_member(model_params[i], ref, "model_params", i, mdt, numel);
    if (numel == 0) continue;
    bf_lamb_tensor_t e;
    std::memset(&e, 0, sizeof(e));
    e.p = params[i].data_ptr();
    e.u = updates[i].data_ptr();
    e.model = has_model ? model_params[i].data_ptr() : nullptr;
    e.numel = numel;
    e.chunk_begin = chunks;
    e.index = static_cast<int32_t>(i);
    e.vec = aligned16(e.p) && aligned16(e.u) && (!has_model || is_aligned_to(e.model, 4 * mbytes));
    e.adapt = adapt[i] ? 1 : 0;
    metas.push_back(e);
    chunks += num_chunks(numel);
  }
  const float* lr_ptr = scalar_ptr(lr, ref, "lr");
  if (metas.empty()) return;
  const at::Tensor dev = upload(metas, ref.device());
  BF_CHECK_LAUNCH(bf_lamb_apply(
      reinterpret_cast<const bf_lamb_tensor_t*>(dev.data_ptr()), static_cast<int>(metas.size()),
      chunks, param_norms.data_ptr<float>(), update_norms.data_ptr<float>(), lr_ptr,
      static_cast<float>(lr_value), static_cast<float>(min_trust_ratio),
      static_cast<float>(max_trust_ratio), bf_dtype(mdt), has_model ? 1 : 0, current_stream()));
}

}  // namespace bertforge
