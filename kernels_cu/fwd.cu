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
  const Block blk(p);

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
  OnlineSoftmax<MA, NA, DA> softmax;
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

    float s[MA][NA][4];
    Tiles::qk(s, sQ, sK(stage), warp_row0, lane);                   // S = Q K_t^T
    blk.score_mods(s, sMask(stage), sBias(stage), aux_row, t, tq);   // s2 = log2(e) * mods(S)
    float alpha[MA][2];
    if (softmax.update(s, alpha)) softmax.rescale(acc_o, alpha);     // P = 2^(s2 - m), O *= alpha
    Tiles::pv(acc_o, s, sV(stage), lane);                            // O += P V_t
    stage = stage + 1 == p.stages ? 0 : stage + 1;
    load_stage = load_stage + 1 == p.stages ? 0 : load_stage + 1;
    ++visited;
  }
  cp_async_wait<0>();
  blk.store(acc_o, softmax, warp_row0, g, tq);
  if (p.tiles_visited != nullptr && threadIdx.x == 0) atomicAdd(p.tiles_visited, static_cast<u64>(visited));
}

// Merges split partials; one CTA per (batch, head, row), its threads sharing the splits: a
// decode row has up to kMaxSplits partials, and one thread walking them all in a dependent chain
// of loads took longer than the split kernel itself. The host sizes the CTA to the row's work
// (config.combine_threads: a multiple of 32, at least head_dim / 2, at most kMaxCombineThreads).
constexpr int kMaxSplits = 256;          // mirrors config.MAX_SPLITS
constexpr int kMaxCombineThreads = 512;  // mirrors config.MAX_COMBINE_THREADS

__device__ __forceinline__ float block_reduce(float x, bool is_max, float* scratch) {
  for (int o = 16; o > 0; o /= 2) {
    const float y = __shfl_xor_sync(0xffffffffu, x, o);
    x = is_max ? fmaxf(x, y) : x + y;
  }
  __syncthreads();  // scratch may still be read by the previous reduction
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = x;
  __syncthreads();
  x = scratch[0];
  for (int w = 1; w < blockDim.x / 32; ++w) x = is_max ? fmaxf(x, scratch[w]) : x + scratch[w];
  return x;
}

template <typename T>
__global__ void __launch_bounds__(kMaxCombineThreads) fwd_combine_kernel(const __grid_constant__ FwdParams p) {
  __shared__ float weight[kMaxSplits];           // exp(lse_s - mx): split s's share of the row
  __shared__ float2 part[kMaxCombineThreads];    // per (split group, column pair) sums
  __shared__ float scratch[kMaxCombineThreads / 32];
  const AttnParams& a = p.a;
  const i64 rows = static_cast<i64>(a.batch) * a.heads * a.seqlen_q;
  const i64 row = blockIdx.x;
  const int splits = p.num_splits, tid = threadIdx.x, threads = blockDim.x;

  //   lse = mx + log sum_s exp(lse_s - mx),  mx = max_s lse_s   (-inf: no split saw a key)
  float mx = neg_inf();
  for (int s = tid; s < splits; s += threads) mx = fmaxf(mx, p.lse_split[s * rows + row]);
  mx = block_reduce(mx, true, scratch);
  float total = 0.f;
  for (int s = tid; s < splits; s += threads) {
    const float e = mx == neg_inf() ? 0.f : __expf(p.lse_split[s * rows + row] - mx);
    weight[s] = e;
    total += e;
  }
  total = block_reduce(total, false, scratch);  // its barriers publish `weight`
  const float lse = mx == neg_inf() ? neg_inf() : mx + logf(total);
  const float inv_total = mx == neg_inf() ? 0.f : 1.f / total;

  // O = sum_s weight_s / total * O_s: thread = (split group g, column pair c); groups stride the
  // splits so each thread's loads are independent and stay in flight together.
  const int pairs = a.head_dim / 2, groups = threads / pairs;
  const int g = tid / pairs, c = tid % pairs;
  float2 acc = make_float2(0.f, 0.f);
  if (g < groups) {
    const float* o_col = p.o_split + row * a.head_dim + 2 * c;
#pragma unroll 8
    for (int s = g; s < splits; s += groups) {
      const float2 x = *reinterpret_cast<const float2*>(o_col + s * rows * a.head_dim);
      acc.x += weight[s] * x.x;
      acc.y += weight[s] * x.y;
    }
  }
  part[tid] = acc;
  __syncthreads();
  if (g != 0) return;
  for (int h = 1; h < groups; ++h) {
    acc.x += part[h * pairs + c].x;
    acc.y += part[h * pairs + c].y;
  }
  u16* o = static_cast<u16*>(p.out) + bshd_row_offset(a, row, p.o_stride);
  *reinterpret_cast<u32*>(o + 2 * c) = T::pack(acc.x * inv_total, acc.y * inv_total);
  if (c == 0 && p.lse != nullptr) p.lse[row] = lse;
}

}  // namespace dmattn
