// CPU kernel of vlfast::ddpm_step_kernel: the fused DDPM/DDIM update of
// vlfast/reference/ddpm.py (fused_step), Philox noise of vlfast/reference/philox.py.
//
// Work is split into (sample, chunk) tasks for at::parallel_for; each task walks
// its chunk in blocks of kBlock elements: draw the block's noise (philox.cpp),
// then the elementwise passes in fp32 (x0 first, then prev: the output may be
// an input itself, see ddpm_step_out_cpu). The passes are plain loops that GCC
// vectorises, compiled for AVX-512, AVX2+FMA and baseline x86-64 with runtime
// selection (target_clones): an extension cannot rely on the build machine's
// -march, nor on at::vec, which only goes past SSE2 inside torch's own
// per-capability builds.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../ddpm_args.h"
#include "philox.h"

#define VLFAST_INLINE inline __attribute__((always_inline))
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define VLFAST_ISA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define VLFAST_ISA_CLONES
#endif

namespace vlfast {
namespace {

constexpr int64_t kBlock = 256;          // elements per noise block, a multiple of kPhiloxStep
constexpr int64_t kChunk = 16384;        // elements per parallel task, a multiple of kBlock
constexpr int64_t kParallelMin = 32768;  // fewer elements than this run on one thread
constexpr int64_t kPrefetch = 4 * kBlock;  // how far ahead the inputs are prefetched while drawing

// Per-sample constants: the coefficient row (NaN when the timestep is out of
// range) and the clamp [lo, hi] of x0 followed by a division by scale (thresh).
struct Row {
  float c[N_COEF];
  float lo, hi, scale;
};

template <typename T>
struct Job {
  const T* x;        // (B, per_sample) sample, batch stride per_sample
  const T* m;        // (B, per_sample) model output at batch stride stride_m, or null
  const T* v;        // (B, per_sample) variance at batch stride stride_v, or null
  const T* z;        // (B, per_sample) given noise at batch stride stride_z, or null
  T* out;            // (B, per_sample) prev sample at batch stride stride_o
  T* x0;             // (B, per_sample) clipped x0, or null
  T* z_out;          // (B, per_sample) the noise used, or null
  const Row* rows;   // (B,)
  int64_t stride_m, stride_v, stride_z, stride_o, per_sample, chunks;
  uint64_t seed, offset;
  bool draw;
  int var_mode;
  bool thresh;
  bool in_place;     // out is one of x, m, v, z: prev goes through a block buffer (no __restrict__ broken)
};

// Clamp with NaN passing through, as torch.clamp / torch.maximum do for x.
VLFAST_INLINE float clamp(float x, float lo, float hi) {
  const float y = x < lo ? lo : x;
  return y > hi ? hi : y;
}

// prev = K_0 * x0c + K_X * x + K_M * m (+ sig * z) over len elements of one sample.
template <int VAR, bool NOISE, bool THRESH, typename T>
VLFAST_INLINE void step_block(const Row& k, const T* __restrict__ x, const T* __restrict__ m,
                              const T* __restrict__ v, const float* __restrict__ z, T* __restrict__ out,
                              int64_t len) {
  for (int64_t i = 0; i < len; ++i) {
    const float xi = static_cast<float>(x[i]), mi = static_cast<float>(m[i]);
    float x0 = clamp(k.c[A_X] * xi + k.c[A_M] * mi, k.lo, k.hi);
    if constexpr (THRESH) x0 = x0 / k.scale;
    float prev = k.c[K_0] * x0 + k.c[K_X] * xi + k.c[K_M] * mi;
    if constexpr (NOISE) {
      float sig = k.c[SIGMA];
      if constexpr (VAR == VAR_LEARNED) {
        sig = sig != 0.0f ? sig * std::sqrt(static_cast<float>(v[i])) : 0.0f;
      } else if constexpr (VAR == VAR_LEARNED_RANGE) {
        const float frac = (static_cast<float>(v[i]) + 1.0f) / 2.0f;
        const float log_var = frac * k.c[LOG_MAX] + (1.0f - frac) * k.c[LOG_MIN];
        sig = sig != 0.0f ? sig * std::exp(0.5f * log_var) : 0.0f;
      }
      prev = prev + sig * z[i];
    }
    out[i] = static_cast<T>(prev);
  }
}

// x0 output: the clamped (and thresholded) x0 of step_block.
template <typename T>
VLFAST_INLINE void x0_block(const Row& k, const T* __restrict__ x, const T* __restrict__ m,
                            T* __restrict__ x0_out, bool thresh, int64_t len) {
  for (int64_t i = 0; i < len; ++i) {
    const float xi = static_cast<float>(x[i]), mi = static_cast<float>(m[i]);
    const float x0 = clamp(k.c[A_X] * xi + k.c[A_M] * mi, k.lo, k.hi);
    x0_out[i] = static_cast<T>(thresh ? x0 / k.scale : x0);
  }
}

// step_block for this call's noise and clamp.
template <int VAR, typename T>
VLFAST_INLINE void step_dispatch(const Job<T>& j, const Row& k, const T* x, const T* m, const T* v, const float* z,
                                 T* out, int64_t len) {
  if (z != nullptr) {
    if (j.thresh) step_block<VAR, true, true>(k, x, m, v, z, out, len);
    else step_block<VAR, true, false>(k, x, m, v, z, out, len);
  } else {
    if (j.thresh) step_block<VAR, false, true>(k, x, m, v, z, out, len);
    else step_block<VAR, false, false>(k, x, m, v, z, out, len);
  }
}

// One (sample, chunk) task, block by block: noise, then the elementwise passes: x0 and the noise used, then
// prev (last: out may be x, m, v or z, and its block is then written once all of them were read).
template <typename T>
VLFAST_INLINE void run_task(const Job<T>& j, int64_t task) {
  static const T zeros[kBlock] = {};  // model_output absent: m = 0
  const int64_t n = task / j.chunks;
  const int64_t r_end = std::min((task % j.chunks + 1) * kChunk, j.per_sample);
  const Row& k = j.rows[n];
  alignas(64) float zbuf[kBlock];
  alignas(64) T obuf[kBlock];
  for (int64_t r = (task % j.chunks) * kChunk; r < r_end; r += kBlock) {
    const int64_t len = std::min(kBlock, r_end - r), base = n * j.per_sample + r;
    // Noise: drawn into zbuf, or given.
    const float* z = nullptr;
    if (j.draw) {
      // Prefetch x and m kPrefetch elements ahead, so that their reads overlap the drawing.
      if (r + kPrefetch + kBlock <= r_end) {
        for (int64_t i = kPrefetch; i < kPrefetch + kBlock; i += 64 / sizeof(T)) {
          __builtin_prefetch(j.x + base + i);
          if (j.m) __builtin_prefetch(j.m + n * j.stride_m + r + i);
        }
      }
      philox_normals(j.seed, j.offset, static_cast<uint32_t>(n), r, len, zbuf);
      z = zbuf;
    } else if (j.z != nullptr) {
      const T* zin = j.z + n * j.stride_z + r;
      if constexpr (std::is_same_v<T, float>) {
        z = zin;
      } else {
        for (int64_t i = 0; i < len; ++i) zbuf[i] = static_cast<float>(zin[i]);
        z = zbuf;
      }
    }
    const T* x = j.x + base;
    const T* m = j.m ? j.m + n * j.stride_m + r : zeros;
    const T* v = j.v ? j.v + n * j.stride_v + r : nullptr;
    if (j.x0) x0_block(k, x, m, j.x0 + base, j.thresh, len);
    if (j.z_out && z) {
      for (int64_t i = 0; i < len; ++i) j.z_out[base + i] = static_cast<T>(z[i]);
    }
    T* out = j.in_place ? obuf : j.out + n * j.stride_o + r;
    switch (j.var_mode) {
      case VAR_LEARNED: step_dispatch<VAR_LEARNED>(j, k, x, m, v, z, out, len); break;
      case VAR_LEARNED_RANGE: step_dispatch<VAR_LEARNED_RANGE>(j, k, x, m, v, z, out, len); break;
      default: step_dispatch<VAR_FIXED>(j, k, x, m, v, z, out, len); break;
    }
    if (j.in_place) std::memcpy(j.out + n * j.stride_o + r, obuf, len * sizeof(T));
  }
}

// The entry points compiled once per instruction set (see the top of the file).
VLFAST_ISA_CLONES void run_tasks(const Job<float>& j, int64_t begin, int64_t end) {
  for (int64_t t = begin; t < end; ++t) run_task(j, t);
}
VLFAST_ISA_CLONES void run_tasks(const Job<double>& j, int64_t begin, int64_t end) {
  for (int64_t t = begin; t < end; ++t) run_task(j, t);
}
VLFAST_ISA_CLONES void run_tasks(const Job<c10::Half>& j, int64_t begin, int64_t end) {
  for (int64_t t = begin; t < end; ++t) run_task(j, t);
}
VLFAST_ISA_CLONES void run_tasks(const Job<c10::BFloat16>& j, int64_t begin, int64_t end) {
  for (int64_t t = begin; t < end; ++t) run_task(j, t);
}

// Per-sample rows: coef[t] (NaN for t outside [0, R)), and the x0 clamp.
std::vector<Row> gather_rows(const at::Tensor& coef, const std::optional<at::Tensor>& timesteps, int64_t timestep,
                             const std::optional<at::Tensor>& thresh, double clip, int64_t batch) {
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  const float* c = coef.const_data_ptr<float>();
  const int64_t rows = coef.size(0);
  std::vector<Row> out(batch);
  for (int64_t n = 0; n < batch; ++n) {
    const int64_t t =
        timesteps ? timesteps->const_data_ptr<int64_t>()[timesteps->size(0) == 1 ? 0 : n * timesteps->stride(0)]
                  : timestep;
    Row& k = out[n];
    for (int col = 0; col < N_COEF; ++col) k.c[col] = (t >= 0 && t < rows) ? c[t * N_COEF + col] : nan;
    if (thresh) {
      const float s = thresh->const_data_ptr<float>()[n * thresh->stride(0)];
      k.lo = -s, k.hi = s, k.scale = s;
    } else if (clip != std::numeric_limits<double>::infinity()) {
      k.lo = static_cast<float>(-clip), k.hi = static_cast<float>(clip), k.scale = 1.0f;
    } else {
      k.lo = -inf, k.hi = inf, k.scale = 1.0f;
    }
  }
  return out;
}

// The step with prev written into `out` (checked by the callers: sample's sizes and dtype, its strides in dims
// 1..); returns (x0, noise).
std::tuple<at::Tensor, at::Tensor> ddpm_step_into(
    const at::Tensor& sample, const std::optional<at::Tensor>& model_output,
    const std::optional<at::Tensor>& variance, const std::optional<at::Tensor>& noise, const at::Tensor& coef,
    const std::optional<at::Tensor>& timesteps, int64_t timestep, const std::optional<at::Tensor>& thresh,
    double clip, int64_t var_mode, bool draw_noise, int64_t seed, int64_t offset,
    const std::optional<at::Tensor>& rng_state, bool write_x0, bool write_noise, const at::Tensor& out) {
  const int64_t per_sample = check_ddpm_step_args(sample, model_output, variance, noise, coef, timesteps, thresh,
                                                  clip, var_mode, rng_state);
  const int64_t batch = sample.size(0);
  const bool draw = draw_noise && !noise.has_value();
  const bool has_z = draw || noise.has_value();
  // Unwritten outputs are distinct empty tensors: outputs of a custom op may not alias each other.
  at::Tensor x0 = write_x0 ? at::empty_like(sample) : at::empty({0}, sample.options());
  at::Tensor z = (write_noise && has_z) ? at::empty_like(sample) : at::empty({0}, sample.options());
  // The stream position: offset + rng_state[0], which advances by one per drawing call.
  int64_t* counter = (draw && rng_state) ? rng_state->data_ptr<int64_t>() : nullptr;
  const uint64_t offset_eff = static_cast<uint64_t>(offset) + (counter ? static_cast<uint64_t>(*counter) : 0);
  if (sample.numel() > 0) {
    const std::vector<Row> rows = gather_rows(coef, timesteps, timestep, thresh, clip, batch);
    const int64_t chunks = (per_sample + kChunk - 1) / kChunk;
    const int64_t task_elems = std::min(per_sample, kChunk);
    const void* prev = out.const_data_ptr();
    bool in_place = prev == sample.const_data_ptr();
    for (const auto* t : {&model_output, &variance, &noise}) {
      in_place = in_place || (t->has_value() && (*t)->const_data_ptr() == prev);
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, sample.scalar_type(), "ddpm_step_cpu", [&] {
      const auto ptr = [](const std::optional<at::Tensor>& t) -> const scalar_t* {
        return t ? t->const_data_ptr<scalar_t>() : nullptr;
      };
      const Job<scalar_t> job{sample.const_data_ptr<scalar_t>(),
                              ptr(model_output),
                              ptr(variance),
                              ptr(noise),
                              out.mutable_data_ptr<scalar_t>(),
                              write_x0 ? x0.mutable_data_ptr<scalar_t>() : nullptr,
                              z.numel() ? z.mutable_data_ptr<scalar_t>() : nullptr,
                              rows.data(),
                              batch_stride(model_output),
                              batch_stride(variance),
                              batch_stride(noise),
                              out.stride(0),
                              per_sample,
                              chunks,
                              static_cast<uint64_t>(seed),
                              offset_eff,
                              draw,
                              static_cast<int>(var_mode),
                              thresh.has_value(),
                              in_place};
      at::parallel_for(0, batch * chunks, (kParallelMin + task_elems - 1) / task_elems,
                       [&](int64_t begin, int64_t end) { run_tasks(job, begin, end); });
    });
  }
  if (counter) *counter += 1;
  return {x0, z};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ddpm_step_cpu(
    const at::Tensor& sample, const std::optional<at::Tensor>& model_output,
    const std::optional<at::Tensor>& variance, const std::optional<at::Tensor>& noise, const at::Tensor& coef,
    const std::optional<at::Tensor>& timesteps, int64_t timestep, const std::optional<at::Tensor>& thresh,
    double clip, int64_t var_mode, bool draw_noise, int64_t seed, int64_t offset,
    const std::optional<at::Tensor>& rng_state, bool write_x0, bool write_noise) {
  at::Tensor out = at::empty_like(sample);
  auto [x0, z] = ddpm_step_into(sample, model_output, variance, noise, coef, timesteps, timestep, thresh, clip,
                                var_mode, draw_noise, seed, offset, rng_state, write_x0, write_noise, out);
  return {out, x0, z};
}

// The step writing prev into a caller's `out`: sample's sizes and dtype, its strides in dims 1.. (any batch
// stride). out may be sample, model_output, variance or noise itself (same memory: prev is written after
// each block's inputs were read), but share no other memory with any input.
std::tuple<at::Tensor, at::Tensor> ddpm_step_out_cpu(
    const at::Tensor& sample, const std::optional<at::Tensor>& model_output,
    const std::optional<at::Tensor>& variance, const std::optional<at::Tensor>& noise, const at::Tensor& coef,
    const std::optional<at::Tensor>& timesteps, int64_t timestep, const std::optional<at::Tensor>& thresh,
    double clip, int64_t var_mode, bool draw_noise, int64_t seed, int64_t offset,
    const std::optional<at::Tensor>& rng_state, bool write_x0, bool write_noise, at::Tensor& out) {
  TORCH_CHECK(sample.dim() >= 1, "sample must have a batch dim");
  check_like_sample(sample, out, "out");
  at::assert_no_internal_overlap(out);
  for (const auto* t : {&model_output, &variance, &noise}) {
    if (t->has_value()) {
      at::assert_no_partial_overlap(out, **t);
      if ((*t)->const_data_ptr() == out.const_data_ptr()) {
        TORCH_CHECK((*t)->strides() == out.strides(), "out shares memory with an input of other strides");
      }
    }
  }
  at::assert_no_partial_overlap(out, sample);
  TORCH_CHECK(sample.const_data_ptr() != out.const_data_ptr() || sample.strides() == out.strides(),
              "out shares memory with sample but has other strides");
  for (const auto* t : {&timesteps, &thresh, &rng_state}) {
    if (t->has_value()) at::assert_no_overlap(out, **t);
  }
  at::assert_no_overlap(out, coef);
  return ddpm_step_into(sample, model_output, variance, noise, coef, timesteps, timestep, thresh, clip, var_mode,
                        draw_noise, seed, offset, rng_state, write_x0, write_noise, out);
}

}  // namespace

TORCH_LIBRARY_IMPL(vlfast, CPU, m) {
  m.impl("ddpm_step_kernel", &ddpm_step_cpu);
  m.impl("ddpm_step_out_kernel", &ddpm_step_out_cpu);
}

}  // namespace vlfast
