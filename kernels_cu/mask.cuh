// mask.cuh — which key tiles a query tile must visit: the causal limit and the scan of the mask
// that finds the all-zero tiles (skipped: no K/V/bias loads, no math).
#pragma once
#include "tile_io.cuh"

namespace dmattn {

// Causal, bottom-right aligned: query row i sees key j iff j <= i + seqlen_k - seqlen_q.
// Returns one past the last key any row in [row0, row_last] can see (<= 0: none).
template <bool CAUSAL>
__device__ __forceinline__ int visible_key_end(int row_last, int seqlen_q, int seqlen_k) {
  if (!CAUSAL) return seqlen_k;
  return min(seqlen_k, row_last + seqlen_k - seqlen_q + 1);
}

// Sets bit (t - tile_begin) of `bits` for each key tile t in [tile_begin, tile_end) in which any
// row of [row0, row0 + rows) has a kept, causally visible key (causality at 16-byte-chunk
// granularity: conservative). `bits` must be zeroed and the result is visible after a barrier.
// Work item = (row, tile): the tile's row segment, BLOCK_N * ELEM contiguous bytes; neighbouring
// threads take neighbouring tiles of one row, so a warp streams a contiguous span. Each thread
// issues the loads of kBatch items (512 bytes) before testing any: the scan is bound by memory
// latency, one round trip per pass, and a sparse mask's CTA reads every row of its empty tiles. It
// skips items whose tile an earlier pass already marked (dense masks then read a few rows).
template <int ELEM, int BLOCK_N, int THREADS, bool CAUSAL>
__device__ void scan_mask_tiles(u32* bits, const unsigned char* base, const i64 (&stride)[4],
                                int row0, int rows, int tile_begin, int tile_end, int seqlen_q,
                                int seqlen_k, bool vec) {
  typedef typename Raw<ELEM>::type E;
  constexpr int kPerChunk = 16 / ELEM;
  constexpr int kChunks = BLOCK_N / kPerChunk;
  constexpr int kBatch = kChunks >= 32 ? 1 : 32 / kChunks;
  const int tiles = tile_end - tile_begin;
  rows = min(rows, seqlen_q - row0);
  // A mask broadcast over rows has one distinct row: scan it once, under the causal limit of the
  // tile's last row (the one that sees the most keys).
  const int causal_shift = stride[2] == 0 ? rows - 1 : 0;
  if (stride[2] == 0) rows = 1;
  const int items = rows * tiles;
  const FastDivmod by_tiles(max(tiles, 1));
  struct Item { int t, row, key0, key_end; };  // tile (from tile_begin), mask row, its keys
  auto locate = [&](int item) {
    const int r = by_tiles.div(item), t = item - r * tiles, row = row0 + r;
    return Item{t, row, (tile_begin + t) * BLOCK_N,
                CAUSAL ? min(seqlen_k, row + causal_shift + seqlen_k - seqlen_q + 1) : seqlen_k};
  };
#pragma unroll 1
  for (int first = threadIdx.x; first < items; first += THREADS * kBatch) {
    bool keep[kBatch];
    if (vec) {
      uint4 chunk[kBatch][kChunks];
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int item = first + u * THREADS;
        const auto [t, row, key0, key_end] = locate(item);
        const bool live = item < items && !(bits[t >> 5] & (1u << (t & 31)));
        const unsigned char* g = base + (static_cast<i64>(row) * stride[2] + key0) * ELEM;
#pragma unroll
        for (int c = 0; c < kChunks; ++c)
          chunk[u][c] = live && key0 + c * kPerChunk < key_end
              ? *reinterpret_cast<const uint4*>(g + c * 16) : make_uint4(0u, 0u, 0u, 0u);
      }
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        keep[u] = false;
#pragma unroll
        for (int c = 0; c < kChunks; ++c) keep[u] |= chunk_any_keep<ELEM>(chunk[u][c]);
      }
    } else {
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int item = first + u * THREADS;
        const auto [t, row, key0, key_end] = locate(item);
        const E* g = reinterpret_cast<const E*>(base) + static_cast<i64>(row) * stride[2];
        keep[u] = false;
        if (item < items)
          for (int c = 0; c < BLOCK_N && key0 + c < key_end; ++c)
            keep[u] |= mask_keep(g[static_cast<i64>(key0 + c) * stride[3]]);
      }
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      // the tile again, rather than kBatch more registers live across the loads
      const int t = by_tiles.mod(first + u * THREADS);
      if (keep[u]) atomicOr(&bits[t >> 5], 1u << (t & 31));
    }
  }
}

// First set bit at index >= j in `bits` (n bits), or n.
__device__ __forceinline__ int next_set_bit(const u32* bits, int j, int n) {
  while (j < n) {
    const u32 w = bits[j >> 5] >> (j & 31);
    if (w) return j + __ffs(w) - 1;
    j = (j | 31) + 1;
  }
  return n;
}

}  // namespace dmattn
