// CPU kernel of vlfast::group_norm_fwd_kernel, shared part: GroupNorm with the time-embedding add,
// scale-shift and activation of vlfast/reference/group_norm.py, forward only.
//
// Input (N, C, *) of any rank, NCHW-contiguous or channels-last (the (N, *, C)
// permutation contiguous); the output has the input's strides. S = prod(*).
//
// Statistics are shifted sums: each channel's values minus its first value K,
// summed in kLanes fp32 (fp64 for fp64 input) partial sums over fixed units
// (kChunk spatial elements of one channel for NCHW, kRows positions for
// channels-last), each unit's sums added in fp64 in order. A channel gives
// (mean, M2) and the channels of a group are combined exactly (Chan et al.).
// The units and the order of every sum depend only on the shape, never on the
// thread count, so on a given CPU the result is bit-identical run to run and
// for any number of threads.
//
// The normalisation, scale-shift and add fold into one affine map per (n, c),
// computed in fp64 and followed by the activation:
//   y = (x - centre) * alpha + beta,  centre = mean - add,
//   alpha = rstd * w * (1 + scale),   beta = b * (1 + scale) + shift
// (less the fp32 rounding error of centre times alpha, so that inputs with a
// large mean keep their precision).
//
// Work: "fused" tasks own whole groups (NCHW: one group, channels-last: one
// sample), compute their statistics and then write their output. Where the
// task's slab of x fits the cache budget (cache_budget in group_norm.cpp: half
// the per-core L2), the output pass reads it from L2, and meanwhile prefetches
// the next task's slab (the next values in memory) into L2: x then streams
// from memory once, overlapped with the arithmetic, instead of twice in turn.
// A larger slab is written in reverse order, so that the part the statistics
// pass read last is read again from the cache. With too few fused tasks for
// the threads, three phases instead: partial sums per unit, a combine per
// group, the output per unit.
//
// The output may be x itself (same memory, same strides: in place): every
// value of x is read before the output at its position is written.
//
// Vectorisation: the statistics are plain loops that GCC vectorises, compiled
// for AVX-512, AVX2+FMA and baseline x86-64 with runtime selection
// (target_clones), as in ddpm.cpp: at::vec only goes past SSE2 inside torch's
// own per-capability builds. The output pass (affine map + activation, fp32)
// goes through one function per activation: AVX-512 intrinsics where the CPU
// has AVX-512F, else portable loops, again cloned per instruction set. fp64
// input stays in fp64 throughout (std::exp, std::erf).
//
// Files: this header holds the statistics, output and task code; group_norm_<dtype>.cpp
// compile run_tasks once per input dtype (separate translation units, so a parallel build
// compiles them at once: together they took about 100 s in one file); group_norm.cpp holds
// the activation tiles and the torch glue.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define VLFAST_X86 1
#endif

#define VLFAST_INLINE inline __attribute__((always_inline))
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define VLFAST_ISA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define VLFAST_PORTABLE_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))  // AVX-512 has its own
#else
#define VLFAST_ISA_CLONES
#define VLFAST_PORTABLE_CLONES
#endif

namespace vlfast {
namespace gn_cpu {

// The codes of vlfast/activations.py (a name's index in NAMES); tests/test_activations.py holds them equal.
enum Activation : int { ACT_NONE = 0, ACT_SILU = 1, ACT_RELU = 2, ACT_GELU = 3 };

constexpr int64_t kChunk = 4096;        // NCHW: spatial elements of one channel per unit
constexpr int64_t kRows = 64;           // channels-last: spatial positions per unit
constexpr int kLanes = 64;              // independent partial sums in the NCHW reduction
constexpr int kVec = 16;                // channels-last statistics: channels per fixed-length inner loop
constexpr int64_t kParallelMin = 32768; // fewer elements than this run on one thread
constexpr int64_t kTile = 1024;         // values per activation tile
constexpr int64_t kLine = 64;           // bytes per cache line

// An activation of fp32 values after the affine map: one channel, y = act((x - centre) * alpha + beta) over
// len values; or rows of cw channels (channels-last), y = act((x - centre[c]) * alpha[c] + beta[c]) over
// `rows` rows at stride ld in x and y. x and y may be the same.
// channel_nt stores y with non-temporal (streaming) stores where it can: past the caches, without reading the
// lines first (x and y must then differ).
struct TileFns {
  using Channel = void (*)(const float* x, float* y, int64_t len, float centre, float alpha, float beta);
  Channel channel;
  void (*rows)(const float* x, float* y, int64_t ld, int64_t rows, int64_t cw, const float* centre,
               const float* alpha, const float* beta);
  Channel channel_nt;
};

template <typename T>
struct Job {
  using acc_t = at::opmath_type<T>;
  const T* x;           // (N, C, S) or, channels-last, (N, S, C)
  T* out;               // same layout as x
  const acc_t* w;       // (C,) weight, or null
  const acc_t* b;       // (C,) bias, or null
  const acc_t* add;     // (N, C), or null
  const acc_t* scale;   // (N, C), or null
  const acc_t* shift;   // (N, C), or null
  acc_t* mean;          // (N, G) out
  acc_t* rstd;          // (N, G) out
  double* part;         // three-phase mode: (units, 2) or channels-last (N, R, 2, C) partial sums
  acc_t* coef;          // three-phase mode: (3, N, C) centre, alpha, beta
  int64_t N, C, S, G, Cg;
  int64_t units;        // per channel (NCHW: ceil(S / kChunk)) or per sample (channels-last: ceil(S / kRows))
  bool fits;            // fused tasks: the slab fits the cache budget (prefetch the next; else write in reverse)
  bool stream;          // NCHW fp32 output by streaming stores (a fresh output larger than the caches hold)
  double eps;
  int act;
  TileFns tile;         // the output pass in fp32 (tile_fns)
};

// The activation tiles of `act` (group_norm.cpp).
TileFns tile_fns(int act);

// Run the tasks [begin, end) of one phase (group_norm_<dtype>.cpp, one clone per instruction set).
void run_tasks(const Job<float>& j, int phase, bool cl, int64_t begin, int64_t end);
void run_tasks(const Job<double>& j, int phase, bool cl, int64_t begin, int64_t end);
void run_tasks(const Job<c10::Half>& j, int phase, bool cl, int64_t begin, int64_t end);
void run_tasks(const Job<c10::BFloat16>& j, int phase, bool cl, int64_t begin, int64_t end);

namespace {

template <typename To, typename From>
VLFAST_INLINE To bits(From x) {
  To y;
  std::memcpy(&y, &x, sizeof(y));
  return y;
}

// Whether the output goes through the tile functions (fp32 compute) or activate() inline (fp64).
template <typename acc_t>
constexpr bool kTiled = std::is_same_v<acc_t, float>;

// The activations in fp64.
template <int ACT, typename acc_t>
VLFAST_INLINE acc_t activate(acc_t y) {
  if constexpr (ACT == ACT_RELU) return y < acc_t(0) ? acc_t(0) : y;  // NaN passes, as in torch.relu
  if constexpr (ACT == ACT_SILU) return y / (acc_t(1) + std::exp(-y));
  if constexpr (ACT == ACT_GELU) return acc_t(0.5) * y * (acc_t(1) + std::erf(y * acc_t(0.70710678118654752440)));
  return y;
}

// ---------------------------------------------------------------- statistics

// (sum d, sum d^2) of d = x - k over len (<= kChunk) contiguous elements: kLanes partial sums, then fp64.
template <typename T, typename acc_t = at::opmath_type<T>>
VLFAST_INLINE void shifted_sums(const T* __restrict__ x, int64_t len, acc_t k, double& s1, double& s2) {
  acc_t a1[kLanes] = {}, a2[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const acc_t d = static_cast<acc_t>(x[i + l]) - k;
      a1[l] += d;
      a2[l] += d * d;
    }
  }
  for (int l = 0; i + l < len; ++l) {
    const acc_t d = static_cast<acc_t>(x[i + l]) - k;
    a1[l] += d;
    a2[l] += d * d;
  }
  // The lanes to one value by a fixed pairwise tree: in fp32 down to 16 lanes, then in fp64.
  for (int w = kLanes / 2; w >= 16; w /= 2) {
    for (int l = 0; l < w; ++l) {
      a1[l] += a1[l + w];
      a2[l] += a2[l + w];
    }
  }
  double d1[16], d2[16];
  for (int l = 0; l < 16; ++l) d1[l] = a1[l], d2[l] = a2[l];
  for (int w = 8; w >= 1; w /= 2) {
    for (int l = 0; l < w; ++l) {
      d1[l] += d1[l + w];
      d2[l] += d2[l + w];
    }
  }
  s1 = d1[0];
  s2 = d2[0];
}

// Channels-last, one unit: rows [r0, r1) of sample n, channels [c0, c0 + cw), shifts k (cw): per-channel sums
// of d = x - k in fp32 over the unit's rows (a1, a2: cw each), then added in fp64 to s1, s2. Row by row, in
// blocks of kVec channels (fixed-length loops GCC turns into whole vectors).
template <typename T, typename acc_t = at::opmath_type<T>>
VLFAST_INLINE void shifted_sums_cl(const Job<T>& j, int64_t n, int64_t r0, int64_t r1, int64_t c0, int64_t cw,
                                   const acc_t* __restrict__ k, acc_t* __restrict__ a1, acc_t* __restrict__ a2,
                                   double* __restrict__ s1, double* __restrict__ s2) {
  std::fill(a1, a1 + cw, acc_t(0));
  std::fill(a2, a2 + cw, acc_t(0));
  for (int64_t s = r0; s < r1; ++s) {
    const T* __restrict__ x = j.x + (n * j.S + s) * j.C + c0;
    int64_t c = 0;
    for (; c + kVec <= cw; c += kVec) {
      for (int l = 0; l < kVec; ++l) {
        const acc_t d = static_cast<acc_t>(x[c + l]) - k[c + l];
        a1[c + l] += d;
        a2[c + l] += d * d;
      }
    }
    for (; c < cw; ++c) {
      const acc_t d = static_cast<acc_t>(x[c]) - k[c];
      a1[c] += d;
      a2[c] += d * d;
    }
  }
  for (int64_t c = 0; c < cw; ++c) {
    s1[c] += a1[c];
    s2[c] += a2[c];
  }
}

// Group g of sample n from its channels' shifted sums (s1, s2 over S values, shifts k): writes mean and rstd,
// and the affine map of each of its Cg channels to centre, alpha, beta.
template <typename T, typename acc_t = at::opmath_type<T>>
VLFAST_INLINE void finish_group(const Job<T>& j, int64_t n, int64_t g, const acc_t* k, const double* s1,
                                const double* s2, acc_t* centre, acc_t* alpha, acc_t* beta) {
  const int64_t nc0 = n * j.C + g * j.Cg;
  const double S = static_cast<double>(j.S);
  // Channel means (of x + add) and the group mean.
  double mean = 0.0;
  for (int64_t i = 0; i < j.Cg; ++i) {
    mean += static_cast<double>(k[i]) + s1[i] / S + (j.add ? j.add[nc0 + i] : 0.0);
  }
  mean /= static_cast<double>(j.Cg);
  // M2 = sum of the channels' M2 + S * sum of (channel mean - mean)^2.
  double m2 = 0.0, between = 0.0;
  for (int64_t i = 0; i < j.Cg; ++i) {
    const double dm = static_cast<double>(k[i]) + s1[i] / S + (j.add ? j.add[nc0 + i] : 0.0) - mean;
    m2 += s2[i] - s1[i] * s1[i] / S;
    between += dm * dm;
  }
  double var = (m2 + S * between) / (S * static_cast<double>(j.Cg));
  var = var < 0.0 ? 0.0 : var;  // rounding; NaN passes
  const double rstd = 1.0 / std::sqrt(var + j.eps);
  j.mean[n * j.G + g] = static_cast<acc_t>(mean);
  j.rstd[n * j.G + g] = static_cast<acc_t>(rstd);
  for (int64_t i = 0; i < j.Cg; ++i) {
    const int64_t c = g * j.Cg + i, nc = nc0 + i;
    const double w = j.w ? j.w[c] : 1.0, b = j.b ? j.b[c] : 0.0;
    const double sc = j.scale ? 1.0 + j.scale[nc] : 1.0, sh = j.shift ? j.shift[nc] : 0.0;
    // centre rounds to acc_t; its rounding error goes into beta, so that x - centre loses nothing.
    const double ce = mean - (j.add ? j.add[nc] : 0.0), al = rstd * w * sc;
    centre[i] = static_cast<acc_t>(ce);
    alpha[i] = static_cast<acc_t>(al);
    beta[i] = static_cast<acc_t>(b * sc + sh - (ce - static_cast<double>(centre[i])) * al);
  }
}

// ---------------------------------------------------------------- prefetch

// The cache lines of [p, p + bytes) into L2.
VLFAST_INLINE void prefetch_l2(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  const uintptr_t first = reinterpret_cast<uintptr_t>(c) & ~static_cast<uintptr_t>(kLine - 1);
  for (uintptr_t a = first; a < reinterpret_cast<uintptr_t>(c + bytes); a += kLine) {
    __builtin_prefetch(reinterpret_cast<const void*>(a), 0, 2);
  }
}

// ---------------------------------------------------------------- output

// out = act((x - centre) * alpha + beta) over len contiguous elements of one channel, by tiles of kTile, the
// last tile first where `reverse`; with each tile, the same span of pf (the next task's values) into L2 where
// pf is given. out may be x.
template <int ACT, typename T, typename acc_t = at::opmath_type<T>>
VLFAST_INLINE void apply_channel(const Job<T>& j, const T* x, T* out, int64_t len, acc_t centre, acc_t alpha,
                                 acc_t beta, const T* pf = nullptr, bool reverse = false) {
  alignas(64) float buf[kTile];
  const int64_t tiles = (len + kTile - 1) / kTile;
  for (int64_t tile = 0; tile < tiles; ++tile) {
    const int64_t i0 = (reverse ? tiles - 1 - tile : tile) * kTile, m = std::min(kTile, len - i0);
    if (pf != nullptr) prefetch_l2(pf + i0, m * static_cast<int64_t>(sizeof(T)));
    if constexpr (!kTiled<acc_t>) {
      for (int64_t i = i0; i < i0 + m; ++i) {
        out[i] = static_cast<T>(activate<ACT>((static_cast<acc_t>(x[i]) - centre) * alpha + beta));
      }
    } else if constexpr (std::is_same_v<T, float>) {
      (j.stream ? j.tile.channel_nt : j.tile.channel)(x + i0, out + i0, m, centre, alpha, beta);
    } else {
      for (int64_t i = 0; i < m; ++i) buf[i] = static_cast<float>(x[i0 + i]);
      j.tile.channel(buf, buf, m, centre, alpha, beta);
      for (int64_t i = 0; i < m; ++i) out[i0 + i] = static_cast<T>(buf[i]);
    }
  }
}

// Channels-last: rows [r0, r1) of sample n, channels [c0, c0 + cw), with per-channel maps centre/alpha/beta
// (cw each). Tiled activations: fp32 directly (tile.rows), other dtypes through a buffer of up to kTile values.
// out may be x.
template <int ACT, typename T, typename acc_t = at::opmath_type<T>>
VLFAST_INLINE void apply_rows(const Job<T>& j, int64_t n, int64_t r0, int64_t r1, int64_t c0, int64_t cw,
                              const acc_t* __restrict__ centre, const acc_t* __restrict__ alpha,
                              const acc_t* __restrict__ beta) {
  const int64_t base = (n * j.S) * j.C + c0;
  if constexpr (!kTiled<acc_t>) {
    for (int64_t s = r0; s < r1; ++s) {
      const T* x = j.x + base + s * j.C;
      T* out = j.out + base + s * j.C;
      for (int64_t c = 0; c < cw; ++c) {
        out[c] = static_cast<T>(activate<ACT>((static_cast<acc_t>(x[c]) - centre[c]) * alpha[c] + beta[c]));
      }
    }
  } else if constexpr (std::is_same_v<T, float>) {
    j.tile.rows(j.x + base + r0 * j.C, j.out + base + r0 * j.C, j.C, r1 - r0, cw, centre, alpha, beta);
  } else {
    // Tiles of `rows` rows by a piece of up to pw channels.
    alignas(64) float buf[kTile];
    const int64_t pw = std::min(cw, kTile), rows = kTile / pw;
    for (int64_t s0 = r0; s0 < r1; s0 += rows) {
      const int64_t nr = std::min(r1 - s0, rows);
      for (int64_t p0 = 0; p0 < cw; p0 += pw) {
        const int64_t w = std::min(pw, cw - p0), off = base + s0 * j.C + p0;
        for (int64_t r = 0; r < nr; ++r) {
          for (int64_t c = 0; c < w; ++c) buf[r * w + c] = static_cast<float>(j.x[off + r * j.C + c]);
        }
        j.tile.rows(buf, buf, w, nr, w, centre + p0, alpha + p0, beta + p0);
        for (int64_t r = 0; r < nr; ++r) {
          for (int64_t c = 0; c < w; ++c) j.out[off + r * j.C + c] = static_cast<T>(buf[r * w + c]);
        }
      }
    }
  }
}

// ---------------------------------------------------------------- tasks

// Per-thread scratch: fp64 sums (2 C); shifts, affine maps and fp32 sums (6 C).
template <typename acc_t>
struct Scratch {
  std::vector<double> sums;
  std::vector<acc_t> maps;
  explicit Scratch(int64_t C) : sums(2 * C), maps(6 * C) {}
};

// NCHW, fused: group t % G of sample t / G, statistics then output; next: the thread's next task (or -1),
// whose group, the Cg * S values after this one's, is prefetched during the output pass where the group fits
// the cache budget (else the output pass runs backwards).
template <int ACT, typename T, typename acc_t = at::opmath_type<T>>
VLFAST_INLINE void nchw_group(const Job<T>& j, int64_t t, int64_t next, Scratch<acc_t>& ws) {
  const int64_t n = t / j.G, g = t % j.G, Cg = j.Cg;
  double *s1 = ws.sums.data(), *s2 = s1 + Cg;
  acc_t *k = ws.maps.data(), *centre = k + Cg, *alpha = centre + Cg, *beta = alpha + Cg;
  const T* xg = j.x + (n * j.C + g * Cg) * j.S;
  T* og = j.out + (n * j.C + g * Cg) * j.S;
  for (int64_t i = 0; i < Cg; ++i) {
    const T* xc = xg + i * j.S;
    k[i] = j.S ? static_cast<acc_t>(xc[0]) : acc_t(0);
    s1[i] = s2[i] = 0.0;
    for (int64_t u = 0; u < j.units; ++u) {
      double t1, t2;
      shifted_sums(xc + u * kChunk, std::min(kChunk, j.S - u * kChunk), k[i], t1, t2);
      s1[i] += t1;
      s2[i] += t2;
    }
  }
  finish_group(j, n, g, k, s1, s2, centre, alpha, beta);
  const T* pf = (j.fits && next >= 0) ? xg + (next - t) * Cg * j.S : nullptr;
  for (int64_t c = 0; c < Cg; ++c) {
    const int64_t i = j.fits ? c : Cg - 1 - c;
    apply_channel<ACT>(j, xg + i * j.S, og + i * j.S, j.S, centre[i], alpha[i], beta[i],
                       pf ? pf + i * j.S : nullptr, !j.fits);
  }
}

// Channels-last, fused: sample n, statistics then output by units of kRows rows; where the sample fits the
// cache budget, with each unit the same rows of the next task (the next sample, S * C values on) are
// prefetched, else the units run backwards.
template <int ACT, typename T, typename acc_t = at::opmath_type<T>>
VLFAST_INLINE void cl_sample(const Job<T>& j, int64_t n, int64_t next, Scratch<acc_t>& ws) {
  const int64_t C = j.C;
  double *s1 = ws.sums.data(), *s2 = s1 + C;
  acc_t *k = ws.maps.data(), *centre = k + C, *alpha = centre + C, *beta = alpha + C, *a1 = beta + C, *a2 = a1 + C;
  for (int64_t c = 0; c < C; ++c) {
    k[c] = j.S ? static_cast<acc_t>(j.x[n * j.S * C + c]) : acc_t(0);
    s1[c] = s2[c] = 0.0;
  }
  for (int64_t u = 0; u < j.units; ++u) {
    shifted_sums_cl(j, n, u * kRows, std::min(j.S, (u + 1) * kRows), 0, C, k, a1, a2, s1, s2);
  }
  for (int64_t g = 0; g < j.G; ++g) {
    const int64_t c = g * j.Cg;
    finish_group(j, n, g, k + c, s1 + c, s2 + c, centre + c, alpha + c, beta + c);
  }
  const T* pf = (j.fits && next >= 0) ? j.x + next * j.S * C : nullptr;
  for (int64_t v = 0; v < j.units; ++v) {
    const int64_t u = j.fits ? v : j.units - 1 - v, r0 = u * kRows, r1 = std::min(j.S, r0 + kRows);
    apply_rows<ACT>(j, n, r0, r1, 0, C, centre, alpha, beta);
    if (pf != nullptr) prefetch_l2(pf + r0 * C, (r1 - r0) * C * static_cast<int64_t>(sizeof(T)));
  }
}

// Three-phase mode, phase 1: the partial sums of unit t into part.
template <typename T, typename acc_t = at::opmath_type<T>>
VLFAST_INLINE void partial_unit(const Job<T>& j, bool cl, int64_t t, Scratch<acc_t>& ws) {
  if (!cl) {  // t = (n * C + c) * units + u; part (N, C, units, 2)
    const int64_t u = t % j.units;
    const T* xc = j.x + (t / j.units) * j.S;
    shifted_sums(xc + u * kChunk, std::min(kChunk, j.S - u * kChunk), static_cast<acc_t>(xc[0]), j.part[2 * t],
                 j.part[2 * t + 1]);
    return;
  }
  // t = n * units + u; part (N, units, 2, C)
  const int64_t n = t / j.units, u = t % j.units;
  acc_t *k = ws.maps.data(), *a1 = k + j.C, *a2 = a1 + j.C;
  double *s1 = j.part + 2 * j.C * t, *s2 = s1 + j.C;
  for (int64_t c = 0; c < j.C; ++c) {
    k[c] = static_cast<acc_t>(j.x[n * j.S * j.C + c]);
    s1[c] = s2[c] = 0.0;
  }
  shifted_sums_cl(j, n, u * kRows, std::min(j.S, (u + 1) * kRows), 0, j.C, k, a1, a2, s1, s2);
}

// Three-phase mode, phase 2: group t % G of sample t / G from the partial sums; maps into j.coef.
template <typename T, typename acc_t = at::opmath_type<T>>
VLFAST_INLINE void combine_group(const Job<T>& j, bool cl, int64_t t, Scratch<acc_t>& ws) {
  const int64_t n = t / j.G, g = t % j.G, NC = j.N * j.C;
  double *s1 = ws.sums.data(), *s2 = s1 + j.Cg;
  acc_t* k = ws.maps.data();
  for (int64_t i = 0; i < j.Cg; ++i) {
    const int64_t c = g * j.Cg + i;
    k[i] = static_cast<acc_t>(cl ? j.x[n * j.S * j.C + c] : j.x[(n * j.C + c) * j.S]);
    s1[i] = s2[i] = 0.0;
  }
  // Each channel's units in order; channels-last reads them unit by unit (the group's channels are adjacent).
  if (cl) {
    for (int64_t u = 0; u < j.units; ++u) {
      const double* p = j.part + 2 * j.C * (n * j.units + u) + g * j.Cg;
      for (int64_t i = 0; i < j.Cg; ++i) {
        s1[i] += p[i];
        s2[i] += p[j.C + i];
      }
    }
  } else {
    for (int64_t i = 0; i < j.Cg; ++i) {
      const double* p = j.part + 2 * (n * j.C + g * j.Cg + i) * j.units;
      for (int64_t u = 0; u < j.units; ++u) {
        s1[i] += p[2 * u];
        s2[i] += p[2 * u + 1];
      }
    }
  }
  acc_t* centre = j.coef + n * j.C + g * j.Cg;
  finish_group(j, n, g, k, s1, s2, centre, centre + NC, centre + 2 * NC);
}

// Three-phase mode, phase 3: the output of unit t (numbered as in partial_unit).
template <int ACT, typename T, typename acc_t = at::opmath_type<T>>
VLFAST_INLINE void apply_unit(const Job<T>& j, bool cl, int64_t t) {
  const int64_t NC = j.N * j.C;
  if (!cl) {
    const int64_t nc = t / j.units, u = t % j.units, off = nc * j.S + u * kChunk;
    apply_channel<ACT>(j, j.x + off, j.out + off, std::min(kChunk, j.S - u * kChunk), j.coef[nc],
                       j.coef[NC + nc], j.coef[2 * NC + nc]);
    return;
  }
  const int64_t n = t / j.units, u = t % j.units;
  const acc_t* centre = j.coef + n * j.C;
  apply_rows<ACT>(j, n, u * kRows, std::min(j.S, (u + 1) * kRows), 0, j.C, centre, centre + NC, centre + 2 * NC);
}

enum Phase : int { PHASE_FUSED = 0, PHASE_PARTIAL = 1, PHASE_COMBINE = 2, PHASE_APPLY = 3 };

template <int ACT, typename T>
VLFAST_INLINE void run_act(const Job<T>& j, int phase, bool cl, int64_t begin, int64_t end) {
  Scratch<at::opmath_type<T>> ws(phase == PHASE_APPLY ? 0 : std::max<int64_t>(j.C, 1));
  for (int64_t t = begin; t < end; ++t) {
    const int64_t next = t + 1 < end ? t + 1 : -1;
    switch (phase) {
      case PHASE_FUSED: cl ? cl_sample<ACT>(j, t, next, ws) : nchw_group<ACT>(j, t, next, ws); break;
      case PHASE_PARTIAL: partial_unit(j, cl, t, ws); break;
      case PHASE_COMBINE: combine_group(j, cl, t, ws); break;
      default: apply_unit<ACT>(j, cl, t); break;
    }
  }
#if VLFAST_X86
  if (j.stream) _mm_sfence();  // streaming stores are weakly ordered: visible before the thread reports done
#endif
}

template <typename T>
VLFAST_INLINE void run_range(const Job<T>& j, int phase, bool cl, int64_t begin, int64_t end) {
  if (phase == PHASE_PARTIAL || phase == PHASE_COMBINE) return run_act<ACT_NONE>(j, phase, cl, begin, end);
  switch (j.act) {
    case ACT_SILU: run_act<ACT_SILU>(j, phase, cl, begin, end); break;
    case ACT_RELU: run_act<ACT_RELU>(j, phase, cl, begin, end); break;
    case ACT_GELU: run_act<ACT_GELU>(j, phase, cl, begin, end); break;
    default: run_act<ACT_NONE>(j, phase, cl, begin, end); break;
  }
}

}  // namespace
}  // namespace gn_cpu
}  // namespace vlfast
