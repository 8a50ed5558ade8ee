// CUDA kernels of vlfast::group_norm_fwd_kernel and vlfast::group_norm_bwd_kernel, torch-free:
// plain pointers, sizes, a stream. The torch glue is csrc/cuda/group_norm_glue.cpp; the spec is
// vlfast/reference/group_norm.py (forward and the written-out group_norm_backward).
//
// Element (n, c, s) of x, out, dy and dx sits at (n * C + c) * S + s (NCHW) or at
// (n * S + s) * C + c (channels-last). The per-channel operands are contiguous: weight, bias (C,)
// and add, scale, shift (N, C) in their own float dtypes (read as GnVec, so that a bf16 model's
// parameters need no conversion launch); mean, rstd (N, G) float32.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace vlfast {

enum GnDtype : int { GN_F32 = 0, GN_F16 = 1, GN_BF16 = 2 };
// Which forward path: chosen from the shape, or forced (a forced one-pass whose group does not
// fit in shared memory runs the split path).
enum GnPath : int { GN_PATH_AUTO = 0, GN_PATH_ONEPASS = 1, GN_PATH_SPLIT = 2 };

// A contiguous per-channel operand in its own dtype; ptr null when the operand is absent.
struct GnVec {
  const void* ptr;
  GnDtype dtype;
};

struct GnDeviceInfo {
  int sms;             // multiprocessors
  int64_t smem_optin;  // shared memory a block may opt in to (bytes)
};

struct GroupNormFwdParams {
  const void* x;  // (N, C, S) dtype
  void* out;      // (N, C, S) dtype, x's layout
  GnVec weight;         // (C,) or absent (ones)
  GnVec bias;           // (C,) or absent (zeros)
  GnVec add;            // (N, C) or absent: added to x before the statistics
  GnVec scale;          // (N, C) or absent: y * (1 + scale)
  GnVec shift;          // (N, C) or absent
  float* mean;          // (N, G) out
  float* rstd;          // (N, G) out: 1 / sqrt(var + eps)
  float* work;          // plan.work_floats float32 of scratch (split path), or null
  int64_t N, C, S, G;   // N * C * S > 0
  float eps;
  int act;              // 0 none, 1 silu, 2 relu, 3 gelu (erf)
  bool channels_last;
};

struct GroupNormBwdParams {
  const void* dy;  // (N, C, S) dtype, x's layout: grad of out
  const void* x;   // (N, C, S) dtype
  void* dx;        // (N, C, S) dtype, x's layout, or null (not needed)
  GnVec weight, bias, add, scale, shift;
  const float* mean;  // (N, G) from the forward
  const float* rstd;  // (N, G) from the forward
  float* dweight;     // (C,) or null (not needed)
  float* dbias;       // (C,) or null
  float* dadd;        // (N, C) or null
  float* dscale;      // (N, C) or null
  float* dshift;      // (N, C) or null
  float* work;        // plan.work_floats float32 of scratch
  int64_t N, C, S, G;  // N * C * S > 0
  int act;
  bool channels_last;
};

// How a call runs, and the float32 scratch it needs.
struct GnPlan {
  bool onepass;        // forward: one block per group, the group held in shared memory
  int64_t smem;        // one-pass: dynamic shared memory (bytes)
  int64_t chunk;       // split: spatial positions per partial sum
  int64_t chunks;      // split: partial sums per (n, c): ceil(S / chunk)
  int64_t work_floats;
};

GnPlan plan_group_norm_fwd(const GroupNormFwdParams& p, GnDtype dtype, GnPath path, const GnDeviceInfo& dev);
GnPlan plan_group_norm_bwd(const GroupNormBwdParams& p, GnDtype dtype, const GnDeviceInfo& dev);

// Launch on `stream` with p.work holding plan.work_floats floats; return the first launch error.
cudaError_t launch_group_norm_fwd(const GroupNormFwdParams& p, GnDtype dtype, const GnPlan& plan,
                                  const GnDeviceInfo& dev, cudaStream_t stream);
cudaError_t launch_group_norm_bwd(const GroupNormBwdParams& p, GnDtype dtype, const GnPlan& plan,
                                  const GnDeviceInfo& dev, cudaStream_t stream);

}  // namespace vlfast
