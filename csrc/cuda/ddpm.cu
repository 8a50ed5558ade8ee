// CUDA kernel of vlfast::ddpm_step_kernel (see ddpm.h), torch-free.
//
// Grid: x over chunks of kChunk elements of a sample, y over samples (striding
// past 65535). Each thread takes kQuads quads of 4 consecutive elements
// r..r+3 (r % 4 == 0): one Philox call gives their 4 normals, and each operand
// is read as one 4-element vector where its rows are aligned. Math in fp32.
#include "ddpm.h"
#include "dtype.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace vlfast {
namespace {

constexpr int kThreads = 256;
constexpr int kQuads = 4;                                   // quads per thread
constexpr int64_t kChunk = 4 * int64_t{kThreads} * kQuads;  // elements of a sample per block
constexpr int kMaxGridY = 65535;

// Columns of a coefficient row, and how sigma is formed (vlfast/reference/ddpm.py).
enum : int { A_X, A_M, K_0, K_X, K_M, SIGMA, LOG_MIN, LOG_MAX, N_COEF };
enum : int { VAR_FIXED, VAR_LEARNED, VAR_LEARNED_RANGE };
enum : int { CLAMP_LO = N_COEF, CLAMP_HI, SCALE, ROW_LEN };  // after the row in shared memory

constexpr uint32_t kKeyA = 0x9E3779B9u, kKeyB = 0xBB67AE85u;
constexpr uint32_t kRoundA = 0xD2511F53u, kRoundB = 0xCD9E8D57u;

// Four consecutive elements: one 16-byte (fp32) or 8-byte (fp16, bf16) access.
template <typename T>
struct alignas(4 * sizeof(T)) Quad {
  T v[4];
};

template <typename T>
__device__ __forceinline__ bool quad_aligned(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % sizeof(Quad<T>) == 0;
}

// f[0 .. valid) = p[0 .. valid) in fp32 (vec: valid == 4 and p aligned), 0 past them.
template <typename T>
__device__ __forceinline__ void load4(const T* p, bool vec, int valid, float (&f)[4]) {
  if (vec) {
    const Quad<T> q = *reinterpret_cast<const Quad<T>*>(p);
#pragma unroll
    for (int j = 0; j < 4; ++j) f[j] = to_float(q.v[j]);
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) f[j] = j < valid ? to_float(p[j]) : 0.0f;
  }
}

template <typename T>
__device__ __forceinline__ void store4(T* p, bool vec, int valid, const float (&f)[4]) {
  if (vec) {
    Quad<T> q;
#pragma unroll
    for (int j = 0; j < 4; ++j) q.v[j] = from_float<T>(f[j]);
    *reinterpret_cast<Quad<T>*>(p) = q;
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (j < valid) p[j] = from_float<T>(f[j]);
    }
  }
}

// The 4 normals of counter (q, n, offset lo, offset hi) under key (seed lo, seed hi):
// Philox4x32-10, Triton's uniform map, Box-Muller on the word pairs (0, 1) and (2, 3).
__device__ __forceinline__ void philox_normals(uint64_t seed, uint64_t offset, uint32_t q, uint32_t n,
                                               float (&z)[4]) {
  uint32_t c0 = q, c1 = n, c2 = static_cast<uint32_t>(offset), c3 = static_cast<uint32_t>(offset >> 32);
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi_b = __umulhi(kRoundB, c2), lo_b = kRoundB * c2;
    const uint32_t hi_a = __umulhi(kRoundA, c0), lo_a = kRoundA * c0;
    c0 = hi_b ^ c1 ^ k0, c1 = lo_b, c2 = hi_a ^ c3 ^ k1, c3 = lo_a;
    k0 += kKeyA, k1 += kKeyB;
  }
  const uint32_t w[4] = {c0, c1, c2, c3};
  float u[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int32_t i = static_cast<int32_t>(w[j]);
    u[j] = static_cast<float>(i ^ (i >> 31)) * 4.6566127342e-10f;
  }
#pragma unroll
  for (int j = 0; j < 4; j += 2) {
    const float radius = sqrtf(-2.0f * logf(fmaxf(u[j], 1e-7f)));
    float s, c;
    sincospif(2.0f * u[j + 1], &s, &c);  // sin, cos of 2 pi u, without argument rounding
    z[j] = radius * c, z[j + 1] = radius * s;
  }
}

// Clamp with NaN passing through, as torch.clamp does.
__device__ __forceinline__ float clamp(float x, float lo, float hi) {
  const float y = x < lo ? lo : x;
  return y > hi ? hi : y;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) ddpm_step_kernel(const DdpmStepParams p) {
  __shared__ float row[ROW_LEN];
  const bool track = p.draw_noise && p.rng_state != nullptr;
  // The stream position: every thread reads the counter before its block arrives (end of kernel).
  const uint64_t counter = track ? *reinterpret_cast<volatile unsigned long long*>(p.rng_state) : 0;
  const uint64_t offset = p.offset + counter;
  const bool has_z = p.draw_noise || p.noise != nullptr;

  for (int64_t n = blockIdx.y; n < p.batch; n += gridDim.y) {
    // Per-sample constants, read once per block: coefficient row (NaN out of range), x0 clamp.
    if (threadIdx.x < N_COEF) {
      const int64_t t = p.timesteps ? p.timesteps[n * p.timesteps_stride] : p.timestep;
      row[threadIdx.x] = (t >= 0 && t < p.coef_rows) ? p.coef[t * N_COEF + threadIdx.x] : __int_as_float(0x7fc00000);
    } else if (threadIdx.x == N_COEF) {
      const float inf = __int_as_float(0x7f800000);
      const float s = p.thresh ? p.thresh[n * p.thresh_stride] : 1.0f;
      const bool clip = !p.thresh && p.clip != inf;
      row[CLAMP_LO] = p.thresh ? -s : clip ? -p.clip : -inf;
      row[CLAMP_HI] = p.thresh ? s : clip ? p.clip : inf;
      row[SCALE] = s;
    }
    __syncthreads();
    float k[ROW_LEN];
#pragma unroll
    for (int j = 0; j < ROW_LEN; ++j) k[j] = row[j];
    __syncthreads();  // row is rewritten for the next sample

    // Operand rows of sample n, and whether each takes vector accesses.
    const T* x = static_cast<const T*>(p.sample) + n * p.per_sample;
    const T* m = p.model_output ? static_cast<const T*>(p.model_output) + n * p.stride_m : nullptr;
    const T* v = p.variance ? static_cast<const T*>(p.variance) + n * p.stride_v : nullptr;
    const T* zin = p.noise ? static_cast<const T*>(p.noise) + n * p.stride_z : nullptr;
    T* out = static_cast<T*>(p.out) + n * p.per_sample;
    T* x0_out = p.x0_out ? static_cast<T*>(p.x0_out) + n * p.per_sample : nullptr;
    T* z_out = p.noise_out ? static_cast<T*>(p.noise_out) + n * p.per_sample : nullptr;
    const bool vec_x = quad_aligned(x) && quad_aligned(out) && (!x0_out || quad_aligned(x0_out)) &&
                       (!z_out || quad_aligned(z_out));
    const bool vec_m = m && quad_aligned(m), vec_v = v && quad_aligned(v), vec_z = zin && quad_aligned(zin);

    for (int it = 0; it < kQuads; ++it) {
      const int64_t q = (int64_t{blockIdx.x} * kQuads + it) * kThreads + threadIdx.x;
      const int64_t r = 4 * q;
      if (r >= p.per_sample) break;
      const int valid = p.per_sample - r < 4 ? static_cast<int>(p.per_sample - r) : 4;
      // Loads (fp32 from here on).
      float xs[4], ms[4] = {}, vs[4] = {}, zs[4] = {};
      load4(x + r, vec_x && valid == 4, valid, xs);
      if (m) load4(m + r, vec_m && valid == 4, valid, ms);
      if (p.var_mode != VAR_FIXED) load4(v + r, vec_v && valid == 4, valid, vs);
      if (zin) {
        load4(zin + r, vec_z && valid == 4, valid, zs);
      } else if (p.draw_noise) {
        philox_normals(p.seed, offset, static_cast<uint32_t>(q), static_cast<uint32_t>(n), zs);
      }
      // x0, its clamp, the update.
      float prev[4], x0c[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        x0c[j] = clamp(k[A_X] * xs[j] + k[A_M] * ms[j], k[CLAMP_LO], k[CLAMP_HI]);
        if (p.thresh) x0c[j] = x0c[j] / k[SCALE];
        prev[j] = k[K_0] * x0c[j] + k[K_X] * xs[j] + k[K_M] * ms[j];
        if (has_z) {
          float sig = k[SIGMA];
          if (p.var_mode == VAR_LEARNED) {
            sig = sig != 0.0f ? sig * sqrtf(vs[j]) : 0.0f;
          } else if (p.var_mode == VAR_LEARNED_RANGE) {
            const float frac = (vs[j] + 1.0f) / 2.0f;
            const float log_var = frac * k[LOG_MAX] + (1.0f - frac) * k[LOG_MIN];
            sig = sig != 0.0f ? sig * expf(0.5f * log_var) : 0.0f;
          }
          prev[j] = prev[j] + sig * zs[j];
        }
      }
      store4(out + r, vec_x && valid == 4, valid, prev);
      if (x0_out) store4(x0_out + r, vec_x && valid == 4, valid, x0c);
      if (z_out) store4(z_out + r, vec_x && valid == 4, valid, zs);
    }
  }

  // The last block to finish advances the counter and resets the arrivals, all in
  // this one launch, so that a replayed CUDA graph draws fresh noise.
  if (track) {
    __syncthreads();
    if (threadIdx.x == 0) {
      __threadfence();
      const unsigned long long blocks = static_cast<unsigned long long>(gridDim.x) * gridDim.y;
      if (atomicAdd(p.rng_state + 1, 1ull) == blocks - 1) {
        volatile unsigned long long* state = p.rng_state;
        state[0] = counter + 1;
        state[1] = 0;
        __threadfence();
      }
    }
  }
}

template <typename T>
cudaError_t launch(const DdpmStepParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.per_sample == 0) return cudaSuccess;
  const int64_t chunks = (p.per_sample + kChunk - 1) / kChunk;
  if (chunks > 0x7fffffff) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>(p.batch < kMaxGridY ? p.batch : kMaxGridY));
  ddpm_step_kernel<T><<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_ddpm_step_f32(const DdpmStepParams& p, cudaStream_t stream) { return launch<float>(p, stream); }
cudaError_t launch_ddpm_step_f16(const DdpmStepParams& p, cudaStream_t stream) { return launch<__half>(p, stream); }
cudaError_t launch_ddpm_step_bf16(const DdpmStepParams& p, cudaStream_t stream) {
  return launch<__nv_bfloat16>(p, stream);
}

}  // namespace vlfast
