// Argument checks of vlfast::ddpm_step_kernel shared by the CPU and CUDA glue.
//
// The Python wrapper (vlfast/ops) guarantees the layout contract; these checks
// are cheap (no host synchronisation) and turn a broken contract into an error
// instead of out-of-bounds reads.
#pragma once

#include <cmath>
#include <cstdint>
#include <optional>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace vlfast {

// Columns of a coefficient row, and how sigma is formed (vlfast/reference/ddpm.py).
enum DdpmCoef : int { A_X, A_M, K_0, K_X, K_M, SIGMA, LOG_MIN, LOG_MAX, N_COEF };
enum DdpmVar : int { VAR_FIXED, VAR_LEARNED, VAR_LEARNED_RANGE };

// `t` (model_output, variance or noise) is read as element r of sample n at
// t.data_ptr() + n * t.stride(0) + r, r the memory offset inside a sample of `sample`.
inline void check_like_sample(const at::Tensor& sample, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device() == sample.device(), name, " is on ", t.device(), ", sample on ", sample.device());
  TORCH_CHECK(t.scalar_type() == sample.scalar_type(), name, " has dtype ", t.scalar_type(),
              ", sample ", sample.scalar_type());
  TORCH_CHECK(t.sizes() == sample.sizes(), name, " has shape ", t.sizes(), ", sample ", sample.sizes());
  for (int64_t d = 1; d < sample.dim(); ++d) {
    TORCH_CHECK(sample.size(d) <= 1 || t.stride(d) == sample.stride(d), name, " has strides ",
                t.strides(), ", expected those of sample ", sample.strides(), " in dims 1..");
  }
}

// Checks every argument; returns per_sample = sample.numel() / batch (0 when batch == 0).
inline int64_t check_ddpm_step_args(const at::Tensor& sample, const std::optional<at::Tensor>& model_output,
                                    const std::optional<at::Tensor>& variance,
                                    const std::optional<at::Tensor>& noise, const at::Tensor& coef,
                                    const std::optional<at::Tensor>& timesteps,
                                    const std::optional<at::Tensor>& thresh, double clip, int64_t var_mode,
                                    const std::optional<at::Tensor>& rng_state) {
  TORCH_CHECK(sample.dim() >= 1, "sample must have a batch dim");
  TORCH_CHECK(at::isFloatingType(sample.scalar_type()), "sample must be floating point, got ",
              sample.scalar_type());
  const int64_t batch = sample.size(0);
  const int64_t per_sample = batch ? sample.numel() / batch : 0;
  TORCH_CHECK(sample.is_non_overlapping_and_dense() && (batch <= 1 || sample.stride(0) == per_sample),
              "sample must be dense with the batch dim outermost, got strides ", sample.strides());
  if (model_output) check_like_sample(sample, *model_output, "model_output");
  if (variance) check_like_sample(sample, *variance, "variance");
  if (noise) check_like_sample(sample, *noise, "noise");
  TORCH_CHECK(!std::isnan(clip), "clip must not be NaN");
  TORCH_CHECK(var_mode >= VAR_FIXED && var_mode <= VAR_LEARNED_RANGE, "var_mode must be 0, 1 or 2, got ",
              var_mode);
  TORCH_CHECK(var_mode == VAR_FIXED || variance.has_value(), "var_mode ", var_mode, " needs variance");
  TORCH_CHECK(coef.device() == sample.device() && coef.scalar_type() == at::kFloat && coef.dim() == 2 &&
                  coef.size(1) == N_COEF && coef.is_contiguous(),
              "coef must be a contiguous (R, 8) float32 tensor on the sample's device");
  if (timesteps) {
    TORCH_CHECK(timesteps->device() == sample.device() && timesteps->scalar_type() == at::kLong &&
                    timesteps->dim() == 1 && (timesteps->size(0) == 1 || timesteps->size(0) == batch),
                "timesteps must be an int64 tensor of shape (1,) or (B,) on the sample's device");
  }
  if (thresh) {
    TORCH_CHECK(thresh->device() == sample.device() && thresh->scalar_type() == at::kFloat &&
                    thresh->dim() == 1 && thresh->size(0) == batch,
                "thresh must be a float32 tensor of shape (B,) on the sample's device");
  }
  if (rng_state) {
    TORCH_CHECK(rng_state->device() == sample.device() && rng_state->scalar_type() == at::kLong &&
                    rng_state->dim() == 1 && rng_state->size(0) == 2 && rng_state->is_contiguous(),
                "rng_state must be a contiguous int64 tensor of shape (2,) on the sample's device");
  }
  return per_sample;
}

// Batch stride (in elements) of an optional operand; 0 when absent.
inline int64_t batch_stride(const std::optional<at::Tensor>& t) {
  return t ? t->stride(0) : 0;
}

}  // namespace vlfast
