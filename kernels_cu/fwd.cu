// fwd.cu — forward kernels: O = softmax(mask(softcap(scale * Q K^T + bias))) V.
//
// fwd_kernel: one CTA (4 warps) owns a query tile of kBlockM rows = `pack` query heads of one GQA
// group x (kBlockM / pack) sequence rows (heads sharing a CTA share every K/V, mask and bias tile:
// each is loaded once for the group). It walks the key tiles [t_begin, t_end) of its split in
// order, visiting only the active ones:
//   causal  — tiles wholly above the bottom-right diagonal are never visited;
//   mask    — a scan first reads the CTA's mask rows and sets one bit per key tile holding a kept
//             key; all-zero tiles are skipped (no K/V/bias loads, no math).
// The two products S = Q K^T and O += P V come from the tile policy (tile_mma.cuh): mma.sync tiles
// (kBlockM = 128 or 64, each warp owning MA 16-row atoms) or, on Hopper, wgmma tiles (one 64-row
// warpgroup). Either way S, P and O live in registers in the same layout (the S accumulator is
// reused as the A operand of P V), so masking, softmax and the epilogue below are shared.
//
// Shared memory (bytes; a "tile" of Q/K/V is Tiles::tile_bytes(rows): rows x (D+8) x 2 padded
// for mma.sync, rows x D x 2 in 128-byte swizzled slabs for wgmma):
//   sQ     tile of kBlockM rows                     loaded once
//   stage  stages x [ K | V | mask | bias ]         one active key tile each, a ring; each stage
//            K, V   tiles of kBlockN rows           rounded up to Tiles::kStageAlign
//            mask   rows x (kBlockN * E + 16)       rows = kBlockM / pack
//            bias   rows x (kBlockN * E + 16)
//   sBits  one bit per key tile of the split (mask scan result)
// cp.async pipeline (stages = 2 or 3, the most that keep two CTAs per SM): tile i+stages-1 is
// copied in while tile i is computed. One barrier per tile: after it, tile i has landed
// (wait_group, then Tiles::copies_visible) and every warp is done with tile i-1, whose stage is
// the one refilled next.
//
// With num_splits > 1 (short queries over long keys, or too few tiles to fill the GPU) each split
// writes a normalized fp32 partial output and its lse; fwd_combine_kernel merges them:
//   lse = log sum_s exp(lse_s) ;  O = sum_s exp(lse_s - lse) O_s
#include "params.cuh"
#include "mask.cuh"
#include "softmax.cuh"
#include "tile_mma.cuh"

namespace dmattn {

template <typename T, int HEAD_DIM, int MASK_BYTES, int BIAS_BYTES, bool CAUSAL, bool SOFTCAP, bool WGMMA>
__global__ void __launch_bounds__(128)
fwd_kernel(const __grid_constant__ FwdParams p) {
  typedef typename FwdTiles<T, HEAD_DIM, MASK_BYTES + BIAS_BYTES != 0, WGMMA>::type Tiles;
  constexpr int BM = Tiles::kBlockM, BN = Tiles::kBlockN, NT = 128;
  constexpr int MA = Tiles::MA, NA = Tiles::NA, DA = Tiles::DA;
  constexpr int kMaskRow = MASK_BYTES ? aux_row_bytes(BN, MASK_BYTES) : 0;
  constexpr int kBiasRow = BIAS_BYTES ? aux_row_bytes(BN, BIAS_BYTES) : 0;
  typedef typename Raw<MASK_BYTES ? MASK_BYTES : 1>::type MaskRaw;
  typedef typename Raw<BIAS_BYTES ? BIAS_BYTES : 2>::type BiasRaw;
  const AttnParams& a = p.a;

  // ---- which rows, heads and keys this CTA owns
  const int seq_rows = BM / a.pack;
  // Causal: the last query tiles see the most keys; launching them first shortens the tail.
  const int m_block = CAUSAL ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
  const int m0 = m_block * seq_rows;
  const int head_groups = a.heads / a.pack;
  const int b = blockIdx.y / head_groups;
  const int h0 = (blockIdx.y % head_groups) * a.pack;
  const int split = blockIdx.z;
  const int row_last = min(m0 + seq_rows, a.seqlen_q) - 1;
  const int key_end = visible_key_end<CAUSAL>(row_last, a.seqlen_q, a.seqlen_k);
  const int n_tiles = key_end > 0 ? (key_end + BN - 1) / BN : 0;
  const int t_begin = min(n_tiles, split * p.tiles_per_split);
  const int t_end = min(n_tiles, t_begin + p.tiles_per_split);

  extern __shared__ __align__(1024) unsigned char smem[];
  constexpr int kKVBytes = Tiles::tile_bytes(BN);
  constexpr int kAlign = Tiles::kStageAlign;
  const int stage_bytes = (2 * kKVBytes + seq_rows * (kMaskRow + kBiasRow) + kAlign - 1) / kAlign * kAlign;
  u16* sQ = reinterpret_cast<u16*>(smem);
  unsigned char* sStages = smem + Tiles::tile_bytes(BM);
  u32* sBits = reinterpret_cast<u32*>(sStages + p.stages * stage_bytes);
  auto sK = [&](int st) { return reinterpret_cast<u16*>(sStages + st * stage_bytes); };
  auto sV = [&](int st) { return reinterpret_cast<u16*>(sStages + st * stage_bytes + kKVBytes); };
  auto sMask = [&](int st) { return sStages + st * stage_bytes + 2 * kKVBytes; };
  auto sBias = [&](int st) { return sStages + st * stage_bytes + 2 * kKVBytes + seq_rows * kMaskRow; };

  const u16* q = static_cast<const u16*>(a.q) + b * a.q_stride[0];
  const u16* k = static_cast<const u16*>(a.k) + b * a.k_stride[0] + (h0 / a.group) * a.k_stride[2];
  const u16* v = static_cast<const u16*>(a.v) + b * a.v_stride[0] + (h0 / a.group) * a.v_stride[2];
  // Every head of the CTA reads the same mask/bias head (the host packs only when that holds).
  const unsigned char* mask = MASK_BYTES
      ? static_cast<const unsigned char*>(a.mask) +
            (b * a.mask_stride[0] + (h0 / a.mask_head_div) * a.mask_stride[1]) * MASK_BYTES
      : nullptr;
  const unsigned char* bias = BIAS_BYTES
      ? static_cast<const unsigned char*>(a.bias) +
            (b * a.bias_stride[0] + (h0 / a.bias_head_div) * a.bias_stride[1]) * BIAS_BYTES
      : nullptr;

  // ---- mask scan: one bit per key tile of the split that holds a kept key
  if constexpr (MASK_BYTES > 0) {
    for (int i = threadIdx.x; i < (t_end - t_begin + 31) / 32; i += NT) sBits[i] = 0u;
    __syncthreads();
    scan_mask_tiles<MASK_BYTES, BN, NT, CAUSAL>(sBits, mask, a.mask_stride, m0, seq_rows, t_begin,
                                                t_end, a.seqlen_q, a.seqlen_k, a.mask_vec);
    __syncthreads();
  }
  auto next_tile = [&](int t) {
    if constexpr (MASK_BYTES > 0) return t_begin + next_set_bit(sBits, t - t_begin, t_end - t_begin);
    return t;
  };

  // ---- copies of key tile t (K, V, mask, bias) into stage st
  auto load_tile = [&](int t, int st) {
    const int n0 = t * BN;
    Tiles::template load<BN>(sK(st), a.head_dim, a.k, [&](int r) -> const u16* {
      return n0 + r < a.seqlen_k ? k + static_cast<i64>(n0 + r) * a.k_stride[1] : nullptr;
    });
    Tiles::template load<BN>(sV(st), a.head_dim, a.v, [&](int r) -> const u16* {
      return n0 + r < a.seqlen_k ? v + static_cast<i64>(n0 + r) * a.v_stride[1] : nullptr;
    });
    if constexpr (MASK_BYTES > 0)
      load_aux_tile<MASK_BYTES, BN, NT>(sMask(st), mask, a.mask_stride, m0, seq_rows, n0, a.seqlen_q,
                                        a.seqlen_k, a.mask_vec);
    if constexpr (BIAS_BYTES > 0)
      load_aux_tile<BIAS_BYTES, BN, NT>(sBias(st), bias, a.bias_stride, m0, seq_rows, n0, a.seqlen_q,
                                        a.seqlen_k, a.bias_vec);
  };

  // Tile row r is query head h0 + r / seq_rows at sequence row m0 + r % seq_rows.
  Tiles::template load<BM>(sQ, a.head_dim, a.q, [&](int r) -> const u16* {
    const int row = m0 + r % seq_rows;
    return row < a.seqlen_q
        ? q + static_cast<i64>(row) * a.q_stride[1] + static_cast<i64>(h0 + r / seq_rows) * a.q_stride[2]
        : nullptr;
  });
  // Prologue: the first stages - 1 active tiles, one commit group each (Q joins the first).
  int t_load = next_tile(t_begin);
  for (int st = 0; st < p.stages - 1; ++st) {
    if (t_load < t_end) {
      load_tile(t_load, st);
      t_load = next_tile(t_load + 1);
    }
    cp_async_commit();
  }

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, tq = lane % 4;
  const int warp_row0 = warp * MA * 16;
  int aux_row[MA];  // row of the mask/bias tile for this lane's row g of atom a (g + 8: +8)
#pragma unroll
  for (int at = 0; at < MA; ++at) aux_row[at] = (warp_row0 + at * 16) % seq_rows + g;

  float acc_o[MA][DA][4];
#pragma unroll
  for (int at = 0; at < MA; ++at)
#pragma unroll
    for (int dt = 0; dt < DA; ++dt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_o[at][dt][e] = 0.f;
  OnlineSoftmax<MA, NA, DA> softmax;
  const float cap_log2 = a.softcap * kLog2e, scale_over_cap = a.scale / a.softcap;
  const float inv_cap = 1.f / a.softcap;
  int visited = 0;

  int stage = 0, load_stage = p.stages - 1;
  for (int t = next_tile(t_begin); t < t_end; t = next_tile(t + 1)) {
    if (p.stages == 3) cp_async_wait<1>(); else cp_async_wait<0>();
    Tiles::copies_visible();
    __syncthreads();
    if (t_load < t_end) {
      load_tile(t_load, load_stage);
      t_load = next_tile(t_load + 1);
    }
    cp_async_commit();
    const u16* sKt = sK(stage);
    const u16* sVt = sV(stage);
    const unsigned char* sMaskT = sMask(stage);
    const unsigned char* sBiasT = sBias(stage);

    // S = Q K_t^T
    float s[MA][NA][4];
    Tiles::qk(s, sQ, sKt, warp_row0, lane);

    // s2 = log2(e) * mask(softcap(scale * s + bias)); hidden positions get -inf.
    const int n0 = t * BN;
    const bool edge = n0 + BN > a.seqlen_k || (CAUSAL && n0 + BN - 1 > m0 + a.seqlen_k - a.seqlen_q);
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
          if constexpr (MASK_BYTES > 0)
            mask_pair(reinterpret_cast<const MaskRaw*>(sMaskT + r * kMaskRow), pair, keep[0], keep[1]);
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            const float bval = fmaxf(j == 0 ? bv.x : bv.y, kBiasFloor);
            float x = s[at][nt][2 * h + j];
            x = SOFTCAP ? cap_log2 * fast_tanh(fmaf(x, scale_over_cap, bval * inv_cap))
                        : fmaf(x, a.scale_log2, bval * kLog2e);
            if (edge) {
              const int key = n0 + 2 * pair + j;
              keep[j] = keep[j] && key < a.seqlen_k &&
                        (!CAUSAL || key <= m0 + r + a.seqlen_k - a.seqlen_q);
            }
            s[at][nt][2 * h + j] = keep[j] ? x : neg_inf();
          }
        }
      }
    softmax.update(s, acc_o);

    // O += P V_t
    Tiles::pv(acc_o, s, sVt, lane);
    stage = stage + 1 == p.stages ? 0 : stage + 1;
    load_stage = load_stage + 1 == p.stages ? 0 : load_stage + 1;
    ++visited;
  }
  cp_async_wait<0>();

  // ---- epilogue: O / l and lse, straight from registers (rows outside the problem are dropped)
#pragma unroll
  for (int at = 0; at < MA; ++at)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float inv_l, lse;
      softmax.finish(at, h, inv_l, lse);
      const int tile_row = warp_row0 + at * 16 + g + 8 * h;
      const int row = m0 + tile_row % seq_rows;
      const int head = h0 + tile_row / seq_rows;
      if (row >= a.seqlen_q) continue;
      const i64 bh = static_cast<i64>(b) * a.heads + head;
      if (p.num_splits == 1) {
        u16* o = static_cast<u16*>(p.out) + b * p.o_stride[0] + static_cast<i64>(row) * p.o_stride[1] +
                 static_cast<i64>(head) * p.o_stride[2];
#pragma unroll
        for (int dt = 0; dt < DA; ++dt) {
          const int d = dt * 8 + 2 * tq;
          if (d < a.head_dim)
            *reinterpret_cast<u32*>(o + d) = T::pack(acc_o[at][dt][2 * h] * inv_l, acc_o[at][dt][2 * h + 1] * inv_l);
        }
        if (tq == 0) p.lse[bh * a.seqlen_q + row] = lse;
      } else {
        const i64 split_row = (static_cast<i64>(split) * a.batch * a.heads + bh) * a.seqlen_q + row;
        float* o = p.o_split + split_row * a.head_dim;
#pragma unroll
        for (int dt = 0; dt < DA; ++dt) {
          const int d = dt * 8 + 2 * tq;
          if (d < a.head_dim)
            *reinterpret_cast<float2*>(o + d) = make_float2(acc_o[at][dt][2 * h] * inv_l, acc_o[at][dt][2 * h + 1] * inv_l);
        }
        if (tq == 0) p.lse_split[split_row] = lse;
      }
    }
  if (p.tiles_visited != nullptr && threadIdx.x == 0) atomicAdd(p.tiles_visited, static_cast<u64>(visited));
}

// Merges split partials; one warp per (batch, head, row).
template <typename T>
__global__ void __launch_bounds__(128) fwd_combine_kernel(const __grid_constant__ FwdParams p) {
  const AttnParams& a = p.a;
  const i64 rows = static_cast<i64>(a.batch) * a.heads * a.seqlen_q;
  const i64 row = static_cast<i64>(blockIdx.x) * 4 + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  float mx = neg_inf();
  for (int s = 0; s < p.num_splits; ++s) mx = fmaxf(mx, p.lse_split[s * rows + row]);
  float total = 0.f;
  if (mx != neg_inf())
    for (int s = 0; s < p.num_splits; ++s) total += __expf(p.lse_split[s * rows + row] - mx);
  const float lse = mx == neg_inf() ? neg_inf() : mx + logf(total);
  const i64 bh = row / a.seqlen_q;
  const int seq = static_cast<int>(row % a.seqlen_q);
  const int b = static_cast<int>(bh / a.heads), head = static_cast<int>(bh % a.heads);
  u16* o = static_cast<u16*>(p.out) + b * p.o_stride[0] + static_cast<i64>(seq) * p.o_stride[1] +
           static_cast<i64>(head) * p.o_stride[2];
  for (int d = 2 * lane; d < a.head_dim; d += 64) {
    float2 acc = make_float2(0.f, 0.f);
    if (mx != neg_inf())
      for (int s = 0; s < p.num_splits; ++s) {
        const float w = __expf(p.lse_split[s * rows + row] - lse);
        const float2 x = *reinterpret_cast<const float2*>(p.o_split + (s * rows + row) * a.head_dim + d);
        acc.x += w * x.x;
        acc.y += w * x.y;
      }
    *reinterpret_cast<u32*>(o + d) = T::pack(acc.x, acc.y);
  }
  if (lane == 0) p.lse[row] = lse;
}

}  // namespace dmattn
