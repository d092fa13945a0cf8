// fwd.cu — forward kernels: O = softmax(mask(softcap(scale * Q K^T + bias))) V.
//
// fwd_kernel (mma.sync, sm_80 and later): one CTA (4 warps) owns a query tile (fwd_block.cuh:
// `pack` heads of one GQA group x kBlockM / pack sequence rows) and walks the key tiles
// [t_begin, t_end) of its split in order, visiting only the active ones:
//   causal  — tiles wholly above the bottom-right diagonal are never visited;
//   mask    — a scan first reads the CTA's mask rows and sets one bit per key tile holding a kept
//             key; all-zero tiles are skipped (no K/V/bias loads, no math).
// Each warp owns MA 16-row atoms of S = Q K^T and O += P V (MmaSyncTiles, tile_mma.cuh); the S
// accumulator is reused as the A operand of P V. On Hopper, fwd_wgmma.cu runs the same work on
// warpgroup MMAs with the products overlapped with the softmax.
//
// Shared memory (bytes; a tile of Q/K/V is rows x (D+8) x 2):
//   sQ     tile of kBlockM rows                     loaded once
//   stage  stages x [ K | V | mask | bias ]         one active key tile each, a ring
//            K, V   tiles of kBlockN rows
//            mask   rows x (kBlockN * E + 16)       rows = kBlockM / pack
//            bias   rows x (kBlockN * E + 16)
//   sBits  one bit per key tile of the split (mask scan result)
// cp.async pipeline (stages = 2 or 3, the most that keep two CTAs per SM): tile i+stages-1 is
// copied in while tile i is computed. One barrier per tile: after it, tile i has landed and every
// warp is done with tile i-1, whose stage is the one refilled next.
//
// With num_splits > 1 (short queries over long keys, or too few tiles to fill the GPU) each split
// writes a normalized fp32 partial output and its lse; fwd_combine_kernel merges them:
//   lse = log sum_s exp(lse_s) ;  O = sum_s exp(lse_s - lse) O_s
#include "combine.cuh"
#include "fwd_block.cuh"
#include "tile_mma.cuh"

namespace dmattn {

template <typename T, int HEAD_DIM, int MASK_BYTES, int BIAS_BYTES, bool CAUSAL, bool SOFTCAP>
__global__ void __launch_bounds__(128)
fwd_kernel(const __grid_constant__ FwdParams p) {
  typedef MmaSyncTiles<T, HEAD_DIM, MASK_BYTES + BIAS_BYTES != 0> Tiles;
  constexpr int BM = Tiles::kBlockM, BN = Tiles::kBlockN;
  constexpr int MA = Tiles::MA, NA = Tiles::NA, DA = Tiles::DA;
  typedef FwdBlock<T, HEAD_DIM, BM, BN, 128, MASK_BYTES, BIAS_BYTES, CAUSAL, SOFTCAP> Block;
  const Block blk(p, grid_tile<CAUSAL>());

  extern __shared__ __align__(16) unsigned char smem[];
  constexpr int kKVBytes = Tiles::tile_bytes(BN);
  const int stage_bytes = (2 * kKVBytes + blk.seq_rows * (Block::kMaskRow + Block::kBiasRow) + 15) / 16 * 16;
  u16* sQ = reinterpret_cast<u16*>(smem);
  unsigned char* sStages = smem + Tiles::tile_bytes(BM);
  u32* sBits = reinterpret_cast<u32*>(sStages + p.stages * stage_bytes);
  auto sK = [&](int st) { return reinterpret_cast<u16*>(sStages + st * stage_bytes); };
  auto sV = [&](int st) { return reinterpret_cast<u16*>(sStages + st * stage_bytes + kKVBytes); };
  auto sMask = [&](int st) { return sStages + st * stage_bytes + 2 * kKVBytes; };
  auto sBias = [&](int st) { return sMask(st) + blk.seq_rows * Block::kMaskRow; };
  auto load_tile = [&](int t, int st) {
    blk.template load_k<Tiles>(sK(st), t);
    blk.template load_v<Tiles>(sV(st), t);
    blk.load_aux(sMask(st), sBias(st), t);
  };

  blk.scan(sBits);
  blk.template load_q<Tiles>(sQ);
  // Prologue: the first stages - 1 active tiles, one commit group each (Q joins the first).
  int t_load = blk.next_tile(sBits, blk.t_begin);
  for (int st = 0; st < p.stages - 1; ++st) {
    if (t_load < blk.t_end) {
      load_tile(t_load, st);
      t_load = blk.next_tile(sBits, t_load + 1);
    }
    cp_async_commit();
  }

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, tq = lane % 4;
  const int warp_row0 = warp * MA * 16;
  int aux_row[MA];  // row of the mask/bias tile for this lane's row g of atom a (g + 8: +8)
#pragma unroll
  for (int at = 0; at < MA; ++at) aux_row[at] = (warp_row0 + at * 16) % blk.seq_rows + g;

  float acc_o[MA][DA][4];
#pragma unroll
  for (int at = 0; at < MA; ++at)
#pragma unroll
    for (int dt = 0; dt < DA; ++dt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_o[at][dt][e] = 0.f;
  OnlineSoftmax<MA, NA, DA> softmax(blk.score_unit());
  int visited = 0;

  int stage = 0, load_stage = p.stages - 1;
  for (int t = blk.next_tile(sBits, blk.t_begin); t < blk.t_end; t = blk.next_tile(sBits, t + 1)) {
    if (p.stages == 3) cp_async_wait<1>(); else cp_async_wait<0>();
    __syncthreads();
    if (t_load < blk.t_end) {
      load_tile(t_load, load_stage);
      t_load = blk.next_tile(sBits, t_load + 1);
    }
    cp_async_commit();

    const bool full = blk.mask_rows_full(sMask(stage), aux_row, lane);  // (before S takes registers)
    float s[MA][NA][4];
    Tiles::qk(s, sQ, sK(stage), warp_row0, lane);                   // S = Q K_t^T
    blk.score_mods(s, sMask(stage), sBias(stage), aux_row, t, tq, full);  // mods(S)
    float alpha[MA][2];
    if (softmax.update(s, alpha)) softmax.rescale(acc_o, alpha);     // P = 2^(unit (s - m)), O *= alpha
    Tiles::pv(acc_o, s, sV(stage), lane);                            // O += P V_t
    stage = stage + 1 == p.stages ? 0 : stage + 1;
    load_stage = load_stage + 1 == p.stages ? 0 : load_stage + 1;
    ++visited;
  }
  cp_async_wait<0>();
  blk.store(acc_o, softmax, warp_row0, g, tq);
  if (p.tiles_visited != nullptr && threadIdx.x == 0) atomicAdd(p.tiles_visited, static_cast<u64>(visited));
}

// Merges split partials (combine.cuh). Up to kWarpCombineSplits splits: a warp per (batch, head,
// row), kCombineWarps rows per CTA (a CTA per row is a 32-thread CTA for a few splits, bound by its
// barriers and by the 32 CTAs a multiprocessor holds; seed_32k forward 1.385 -> 1.379 ms); more:
// one CTA per row, sized by the host to the row's work (config.combine_threads).
template <typename T>
__global__ void __launch_bounds__(kMaxCombineThreads) fwd_combine_kernel(const __grid_constant__ FwdParams p) {
  if (p.num_splits <= kWarpCombineSplits) {
    __shared__ float weight[kCombineWarps][kWarpCombineSplits];
    const i64 rows = static_cast<i64>(p.a.batch) * p.a.heads * p.a.seqlen_q;
    const i64 row = static_cast<i64>(blockIdx.x) * kCombineWarps + threadIdx.x / 32;
    if (row < rows) combine_row_warp<T>(p, row, weight[threadIdx.x / 32]);
  } else {
    combine_row<T>(p, blockIdx.x);
  }
}

}  // namespace dmattn
