// block_map.cu — block_map_kernel: a mask's block map (block_map.cuh: layout, who writes it).
//
// One warp per row. Masks read as aligned 16-byte chunks (rows 16-byte aligned, unit key stride):
// the lanes read consecutive chunks, kLoads in flight each (a load: 512 contiguous bytes), two
// ballots per load (a kept element, a dropped one) gather them per tile. This is the scan's whole
// cost: at the H100's read rate (2.7 TB/s for gqa8k's 270 MB causal bool mask) nothing else shows.
// Other masks: one element per lane.
#include "block_map.cuh"

namespace dmattn {

constexpr int kBlockMapThreads = 256;  // 8 rows per CTA

template <int ELEM, bool VEC>
__global__ void __launch_bounds__(kBlockMapThreads) block_map_kernel(const __grid_constant__ BlockMapParams p) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row = blockIdx.x * (kBlockMapThreads / 32) + warp;
  if (row >= p.rows) return;
  const int i = row % p.seq_rows, bh = row / p.seq_rows, h = bh % p.heads, b = bh / p.heads;
  const unsigned char* mask = static_cast<const unsigned char*>(p.mask) +
      (b * p.mask_stride[0] + h * p.mask_stride[1] + i * p.mask_stride[2]) * ELEM;
  // Causal (bottom-right): row i sees keys j <= i + Sk - Sq; a mask broadcast over rows serves them
  // all, so its one row is read under the last row's limit.
  int key_end = p.seqlen_k;
  if (p.causal_seqlen_q > 0)
    key_end = max(0, min(p.seqlen_k, (p.seq_rows == 1 ? p.causal_seqlen_q - 1 : i) + p.seqlen_k - p.causal_seqlen_q + 1));
  u32* out = p.bits + static_cast<i64>(row) * kMapPlanes * p.words;
  for (int w = 0; w < p.words; ++w) {
    const int key0 = w * 32 * kMapKeys;
    MapWord word{0u, 0u};
    if (key0 < key_end) {
      if constexpr (VEC) word = map_word_chunks<ELEM>(mask, key0, key_end, lane);
      else word = map_word_elements<ELEM>(mask, p.mask_stride[3], key0, key_end, lane);
    }
    if (lane == 0) {
      out[w] = word.any;
      out[p.words + w] = word.full;
    }
  }
}

}  // namespace dmattn
