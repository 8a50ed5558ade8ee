// Philox4x32-10 + Box-Muller on the CPU, bit-identical integers to vlfast/reference/philox.py.
//
// kLanes counters are run side by side. Philox is written with AVX-512 and AVX2
// intrinsics because GCC vectorises its 32x32->64 bit products with vpmullq
// (3 uops) instead of vpmuludq on even and odd lanes (1 uop each); a portable
// version covers other CPUs. The uniform map and Box-Muller are plain loops
// that GCC vectorises (branch-free, own log and sincos), compiled inside each
// instruction-set version. Which version runs is decided once, at first use.
#include "philox.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define VLFAST_X86 1
#endif

#define VLFAST_INLINE inline __attribute__((always_inline))

namespace vlfast {
namespace {

constexpr int kLanes = kPhiloxStep / 4;  // Philox calls per step
constexpr uint32_t kKeyA = 0x9E3779B9u, kKeyB = 0xBB67AE85u;
constexpr uint32_t kRoundA = 0xD2511F53u, kRoundB = 0xCD9E8D57u;
constexpr int kRounds = 10;

// Key and the counter words shared by all lanes; lane l has counter (q0 + l, n, off_lo, off_hi).
struct Stream {
  uint32_t k0, k1, n, off_lo, off_hi;
};

using Words = uint32_t[4][kLanes];  // the four output words of each lane

template <typename To, typename From>
VLFAST_INLINE To bits(From x) {
  To y;
  std::memcpy(&y, &x, sizeof(y));
  return y;
}

// Natural log for x in [1e-7, 1] (Cephes logf): x = 2^e (1 + f), f in [sqrt(1/2) - 1, sqrt(2) - 1).
VLFAST_INLINE float log_unit(float x) {
  const int32_t ix = bits<int32_t>(x) + (0x3f800000 - 0x3f3504f3);
  const float e = static_cast<float>((ix >> 23) - 127);
  const float f = bits<float>((ix & 0x007fffff) + 0x3f3504f3) - 1.0f;
  const float z = f * f;
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z - 2.12194440e-4f * e - 0.5f * z;
  return f + y + 0.693359375f * e;
}

// cos and sin of 2 pi u for u in [0, 1]: whole quarter turns q, then Cephes
// polynomials on the exact remainder, an angle in [-pi/4, pi/4].
VLFAST_INLINE void sincos_turn(float u, float& c, float& s) {
  const float t = 4.0f * u;
  const int32_t q = static_cast<int32_t>(t + 0.5f);
  const float a = (t - static_cast<float>(q)) * 1.57079632679489662f;
  const float a2 = a * a;
  const float sa = ((-1.9515295891e-4f * a2 + 8.3321608736e-3f) * a2 - 1.6666654611e-1f) * a2 * a + a;
  const float ca = ((2.443315711809948e-5f * a2 - 1.388731625493765e-3f) * a2 + 4.166664568298827e-2f) * a2 * a2 -
                   0.5f * a2 + 1.0f;
  // Rotate by q quarter turns: (c, s) -> (-s, c) for odd q, then negate both for q & 2.
  // Done on the bit patterns: GCC would not if-convert the float selects.
  const uint32_t odd = 0u - static_cast<uint32_t>(q & 1);
  const uint32_t flip = static_cast<uint32_t>(q & 2) << 30;
  const uint32_t cb = bits<uint32_t>(ca), sb = bits<uint32_t>(sa);
  c = bits<float>((((sb ^ 0x80000000u) & odd) | (cb & ~odd)) ^ flip);
  s = bits<float>(((cb & odd) | (sb & ~odd)) ^ flip);
}

// uint32 word -> float in [0, 1], as Triton's uint_to_uniform_float.
VLFAST_INLINE float uniform(uint32_t w) {
  const int32_t i = static_cast<int32_t>(w);
  return static_cast<float>(i ^ (i >> 31)) * 4.6566127342e-10f;
}

// max(uniform(w), 1e-7) as an integer max of the (non-negative) float bit
// patterns: on a float compare GCC splits the loop, which stops vectorisation.
VLFAST_INLINE float uniform_min(uint32_t w) {
  return bits<float>(std::max(bits<uint32_t>(uniform(w)), bits<uint32_t>(1e-7f)));
}

// z[4 l + j] (kPhiloxStep floats): Box-Muller on the word pairs (0, 1) and (2, 3) of lane l.
VLFAST_INLINE void box_muller(const Words& w, float* __restrict__ z) {
  for (int l = 0; l < kLanes; ++l) {
    const float r01 = std::sqrt(-2.0f * log_unit(uniform_min(w[0][l])));
    const float r23 = std::sqrt(-2.0f * log_unit(uniform_min(w[2][l])));
    float cos1, sin1, cos3, sin3;
    sincos_turn(uniform(w[1][l]), cos1, sin1);
    sincos_turn(uniform(w[3][l]), cos3, sin3);
    z[4 * l + 0] = r01 * cos1;
    z[4 * l + 1] = r01 * sin1;
    z[4 * l + 2] = r23 * cos3;
    z[4 * l + 3] = r23 * sin3;
  }
}

// Portable Philox4x32-10 on kLanes counters.
VLFAST_INLINE void philox_portable(const Stream& s, uint32_t q0, Words& w) {
  for (int l = 0; l < kLanes; ++l) {
    uint32_t c0 = q0 + l, c1 = s.n, c2 = s.off_lo, c3 = s.off_hi, a = s.k0, b = s.k1;
#pragma GCC unroll 10
    for (int round = 0; round < kRounds; ++round) {
      const uint64_t pb = static_cast<uint64_t>(kRoundB) * c2;
      const uint64_t pa = static_cast<uint64_t>(kRoundA) * c0;
      c0 = static_cast<uint32_t>(pb >> 32) ^ c1 ^ a;
      c1 = static_cast<uint32_t>(pb);
      c2 = static_cast<uint32_t>(pa >> 32) ^ c3 ^ b;
      c3 = static_cast<uint32_t>(pa);
      a += kKeyA;
      b += kKeyB;
    }
    w[0][l] = c0, w[1][l] = c1, w[2][l] = c2, w[3][l] = c3;
  }
}

void normals_portable(const Stream& s, int64_t r0, int64_t count, float* z) {
  for (int64_t i = 0; i < count; i += kPhiloxStep) {
    Words w;
    philox_portable(s, static_cast<uint32_t>((r0 + i) / 4), w);
    box_muller(w, z + i);
  }
}

#ifdef VLFAST_X86
// 2026-11: GCC 12 warns -Wmaybe-uninitialized inside its own avx512fintrin.h
// (the deliberately undefined source of _mm512_mul_epu32 and friends).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define VLFAST_AVX512 __attribute__((target("avx512f,avx2,fma")))
#define VLFAST_AVX2 __attribute__((target("avx2,fma")))

// hi and lo words of k * x in each 32-bit lane, from the 64-bit products of the even and the odd lanes
// (merge-masked shuffles put each word in place: one uop each).
VLFAST_AVX512 VLFAST_INLINE void mulhilo(__m512i k, __m512i x, __m512i& hi, __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(x, k), odd = _mm512_mul_epu32(_mm512_srli_epi64(x, 32), k);
  hi = _mm512_mask_shuffle_epi32(odd, 0x5555, even, _MM_PERM_DDBB);
  lo = _mm512_mask_shuffle_epi32(even, 0xAAAA, odd, _MM_PERM_CCAA);
}

VLFAST_AVX2 VLFAST_INLINE void mulhilo(__m256i k, __m256i x, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(x, k), odd = _mm256_mul_epu32(_mm256_srli_epi64(x, 32), k);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

VLFAST_AVX512 void normals_avx512(const Stream& s, int64_t r0, int64_t count, float* z) {
  constexpr int V = kLanes / 16;
  const __m512i ka = _mm512_set1_epi32(kRoundA), kb = _mm512_set1_epi32(kRoundB);
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t i = 0; i < count; i += kPhiloxStep) {
    const uint32_t q0 = static_cast<uint32_t>((r0 + i) / 4);
    __m512i c0[V], c1[V], c2[V], c3[V];
    for (int v = 0; v < V; ++v) {
      c0[v] = _mm512_add_epi32(_mm512_set1_epi32(q0 + 16 * v), lane);
      c1[v] = _mm512_set1_epi32(s.n), c2[v] = _mm512_set1_epi32(s.off_lo), c3[v] = _mm512_set1_epi32(s.off_hi);
    }
    for (int round = 0; round < kRounds; ++round) {
      const __m512i a = _mm512_set1_epi32(s.k0 + round * kKeyA), b = _mm512_set1_epi32(s.k1 + round * kKeyB);
      for (int v = 0; v < V; ++v) {
        __m512i hi_b, lo_b, hi_a, lo_a;
        mulhilo(kb, c2[v], hi_b, lo_b);
        mulhilo(ka, c0[v], hi_a, lo_a);
        c0[v] = _mm512_xor_si512(_mm512_xor_si512(hi_b, c1[v]), a), c1[v] = lo_b;
        c2[v] = _mm512_xor_si512(_mm512_xor_si512(hi_a, c3[v]), b), c3[v] = lo_a;
      }
    }
    alignas(64) Words w;
    for (int v = 0; v < V; ++v) {
      _mm512_store_si512(&w[0][16 * v], c0[v]), _mm512_store_si512(&w[1][16 * v], c1[v]);
      _mm512_store_si512(&w[2][16 * v], c2[v]), _mm512_store_si512(&w[3][16 * v], c3[v]);
    }
    box_muller(w, z + i);
  }
}

VLFAST_AVX2 void normals_avx2(const Stream& s, int64_t r0, int64_t count, float* z) {
  constexpr int V = kLanes / 8;
  const __m256i ka = _mm256_set1_epi32(kRoundA), kb = _mm256_set1_epi32(kRoundB);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t i = 0; i < count; i += kPhiloxStep) {
    const uint32_t q0 = static_cast<uint32_t>((r0 + i) / 4);
    __m256i c0[V], c1[V], c2[V], c3[V];
    for (int v = 0; v < V; ++v) {
      c0[v] = _mm256_add_epi32(_mm256_set1_epi32(q0 + 8 * v), lane);
      c1[v] = _mm256_set1_epi32(s.n), c2[v] = _mm256_set1_epi32(s.off_lo), c3[v] = _mm256_set1_epi32(s.off_hi);
    }
    for (int round = 0; round < kRounds; ++round) {
      const __m256i a = _mm256_set1_epi32(s.k0 + round * kKeyA), b = _mm256_set1_epi32(s.k1 + round * kKeyB);
      for (int v = 0; v < V; ++v) {
        __m256i hi_b, lo_b, hi_a, lo_a;
        mulhilo(kb, c2[v], hi_b, lo_b);
        mulhilo(ka, c0[v], hi_a, lo_a);
        c0[v] = _mm256_xor_si256(_mm256_xor_si256(hi_b, c1[v]), a), c1[v] = lo_b;
        c2[v] = _mm256_xor_si256(_mm256_xor_si256(hi_a, c3[v]), b), c3[v] = lo_a;
      }
    }
    alignas(32) Words w;
    for (int v = 0; v < V; ++v) {
      _mm256_store_si256(reinterpret_cast<__m256i*>(&w[0][8 * v]), c0[v]);
      _mm256_store_si256(reinterpret_cast<__m256i*>(&w[1][8 * v]), c1[v]);
      _mm256_store_si256(reinterpret_cast<__m256i*>(&w[2][8 * v]), c2[v]);
      _mm256_store_si256(reinterpret_cast<__m256i*>(&w[3][8 * v]), c3[v]);
    }
    box_muller(w, z + i);
  }
}
#endif

using NormalsFn = void (*)(const Stream&, int64_t, int64_t, float*);

NormalsFn pick_normals() {
#ifdef VLFAST_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma")) return normals_avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return normals_avx2;
#endif
  return normals_portable;
}

}  // namespace

void philox_normals(uint64_t seed, uint64_t offset, uint32_t n, int64_t r0, int64_t count, float* z) {
  static const NormalsFn impl = pick_normals();
  const Stream s{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32), n, static_cast<uint32_t>(offset),
                 static_cast<uint32_t>(offset >> 32)};
  impl(s, r0, count, z);
}

}  // namespace vlfast
