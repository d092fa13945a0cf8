// params.cuh — plain-data kernel arguments. Mirrored field by field (same order, same types) by
// dmattn_cupy/_cuda/params.py as NumPy structured dtypes with align=True; a test compares the
// layouts. Strides are in elements; a broadcast dimension has stride 0.
#pragma once
#include "types.cuh"

namespace dmattn {

// What forward and backward share: the inputs and the problem's shape.
struct AttnParams {
  const void* q;           // (B, Sq, H, D), unit stride on D
  const void* k;           // (B, Sk, Hk, D)
  const void* v;           // (B, Sk, Hk, D)
  const void* mask;        // (B|1, H|Hk|1, Sq|1, Sk) or null
  const void* bias;        // (B|1, H|Hk|1, Sq|1, Sk) or null
  const u32* block_map;    // or null: the mask's block map (block_map.cuh: two bits per mask row and
                           // 128-key tile), the caller's; a forward call to fwd_ws_kernel without
                           // one writes its own first (backward without one scans the mask)
  i64 q_stride[3];         // batch, row, head
  i64 k_stride[3];
  i64 v_stride[3];
  i64 mask_stride[4];      // batch, head, row, key
  i64 bias_stride[4];
  i64 map_stride[3];       // words per batch, mask head, row of block_map; 0 where the map has one
  int batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim;
  int group;               // heads / kv_heads: query head h reads kv head h / group
  int mask_head_div;       // query head h reads mask head h / mask_head_div
  int bias_head_div;
  int pack;                // query heads of one group that share a CTA (divides group)
  int mask_vec;            // 1: mask rows are read as aligned 16-byte chunks
  int bias_vec;
  float scale;             // multiplies q.k
  float scale_log2;        // scale * log2(e)
  float softcap;           // > 0: s = softcap * tanh(s / softcap)
  int map_words;           // words per row and plane of block_map, ceil(key tiles / 32)
};

// Element offset of row `row` (rows in (batch, head, seq) order, as lse and the one-warp-per-row
// kernels count them) in a (B, Sq, H, D) tensor with (batch, seq, head) element strides.
__device__ __forceinline__ i64 bshd_row_offset(const AttnParams& a, i64 row, const i64 (&stride)[3]) {
  const i64 bh = row / a.seqlen_q, seq = row % a.seqlen_q;
  return (bh / a.heads) * stride[0] + seq * stride[1] + (bh % a.heads) * stride[2];
}

// A TMA tensor map (CUtensorMap: 128 opaque bytes, 64-byte aligned), encoded on the host by
// cuTensorMapEncodeTiled (dmattn_cupy/_cuda/tma.py) and read by the copy instruction (tma.cuh).
struct alignas(64) TensorMap {
  u64 opaque[16];
};

struct FwdParams {
  TensorMap k_map;         // fwd_ws_kernel: K and V as (D, Hk, Sk, B) tensors, boxes of 64 columns
  TensorMap v_map;         // x 128 keys, 128-byte swizzled (the wgmma slabs);
  TensorMap q_map;         // Q as (D, H, Sq, B), boxes of 64 columns x one head x a tile's rows
  AttnParams a;
  void* out;               // (B, Sq, H, D), input dtype
  i64 o_stride[3];
  float* lse;              // (B, H, Sq), contiguous; nullptr: not wanted
  float* o_split;          // (splits, B*H, Sq, D) fp32 partial outputs when num_splits > 1
  float* lse_split;        // (splits, B*H, Sq)
  u64* tiles_visited;      // optional counter of (query tile x key tile) pairs computed (the
                           // decode kernel: batches of live keys)
  u32* arrivals;           // zero between calls. Decode kernel: splits finished per (batch, kv head);
                           // fwd_ws_kernel: {next work item, CTAs finished}
  int num_splits;          // key-range splits (blockIdx.z; the decode kernel: blockIdx.x)
  int tiles_per_split;     // key tiles per split
  int stages;              // key tiles in flight: 2 or 3 (as many as two CTAs per SM can hold)
  int keys_per_split;      // decode kernel: keys per split
  int m_blocks;            // fwd_ws_kernel: query tiles per row group
  int row_groups;          // fwd_ws_kernel: (batch, pack of heads) groups, B * H / pack
};

struct BwdParams {
  AttnParams a;
  const void* out;         // forward output, (B, Sq, H, D)
  const void* dout;        // (B, Sq, H, D)
  i64 o_stride[3];
  i64 do_stride[3];
  const float* lse;        // (B, H, Sq)
  float* row_stats;        // (B, H, Sq, 2): {lse * log2(e) (+inf for an empty row), rowsum(dO * O)},
                           // written by bwd_preprocess_kernel
  float* dq_accum;         // (B, H, Sq, D) fp32 sums (deterministic: pairs of int32, bwd_tiles.cuh)
  void* dq;                // (B, Sq, H, D) contiguous, input dtype
  void* dk;                // (B, Sk, Hk, D) contiguous
  void* dv;                // (B, Sk, Hk, D) contiguous
  void* dbias;             // bias's own shape, contiguous, bias dtype (null: no bias grad)
  float* dbias_accum;      // fp32 dbias, used when dbias is reduced over batch (else null)
  i64 dbias_stride[4];     // batch, head, row, key of dbias (or dbias_accum); 0 where reduced
  int dbias_rows_reduced;  // 1: bias broadcasts over query rows (sum dS over rows)
  int dbias_head_div;      // query head h adds into dbias head h / dbias_head_div
  int deterministic;       // 1: dq_accum in fixed point, shared dbias_accum added in a fixed order
  int chunk_tiles;         // query tiles per CTA: a key tile's query range is cut, from the last
                           // query tile down, into chunks of this many (one chunk: all of it)
  u32* turns;              // deterministic mode, zeroed: ordering bits of the shared dbias_accum
                           // tiles (bwd_tiles.cuh, turn_wait)
  u32* kv_bound;           // deterministic mode, zeroed: max |K|, max ||V_j|| (float bits)
  float* dq_scale;         // deterministic mode: (B, H, Sq) fixed-point scale of each dq_accum row
                           // (null: dq_accum holds fp32 sums)
  float* dkv_partial;      // key tiles cut into several chunks: fp32 dK, dV of each chunk
  int* dkv_count;          // chunks finished per (head-dim part, b, kv head, key tile), zeroed
  u64* tiles_visited;
};

// topk_mask (topk.cu): one CTA per row of a bias (B, H, Sq, Sk); rows in C order.
struct TopkParams {
  const void* bias;        // (B, H, Sq, Sk), float16/bfloat16/float32/float64
  const void* mask;        // broadcastable to bias (dims full or 1), or null
  unsigned char* out;      // (B, H, Sq, Sk) bool, contiguous
  u32* block_map;          // or null: the result's block map (block_map.cuh), (B, H, Sq, 2, map_words)
  i64 bias_stride[4];      // batch, head, row, key
  i64 mask_stride[4];      // 0 along broadcast dims
  int heads, seqlen_q, seqlen_k;
  int window;              // keys kept per row, 1..Sk
  int block;               // smoothing block in keys (<= Sk), 0: no smoothing
  int causal;              // 1: query i sees key j iff j <= i + Sk - Sq
  int map_words;           // words per row and plane of block_map
};

// block_map_kernel (block_map.cu): two bits per (row, 128-key tile) of a mask (block_map.cuh), rows
// (b, h, i) of its (batch, heads, seq_rows) dims in C order.
struct BlockMapParams {
  const void* mask;
  u32* bits;               // (rows, kMapPlanes, words)
  i64 mask_stride[4];      // batch, head, row, key (elements; 0 along broadcast dims)
  int rows;                // batch x heads x seq_rows
  int heads, seq_rows;     // the map's head and row dims (1: the mask broadcasts there)
  int seqlen_k, words;     // words = ceil(ceil(seqlen_k / 128) / 32)
  int causal_seqlen_q;     // > 0: read only the keys a causal query row sees, bottom-right aligned
                           // to this query length (j <= i + Sk - Sq); 0: every key
};

}  // namespace dmattn
