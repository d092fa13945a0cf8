// bwd_tiles.cuh — what only the backward needs: tile shapes per head dim, the transposed mask scan
// (which query tiles can see one key tile) and the ordering semaphores of deterministic mode.
#pragma once
#include "mask.cuh"

namespace dmattn {

// One CTA (4 warps) owns kBlockN = 64 keys of one kv head; warp w owns keys 16w..16w+15 and keeps
// their dK, dV (16 x kDOut fp32 each) in registers. Head dims above 128 are split over kDSplit CTAs
// (blockIdx.z) that each accumulate kDOut output columns of dK, dV and dQ, recomputing S and dP
// over the full head dim (1.4x the flops, but no spills).
template <int HEAD_DIM>
struct BwdTraits {
  static constexpr int kHeadDim = HEAD_DIM;
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  // Two CTAs per multiprocessor: caps registers at 255 per thread (ptxas would otherwise pick a
  // lower count for small head dims and spill).
  static constexpr int kMinBlocks = 2;
  static constexpr int kBlockN = 16 * kWarps;                 // keys per CTA
  static constexpr int kDSplit = HEAD_DIM > 128 ? 2 : 1;      // CTAs along the head dim
  static constexpr int kDOut = HEAD_DIM / kDSplit;            // output columns per CTA
  // Query rows per step: S^T and dP^T (16 x kBlockM per warp) live beside dK and dV (kDOut fp32
  // per lane); 32 rows at kDOut = 128 spill 24-52 bytes with mask + bias (+ softcap), 16 do not.
  static constexpr int kBlockM = kDOut <= 64 ? 64 : kDOut <= 96 ? 32 : 16;
  static constexpr int kNAtoms = kBlockM / 8;                 // 8-row column tiles of S^T
  static constexpr int kKSteps = HEAD_DIM / 16;               // k16 steps of K Q^T and V dO^T
  static constexpr int kOutAtoms = kDOut / 8;                 // 8-wide column tiles of dK, dV
  static constexpr int kStride = HEAD_DIM + 8;                // smem row stride of Q, dO, K, V
  static constexpr int kDsStride = kBlockM + 8;               // smem row stride of dS^T (keys x rows)
  // dQ = dS K: warps tile (kBlockM rows) x (kDOut columns) as kDqWarpsM x kDqWarpsD.
  static constexpr int kDqWarpsM = kBlockM / 16;
  static constexpr int kDqWarpsD = kWarps / kDqWarpsM;
  static constexpr int kDqCols = kDOut / kDqWarpsD;
  static constexpr int kDqAtoms = kDqCols / 8;
  static_assert(HEAD_DIM % 16 == 0 && kDOut % 16 == 0, "whole k16 steps and 16-column pairs");
  static_assert(kDqWarpsM * kDqWarpsD == kWarps && kDqCols % 16 == 0, "dQ warp tiling");
};

// Bytes of one pipeline buffer (everything that changes per (query tile, head) step):
// sQ, sdO (kBlockM x (D+8) x 2), sMask, sBias (kBlockM x aux_row_bytes), sLse, sDelta (kBlockM x 4).
template <int HEAD_DIM, int MASK_BYTES, int BIAS_BYTES>
__host__ __device__ constexpr int bwd_buffer_bytes() {
  typedef BwdTraits<HEAD_DIM> Tr;
  return 2 * Tr::kBlockM * Tr::kStride * 2 +
         Tr::kBlockM * (MASK_BYTES ? aux_row_bytes(Tr::kBlockN, MASK_BYTES) : 0) +
         Tr::kBlockM * (BIAS_BYTES ? aux_row_bytes(Tr::kBlockN, BIAS_BYTES) : 0) + 2 * Tr::kBlockM * 4;
}

// Transposed scan for one key tile [key0, key0 + BLOCK_N): sets bit (slot * m_tiles + m) when a row
// of query tile m (m >= m_begin) has a kept, causally visible key in the tile, for mask head
// `slot` (base + slot * slot_stride bytes). Causality is applied at 16-byte-chunk granularity
// (conservative). `bits` must be zeroed; the result is visible after a barrier.
// Work item = (slot, row): a thread reads that row's BLOCK_N * ELEM contiguous bytes.
template <int ELEM, int BLOCK_N, int BLOCK_M, int THREADS, bool CAUSAL>
__device__ void scan_mask_rows(u32* bits, const unsigned char* base, i64 slot_stride, int slots,
                               const i64 (&stride)[4], int key0, int m_begin, int m_tiles,
                               int seqlen_q, int seqlen_k, bool vec) {
  typedef typename Raw<ELEM>::type E;
  constexpr int kPerChunk = 16 / ELEM;
  constexpr int kChunks = BLOCK_N / kPerChunk;
  const bool row_bcast = stride[2] == 0;  // one distinct row: decides every query tile at once
  const int row_begin = m_begin * BLOCK_M;
  const int rows = row_bcast ? 1 : seqlen_q - row_begin;
  if (rows <= 0) return;
#pragma unroll 1
  for (int item = threadIdx.x; item < slots * rows; item += THREADS) {
    const int slot = item / rows, r = item % rows;
    const int row = row_bcast ? 0 : row_begin + r;
    const int bit = slot * m_tiles + row / BLOCK_M;
    if (!row_bcast && (bits[bit >> 5] & (1u << (bit & 31)))) continue;  // already active
    // A broadcast row is read without the causal limit (the caller bounds the tiles causally).
    const int key_end = CAUSAL && !row_bcast ? min(seqlen_k, row + seqlen_k - seqlen_q + 1) : seqlen_k;
    if (key_end <= key0) continue;
    const unsigned char* g = base + slot * slot_stride + static_cast<i64>(row) * stride[2] * ELEM;
    bool keep = false;
    if (vec) {
#pragma unroll
      for (int c = 0; c < kChunks; ++c) {
        const int key = key0 + c * kPerChunk;
        if (key < key_end)
          keep |= chunk_any_keep<ELEM>(*reinterpret_cast<const uint4*>(g + static_cast<i64>(key) * ELEM));
      }
    } else {
      for (int c = 0; c < BLOCK_N && key0 + c < key_end; ++c)
        keep |= mask_keep(reinterpret_cast<const E*>(g)[static_cast<i64>(key0 + c) * stride[3]]);
    }
    if (!keep) continue;
    if (row_bcast) {
      for (int m = m_begin; m < m_tiles; ++m) atomicOr(&bits[(slot * m_tiles + m) >> 5], 1u << ((slot * m_tiles + m) & 31));
    } else {
      atomicOr(&bits[bit >> 5], 1u << (bit & 31));
    }
  }
}

// ---- deterministic mode: turn-taking counters in global memory (one thread per CTA calls these).
// A CTA waits until the counter equals its turn, adds its contribution, and increments the counter
// after a barrier (release after every thread's adds). Waits only ever target CTAs of lower linear
// block index, which the hardware launches first, so the chain always makes progress.
__device__ __forceinline__ void sem_wait(const int* sem, int turn) {
  int v;
  do {
    asm volatile("ld.acquire.gpu.global.b32 %0, [%1];\n" : "=r"(v) : "l"(sem) : "memory");
  } while (v != turn);
}

__device__ __forceinline__ void sem_release(int* sem) {
  asm volatile("fence.acq_rel.gpu;\nred.relaxed.gpu.global.add.s32 [%0], 1;\n" :: "l"(sem) : "memory");
}

// Takes (waits for) and immediately passes every counter in [from, to): tiles this CTA skipped.
__device__ __forceinline__ void sem_pass(int* sems, int from, int to, int turn) {
  for (int i = from; i < to; ++i) {
    sem_wait(sems + i, turn);
    sem_release(sems + i);
  }
}

}  // namespace dmattn
