// Torch glue of the CUDA GroupNorm kernels (csrc/cuda/group_norm.cu), named apart from them because
// torch builds group_norm.cu and group_norm.cpp alike into group_norm.o: vlfast::group_norm_fwd_kernel
// and vlfast::group_norm_bwd_kernel on CUDA tensors. Checks, allocation, the current stream, the
// launches and their error check.
//
// vlfast::group_norm_set_cuda_path (csrc/ops.cpp; from Python, the knob group_norm_cuda_path of
// vlfast.ops._overrides) forces the forward path, for tests; a one-pass that cannot hold the group runs
// the split path.
#include <cstdint>
#include <limits>
#include <mutex>
#include <optional>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../layout.h"
#include "group_norm.h"

namespace vlfast {

// The forced forward path, 0 auto, 1 one-pass, 2 split: defined in csrc/ops.cpp.
int64_t group_norm_cuda_path();

namespace {

constexpr int64_t kActivations = 4;  // 0 none, 1 silu, 2 relu, 3 gelu

struct Shape {
  GnDtype dtype;
  bool cl;  // channels-last (else NCHW-contiguous)
  int64_t N, C, S, G;
};

Shape check_input(const at::Tensor& input, int64_t num_groups, int64_t activation) {
  TORCH_CHECK(input.dim() >= 2, "group_norm: input must have shape (N, C, *), got ", input.sizes());
  const auto dtype = input.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "group_norm: the CUDA kernel takes float32, float16 or bfloat16 input, got ", dtype);
  const int64_t N = input.size(0), C = input.size(1);
  TORCH_CHECK(num_groups > 0 && C % num_groups == 0, "group_norm: num_groups (", num_groups,
              ") must be positive and divide the number of channels (", C, ")");
  TORCH_CHECK(activation >= 0 && activation < kActivations,
              "group_norm: activation must be 0 (none), 1 (silu), 2 (relu) or 3 (gelu), got ", activation);
  const bool contiguous = input.is_contiguous();
  const bool cl = !contiguous && is_channels_last(input);
  TORCH_CHECK(contiguous || cl, "group_norm: input must be contiguous or channels-last, got strides ",
              input.strides());
  const GnDtype gd = dtype == at::kFloat ? GN_F32 : dtype == at::kHalf ? GN_F16 : GN_BF16;
  return {gd, cl, N, C, N * C != 0 ? input.numel() / (N * C) : 0, num_groups};
}

// An optional (shape) parameter, contiguous, after checking it; undefined when absent. float32, float16 and
// bfloat16 stay as they are (the kernels read them as GnVec: no conversion launch); other float dtypes
// (float64) become float32. `as_float` converts to float32 whatever the dtype (mean, rstd).
at::Tensor param(const std::optional<at::Tensor>& t, const char* name, at::IntArrayRef shape,
                 const at::Tensor& input, bool as_float = false) {
  if (!t.has_value()) return at::Tensor();
  TORCH_CHECK(t->device() == input.device(), "group_norm: ", name, " must be on ", input.device(), ", got ",
              t->device());
  TORCH_CHECK(at::isFloatingType(t->scalar_type()), "group_norm: ", name, " must be a floating tensor, got ",
              t->scalar_type());
  TORCH_CHECK(t->sizes() == shape, "group_norm: ", name, " must have shape ", shape, ", got ", t->sizes());
  const auto dt = t->scalar_type();
  const bool kept = !as_float && (dt == at::kHalf || dt == at::kBFloat16);
  return t->to(kept ? dt : at::kFloat).contiguous();
}

GnVec vec(const at::Tensor& t) {
  if (!t.defined()) return {nullptr, GN_F32};
  const auto dt = t.scalar_type();
  return {t.const_data_ptr(), dt == at::kHalf ? GN_F16 : dt == at::kBFloat16 ? GN_BF16 : GN_F32};
}

const float* ptr(const at::Tensor& t) { return t.defined() ? t.const_data_ptr<float>() : nullptr; }
float* mut(const at::Tensor& t) { return t.defined() ? t.mutable_data_ptr<float>() : nullptr; }

// Multiprocessors and opt-in shared memory per block, queried once per device.
GnDeviceInfo device_info(c10::DeviceIndex index) {
  const auto query = [](int device) {
    int sms = 0, smem = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    return GnDeviceInfo{sms, smem};
  };
  constexpr int kDevices = 64;
  static std::once_flag once[kDevices];
  static GnDeviceInfo info[kDevices];
  if (index < 0 || index >= kDevices) return query(index);
  std::call_once(once[index], [&] { info[index] = query(index); });
  return info[index];
}

GnPath forward_path() {
  switch (group_norm_cuda_path()) {
    case 1: return GN_PATH_ONEPASS;
    case 2: return GN_PATH_SPLIT;
    default: return GN_PATH_AUTO;
  }
}

cudaStream_t current_stream(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_fwd_cuda(
    const at::Tensor& input, int64_t num_groups, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, const std::optional<at::Tensor>& add,
    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift, int64_t activation) {
  const Shape sh = check_input(input, num_groups, activation);
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor w = param(weight, "weight", {sh.C}, input), b = param(bias, "bias", {sh.C}, input);
  const at::Tensor a = param(add, "add", {sh.N, sh.C}, input), sc = param(scale, "scale", {sh.N, sh.C}, input);
  const at::Tensor sf = param(shift, "shift", {sh.N, sh.C}, input);
  at::Tensor out = at::empty_like(input);  // dense input: empty_like keeps its strides
  at::Tensor mean = at::empty({sh.N, sh.G}, input.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({sh.N, sh.G}, input.options().dtype(at::kFloat));
  if (sh.N == 0) return {out, mean, rstd};
  if (input.numel() == 0) {  // groups of no element: NaN statistics, as the CPU kernel gives
    mean.fill_(std::numeric_limits<float>::quiet_NaN());
    rstd.fill_(std::numeric_limits<float>::quiet_NaN());
    return {out, mean, rstd};
  }

  GroupNormFwdParams p{};
  p.x = input.const_data_ptr();
  p.out = out.mutable_data_ptr();
  p.weight = vec(w);
  p.bias = vec(b);
  p.add = vec(a);
  p.scale = vec(sc);
  p.shift = vec(sf);
  p.mean = mean.mutable_data_ptr<float>();
  p.rstd = rstd.mutable_data_ptr<float>();
  p.N = sh.N;
  p.C = sh.C;
  p.S = sh.S;
  p.G = sh.G;
  p.eps = static_cast<float>(eps);
  p.act = static_cast<int>(activation);
  p.channels_last = sh.cl;
  const GnDeviceInfo dev = device_info(input.device().index());
  const GnPlan plan = plan_group_norm_fwd(p, sh.dtype, forward_path(), dev);
  at::Tensor work;
  if (plan.work_floats > 0) {
    work = at::empty({plan.work_floats}, input.options().dtype(at::kFloat));
    p.work = work.mutable_data_ptr<float>();
  }
  C10_CUDA_CHECK(launch_group_norm_fwd(p, sh.dtype, plan, dev, current_stream(input)));
  return {out, mean, rstd};
}

std::vector<at::Tensor> group_norm_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& input, int64_t num_groups, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& add,
    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift, int64_t activation,
    const at::Tensor& mean, const at::Tensor& rstd, const c10::List<bool>& needs) {
  const Shape sh = check_input(input, num_groups, activation);
  TORCH_CHECK(grad_out.sizes() == input.sizes(), "group_norm: grad_out must have the input's shape ",
              input.sizes(), ", got ", grad_out.sizes());
  TORCH_CHECK(grad_out.device() == input.device(), "group_norm: grad_out must be on ", input.device(), ", got ",
              grad_out.device());
  TORCH_CHECK(needs.size() == 6, "group_norm: needs must have 6 entries, got ", needs.size());
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor w = param(weight, "weight", {sh.C}, input), b = param(bias, "bias", {sh.C}, input);
  const at::Tensor a = param(add, "add", {sh.N, sh.C}, input), sc = param(scale, "scale", {sh.N, sh.C}, input);
  const at::Tensor sf = param(shift, "shift", {sh.N, sh.C}, input);
  const at::Tensor m = param(mean, "mean", {sh.N, sh.G}, input, true);
  const at::Tensor r = param(rstd, "rstd", {sh.N, sh.G}, input, true);

  const bool need_dx = needs.get(0), need_dw = needs.get(1) && w.defined(), need_db = needs.get(2) && b.defined();
  const bool need_dadd = needs.get(3) && a.defined(), need_dscale = needs.get(4) && sc.defined();
  const bool need_dshift = needs.get(5) && sf.defined();
  // Outputs of a custom op may not alias each other: every unwritten one is its own empty tensor.
  const auto none = [&] { return at::empty({0}, input.options()); };
  const auto f32 = input.options().dtype(at::kFloat);
  at::Tensor dx = need_dx ? at::empty_like(input) : none();
  at::Tensor dw = need_dw ? at::empty({sh.C}, f32) : at::Tensor(), db = need_db ? at::empty({sh.C}, f32) : at::Tensor();
  at::Tensor dadd = need_dadd ? at::empty({sh.N, sh.C}, f32) : at::Tensor();
  at::Tensor dscale = need_dscale ? at::empty({sh.N, sh.C}, f32) : at::Tensor();
  at::Tensor dshift = need_dshift ? at::empty({sh.N, sh.C}, f32) : at::Tensor();

  if (input.numel() == 0) {  // sums over nothing
    for (at::Tensor* t : {&dw, &db, &dadd, &dscale, &dshift}) {
      if (t->defined()) t->zero_();
    }
  } else if (need_dx || need_dw || need_db || need_dadd || need_dscale || need_dshift) {
    // grad_out in the input's dtype and strides.
    at::Tensor dy = grad_out;
    if (dy.scalar_type() != input.scalar_type() || dy.strides() != input.strides()) {
      dy = at::empty_like(input);
      dy.copy_(grad_out);
    }
    GroupNormBwdParams p{};
    p.dy = dy.const_data_ptr();
    p.x = input.const_data_ptr();
    p.dx = need_dx ? dx.mutable_data_ptr() : nullptr;
    p.weight = vec(w);
    p.bias = vec(b);
    p.add = vec(a);
    p.scale = vec(sc);
    p.shift = vec(sf);
    p.mean = ptr(m);
    p.rstd = ptr(r);
    p.dweight = mut(dw);
    p.dbias = mut(db);
    p.dadd = mut(dadd);
    p.dscale = mut(dscale);
    p.dshift = mut(dshift);
    p.N = sh.N;
    p.C = sh.C;
    p.S = sh.S;
    p.G = sh.G;
    p.act = static_cast<int>(activation);
    p.channels_last = sh.cl;
    const GnDeviceInfo dev = device_info(input.device().index());
    const GnPlan plan = plan_group_norm_bwd(p, sh.dtype, dev);
    const at::Tensor work = at::empty({plan.work_floats}, f32);
    p.work = work.mutable_data_ptr<float>();
    C10_CUDA_CHECK(launch_group_norm_bwd(p, sh.dtype, plan, dev, current_stream(input)));
  }
  // In the parameters' dtypes.
  const auto as = [&](const at::Tensor& g, const std::optional<at::Tensor>& t) {
    return g.defined() ? g.to(t->scalar_type()) : none();
  };
  return {dx, as(dw, weight), as(db, bias), as(dadd, add), as(dscale, scale), as(dshift, shift)};
}

}  // namespace

TORCH_LIBRARY_IMPL(vlfast, CUDA, m) {
  m.impl("group_norm_fwd_kernel", &group_norm_fwd_cuda);
  m.impl("group_norm_bwd_kernel", &group_norm_bwd_cuda);
}

}  // namespace vlfast
