// block_map.cuh — a mask's block map: two bits per (mask row, key tile of kMapKeys keys).
//   any   the row keeps a key of the tile
//   full  the row keeps every key of the tile (below Sk: a short last tile counts its own keys);
//         only where `any` is set
// The wide Hopper forward (fwd_ws.cu) visits a query tile's key tile only when a row of the tile has
// its `any` bit. Where none of the tile's rows is partly kept (any and not full), the rows' `any`
// bits say everything the mask does there: the tile's mask rows are not copied and its scores are
// not tested one by one (block-structured masks: top-k smoothed to blocks, block-sparse layouts).
//
// Who writes it: dmattn_cupy.block_map(mask) once per mask (then reused by every call with that
// mask), topk_mask (topk.cu: as it writes the mask, at no extra pass), or, when neither was given,
// each forward call with a mask, before fwd_ws_kernel (then under the call's causal limit, so only
// the keys a row can see are read, the causal half of the mask, and `full` counts only those).
//
// Layout: rows (b, h, i) of the mask's own (B|1, H|Hk|1, Sq|1) dims in C order; per row kMapPlanes x
// `words` u32, the `any` words then the `full` words (words = ceil(ceil(Sk / kMapKeys) / 32)); bit
// t % 32 of word t / 32 of a plane: key tile t.
#pragma once
#include "params.cuh"

namespace dmattn {

constexpr int kMapKeys = 128;  // keys per map bit: the wide forward's key tile
constexpr int kMapPlanes = 2;  // any, full

// Word w of a row's two planes: tiles 32 w .. 32 w + 31.
struct MapWord {
  u32 any, full;
};

// Word w of a row (tiles 32 w .. 32 w + 31) from 16-byte chunks: keys [key0, key_end) are read.
template <int ELEM>
__device__ __forceinline__ MapWord map_word_chunks(const unsigned char* row, int key0, int key_end, int lane) {
  constexpr int kPerChunk = 16 / ELEM;
  constexpr int kTileChunks = kMapKeys / kPerChunk;  // chunks per tile: 8, 16, 32
  constexpr int kLoads = 8;
  constexpr int kRounds = kTileChunks / kLoads;      // 32 tiles = 32 x kTileChunks chunks
  constexpr u32 kTileLanes = kTileChunks == 32 ? ~0u : (1u << kTileChunks) - 1;
  static_assert(kTileChunks % kLoads == 0 && 32 % kTileChunks == 0, "whole tiles per load");
  const int keys = key_end - key0;
  const int chunks = min(32 * kTileChunks, (keys + kPerChunk - 1) / kPerChunk);  // visible ones
  const uint4* g = reinterpret_cast<const uint4*>(row + static_cast<i64>(key0) * ELEM);
  MapWord word{0u, 0u};
  u32 gap = 0u;  // tiles with a dropped key
#pragma unroll
  for (int r = 0; r < kRounds; ++r) {
    uint4 chunk[kLoads];
#pragma unroll
    for (int j = 0; j < kLoads; ++j) {
      const int c = (r * kLoads + j) * 32 + lane;
      chunk[j] = c < chunks ? g[c] : make_uint4(0u, 0u, 0u, 0u);
    }
#pragma unroll
    for (int j = 0; j < kLoads; ++j) {
      if ((r * kLoads + j) * 32 >= chunks) break;  // past the row's (causal) end: nothing kept
      const int c = (r * kLoads + j) * 32 + lane;
      const u32 kept = __ballot_sync(0xffffffffu, chunk_any_keep<ELEM>(chunk[j]));
      if (kept == 0u) continue;  // no kept key: these tiles' full bits are moot (a sparse mask's usual case)
      const u32 dropped = __ballot_sync(0xffffffffu, c < chunks && !chunk_all_keep<ELEM>(chunk[j], keys - c * kPerChunk));
#pragma unroll
      for (int q = 0; q < 32 / kTileChunks; ++q) {  // load j covers tiles from (r kLoads + j) 32 / kTileChunks
        const u32 bit = 1u << ((r * kLoads + j) * 32 / kTileChunks + q), lanes = kTileLanes << (q * kTileChunks);
        if (kept & lanes) word.any |= bit;
        if (dropped & lanes) gap |= bit;
      }
    }
  }
  word.full = word.any & ~gap;
  return word;
}

// The same from single elements `key_stride` apart (any alignment, any stride).
template <int ELEM>
__device__ __forceinline__ MapWord map_word_elements(const unsigned char* row, i64 key_stride, int key0, int key_end,
                                                     int lane) {
  const typename Raw<ELEM>::type* g = reinterpret_cast<const typename Raw<ELEM>::type*>(row);
  MapWord word{0u, 0u};
  for (int t = 0; t < 32 && key0 + t * kMapKeys < key_end; ++t) {
    bool keep = false, drop = false;
    for (int key = key0 + t * kMapKeys + lane; key < min(key_end, key0 + (t + 1) * kMapKeys); key += 32) {
      const bool k = mask_keep(g[key * key_stride]);
      keep |= k;
      drop |= !k;
    }
    if (__any_sync(0xffffffffu, keep)) {
      word.any |= 1u << t;
      if (!__any_sync(0xffffffffu, drop)) word.full |= 1u << t;
    }
  }
  return word;
}

// Bits t .. t + 31 of one plane of a map row (`words` words; bits past them read as 0).
__device__ __forceinline__ u32 map_span(const u32* plane, int t, int words) {
  const u32 lo = plane[t >> 5], hi = (t & 31) && (t >> 5) + 1 < words ? plane[(t >> 5) + 1] : 0u;
  return __funnelshift_r(lo, hi, t & 31);
}

// Sets, in one plane of a row, the bits of the tiles of the keys j0 + i with bit i set in `lanes`
// (i < 32: at most two 128-key tiles).
__device__ __forceinline__ void mark_plane_tiles(u32* plane, u32 lanes, int j0) {
  if (lanes == 0u) return;
  const int t = j0 / kMapKeys, split = (t + 1) * kMapKeys - j0;  // lanes >= split: tile t + 1
  const u32 first = split >= 32 ? lanes : lanes & ((1u << split) - 1u);
  if (first) atomicOr(&plane[t >> 5], 1u << (t & 31));
  if (lanes != first) atomicOr(&plane[(t + 1) >> 5], 1u << ((t + 1) & 31));
}

// The 32 keys j0 .. j0 + 31, of which the first `count` are in the row and those in `kept` (a ballot)
// are kept: lane 0 marks their tiles with a kept key in row_map, with a dropped one in row_gap.
__device__ __forceinline__ void mark_map_tiles(u32* row_map, u32* row_gap, u32 kept, int count, int j0, int lane) {
  if (lane != 0) return;
  mark_plane_tiles(row_map, kept, j0);
  mark_plane_tiles(row_gap, (count >= 32 ? ~0u : (1u << count) - 1u) & ~kept, j0);
}

}  // namespace dmattn
