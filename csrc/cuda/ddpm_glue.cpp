// Torch glue of the CUDA kernel of vlfast::ddpm_step_kernel (csrc/cuda/ddpm.cu), named apart
// from it because torch builds both into one folder, ddpm.cu and ddpm.cpp alike into ddpm.o:
// checks, allocation, the current stream, the launch and its error check.
#include <optional>
#include <tuple>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../ddpm_args.h"
#include "ddpm.h"

namespace vlfast {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> ddpm_step_cuda(
    const at::Tensor& sample, const std::optional<at::Tensor>& model_output,
    const std::optional<at::Tensor>& variance, const std::optional<at::Tensor>& noise, const at::Tensor& coef,
    const std::optional<at::Tensor>& timesteps, int64_t timestep, const std::optional<at::Tensor>& thresh,
    double clip, int64_t var_mode, bool draw_noise, int64_t seed, int64_t offset,
    const std::optional<at::Tensor>& rng_state, bool write_x0, bool write_noise) {
  const int64_t per_sample = check_ddpm_step_args(sample, model_output, variance, noise, coef, timesteps, thresh,
                                                  clip, var_mode, rng_state);
  const at::ScalarType dtype = sample.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "the CUDA kernel takes float32, float16 or bfloat16, got ", dtype);
  const c10::cuda::CUDAGuard guard(sample.device());
  const int64_t batch = sample.size(0);
  const bool draw = draw_noise && !noise.has_value();
  const bool has_z = draw || noise.has_value();
  at::Tensor out = at::empty_like(sample);
  // Unwritten outputs are distinct empty tensors: outputs of a custom op may not alias each other.
  at::Tensor x0 = write_x0 ? at::empty_like(sample) : at::empty({0}, sample.options());
  at::Tensor z = (write_noise && has_z) ? at::empty_like(sample) : at::empty({0}, sample.options());
  const bool track = draw && rng_state.has_value();
  if (sample.numel() == 0) {
    // Nothing to launch; the stream still moves on by one call, as in the reference.
    if (track) rng_state->select(0, 0).add_(1);
    return {out, x0, z};
  }

  DdpmStepParams p{};
  p.sample = sample.const_data_ptr();
  p.model_output = model_output ? model_output->const_data_ptr() : nullptr;
  p.variance = variance ? variance->const_data_ptr() : nullptr;
  p.noise = noise ? noise->const_data_ptr() : nullptr;
  p.out = out.mutable_data_ptr();
  p.x0_out = write_x0 ? x0.mutable_data_ptr() : nullptr;
  p.noise_out = z.numel() ? z.mutable_data_ptr() : nullptr;
  p.coef = coef.const_data_ptr<float>();
  p.timesteps = timesteps ? timesteps->const_data_ptr<int64_t>() : nullptr;
  p.thresh = thresh ? thresh->const_data_ptr<float>() : nullptr;
  p.rng_state = track ? reinterpret_cast<unsigned long long*>(rng_state->mutable_data_ptr<int64_t>()) : nullptr;
  p.batch = batch;
  p.per_sample = per_sample;
  p.stride_m = batch_stride(model_output);
  p.stride_v = batch_stride(variance);
  p.stride_z = batch_stride(noise);
  p.coef_rows = coef.size(0);
  p.timesteps_stride = (timesteps && timesteps->size(0) > 1) ? timesteps->stride(0) : 0;
  p.thresh_stride = thresh ? thresh->stride(0) : 0;
  p.timestep = timestep;
  p.seed = static_cast<uint64_t>(seed);
  p.offset = static_cast<uint64_t>(offset);
  p.clip = static_cast<float>(clip);
  p.var_mode = static_cast<int>(var_mode);
  p.draw_noise = draw;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(sample.device().index()).stream();
  cudaError_t err = cudaSuccess;
  switch (dtype) {
    case at::kFloat: err = launch_ddpm_step_f32(p, stream); break;
    case at::kHalf: err = launch_ddpm_step_f16(p, stream); break;
    default: err = launch_ddpm_step_bf16(p, stream); break;
  }
  C10_CUDA_CHECK(err);
  return {out, x0, z};
}

}  // namespace

TORCH_LIBRARY_IMPL(vlfast, CUDA, m) {
  m.impl("ddpm_step_kernel", &ddpm_step_cuda);
}

}  // namespace vlfast
