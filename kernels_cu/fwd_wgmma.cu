// fwd_wgmma.cu — the narrow forward on Hopper warpgroup MMAs (sm_90a), products overlapped with
// the softmax. Same CTA ownership, block skipping, score transform and epilogue as fwd_kernel
// (fwd_block.cuh): one warpgroup, 64 query rows x 64-key tiles, K ring of 3, small enough that
// 2-4 CTAs share a multiprocessor and interleave. It runs at D = 64, and at D = 128 where the wide
// kernel (fwd_ws.cu: 128 x 128 tiles, warp-specialized) does not: no tensor maps for Q/K/V, mask
// or bias rows that are not 16-byte runs, or mask + bias rows too large for its ring.
//
// Why overlap: issued one after another, Q K^T, the softmax and P V take turns and the tensor
// cores idle during the softmax. wgmma is asynchronous, so each iteration issues two products
// and runs the softmax while the second one computes (FlashAttention-3's intra-warpgroup
// pipelining). Iteration i (visit i of the active key tiles, tile t_i), per warpgroup:
//   issue  S_i = Q K_i^T                      group 1
//   issue  O  += P_{i-1} V_{i-1}              group 2 (P_{i-1} is in registers since iteration i-1)
//   wait for group 1 ; s = mods(S_i) ; m, P_i = 2^(unit (s - m)), alpha   (P V_{i-1} still running)
//   wait for group 2 ; O *= alpha ; P_i -> the A registers of the next P V
//                                             (O and P_{i-1} belong to the wgmma until then)
// and after the last tile: O += P_last V_last.
//
// Shared memory (bytes; Q/K/V tiles rows x D x 2 in 128-byte swizzled slabs, 1024-aligned):
//   sQ          64-row tile, loaded once
//   sK[KS]      K tiles, a ring over visits: slot i % KS
//   sV[2]       V tiles: slot i % 2
//   sAux[KS]    mask | bias tiles (seq_rows x (kBlockN * E + 16) each), slot i % KS, like K
//   sBits       one bit per key tile of the split (mask scan result)
// Copies (cp.async): at the top of iteration i (after its barrier) the CTA copies V_i and then K,
// mask, bias of visit i + KS - 1 — two commit groups. (TMA measured no gain here: the masked steps
// are latency-bound, and even a runtime switch between the two cost the masked configs 3-6%,
// seed_16k 0.425 -> 0.446 ms.) The barrier at the top of iteration i guarantees:
//   - K_i and aux_i (copied in iteration i - KS + 1) and V_{i-1} (iteration i - 1) have landed
//     for every thread (wait_group KS - 2 leaves only the groups of later visits in flight) and
//     are visible to the async proxy (each thread fences its copies before the barrier);
//   - slot (i + KS - 1) % KS = (i - 1) % KS is free: S_{i-1} was waited for and aux_{i-1} read in
//     iteration i - 1; slot i % 2 of V is free: P V_{i-2} was waited for in iteration i - 1.
// config.py mirrors the carve-up.
#include "fwd_block.cuh"
#include "tile_mma.cuh"

namespace dmattn {

template <int HEAD_DIM, bool HAS_AUX>
struct WgmmaFwdTraits {
  static constexpr int kThreads = 128;
  static constexpr int kBlockM = 64;
  static constexpr int kBlockN = 64;
  static constexpr int kKStages = 3;  // visit i + KS - 1 copied during visit i
  static constexpr int kVStages = 2;  // V_i is copied during visit i, read during visit i + 1
  static constexpr int kMinBlocks = HEAD_DIM == 64 ? (HAS_AUX ? 3 : 4) : 2;
};

template <typename T, int HEAD_DIM, int MASK_BYTES, int BIAS_BYTES, bool CAUSAL, bool SOFTCAP>
__global__ void __launch_bounds__((WgmmaFwdTraits<HEAD_DIM, MASK_BYTES + BIAS_BYTES != 0>::kThreads),
                                  (WgmmaFwdTraits<HEAD_DIM, MASK_BYTES + BIAS_BYTES != 0>::kMinBlocks))
fwd_wgmma_kernel(const __grid_constant__ FwdParams p) {
  typedef WgmmaFwdTraits<HEAD_DIM, MASK_BYTES + BIAS_BYTES != 0> Tr;
  constexpr int BM = Tr::kBlockM, BN = Tr::kBlockN, KS = Tr::kKStages;
  typedef WgmmaTiles<T, HEAD_DIM, BM, BN> Tiles;
  constexpr int NA = Tiles::NA, DA = Tiles::DA;
  typedef FwdBlock<T, HEAD_DIM, BM, BN, Tr::kThreads, MASK_BYTES, BIAS_BYTES, CAUSAL, SOFTCAP> Block;
  const Block blk(p, grid_tile<CAUSAL>());

  extern __shared__ __align__(1024) unsigned char smem[];
  constexpr int kTile = Tiles::tile_bytes(BN);
  const int aux_bytes = blk.seq_rows * (Block::kMaskRow + Block::kBiasRow);
  u16* sQ = reinterpret_cast<u16*>(smem);
  unsigned char* sKBase = smem + Tiles::tile_bytes(BM);
  unsigned char* sVBase = sKBase + KS * kTile;
  unsigned char* sAuxBase = sVBase + Tr::kVStages * kTile;
  u32* sBits = reinterpret_cast<u32*>(sAuxBase + KS * aux_bytes);  // aux rows are 16-byte multiples
  // Slots by visit index i.
  auto sK = [&](int i) { return reinterpret_cast<u16*>(sKBase + (i % KS) * kTile); };
  auto sV = [&](int i) { return reinterpret_cast<u16*>(sVBase + (i % Tr::kVStages) * kTile); };
  auto sMask = [&](int i) { return sAuxBase + (i % KS) * aux_bytes; };
  auto sBias = [&](int i) { return sMask(i) + blk.seq_rows * Block::kMaskRow; };
  auto load_k_aux = [&](int t, int i) {
    if (t < blk.t_end) {
      blk.template load_k<Tiles>(sK(i), t);
      blk.load_aux(sMask(i), sBias(i), t);
    }
    cp_async_commit();
  };
  // The active tile after t (t_end: none).
  auto after = [&](int t) { return t < blk.t_end ? blk.next_tile(sBits, t + 1) : blk.t_end; };

  blk.scan(sBits);
  // ahead[j]: the tile of visit i + j, j < KS - 1 (their K/aux are copied or in flight).
  // Prologue: [Q, K/aux of visit 0], [K/aux of visit 1], ... up to visit KS - 2.
  int ahead[KS - 1];
  ahead[0] = blk.next_tile(sBits, blk.t_begin);
#pragma unroll
  for (int j = 1; j < KS - 1; ++j) ahead[j] = after(ahead[j - 1]);
  blk.template load_q<Tiles>(sQ);
#pragma unroll
  for (int j = 0; j < KS - 1; ++j) load_k_aux(ahead[j], j);

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, tq = lane % 4;
  const int warp_row0 = warp * 16;
  const int aux_row[1] = {warp_row0 % blk.seq_rows + g};

  WgmmaAccum<NA, DA> acc(blk.score_unit());

  // Top of visit i (tile ahead[0]): its K/aux and V_{i-1} have landed (the header's barrier
  // argument); copy V_i and K/aux of visit i + KS - 1.
  auto begin_visit = [&](int i) {
    const int t_last = after(ahead[KS - 2]);
    cp_async_wait<KS - 2>();
    Tiles::copies_visible();
    __syncthreads();
    blk.template load_v<Tiles>(sV(i), ahead[0]);
    cp_async_commit();
    load_k_aux(t_last, i + KS - 1);
    return t_last;
  };
  // Moves the window one visit on.
  auto end_visit = [&](int t_last) {
#pragma unroll
    for (int j = 0; j < KS - 2; ++j) ahead[j] = ahead[j + 1];
    ahead[KS - 2] = t_last;
  };
  float s[1][NA][4];
  float (&s_regs)[NA * 4] = reinterpret_cast<float (&)[NA * 4]>(s[0]);
  float alpha[1][2];

  int visit = 0;
  if (ahead[0] < blk.t_end) {
    // Visit 0: S_0 = Q K_0^T, P_0 (nothing to overlap yet; O is zero, so alpha is moot).
    int t_last = begin_visit(0);
    wgmma_fence();
    Tiles::qk_issue(s, sQ, sK(0));
    const bool full0 = blk.mask_rows_full(sMask(0), aux_row, lane);
    wgmma_wait<0>();
    fence_registers(s_regs);
    blk.score_mods(s, sMask(0), sBias(0), aux_row, ahead[0], tq, full0);
    acc.softmax.update(s, alpha);
    Tiles::pack(acc.p_prev, s);
    end_visit(t_last);
    // Steady state: the branch-free loop body keeps each wgmma's register operands in view of
    // the compiler from issue to wait.
    for (visit = 1; ahead[0] < blk.t_end; ++visit) {
      t_last = begin_visit(visit);
      wgmma_fence();
      Tiles::qk_issue(s, sQ, sK(visit));                                    // S_i = Q K_i^T
      Tiles::pv_issue(acc.o, acc.p_prev, sV(visit - 1));                     // O += P_{i-1} V_{i-1}
      const bool full = blk.mask_rows_full(sMask(visit), aux_row, lane);     // while S_i runs
      wgmma_wait<1>();
      fence_registers(s_regs);
      blk.score_mods(s, sMask(visit), sBias(visit), aux_row, ahead[0], tq, full);  // mods(S_i)
      const bool moved = acc.softmax.update(s, alpha);                       // P_i = 2^(unit (s - m))
      wgmma_wait<0>();
      fence_registers(acc.o_regs());
      fence_registers(acc.p_regs());
      if (moved) acc.softmax.rescale(acc.o, alpha);                          // O *= alpha
      Tiles::pack(acc.p_prev, s);
      end_visit(t_last);
    }
    // O += P_last V_last, once V_last has landed (only the newest group, K/aux past the end, may
    // still be in flight).
    cp_async_wait<1>();
    Tiles::copies_visible();
    __syncthreads();
    wgmma_fence();
    Tiles::pv_issue(acc.o, acc.p_prev, sV(visit - 1));
    wgmma_wait<0>();
    fence_registers(acc.o_regs());
  }
  cp_async_wait<0>();
  blk.store(acc.o, acc.softmax, warp_row0, g, tq);
  if (p.tiles_visited != nullptr && threadIdx.x == 0) atomicAdd(p.tiles_visited, static_cast<u64>(visit));
}

}  // namespace dmattn
