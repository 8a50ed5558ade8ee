// Launchers of the fused GroupNorm's CUDA kernels (group_norm_kernels.cuh, where the method is
// described) and the choice of path: torch-free, plain pointers, sizes and a stream.
#include <algorithm>
#include <atomic>

#include "group_norm_kernels.cuh"

namespace vlfast {
namespace {

// ---------------------------------------------------------------- launchers

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t pow2_at_least(int64_t v) {
  int64_t p = 1;
  while (p < v) p *= 2;
  return p;
}
bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }
int64_t vec_width(GnDtype d) { return d == GN_F32 ? 4 : 8; }  // elements of 16 bytes

// Runs the statements with `constexpr int A` bound to the activation code act.
#define VLFAST_GN_WITH_ACT(act, ...)                                \
  switch (act) {                                                    \
    case ACT_SILU: { constexpr int A = ACT_SILU; __VA_ARGS__; } break; \
    case ACT_RELU: { constexpr int A = ACT_RELU; __VA_ARGS__; } break; \
    case ACT_GELU: { constexpr int A = ACT_GELU; __VA_ARGS__; } break; \
    default: { constexpr int A = ACT_NONE; __VA_ARGS__; } break;       \
  }

// Channels-last partial sums: bx threads across channel vectors of width vec.
int cl_bx(int64_t C, int64_t vec) { return static_cast<int>(std::min<int64_t>(32, pow2_at_least(cdiv(C, vec)))); }

// Chunks of the partial sums, for about kBlocksPerSm blocks of kThreads per SM in all.
void plan_chunks(int64_t N, int64_t C, int64_t S, bool cl, int64_t vec, const GnDeviceInfo& dev, GnPlan& plan) {
  const int64_t target = static_cast<int64_t>(dev.sms) * kBlocksPerSm;
  if (!cl) {  // units of a warp; a chunk is a multiple of 32 * vec positions
    const int64_t step = 32 * vec;
    const int64_t want = cdiv(target * kWarps, N * C);
    const int64_t chunks = std::max<int64_t>(1, std::min({want, cdiv(S, step), kMaxChunks}));
    plan.chunk = cdiv(cdiv(S, chunks), step) * step;
  } else {
    const int64_t bx = cl_bx(C, vec), by = kThreads / bx;
    const int64_t want = cdiv(target, N * cdiv(cdiv(C, vec), bx));
    const int64_t chunks = std::max<int64_t>(1, std::min({want, cdiv(S, by), kMaxChunks}));
    plan.chunk = cdiv(S, chunks);
  }
  plan.chunks = cdiv(S, plan.chunk);
}

// The partial sums (forward: BWD false, ACT none) into a.part.
template <typename T, bool BWD, int ACT>
cudaError_t launch_partial(const PartialArgs& a, cudaStream_t stream) {
  constexpr int VV = 16 / sizeof(T);
  const bool aligned = aligned16(a.x) && (!BWD || aligned16(a.dy));
  if (!a.cl) {
    const bool vec = aligned && a.S % VV == 0 && a.chunk % VV == 0;
    const int64_t grid = std::min(cdiv(a.N * a.C * a.chunks, kWarps), kMaxGrid);
    if (vec) {
      gn_partial_nchw<T, VV, BWD, ACT><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(a);
    } else {
      gn_partial_nchw<T, 1, BWD, ACT><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(a);
    }
    return cudaGetLastError();
  }
  const bool vec = aligned && a.C % VV == 0;
  const int64_t v = vec ? VV : 1, bx = cl_bx(a.C, v), cblocks = cdiv(cdiv(a.C, v), bx);
  const int64_t grid = a.N * a.chunks * cblocks;
  if (grid > kMaxGrid) return cudaErrorInvalidConfiguration;
  if (vec) {
    gn_partial_cl<T, VV, BWD, ACT><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(a, static_cast<int>(bx),
                                                                                         cblocks);
  } else {
    gn_partial_cl<T, 1, BWD, ACT><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(a, static_cast<int>(bx),
                                                                                        cblocks);
  }
  return cudaGetLastError();
}

// The largest dynamic shared memory a kernel was allowed, per device.
struct SmemLimit {
  std::atomic<int64_t> bytes[64];
};

// Allows `kernel` `bytes` of dynamic shared memory (beyond the default 48 KB), once per device and size:
// after a warm-up, a launch under CUDA-graph capture makes no cudaFuncSetAttribute call.
template <typename Kernel>
cudaError_t allow_smem(Kernel kernel, int64_t bytes, SmemLimit& limit) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const bool cached = device >= 0 && device < 64;
  if (cached && limit.bytes[device].load() >= bytes) return cudaSuccess;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (err == cudaSuccess && cached) {
    int64_t seen = limit.bytes[device].load();
    while (seen < bytes && !limit.bytes[device].compare_exchange_weak(seen, bytes)) {
    }
  }
  return err;
}

template <typename T, int V>
cudaError_t launch_onepass(const GroupNormFwdParams& p, const GnPlan& plan, int threads, cudaStream_t stream) {
  cudaError_t err = cudaSuccess;
  const unsigned grid = static_cast<unsigned>(p.N * p.G);
  VLFAST_GN_WITH_ACT(p.act, {
    static SmemLimit limit;  // one per kernel instantiation
    err = allow_smem(gn_fwd_onepass<T, V, A>, plan.smem, limit);
    if (err == cudaSuccess) gn_fwd_onepass<T, V, A><<<grid, threads, plan.smem, stream>>>(p);
  })
  return err != cudaSuccess ? err : cudaGetLastError();
}

template <typename T>
cudaError_t fwd(const GroupNormFwdParams& p, const GnPlan& plan, const GnDeviceInfo& dev, cudaStream_t stream) {
  constexpr int VV = 16 / sizeof(T);
  const int64_t N = p.N, C = p.C, S = p.S, G = p.G, Cg = C / G, total = N * C * S;
  if (plan.onepass) {
    const bool vec = aligned16(p.x) && aligned16(p.out) &&
                     (p.channels_last ? (Cg % VV == 0 && C % VV == 0) : (Cg * S) % VV == 0);
    const int threads = Cg * S <= 8192 ? kThreads : kOnepassThreads;
    return vec ? launch_onepass<T, VV>(p, plan, threads, stream) : launch_onepass<T, 1>(p, plan, threads, stream);
  }
  if (N * G > kMaxGrid) return cudaErrorInvalidConfiguration;
  // Split: coef (N, C) float4 first (16-byte aligned), then the partials (2, N, C, chunks).
  float4* coef = reinterpret_cast<float4*>(p.work);
  float* part = p.work + 4 * N * C;
  const PartialArgs a{p.x,    nullptr, p.weight, p.bias, p.add, p.scale,    p.shift,     nullptr, nullptr,
                      part,   N,       C,        S,      G,     plan.chunk, plan.chunks, p.channels_last};
  cudaError_t err = launch_partial<T, false, ACT_NONE>(a, stream);
  if (err != cudaSuccess) return err;
  gn_fwd_finalize<T><<<static_cast<unsigned>(N * G), kThreads, 0, stream>>>(p, part, plan.chunks, coef);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  const bool vec = aligned16(p.x) && aligned16(p.out) && total % VV == 0;
  const int64_t grid = std::min<int64_t>(cdiv(cdiv(total, vec ? VV : 1), kThreads), int64_t{dev.sms} * 32);
  VLFAST_GN_WITH_ACT(p.act, {
    if (vec) {
      gn_fwd_apply<T, VV, A><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(p.x, p.out, coef, N, C, S,
                                                                                  p.channels_last);
    } else {
      gn_fwd_apply<T, 1, A><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(p.x, p.out, coef, N, C, S,
                                                                                 p.channels_last);
    }
  })
  return cudaGetLastError();
}

template <typename T>
cudaError_t bwd(const GroupNormBwdParams& p, const GnPlan& plan, const GnDeviceInfo& dev, cudaStream_t stream) {
  constexpr int VV = 16 / sizeof(T);
  const int64_t N = p.N, C = p.C, S = p.S, G = p.G, total = N * C * S;
  if (N * G > kMaxGrid) return cudaErrorInvalidConfiguration;
  // Scratch: the dx table (N, C, 2) float4, the partials (3, N, C, chunks), pdb and pdw (N, C).
  float4* tab = p.dx ? reinterpret_cast<float4*>(p.work) : nullptr;
  float* part = p.work + 8 * N * C;
  float* pdb = p.dbias ? part + 3 * N * C * plan.chunks : nullptr;
  float* pdw = p.dweight ? part + 3 * N * C * plan.chunks + N * C : nullptr;
  const PartialArgs a{p.x,  p.dy, p.weight, p.bias, p.add, p.scale,    p.shift,     p.mean, p.rstd,
                      part, N,    C,        S,      G,     plan.chunk, plan.chunks, p.channels_last};
  cudaError_t err = cudaSuccess;
  VLFAST_GN_WITH_ACT(p.act, { err = launch_partial<T, true, A>(a, stream); })
  if (err != cudaSuccess) return err;
  gn_bwd_group<<<static_cast<unsigned>(N * G), kThreads, 0, stream>>>(p, part, plan.chunks, tab, pdb, pdw);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  if (p.dx) {
    const bool vec = aligned16(p.x) && aligned16(p.dy) && aligned16(p.dx) && total % VV == 0;
    const int64_t grid = std::min<int64_t>(cdiv(cdiv(total, vec ? VV : 1), kThreads), int64_t{dev.sms} * 32);
    VLFAST_GN_WITH_ACT(p.act, {
      if (vec) {
        gn_bwd_dx<T, VV, A><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(p.x, p.dy, p.dx, tab, N, C, S,
                                                                                p.channels_last);
      } else {
        gn_bwd_dx<T, 1, A><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(p.x, p.dy, p.dx, tab, N, C, S,
                                                                               p.channels_last);
      }
    })
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  if (pdb || pdw) {
    gn_bwd_wb<<<static_cast<unsigned>(cdiv(C, kThreads)), kThreads, 0, stream>>>(pdb, pdw, p.dbias, p.dweight, N, C);
    err = cudaGetLastError();
  }
  return err;
}

#undef VLFAST_GN_WITH_ACT

}  // namespace

GnPlan plan_group_norm_fwd(const GroupNormFwdParams& p, GnDtype dtype, GnPath path, const GnDeviceInfo& dev) {
  GnPlan plan{};
  const int64_t es = dtype == GN_F32 ? 4 : 2, vv = vec_width(dtype);
  const int64_t Cg = p.C / p.G, L = Cg * p.S;
  const int64_t smem = cdiv(L * es, 16) * 16 + 3 * 4 * Cg;  // the group, then add, alpha, beta per channel
  const bool fits = L * es <= kOnepassBytes && smem + 1024 <= dev.smem_optin && p.N * p.G <= kMaxGrid;
  const bool wide = p.N * p.G >= dev.sms || L <= kSmallGroup;
  plan.onepass = fits && (path == GN_PATH_ONEPASS || (path == GN_PATH_AUTO && wide));
  if (plan.onepass) {
    plan.smem = smem;
    return plan;
  }
  const bool vec = p.channels_last ? p.C % vv == 0 : p.S % vv == 0;
  plan_chunks(p.N, p.C, p.S, p.channels_last, vec ? vv : 1, dev, plan);
  plan.work_floats = 4 * p.N * p.C + 2 * p.N * p.C * plan.chunks;
  return plan;
}

GnPlan plan_group_norm_bwd(const GroupNormBwdParams& p, GnDtype dtype, const GnDeviceInfo& dev) {
  GnPlan plan{};
  const int64_t vv = vec_width(dtype);
  const bool vec = p.channels_last ? p.C % vv == 0 : p.S % vv == 0;
  plan_chunks(p.N, p.C, p.S, p.channels_last, vec ? vv : 1, dev, plan);
  plan.work_floats = 8 * p.N * p.C + 3 * p.N * p.C * plan.chunks + 2 * p.N * p.C;
  return plan;
}

cudaError_t launch_group_norm_fwd(const GroupNormFwdParams& p, GnDtype dtype, const GnPlan& plan,
                                  const GnDeviceInfo& dev, cudaStream_t stream) {
  if (p.N * p.C * p.S == 0) return cudaSuccess;
  switch (dtype) {
    case GN_F32: return fwd<float>(p, plan, dev, stream);
    case GN_F16: return fwd<__half>(p, plan, dev, stream);
    default: return fwd<__nv_bfloat16>(p, plan, dev, stream);
  }
}

cudaError_t launch_group_norm_bwd(const GroupNormBwdParams& p, GnDtype dtype, const GnPlan& plan,
                                  const GnDeviceInfo& dev, cudaStream_t stream) {
  if (p.N * p.C * p.S == 0) return cudaSuccess;
  switch (dtype) {
    case GN_F32: return bwd<float>(p, plan, dev, stream);
    case GN_F16: return bwd<__half>(p, plan, dev, stream);
    default: return bwd<__nv_bfloat16>(p, plan, dev, stream);
  }
}

}  // namespace vlfast
