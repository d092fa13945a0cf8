// fwd_block.cuh — what a forward CTA (or work item) owns and the per-tile work the forward kernels
// share: the query rows and heads of its tile, its key range, the copies of Q/K/V/mask/bias tiles,
// the mask scan, the score transform and the output stores. fwd.cu (mma.sync), fwd_wgmma.cu
// (Hopper, narrow) and fwd_ws.cu (Hopper, wide) differ in their main loop and shared-memory ring.
//
// A query tile has kBlockM rows = `pack` query heads of one GQA group x (kBlockM / pack) sequence
// rows: tile row r is head h0 + r / seq_rows at sequence row m0 + r % seq_rows. Heads sharing a
// CTA share every K/V, mask and bias tile (the host packs only when that holds).
#pragma once
#include "params.cuh"
#include "mask.cuh"
#include "score_mod.cuh"
#include "softmax.cuh"

namespace dmattn {

// What a CTA (or, in the persistent kernel, one work item) computes: query tile m_block of row group
// (batch, pack of heads) row_group, key split `split`.
struct TileCoord {
  int m_block, row_group, split;
};

// One tile per CTA: blockIdx. Causal: the last query tiles see the most keys; launching them first
// shortens the tail.
template <bool CAUSAL>
__device__ __forceinline__ TileCoord grid_tile() {
  return {CAUSAL ? static_cast<int>(gridDim.x - 1 - blockIdx.x) : static_cast<int>(blockIdx.x),
          static_cast<int>(blockIdx.y), static_cast<int>(blockIdx.z)};
}

// Persistent kernels: work item `item` of p.m_blocks x p.row_groups x p.num_splits, in the same
// order (with causal, the query tiles with the most keys first).
template <bool CAUSAL>
__device__ __forceinline__ TileCoord work_tile(const FwdParams& p, int item) {
  const int per_m = p.row_groups * p.num_splits, rank = item / per_m, rest = item - rank * per_m;
  return {CAUSAL ? p.m_blocks - 1 - rank : rank, rest / p.num_splits, rest % p.num_splits};
}

template <typename T, int HEAD_DIM, int BLOCK_M, int BLOCK_N, int THREADS, int MASK_BYTES, int BIAS_BYTES,
          bool CAUSAL, bool SOFTCAP>
struct FwdBlock {
  static constexpr int kThreads = THREADS;
  static constexpr int kMaskRow = MASK_BYTES ? aux_row_bytes(BLOCK_N, MASK_BYTES) : 0;
  static constexpr int kBiasRow = BIAS_BYTES ? aux_row_bytes(BLOCK_N, BIAS_BYTES) : 0;
  typedef typename Raw<MASK_BYTES ? MASK_BYTES : 1>::type MaskRaw;
  typedef typename Raw<BIAS_BYTES ? BIAS_BYTES : 2>::type BiasRaw;

  const FwdParams& p;
  const AttnParams& a;
  int seq_rows, m0, b, h0, split;  // seq_rows = BLOCK_M / pack, a power of two
  int t_begin, t_end;  // key tiles of this split that the causal limit leaves
  const u16* q;
  const u16* k;
  const u16* v;
  const unsigned char* mask;
  const unsigned char* bias;

  __device__ __forceinline__ FwdBlock(const FwdParams& params, TileCoord tile) : p(params), a(params.a) {
    seq_rows = BLOCK_M / a.pack;
    m0 = tile.m_block * seq_rows;
    const int head_groups = a.heads / a.pack;
    b = tile.row_group / head_groups;
    h0 = (tile.row_group % head_groups) * a.pack;
    split = tile.split;
    const int row_last = min(m0 + seq_rows, a.seqlen_q) - 1;
    const int key_end = visible_key_end<CAUSAL>(row_last, a.seqlen_q, a.seqlen_k);
    const int n_tiles = key_end > 0 ? (key_end + BLOCK_N - 1) / BLOCK_N : 0;
    t_begin = min(n_tiles, split * p.tiles_per_split);
    t_end = min(n_tiles, t_begin + p.tiles_per_split);
    q = static_cast<const u16*>(a.q) + b * a.q_stride[0];
    k = static_cast<const u16*>(a.k) + b * a.k_stride[0] + (h0 / a.group) * a.k_stride[2];
    v = static_cast<const u16*>(a.v) + b * a.v_stride[0] + (h0 / a.group) * a.v_stride[2];
    mask = MASK_BYTES ? static_cast<const unsigned char*>(a.mask) +
                            (b * a.mask_stride[0] + (h0 / a.mask_head_div) * a.mask_stride[1]) * MASK_BYTES
                      : nullptr;
    bias = BIAS_BYTES ? static_cast<const unsigned char*>(a.bias) +
                            (b * a.bias_stride[0] + (h0 / a.bias_head_div) * a.bias_stride[1]) * BIAS_BYTES
                      : nullptr;
  }

  // ---- mask scan: one bit per key tile of the split that holds a kept key (all threads; ends
  // with a barrier). Without a mask every tile is active.
  __device__ __forceinline__ void scan(u32* bits) const {
    if constexpr (MASK_BYTES > 0) {
      for (int i = threadIdx.x; i < (t_end - t_begin + 31) / 32; i += kThreads) bits[i] = 0u;
      __syncthreads();
      scan_mask_tiles<MASK_BYTES, BLOCK_N, kThreads, CAUSAL>(bits, mask, a.mask_stride, m0, seq_rows, t_begin,
                                                     t_end, a.seqlen_q, a.seqlen_k, a.mask_vec);
      __syncthreads();
    }
  }
  // The first active key tile at or after t (t_end: none).
  __device__ __forceinline__ int next_tile(const u32* bits, int t) const {
    if constexpr (MASK_BYTES > 0) return t_begin + next_set_bit(bits, t - t_begin, t_end - t_begin);
    return t;
  }

  // ---- copies (cp.async; rows outside the problem are zero-filled). Tiles: the smem layout policy.
  // Tile row r -> (head h0 + (r >> seq_shift()), sequence row m0 + (r & (seq_rows - 1))).
  __device__ __forceinline__ int seq_shift() const { return __ffs(seq_rows) - 1; }

  template <typename Tiles>
  __device__ __forceinline__ void load_q(u16* sQ) const {
    const int shift = seq_shift();
    load_rows<HEAD_DIM, BLOCK_M, kThreads, typename Tiles::template Layout<BLOCK_M>>(
        sQ, a.head_dim, a.q, [&](int r) -> const u16* {
          const int row = m0 + (r & (seq_rows - 1));
          return row < a.seqlen_q
              ? q + static_cast<i64>(row) * a.q_stride[1] + static_cast<i64>(h0 + (r >> shift)) * a.q_stride[2]
              : nullptr;
        });
  }
  // K or V rows of key tile t (base: k or v, row_stride: its key stride).
  template <typename Tiles>
  __device__ __forceinline__ void load_keys(u16* smem, const u16* base, i64 row_stride, int t) const {
    const int n0 = t * BLOCK_N;
    load_strided_rows<HEAD_DIM, BLOCK_N, kThreads, typename Tiles::template Layout<BLOCK_N>>(
        smem, base + static_cast<i64>(n0) * row_stride, row_stride, a.seqlen_k - n0, a.head_dim);
  }
  template <typename Tiles>
  __device__ __forceinline__ void load_k(u16* sK, int t) const { load_keys<Tiles>(sK, k, a.k_stride[1], t); }
  template <typename Tiles>
  __device__ __forceinline__ void load_v(u16* sV, int t) const { load_keys<Tiles>(sV, v, a.v_stride[1], t); }
  // The (seq_rows x BLOCK_N) mask and bias tiles of key tile t, copied by COPIERS threads numbered
  // tid (the whole CTA by default); the mask's only if with_mask (fwd_ws: a tile the block map
  // describes whole needs no mask rows).
  template <int COPIERS = kThreads>
  __device__ __forceinline__ void load_aux(unsigned char* sMask, unsigned char* sBias, int t,
                                           int tid = threadIdx.x, bool with_mask = true) const {
    const int n0 = t * BLOCK_N;
    if constexpr (MASK_BYTES > 0)
      if (with_mask)
        load_aux_tile<MASK_BYTES, BLOCK_N, COPIERS>(sMask, mask, a.mask_stride, m0, seq_rows, n0, a.seqlen_q,
                                                    a.seqlen_k, a.mask_vec, tid);
    if constexpr (BIAS_BYTES > 0)
      load_aux_tile<BIAS_BYTES, BLOCK_N, COPIERS>(sBias, bias, a.bias_stride, m0, seq_rows, n0, a.seqlen_q,
                                                  a.seqlen_k, a.bias_vec, tid);
  }

  // Base-2 logarithm per score unit (score_mod.cuh): the online softmax's multiplier.
  __device__ __forceinline__ float score_unit() const { return ScoreMod<(BIAS_BYTES > 0), SOFTCAP>(a).unit; }

  // True when every mask element of this warp's rows of the tile (16 rows per atom: aux_row[at] is
  // lane g's row of atom at) is "keep": its scores then skip the per-element mask test. Block-
  // structured masks (top-k smoothed to blocks, block-sparse layouts) keep whole tiles, so most
  // computed tiles take that path. A few 16-byte shared loads per lane, issued while the tile's
  // Q K^T runs; warp-uniform. Bool/uint8 masks only: float masks are 2-4x the loads and
  // registers for a rare input, and always take the masked path.
  template <int MA>
  __device__ __forceinline__ bool mask_rows_full(const unsigned char* sMaskT, const int (&aux_row)[MA],
                                                 int lane) const {
    if constexpr (MASK_BYTES == 0) {
      return true;
    } else if constexpr (MASK_BYTES != 1) {
      return false;
    } else {
      constexpr int kRowChunks = BLOCK_N / 16;
      u32 zero = 0u;
#pragma unroll
      for (int at = 0; at < MA; ++at) {
        const unsigned char* rows = sMaskT + (aux_row[at] - lane / 4) * kMaskRow;
#pragma unroll
        for (int c = lane; c < 16 * kRowChunks; c += 32)
          zero |= chunk_zero_bytes(
              *reinterpret_cast<const uint4*>(rows + (c / kRowChunks) * kMaskRow + (c % kRowChunks) * 16));
      }
      return __all_sync(0xffffffffu, zero == 0u);
    }
  }

  // ---- scores of key tile t, in place, in score units: mods(S), hidden positions -inf. s holds MA
  // 16-row atoms in the mma C layout; aux_row[at] is the mask/bias row of this lane's row g of atom
  // at (g + 8: one row further); full: the mask needs no test per score (mask_rows_full, or fwd_ws's
  // block map). Only the last key tile and the tiles the causal diagonal crosses need bounds checks;
  // the other tiles take a copy without them, and without the mask test when full (no index math or
  // selects per score: the common tile is the softmax's critical path). EDGE_FULL: an edge tile
  // that is full takes a copy without the mask test too (fwd_ws, whose block map says so of most
  // diagonal tiles of a block mask; the narrow kernels keep one edge copy: a second added ~400
  // instructions to fwd_wgmma_kernel for tiles mask_rows_full seldom finds full).
  template <bool EDGE_FULL = false, int MA, int NA>
  __device__ __forceinline__ void score_mods(float (&s)[MA][NA][4], const unsigned char* sMaskT,
                                             const unsigned char* sBiasT, const int (&aux_row)[MA], int t,
                                             int tq, bool full) const {
    const int n0 = t * BLOCK_N;
    const bool edge = n0 + BLOCK_N > a.seqlen_k || (CAUSAL && n0 + BLOCK_N - 1 > m0 + a.seqlen_k - a.seqlen_q);
    if (EDGE_FULL && edge && full)
      score_mods_tile<true, false>(s, sMaskT, sBiasT, aux_row, n0, tq);
    else if (edge)
      score_mods_tile<true, true>(s, sMaskT, sBiasT, aux_row, n0, tq);
    else if (!full)
      score_mods_tile<false, true>(s, sMaskT, sBiasT, aux_row, n0, tq);
    else
      score_mods_tile<false, false>(s, sMaskT, sBiasT, aux_row, n0, tq);
  }

  template <bool EDGE, bool MASKED, int MA, int NA>
  __device__ __forceinline__ void score_mods_tile(float (&s)[MA][NA][4], const unsigned char* sMaskT,
                                                  const unsigned char* sBiasT, const int (&aux_row)[MA],
                                                  int n0, int tq) const {
    const ScoreMod<(BIAS_BYTES > 0), SOFTCAP> mod(a);
#pragma unroll
    for (int at = 0; at < MA; ++at)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = aux_row[at] + 8 * h;
#pragma unroll
        for (int nt = 0; nt < NA; ++nt) {
          const int pair = nt * 4 + tq;  // keys 2 * pair and 2 * pair + 1 of the tile
          float2 bv = make_float2(0.f, 0.f);
          if constexpr (BIAS_BYTES > 0)
            bv = bias_pair<T>(reinterpret_cast<const BiasRaw*>(sBiasT + r * kBiasRow), pair);
          bool keep[2] = {true, true};
          if constexpr (MASK_BYTES > 0 && MASKED)
            mask_pair(reinterpret_cast<const MaskRaw*>(sMaskT + r * kMaskRow), pair, keep[0], keep[1]);
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            const float x = mod(s[at][nt][2 * h + j], j == 0 ? bv.x : bv.y);
            if constexpr (EDGE) {
              const int key = n0 + 2 * pair + j;
              keep[j] = keep[j] && key < a.seqlen_k && (!CAUSAL || key <= m0 + r + a.seqlen_k - a.seqlen_q);
            }
            s[at][nt][2 * h + j] = keep[j] ? x : neg_inf();
          }
        }
      }
  }

  // ---- a tile whose rows see no kept key: out = 0 and lse = -inf (with splits, the partial and its
  // lse), written by WRITERS threads numbered tid with 16-byte stores. Each thread keeps one
  // column chunk and steps a pointer down the rows: the persistent kernel's scheduler writes a
  // sparse mask's empty tiles, and index arithmetic per store made that cost ~4 us per tile.
  template <int WRITERS>
  __device__ __forceinline__ void store_empty(int tid) const {
    const int rows = min(seq_rows, a.seqlen_q - m0);
    for (int j = 0; j < a.pack; ++j) {
      const i64 bh = static_cast<i64>(b) * a.heads + h0 + j;
      if (p.num_splits == 1) {
        constexpr int kChunks = HEAD_DIM / 8;  // of 8 columns
        static_assert(WRITERS % kChunks == 0, "whole rows per step");
        const int c = tid % kChunks;
        if (c * 8 < a.head_dim) {
          u16* o = static_cast<u16*>(p.out) + b * p.o_stride[0] + static_cast<i64>(m0) * p.o_stride[1] +
                   static_cast<i64>(h0 + j) * p.o_stride[2] + c * 8;
          for (int r = tid / kChunks; r < rows; r += WRITERS / kChunks)
            *reinterpret_cast<uint4*>(o + r * p.o_stride[1]) = make_uint4(0u, 0u, 0u, 0u);
        }
        if (p.lse != nullptr)
          for (int r = tid; r < rows; r += WRITERS) p.lse[bh * a.seqlen_q + m0 + r] = neg_inf();
      } else {  // the tile's rows of the partial are one contiguous run of rows x head_dim floats
        const i64 split_row = (static_cast<i64>(split) * a.batch * a.heads + bh) * a.seqlen_q + m0;
        float4* o = reinterpret_cast<float4*>(p.o_split + split_row * a.head_dim);
        for (int i = tid; i < rows * a.head_dim / 4; i += WRITERS) o[i] = make_float4(0.f, 0.f, 0.f, 0.f);
        for (int r = tid; r < rows; r += WRITERS) p.lse_split[split_row + r] = neg_inf();
      }
    }
  }

  // ---- epilogue: O / l and lse straight from registers (rows outside the problem are dropped);
  // with splits, a normalized fp32 partial and its lse for fwd_combine_kernel. O leaves in 16-byte
  // stores: a quad holds a row's 8-column chunks as four 4-byte pairs each, and quad_transpose
  // gives each lane whole chunks (H100, fwd_ws: the 4-byte stores, one per pair, cost ~1.8 us per
  // query tile, a quarter of a sparse tile's time).
  template <int MA, int NA, int DA>
  __device__ __forceinline__ void store(const float (&acc_o)[MA][DA][4], const OnlineSoftmax<MA, NA, DA>& softmax,
                                        int warp_row0, int g, int tq) const {
    static_assert(DA % 4 == 0, "whole quads of 8-column chunks");
#pragma unroll
    for (int at = 0; at < MA; ++at)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float inv_l, lse;
        softmax.finish(at, h, inv_l, lse);
        const int tile_row = warp_row0 + at * 16 + g + 8 * h;
        const int row = m0 + (tile_row & (seq_rows - 1));
        const int head = h0 + (tile_row >> seq_shift());
        const i64 bh = static_cast<i64>(b) * a.heads + head;
        if (p.num_splits == 1) {
          u16* o = static_cast<u16*>(p.out) + b * p.o_stride[0] + static_cast<i64>(row) * p.o_stride[1] +
                   static_cast<i64>(head) * p.o_stride[2];
#pragma unroll
          for (int c = 0; c < DA / 4; ++c) {  // chunks 4c .. 4c + 3: lane tq stores chunk 4c + tq
            u32 v[4];
#pragma unroll
            for (int j = 0; j < 4; ++j)
              v[j] = T::pack(acc_o[at][4 * c + j][2 * h] * inv_l, acc_o[at][4 * c + j][2 * h + 1] * inv_l);
            quad_transpose(v, tq);
            const int d = (4 * c + tq) * 8;
            if (row < a.seqlen_q && d < a.head_dim) *reinterpret_cast<uint4*>(o + d) = make_uint4(v[0], v[1], v[2], v[3]);
          }
          if (row < a.seqlen_q && tq == 0 && p.lse != nullptr) p.lse[bh * a.seqlen_q + row] = lse;
        } else if (row < a.seqlen_q) {
          const i64 split_row = (static_cast<i64>(split) * a.batch * a.heads + bh) * a.seqlen_q + row;
          float* o = p.o_split + split_row * a.head_dim;
#pragma unroll
          for (int dt = 0; dt < DA; ++dt) {
            const int d = dt * 8 + 2 * tq;
            if (d < a.head_dim)
              *reinterpret_cast<float2*>(o + d) =
                  make_float2(acc_o[at][dt][2 * h] * inv_l, acc_o[at][dt][2 * h + 1] * inv_l);
          }
          if (tq == 0) p.lse_split[split_row] = lse;
        }
      }
  }
};

}  // namespace dmattn
