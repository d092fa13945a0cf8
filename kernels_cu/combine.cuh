// combine.cuh — merging the fp32 partials of a row whose keys were split over several CTAs:
//   lse = mx + log sum_s exp(lse_s - mx) ;  O = sum_s exp(lse_s - lse) O_s     (mx = max_s lse_s)
// Two shapes of the same merge:
//   combine_row       a whole CTA per row: fwd_combine_kernel (fwd.cu), a kernel of its own after
//                     the tile kernel, for rows of more than kWarpCombineSplits partials (up to
//                     kMaxSplits);
//   combine_row_warp  a warp per row: fwd_combine_kernel for fewer splits, and the decode kernel
//                     (fwd_decode.cu), which merges the rows of a kv head in the CTA that finishes
//                     last, while the partials are still in L2 (the host keeps their volume small:
//                     config.decode_config).
#pragma once
#include "mma.cuh"
#include "params.cuh"

namespace dmattn {

constexpr int kMaxSplits = 256;          // mirrors config.MAX_SPLITS (the weight buffer)
constexpr int kMaxCombineThreads = 512;  // mirrors config.MAX_COMBINE_THREADS
constexpr int kWarpCombineSplits = 32;   // mirrors config.WARP_COMBINE_SPLITS: fwd_combine_kernel
constexpr int kCombineWarps = 8;         //   merges a row per warp up to this many splits

// Max or sum of x over the CTA (every thread gets it); scratch holds one float per warp.
__device__ __forceinline__ float block_reduce(float x, bool is_max, float* scratch) {
  x = is_max ? warp_max(x) : warp_sum(x);
  __syncthreads();  // scratch may still be read by the previous reduction
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = x;
  __syncthreads();
  x = scratch[0];
  for (int w = 1; w < blockDim.x / 32; ++w) x = is_max ? fmaxf(x, scratch[w]) : x + scratch[w];
  return x;
}

// Merges the p.num_splits partials of `row` (rows in (batch, head, seq) order) into out and lse.
// Every thread of the CTA calls it (it has barriers); blockDim.x is a multiple of 32, at least
// head_dim / 2, at most kMaxCombineThreads. The CTA's threads share the splits: a decode row has
// up to kMaxSplits partials, and one thread walking them all in a dependent chain of loads took
// longer than the split kernel itself. Partials are read through L2 (ld.cg): in the decode kernel
// other CTAs wrote them moments ago.
template <typename T>
__device__ void combine_row(const FwdParams& p, i64 row) {
  __shared__ float weight[kMaxSplits];           // exp(lse_s - mx): split s's share of the row
  __shared__ float2 part[kMaxCombineThreads];    // per (split group, column pair) sums
  __shared__ float scratch[kMaxCombineThreads / 32];
  const AttnParams& a = p.a;
  const i64 rows = static_cast<i64>(a.batch) * a.heads * a.seqlen_q;
  const int splits = p.num_splits, tid = threadIdx.x, threads = blockDim.x;

  //   lse = mx + log sum_s exp(lse_s - mx),  mx = max_s lse_s   (-inf: no split saw a key)
  float mx = neg_inf();
  for (int s = tid; s < splits; s += threads) mx = fmaxf(mx, __ldcg(p.lse_split + s * rows + row));
  mx = block_reduce(mx, true, scratch);
  float total = 0.f;
  for (int s = tid; s < splits; s += threads) {
    const float e = mx == neg_inf() ? 0.f : __expf(__ldcg(p.lse_split + s * rows + row) - mx);
    weight[s] = e;
    total += e;
  }
  total = block_reduce(total, false, scratch);  // its barriers publish `weight`
  const float lse = mx == neg_inf() ? neg_inf() : mx + logf(total);
  const float inv_total = mx == neg_inf() ? 0.f : 1.f / total;

  // O = sum_s weight_s / total * O_s: thread = (split group g, column pair c); groups stride the
  // splits so each thread's loads are independent and stay in flight together.
  const int pairs = a.head_dim / 2, groups = threads / pairs;
  const int g = tid / pairs, c = tid % pairs;
  float2 acc = make_float2(0.f, 0.f);
  if (g < groups) {
    const float* o_col = p.o_split + row * a.head_dim + 2 * c;
#pragma unroll 8
    for (int s = g; s < splits; s += groups) {
      const float2 x = __ldcg(reinterpret_cast<const float2*>(o_col + s * rows * a.head_dim));
      acc.x += weight[s] * x.x;
      acc.y += weight[s] * x.y;
    }
  }
  part[tid] = acc;
  __syncthreads();
  if (g == 0) {
    for (int h = 1; h < groups; ++h) {
      acc.x += part[h * pairs + c].x;
      acc.y += part[h * pairs + c].y;
    }
    u16* o = static_cast<u16*>(p.out) + bshd_row_offset(a, row, p.o_stride);
    *reinterpret_cast<u32*>(o + 2 * c) = T::pack(acc.x * inv_total, acc.y * inv_total);
    if (c == 0 && p.lse != nullptr) p.lse[row] = lse;
  }
  __syncthreads();  // weight and part are free for the next row
}

// Merges the p.num_splits partials of `row` with the calling warp; `weight` holds num_splits
// floats of this warp's own. Lane = column pair (and split, for the weights).
template <typename T>
__device__ void combine_row_warp(const FwdParams& p, i64 row, float* weight) {
  const AttnParams& a = p.a;
  const i64 rows = static_cast<i64>(a.batch) * a.heads * a.seqlen_q;
  const int splits = p.num_splits, lane = threadIdx.x % 32;
  float mx = neg_inf();
  for (int s = lane; s < splits; s += 32) mx = fmaxf(mx, __ldcg(p.lse_split + s * rows + row));
  mx = warp_max(mx);
  float total = 0.f;
  for (int s = lane; s < splits; s += 32) {
    const float e = mx == neg_inf() ? 0.f : __expf(__ldcg(p.lse_split + s * rows + row) - mx);
    weight[s] = e;
    total += e;
  }
  total = warp_sum(total);
  __syncwarp();  // weight is written
  const float inv_total = mx == neg_inf() ? 0.f : 1.f / total;
  u16* o = static_cast<u16*>(p.out) + bshd_row_offset(a, row, p.o_stride);
  for (int c = lane; c < a.head_dim / 2; c += 32) {
    const float* o_col = p.o_split + row * a.head_dim + 2 * c;
    float2 acc = make_float2(0.f, 0.f);
#pragma unroll 16
    for (int s = 0; s < splits; ++s) {
      const float2 x = __ldcg(reinterpret_cast<const float2*>(o_col + s * rows * a.head_dim));
      acc.x += weight[s] * x.x;
      acc.y += weight[s] * x.y;
    }
    *reinterpret_cast<u32*>(o + 2 * c) = T::pack(acc.x * inv_total, acc.y * inv_total);
  }
  if (lane == 0 && p.lse != nullptr) p.lse[row] = mx == neg_inf() ? neg_inf() : mx + logf(total);
  __syncwarp();  // weight is free for the warp's next row
}

}  // namespace dmattn
