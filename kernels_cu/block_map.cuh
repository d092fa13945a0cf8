// block_map.cuh — a mask's block map: one bit per (mask row, key tile of kMapKeys keys), set when the
// row keeps a key of the tile. The wide Hopper forward (fwd_ws.cu) visits a query tile's key tile
// only when a row of the tile has its bit, so the map is all it needs to know of the mask to skip.
//
// Who writes it: dmattn_cupy.block_map(mask) once per mask (then reused by every call with that
// mask), topk_mask (topk.cu: as it writes the mask, at no extra pass), or, when neither was given,
// each forward call with a mask, before fwd_ws_kernel (then under the call's causal limit, so only
// the keys a row can see are read: the causal half of the mask).
//
// Layout: rows (b, h, i) of the mask's own (B|1, H|Hk|1, Sq|1) dims in C order, `words` u32 per row
// (ceil(ceil(Sk / kMapKeys) / 32)); bit t % 32 of word t / 32: key tile t.
#pragma once
#include "params.cuh"

namespace dmattn {

constexpr int kMapKeys = 128;  // keys per map bit: the wide forward's key tile

// Word w of a row (tiles 32 w .. 32 w + 31) from 16-byte chunks: keys [key0, key_end) are read.
template <int ELEM>
__device__ __forceinline__ u32 map_word_chunks(const unsigned char* row, int key0, int key_end, int lane) {
  constexpr int kTileChunks = kMapKeys * ELEM / 16;  // chunks per tile: 8, 16, 32
  constexpr int kLoads = 8;
  constexpr int kRounds = kTileChunks / kLoads;      // 32 tiles = 32 x kTileChunks chunks
  constexpr u32 kTileLanes = kTileChunks == 32 ? ~0u : (1u << kTileChunks) - 1;
  static_assert(kTileChunks % kLoads == 0 && 32 % kTileChunks == 0, "whole tiles per load");
  const int chunks = min(32 * kTileChunks, ((key_end - key0) * ELEM + 15) / 16);  // visible ones
  const uint4* g = reinterpret_cast<const uint4*>(row + static_cast<i64>(key0) * ELEM);
  u32 word = 0u;
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
      const u32 lanes = __ballot_sync(0xffffffffu, chunk_any_keep<ELEM>(chunk[j]));
#pragma unroll
      for (int q = 0; q < 32 / kTileChunks; ++q)  // load j covers tiles from (r kLoads + j) 32 / kTileChunks
        if (lanes & (kTileLanes << (q * kTileChunks))) word |= 1u << ((r * kLoads + j) * 32 / kTileChunks + q);
    }
  }
  return word;
}

// The same from single elements `key_stride` apart (any alignment, any stride).
template <int ELEM>
__device__ __forceinline__ u32 map_word_elements(const unsigned char* row, i64 key_stride, int key0, int key_end,
                                                 int lane) {
  const typename Raw<ELEM>::type* g = reinterpret_cast<const typename Raw<ELEM>::type*>(row);
  u32 word = 0u;
  for (int t = 0; t < 32 && key0 + t * kMapKeys < key_end; ++t) {
    bool keep = false;
    for (int key = key0 + t * kMapKeys + lane; key < min(key_end, key0 + (t + 1) * kMapKeys); key += 32)
      keep |= mask_keep(g[key * key_stride]);
    if (__any_sync(0xffffffffu, keep)) word |= 1u << t;
  }
  return word;
}

// Block map of the 32 keys j0 .. j0 + 31 whose flags `lanes` holds (a ballot): they span at most two
// 128-key tiles. Lane 0 sets their bits in the row's words.
__device__ __forceinline__ void mark_map_tiles(u32* row_map, u32 lanes, int j0, int lane) {
  if (lane != 0 || lanes == 0u) return;
  const int t = j0 / kMapKeys, split = (t + 1) * kMapKeys - j0;  // lanes >= split: tile t + 1
  const u32 first = split >= 32 ? lanes : lanes & ((1u << split) - 1u);
  if (first) atomicOr(&row_map[t >> 5], 1u << (t & 31));
  if (lanes != first) atomicOr(&row_map[(t + 1) >> 5], 1u << ((t + 1) & 31));
}

}  // namespace dmattn
