// run_tasks of the CPU GroupNorm forward for c10::Half input (see group_norm.h), in a file of its own
// so that the dtypes compile in parallel.
#include "group_norm.h"

namespace vlfast {
namespace gn_cpu {

VLFAST_ISA_CLONES void run_tasks(const Job<c10::Half>& j, int phase, bool cl, int64_t begin, int64_t end) {
  run_range(j, phase, cl, begin, end);
}

}  // namespace gn_cpu
}  // namespace vlfast
