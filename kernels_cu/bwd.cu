// bwd.cu — backward kernels (FA2 style, P recomputed from the saved lse; no online softmax).
//
// Per (batch b, query head h), rows i, keys j, in base 2 as the forward (s2 = log2(e) * score):
//   P_ij  = 2^(s2_ij - lse_i * log2 e)        (hidden or lse_i = -inf: P = 0)
//   D_i   = sum_d dO_id O_id                  bwd_preprocess_kernel
//   dV_j += sum_i P_ij dO_i                   summed over the query heads of the kv group too
//   dP_ij = dO_i . V_j
//   dS_ij = P_ij (dP_ij - D_i)                softcap: dS_ij *= 1 - tanh_ij^2
//   dbias_ij = dS_ij                          summed over bias's broadcast dims
//   dQ_i += scale sum_j dS_ij K_j             fp32 atomics into dq_accum, scaled and converted
//   dK_j += scale sum_i dS_ij Q_i             by bwd_convert_dq_kernel
//
// bwd_dkdv_kernel: one CTA (4 warps) per (key tile of kBlockN = 64 keys, batch, kv head, head-dim
// part). Warp w owns keys 16w..16w+15. The CTA walks the pairs (query tile m, query head h of the
// group), m outer, h inner, visiting only the active ones (causal: tiles whose rows all precede
// the key tile's diagonal are never visited; mask: a scan of the key tile's column strip sets one
// bit per (query tile[, head]) that holds a kept key). For each pair:
//   S^T = K Q^T and dP^T = V dO^T         16 x kBlockM per warp, K/V as A, Q/dO as B operands
//   P^T, dS^T in registers                are already A fragments of the next products
//   dV += P^T dO, dK += dS^T Q            register accumulators
//   dS^T -> shared memory (as T)          then dQ = dS K, warps tiled over rows x columns
// dbias: dS summed in registers over the heads of the group when the bias is per kv head (or one
// head), or into per-head column sums in shared memory when the bias broadcasts over rows; fp32
// atomics into dbias_accum when CTAs of several batches / kv heads share a dbias element.
//
// Shared memory (bytes):
//   buf[2]   per pair, double-buffered: sQ, sdO kBlockM x (D+8) x 2; sMask, sBias kBlockM x
//            (kBlockN*E + 16); sLse, sDelta kBlockM x 4 (lse pre-multiplied by log2 e, -inf -> +inf)
//   sK, sV   kBlockN x (D+8) x 2, loaded once
//   sdS      kBlockN x (kBlockM + 8) x 2 (dS^T, keys x rows)
//   sDb      with a bias: kBlockM x (kBlockN + 4) x 4, dS of the query tile summed over the heads
//            that share a dbias head (each lane adds its own elements; flushed coalesced after (B));
//            or, with a row-broadcast bias, sColSum group x kBlockN x 4: column sums per head slot
//   sBits    group x m_tiles bits (only with a mask)
// Barriers per pair: (A) the pair's buffer has landed and every warp is done with the previous pair
// (its buffer and sdS may be overwritten: the next pair's copies start here); (B) sdS is complete.
//
// Deterministic mode: the dq_accum adds for (head-dim part, b, hk, m) are made in key-tile order
// through a counter per query tile (turn = key tile index; every CTA passes every query tile,
// skipped or not); dbias_accum adds for (key tile, shared dbias cell, m) in (b, hk) order likewise.
#include "params.cuh"
#include "bwd_tiles.cuh"

namespace dmattn {

template <typename T, int HEAD_DIM, int MASK_BYTES, int BIAS_BYTES, bool CAUSAL, bool SOFTCAP>
__global__ void __launch_bounds__(BwdTraits<HEAD_DIM>::kThreads, BwdTraits<HEAD_DIM>::kMinBlocks)
bwd_dkdv_kernel(const __grid_constant__ BwdParams p) {
  typedef BwdTraits<HEAD_DIM> Tr;
  constexpr int BM = Tr::kBlockM, BN = Tr::kBlockN, NT = Tr::kThreads, ST = Tr::kStride;
  constexpr int NA = Tr::kNAtoms, KS = Tr::kKSteps, OA = Tr::kOutAtoms, DSST = Tr::kDsStride;
  constexpr int QA = Tr::kDqAtoms;
  constexpr int kMaskRow = MASK_BYTES ? aux_row_bytes(BN, MASK_BYTES) : 0;
  constexpr int kBiasRow = BIAS_BYTES ? aux_row_bytes(BN, BIAS_BYTES) : 0;
  constexpr int kBuf = bwd_buffer_bytes<HEAD_DIM, MASK_BYTES, BIAS_BYTES>();
  typedef typename Raw<MASK_BYTES ? MASK_BYTES : 1>::type MaskRaw;
  typedef typename Raw<BIAS_BYTES ? BIAS_BYTES : 2>::type BiasRaw;
  const AttnParams& a = p.a;

  // ---- what this CTA owns
  const int n_tile = blockIdx.x, n0 = n_tile * BN;
  const int b = blockIdx.y / a.kv_heads, hk = blockIdx.y % a.kv_heads;
  const int d0 = blockIdx.z * Tr::kDOut;  // first output column of dK, dV, dQ
  const int G = a.group, h_first = hk * G;
  const int Sq = a.seqlen_q, Sk = a.seqlen_k;
  const int m_tiles = (Sq + BM - 1) / BM;
  // Causal: row i sees key n0 iff i >= n0 - (Sk - Sq); earlier query tiles are never visited.
  const int m_begin = CAUSAL ? min(m_tiles, max(0, n0 - Sk + Sq) / BM) : 0;
  const int p_begin = m_begin * G, p_end = m_tiles * G;  // pair index = m * G + (h - h_first)

  extern __shared__ __align__(16) unsigned char smem[];
  u16* sK = reinterpret_cast<u16*>(smem + 2 * kBuf);
  u16* sV = sK + BN * ST;
  u16* sdS = sV + BN * ST;
  constexpr int DBST = BN + 4;  // row stride (floats) of sDb: a quad's rows land in distinct banks
  float* sDb = reinterpret_cast<float*>(sdS + BN * DSST);
  float* sColSum = sDb;
  const bool rows_reduced = BIAS_BYTES > 0 && p.dbias_rows_reduced;
  u32* sBits = reinterpret_cast<u32*>(sDb + (BIAS_BYTES == 0 ? 0 : rows_reduced ? G * BN : BM * DBST));
  auto sQ = [&](int bi) { return reinterpret_cast<u16*>(smem + bi * kBuf); };
  auto sdO = [&](int bi) { return sQ(bi) + BM * ST; };
  auto sMask = [&](int bi) { return smem + bi * kBuf + 4 * BM * ST; };
  auto sBias = [&](int bi) { return sMask(bi) + BM * kMaskRow; };
  auto sLse = [&](int bi) { return reinterpret_cast<float*>(sBias(bi) + BM * kBiasRow); };
  auto sDelta = [&](int bi) { return sLse(bi) + BM; };

  const u16* q = static_cast<const u16*>(a.q) + b * a.q_stride[0];
  const u16* dout = static_cast<const u16*>(p.dout) + b * p.do_stride[0];
  const u16* k = static_cast<const u16*>(a.k) + b * a.k_stride[0] + hk * a.k_stride[2];
  const u16* v = static_cast<const u16*>(a.v) + b * a.v_stride[0] + hk * a.v_stride[2];
  const unsigned char* mask = MASK_BYTES
      ? static_cast<const unsigned char*>(a.mask) + b * a.mask_stride[0] * MASK_BYTES : nullptr;
  const unsigned char* bias = BIAS_BYTES
      ? static_cast<const unsigned char*>(a.bias) + b * a.bias_stride[0] * BIAS_BYTES : nullptr;
  // The mask differs between the heads of the group only when it has one head per query head.
  const bool mask_per_head = MASK_BYTES > 0 && G > 1 && a.mask_head_div == 1 && a.mask_stride[1] != 0;
  const int mask_slots = mask_per_head ? G : 1;

  // ---- mask scan: one bit per (head slot, query tile) with a kept key in this key tile
  if constexpr (MASK_BYTES > 0) {
    const int words = (mask_slots * m_tiles + 31) / 32;
    for (int i = threadIdx.x; i < words; i += NT) sBits[i] = 0u;
    __syncthreads();
    scan_mask_rows<MASK_BYTES, BN, BM, NT, CAUSAL>(
        sBits, mask + (h_first / a.mask_head_div) * a.mask_stride[1] * MASK_BYTES,
        a.mask_stride[1] * MASK_BYTES, mask_slots, a.mask_stride, n0, m_begin, m_tiles, Sq, Sk,
        a.mask_vec);
    __syncthreads();
  }
  auto active = [&](int pr) -> bool {
    if constexpr (MASK_BYTES > 0) {
      const int bit = (mask_per_head ? pr % G : 0) * m_tiles + pr / G;
      return (sBits[bit >> 5] >> (bit & 31)) & 1u;
    }
    return true;
  };
  auto next_pair = [&](int pr) {
    while (pr < p_end && !active(pr)) ++pr;
    return pr;
  };

  // ---- tile copies
  auto load_pair = [&](int pr, int bi) {
    const int m0 = (pr / G) * BM, h = h_first + pr % G;
    const i64 head_off = static_cast<i64>(h) * a.q_stride[2];
    load_head_rows<HEAD_DIM, BM, NT>(sQ(bi), a.head_dim, a.q, [&](int r) -> const u16* {
      return m0 + r < Sq ? q + static_cast<i64>(m0 + r) * a.q_stride[1] + head_off : nullptr;
    });
    const i64 do_head_off = static_cast<i64>(h) * p.do_stride[2];
    load_head_rows<HEAD_DIM, BM, NT>(sdO(bi), a.head_dim, p.dout, [&](int r) -> const u16* {
      return m0 + r < Sq ? dout + static_cast<i64>(m0 + r) * p.do_stride[1] + do_head_off : nullptr;
    });
    if constexpr (MASK_BYTES > 0)
      load_aux_tile<MASK_BYTES, BN, NT>(sMask(bi), mask + (h / a.mask_head_div) * a.mask_stride[1] * MASK_BYTES,
                                        a.mask_stride, m0, BM, n0, Sq, Sk, a.mask_vec);
    if constexpr (BIAS_BYTES > 0)
      load_aux_tile<BIAS_BYTES, BN, NT>(sBias(bi), bias + (h / a.bias_head_div) * a.bias_stride[1] * BIAS_BYTES,
                                        a.bias_stride, m0, BM, n0, Sq, Sk, a.bias_vec);
    const i64 bh_row = (static_cast<i64>(b) * a.heads + h) * Sq;
    for (int i = threadIdx.x; i < BM; i += NT) {
      const int row = m0 + i;
      const float l = row < Sq ? p.lse[bh_row + row] : neg_inf();
      sLse(bi)[i] = l == neg_inf() ? __int_as_float(0x7f800000) : l * kLog2e;  // 2^(s2 - inf) = 0
      sDelta(bi)[i] = row < Sq ? p.delta[bh_row + row] : 0.f;
    }
  };

  load_head_rows<HEAD_DIM, BN, NT>(sK, a.head_dim, a.k, [&](int r) -> const u16* {
    return n0 + r < Sk ? k + static_cast<i64>(n0 + r) * a.k_stride[1] : nullptr;
  });
  load_head_rows<HEAD_DIM, BN, NT>(sV, a.head_dim, a.v, [&](int r) -> const u16* {
    return n0 + r < Sk ? v + static_cast<i64>(n0 + r) * a.v_stride[1] : nullptr;
  });
  int pr = next_pair(p_begin);
  if (pr < p_end) load_pair(pr, 0);
  cp_async_commit();
  if (BIAS_BYTES > 0) {
    const int n_db = rows_reduced ? G * BN : BM * DBST;
    for (int i = threadIdx.x; i < n_db; i += NT) sDb[i] = 0.f;
  }

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, tq = lane % 4;
  const int key_w = warp * 16;  // this warp's first key in the tile

  float acc_dk[OA][4], acc_dv[OA][4];
#pragma unroll
  for (int o = 0; o < OA; ++o)
#pragma unroll
    for (int e = 0; e < 4; ++e) { acc_dk[o][e] = 0.f; acc_dv[o][e] = 0.f; }
  const float cap_log2 = a.softcap * kLog2e, scale_over_cap = a.scale / a.softcap;
  const float inv_cap = 1.f / a.softcap;
  const bool do_dbias = BIAS_BYTES > 0 && blockIdx.z == 0;  // one head-dim part writes dbias
  const bool db_atomic = p.dbias_accum != nullptr;
  // dbias cells shared by several CTAs (same key tile): over batch and/or over kv heads.
  const bool db_bcast_b = p.dbias_stride[0] == 0 && a.batch > 1;
  const bool db_bcast_h = p.dbias_stride[1] == 0 && a.kv_heads > 1;
  const int db_turn = (db_bcast_b ? b : 0) * (db_bcast_h ? a.kv_heads : 1) + (db_bcast_h ? hk : 0);
  const bool det = p.deterministic != 0;
  int* dq_sems = p.semaphores + ((static_cast<i64>(blockIdx.z) * a.batch + b) * a.kv_heads + hk) * m_tiles;
  int* db_sems = nullptr;
  if (det && do_dbias && db_atomic) {
    const i64 base = static_cast<i64>(gridDim.z) * a.batch * a.kv_heads * m_tiles;
    const int m_slots = rows_reduced ? 1 : m_tiles;
    db_sems = p.semaphores + base +
              ((static_cast<i64>(n_tile) * a.batch + (db_bcast_b ? 0 : b)) * a.kv_heads + (db_bcast_h ? 0 : hk)) * m_slots;
  }
  const bool db_sem_per_m = db_sems != nullptr && !rows_reduced;
  int sem_next = 0;        // deterministic (thread 0): first query tile not yet passed
  int release_m = -1;      // deterministic: query tile whose counters are released at the next barrier
  int prev_m = -1;
  int buf = 0, visited = 0;

  while (pr < p_end) {
    const int m = pr / G, hs = pr % G, h = h_first + hs, m0 = m * BM;
    const int pn = next_pair(pr + 1);
    const bool first_of_m = m != prev_m;
    const bool last_of_m = pn >= p_end || pn / G != m;
    cp_async_wait<0>();
    __syncthreads();  // (A)
    if (release_m >= 0 && threadIdx.x == 0) {
      sem_release(dq_sems + release_m);
      if (db_sem_per_m) sem_release(db_sems + release_m);
    }
    release_m = -1;
    if (pn < p_end) load_pair(pn, buf ^ 1);
    cp_async_commit();
    const u16* q_s = sQ(buf);
    const u16* do_s = sdO(buf);
    const float* lse_s = sLse(buf);
    const float* delta_s = sDelta(buf);

    // S^T = K Q^T, dP^T = V dO^T (keys x rows)
    float s[NA][4], dp[NA][4];
#pragma unroll
    for (int nt = 0; nt < NA; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) { s[nt][e] = 0.f; dp[nt][e] = 0.f; }
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
      u32 ka[4], va[4];
      const int a_off = (key_w + (lane % 8) + ((lane >> 3) & 1) * 8) * ST + ks * 16 + (lane >> 4) * 8;
      ldmatrix_x4(ka, smem_u32(sK + a_off));
      ldmatrix_x4(va, smem_u32(sV + a_off));
#pragma unroll
      for (int np = 0; np < NA / 2; ++np) {
        const int b_off = (np * 16 + (lane % 8) + (lane >> 4) * 8) * ST + ks * 16 + ((lane >> 3) & 1) * 8;
        u32 qb[4], ob[4];
        ldmatrix_x4(qb, smem_u32(q_s + b_off));
        mma_16816<T>(s[2 * np], ka, qb[0], qb[1]);
        mma_16816<T>(s[2 * np + 1], ka, qb[2], qb[3]);
        ldmatrix_x4(ob, smem_u32(do_s + b_off));
        mma_16816<T>(dp[2 * np], va, ob[0], ob[1]);
        mma_16816<T>(dp[2 * np + 1], va, ob[2], ob[3]);
      }
    }

    // P = 2^(s2 - lse2) ; dS = P (dP - D) [* (1 - tanh^2)] ; s <- P, dp <- dS
    const bool edge = n0 + BN > Sk || (CAUSAL && n0 + BN - 1 > m0 + Sk - Sq);
#pragma unroll
    for (int nt = 0; nt < NA; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = key_w + g + (e >= 2 ? 8 : 0);  // key in the tile
        const int r = nt * 8 + 2 * tq + (e & 1);       // row in the query tile
        float bval = 0.f;
        if constexpr (BIAS_BYTES > 0)
          bval = fmaxf(bias_to_float<T>(reinterpret_cast<const BiasRaw*>(sBias(buf) + r * kBiasRow)[col]),
                       kBiasFloor);
        float x = s[nt][e], th = 0.f;
        if constexpr (SOFTCAP) {
          th = tanhf(fmaf(x, scale_over_cap, bval * inv_cap));
          x = cap_log2 * th;
        } else {
          x = fmaf(x, a.scale_log2, bval * kLog2e);
        }
        bool keep = true;
        if constexpr (MASK_BYTES > 0) keep = mask_keep(reinterpret_cast<const MaskRaw*>(sMask(buf) + r * kMaskRow)[col]);
        if (edge) {
          const int key = n0 + col;
          keep = keep && key < Sk && (!CAUSAL || key <= m0 + r + Sk - Sq);
        }
        // P <= 1 (a probability): guards rounding of huge-negative (min-value) bias scores
        const float pv = keep ? fminf(fast_exp2(x - lse_s[r]), 1.f) : 0.f;
        float ds = pv * (dp[nt][e] - delta_s[r]);
        if constexpr (SOFTCAP) ds *= 1.f - th * th;
        s[nt][e] = pv;
        dp[nt][e] = ds;
      }

    // dV += P^T dO ; dK += dS^T Q (P^T, dS^T straight from the accumulators as A operands)
#pragma unroll
    for (int kk = 0; kk < NA / 2; ++kk) {
      u32 pa[4], da[4];
      pa[0] = T::pack(s[2 * kk][0], s[2 * kk][1]);
      pa[1] = T::pack(s[2 * kk][2], s[2 * kk][3]);
      pa[2] = T::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      pa[3] = T::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
      da[0] = T::pack(dp[2 * kk][0], dp[2 * kk][1]);
      da[1] = T::pack(dp[2 * kk][2], dp[2 * kk][3]);
      da[2] = T::pack(dp[2 * kk + 1][0], dp[2 * kk + 1][1]);
      da[3] = T::pack(dp[2 * kk + 1][2], dp[2 * kk + 1][3]);
#pragma unroll
      for (int op = 0; op < OA / 2; ++op) {
        const int off = (kk * 16 + (lane % 8) + ((lane >> 3) & 1) * 8) * ST + d0 + op * 16 + (lane >> 4) * 8;
        u32 ob[4], qb[4];
        ldmatrix_x4_trans(ob, smem_u32(do_s + off));
        mma_16816<T>(acc_dv[2 * op], pa, ob[0], ob[1]);
        mma_16816<T>(acc_dv[2 * op + 1], pa, ob[2], ob[3]);
        ldmatrix_x4_trans(qb, smem_u32(q_s + off));
        mma_16816<T>(acc_dk[2 * op], da, qb[0], qb[1]);
        mma_16816<T>(acc_dk[2 * op + 1], da, qb[2], qb[3]);
      }
    }

    // dS^T -> shared memory for dQ = dS K
#pragma unroll
    for (int nt = 0; nt < NA; ++nt) {
      const int r = nt * 8 + 2 * tq;
      *reinterpret_cast<u32*>(sdS + (key_w + g) * DSST + r) = T::pack(dp[nt][0], dp[nt][1]);
      *reinterpret_cast<u32*>(sdS + (key_w + g + 8) * DSST + r) = T::pack(dp[nt][2], dp[nt][3]);
    }

    // dbias: column sums (bias broadcast over rows) or dS summed over the group's heads
    bool flush_db = false;
    if (do_dbias) {
      if (rows_reduced) {
        float c0 = 0.f, c1 = 0.f;
#pragma unroll
        for (int nt = 0; nt < NA; ++nt) { c0 += dp[nt][0] + dp[nt][1]; c1 += dp[nt][2] + dp[nt][3]; }
        c0 = quad_sum(c0);
        c1 = quad_sum(c1);
        if (tq == 0) {  // each key belongs to one warp: no race between warps
          float* cs = sColSum + (p.dbias_head_div == 1 ? hs : 0) * BN + key_w + g;
          cs[0] += c0;
          cs[8] += c1;
        }
      } else {  // each element belongs to one lane: no race
#pragma unroll
        for (int nt = 0; nt < NA; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            sDb[(nt * 8 + 2 * tq + (e & 1)) * DBST + key_w + g + (e >= 2 ? 8 : 0)] += dp[nt][e];
        flush_db = p.dbias_head_div == 1 || last_of_m;
      }
    }

    if (det && first_of_m && threadIdx.x == 0) {
      sem_pass(dq_sems, sem_next, m, n_tile);
      sem_wait(dq_sems + m, n_tile);
      if (db_sem_per_m) {
        sem_pass(db_sems, sem_next, m, db_turn);
        sem_wait(db_sems + m, db_turn);
      }
      sem_next = m + 1;
    }
    __syncthreads();  // (B)

    // dQ += dS K (unscaled; bwd_convert_dq_kernel multiplies by scale)
    {
      const int wm = warp % Tr::kDqWarpsM, wd = warp / Tr::kDqWarpsM;
      const int c0 = d0 + wd * Tr::kDqCols;
      float acc_dq[QA][4];
#pragma unroll
      for (int o = 0; o < QA; ++o)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc_dq[o][e] = 0.f;
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        u32 da[4];
        ldmatrix_x4_trans(da, smem_u32(sdS + (kk * 16 + (lane % 8) + (lane >> 4) * 8) * DSST + wm * 16 +
                                       ((lane >> 3) & 1) * 8));
#pragma unroll
        for (int op = 0; op < QA / 2; ++op) {
          u32 kb[4];
          ldmatrix_x4_trans(kb, smem_u32(sK + (kk * 16 + (lane % 8) + ((lane >> 3) & 1) * 8) * ST + c0 +
                                         op * 16 + (lane >> 4) * 8));
          mma_16816<T>(acc_dq[2 * op], da, kb[0], kb[1]);
          mma_16816<T>(acc_dq[2 * op + 1], da, kb[2], kb[3]);
        }
      }
      float* dqa = p.dq_accum + ((static_cast<i64>(b) * a.heads + h) * Sq) * a.head_dim;
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int row = m0 + wm * 16 + g + 8 * hh;
        if (row >= Sq) continue;
#pragma unroll
        for (int o = 0; o < QA; ++o) {
          const int d = c0 + o * 8 + 2 * tq;
          if (d < a.head_dim) {
            atomicAdd(dqa + static_cast<i64>(row) * a.head_dim + d, acc_dq[o][2 * hh]);
            atomicAdd(dqa + static_cast<i64>(row) * a.head_dim + d + 1, acc_dq[o][2 * hh + 1]);
          }
        }
      }
    }

    // dbias tile from sDb (complete after (B)): write in the bias dtype, or fp32 add (shared cells);
    // sDb is zeroed for the next query tile (whose adds start after the next (A)).
    if (flush_db) {
      const int head = h / p.dbias_head_div;
      const i64 base = static_cast<i64>(b) * p.dbias_stride[0] + static_cast<i64>(head) * p.dbias_stride[1];
#pragma unroll 1
      for (int i = threadIdx.x; i < BM * BN; i += NT) {
        const int r = i / BN, c = i % BN;
        const int row = m0 + r, key = n0 + c;
        const float x = sDb[r * DBST + c];
        sDb[r * DBST + c] = 0.f;
        if (row < Sq && key < Sk) {
          const i64 off = base + static_cast<i64>(row) * p.dbias_stride[2] + key;
          if (db_atomic) {
            atomicAdd(p.dbias_accum + off, x);
          } else if constexpr (BIAS_BYTES == 4) {
            static_cast<float*>(p.dbias)[off] = x;
          } else {
            static_cast<u16*>(p.dbias)[off] = static_cast<u16>(T::pack(x, 0.f) & 0xffffu);
          }
        }
      }
    }

    if (det && last_of_m) release_m = m;
    prev_m = m;
    pr = pn;
    buf ^= 1;
    ++visited;
  }
  cp_async_wait<0>();
  __syncthreads();  // every warp's adds are done; sColSum is complete
  if (det && threadIdx.x == 0) {
    if (release_m >= 0) {
      sem_release(dq_sems + release_m);
      if (db_sem_per_m) sem_release(db_sems + release_m);
    }
    sem_pass(dq_sems, sem_next, m_tiles, n_tile);
    if (db_sem_per_m) sem_pass(db_sems, sem_next, m_tiles, db_turn);
  }

  // ---- dK, dV (dK scaled) for this warp's 16 keys and this CTA's columns
  {
    const i64 kv_row = static_cast<i64>(a.kv_heads) * a.head_dim;
    u16* dk = static_cast<u16*>(p.dk) + (static_cast<i64>(b) * Sk * a.kv_heads + hk) * a.head_dim;
    u16* dv = static_cast<u16*>(p.dv) + (static_cast<i64>(b) * Sk * a.kv_heads + hk) * a.head_dim;
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const int key = n0 + key_w + g + 8 * hh;
      if (key >= Sk) continue;
#pragma unroll
      for (int o = 0; o < OA; ++o) {
        const int d = d0 + o * 8 + 2 * tq;
        if (d < a.head_dim) {
          *reinterpret_cast<u32*>(dk + key * kv_row + d) =
              T::pack(acc_dk[o][2 * hh] * a.scale, acc_dk[o][2 * hh + 1] * a.scale);
          *reinterpret_cast<u32*>(dv + key * kv_row + d) = T::pack(acc_dv[o][2 * hh], acc_dv[o][2 * hh + 1]);
        }
      }
    }
  }

  // ---- dbias of a row-broadcast bias: one column sum per (head slot, key)
  if (rows_reduced && do_dbias) {
    const bool det_db = db_sems != nullptr;
    if (det_db) {
      if (threadIdx.x == 0) sem_wait(db_sems, db_turn);
      __syncthreads();
    }
    const int slots = p.dbias_head_div == 1 ? G : 1;
    for (int i = threadIdx.x; i < slots * BN; i += NT) {
      const int slot = i / BN, key = n0 + i % BN;
      if (key >= Sk) continue;
      const int head = (h_first + slot) / p.dbias_head_div;
      const i64 off = static_cast<i64>(b) * p.dbias_stride[0] + static_cast<i64>(head) * p.dbias_stride[1] + key;
      const float x = sColSum[i];
      if (db_atomic) {
        atomicAdd(p.dbias_accum + off, x);
      } else if constexpr (BIAS_BYTES == 4) {
        static_cast<float*>(p.dbias)[off] = x;
      } else {
        static_cast<u16*>(p.dbias)[off] = static_cast<u16>(T::pack(x, 0.f) & 0xffffu);
      }
    }
    if (det_db) {
      __syncthreads();
      if (threadIdx.x == 0) sem_release(db_sems);
    }
  }
  if (p.tiles_visited != nullptr && threadIdx.x == 0) atomicAdd(p.tiles_visited, static_cast<u64>(visited));
}

// D = rowsum(dO * O) in fp32, and zeroes the row of dq_accum; one warp per (batch, head, row).
template <typename T>
__global__ void __launch_bounds__(128) bwd_preprocess_kernel(const __grid_constant__ BwdParams p) {
  const AttnParams& a = p.a;
  const i64 rows = static_cast<i64>(a.batch) * a.heads * a.seqlen_q;
  const i64 row = static_cast<i64>(blockIdx.x) * 4 + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const i64 bh = row / a.seqlen_q;
  const int seq = static_cast<int>(row % a.seqlen_q);
  const int b = static_cast<int>(bh / a.heads), head = static_cast<int>(bh % a.heads);
  const u16* o = static_cast<const u16*>(p.out) + b * p.o_stride[0] + static_cast<i64>(seq) * p.o_stride[1] +
                 static_cast<i64>(head) * p.o_stride[2];
  const u16* d_o = static_cast<const u16*>(p.dout) + b * p.do_stride[0] + static_cast<i64>(seq) * p.do_stride[1] +
                   static_cast<i64>(head) * p.do_stride[2];
  float sum = 0.f;
  for (int d = 2 * lane; d < a.head_dim; d += 64) {
    const u32 x = *reinterpret_cast<const u32*>(o + d), y = *reinterpret_cast<const u32*>(d_o + d);
    sum += T::to_float(static_cast<u16>(x & 0xffffu)) * T::to_float(static_cast<u16>(y & 0xffffu));
    sum += T::to_float(static_cast<u16>(x >> 16)) * T::to_float(static_cast<u16>(y >> 16));
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  if (lane == 0) p.delta[row] = sum;
  float* dqa = p.dq_accum + row * a.head_dim;
  for (int d = lane; d < a.head_dim; d += 32) dqa[d] = 0.f;
}

// dq (B, Sq, H, D) in T = scale * dq_accum (B, H, Sq, D); one warp per (batch, head, row).
template <typename T>
__global__ void __launch_bounds__(128) bwd_convert_dq_kernel(const __grid_constant__ BwdParams p) {
  const AttnParams& a = p.a;
  const i64 rows = static_cast<i64>(a.batch) * a.heads * a.seqlen_q;
  const i64 row = static_cast<i64>(blockIdx.x) * 4 + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const i64 bh = row / a.seqlen_q;
  const int seq = static_cast<int>(row % a.seqlen_q);
  const int b = static_cast<int>(bh / a.heads), head = static_cast<int>(bh % a.heads);
  u16* dq = static_cast<u16*>(p.dq) + ((static_cast<i64>(b) * a.seqlen_q + seq) * a.heads + head) * a.head_dim;
  const float* src = p.dq_accum + row * a.head_dim;
  for (int d = 2 * lane; d < a.head_dim; d += 64) {
    const float2 x = *reinterpret_cast<const float2*>(src + d);
    *reinterpret_cast<u32*>(dq + d) = T::pack(x.x * a.scale, x.y * a.scale);
  }
}

}  // namespace dmattn
