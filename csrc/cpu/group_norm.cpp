// CPU kernel of vlfast::group_norm_fwd_kernel: the activation tiles of the output pass and the
// torch glue (checks, allocation, the parallel phases). The kernel itself, and the notes on its
// method, are in group_norm.h; group_norm_<dtype>.cpp compile it per dtype.
#include <unistd.h>

#include <ATen/MemoryOverlap.h>

#include "../layout.h"
#include "group_norm.h"

namespace vlfast {

// The knob of group_norm_set_cpu_cache (csrc/ops.cpp): -1 automatic, else bytes.
int64_t group_norm_cpu_cache();
// The knob of group_norm_set_cpu_stream (csrc/ops.cpp): -1 automatic, 0 cached stores, 1 streaming stores.
int64_t group_norm_cpu_stream();

namespace gn_cpu {
namespace {

// ---------------------------------------------------------------- activations
//
// The output pass of fp32 compute: act((x - centre) * alpha + beta) (TileFns).
// AVX-512 intrinsics where the CPU has them (vscalefps for 2^n, vrcp14ps and
// one Newton step for 1/d), else portable loops that GCC vectorises (a
// bit-trick 2^n and first guess of 1/d, three Newton steps). A division would
// cost more than the rest of SiLU: vdivps gives 16 lanes per ~10 cycles.
// e^z = 2^n * 2^f, n = round(z log2 e), 2^f by a degree-5 fit on [-1/2, 1/2]
// (relative error 2.4e-7); erf by Abramowitz-Stegun 7.1.26 (absolute error
// 1.5e-7, as torch's vectorised erf). A NaN input gives NaN through the final
// product with y, not through e^z.

constexpr float kLog2e = 1.44269504088896341f;
constexpr float kSqrtHalf = 0.70710678118654752f;
constexpr float kExp2[6] = {1.0000001192092896f, 0.6931469440460205f, 0.24022120237350464f,
                            0.05550713092088699f, 0.009675541892647743f, 0.001327647129073739f};
constexpr float kErfP = 0.3275911f;
constexpr float kErf[5] = {0.254829592f, -0.284496736f, 1.421413741f, -1.453152027f, 1.061405429f};

// e^z, for z <= 80 (1 + e^z stays below 2^125 for recip_portable); below -87 it gives e^-87.
VLFAST_INLINE float exp_portable(float z) {
  z = z > -87.0f ? z : -87.0f;
  z = z < 80.0f ? z : 80.0f;
  constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer, kept in the low bits
  const float t = z * kLog2e + kMagic;
  const float f = z * kLog2e - (t - kMagic);
  float p = kExp2[5];
  for (int k = 4; k >= 0; --k) p = p * f + kExp2[k];
  return bits<float>(bits<int32_t>(p) + (bits<int32_t>(t) << 23));  // p * 2^n: the shift drops t's exponent
}

// 1 / d for d in [1, 2^125].
VLFAST_INLINE float recip_portable(float d) {
  float r = bits<float>(0x7EF311C3 - bits<int32_t>(d));  // within 12%
  for (int k = 0; k < 3; ++k) r = r * (2.0f - d * r);
  return r;
}

VLFAST_INLINE float silu_portable(float y) {
  // Past y = -80, e^-y overflows in torch's y / (1 + e^-y): y * 0 gives its -0 (and NaN at -inf).
  return y < -80.0f ? y * 0.0f : y * recip_portable(1.0f + exp_portable(-y));
}

VLFAST_INLINE float gelu_portable(float y) {
  const float z = y * kSqrtHalf;
  float a = std::fabs(z);
  a = a < 10.0f ? a : 10.0f;  // erf(10) = 1
  const float t = recip_portable(1.0f + kErfP * a);
  float p = kErf[4];
  for (int k = 3; k >= 0; --k) p = p * t + kErf[k];
  const float erf = std::copysign(1.0f - p * t * exp_portable(-a * a), z);
  return 0.5f * y * (1.0f + erf);
}


VLFAST_INLINE float none_portable(float y) { return y; }
VLFAST_INLINE float relu_portable(float y) { return y < 0.0f ? 0.0f : y; }  // NaN passes, as in torch.relu

// The tile functions of activation F, out of line and cloned per instruction set (target_clones takes no
// templates, hence a macro). x and y may be the same.
#define VLFAST_PORTABLE_TILE_FNS(NAME, F)                                                                           \
  VLFAST_PORTABLE_CLONES void NAME##_channel_portable(const float* x, float* y, int64_t len, float c, float a,      \
                                                      float b) {                                                    \
    for (int64_t i = 0; i < len; ++i) y[i] = F((x[i] - c) * a + b);                                                 \
  }                                                                                                                 \
  VLFAST_PORTABLE_CLONES void NAME##_rows_portable(const float* x, float* y, int64_t ld, int64_t rows, int64_t cw,  \
                                                   const float* c, const float* a, const float* b) {                \
    for (int64_t r = 0; r < rows; ++r) {                                                                            \
      for (int64_t i = 0; i < cw; ++i) y[r * ld + i] = F((x[r * ld + i] - c[i]) * a[i] + b[i]);                     \
    }                                                                                                               \
  }
VLFAST_PORTABLE_TILE_FNS(none, none_portable)
VLFAST_PORTABLE_TILE_FNS(relu, relu_portable)
VLFAST_PORTABLE_TILE_FNS(silu, silu_portable)
VLFAST_PORTABLE_TILE_FNS(gelu, gelu_portable)

#if VLFAST_X86
#define VLFAST_AVX512 __attribute__((target("avx512f,avx2,fma")))

// 2^t (t <= 127; below -126 the result is subnormal or 0).
VLFAST_AVX512 VLFAST_INLINE __m512 exp2_avx512(__m512 t) {
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(kExp2[5]);
  for (int k = 4; k >= 0; --k) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2[k]));
  return _mm512_scalef_ps(p, n);
}

// 1 / d for d in [1, 2^126].
VLFAST_AVX512 VLFAST_INLINE __m512 recip_avx512(__m512 d) {
  const __m512 r = _mm512_rcp14_ps(d);
  return _mm512_fmadd_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(1.0f)), r);
}

VLFAST_AVX512 VLFAST_INLINE __m512 silu_avx512(__m512 y) {
  // e^-y = 2^t, t = -y log2 e clamped to 126 so that 1 + e^-y stays finite; past the clamp torch's
  // y / (1 + e^-y) divides by inf: y * 0 gives its -0 (and NaN at y = -inf).
  const __m512 u = _mm512_mul_ps(y, _mm512_set1_ps(-kLog2e));
  const __m512 t = _mm512_min_ps(u, _mm512_set1_ps(126.0f));
  const __m512 s = _mm512_mul_ps(y, recip_avx512(_mm512_add_ps(exp2_avx512(t), _mm512_set1_ps(1.0f))));
  const __mmask16 far = _mm512_cmp_ps_mask(u, _mm512_set1_ps(126.0f), _CMP_GT_OQ);
  return _mm512_mask_mul_ps(s, far, y, _mm512_setzero_ps());
}

VLFAST_AVX512 VLFAST_INLINE __m512 gelu_avx512(__m512 y) {
  const __m512 z = _mm512_mul_ps(y, _mm512_set1_ps(kSqrtHalf));
  const __m512 a = _mm512_min_ps(_mm512_abs_ps(z), _mm512_set1_ps(10.0f));
  const __m512 t = recip_avx512(_mm512_fmadd_ps(a, _mm512_set1_ps(kErfP), _mm512_set1_ps(1.0f)));
  __m512 p = _mm512_set1_ps(kErf[4]);
  for (int k = 3; k >= 0; --k) p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(kErf[k]));
  const __m512 e = exp2_avx512(_mm512_mul_ps(_mm512_mul_ps(a, a), _mm512_set1_ps(-kLog2e)));  // e^-a^2
  const __m512 q = _mm512_mul_ps(_mm512_mul_ps(p, t), e);
  const __m512i sign = _mm512_and_epi32(_mm512_castps_si512(z), _mm512_set1_epi32(INT32_MIN));
  const __m512 erf = _mm512_castsi512_ps(
      _mm512_or_epi32(_mm512_castps_si512(_mm512_sub_ps(_mm512_set1_ps(1.0f), q)), sign));
  const __m512 h = _mm512_mul_ps(y, _mm512_set1_ps(0.5f));
  return _mm512_fmadd_ps(h, erf, h);
}

VLFAST_AVX512 VLFAST_INLINE __m512 none_avx512(__m512 y) { return y; }
VLFAST_AVX512 VLFAST_INLINE __m512 relu_avx512(__m512 y) { return _mm512_max_ps(_mm512_setzero_ps(), y); }  // NaN: y

// NT: whole aligned vectors of y by streaming stores (the first up to 15 values, to y's alignment, and the
// tail as before).
template <__m512 (*F)(__m512), bool NT = false>
VLFAST_AVX512 void channel_avx512(const float* x, float* y, int64_t len, float centre, float alpha,
                                                float beta) {
  const __m512 c = _mm512_set1_ps(centre), a = _mm512_set1_ps(alpha), b = _mm512_set1_ps(beta);
  int64_t i = 0;
  if constexpr (NT) {
    const int64_t head = std::min<int64_t>(len, ((64 - (reinterpret_cast<uintptr_t>(y) & 63)) & 63) / 4);
    if (head > 0 && (reinterpret_cast<uintptr_t>(y) & 3) == 0) {
      const __mmask16 m = static_cast<__mmask16>((1u << head) - 1);
      _mm512_mask_storeu_ps(y, m, F(_mm512_fmadd_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x), c), a, b)));
      i = head;
    }
    if ((reinterpret_cast<uintptr_t>(y + i) & 63) == 0) {
      for (; i + 16 <= len; i += 16) {
        _mm512_stream_ps(y + i, F(_mm512_fmadd_ps(_mm512_sub_ps(_mm512_loadu_ps(x + i), c), a, b)));
      }
    }
  }
  for (; i + 16 <= len; i += 16) {
    _mm512_storeu_ps(y + i, F(_mm512_fmadd_ps(_mm512_sub_ps(_mm512_loadu_ps(x + i), c), a, b)));
  }
  if (i < len) {
    const __mmask16 m = static_cast<__mmask16>((1u << (len - i)) - 1);
    _mm512_mask_storeu_ps(y + i, m, F(_mm512_fmadd_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + i), c), a, b)));
  }
}
template <__m512 (*F)(__m512)>
VLFAST_AVX512 void rows_avx512(const float* x, float* y, int64_t ld, int64_t rows, int64_t cw,
                                             const float* centre, const float* alpha, const float* beta) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * ld;
    float* yr = y + r * ld;
    for (int64_t i = 0; i < cw; i += 16) {
      const __mmask16 m = cw - i >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (cw - i)) - 1);
      const __m512 v = _mm512_sub_ps(_mm512_maskz_loadu_ps(m, xr + i), _mm512_maskz_loadu_ps(m, centre + i));
      const __m512 a = _mm512_maskz_loadu_ps(m, alpha + i), b = _mm512_maskz_loadu_ps(m, beta + i);
      _mm512_mask_storeu_ps(yr + i, m, F(_mm512_fmadd_ps(v, a, b)));
    }
  }
}
#endif

}  // namespace

// The tile functions of an activation on this CPU.
TileFns tile_fns(int act) {
#if VLFAST_X86
  static const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
  if (avx512) {
#define VLFAST_AVX512_FNS(F) {channel_avx512<F>, rows_avx512<F>, channel_avx512<F, true>}
    switch (act) {
      case ACT_SILU: return VLFAST_AVX512_FNS(silu_avx512);
      case ACT_RELU: return VLFAST_AVX512_FNS(relu_avx512);
      case ACT_GELU: return VLFAST_AVX512_FNS(gelu_avx512);
      default: return VLFAST_AVX512_FNS(none_avx512);
    }
#undef VLFAST_AVX512_FNS
  }
#endif
  // Portable: cached stores only (GCC has no portable streaming store).
  switch (act) {
    case ACT_SILU: return {silu_channel_portable, silu_rows_portable, silu_channel_portable};
    case ACT_RELU: return {relu_channel_portable, relu_rows_portable, relu_channel_portable};
    case ACT_GELU: return {gelu_channel_portable, gelu_rows_portable, gelu_channel_portable};
    default: return {none_channel_portable, none_rows_portable, none_channel_portable};
  }
}

namespace {

// ---------------------------------------------------------------- glue

// Bytes of x a fused task may hold for its output pass to read from the cache: the knob of
// group_norm_set_cpu_cache (csrc/ops.cpp) where set, else half the per-core L2 (the other half holds the
// next task's slab, prefetched meanwhile, and the output's lines), within [128 KiB, 1 MiB].
int64_t cache_budget() {
  const int64_t knob = group_norm_cpu_cache();
  if (knob >= 0) return knob;
  static const int64_t automatic = [] {
    int64_t l2 = 0;
#if defined(__linux__) && defined(_SC_LEVEL2_CACHE_SIZE)
    l2 = static_cast<int64_t>(sysconf(_SC_LEVEL2_CACHE_SIZE));
#endif
    return l2 > 0 ? std::clamp<int64_t>(l2 / 2, int64_t{128} << 10, int64_t{1} << 20) : int64_t{512} << 10;
  }();
  return automatic;
}

// Output bytes from which the automatic mode stores by streaming stores.
constexpr int64_t kStreamMin = int64_t{8} << 20;

// An optional (shape) parameter as a contiguous tensor of the compute dtype, after checking it.
at::Tensor param(const std::optional<at::Tensor>& t, const char* name, at::IntArrayRef shape, at::ScalarType acc) {
  if (!t.has_value()) return at::Tensor();
  TORCH_CHECK(t->device().is_cpu(), "group_norm: ", name, " must be a CPU tensor, got ", t->device());
  TORCH_CHECK(at::isFloatingType(t->scalar_type()), "group_norm: ", name, " must be a floating tensor, got ",
              t->scalar_type());
  TORCH_CHECK(t->sizes() == shape, "group_norm: ", name, " must have shape ", shape, ", got ", t->sizes());
  return t->to(acc).contiguous();
}

// The forward into `out` (input's dtype, sizes and strides: written by the kernel's indexing of input;
// checked by the callers; `fresh`: allocated for this call); returns (mean, rstd).
std::tuple<at::Tensor, at::Tensor> group_norm_fwd_into(
    const at::Tensor& input, int64_t num_groups, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, const std::optional<at::Tensor>& add,
    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift, int64_t activation,
    const at::Tensor& out, bool fresh) {
  TORCH_CHECK(input.dim() >= 2, "group_norm: input must have shape (N, C, *), got ", input.sizes());
  const auto dtype = input.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
              "group_norm: input must be float32, float64, float16 or bfloat16, got ", dtype);
  const int64_t N = input.size(0), C = input.size(1);
  TORCH_CHECK(num_groups > 0 && C % num_groups == 0, "group_norm: num_groups (", num_groups,
              ") must be positive and divide the number of channels (", C, ")");
  TORCH_CHECK(activation >= ACT_NONE && activation <= ACT_GELU,
              "group_norm: activation must be 0 (none), 1 (silu), 2 (relu) or 3 (gelu), got ", activation);
  const bool contiguous = input.is_contiguous();
  const bool cl = !contiguous && is_channels_last(input);
  TORCH_CHECK(contiguous || cl, "group_norm: input must be contiguous or channels-last, got strides ",
              input.strides());
  const auto acc = at::toOpMathType(dtype);
  const at::Tensor w = param(weight, "weight", {C}, acc), b = param(bias, "bias", {C}, acc);
  const at::Tensor a = param(add, "add", {N, C}, acc), sc = param(scale, "scale", {N, C}, acc);
  const at::Tensor sh = param(shift, "shift", {N, C}, acc);

  const int64_t G = num_groups, S = N * C != 0 ? input.numel() / (N * C) : 0;
  at::Tensor mean = at::empty({N, G}, input.options().dtype(acc));
  at::Tensor rstd = at::empty({N, G}, input.options().dtype(acc));
  if (N == 0) return {mean, rstd};

  const int64_t Cg = C / G, threads = at::get_num_threads(), numel = input.numel();
  const int64_t units = std::max<int64_t>(1, cl ? (S + kRows - 1) / kRows : (S + kChunk - 1) / kChunk);
  // A fused task's slab of x: NCHW one group, channels-last one sample.
  const int64_t slab = (cl ? C : Cg) * S * static_cast<int64_t>(input.element_size());
  const bool fits = slab <= cache_budget();
  // Streaming stores for a fresh NCHW float32 output of kStreamMin bytes or more: writing it past the caches
  // saves reading each line before writing it, a third of the traffic; a smaller one stays in the cache for
  // the next op. Not for a caller's `out`, nor channels-last (both measured slower: benchmarks/NOTES.md, "CPU
  // kernels"), nor in place.
  const int64_t stream_knob = group_norm_cpu_stream();
  const bool stream = dtype == at::kFloat && !cl && out.data_ptr() != input.data_ptr() &&
                      (stream_knob >= 0 ? stream_knob == 1 : fresh && numel * 4 >= kStreamMin);
  // Fused tasks when they keep every thread busy (evenly, or at least 4 each), or the input is small.
  const int64_t fused_tasks = cl ? N : N * G;
  const bool fused = C == 0 || numel < kParallelMin || fused_tasks % threads == 0 || fused_tasks >= 4 * threads;
  at::Tensor part, coef;
  if (!fused) {
    part = at::empty({N * (cl ? units * 2 * C : C * units * 2)}, input.options().dtype(at::kDouble));
    coef = at::empty({3, N, C}, input.options().dtype(acc));
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "group_norm_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto ptr = [](const at::Tensor& t) -> const acc_t* {
      return t.defined() ? t.const_data_ptr<acc_t>() : nullptr;
    };
    const Job<scalar_t> job{input.const_data_ptr<scalar_t>(),
                            out.mutable_data_ptr<scalar_t>(),
                            ptr(w), ptr(b), ptr(a), ptr(sc), ptr(sh),
                            mean.mutable_data_ptr<acc_t>(),
                            rstd.mutable_data_ptr<acc_t>(),
                            fused ? nullptr : part.mutable_data_ptr<double>(),
                            fused ? nullptr : coef.mutable_data_ptr<acc_t>(),
                            N, C, S, G, Cg, units, fits, stream, eps, static_cast<int>(activation),
                            tile_fns(static_cast<int>(activation))};
    // Each phase as a parallel_for whose grain keeps kParallelMin elements a thread, at least.
    const auto run = [&](int phase, int64_t tasks, int64_t elems_per_task) {
      const int64_t grain = std::max<int64_t>(1, kParallelMin / std::max<int64_t>(elems_per_task, 1));
      at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) { run_tasks(job, phase, cl, begin, end); });
    };
    if (fused) {
      run(PHASE_FUSED, fused_tasks, numel / std::max<int64_t>(fused_tasks, 1));
    } else {
      const int64_t unit_tasks = cl ? N * units : N * C * units;
      run(PHASE_PARTIAL, unit_tasks, numel / unit_tasks);
      run(PHASE_COMBINE, N * G, 16 * units * Cg);  // scattered fp64 reads: weigh them more than streaming
      run(PHASE_APPLY, unit_tasks, numel / unit_tasks);
    }
  });
  return {mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_fwd_cpu(
    const at::Tensor& input, int64_t num_groups, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, const std::optional<at::Tensor>& add,
    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift, int64_t activation) {
  at::Tensor out = at::empty_like(input);  // dense input: empty_like keeps its strides
  auto [mean, rstd] =
      group_norm_fwd_into(input, num_groups, weight, bias, eps, add, scale, shift, activation, out, true);
  return {out, mean, rstd};
}

// The forward written into a caller's `out`: input's dtype, sizes and strides; out may be input itself (in
// place), but may share no other memory with input or the parameters.
std::tuple<at::Tensor, at::Tensor> group_norm_fwd_out_cpu(
    const at::Tensor& input, int64_t num_groups, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, const std::optional<at::Tensor>& add,
    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift, int64_t activation,
    at::Tensor& out) {
  TORCH_CHECK(out.device().is_cpu(), "group_norm: out must be a CPU tensor, got ", out.device());
  TORCH_CHECK(out.scalar_type() == input.scalar_type(), "group_norm: out must have the input's dtype ",
              input.scalar_type(), ", got ", out.scalar_type());
  TORCH_CHECK(out.sizes() == input.sizes() && out.strides() == input.strides(),
              "group_norm: out must have the input's sizes ", input.sizes(), " and strides ", input.strides(),
              ", got ", out.sizes(), " and ", out.strides());
  at::assert_no_internal_overlap(out);
  at::assert_no_partial_overlap(out, input);
  for (const auto* t : {&weight, &bias, &add, &scale, &shift}) {
    if (t->has_value()) at::assert_no_overlap(out, **t);
  }
  return group_norm_fwd_into(input, num_groups, weight, bias, eps, add, scale, shift, activation, out, false);
}

}  // namespace
}  // namespace gn_cpu

TORCH_LIBRARY_IMPL(vlfast, CPU, m) {
  m.impl("group_norm_fwd_kernel", &gn_cpu::group_norm_fwd_cpu);
  m.impl("group_norm_fwd_out_kernel", &gn_cpu::group_norm_fwd_out_cpu);
}

}  // namespace vlfast
