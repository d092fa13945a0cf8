// tile_mma.cuh — the two tile matmuls of the forward, S = Q K^T and O += P V, behind one
// interface, with the shared-memory layout of Q/K/V tiles they need:
//   MmaSyncTiles — mma.sync m16n8k16 + ldmatrix (sm_80 and later), rows padded to D + 8;
//   WgmmaTiles   — Hopper wgmma (sm_90a), 64-row warpgroup tiles in 128-byte swizzled slabs,
//                  issued asynchronously (the caller waits).
// Both hand the kernel S and O in the same register layout (wgmma.cuh says why), so the score
// transform, the online softmax and the epilogue are shared (fwd_block.cuh).
#pragma once
#include "tile_io.cuh"
#include "wgmma.cuh"

namespace dmattn {

// A operand of keys 16kk..16kk+15 from one 16-row block of S in the C layout (mma.cuh's table).
template <typename T, int NA>
__device__ __forceinline__ void pack_p(u32 (&pa)[4], const float (&s)[NA][4], int kk) {
  pa[0] = T::pack(s[2 * kk][0], s[2 * kk][1]);
  pa[1] = T::pack(s[2 * kk][2], s[2 * kk][3]);
  pa[2] = T::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
  pa[3] = T::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
}

template <typename T, int HEAD_DIM, bool HAS_AUX>
struct MmaSyncTiles {
  typedef FwdTraits<HEAD_DIM, HAS_AUX> Tr;
  static constexpr int kBlockM = Tr::kBlockM, kBlockN = Tr::kBlockN;
  static constexpr int MA = Tr::kMAtoms, NA = Tr::kNAtoms, DA = Tr::kDAtoms, KS = Tr::kKSteps;
  static constexpr int kStride = Tr::kStride;

  static __host__ __device__ constexpr int tile_bytes(int rows) { return rows * kStride * 2; }

  template <int ROWS> using Layout = PaddedRows<HEAD_DIM>;

  // S = Q K^T for this warp's kMAtoms x 16 rows (tile rows from warp_row0) and all kBlockN keys.
  static __device__ __forceinline__ void qk(float (&s)[MA][NA][4], const u16* sQ, const u16* sK,
                                            int warp_row0, int lane) {
#pragma unroll
    for (int at = 0; at < MA; ++at)
#pragma unroll
      for (int nt = 0; nt < NA; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[at][nt][e] = 0.f;
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
      u32 qa[MA][4];
#pragma unroll
      for (int at = 0; at < MA; ++at)
        ldmatrix_x4(qa[at], smem_u32(sQ + (warp_row0 + at * 16 + (lane % 8) + ((lane >> 3) & 1) * 8) * kStride +
                                     ks * 16 + (lane >> 4) * 8));
#pragma unroll
      for (int np = 0; np < NA / 2; ++np) {
        u32 kb[4];
        ldmatrix_x4(kb, smem_u32(sK + (np * 16 + (lane % 8) + (lane >> 4) * 8) * kStride + ks * 16 +
                                 ((lane >> 3) & 1) * 8));
#pragma unroll
        for (int at = 0; at < MA; ++at) {
          mma_16816<T>(s[at][2 * np], qa[at], kb[0], kb[1]);
          mma_16816<T>(s[at][2 * np + 1], qa[at], kb[2], kb[3]);
        }
      }
    }
  }

  // O += P V; P (the softmax numerators in the S registers) becomes the A operand, 16 keys a step.
  static __device__ __forceinline__ void pv(float (&acc_o)[MA][DA][4], const float (&s)[MA][NA][4],
                                            const u16* sV, int lane) {
#pragma unroll
    for (int kk = 0; kk < NA / 2; ++kk) {
      u32 pa[MA][4];
#pragma unroll
      for (int at = 0; at < MA; ++at) pack_p<T, NA>(pa[at], s[at], kk);
#pragma unroll
      for (int dp = 0; dp < DA / 2; ++dp) {
        u32 vb[4];
        ldmatrix_x4_trans(vb, smem_u32(sV + (kk * 16 + (lane % 8) + ((lane >> 3) & 1) * 8) * kStride +
                                       dp * 16 + (lane >> 4) * 8));
#pragma unroll
        for (int at = 0; at < MA; ++at) {
          mma_16816<T>(acc_o[at][2 * dp], pa[at], vb[0], vb[1]);
          mma_16816<T>(acc_o[at][2 * dp + 1], pa[at], vb[2], vb[3]);
        }
      }
    }
  }
};

// Hopper tiles: a CTA of BLOCK_M / 64 warpgroups, each computing 64 query rows against key tiles of
// BLOCK_N (64 or 128) keys; HEAD_DIM 64 or 128. The products are asynchronous: fwd_wgmma.cu and
// fwd_ws.cu overlap them with the softmax.
template <typename T, int HEAD_DIM, int BLOCK_M, int BLOCK_N>
struct WgmmaTiles {
  static_assert(HEAD_DIM == 64 || HEAD_DIM == 128, "wgmma tiles: D = 64 or 128");
  static_assert(BLOCK_N == 64 || BLOCK_N == 128, "wgmma tiles: 64 or 128 keys");
  static constexpr int kBlockM = BLOCK_M, kBlockN = BLOCK_N;
  static constexpr int kWarpgroupRows = 64;
  static constexpr int MA = 1, NA = kBlockN / 8, DA = HEAD_DIM / 8, KS = HEAD_DIM / 16;
  static constexpr int kSlabElems = 64;  // columns per 128-byte swizzled slab

  static __host__ __device__ constexpr int tile_bytes(int rows) { return rows * HEAD_DIM * 2; }

  template <int ROWS> using Layout = Swizzled128<ROWS>;

  // cp.async writes through the generic proxy; wgmma reads through the async proxy.
  static __device__ __forceinline__ void copies_visible() { fence_proxy_async(); }

  // Warpgroup wg's 64 rows of the Q tile: 64 rows further into each slab.
  static __device__ __forceinline__ const u16* q_rows(const u16* sQ, int wg) {
    return sQ + wg * kWarpgroupRows * kSlabElems;
  }

  // Issues S = Q K^T for one warpgroup's rows (one commit group; the caller fences before and
  // waits after). sQw: q_rows(sQ, wg).
  static __device__ __forceinline__ void qk_issue(float (&s)[1][NA][4], const u16* sQw, const u16* sK) {
    float (&d)[NA * 4] = reinterpret_cast<float (&)[NA * 4]>(s[0]);
    const u64 da0 = sw128_desc(smem_u32(sQw), 16, 1024), db0 = sw128_desc(smem_u32(sK), 16, 1024);
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
      const int slab = ks / 4, in_slab = (ks % 4) * 16;  // 16 columns = 32 bytes
      const u64 da = desc_advance(da0, (slab * kBlockM * kSlabElems + in_slab) * 2);
      const u64 db = desc_advance(db0, (slab * kBlockN * kSlabElems + in_slab) * 2);
      if constexpr (kBlockN == 64) wgmma_ss_m64n64k16(d, da, db, ks > 0, T());
      else wgmma_ss_m64n128k16(d, da, db, ks > 0, T());
    }
    wgmma_commit();
  }

  // P (softmax numerators, the S accumulator) as the A operand of P V: 16 keys per k-step.
  static __device__ __forceinline__ void pack(u32 (&pa)[NA / 2][4], const float (&s)[1][NA][4]) {
#pragma unroll
    for (int kk = 0; kk < NA / 2; ++kk) pack_p<T, NA>(pa[kk], s[0], kk);
  }

  // Issues O += P V (one commit group). pa and acc_o belong to the wgmma until it is waited for.
  static __device__ __forceinline__ void pv_issue(float (&acc_o)[1][DA][4], const u32 (&pa)[NA / 2][4],
                                                  const u16* sV) {
    float (&d)[DA * 4] = reinterpret_cast<float (&)[DA * 4]>(acc_o[0]);
    // the next 64 columns of V are one slab (kBlockN rows of 128 bytes) further
    const u64 db0 = sw128_desc(smem_u32(sV), kBlockN * 128, 1024);
#pragma unroll
    for (int kk = 0; kk < NA / 2; ++kk) {
      const u64 db = desc_advance(db0, kk * 16 * 128);  // keys 16kk..16kk+15: 16 rows of 128 bytes
      if constexpr (HEAD_DIM == 64) wgmma_rs_m64n64k16(d, pa[kk], db, T());
      else wgmma_rs_m64n128k16(d, pa[kk], db, T());
    }
    wgmma_commit();
  }
};

}  // namespace dmattn
