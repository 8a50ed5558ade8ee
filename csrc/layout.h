// Memory-layout tests shared by the C++ glue of the ops (CPU and CUDA).
#pragma once

#include <cstdint>
#include <vector>

#include <ATen/core/Tensor.h>

namespace vlfast {

// Whether the (N, *, C) permutation of x is contiguous: channels_last / channels_last_3d and their
// analogues at other ranks.
inline bool is_channels_last(const at::Tensor& x) {
  std::vector<int64_t> perm{0};
  for (int64_t d = 2; d < x.dim(); ++d) perm.push_back(d);
  perm.push_back(1);
  return x.permute(perm).is_contiguous();
}

}  // namespace vlfast
