// topk.cu — topk_mask: per query row, the `window` largest visible bias entries as a bool mask.
//
// One CTA per row (b, h, i) of a bias (B, H, Sq, Sk); the reference semantics are
// dmattn_cupy/_topk.py. That path ranks every key of the row by
//     visible keys by bias, descending (-inf counts as the finite minimum of the dtype it sorts
//     in: the bias's own, but float32 for bfloat16, so there -inf ranks below every number)
//   > hidden keys (mask zero, or causal: j > i + Sk - Sq)
//   > visible NaN keys (NumPy sorts NaN last)
// with ties to the earlier key, chooses the first `window`, optionally smooths the choice to blocks
// (hidden keys chosen to fill the window count there), and ANDs the result with visibility.
//
// Here each key j gets an unsigned integer key(j) that orders exactly like that rank:
//   visible number  order-preserving bits of the value (sign flip; -0 == +0; -inf -> finite min
//                   but for bfloat16, where its own bits already order it just below)
//   hidden          1
//   visible NaN     0
// (numbers never map to 0 or 1: the lowest, -inf, maps to at least 2^(W-1) - bits(+inf) - 1,
// which is 0x7f for bfloat16 and more for the other formats).
// The window-th largest key T is found by radix select, most significant 8-bit digit first:
//   per pass: hist[d] = #{j : key(j) starts with `prefix`, next digit d}      (shared atomics)
//             d* = the digit with fewer than k keys in higher digits, at least k in d* and higher
//             k -= #keys in digits above d* ;  prefix = prefix . d*
// It stops once all k keys under the prefix are taken (k == count) or the key is complete. Then
//   chosen(j) = key(j) >> shift >  prefix
//            or key(j) >> shift == prefix and fewer than k such keys come before j (earlier wins)
// which chooses window keys in all. The tie rank comes from one count per warp, each warp owning
// a contiguous segment of the row, then a ballot scan inside the segment.
//
// Block smoothing reuses the output row: chosen(j) is written first; after a barrier each warp
// owns whole blocks, counts their chosen flags (2 * kept > block length: keep the block) and
// overwrites them with kept & visible. Nothing is allocated besides the output.
//
// With p.block_map, the row's block map (block_map.cuh: per 128-key tile, a kept key and every key
// kept) is gathered in shared memory, as the tiles with a kept key and those with a dropped one, from
// two ballots per 32 written flags (a smoothed block that is dropped marks its tiles at once), and
// stored at the end: the forward then needs no pass over the mask to find the tiles to skip.
//
// CTA width: 256 threads, or 1024 when there are too few rows to fill the GPU (the launcher's
// threads_per_row); shared memory: the 256-bin histogram, 32 tie counts, the pick (~1.2 KiB), and
// with a block map its row's two planes (2 x map_words words, dynamic).
//
// Barriers: per radix pass, (1) hist zeroed before counting, (2) counts complete before warp 0
// picks the digit, (3) the pick is published before every thread reads it; the next pass zeroes
// hist and warp 0 writes the pick only after barriers that every reader has passed. Then (4) the
// per-warp tie counts are complete before each warp sums those ahead of it, and (5) every chosen
// flag is in `out` before block smoothing reads it.
#include "block_map.cuh"

namespace dmattn {

constexpr int kTopkMaxThreads = 1024;  // launch bound: the launcher's widest CTA
constexpr int kRadixBits = 8;
constexpr int kRadix = 1 << kRadixBits;

// Raw storage of a bias value, the bits of +inf in it, and whether -inf ties with the finite
// minimum (the reference clips it there; bfloat16 is sorted in float32, whose minimum is lower).
template <typename U_, U_ INF, bool CLIP_NEG_INF> struct KeyFormat {
  typedef U_ U;
  static constexpr U kInf = INF;
  static constexpr bool kClipNegInf = CLIP_NEG_INF;
};
template <typename T> struct KeyBits;
template <> struct KeyBits<fp16_t> : KeyFormat<u16, 0x7c00u, true> {};
template <> struct KeyBits<bf16_t> : KeyFormat<u16, 0x7f80u, false> {};
template <> struct KeyBits<float> : KeyFormat<u32, 0x7f800000u, true> {};
template <> struct KeyBits<double> : KeyFormat<u64, 0x7ff0000000000000ull, true> {};

constexpr int kNanKey = 0;
constexpr int kHiddenKey = 1;

// key of a visible bias value (see the header): larger value, larger key; equal values, one key.
template <typename T>
__device__ __forceinline__ typename KeyBits<T>::U value_key(typename KeyBits<T>::U bits) {
  typedef typename KeyBits<T>::U U;
  constexpr U kSign = static_cast<U>(U(1) << (8 * sizeof(U) - 1));
  constexpr U kInf = KeyBits<T>::kInf;
  const U magnitude = static_cast<U>(bits & ~kSign);
  if (magnitude > kInf) return kNanKey;
  if (magnitude == 0) return kSign;                                           // -0 == +0
  if (KeyBits<T>::kClipNegInf && bits == (kSign | kInf))
    bits = static_cast<U>(kSign | (kInf - 1));                                // -inf -> finite min
  return (bits & kSign) ? static_cast<U>(~bits) : static_cast<U>(bits | kSign);  // sign flip
}

// The top bits of a key above bit `shift` (none when shift is the key's width).
template <typename U> __device__ __forceinline__ U high_bits(U key, int shift) {
  return shift >= static_cast<int>(8 * sizeof(U)) ? U(0) : static_cast<U>(key >> shift);
}

// One row of bias and mask, and its causal limit.
template <typename T, int MASK_BYTES, bool MASK_FLOAT>
struct TopkRow {
  typedef typename KeyBits<T>::U U;
  typedef typename Raw<MASK_BYTES == 0 ? 1 : MASK_BYTES>::type M;
  const U* bias;
  const M* mask;
  i64 bias_step, mask_step;
  int key_end;  // keys >= key_end are hidden by causality

  __device__ TopkRow(const TopkParams& p, int row) {
    const int i = row % p.seqlen_q, h = row / p.seqlen_q % p.heads, b = row / p.seqlen_q / p.heads;
    bias = static_cast<const U*>(p.bias) + b * p.bias_stride[0] + h * p.bias_stride[1]
           + i * p.bias_stride[2];
    mask = static_cast<const M*>(p.mask) + b * p.mask_stride[0] + h * p.mask_stride[1]
           + i * p.mask_stride[2];
    bias_step = p.bias_stride[3];
    mask_step = p.mask_stride[3];
    // causal, bottom-right aligned: query i sees key j iff j <= i + Sk - Sq (i < Sq: end <= Sk)
    key_end = p.causal ? max(0, i + (p.seqlen_k - p.seqlen_q) + 1) : p.seqlen_k;
  }

  // mask != 0; a float mask ignores its sign bit, so -0.0 is zero and NaN is not (as in NumPy).
  __device__ __forceinline__ bool visible(int j) const {
    if (j >= key_end) return false;
    if (MASK_BYTES == 0) return true;
    const M m = mask[j * mask_step];
    return MASK_FLOAT ? static_cast<M>(m << 1) != 0 : m != 0;
  }

  __device__ __forceinline__ U key(int j) const {
    return visible(j) ? value_key<T>(bias[j * bias_step]) : U(kHiddenKey);
  }
};

// Result of one radix pass: the prefix extended by the chosen digit, how many keys under it are
// still to take (k) and how many there are (count).
template <typename U> struct RadixPick {
  U prefix;
  int k, count;
};

// Run by the 32 lanes of warp 0. Lane l owns bins [8l, 8l + 8); the bins of higher lanes hold
// `above` keys (a suffix sum over lanes). The one lane with above < k <= above + its own keys walks
// its bins from the top to the digit d*.
template <typename U>
__device__ void pick_digit(const int* hist, U prefix, int k, RadixPick<U>& pick) {
  constexpr int kPerLane = kRadix / 32;
  const int lane = threadIdx.x;
  int own[kPerLane], sum = 0;
#pragma unroll
  for (int b = 0; b < kPerLane; ++b) {
    own[b] = hist[lane * kPerLane + b];
    sum += own[b];
  }
  int suffix = sum;  // keys in the bins of lanes >= lane
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    const int other = __shfl_down_sync(0xffffffffu, suffix, offset);
    if (lane + offset < 32) suffix += other;
  }
  int above = suffix - sum;
  if (above < k && k <= suffix) {
    int digit = -1;
#pragma unroll
    for (int b = kPerLane - 1; b >= 0; --b) {
      if (digit < 0) {
        if (above + own[b] >= k) digit = lane * kPerLane + b;
        else above += own[b];
      }
    }
    pick.prefix = static_cast<U>((prefix << kRadixBits) | static_cast<U>(digit));
    pick.k = k - above;
    pick.count = hist[digit];
  }
}

template <typename T, int MASK_BYTES, bool MASK_FLOAT>
__global__ void __launch_bounds__(kTopkMaxThreads, 1)
topk_mask_kernel(const __grid_constant__ TopkParams p) {
  typedef TopkRow<T, MASK_BYTES, MASK_FLOAT> Row;
  typedef typename Row::U U;
  constexpr int kBits = 8 * sizeof(U);
  __shared__ int hist[kRadix];
  __shared__ int warp_ties[32];
  __shared__ RadixPick<U> pick;
  extern __shared__ u32 row_map[];  // with p.block_map: tiles with a kept key | with a dropped key
  u32* row_gap = row_map + p.map_words;

  const Row row(p, blockIdx.x);
  const int sk = p.seqlen_k;
  unsigned char* out = p.out + static_cast<i64>(blockIdx.x) * sk;
  const bool map = p.block_map != nullptr;
  if (map) {
    for (int w = threadIdx.x; w < 2 * p.map_words; w += blockDim.x) row_map[w] = 0u;
    __syncthreads();
  }

  // Radix select of the window-th largest key: every key of the row counts, hidden ones too.
  U prefix = 0;
  int k = p.window, count = sk, shift = kBits;
  while (k < count && shift > 0) {
    shift -= kRadixBits;
    for (int b = threadIdx.x; b < kRadix; b += blockDim.x) hist[b] = 0;
    __syncthreads();
    for (int j = threadIdx.x; j < row.key_end; j += blockDim.x) {
      const U key = row.key(j);
      if (high_bits(key, shift + kRadixBits) == prefix)
        atomicAdd(&hist[(key >> shift) & (kRadix - 1)], 1);
    }
    // The causal tail [key_end, Sk): hidden keys, counted at once.
    const U hidden = kHiddenKey;
    if (threadIdx.x == 0 && row.key_end < sk && high_bits(hidden, shift + kRadixBits) == prefix)
      atomicAdd(&hist[(hidden >> shift) & (kRadix - 1)], sk - row.key_end);
    __syncthreads();
    if (threadIdx.x < 32) pick_digit(hist, prefix, k, pick);
    __syncthreads();
    prefix = pick.prefix;
    k = pick.k;
    count = pick.count;
  }

  // Each warp owns a contiguous segment of the row, a whole number of 32-key steps.
  const int warps = blockDim.x / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int segment = ((sk + warps - 1) / warps + 31) / 32 * 32;
  const int begin = min(warp * segment, sk), end = min(begin + segment, sk);
  // Ties (keys equal to T) are taken earliest first: `before` counts those ahead of this warp's
  // current step. When all of them are taken (k == count) no rank is needed.
  const bool all_ties = k == count;
  int before = 0;
  if (!all_ties) {
    int n = 0;
    for (int j = begin + lane; j < end; j += 32) n += high_bits(row.key(j), shift) == prefix;
    n = __reduce_add_sync(0xffffffffu, n);
    if (lane == 0) warp_ties[warp] = n;
    __syncthreads();
    for (int w = 0; w < warp; ++w) before += warp_ties[w];
  }
  // The flags (and, with a map, its bits): the loops twice, with and without the map's ballots.
  // As one copy they keep the map's branches, and topk_mask without a map ran ~7% slower (H100).
  auto write_flags = [&](auto with_map) {
    constexpr bool kMap = decltype(with_map)::value;
    const bool smooth = p.block > 0;
    for (int j0 = begin; j0 < end; j0 += 32) {
      const int j = j0 + lane;
      const U key = j < end ? row.key(j) : U(kHiddenKey);
      const U high = high_bits(key, shift);
      const bool tie = j < end && high == prefix;
      const u32 ties = __ballot_sync(0xffffffffu, tie);
      const int rank = before + __popc(ties & ((1u << lane) - 1u));  // ties before key j
      const bool chosen = high > prefix || (tie && (all_ties || rank < k));
      before += __popc(ties);
      // Without smoothing, chosen hidden keys (filling a short row's window) are dropped here.
      const bool kept = j < end && (smooth ? chosen : chosen && key != U(kHiddenKey));
      if (j < end) out[j] = kept;
      if (kMap && !smooth) mark_map_tiles(row_map, row_gap, __ballot_sync(0xffffffffu, kept), end - j0, j0, lane);
    }

    if (smooth) {
      __syncthreads();  // every chosen flag of the row is in `out`
      const int blocks = (sk + p.block - 1) / p.block;
      for (int blk = warp; blk < blocks; blk += warps) {
        const int k0 = blk * p.block, k1 = min(k0 + p.block, sk);  // the last block may be short
        int kept = 0;
        for (int j = k0 + lane; j < k1; j += 32) kept += out[j];
        kept = __reduce_add_sync(0xffffffffu, kept);  // every lane has read its flags
        const bool keep_block = 2 * kept > k1 - k0;   // more than half of the block's own length
        if (kMap && !keep_block && lane == 0)  // every key dropped
          for (int t = k0 / kMapKeys; t <= (k1 - 1) / kMapKeys; ++t) atomicOr(&row_gap[t >> 5], 1u << (t & 31));
        for (int j0 = k0; j0 < k1; j0 += 32) {
          const int j = j0 + lane;
          const bool keep = j < k1 && keep_block && row.visible(j);
          if (j < k1) out[j] = keep;
          if (kMap && keep_block) mark_map_tiles(row_map, row_gap, __ballot_sync(0xffffffffu, keep), k1 - j0, j0, lane);
        }
      }
    }
  };
  if (map) write_flags(BoolConst<true>());
  else write_flags(BoolConst<false>());

  if (map) {
    __syncthreads();  // every bit of the row is in row_map
    u32* out_map = p.block_map + static_cast<i64>(blockIdx.x) * kMapPlanes * p.map_words;
    for (int w = threadIdx.x; w < p.map_words; w += blockDim.x) {
      out_map[w] = row_map[w];
      out_map[p.map_words + w] = row_map[w] & ~row_gap[w];
    }
  }
}

}  // namespace dmattn
