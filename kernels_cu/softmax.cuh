// softmax.cuh — online softmax over the key tiles of a warp's rows, in base 2, safe at -inf.
//
// Scores arrive in score units s (score_mod.cuh; hidden keys -inf) with s2 = unit * s in base 2, so
// the running maximum is taken over s and the multiply rides in each exponent's FMA. For each row:
//   m_new = max(m, max_j s_j)             running maximum (stays -inf while every key is hidden)
//   alpha = 2^(unit (m - m_new))          rescales what was summed so far
//   p_j   = 2^(unit s_j - unit m_new)     (m_new = -inf is replaced by 0: all p_j = 0, not NaN)
//   l     = l * alpha + sum_j p_j ;  O = O * alpha + P V
// Finally O / l, and lse = unit m ln 2 + ln l; a row with l = 0 saw no key: O = 0, lse = -inf.
// The exponent is one FMA, unit s_j - m', with m' = unit m rounded, and alpha = 2^(m'_old - m'):
// every term of a row shares the rounding error e of its final m' (alpha carries the earlier ones
// over), which cancels in O / l and shifts lse by e ln 2 (|e| <= ulp(m') / 2: 2^-12 for |m'| < 4096).
// A huge m' is only reached through the bias floor (types.cuh), a power of two: its scaled value is
// exact, so a row made of such keys gets p = 2^0 = 1 each (uniform), never 2^(+-2^100).
#pragma once
#include "mma.cuh"

namespace dmattn {

// MA mma atoms per warp, each owning rows g and g + 8 (h = 0, 1) of its 16; NA 8-key column tiles
// of S; DA 8-wide column tiles of O. Each lane holds partial row sums; the quad holds the row.
template <int MA, int NA, int DA>
struct OnlineSoftmax {
  float row_max[MA][2];
  float row_sum[MA][2];
  float unit;  // base-2 logarithm per score unit

  __device__ __forceinline__ explicit OnlineSoftmax(float unit_) : unit(unit_) {
#pragma unroll
    for (int a = 0; a < MA; ++a)
#pragma unroll
      for (int h = 0; h < 2; ++h) { row_max[a][h] = neg_inf(); row_sum[a][h] = 0.f; }
  }

  // Turns s into p in place and sets alpha, the factor that rescales what O summed so far. A row
  // whose bit 2 a + h of `keep` is clear keeps no key of the tile (a block map said so, and its
  // scores were not masked one by one): its maximum stays and its p are 0, by the exponent's
  // offset (+inf) rather than a select per score.
  // Returns false when no row of the warp moved its maximum (after the first few key tiles the
  // common case): then the rescale (MA*DA*4 multiplies, as many as the tile's mma count) is
  // skipped by the whole warp. It is a separate step so that the Hopper loop can rescale O only
  // once the previous tile's P V, still accumulating into O, has completed.
  __device__ __forceinline__ bool update(float (&s)[MA][NA][4], float (&alpha)[MA][2], u32 keep = ~0u) {
    bool moved = false;
#pragma unroll
    for (int a = 0; a < MA; ++a) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float mx = row_max[a][h];
#pragma unroll
        for (int nt = 0; nt < NA; ++nt) mx = fmaxf(mx, fmaxf(s[a][nt][2 * h], s[a][nt][2 * h + 1]));
        mx = quad_max(mx);
        const bool kept = (keep >> (2 * a + h)) & 1u;
        if (!kept) mx = row_max[a][h];
        const float m_scaled = mx == neg_inf() ? 0.f : mx * unit;
        const float m_exp = kept ? m_scaled : -neg_inf();  // +inf: every p_j = 2^-inf = 0
        alpha[a][h] = fast_exp2(row_max[a][h] * unit - m_scaled);
        moved |= mx != row_max[a][h];
        row_max[a][h] = mx;
        float sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < NA; ++nt)
#pragma unroll
          for (int e = 2 * h; e < 2 * h + 2; ++e) {
            s[a][nt][e] = fast_exp2(fmaf(s[a][nt][e], unit, -m_exp));
            sum += s[a][nt][e];
          }
        row_sum[a][h] = row_sum[a][h] * alpha[a][h] + sum;
      }
    }
    return __any_sync(0xffffffffu, moved);
  }

  // O *= alpha, row by row.
  static __device__ __forceinline__ void rescale(float (&acc_o)[MA][DA][4], const float (&alpha)[MA][2]) {
#pragma unroll
    for (int a = 0; a < MA; ++a)
#pragma unroll
      for (int dt = 0; dt < DA; ++dt) {
        acc_o[a][dt][0] *= alpha[a][0]; acc_o[a][dt][1] *= alpha[a][0];
        acc_o[a][dt][2] *= alpha[a][1]; acc_o[a][dt][3] *= alpha[a][1];
      }
  }

  // 1 / l for the row (0 for a row that saw no key) and its natural-log lse; reduces over the quad.
  __device__ __forceinline__ void finish(int a, int h, float& inv_l, float& lse) const {
    const float l = quad_sum(row_sum[a][h]);
    inv_l = l > 0.f ? 1.f / l : 0.f;
    lse = l > 0.f ? row_max[a][h] * (unit * kLn2) + logf(l) : neg_inf();
  }
};

// A warpgroup's running state over one query tile's key tiles in the Hopper forwards (fwd_wgmma.cu,
// fwd_ws.cu; one 16-row atom per warp): the O accumulator, the online softmax, and P of the
// previous visit, the A operand of its P V. o_regs / p_regs: flat views for fence_registers (a
// wgmma owns those registers from its issue to its wait).
template <int NA, int DA>
struct WgmmaAccum {
  float o[1][DA][4];
  OnlineSoftmax<1, NA, DA> softmax;
  u32 p_prev[NA / 2][4];

  __device__ __forceinline__ explicit WgmmaAccum(float unit) : softmax(unit) {
#pragma unroll
    for (int dt = 0; dt < DA; ++dt)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[0][dt][e] = 0.f;
  }
  __device__ __forceinline__ float (&o_regs())[DA * 4] { return reinterpret_cast<float (&)[DA * 4]>(o[0]); }
  __device__ __forceinline__ u32 (&p_regs())[NA * 2] { return reinterpret_cast<u32 (&)[NA * 2]>(p_prev); }
};

}  // namespace dmattn
