// score_mod.cuh — the score transform of a visible key, in base 2 for the online softmax:
//   s2 = log2(e) * softcap(scale * (q.k) + bias)     softcap(x) = c * tanh(x / c) when c > 0
// Bias is clamped to kBiasFloor first, so the dtype minimum ("masked" in user code) stays finite.
#pragma once
#include "params.cuh"

namespace dmattn {

template <bool BIAS, bool SOFTCAP>
struct ScoreMod {
  float scale_log2, cap_log2, scale_over_cap, inv_cap;

  __device__ __forceinline__ explicit ScoreMod(const AttnParams& a)
      : scale_log2(a.scale_log2), cap_log2(a.softcap * kLog2e), scale_over_cap(a.scale / a.softcap),
        inv_cap(1.f / a.softcap) {}

  // x = q.k of the key, bias its bias (ignored without BIAS).
  __device__ __forceinline__ float operator()(float x, float bias) const {
    if constexpr (BIAS) {
      const float b = fmaxf(bias, kBiasFloor);
      return SOFTCAP ? cap_log2 * fast_tanh(fmaf(x, scale_over_cap, b * inv_cap)) : fmaf(x, scale_log2, b * kLog2e);
    } else {
      return SOFTCAP ? cap_log2 * fast_tanh(x * scale_over_cap) : x * scale_log2;
    }
  }
};

}  // namespace dmattn
