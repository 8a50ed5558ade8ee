// Philox Gaussian noise on the CPU: the stream of vlfast/reference/philox.py.
#pragma once

#include <cstdint>

namespace vlfast {

// Normals per Philox step of philox_normals: `count` is rounded up to a multiple of this.
constexpr int64_t kPhiloxStep = 128;

// z[i] for i in [0, count) = the normal at element r0 + i of sample n, drawn with
// (seed, offset): lane (r0 + i) % 4 of Philox4x32-10(key (seed lo, seed hi),
// counter ((r0 + i) / 4, n, offset lo, offset hi)), then Box-Muller.
// r0 % 4 == 0; z must hold count rounded up to a multiple of kPhiloxStep.
// Runs the AVX-512 or AVX2 version where the CPU has it.
void philox_normals(uint64_t seed, uint64_t offset, uint32_t n, int64_t r0, int64_t count, float* z);

}  // namespace vlfast
