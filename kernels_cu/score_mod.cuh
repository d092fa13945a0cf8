// score_mod.cuh — the score transform of a visible key, in "score units" that the softmax turns into
// base 2 with one multiply folded into its exponent (s2 = unit * s, see softmax.cuh):
//   no bias, no softcap   s = q.k                               unit = scale * log2(e)
//   bias                  s = scale * (q.k) + bias              unit = log2(e)
//   softcap               s = tanh((scale * (q.k) + bias) / c)  unit = c * log2(e)
// so the common tiles pay nothing (no bias) or one FMA (bias) per score before the row maximum.
// Bias arrives already raised to kBiasFloor (types.cuh), so unit * s stays finite.
#pragma once
#include "params.cuh"

namespace dmattn {

template <bool BIAS, bool SOFTCAP>
struct ScoreMod {
  float scale, scale_over_cap, inv_cap, unit;

  __device__ __forceinline__ explicit ScoreMod(const AttnParams& a)
      : scale(a.scale), scale_over_cap(a.scale / a.softcap), inv_cap(1.f / a.softcap),
        unit(SOFTCAP ? a.softcap * kLog2e : BIAS ? kLog2e : a.scale_log2) {}

  // x = q.k of the key, bias its bias (ignored without BIAS).
  __device__ __forceinline__ float operator()(float x, float bias) const {
    if constexpr (SOFTCAP) return fast_tanh(BIAS ? fmaf(x, scale_over_cap, bias * inv_cap) : x * scale_over_cap);
    if constexpr (BIAS) return fmaf(x, scale, bias);
    return x;
  }
};

}  // namespace dmattn
