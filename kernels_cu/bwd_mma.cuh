// bwd_mma.cuh — the backward's tile products behind one interface, with the shared-memory layouts
// of the Q/dO/K/V/dS^T tiles they read (tile_mma.cuh is the forward's counterpart):
//   BwdMmaSync  mma.sync m16n8k16 + ldmatrix (sm_80 and later), rows padded to D + 8;
//   BwdWgmma    Hopper wgmma (sm_90a), 128-byte swizzled slabs (wgmma.cuh). Warpgroup w = warps
//               4w..4w+3 = keys 64w..64w+63 of the CTA's tile, so every warp holds the same keys
//               and the same accumulator layout as with mma.sync, and the score math is shared.
// What the dK/dV kernel (bwd.cu) asks of them, per step (query tile x head), for warp w's 16 keys
// key_w..key_w+15 and the step's kBlockM rows:
//   sdp_issue   S^T = K Q^T, dP^T = V dO^T (keys x rows; wgmma: asynchronous, in this order)
//   wait_s      S^T is complete (wgmma: while dP^T still computes, the caller turns S into P)
//   wait_dp     dP^T is complete
//   dkdv_issue  dV += P^T dO, dK += dS^T Q, P^T and dS^T from registers (wgmma: left in flight)
//   store_ds    dS^T -> sdS, the operand of dQ = dS K
//   dq          this warp's dQ tile (16 rows x kDqCols, the Traits' tiling), running the caller's
//               `between` meanwhile (wgmma); on return every product of the step is complete and
//               its registers free
// Register fragments, per 8-row column tile nt of the step: s[nt][e], e = {(key g, row 2tq),
// (g, 2tq + 1), (g + 8, 2tq), (g + 8, 2tq + 1)} (mma.cuh's C layout); P^T, dS^T packed as
// p_t[nt][0] = (key g, rows 2tq, 2tq + 1), p_t[nt][1] = key g + 8, which, read as u32[NA / 2][4],
// are the A operands of consecutive 16-row k-steps of the next products.
#pragma once
#include "tile_mma.cuh"

namespace dmattn {

template <typename T, typename Tr>
struct BwdMmaSync {
  static constexpr int kBlockM = Tr::kBlockM, kBlockN = Tr::kBlockN;
  static constexpr int NA = Tr::kNAtoms, KS = Tr::kKSteps, OA = Tr::kOutAtoms, QA = Tr::kDqAtoms;
  static constexpr int ST = Tr::kHeadDim + 8;  // row stride (elements) of Q, dO, K, V
  static constexpr int DSST = kBlockM + 8;     // row stride of dS^T (keys x rows)
  static constexpr bool kSwizzledAux = false;
  static constexpr int kDsBytes = kBlockN * DSST * 2;
  template <int ROWS> using Layout = PaddedRows<Tr::kHeadDim>;

  static __host__ __device__ constexpr int tile_bytes(int rows) { return rows * ST * 2; }
  static __device__ __forceinline__ void copies_visible() {}

  // Two k16 steps per iteration: unrolled further, ptxas hoists fragment loads of later steps and
  // spills at D >= 96 (KS is even).
  static __device__ __forceinline__ void sdp_issue(float (&s)[NA][4], float (&dp)[NA][4], const u16* sK,
                                                   const u16* sV, const u16* sQ, const u16* sdO, int key_w,
                                                   int lane) {
#pragma unroll
    for (int nt = 0; nt < NA; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) { s[nt][e] = 0.f; dp[nt][e] = 0.f; }
#pragma unroll 2
    for (int ks = 0; ks < KS; ++ks) {
      u32 ka[4], va[4];
      const int a_off = (key_w + (lane % 8) + ((lane >> 3) & 1) * 8) * ST + ks * 16 + (lane >> 4) * 8;
      ldmatrix_x4(ka, smem_u32(sK + a_off));
      ldmatrix_x4(va, smem_u32(sV + a_off));
#pragma unroll
      for (int np = 0; np < NA / 2; ++np) {
        const int b_off = (np * 16 + (lane % 8) + (lane >> 4) * 8) * ST + ks * 16 + ((lane >> 3) & 1) * 8;
        u32 qb[4], ob[4];
        ldmatrix_x4(qb, smem_u32(sQ + b_off));
        mma_16816<T>(s[2 * np], ka, qb[0], qb[1]);
        mma_16816<T>(s[2 * np + 1], ka, qb[2], qb[3]);
        ldmatrix_x4(ob, smem_u32(sdO + b_off));
        mma_16816<T>(dp[2 * np], va, ob[0], ob[1]);
        mma_16816<T>(dp[2 * np + 1], va, ob[2], ob[3]);
      }
    }
  }
  static __device__ __forceinline__ void wait_s(float (&)[NA][4]) {}
  static __device__ __forceinline__ void wait_dp(float (&)[NA][4]) {}

  // Output columns d0..d0 + kDOut.
  static __device__ __forceinline__ void dkdv_issue(float (&acc_dk)[OA][4], float (&acc_dv)[OA][4],
                                                    const u32 (&p_t)[NA][2], const u32 (&ds_t)[NA][2],
                                                    const u16* sQ, const u16* sdO, int d0, int lane) {
    const u32 (&pa)[NA / 2][4] = reinterpret_cast<const u32 (&)[NA / 2][4]>(p_t);
    const u32 (&da)[NA / 2][4] = reinterpret_cast<const u32 (&)[NA / 2][4]>(ds_t);
#pragma unroll
    for (int kk = 0; kk < NA / 2; ++kk) {
#pragma unroll
      for (int op = 0; op < OA / 2; ++op) {
        const int off = (kk * 16 + (lane % 8) + ((lane >> 3) & 1) * 8) * ST + d0 + op * 16 + (lane >> 4) * 8;
        u32 ob[4], qb[4];
        ldmatrix_x4_trans(ob, smem_u32(sdO + off));
        mma_16816<T>(acc_dv[2 * op], pa[kk], ob[0], ob[1]);
        mma_16816<T>(acc_dv[2 * op + 1], pa[kk], ob[2], ob[3]);
        ldmatrix_x4_trans(qb, smem_u32(sQ + off));
        mma_16816<T>(acc_dk[2 * op], da[kk], qb[0], qb[1]);
        mma_16816<T>(acc_dk[2 * op + 1], da[kk], qb[2], qb[3]);
      }
    }
  }

  static __device__ __forceinline__ void store_ds(u16* sdS, const u32 (&ds_t)[NA][2], int key_w, int g, int tq) {
#pragma unroll
    for (int nt = 0; nt < NA; ++nt) {
      const int r = nt * 8 + 2 * tq;
      *reinterpret_cast<u32*>(sdS + (key_w + g) * DSST + r) = ds_t[nt][0];
      *reinterpret_cast<u32*>(sdS + (key_w + g + 8) * DSST + r) = ds_t[nt][1];
    }
  }

  // Rows 16 wm.., columns c0..c0 + kDqCols; `between` runs while the product computes (wgmma) or
  // before it. The other arguments: what wgmma keeps in flight.
  template <typename Between>
  static __device__ __forceinline__ void dq(float (&acc)[QA][4], const u16* sdS, const u16* sK, int wm, int c0,
                                            int lane, float (&)[OA][4], float (&)[OA][4], u32 (&)[NA][2],
                                            u32 (&)[NA][2], Between&& between) {
    between();
#pragma unroll
    for (int o = 0; o < QA; ++o)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[o][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      u32 da[4];
      ldmatrix_x4_trans(da, smem_u32(sdS + (kk * 16 + (lane % 8) + (lane >> 4) * 8) * DSST + wm * 16 +
                                     ((lane >> 3) & 1) * 8));
#pragma unroll
      for (int op = 0; op < QA / 2; ++op) {
        u32 kb[4];
        ldmatrix_x4_trans(kb, smem_u32(sK + (kk * 16 + (lane % 8) + ((lane >> 3) & 1) * 8) * ST + c0 + op * 16 +
                                       (lane >> 4) * 8));
        mma_16816<T>(acc[2 * op], da, kb[0], kb[1]);
        mma_16816<T>(acc[2 * op + 1], da, kb[2], kb[3]);
      }
    }
  }
};

// S^T = K Q^T is the forward's S = Q K^T with K in the role of Q (64 keys of A per warpgroup,
// K-major) and the step's rows in the role of the keys; dV += P^T dO is its O += P V with the
// step's rows as the k dimension. So both come from WgmmaTiles<T, D, kBlockN, kBlockM>.
// dQ = dS K reads both operands MN-major: dS^T (keys x rows, rows contiguous, one slab of 64 rows)
// and K (keys x D); warpgroup w computes columns w * D / 2.. (D = 64: 32 columns, half a slab row:
// a 64-byte start offset inside the swizzle atom, like the forward's k-steps inside a slab).
template <typename T, typename Tr>
struct BwdWgmma {
  static constexpr int kBlockM = Tr::kBlockM, kBlockN = Tr::kBlockN, D = Tr::kHeadDim;
  static constexpr int NA = Tr::kNAtoms, OA = Tr::kOutAtoms, QA = Tr::kDqAtoms;
  static_assert(kBlockM == 64 && kBlockN == 128 && Tr::kDqCols == D / 2, "two warpgroups, 64-row steps");
  typedef WgmmaTiles<T, D, kBlockN, kBlockM> Tiles;
  static constexpr bool kSwizzledAux = true;
  static constexpr int kDsBytes = kBlockN * kBlockM * 2;
  template <int ROWS> using Layout = Swizzled128<ROWS>;

  static __host__ __device__ constexpr int tile_bytes(int rows) { return rows * D * 2; }
  static __device__ __forceinline__ void copies_visible() { fence_proxy_async(); }

  static __device__ __forceinline__ void sdp_issue(float (&s)[NA][4], float (&dp)[NA][4], const u16* sK,
                                                   const u16* sV, const u16* sQ, const u16* sdO, int key_w, int) {
    const int wg = key_w / 64;
    wgmma_fence();
    Tiles::qk_issue(reinterpret_cast<float (&)[1][NA][4]>(s), Tiles::q_rows(sK, wg), sQ);
    Tiles::qk_issue(reinterpret_cast<float (&)[1][NA][4]>(dp), Tiles::q_rows(sV, wg), sdO);
  }
  static __device__ __forceinline__ void wait_s(float (&s)[NA][4]) {
    wgmma_wait<1>();
    fence_registers(reinterpret_cast<float (&)[NA * 4]>(s));
  }
  static __device__ __forceinline__ void wait_dp(float (&dp)[NA][4]) {
    wgmma_wait<0>();
    fence_registers(reinterpret_cast<float (&)[NA * 4]>(dp));
  }

  static __device__ __forceinline__ void dkdv_issue(float (&acc_dk)[OA][4], float (&acc_dv)[OA][4],
                                                    const u32 (&p_t)[NA][2], const u32 (&ds_t)[NA][2],
                                                    const u16* sQ, const u16* sdO, int, int) {
    wgmma_fence();
    Tiles::pv_issue(reinterpret_cast<float (&)[1][OA][4]>(acc_dv), reinterpret_cast<const u32 (&)[NA / 2][4]>(p_t),
                    sdO);
    Tiles::pv_issue(reinterpret_cast<float (&)[1][OA][4]>(acc_dk), reinterpret_cast<const u32 (&)[NA / 2][4]>(ds_t),
                    sQ);
  }

  // dS^T in the MN-major A layout: key k's 64 rows are one 128-byte slab row (Swizzled128).
  static __device__ __forceinline__ void store_ds(u16* sdS, const u32 (&ds_t)[NA][2], int key_w, int g, int tq) {
#pragma unroll
    for (int nt = 0; nt < NA; ++nt) {
      *reinterpret_cast<u32*>(sdS + Swizzled128<kBlockN>::offset(key_w + g, nt) + 2 * tq) = ds_t[nt][0];
      *reinterpret_cast<u32*>(sdS + Swizzled128<kBlockN>::offset(key_w + g + 8, nt) + 2 * tq) = ds_t[nt][1];
    }
  }

  template <typename Between>
  static __device__ __forceinline__ void dq(float (&acc)[QA][4], const u16* sdS, const u16* sK, int, int c0, int,
                                            float (&acc_dk)[OA][4], float (&acc_dv)[OA][4], u32 (&p_t)[NA][2],
                                            u32 (&ds_t)[NA][2], Between&& between) {
    float (&d)[QA * 4] = reinterpret_cast<float (&)[QA * 4]>(acc);
    // LBO: the next 64 columns (slab) — one slab of rows for dS^T, the next D columns for K;
    // SBO: the next 8 keys. A k-step of 16 keys is 16 rows of 128 bytes in either.
    const u64 da0 = sw128_desc(smem_u32(sdS), kBlockN * 128, 1024);
    const u64 db0 = sw128_desc(smem_u32(sK) + (c0 / 64) * kBlockN * 128 + (c0 % 64) * 2, kBlockN * 128, 1024);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      const u64 da = desc_advance(da0, kk * 16 * 128), db = desc_advance(db0, kk * 16 * 128);
      if constexpr (QA == 4) wgmma_ss_m64n32k16<1>(d, da, db, kk > 0, T());
      else wgmma_ss_m64n64k16<1>(d, da, db, kk > 0, T());
    }
    wgmma_commit();
    between();
    wgmma_wait<0>();
    fence_registers(d);
    fence_registers(reinterpret_cast<float (&)[OA * 4]>(acc_dk));
    fence_registers(reinterpret_cast<float (&)[OA * 4]>(acc_dv));
    fence_registers(reinterpret_cast<u32 (&)[NA * 2]>(p_t));
    fence_registers(reinterpret_cast<u32 (&)[NA * 2]>(ds_t));
  }
};

template <typename T, typename Tr, bool WGMMA>
struct BwdMmaFor {
  typedef BwdMmaSync<T, Tr> type;
};
template <typename T, typename Tr>
struct BwdMmaFor<T, Tr, true> {
  typedef BwdWgmma<T, Tr> type;
};

}  // namespace dmattn
