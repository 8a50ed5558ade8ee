// CUDA kernels of the fused GroupNorm (see group_norm.h), torch-free; their launchers and the
// choice of path are in group_norm.cu, the only file that includes this one.
//
// Forward, two paths:
// - one-pass: one block per (n, g) copies the group into shared memory (x's dtype), takes the
//   statistics from there by two passes (mean of x - K, then the sum of squared deviations; K is
//   the group's first element, so a large mean costs no precision) and writes the output;
// - split: partial sums of d = x - K + add and d^2 per (n, c, chunk of positions), a finalize per
//   (n, g) (the group's partials added in a fixed order, var = E[d^2] - E[d]^2 on the shifted d),
//   and an elementwise apply kernel.
// Both write out = act((x - K) * alpha[n, c] + beta[n, c]).
// Backward (the Triton kernels' math, kernels/group_norm.py): partial sums per (n, c, chunk) of
// g1 = dy * act'(y1), g1 * xhat and xhat -> a group kernel per (n, g) (m1, m2, the per-(n, c)
// gradients and a coefficient table) -> an elementwise dx kernel -> dweight, dbias summed over n.
//
// Partial sums per (n, c, chunk): NCHW, one warp per unit walks a contiguous run of one channel;
// channels-last, a block takes a chunk of rows of one sample, threads across the channels (V of
// them each), a fixed tree over the rows. Every sum runs in a fixed order and nothing uses atomics:
// results are bit-identical run to run. Global accesses are 16-byte vectors of V elements where
// the shape and the pointers allow it, single elements otherwise.
#pragma once

#include "dtype.cuh"
#include "group_norm.h"

#include <algorithm>
#include <atomic>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace vlfast {
namespace {

constexpr int kThreads = 256;         // blocks of every kernel but the one-pass
constexpr int kWarps = kThreads / 32;
constexpr int kOnepassThreads = 512;  // one-pass blocks of large groups
constexpr int64_t kOnepassBytes = 96 * 1024;  // largest group (bytes) held in shared memory
constexpr int64_t kSmallGroup = 4096;         // elements: one-pass even when the groups can't fill the GPU
constexpr int64_t kMaxChunks = 1024;          // partial sums per (n, c)
constexpr int kBlocksPerSm = 8;               // split kernels: blocks of kThreads to aim for per SM
constexpr int64_t kMaxGrid = 0x7fffffff;

// The codes of vlfast/activations.py (a name's index in NAMES); tests/test_activations.py holds them equal.
enum : int { ACT_NONE = 0, ACT_SILU = 1, ACT_RELU = 2, ACT_GELU = 3 };

// V consecutive elements, one access of V * sizeof(T) bytes (16 for the vector width, or one element).
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <typename T, int V>
__device__ __forceinline__ void load_vec(const T* p, float (&f)[V]) {
  const Pack<T, V> q = *reinterpret_cast<const Pack<T, V>*>(p);
#pragma unroll
  for (int j = 0; j < V; ++j) f[j] = to_float(q.v[j]);
}

template <typename T, int V>
__device__ __forceinline__ void store_vec(T* p, const float (&f)[V]) {
  Pack<T, V> q;
#pragma unroll
  for (int j = 0; j < V; ++j) q.v[j] = from_float<T>(f[j]);
  *reinterpret_cast<Pack<T, V>*>(p) = q;
}

// Element i of a per-channel operand as float, whatever its storage dtype; `absent` when it is absent.
__device__ __forceinline__ float ld(const GnVec& v, int64_t i, float absent) {
  if (!v.ptr) return absent;
  switch (v.dtype) {
    case GN_F16: return to_float(static_cast<const __half*>(v.ptr)[i]);
    case GN_BF16: return to_float(static_cast<const __nv_bfloat16*>(v.ptr)[i]);
    default: return static_cast<const float*>(v.ptr)[i];
  }
}

constexpr float kSqrtHalf = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;

// act(y); NaN stays NaN.
template <int ACT>
__device__ __forceinline__ float act_fwd(float y) {
  if constexpr (ACT == ACT_SILU) return y / (1.0f + expf(-y));
  if constexpr (ACT == ACT_RELU) return y < 0.0f ? 0.0f : y;
  if constexpr (ACT == ACT_GELU) return 0.5f * y * (1.0f + erff(y * kSqrtHalf));
  return y;
}

// g * act'(y), as the Triton backward computes it.
template <int ACT>
__device__ __forceinline__ float act_bwd(float g, float y) {
  if constexpr (ACT == ACT_SILU) {
    const float sig = 1.0f / (1.0f + expf(-y));
    return g * (sig * (1.0f + y * (1.0f - sig)));
  }
  if constexpr (ACT == ACT_RELU) return y <= 0.0f ? 0.0f : g;
  if constexpr (ACT == ACT_GELU) {
    const float cdf = 0.5f * (1.0f + erff(y * kSqrtHalf));
    return g * (cdf + y * kInvSqrt2Pi * expf(-0.5f * y * y));
  }
  return g;
}

// v[k] summed over the block in a fixed order (a shuffle tree per warp, then warp 0 over the warp
// sums); every thread gets the sums. All threads of the (1-D, whole-warp) block must call it.
template <int K>
__device__ __forceinline__ void block_sum(float (&v)[K], float* red /* 33 * K floats */) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    for (int o = 16; o > 0; o >>= 1) v[k] += __shfl_down_sync(0xffffffffu, v[k], o);
    if (lane == 0) red[warp * K + k] = v[k];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      float t = lane < warps ? red[lane * K + k] : 0.0f;
      for (int o = 16; o > 0; o >>= 1) t += __shfl_down_sync(0xffffffffu, t, o);
      if (lane == 0) red[32 * K + k] = t;
    }
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = red[32 * K + k];
  __syncthreads();  // red may be reused
}

// The row (n * C + c) of element e in memory order, stepping one element at a time.
struct Cursor {
  int64_t C, S, nc, s, c;
  bool cl;
  __device__ Cursor(int64_t e, bool cl_, int64_t C_, int64_t S_) : C(C_), S(S_), cl(cl_) {
    if (cl) {
      const int64_t r = e / C, n = r / S;
      c = e - r * C, s = r - n * S, nc = n * C + c;
    } else {
      nc = e / S, s = e - nc * S, c = 0;
    }
  }
  __device__ __forceinline__ void next() {
    if (cl) {
      ++nc;
      if (++c == C) {
        c = 0, nc -= C;
        if (++s == S) s = 0, nc += C;
      }
    } else if (++s == S) {
      s = 0, ++nc;
    }
  }
};

// ---------------------------------------------------------------- forward, one pass

// The channel (within its group) of a group-local element, stepping one element at a time: NCHW
// runs of S elements per channel, channels-last runs of 1 wrapping at Cg.
struct GroupChan {
  int c, r, run, Cg;
  __device__ __forceinline__ void next() {
    if (++r == run) r = 0, c = (c + 1 == Cg) ? 0 : c + 1;
  }
};

// Block per (n, g); dynamic shared memory: the group (L elements of T, 16-byte aligned), then
// add, alpha, beta of its Cg channels (float). Group-local element i is at x[i] (NCHW) or
// x[(i / Cg) * C + i % Cg] (channels-last), channel i / S or i % Cg. V > 1: 16-byte accesses
// (then L % V == 0, and Cg % V == 0 and C % V == 0 for channels-last).
template <typename T, int V, int ACT>
__global__ void __launch_bounds__(kOnepassThreads) gn_fwd_onepass(const GroupNormFwdParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ float red[33 * 2];
  const int tid = threadIdx.x, nt = blockDim.x;
  const int64_t C = p.C, G = p.G, ng = blockIdx.x, n = ng / G, g = ng % G;
  const int Cg = static_cast<int>(C / G), S = static_cast<int>(p.S), L = Cg * S;
  T* xs = reinterpret_cast<T*>(smem);
  float* ch_a = reinterpret_cast<float*>(smem + ((static_cast<int64_t>(L) * sizeof(T) + 15) / 16) * 16);
  float* ch_alpha = ch_a + Cg;
  float* ch_beta = ch_alpha + Cg;
  const int64_t base = p.channels_last ? n * p.S * C + g * Cg : (n * C + g * Cg) * p.S;
  const T* x = static_cast<const T*>(p.x) + base;
  T* out = static_cast<T*>(p.out) + base;
  const auto goff = [&](int i) -> int64_t {
    return p.channels_last ? static_cast<int64_t>(i / Cg) * C + i % Cg : static_cast<int64_t>(i);
  };
  const auto chan_at = [&](int i) -> GroupChan {
    return p.channels_last ? GroupChan{i % Cg, 0, 1, Cg} : GroupChan{i / S, i % S, S, Cg};
  };

  // Stage 1: add of each channel; the group into shared memory, with the sum of x - K.
  const float K = to_float(x[0]);
  float sums[2] = {0.0f, 0.0f};  // sum of (x - K), sum of add over the channels
  for (int j = tid; j < Cg; j += nt) {
    const float a = ld(p.add, n * C + g * Cg + j, 0.0f);
    ch_a[j] = a;
    sums[1] += a;
  }
  constexpr int kUnroll = 4;
  const int nvec = L / V;
  for (int q0 = tid; q0 < nvec; q0 += nt * kUnroll) {
    Pack<T, V> r[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int q = q0 + u * nt;
      if (q < nvec) r[u] = *reinterpret_cast<const Pack<T, V>*>(x + goff(q * V));
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int q = q0 + u * nt;
      if (q < nvec) {
        *reinterpret_cast<Pack<T, V>*>(xs + q * V) = r[u];
#pragma unroll
        for (int j = 0; j < V; ++j) sums[0] += to_float(r[u].v[j]) - K;
      }
    }
  }
  block_sum<2>(sums, red);  // also publishes xs and ch_a
  const float dm = sums[0] / static_cast<float>(L) + sums[1] / static_cast<float>(Cg);  // mean - K

  // Stage 2: the sum of squared deviations from shared memory; mean and rstd.
  float m2[1] = {0.0f};
  for (int q = tid; q < nvec; q += nt) {
    float f[V];
    load_vec<T, V>(xs + q * V, f);
    GroupChan ch = chan_at(q * V);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const float d = (f[j] - K) + (ch_a[ch.c] - dm);
      m2[0] += d * d;
      ch.next();
    }
  }
  block_sum<1>(m2, red);
  const float rstd = rsqrtf(m2[0] / static_cast<float>(L) + p.eps);
  if (tid == 0) {
    p.mean[ng] = K + dm;
    p.rstd[ng] = rstd;
  }

  // Stage 3: per channel, out = act((x - K) * alpha + beta); write from shared memory.
  for (int j = tid; j < Cg; j += nt) {
    const int64_t c = g * Cg + j, nc = n * C + c;
    const float w = ld(p.weight, c, 1.0f), b = ld(p.bias, c, 0.0f);
    const float k = 1.0f + ld(p.scale, nc, 0.0f), sh = ld(p.shift, nc, 0.0f);
    const float alpha = rstd * w * k;
    ch_alpha[j] = alpha;
    ch_beta[j] = (ch_a[j] - dm) * alpha + (b * k + sh);
  }
  __syncthreads();
  for (int q = tid; q < nvec; q += nt) {
    float f[V];
    load_vec<T, V>(xs + q * V, f);
    GroupChan ch = chan_at(q * V);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      f[j] = act_fwd<ACT>((f[j] - K) * ch_alpha[ch.c] + ch_beta[ch.c]);
      ch.next();
    }
    store_vec<T, V>(out + goff(q * V), f);
  }
}

// ---------------------------------------------------------------- partial sums (both directions)

struct PartialArgs {
  const void* x;   // (N, C, S)
  const void* dy;  // (N, C, S), backward only
  GnVec weight, bias, add, scale, shift;
  const float *mean, *rstd;  // (N, G), backward only
  float* part;               // (NS, N, C, chunks) out
  int64_t N, C, S, G, chunk, chunks;
  bool cl;
};

// Per-channel constants. Forward: a = add, k0 = K, the group's first element (the shift).
// Backward: a = add, k0 = mean, k1 = rstd, k2 = w (1 + scale), k3 = b (1 + scale) + shift.
struct ChanConst {
  float a, k0, k1, k2, k3;
};

template <typename T, bool BWD>
__device__ __forceinline__ ChanConst chan_const(const PartialArgs& a, int64_t n, int64_t c) {
  ChanConst k{};
  const int64_t nc = n * a.C + c, Cg = a.C / a.G, g = c / Cg;
  k.a = ld(a.add, nc, 0.0f);
  if constexpr (!BWD) {
    const int64_t off = a.cl ? n * a.S * a.C + g * Cg : (n * a.C + g * Cg) * a.S;
    k.k0 = to_float(static_cast<const T*>(a.x)[off]);
  } else {
    k.k0 = a.mean[n * a.G + g];
    k.k1 = a.rstd[n * a.G + g];
    const float w = ld(a.weight, c, 1.0f), b = ld(a.bias, c, 0.0f);
    const float s = 1.0f + ld(a.scale, nc, 0.0f), sh = ld(a.shift, nc, 0.0f);
    k.k2 = w * s;
    k.k3 = b * s + sh;
  }
  return k;
}

// Forward: d = x - K + add; s += (d, d^2). Backward: s += (g1, g1 * xhat, xhat).
template <bool BWD, int ACT>
__device__ __forceinline__ void accumulate(const ChanConst& k, float x, float dy, float* s) {
  if constexpr (!BWD) {
    const float d = (x - k.k0) + k.a;
    s[0] += d;
    s[1] += d * d;
  } else {
    const float xhat = ((x + k.a) - k.k0) * k.k1;
    const float g1 = act_bwd<ACT>(dy, xhat * k.k2 + k.k3);
    s[0] += g1;
    s[1] += g1 * xhat;
    s[2] += xhat;
  }
}

// NCHW: warp per unit u = (n * C + c) * chunks + p, positions [p * chunk, min(S, (p + 1) * chunk)).
// V > 1: S % V == 0 and chunk % V == 0.
template <typename T, int V, bool BWD, int ACT>
__global__ void __launch_bounds__(kThreads) gn_partial_nchw(const PartialArgs a) {
  constexpr int NS = BWD ? 3 : 2;
  const int lane = threadIdx.x & 31;
  const int64_t units = a.N * a.C * a.chunks;
  for (int64_t u = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); u < units;
       u += static_cast<int64_t>(gridDim.x) * kWarps) {  // warp-uniform
    const int64_t nc = u / a.chunks, pc = u % a.chunks;
    const ChanConst k = chan_const<T, BWD>(a, nc / a.C, nc % a.C);
    const int64_t s0 = pc * a.chunk, s1 = s0 + a.chunk < a.S ? s0 + a.chunk : a.S;
    const T* x = static_cast<const T*>(a.x) + nc * a.S;
    const T* dy = BWD ? static_cast<const T*>(a.dy) + nc * a.S : nullptr;
    float s[NS] = {};
    for (int64_t i = s0 + lane * V; i < s1; i += 32 * V) {
      float xv[V], gv[V] = {};
      load_vec<T, V>(x + i, xv);
      if constexpr (BWD) load_vec<T, V>(dy + i, gv);
#pragma unroll
      for (int j = 0; j < V; ++j) accumulate<BWD, ACT>(k, xv[j], gv[j], s);
    }
#pragma unroll
    for (int m = 0; m < NS; ++m) {
      for (int o = 16; o > 0; o >>= 1) s[m] += __shfl_down_sync(0xffffffffu, s[m], o);
      if (lane == 0) a.part[m * units + u] = s[m];
    }
  }
}

// Channels-last: block per (n, p, channel block cb), bx threads across channel vectors (V channels
// each) times kThreads / bx rows (bx a power of two <= 32); rows [p * chunk, min(S, (p + 1) * chunk)).
// V > 1: C % V == 0.
template <typename T, int V, bool BWD, int ACT>
__global__ void __launch_bounds__(kThreads) gn_partial_cl(const PartialArgs a, int bx, int64_t cblocks) {
  constexpr int NS = BWD ? 3 : 2;
  __shared__ float red[kThreads * V * NS];
  const int tx = threadIdx.x % bx, ty = threadIdx.x / bx, by = kThreads / bx;
  const int64_t cb = blockIdx.x % cblocks, rest = blockIdx.x / cblocks;
  const int64_t pc = rest % a.chunks, n = rest / a.chunks;
  const int64_t c0 = (cb * bx + tx) * V;
  const bool active = c0 < a.C;
  float s[V][NS] = {};
  if (active) {
    ChanConst k[V];
#pragma unroll
    for (int j = 0; j < V; ++j) k[j] = chan_const<T, BWD>(a, n, c0 + j);
    const int64_t r0 = pc * a.chunk, r1 = r0 + a.chunk < a.S ? r0 + a.chunk : a.S;
    for (int64_t r = r0 + ty; r < r1; r += by) {
      const int64_t off = (n * a.S + r) * a.C + c0;
      float xv[V], gv[V] = {};
      load_vec<T, V>(static_cast<const T*>(a.x) + off, xv);
      if constexpr (BWD) load_vec<T, V>(static_cast<const T*>(a.dy) + off, gv);
#pragma unroll
      for (int j = 0; j < V; ++j) accumulate<BWD, ACT>(k[j], xv[j], gv[j], s[j]);
    }
  }
  // A fixed tree over the rows (by is a power of two).
  float* mine = red + threadIdx.x * (V * NS);
#pragma unroll
  for (int j = 0; j < V; ++j) {
#pragma unroll
    for (int m = 0; m < NS; ++m) mine[j * NS + m] = s[j][m];
  }
  __syncthreads();
  for (int half = by / 2; half > 0; half /= 2) {
    if (ty < half) {
      const float* other = red + (threadIdx.x + half * bx) * (V * NS);
      for (int i = 0; i < V * NS; ++i) mine[i] += other[i];
    }
    __syncthreads();
  }
  if (ty == 0 && active) {
    const int64_t plane = a.N * a.C * a.chunks;
#pragma unroll
    for (int j = 0; j < V; ++j) {
#pragma unroll
      for (int m = 0; m < NS; ++m) a.part[m * plane + (n * a.C + c0 + j) * a.chunks + pc] = mine[j * NS + m];
    }
  }
}

// ---------------------------------------------------------------- forward, split

// Block per (n, g): the group's partials (a contiguous run of Cg * chunks per plane) in a fixed
// order -> mean, rstd; coef (N, C) of float4 {K, alpha, beta, 0}: out = act((x - K) alpha + beta).
template <typename T>
__global__ void __launch_bounds__(kThreads) gn_fwd_finalize(const GroupNormFwdParams p, const float* part,
                                                           int64_t chunks, float4* coef) {
  __shared__ float red[33 * 2];
  const int64_t C = p.C, G = p.G, Cg = C / G, ng = blockIdx.x, n = ng / G, g = ng % G;
  const int64_t plane = p.N * C * chunks, first = (n * C + g * Cg) * chunks, count = Cg * chunks;
  float s[2] = {0.0f, 0.0f};
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) {
    s[0] += part[first + i];
    s[1] += part[plane + first + i];
  }
  block_sum<2>(s, red);
  const float L = static_cast<float>(Cg * p.S);
  const float dm = s[0] / L;  // mean - K
  // Rounded product, never fused with the subtraction: a one-element group (s[1] = d * d rounded)
  // gives var = 0 exactly, as the reference does.
  float var = __fsub_rn(s[1] / L, __fmul_rn(dm, dm));
  var = var < 0.0f ? 0.0f : var;  // rounding; NaN passes
  const float rstd = rsqrtf(var + p.eps);
  const int64_t off = p.channels_last ? n * p.S * C + g * Cg : (n * C + g * Cg) * p.S;
  const float K = to_float(static_cast<const T*>(p.x)[off]);
  if (threadIdx.x == 0) {
    p.mean[ng] = K + dm;
    p.rstd[ng] = rstd;
  }
  for (int64_t j = threadIdx.x; j < Cg; j += blockDim.x) {
    const int64_t c = g * Cg + j, nc = n * C + c;
    const float w = ld(p.weight, c, 1.0f), b = ld(p.bias, c, 0.0f);
    const float k = 1.0f + ld(p.scale, nc, 0.0f), sh = ld(p.shift, nc, 0.0f);
    const float a = ld(p.add, nc, 0.0f);
    const float alpha = rstd * w * k;
    coef[nc] = make_float4(K, alpha, (a - dm) * alpha + (b * k + sh), 0.0f);
  }
}

// Elementwise over memory order, V elements a thread (V > 1: N * C * S % V == 0).
template <typename T, int V, int ACT>
__global__ void __launch_bounds__(kThreads) gn_fwd_apply(const void* xp, void* outp, const float4* coef,
                                                         int64_t N, int64_t C, int64_t S, bool cl) {
  const T* x = static_cast<const T*>(xp);
  T* out = static_cast<T*>(outp);
  const int64_t nvec = N * C * S / V;
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; q < nvec;
       q += static_cast<int64_t>(gridDim.x) * kThreads) {
    float f[V];
    load_vec<T, V>(x + q * V, f);
    Cursor cur(q * V, cl, C, S);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const float4 k = coef[cur.nc];
      f[j] = act_fwd<ACT>((f[j] - k.x) * k.y + k.z);
      cur.next();
    }
    store_vec<T, V>(out + q * V, f);
  }
}

// ---------------------------------------------------------------- backward

// Block per (n, g): per-channel sums A = sum g1, B = sum g1 xhat, X = sum xhat over the chunks in
// order; m1 = sum_c e A / |group|, m2 = sum_c e B / |group| (e = w (1 + scale)); then
//   dshift = A, dscale = w B + b A, dadd = rstd (e A - S m1 - m2 X), and per sample
//   pdb = (1 + scale) A, pdw = (1 + scale) B (summed over n by gn_bwd_wb), and the dx table
//   tab (N, C, 2) of float4 {add, mean, rstd, e}, {b (1 + scale) + shift, m1, m2, 0}.
__global__ void __launch_bounds__(kThreads) gn_bwd_group(const GroupNormBwdParams p, const float* part,
                                                         int64_t chunks, float4* tab, float* pdb, float* pdw) {
  __shared__ float red[33 * 2];
  const int64_t C = p.C, G = p.G, Cg = C / G, ng = blockIdx.x, n = ng / G, g = ng % G;
  const int64_t plane = p.N * C * chunks;
  const float mean = p.mean[ng], rstd = p.rstd[ng];
  const auto chunk_sum = [&](int m, int64_t nc) {
    const float* q = part + m * plane + nc * chunks;
    float t = 0.0f;
    for (int64_t i = 0; i < chunks; ++i) t += q[i];
    return t;
  };
  float m[2] = {0.0f, 0.0f};
  for (int64_t j = threadIdx.x; j < Cg; j += blockDim.x) {
    const int64_t c = g * Cg + j, nc = n * C + c;
    const float e = ld(p.weight, c, 1.0f) * (1.0f + ld(p.scale, nc, 0.0f));
    m[0] += e * chunk_sum(0, nc);
    m[1] += e * chunk_sum(1, nc);
  }
  block_sum<2>(m, red);
  const float L = static_cast<float>(Cg * p.S), m1 = m[0] / L, m2 = m[1] / L;
  for (int64_t j = threadIdx.x; j < Cg; j += blockDim.x) {
    const int64_t c = g * Cg + j, nc = n * C + c;
    const float w = ld(p.weight, c, 1.0f), b = ld(p.bias, c, 0.0f);
    const float k = 1.0f + ld(p.scale, nc, 0.0f), sh = ld(p.shift, nc, 0.0f);
    const float A = chunk_sum(0, nc), B = chunk_sum(1, nc), e = w * k;
    if (p.dshift) p.dshift[nc] = A;
    if (p.dscale) p.dscale[nc] = w * B + b * A;
    if (p.dadd) p.dadd[nc] = rstd * (e * A - static_cast<float>(p.S) * m1 - m2 * chunk_sum(2, nc));
    if (pdb) pdb[nc] = k * A;
    if (pdw) pdw[nc] = k * B;
    if (tab) {
      tab[2 * nc] = make_float4(ld(p.add, nc, 0.0f), mean, rstd, e);
      tab[2 * nc + 1] = make_float4(b * k + sh, m1, m2, 0.0f);
    }
  }
}

// dx = rstd (g1 e - m1 - xhat m2), elementwise over memory order (V > 1: N * C * S % V == 0).
template <typename T, int V, int ACT>
__global__ void __launch_bounds__(kThreads) gn_bwd_dx(const void* xp, const void* dyp, void* dxp,
                                                      const float4* tab, int64_t N, int64_t C, int64_t S,
                                                      bool cl) {
  const T* x = static_cast<const T*>(xp);
  const T* dy = static_cast<const T*>(dyp);
  T* dx = static_cast<T*>(dxp);
  const int64_t nvec = N * C * S / V;
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; q < nvec;
       q += static_cast<int64_t>(gridDim.x) * kThreads) {
    float f[V], gv[V];
    load_vec<T, V>(x + q * V, f);
    load_vec<T, V>(dy + q * V, gv);
    Cursor cur(q * V, cl, C, S);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const float4 t0 = tab[2 * cur.nc], t1 = tab[2 * cur.nc + 1];
      const float xhat = ((f[j] + t0.x) - t0.y) * t0.z;
      const float g1 = act_bwd<ACT>(gv[j], xhat * t0.w + t1.x);
      f[j] = t0.z * (g1 * t0.w - t1.y - xhat * t1.z);
      cur.next();
    }
    store_vec<T, V>(dx + q * V, f);
  }
}

// dweight, dbias: the per-sample terms summed over n in order, thread per channel.
__global__ void __launch_bounds__(kThreads) gn_bwd_wb(const float* pdb, const float* pdw, float* db, float* dw,
                                                      int64_t N, int64_t C) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (c >= C) return;
  float sb = 0.0f, sw = 0.0f;
  for (int64_t n = 0; n < N; ++n) {
    if (db) sb += pdb[n * C + c];
    if (dw) sw += pdw[n * C + c];
  }
  if (db) db[c] = sb;
  if (dw) dw[c] = sw;
}

}  // namespace
}  // namespace vlfast
