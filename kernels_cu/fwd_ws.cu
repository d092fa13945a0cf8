// fwd_ws.cu — the wide Hopper forward (sm_90a): warp-specialized and persistent. One CTA per
// multiprocessor takes work items (a 128-row query tile of one row group and key split: the same
// ownership, block skipping, score transform and epilogue as fwd_kernel, fwd_block.cuh) from a
// counter until none is left. A producer warpgroup makes every copy; two consumer warpgroups of 64
// rows each only compute, on 128-key tiles. With a mask, an item's active key tiles come from the
// mask's block map (block_map.cuh: per mask row and key tile, a kept key, every key kept; in global
// memory), which the caller made once (block_map, topk_mask) or the call writes first with
// block_map_kernel over the whole GPU. The map also spares the tiles that no row of the item keeps
// in part their mask rows and per-score tests: each row's bit says all (H100, gqa8k_topk with its
// map: 0.45-0.48 -> 0.41-0.43 ms; NOTES.md 51). (Scanning the mask inside this kernel was
// latency-bound every way it was tried: on the scheduler's 64 threads, one CTA per multiprocessor,
// it streams ~5-20 GB/s against the pre-pass's 2.7 TB/s, and per query head rather than per mask
// head: benchmarks/NOTES.md 46-49.)
//
// Why: with one CTA per multiprocessor, a kernel whose threads both copy and compute waits for
// each copy's latency. Here the scheduler warps hand item n + 1 on (and write every empty item
// after it: out = 0, lse = -inf, never reaching the consumers) while the consumers compute item
// n. The consumers get the registers (setmaxnreg): the producers hold a few pointers and counters.
//
// Roles (384 threads, three warpgroups):
//   warpgroup 0, producer (kProducerRegs registers per thread)
//     warp 0, lane 0   per item: Q by TMA (once both consumers' last S of the previous item is
//                      done); per active key tile: K, then V, by TMA into their rings
//     warp 1           per active key tile: its bias rows, and its mask rows if a row keeps the
//                      tile in part, by cp.async, into the aux ring
//     warps 2-3        the scheduler: fetches the next item; with a mask, gathers its rows of the
//                      block map into its bits (ItemBits); hands the item with its bits to the item
//                      ring, or writes it if no tile is active
// Mask and bias rows are short (128 or 256 bytes per row and tile): as bulk copies, one per row,
// the copy engine's per-instruction cost capped the CTA (H100, gqa8k sweep at density 1/16: 0.54
// ms against 0.28 for the narrow kernel); cp.async spreads them over the lanes, each lane's copies
// counted on the slot's barrier by one arrival (mbar_arrive_cp_async).
//   warpgroups 1, 2, consumers (kConsumerRegs): 64 query rows each. Per visit i (active tile t_i):
//                      issue S_i = Q K_i^T and O += P_{i-1} V_{i-1}; while they run, read the tile's
//                      bits; wait for S_i, transform it (the mask's test per score only on tiles
//                      kept in part), P_i = softmax numerators (rows that keep no key of the tile
//                      drop it there); wait for the P V, rescale O (fwd_wgmma.cu explains the
//                      overlap). Then O / l from registers to global memory.
// The two consumers take turns to issue their products (kTurnBar: ping-pong), so that one's
// softmax runs while the other's products use the tensor cores.
//
// Rings (pipeline.cuh). "full": the producer's arrivals and bytes; "empty": one arrival per
// consumer warp, lane 0 after the warp is done with the slot:
//   item[kItemSlots]   index + ItemBits     full: scheduler        empty: 8 consumer warps, warps 0-1
//   q[1]               the Q tile           full: TMA              empty: 8 consumer warps (last S)
//   k[KS], v[VS]       K, V tiles           full: TMA              empty: 8 (S_i done / P V_i done)
//   aux[KS]            mask | bias rows     full: 32 lanes' copies empty: 8 (score transform done)
// Visits, K/V/aux fills and Q fills are counted over the CTA's lifetime by each side alike.
//
// Shared memory (config.py mirrors it; tiles rows x D x 2 bytes in 128-byte swizzled slabs):
//   sQ | sK[KS] | sV[VS] | sAux[KS] (seq_rows x (kMaskRow + kBiasRow)) | barriers |
//   item indexes [kItemSlots], next item [2] | bits [kItemSlots]
#include "block_map.cuh"
#include "fwd_block.cuh"
#include "tile_mma.cuh"
#include "pipeline.cuh"

namespace dmattn {

// An item's bits in its queue slot: `bit_words` words each, bit j for key tile t_begin + j of its split.
//   active    a row of the item keeps a key of the tile: the tiles visited (every tile without a mask)
//   partial   a row keeps some but not all keys of the tile: its mask rows are copied and tested
//   row(r)    row r's `any` bits (block_map.cuh), r < ws_map_rows: what the other tiles' rows keep
// Without a mask only `active` has words (and nothing reads them).
struct ItemBits {
  u32* words;
  int bit_words;
  __device__ __forceinline__ u32* active() const { return words; }
  __device__ __forceinline__ u32* partial() const { return words + bit_words; }
  __device__ __forceinline__ const u32* row(int r) const { return words + (2 + r) * bit_words; }
  static __device__ __forceinline__ bool test(const u32* bits, int j) { return (bits[j >> 5] >> (j & 31)) & 1u; }
};

// The items the scheduler hands on: fill n of the ring holds an item index (-1: no more) and its bits.
template <int R>
struct ItemQueue {
  Ring<R> ring;
  int* index;       // R
  u32* bits;        // R x slot_words
  int bit_words, slot_words;
  __device__ __forceinline__ ItemBits bits_of(u32 n) const { return {bits + (n % R) * slot_words, bit_words}; }
  // Calls body(item, bits) for every item in order; then the warp (the lanes in `lanes`) releases it.
  template <typename Body>
  __device__ __forceinline__ void walk(u32 lanes, int lane, Body&& body) const {
    for (u32 n = 0;; ++n) {
      ring.wait(n);
      const int item = index[n % R];
      if (item < 0) return;
      body(item, bits_of(n));
      ring.release_by_warp(n, lane, lanes);
    }
  }
};

// The active key tiles t of blk's split, in order: body(t).
template <typename Block, typename Body>
__device__ __forceinline__ void for_each_tile(const Block& blk, const u32* bits, Body&& body) {
  for (int t = blk.next_tile(bits, blk.t_begin); t < blk.t_end; t = blk.next_tile(bits, t + 1)) body(t);
}

struct WsFwdTraits {
  static constexpr int kConsumers = 2;  // warpgroups of 64 query rows
  static constexpr int kThreads = 128 * (kConsumers + 1);
  static constexpr int kBlockM = 64 * kConsumers;
  static constexpr int kBlockN = 128;
  static constexpr int kQStages = 1;    // items' Q tiles in flight
  static constexpr int kKStages = 2;    // K and aux tiles: visit i + 1 copied during visit i
  static constexpr int kVStages = 2;    // V_i copied during visit i, read during visit i + 1
  static constexpr int kItemSlots = 2;  // items handed on ahead of the consumers
  // 72 x 128 + 216 x 256 = 64512 registers: what 384 threads x 168 hold at launch (the consumers
  // need 216 to keep S, P and O in registers; the scheduler spills a few bytes at 72).
  static constexpr int kProducerRegs = 72, kConsumerRegs = 216;
  static constexpr int kSchedBar = 1;  // named barriers: the scheduler's two warps,
  static constexpr int kTurnBar = 2;  // and kTurnBar + c: consumer c's turn to issue
  static constexpr int kBarriers = 2 * kQStages + 4 * kKStages + 2 * kVStages + 2 * kItemSlots;
};

// The rows of the block map (block_map.cuh) that query tile blk reads: one when the mask broadcasts over
// rows, else its rows inside the problem (map_stride[2] words apart from ws_map_row0).
template <typename Block>
__device__ __forceinline__ int ws_map_rows(const FwdParams& p, const Block& blk) {
  return p.a.map_stride[2] == 0 ? 1 : min(blk.seq_rows, p.a.seqlen_q - blk.m0);
}
template <typename Block>
__device__ __forceinline__ const u32* ws_map_row0(const FwdParams& p, const Block& blk) {
  const AttnParams& a = p.a;
  return a.block_map + blk.b * a.map_stride[0] + blk.h0 / a.mask_head_div * a.map_stride[1] + blk.m0 * a.map_stride[2];
}

template <typename T, int HEAD_DIM, int MASK_BYTES, int BIAS_BYTES, bool CAUSAL, bool SOFTCAP>
__global__ void __launch_bounds__(WsFwdTraits::kThreads, 1) fwd_ws_kernel(const __grid_constant__ FwdParams p) {
  typedef WsFwdTraits Tr;
  constexpr int BM = Tr::kBlockM, BN = Tr::kBlockN, QS = Tr::kQStages, KS = Tr::kKStages, VS = Tr::kVStages,
                R = Tr::kItemSlots;
  constexpr bool kHasAux = MASK_BYTES + BIAS_BYTES > 0;
  typedef WgmmaTiles<T, HEAD_DIM, BM, BN> Tiles;
  constexpr int NA = Tiles::NA, DA = Tiles::DA;
  typedef FwdBlock<T, HEAD_DIM, BM, BN, 128, MASK_BYTES, BIAS_BYTES, CAUSAL, SOFTCAP> Block;
  static_assert(BN == kMapKeys, "a key tile is a block map bit");
  const AttnParams& a = p.a;

  extern __shared__ __align__(1024) unsigned char smem[];
  constexpr int kTile = Tiles::tile_bytes(BN);
  const int seq_rows = BM / a.pack;
  const int aux_bytes = seq_rows * (Block::kMaskRow + Block::kBiasRow);
  const int bit_words = (p.tiles_per_split + 31) / 32;
  const int slot_words = MASK_BYTES > 0 ? (2 + seq_rows) * bit_words : bit_words;  // ItemBits
  unsigned char* sKBase = smem + QS * Tiles::tile_bytes(BM);
  unsigned char* sVBase = sKBase + KS * kTile;
  unsigned char* sAuxBase = sVBase + VS * kTile;
  u64* bars = reinterpret_cast<u64*>(sAuxBase + KS * aux_bytes);
  const u32 bar0 = smem_u32(bars);  // barrier j at bar0 + 8 j
  const Ring<QS> q_ring{bar0, bar0 + 8 * QS};
  const u32 bar1 = bar0 + 8 * 2 * QS;
  const Ring<KS> k_ring{bar1, bar1 + 8 * KS};
  const Ring<VS> v_ring{bar1 + 8 * 2 * KS, bar1 + 8 * (2 * KS + VS)};
  const Ring<KS> aux_ring{bar1 + 8 * (2 * KS + 2 * VS), bar1 + 8 * (3 * KS + 2 * VS)};
  const Ring<R> item_ring{bar1 + 8 * (4 * KS + 2 * VS), bar1 + 8 * (4 * KS + 2 * VS + R)};
  int* sItem = reinterpret_cast<int*>(bars + Tr::kBarriers);
  int* sNext = sItem + R;
  const ItemQueue<R> items_q{item_ring, sItem, reinterpret_cast<u32*>(sNext + 2), bit_words, slot_words};
  // Slots by item (Q) and by visit (K, V, aux).
  auto sQ = [&](u32 n) { return reinterpret_cast<u16*>(smem + (n % QS) * Tiles::tile_bytes(BM)); };
  auto sK = [&](u32 i) { return reinterpret_cast<u16*>(sKBase + (i % KS) * kTile); };
  auto sV = [&](u32 i) { return reinterpret_cast<u16*>(sVBase + (i % VS) * kTile); };
  auto sMask = [&](u32 i) { return sAuxBase + (i % KS) * aux_bytes; };
  auto sBias = [&](u32 i) { return sMask(i) + seq_rows * Block::kMaskRow; };

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (threadIdx.x == 0) {
    q_ring.init(1, 8);
    k_ring.init(1, 8);
    v_ring.init(1, 8);
    aux_ring.init(32, 8);
    item_ring.init(1, 8 + 1 + kHasAux);
    mbar_init_fence();
  }
  __syncthreads();  // the barriers are initialized before anyone waits or copies; no CTA-wide barrier after this

  if (warp < 4) {
    regs_decrease<Tr::kProducerRegs>();
    if (warp == 0) {
      // ---- Q, K, V by TMA (one thread)
      if (lane != 0) return;
      u32 visit = 0, q_fill = 0;
      items_q.walk(1u, lane, [&](int item, const ItemBits& bits) {
        const Block blk(p, work_tile<CAUSAL>(p, item));
        q_ring.acquire(q_fill);
        const u32 q_full = q_ring.full_bar(q_fill++);
        mbar_expect_tx(q_full, Tiles::tile_bytes(BM));
        for (int j = 0; j < a.pack; ++j)  // head h0 + j: tile rows j * seq_rows .. of each slab
#pragma unroll
          for (int c = 0; c < HEAD_DIM / 64; ++c)
            tma_load_4d(sQ(q_fill - 1) + c * BM * 64 + j * seq_rows * 64, p.q_map, q_full, c * 64, blk.h0 + j, blk.m0,
                        blk.b);
        const int kv_head = blk.h0 / a.group;
        auto tile = [&](u16* dst, const TensorMap& map, u32 bar, int t) {
          mbar_expect_tx(bar, kTile);
#pragma unroll
          for (int c = 0; c < HEAD_DIM / 64; ++c) tma_load_4d(dst + c * BN * 64, map, bar, c * 64, kv_head, t * BN, blk.b);
        };
        for_each_tile(blk, bits.active(), [&](int t) {
          k_ring.acquire(visit);
          tile(sK(visit), p.k_map, k_ring.full_bar(visit), t);
          v_ring.acquire(visit);
          tile(sV(visit), p.v_map, v_ring.full_bar(visit), t);
          ++visit;
        });
      });
    } else if (warp == 1) {
      // ---- bias rows of each active tile, mask rows of the partial ones: lane r copies rows r, r + 32, ...
      if constexpr (kHasAux) {
        u32 visit = 0;
        items_q.walk(~0u, lane, [&](int item, const ItemBits& bits) {
          const Block blk(p, work_tile<CAUSAL>(p, item));
          for_each_tile(blk, bits.active(), [&](int t) {
            aux_ring.acquire(visit);
            blk.template load_aux<32>(sMask(visit), sBias(visit), t, lane,
                                      MASK_BYTES > 0 && ItemBits::test(bits.partial(), t - blk.t_begin));
            mbar_arrive_cp_async(aux_ring.full_bar(visit));
            ++visit;
          });
        });
      }
    } else {
      // ---- the scheduler (64 threads): items from the counter, their tile bits, handed on or written
      const int st = threadIdx.x - 64;
      const int items = p.m_blocks * p.row_groups * p.num_splits;
      u32 published = 0;
      int item = blockIdx.x;  // the grid is at most `items` CTAs
      for (int k = 0; item < items; ++k) {
        // The next item, fetched now and stored to shared memory at the end: its latency overlaps
        // this item's work (an empty item's is short: storing at once cost ~4 us per item).
        const u32 next = st == 0 ? atomicAdd(p.arrivals, 1u) : 0u;
        const Block blk(p, work_tile<CAUSAL>(p, item));
        const int tiles = blk.t_end - blk.t_begin;
        bool active = tiles > 0;
        if (MASK_BYTES > 0 || active) item_ring.acquire(published);  // its bits slot is free
        if constexpr (MASK_BYTES > 0) {
          // The split's bits (ItemBits) from the block map's rows: each row's `any` words (the
          // split's from bit t_begin on), active = their OR, partial = the OR of any & ~full.
          // (row, word) pairs u over the 64 threads, two in flight each (eight loads) before their ORs.
          const int rows = ws_map_rows(p, blk);
          const u32* map = ws_map_row0(p, blk);
          const ItemBits ib = items_q.bits_of(published);
          for (int w = st; w < 2 * bit_words; w += 64) ib.words[w] = 0u;
          named_barrier_sync(Tr::kSchedBar, 64);
          const int pairs = rows * bit_words;
          for (int u0 = st; u0 < pairs; u0 += 2 * 64) {
            MapWord word[2];
            int w[2];
#pragma unroll
            for (int j = 0; j < 2; ++j) {
              const int u = u0 + 64 * j, r = u / bit_words;
              w[j] = u - r * bit_words;
              const int t = blk.t_begin + 32 * w[j], left = tiles - 32 * w[j];  // t < t_end: inside the row
              word[j] = MapWord{0u, 0u};
              if (u < pairs && left > 0) {
                const u32* row = map + r * a.map_stride[2];
                const u32 keep = left >= 32 ? ~0u : (1u << left) - 1;
                word[j] = MapWord{map_span(row, t, a.map_words) & keep, map_span(row + a.map_words, t, a.map_words) & keep};
              }
            }
#pragma unroll
            for (int j = 0; j < 2; ++j) {
              const int u = u0 + 64 * j;
              if (u >= pairs) break;
              const u32 partial = word[j].any & ~word[j].full;
              ib.words[2 * bit_words + u] = word[j].any;  // row u / bit_words, word w[j]
              if (word[j].any) atomicOr(&ib.active()[w[j]], word[j].any);
              if (partial) atomicOr(&ib.partial()[w[j]], partial);
            }
          }
          named_barrier_sync(Tr::kSchedBar, 64);
          u32 any = 0u;
          for (int w = 0; w < bit_words; ++w) any |= ib.active()[w];
          active = any != 0u;
        }
        if (active) {
          if (st == 0) {
            sItem[published % R] = item;
            mbar_arrive(item_ring.full_bar(published));
          }
          ++published;
        } else {
          blk.template store_empty<64>(st);
        }
        if (st == 0) sNext[k & 1] = gridDim.x + next;
        named_barrier_sync(Tr::kSchedBar, 64);  // sNext[k & 1] written (and the bits read by all)
        item = sNext[k & 1];
      }
      // No items left: the sentinel ends the other roles; the last CTA out zeroes the counters.
      item_ring.acquire(published);
      if (st == 0) {
        sItem[published % R] = -1;
        mbar_arrive(item_ring.full_bar(published));
        __threadfence();
        if (atomicAdd(p.arrivals + 1, 1u) == gridDim.x - 1) {
          p.arrivals[0] = 0u;
          p.arrivals[1] = 0u;
        }
      }
    }
    return;
  }

  // ---- consumers: warpgroup wg, warp cw of 8, rows 16 cw .. 16 cw + 15 of the tile
  regs_increase<Tr::kConsumerRegs>();
  const int cw = warp - 4, wg = cw / 4, g = lane / 4, tq = lane % 4;
  const int warp_row0 = cw * 16;
  // Ping-pong: consumer wg issues after the other one has issued (consumer 0 first).
  auto turn_wait = [&] { named_barrier_sync(Tr::kTurnBar + wg, 256); };
  auto turn_pass = [&] { named_barrier_arrive(Tr::kTurnBar + 1 - wg, 256); };
  if (wg == 1) named_barrier_arrive(Tr::kTurnBar, 256);

  u32 visit = 0, q_use = 0;
  u64 visits_total = 0;
  items_q.walk(~0u, lane, [&](int item, const ItemBits& bits) {
    const Block blk(p, work_tile<CAUSAL>(p, item));
    const int aux_row[1] = {warp_row0 % seq_rows + g};
    // Key tile t's mask as the map tells it: `masked`, some row of the item keeps part of the tile
    // (its scores are tested one by one against the copied mask rows); the result's bit h, row
    // g + 8 h keeps a key there (the softmax drops the row's tile otherwise). A row past the map's
    // rows reads the last one (a broadcast mask's only row; past the problem: never stored).
    const int map_rows = MASK_BYTES > 0 ? ws_map_rows(p, blk) : 1;
    const int row_lo = min(aux_row[0], map_rows - 1), row_hi = min(aux_row[0] + 8, map_rows - 1);
    auto tile_mask = [&](int t, bool& masked) -> u32 {
      if constexpr (MASK_BYTES == 0) {
        masked = false;
        return 3u;
      } else {
        const int j = t - blk.t_begin;
        masked = ItemBits::test(bits.partial(), j);
        return static_cast<u32>(ItemBits::test(bits.row(row_lo), j)) |
               static_cast<u32>(ItemBits::test(bits.row(row_hi), j)) << 1;
      }
    };
    WgmmaAccum<NA, DA> acc(blk.score_unit());
    float s[1][NA][4];
    float (&s_regs)[NA * 4] = reinterpret_cast<float (&)[NA * 4]>(s[0]);
    float alpha[1][2];
    const u32 first = visit;

    q_ring.wait(q_use);
    const u16* sQw = Tiles::q_rows(sQ(q_use), wg);
    // Visit 0: S_0 = Q K_0^T, P_0 (O is zero, so alpha is moot).
    int t = blk.next_tile(bits.active(), blk.t_begin);
    k_ring.wait(visit);
    turn_wait();
    wgmma_fence();
    Tiles::qk_issue(s, sQw, sK(visit));
    turn_pass();
    if constexpr (kHasAux) aux_ring.wait(visit);
    bool masked0;
    const u32 keep0 = tile_mask(t, masked0);
    wgmma_wait<0>();
    fence_registers(s_regs);
    k_ring.release_by_warp(visit, lane);
    blk.template score_mods<true>(s, sMask(visit), sBias(visit), aux_row, t, tq, !masked0);
    if constexpr (kHasAux) aux_ring.release_by_warp(visit, lane);
    acc.softmax.update(s, alpha, keep0);
    Tiles::pack(acc.p_prev, s);
    u32 prev = visit++;
    for (t = blk.next_tile(bits.active(), t + 1); t < blk.t_end; t = blk.next_tile(bits.active(), t + 1)) {
      k_ring.wait(visit);
      v_ring.wait(prev);
      turn_wait();
      wgmma_fence();
      Tiles::qk_issue(s, sQw, sK(visit));                                   // S_i = Q K_i^T
      Tiles::pv_issue(acc.o, acc.p_prev, sV(prev));                         // O += P_{i-1} V_{i-1}
      turn_pass();
      if constexpr (kHasAux) aux_ring.wait(visit);
      bool masked;
      const u32 keep = tile_mask(t, masked);                                // while S_i runs
      wgmma_wait<1>();
      fence_registers(s_regs);
      k_ring.release_by_warp(visit, lane);
      blk.template score_mods<true>(s, sMask(visit), sBias(visit), aux_row, t, tq, !masked);  // mods(S_i)
      if constexpr (kHasAux) aux_ring.release_by_warp(visit, lane);
      const bool moved = acc.softmax.update(s, alpha, keep);                // P_i = 2^(unit (s - m))
      wgmma_wait<0>();
      fence_registers(acc.o_regs());
      fence_registers(acc.p_regs());
      v_ring.release_by_warp(prev, lane);
      if (moved) acc.softmax.rescale(acc.o, alpha);                         // O *= alpha
      Tiles::pack(acc.p_prev, s);
      prev = visit++;
    }
    q_ring.release_by_warp(q_use++, lane);  // every S of the item is done: the next item's Q may land
    // O += P_last V_last
    v_ring.wait(prev);
    turn_wait();
    wgmma_fence();
    Tiles::pv_issue(acc.o, acc.p_prev, sV(prev));
    turn_pass();
    wgmma_wait<0>();
    fence_registers(acc.o_regs());
    v_ring.release_by_warp(prev, lane);
    blk.store(acc.o, acc.softmax, warp_row0, g, tq);
    visits_total += visit - first;
  });
  if (p.tiles_visited != nullptr && threadIdx.x == 128) atomicAdd(p.tiles_visited, visits_total);
}

}  // namespace dmattn
