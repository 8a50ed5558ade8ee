// CUDA kernel of vlfast::ddpm_step_kernel, torch-free: plain pointers, sizes, strides, a stream.
//
// The fused DDPM/DDIM update of vlfast/reference/ddpm.py (fused_step) over a
// (batch, per_sample) block in memory order, with the Philox noise of
// vlfast/reference/philox.py. The torch glue is csrc/cuda/ddpm_glue.cpp.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace vlfast {

// Element r of sample n sits at n * per_sample + r in `sample` and the outputs,
// at n * stride_* + r in model_output, variance and noise (their own batch stride).
struct DdpmStepParams {
  const void* sample;        // (B, per_sample) dtype
  const void* model_output;  // (B, per_sample) dtype at batch stride stride_m, or null (zeros)
  const void* variance;      // (B, per_sample) dtype at batch stride stride_v; null unless var_mode != 0
  const void* noise;         // (B, per_sample) dtype at batch stride stride_z, or null
  void* out;                 // (B, per_sample) dtype: the previous sample
  void* x0_out;              // (B, per_sample) dtype: the clipped x0, or null
  void* noise_out;           // (B, per_sample) dtype: the noise used, or null
  const float* coef;         // (coef_rows, 8) float32 coefficient rows
  const int64_t* timesteps;  // (1,) or (B,) int64 (timesteps_stride 0 or its stride), or null: use timestep
  const float* thresh;       // (B,) float32 at thresh_stride, or null
  // int64[2] = {counter, arrivals}, or null: the stream position is offset + counter,
  // and the last block to finish advances counter by one (CUDA-graph replay draws fresh noise).
  unsigned long long* rng_state;
  int64_t batch, per_sample;
  int64_t stride_m, stride_v, stride_z;  // batch strides in elements
  int64_t coef_rows, timesteps_stride, thresh_stride, timestep;
  uint64_t seed, offset;
  float clip;        // +inf: no clip; ignored with thresh
  int var_mode;      // 0 fixed, 1 learned, 2 learned range
  bool draw_noise;   // draw Philox noise (noise must be null)
};

// Launch on `stream`; returns the launch error (cudaSuccess when batch * per_sample == 0).
cudaError_t launch_ddpm_step_f32(const DdpmStepParams& p, cudaStream_t stream);
cudaError_t launch_ddpm_step_f16(const DdpmStepParams& p, cudaStream_t stream);
cudaError_t launch_ddpm_step_bf16(const DdpmStepParams& p, cudaStream_t stream);

}  // namespace vlfast
