// The schemas of every vlfast C++ op, and the Python module that loads them.
//
// `import vlfast._C` loads this shared library; its static initialisers register
// the schemas below and the CPU / CUDA kernels (csrc/cpu, csrc/cuda) with the
// dispatcher, reachable as torch.ops.vlfast.<name>. The module itself is empty
// apart from WITH_CUDA.
#include <Python.h>

#include <atomic>
#include <cstdint>

#include <torch/library.h>

namespace vlfast {

bool has_cuda() {
#ifdef VLFAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}

namespace {
// The CUDA GroupNorm forward's path: 0 auto (chosen from the shape), 1 one-pass, 2 split. A test knob,
// set through vlfast.ops._overrides; kept here, where every build has it, and read by
// csrc/cuda/group_norm_glue.cpp on each forward call.
std::atomic<int64_t> gn_cuda_path{0};
// The CPU GroupNorm forward's cache budget in bytes (-1: automatic, half the per-core L2): fused tasks whose
// slab of x fits it read x once from memory (csrc/cpu/group_norm.h). A test and probe knob, as above.
std::atomic<int64_t> gn_cpu_cache{-1};
// The CPU GroupNorm forward's output stores (-1: automatic, 0: cached, 1: streaming, past the caches).
std::atomic<int64_t> gn_cpu_stream{-1};
}  // namespace

void group_norm_set_cuda_path(int64_t path) {
  TORCH_CHECK(path >= 0 && path <= 2,
              "group_norm_set_cuda_path: path must be 0 (auto), 1 (onepass) or 2 (split), got ", path);
  gn_cuda_path.store(path, std::memory_order_relaxed);
}

int64_t group_norm_cuda_path() { return gn_cuda_path.load(std::memory_order_relaxed); }

void group_norm_set_cpu_cache(int64_t bytes) {
  TORCH_CHECK(bytes >= -1, "group_norm_set_cpu_cache: bytes must be -1 (automatic) or >= 0, got ", bytes);
  gn_cpu_cache.store(bytes, std::memory_order_relaxed);
}

int64_t group_norm_cpu_cache() { return gn_cpu_cache.load(std::memory_order_relaxed); }

void group_norm_set_cpu_stream(int64_t mode) {
  TORCH_CHECK(mode >= -1 && mode <= 1,
              "group_norm_set_cpu_stream: mode must be -1 (automatic), 0 (cached) or 1 (streaming), got ", mode);
  gn_cpu_stream.store(mode, std::memory_order_relaxed);
}

int64_t group_norm_cpu_stream() { return gn_cpu_stream.load(std::memory_order_relaxed); }

}  // namespace vlfast

// The Python side adds its own ops (vlfast::ddpm_step, ...) to this namespace
// with torch.library.custom_op, which registers fragments: they coexist with
// the one TORCH_LIBRARY block below, in either import order.
TORCH_LIBRARY(vlfast, m) {
  // One fused DDPM/DDIM update: see vlfast/reference/ddpm.py (fused_step).
  // Returns (prev, x0, noise); x0 and noise are empty (0,) tensors unless asked for.
  m.def(
      "ddpm_step_kernel(Tensor sample, Tensor? model_output, Tensor? variance, Tensor? noise, "
      "Tensor coef, Tensor? timesteps, int timestep, Tensor? thresh, float clip, int var_mode, "
      "bool draw_noise, int seed, int offset, Tensor(a!)? rng_state, bool write_x0, "
      "bool write_noise) -> (Tensor, Tensor, Tensor)");
  // The same, writing prev into `out` (sample's sizes and dtype, its strides in dims 1..; out may be sample,
  // model_output, variance or noise itself, but share no other memory with them). Returns (x0, noise). CPU only.
  m.def(
      "ddpm_step_out_kernel(Tensor sample, Tensor? model_output, Tensor? variance, Tensor? noise, "
      "Tensor coef, Tensor? timesteps, int timestep, Tensor? thresh, float clip, int var_mode, "
      "bool draw_noise, int seed, int offset, Tensor(a!)? rng_state, bool write_x0, "
      "bool write_noise, Tensor(b!) out) -> (Tensor, Tensor)");
  // GroupNorm + time-embedding add + scale-shift + activation, forward: see
  // vlfast/reference/group_norm.py. activation: 0 none, 1 silu, 2 relu, 3 gelu (erf).
  // Returns (out, mean, rstd): out with input's dtype and strides (NCHW-contiguous
  // or channels-last input), mean and rstd (N, num_groups) in fp32 (fp64 for fp64 input).
  m.def(
      "group_norm_fwd_kernel(Tensor input, int num_groups, Tensor? weight, Tensor? bias, float eps, "
      "Tensor? add, Tensor? scale, Tensor? shift, int activation) -> (Tensor, Tensor, Tensor)");
  // The same, writing into `out` (input's dtype, sizes and strides; out may be input itself, but share no
  // other memory with the inputs). Returns (mean, rstd). CPU only.
  m.def(
      "group_norm_fwd_out_kernel(Tensor input, int num_groups, Tensor? weight, Tensor? bias, float eps, "
      "Tensor? add, Tensor? scale, Tensor? shift, int activation, Tensor(a!) out) -> (Tensor, Tensor)");
  // Its backward (CUDA only): the gradients of (input, weight, bias, add, scale, shift), as
  // group_norm_backward in vlfast/reference/group_norm.py, from the forward's mean and rstd.
  // Each in its input's dtype and shape (input's strides for the first); an empty (0,) tensor
  // where needs[i] is false or the input is absent.
  m.def(
      "group_norm_bwd_kernel(Tensor grad_out, Tensor input, int num_groups, Tensor? weight, Tensor? bias, "
      "Tensor? add, Tensor? scale, Tensor? shift, int activation, Tensor mean, Tensor rstd, "
      "bool[] needs) -> Tensor[]");
  // Whether this build has the CUDA kernels (False: built without CUDA).
  m.def("has_cuda() -> bool", &vlfast::has_cuda);
  // Force the path of the CUDA group_norm_fwd_kernel (0 auto, 1 one-pass, 2 split), process-wide, for
  // tests and probes (vlfast.ops._overrides, knob group_norm_cuda_path); and read it back. A one-pass
  // that cannot hold the group runs the split path.
  m.def("group_norm_set_cuda_path(int path) -> ()", &vlfast::group_norm_set_cuda_path);
  m.def("group_norm_cuda_path() -> int", &vlfast::group_norm_cuda_path);
  // The CPU GroupNorm forward's cache budget in bytes (-1: automatic), process-wide, for tests and probes
  // (vlfast.ops._overrides, knob group_norm_cpu_cache); and read it back.
  m.def("group_norm_set_cpu_cache(int bytes) -> ()", &vlfast::group_norm_set_cpu_cache);
  m.def("group_norm_cpu_cache() -> int", &vlfast::group_norm_cpu_cache);
  // The CPU GroupNorm forward's output stores (-1 automatic, 0 cached, 1 streaming), as above.
  m.def("group_norm_set_cpu_stream(int mode) -> ()", &vlfast::group_norm_set_cpu_stream);
  m.def("group_norm_cpu_stream() -> int", &vlfast::group_norm_cpu_stream);
}

extern "C" {
// An empty module: the ops live in torch.ops.vlfast.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",     // name
      nullptr,  // documentation
      -1,       // per-interpreter state: none
      nullptr,  // methods
      nullptr,  // slots
      nullptr,  // traverse
      nullptr,  // clear
      nullptr,  // free
  };
  PyObject* module = PyModule_Create(&module_def);
  PyObject* with_cuda = vlfast::has_cuda() ? Py_True : Py_False;
  if (module != nullptr && PyModule_AddObjectRef(module, "WITH_CUDA", with_cuda) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
}
