// bwd_tiles.cuh — what only the backward needs: tile shapes per head dim, the transposed mask scan
// (which query tiles can see one key tile: from the mask, or from its block map), the dQ reduction
// into global memory, and deterministic mode's fixed-point dQ and ordered dbias turns.
#pragma once
#include "block_map.cuh"
#include "mask.cuh"

namespace dmattn {

// Largest divisor of n that is <= cap (n, cap >= 1).
__host__ __device__ constexpr int largest_divisor_at_most(int n, int cap) {
  return cap >= n ? n : n % cap == 0 ? cap : largest_divisor_at_most(n, cap - 1);
}

// One CTA owns kBlockN = 16 * kWarps keys of one kv head; warp w owns keys 16w..16w+15 and keeps
// their dK, dV (16 x kDOut fp32 each) in registers, and S^T, dP^T (16 x kBlockM) for one step.
//   D <= 128: 8 warps, 128 keys, one CTA per multiprocessor (255 registers per thread).
//     Registers per lane: dK + dV = 2 * 16 * D / 32 = D, S^T + dP^T = 2 * 16 * kBlockM / 32 = kBlockM.
//     mma.sync: kBlockM = 64 at D <= 64 (128 accumulators), 32 at D = 96, 128 (128 + 32 = 160 at
//     D = 128; 64 rows would need 192 and more shared memory than padded rows leave, see bwd.cu).
//     Also 32 at D <= 64 when mask + bias take more than 4 bytes per element (e.g. float32 mask
//     and bias: 64 rows would need 256 KiB of shared memory).
//     WGMMA (Hopper, D = 64 or 128): kBlockM = 64 always, the M of a warpgroup product: the
//     unpadded swizzled tiles leave room for it (bwd_mma.cuh; the host checks the total).
//   D > 128: split over kDSplit = 2 CTAs (blockIdx.z) that each accumulate kDOut output columns of
//     dK, dV and dQ, recomputing S and dP over the full head dim (1.4x the flops, but no spills);
//     4 warps, 64 keys, two CTAs per multiprocessor.
// AUX_BYTES: bytes of one mask element plus one bias element (0 without either).
template <int HEAD_DIM, int AUX_BYTES, bool WGMMA>
struct BwdTraits {
  static constexpr int kHeadDim = HEAD_DIM;
  static constexpr int kDSplit = HEAD_DIM > 128 ? 2 : 1;      // CTAs along the head dim
  static constexpr int kDOut = HEAD_DIM / kDSplit;            // output columns per CTA
  static constexpr int kWarps = kDSplit == 1 ? 8 : 4;
  static constexpr int kThreads = kWarps * 32;
  // Caps registers at 255 per thread either way (ptxas would otherwise pick fewer and spill).
  static constexpr int kMinBlocks = kDSplit == 1 ? 1 : 2;
  static constexpr int kBlockN = 16 * kWarps;                 // keys per CTA
  // Query rows per step (see above); at D > 128, 32 rows at kDOut = 96 and 16 at kDOut = 128.
  static constexpr int kBlockM = WGMMA ? 64
                                 : kDOut <= 64 && AUX_BYTES <= 4 ? 64 : (kDSplit == 1 || kDOut <= 96) ? 32 : 16;
  static constexpr int kNAtoms = kBlockM / 8;                 // 8-row column tiles of S^T
  static constexpr int kKSteps = HEAD_DIM / 16;               // k16 steps of K Q^T and V dO^T
  static constexpr int kOutAtoms = kDOut / 8;                 // 8-wide column tiles of dK, dV
  static constexpr int kDbStride = kBlockN + 4;               // smem row stride (floats) of sDb
  // Registers to spare (wgmma at D = 64; D = 128 runs at the 255 cap), spent on the step's
  // latency: dbias summed over the heads of a group in registers (kNAtoms x 4 per lane, stored into
  // sDb once per query tile instead of a shared-memory add per head), a 2-byte bias read by
  // ldmatrix (bwd.cu, bias_fragments), the dbias flush while the dQ product computes.
  static constexpr bool kRegisterRoom = WGMMA && HEAD_DIM == 64;
  // dQ = dS K (kBlockM x kDOut): warps tile it as kDqWarpsM (16-row slabs) x kDqWarpsD (kDqCols
  // columns each, a whole number of 16-column pairs); kWarps - kDqWarps warps idle (only D = 96).
  // WGMMA: 4 x 2, warpgroup w computes columns w * D / 2.. of all 64 rows (warp 4w + i: rows 16i..).
  static constexpr int kDqWarpsM = kBlockM / 16;
  static constexpr int kDqWarpsD = largest_divisor_at_most(kDOut / 16, kWarps / kDqWarpsM);
  static constexpr int kDqWarps = kDqWarpsM * kDqWarpsD;
  static constexpr int kDqCols = kDOut / kDqWarpsD;
  static constexpr int kDqAtoms = kDqCols / 8;
  static_assert(HEAD_DIM % 16 == 0 && kDOut % 16 == 0, "whole k16 steps and 16-column pairs");
  static_assert(kDqWarpsM <= kWarps && kDqCols % 16 == 0, "dQ warp tiling");
  static_assert(kBlockM <= kThreads, "one row-stats copy per thread");
  static_assert(!WGMMA || ((HEAD_DIM == 64 || HEAD_DIM == 128) && kDqWarps == kWarps),
                "wgmma backward: D = 64 or 128, every warp in the dQ product");
};

// The dK/dV kernel's shared memory, in bytes from its 1024-aligned start (bwd_config.py mirrors
// it). Q/dO/K/V/dS^T tiles first (wgmma slabs must start on 1024-byte boundaries, and every one
// of these sizes is a multiple of 1024 there); two pipeline buffers of what changes per step.
//   sK, sV      kBlockN-row tiles, loaded once         sdS   dS^T, kBlockN keys x kBlockM rows
//   sQ[2], sdO[2]  kBlockM-row tiles                   sMask[2], sBias[2]  kBlockM x AuxRows
//   sStats[2]   kBlockM x {lse2, D} (bwd_preprocess_kernel's row stats)
//   scalars     batch b's q, dout, mask, bias pointers and the query head -> mask/bias/dbias head
//               divisions (re-read after each barrier so that they do not hold 17 registers
//               through the loop), and the last-chunk flag
//   then, sized at run time: sDb (with a bias: kBlockM x kDbStride floats, dS summed over the
//   heads that share a dbias head) or sColSum (row-broadcast bias: group x kBlockN floats), and
//   sBits (with a mask: group x m_tiles bits).
template <typename Mma, int MASK_BYTES, int BIAS_BYTES>
struct BwdSmem {
  static constexpr int BM = Mma::kBlockM, BN = Mma::kBlockN;
  typedef AuxRows<MASK_BYTES ? MASK_BYTES : 1, BN, Mma::kSwizzledAux> MaskRows;
  typedef AuxRows<BIAS_BYTES ? BIAS_BYTES : 2, BN, Mma::kSwizzledAux> BiasRows;
  static constexpr int kMaskTile = MASK_BYTES ? BM * MaskRows::kRowBytes : 0;
  static constexpr int kBiasTile = BIAS_BYTES ? BM * BiasRows::kRowBytes : 0;
  static constexpr int kK = 0;
  static constexpr int kV = kK + Mma::tile_bytes(BN);
  static constexpr int kDs = kV + Mma::tile_bytes(BN);
  static constexpr int kQ = kDs + Mma::kDsBytes;
  static constexpr int kDo = kQ + 2 * Mma::tile_bytes(BM);
  static constexpr int kMask = kDo + 2 * Mma::tile_bytes(BM);
  static constexpr int kBias = kMask + 2 * kMaskTile;
  static constexpr int kStats = kBias + 2 * kBiasTile;
  static constexpr int kScalars = kStats + 2 * BM * 8;
  static constexpr int kScalarBytes = 80;  // BwdScalars
  static constexpr int kFixed = kScalars + kScalarBytes;  // then sDb / sColSum, sBits
};

// Per-CTA values the backward's step reads from shared memory after a barrier, rather than holding
// them in registers through the whole loop (D = 128 uses all 255).
struct BwdScalars {
  const unsigned char* batch[4];  // batch b's q, dout, mask, bias
  FastDivmod head_div[3];         // query head -> mask, bias, dbias head
  int is_last;                    // query chunks: this CTA sums the chunks' dK, dV
};

// Transposed scan for one key tile [key0, key0 + BLOCK_N) and the query tiles [m_lo, m_hi): sets
// bit (slot * m_tiles + m) when a row of query tile m has a kept, causally visible key in the
// tile, for mask head `slot` (base + slot * slot_stride bytes). Causality is applied at
// 16-byte-chunk granularity (conservative). `bits` must be zeroed; the result is visible after a
// barrier. Work item = (slot, row): a thread reads that row's BLOCK_N * ELEM contiguous bytes.
template <int ELEM, int BLOCK_N, int BLOCK_M, int THREADS, bool CAUSAL>
__device__ void scan_mask_rows(u32* bits, const unsigned char* base, i64 slot_stride, int slots,
                               const i64 (&stride)[4], int key0, int m_lo, int m_hi, int m_tiles,
                               int seqlen_q, int seqlen_k, bool vec) {
  typedef typename Raw<ELEM>::type E;
  constexpr int kPerChunk = 16 / ELEM;
  constexpr int kChunks = BLOCK_N / kPerChunk;
  const bool row_bcast = stride[2] == 0;  // one distinct row: decides every query tile at once
  const int row_begin = m_lo * BLOCK_M;
  const int rows = row_bcast ? 1 : min(seqlen_q, m_hi * BLOCK_M) - row_begin;
  if (rows <= 0) return;
  // Rows are visited tile-interleaved (row i of every tile, then row i + 1, ...): on a dense mask
  // the first pass marks most tiles and the later rows of a marked tile skip their loads.
  const int tiles = row_bcast ? 1 : (rows + BLOCK_M - 1) / BLOCK_M, span = row_bcast ? 1 : tiles * BLOCK_M;
  // kBatch rows per thread and pass, their loads issued together (the scan is latency-bound).
  constexpr int kBatch = 2;
  const int items = slots * span;
#pragma unroll 1
  for (int first = threadIdx.x; first < items; first += kBatch * THREADS) {
    const unsigned char* g[kBatch];
    int bit[kBatch], key_end[kBatch];
    bool need[kBatch], keep[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int item = first + u * THREADS;
      const int slot = item / span, i = item % span;
      const int r = (i % tiles) * BLOCK_M + i / tiles;
      const int row = row_bcast ? 0 : row_begin + r;
      bit[u] = slot * m_tiles + row / BLOCK_M;
      // A broadcast row is read without the causal limit (the caller bounds the tiles causally).
      key_end[u] = CAUSAL && !row_bcast ? min(seqlen_k, row + seqlen_k - seqlen_q + 1) : seqlen_k;
      need[u] = item < items && r < rows && key_end[u] > key0 &&
                (row_bcast || !(bits[bit[u] >> 5] & (1u << (bit[u] & 31))));  // not active yet
      g[u] = base + slot * slot_stride + static_cast<i64>(row) * stride[2] * ELEM;
      keep[u] = false;
    }
    if (vec) {
      uint4 chunk[kBatch][kChunks];
#pragma unroll
      for (int u = 0; u < kBatch; ++u)
#pragma unroll
        for (int c = 0; c < kChunks; ++c) {
          const int key = key0 + c * kPerChunk;
          chunk[u][c] = need[u] && key < key_end[u]
                            ? *reinterpret_cast<const uint4*>(g[u] + static_cast<i64>(key) * ELEM)
                            : make_uint4(0u, 0u, 0u, 0u);
        }
#pragma unroll
      for (int u = 0; u < kBatch; ++u)
#pragma unroll
        for (int c = 0; c < kChunks; ++c) keep[u] |= chunk_any_keep<ELEM>(chunk[u][c]);
    } else {
#pragma unroll
      for (int u = 0; u < kBatch; ++u)
        for (int c = 0; need[u] && c < BLOCK_N && key0 + c < key_end[u]; ++c)
          keep[u] |= mask_keep(reinterpret_cast<const E*>(g[u])[static_cast<i64>(key0 + c) * stride[3]]);
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      if (!keep[u]) continue;
      if (row_bcast) {
        for (int m = m_lo; m < m_hi; ++m)  // bit[u] is the slot's bit of query tile 0
          atomicOr(&bits[(bit[u] + m) >> 5], 1u << ((bit[u] + m) & 31));
      } else {
        atomicOr(&bits[bit[u] >> 5], 1u << (bit[u] & 31));
      }
    }
  }
}

// scan_mask_rows' bits from the mask's block map (block_map.cuh) instead of the mask: one `any`
// word per row, a 32nd of the bytes of a 128-key tile of a bool mask. `map` points at the slot-0
// head's rows of batch b; slot_stride and row_stride are in words (row_stride 0: one row for every
// query tile). The map's key tile `map_tile` holds the backward's key tile (kMapKeys is a multiple
// of BLOCK_N); a map bit stands for every key of its tile and may count causally hidden ones, so
// the bits are a superset of the mask scan's: a query tile set only by hidden keys is computed,
// with every probability zero. Rows go to lanes in order: each run of min(32, BLOCK_M) lanes holds
// rows of one query tile (one ballot per warp, one atomic per run).
template <int BLOCK_M, int THREADS>
__device__ void scan_map_rows(u32* bits, const u32* map, i64 slot_stride, int slots, i64 row_stride,
                              int map_tile, int m_lo, int m_hi, int m_tiles, int seqlen_q) {
  constexpr int kRun = BLOCK_M < 32 ? BLOCK_M : 32;  // lanes of one query tile
  static_assert(32 % kRun == 0 && BLOCK_M % kRun == 0 && THREADS % 32 == 0, "whole runs per warp");
  const u32* any = map + map_tile / 32;
  const u32 tile_bit = 1u << (map_tile % 32);
  if (row_stride == 0) {  // one row: its bit decides every query tile of the slot
    for (int i = threadIdx.x; i < slots * (m_hi - m_lo); i += THREADS) {
      const int slot = i / (m_hi - m_lo), bit = slot * m_tiles + m_lo + i % (m_hi - m_lo);
      if (any[slot * slot_stride] & tile_bit) atomicOr(&bits[bit >> 5], 1u << (bit & 31));
    }
    return;
  }
  const int row_begin = m_lo * BLOCK_M, span = (m_hi - m_lo) * BLOCK_M, items = slots * span;
  const int lane = threadIdx.x % 32;
  constexpr int kBatch = 4;  // loads in flight per thread (the scan is latency-bound)
#pragma unroll 1
  for (int first = threadIdx.x - lane; first < items; first += kBatch * THREADS) {  // warp-uniform
    u32 word[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int item = first + u * THREADS + lane, row = row_begin + item % span;
      word[u] = item < items && row < seqlen_q ? any[item / span * slot_stride + row * row_stride] : 0u;
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const u32 kept = __ballot_sync(0xffffffffu, word[u] & tile_bit);
      const int run = first + u * THREADS + lane * kRun;  // lane r < 32 / kRun: the r-th run's first item
      const u32 run_kept = kRun == 32 ? kept : (kept >> (lane * kRun)) & ((1u << kRun) - 1u);
      if (lane < 32 / kRun && run_kept) {
        const int bit = run / span * m_tiles + (row_begin + run % span) / BLOCK_M;
        atomicOr(&bits[bit >> 5], 1u << (bit & 31));
      }
    }
  }
}

// dst[0..1] += (x, y) in fp32, atomically per element (dq_accum, 8-byte aligned). sm_90 has a
// vector reduction (PTX ISA 8.1, CUDA 12.1): one request for both elements, half the L2
// operations of two scalar ones, which sm_80 (or an older compiler) issues instead.
// `add` false: nothing (a predicated instruction on sm_90, not a branch around it).
__device__ __forceinline__ void red_add_f32x2(float* dst, float x, float y, bool add = true) {
#if __CUDA_ARCH__ >= 900 && (__CUDACC_VER_MAJOR__ * 100 + __CUDACC_VER_MINOR__ >= 1201)
  asm volatile(
      "{\n .reg .pred p;\n setp.ne.b32 p, %3, 0;\n @p red.global.add.v2.f32 [%0], {%1, %2};\n}\n" ::"l"(dst),
      "f"(x), "f"(y), "r"(static_cast<int>(add))
      : "memory");
#else
  if (add) {
    atomicAdd(dst, x);
    atomicAdd(dst + 1, y);
  }
#endif
}

// ---- deterministic mode, dQ: 32-bit fixed point, so that the order of the adds does not matter
// (integer addition is associative: any interleaving of the key tiles' adds gives the same bits,
// with no CTA ever waiting on another). Row i's contributions are scaled by q_i = 2^e_i, chosen by
// bwd_preprocess_kernel from a bound that no partial sum of the row can exceed:
//   |sum_j dS_ij K_jd| <= max|K| sum_j |dS_ij|,  sum_j |dS_ij| = sum_j P_ij |dP_ij - D_i|
//                      <= 2 max_j |dP_ij| <= 2 ||dO_i|| max_j ||V_j||      (P sums to 1, Cauchy-Schwarz)
// so bound_i = 2 ||dO_i|| max||V_j|| max|K| (softcap's factor 1 - tanh^2 only shrinks it) and q_i
// bound_i <= 2^30: a factor 2 below the int32 range, for the rounding of P and dS in bf16. Each add
// rounds to 1 / q_i, i.e. 2^-30 of the bound: after n_tiles adds, an absolute error of at most
// n_tiles 2^-31 bound_i.
// Two adjacent columns travel in one 64-bit integer add, the same requests as red.add.v2.f32:
// u = hi * 2^32 + lo (lo sign-extended) adds exactly mod 2^64, and since |sum lo| < 2^31 the sums
// separate again: lo = low 32 bits as int32, hi = (u - lo) / 2^32 (fixed_point_pair).
__device__ __forceinline__ float fixed_point_scale(float bound) {
  if (!(bound > 0.f) || !(bound < 3.0e38f)) return 1.f;  // zero dO (every add is 0), or inf / NaN
  int e;
  frexpf(bound, &e);  // bound < 2^e
  return ldexpf(1.f, max(-120, min(120, 30 - e)));
}

// dst[0..1] += (rint(x q), rint(y q)) as one 64-bit integer reduction (fixed_point_scale).
__device__ __forceinline__ void red_add_fixed2(float* dst, float x, float y, float q, bool add = true) {
  const long long lo = __float2int_rn(x * q);
  const u64 u = (static_cast<u64>(static_cast<u32>(__float2int_rn(y * q))) << 32) + static_cast<u64>(lo);
  asm volatile(
      "{\n .reg .pred p;\n setp.ne.b32 p, %2, 0;\n @p red.global.add.u64 [%0], %1;\n}\n" ::"l"(dst), "l"(u),
      "r"(static_cast<int>(add))
      : "memory");
}

// The two column sums of a 64-bit fixed-point word, as integers.
__device__ __forceinline__ int2 fixed_point_pair(u64 u) {
  const int lo = static_cast<int>(static_cast<u32>(u));
  return make_int2(lo, static_cast<int>((u - static_cast<u64>(static_cast<long long>(lo))) >> 32));
}

// ---- deterministic mode, shared dbias: ordered turns. The contributions to a shared dbias_accum
// tile are added in a fixed turn order 0, 1, 2, ...: turn t may add once bits [0, t) of the tile's
// words are all set. A contributor sets its bit after its adds (each adding thread fences, then a
// barrier, then one thread marks), or at once when it has nothing to add there, so nobody ever
// waits on a contributor that skips. Waits only ever target CTAs of lower linear block index,
// which the hardware launches first, so the chain always progresses.
__device__ __forceinline__ void turn_wait(const u32* words, int turn) {
  for (int w = 0; w * 32 < turn; ++w) {
    const u32 need = turn - w * 32 >= 32 ? 0xffffffffu : (1u << (turn - w * 32)) - 1u;
    u32 v;
    do {
      asm volatile("ld.acquire.gpu.global.b32 %0, [%1];\n" : "=r"(v) : "l"(words + w) : "memory");
    } while ((v & need) != need);
  }
}

__device__ __forceinline__ void turn_mark(u32* words, int turn) {
  asm volatile("red.relaxed.gpu.global.or.b32 [%0], %1;\n" :: "l"(words + turn / 32), "r"(1u << (turn % 32))
               : "memory");
}

}  // namespace dmattn
