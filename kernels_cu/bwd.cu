// bwd.cu — backward kernels (FA2 style, P recomputed from the saved lse; no online softmax).
//
// Per (batch b, query head h), rows i, keys j, in base 2 as the forward (s2 = log2(e) * score):
//   lse2_i = lse_i * log2 e, D_i = sum_d dO_id O_id   bwd_preprocess_kernel (row stats; lse_i = -inf
//                                                    gives lse2_i = +inf, so that P = 0)
//   P_ij  = 2^(s2_ij - lse2_i)                (hidden: P = 0)
//   dV_j += sum_i P_ij dO_i                   summed over the query heads of the kv group too
//   dP_ij = dO_i . V_j
//   dS_ij = P_ij (dP_ij - D_i)                softcap: dS_ij *= 1 - tanh_ij^2
//   dbias_ij = dS_ij                          summed over bias's broadcast dims
//   dQ_i += scale sum_j dS_ij K_j             fp32 reductions into dq_accum, scaled and converted
//   dK_j += scale sum_i dS_ij Q_i             by bwd_convert_dq_kernel
//
// bwd_dkdv_kernel: one CTA per (batch b and kv head hk = blockIdx.x, query chunk and head-dim part
// = blockIdx.y, key tile of kBlockN keys = blockIdx.z). D <= 128: 8 warps, 128 keys; D > 128:
// 4 warps, 64 keys, two head-dim parts (BwdTraits). Warp w owns keys 16w..16w+15. The CTA walks
// the pairs (query tile m, query head h of the group) of its query range from the last query tile
// down (m outer, h inner), visiting only the active ones (causal: tiles whose rows all precede the
// key tile's diagonal are outside the range; mask: a scan of the key tile's column strip sets one
// bit per (query tile[, head]) that holds a kept key; given the mask's block map, of the map's bits
// of the key tile instead, a 32nd of the bytes). For each pair (one step; the products are
// bwd_mma.cuh's, mma.sync or, on Hopper at D = 64 and 128, warpgroup MMAs):
//   S^T = K Q^T and dP^T = V dO^T         16 x kBlockM per warp, K/V as A, Q/dO as B operands
//   P^T = 2^(s2 - lse2)                   probabilities(): bounds checks only on edge tiles
//   dS^T, dbias share; P^T, dS^T packed   gradients(): already A fragments of the next products
//   dV += P^T dO, dK += dS^T Q            register accumulators (wgmma: in flight until dQ's wait)
//   dS^T -> shared memory (as T)          then dQ = dS K, warps tiled over rows x columns, added
//                                         to dq_accum from registers (sm_90: red.v2.f32)
// dbias: dS (fp32) summed over the heads of the group that share a dbias head, in shared memory
// (sDb), or where registers allow (BwdTraits::kRegisterRoom) in registers, stored into sDb once
// at the query tile's last head; flushed (flush_dbias: 16-byte stores) after it; or into per-head
// column sums (sColSum) when the bias broadcasts over rows; fp32 atomics into dbias_accum when CTAs
// of several batches / kv heads share a dbias element. A dbias with one writer per element is not
// zeroed by the host: each CTA writes zeros into the tiles of its strip that it skips (causal rows
// above the diagonal, query tiles without a kept key), overlapped with other CTAs' math instead of a
// memset of the whole array before the kernel (seed_32k: 2 GB).
//
// dQ traffic: each step adds a kBlockM x D fp32 tile, so dq_accum receives (active area) x D / 128
// adds: 128-key CTAs halve the 64-key count, and sm_90's red.global.add.v2.f32 (one request per
// two adjacent columns, straight from the mma accumulators: no staging, no barrier) halves the
// requests again. gqa8k_topk: ~0.4 G fp32 adds in ~0.1 G requests, 1.5 GB of L2 reduction
// traffic spread over the kernel.
//
// Query chunks (load balance): a key tile's query tiles [m_begin, m_tiles) are cut from the top
// into chunks of p.chunk_tiles (for a grid of few CTAs, e.g. one kv head under a causal mask,
// bwd_config picks the length whose launch, replayed in order on the resident CTA slots, finishes
// first: schedule_makespan). A key tile with several chunks writes each chunk's fp32 dK, dV to
// dkv_partial; the chunk that finishes last (a counter) sums them in chunk order (bitwise
// reproducible) and writes dK, dV.
//
// Launch order: blockIdx.x (b, hk) runs fastest, then the chunk, then the key tile: the heaviest
// key tiles (causal: the first ones) of every (b, hk) start first, each with all its chunks.
//
// Shared memory: BwdSmem (bwd_tiles.cuh; bwd_config.py mirrors it). Bool mask + bf16 bias, with the
// mask bits: D = 64 (mma.sync or wgmma, 64 rows) 180 / 166 KB; D = 128: mma.sync 32 rows 159 KB,
// wgmma 64 rows 231.6 KB (unpadded swizzled tiles; padded rows would need 245 KB).
// Copies per step: the first half of the CTA copies Q and the mask, the second dO and the bias,
// 64 threads the row stats (cp.async, double-buffered: the next pair's during this one). Mask and
// bias tiles shared by the group's heads (neither has a head per query head) are copied once per
// query tile, at its first pair, and read by its other pairs.
// Barriers per pair: (A) the pair's buffer has landed and every warp is done with the previous pair
// (its buffer, sdS and sDb may be overwritten: the next pair's copies start here); (B) sdS and sDb
// are complete. Deterministic mode with a shared dbias adds one after a query tile's dbias flush.
//
// Deterministic mode (bwd_tiles.cuh): dQ is added into dq_accum in 32-bit fixed point, row i
// scaled by q_i = p.dq_scale[b, h, i] (a power of two from a bound on the row's sums, set by
// bwd_preprocess_kernel): integer adds give the same bits in any order, so no CTA waits for another
// and the schedule is the default's. dbias_accum tiles shared by several (b, hk) CTAs of one key
// tile take their fp32 adds in (b, hk) order (turn_wait), per query tile.
#include "params.cuh"
#include "bwd_mma.cuh"
#include "bwd_tiles.cuh"

namespace dmattn {

// One dbias element: an fp32 add into dbias_accum when CTAs share it, else a store in the bias dtype.
template <typename T, int BIAS_BYTES>
__device__ __forceinline__ void store_dbias(const BwdParams& p, i64 off, float x, bool atomic) {
  if (atomic) {
    atomicAdd(p.dbias_accum + off, x);
  } else if constexpr (BIAS_BYTES == 4) {
    static_cast<float*>(p.dbias)[off] = x;
  } else {
    static_cast<u16*>(p.dbias)[off] = static_cast<u16>(T::pack(x, 0.f) & 0xffffu);
  }
}

// dbias keys key..key + 8 of one row (element offset off): one 16-byte store in the bias dtype (or
// 8-byte fp32 reductions into dbias_accum); a group cut by the end of the keys, or a dbias whose
// rows are not 16-byte aligned (`vec` false), goes element by element.
template <typename T, int BIAS_BYTES>
__device__ __forceinline__ void store_dbias8(const BwdParams& p, i64 off, int key, const float (&x)[8], bool atomic,
                                             bool vec) {
  if (vec && key + 8 <= p.a.seqlen_k) {
    if (atomic) {
#pragma unroll
      for (int j = 0; j < 8; j += 2) red_add_f32x2(p.dbias_accum + off + j, x[j], x[j + 1]);
    } else if constexpr (BIAS_BYTES == 4) {
      float4* dst = reinterpret_cast<float4*>(static_cast<float*>(p.dbias) + off);
      dst[0] = make_float4(x[0], x[1], x[2], x[3]);
      dst[1] = make_float4(x[4], x[5], x[6], x[7]);
    } else {
      *reinterpret_cast<uint4*>(static_cast<u16*>(p.dbias) + off) =
          make_uint4(T::pack(x[0], x[1]), T::pack(x[2], x[3]), T::pack(x[4], x[5]), T::pack(x[6], x[7]));
    }
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j)
      if (key + j < p.a.seqlen_k) store_dbias<T, BIAS_BYTES>(p, off + j, x[j], atomic);
  }
}

// Writes a query tile's dbias (sDb: BM x BN fp32, complete) and, when the next tile adds into it
// (ZERO), zeroes sDb. Eight keys per thread and iteration: two 16-byte shared loads, store_dbias8.
template <typename T, int BIAS_BYTES, int BM, int BN, int NT, int DBST, bool ZERO>
__device__ __forceinline__ void flush_dbias(const BwdParams& p, float* sDb, i64 base, int m0, int n0, bool atomic,
                                            bool vec) {
  constexpr int kGroups = BN / 8;
#pragma unroll 1
  for (int i = threadIdx.x; i < BM * kGroups; i += NT) {
    const int r = i / kGroups, c = (i % kGroups) * 8;
    const int row = m0 + r, key = n0 + c;
    float4* src = reinterpret_cast<float4*>(sDb + r * DBST + c);
    const float4 lo = src[0], hi = src[1];
    if (ZERO) src[0] = src[1] = make_float4(0.f, 0.f, 0.f, 0.f);
    if (row >= p.a.seqlen_q) continue;
    const float x[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
    store_dbias8<T, BIAS_BYTES>(p, base + static_cast<i64>(row) * p.dbias_stride[2] + key, key, x, atomic, vec);
  }
}

// Zeros for dbias rows [row_lo, row_hi) x keys [n0, n0 + BN) (rows already clipped to Sq): tiles
// this CTA owns but never computes (a dbias with one writer per element: no atomics).
template <typename T, int BIAS_BYTES, int BN, int NT>
__device__ __forceinline__ void zero_dbias_rows(const BwdParams& p, i64 base, int row_lo, int row_hi, int n0,
                                                bool vec) {
  constexpr int kGroups = BN / 8;
  const float zeros[8] = {};
#pragma unroll 1
  for (int i = threadIdx.x; i < (row_hi - row_lo) * kGroups; i += NT) {
    const int row = row_lo + i / kGroups, key = n0 + (i % kGroups) * 8;
    store_dbias8<T, BIAS_BYTES>(p, base + static_cast<i64>(row) * p.dbias_stride[2] + key, key, zeros, false, vec);
  }
}

// dS = P (dP - D) [* (1 - tanh^2)] and its dbias share, P^T and dS^T packed (bwd_mma.cuh), for this
// lane's elements (keys key0, key0 + 8; rows row0, row0 + 1 of each 8-row column tile). DBIAS:
//   kNoDbias       nothing (no bias, or another head-dim part writes it)
//   kDbiasTile     sDb[row][key] += dS (summed over the heads that share a dbias head; each
//                  element belongs to one lane: no race)
//   kDbiasRegs     db = dS (fresh: the first head since the last flush) or db + dS, this lane's
//                  elements in registers (store_db_tile writes them into sDb before a flush)
//   kDbiasColumns  col0, col1 += dS over this lane's rows (keys key0, key0 + 8; a row-broadcast bias)
enum { kNoDbias, kDbiasTile, kDbiasRegs, kDbiasColumns };
// sDb index of element e of column tile nt (this lane: keys key0, key0 + 8, rows row0, row0 + 1).
template <int DBST>
__device__ __forceinline__ int db_cell(int nt, int e, int key0, int row0) {
  return (nt * 8 + row0 + (e & 1)) * DBST + key0 + (e >= 2 ? 8 : 0);
}
template <int DBIAS, typename T, bool SOFTCAP, int DBST, int NA, int NT>
__device__ __forceinline__ void gradients(const float (&s)[NA][4], const float (&dp)[NA][4], const float (&th)[NT][4],
                                          const float* stats, float* sDb, int key0, int row0, u32 (&p_t)[NA][2],
                                          u32 (&ds_t)[NA][2], float (&db)[NA][4], bool fresh, float& col0,
                                          float& col1) {
#pragma unroll
  for (int nt = 0; nt < NA; ++nt) {
    float ds[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int r = nt * 8 + row0 + (e & 1);
      ds[e] = s[nt][e] * (dp[nt][e] - stats[2 * r + 1]);
      if constexpr (SOFTCAP) ds[e] *= 1.f - th[nt][e] * th[nt][e];
      if constexpr (DBIAS == kDbiasTile) sDb[db_cell<DBST>(nt, e, key0, row0)] += ds[e];
      if constexpr (DBIAS == kDbiasRegs) db[nt][e] = fresh ? ds[e] : db[nt][e] + ds[e];
    }
    if constexpr (DBIAS == kDbiasColumns) {
      col0 += ds[0] + ds[1];
      col1 += ds[2] + ds[3];
    }
    p_t[nt][0] = T::pack(s[nt][0], s[nt][1]);
    p_t[nt][1] = T::pack(s[nt][2], s[nt][3]);
    ds_t[nt][0] = T::pack(ds[0], ds[1]);
    ds_t[nt][1] = T::pack(ds[2], ds[3]);
  }
}

// kDbiasRegs: this lane's dbias sums into sDb (the same elements gradients() would add there).
template <int DBST, int NA>
__device__ __forceinline__ void store_db_tile(float* sDb, const float (&db)[NA][4], int key0, int row0) {
#pragma unroll
  for (int nt = 0; nt < NA; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) sDb[db_cell<DBST>(nt, e, key0, row0)] = db[nt][e];
}

// A 2-byte bias's values at this lane's elements, transposed on the way by ldmatrix (one load per
// 32 values instead of one per value): x4 load q reads the 8 x 8 matrices i = 0..3 of rows
// (2q + i / 2) * 8.. and keys key_w + 8 (i % 2).. (lane l addresses row l % 8 of matrix l / 8) and
// leaves in b[2q + i / 2][i % 2] the pair (rows 2tq, 2tq + 1) of key g: the S^T fragment's layout.
template <typename Rows, int NA>
__device__ __forceinline__ void bias_fragments(u32 (&b)[NA][2], const unsigned char* sBias, int key_w, int lane) {
  const int i = lane / 8;
  const u32 base = smem_u32(sBias + Rows::chunk_offset((i / 2) * 8 + lane % 8, key_w / 8 + i % 2));
#pragma unroll
  for (int q = 0; q < NA / 2; ++q)
    ldmatrix_x4_trans(reinterpret_cast<u32 (&)[4]>(b[2 * q]), base + q * 16 * Rows::kRowBytes);
}

// P^T = 2^(s2 - lse2) in place of S^T for one step: s2 = log2(e) * mask(softcap(scale * s + bias)),
// hidden positions 0. This lane holds keys key0, key0 + 8 of the tile and rows row0, row0 + 1 of
// each 8-row column tile (bwd_mma.cuh). Only the last key tile and tiles on the causal diagonal
// check bounds (EDGE): the other copy has no index math or selects per element.
// FRAG_BIAS: a 2-byte bias read by bias_fragments (registers permitting), else value by value.
template <bool EDGE, typename T, typename Sm, int MASK_BYTES, int BIAS_BYTES, bool FRAG_BIAS, bool CAUSAL, bool SOFTCAP,
          int NA, int NT>
__device__ __forceinline__ void probabilities(float (&s)[NA][4], float (&th)[NT][4], const unsigned char* sMask,
                                              const unsigned char* sBias, const float* stats, const AttnParams& a,
                                              int key_w, int lane, int n0, int m0) {
  const int key0 = key_w + lane / 4, row0 = 2 * (lane % 4);
  typedef typename Raw<MASK_BYTES ? MASK_BYTES : 1>::type MaskRaw;
  typedef typename Raw<BIAS_BYTES ? BIAS_BYTES : 2>::type BiasRaw;
  const float cap_log2 = a.softcap * kLog2e, scale_over_cap = a.scale / a.softcap;
  const float inv_cap = 1.f / a.softcap;
  // Offsets of this lane's elements in column tile 0, [key half][row]: tile nt is 8 rows further,
  // which keeps the swizzle phase, so every other element is a constant offset from these.
  int mask_off[2][2], bias_off[2][2];
  [[maybe_unused]] u32 bias2[FRAG_BIAS ? NA : 1][2];
  if constexpr (FRAG_BIAS) bias_fragments<typename Sm::BiasRows>(bias2, sBias, key_w, lane);
#pragma unroll
  for (int hk = 0; hk < 2; ++hk)
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      mask_off[hk][j] = Sm::MaskRows::offset(row0 + j, key0 + 8 * hk);
      bias_off[hk][j] = Sm::BiasRows::offset(row0 + j, key0 + 8 * hk);
    }
#pragma unroll
  for (int nt = 0; nt < NA; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int hk = e >> 1, j = e & 1;
      const int r = nt * 8 + row0 + j;  // row in the query tile
      float bval = 0.f;
      if constexpr (FRAG_BIAS) {
        const float2 pair = T::bias_pair(bias2[nt][hk]);
        bval = j ? pair.y : pair.x;
      } else if constexpr (BIAS_BYTES > 0) {
        bval = bias_to_float<T>(*reinterpret_cast<const BiasRaw*>(
            sBias + bias_off[hk][j] + nt * 8 * Sm::BiasRows::kRowBytes));
      }
      // x = s2 - lse2, the exponent of P
      float x;
      if constexpr (SOFTCAP) {
        th[nt][e] = fast_tanh(fmaf(s[nt][e], scale_over_cap, bval * inv_cap));
        x = fmaf(cap_log2, th[nt][e], -stats[2 * r]);
      } else {
        x = fmaf(s[nt][e], a.scale_log2, fmaf(bval, kLog2e, -stats[2 * r]));
      }
      bool keep = true;
      if constexpr (MASK_BYTES > 0)
        keep = mask_keep(
            *reinterpret_cast<const MaskRaw*>(sMask + mask_off[hk][j] + nt * 8 * Sm::MaskRows::kRowBytes));
      if constexpr (EDGE) {
        const int key = n0 + key0 + 8 * hk;
        keep = keep && key < a.seqlen_k && (!CAUSAL || key <= m0 + r + a.seqlen_k - a.seqlen_q);
      }
      // P <= 1 (a probability): guards rounding of huge-negative (min-value) bias scores
      const float pv = fminf(fast_exp2(x), 1.f);
      s[nt][e] = keep ? pv : 0.f;
    }
}

template <typename T, int HEAD_DIM, bool WGMMA, int MASK_BYTES, int BIAS_BYTES, bool CAUSAL, bool SOFTCAP>
__global__ void __launch_bounds__((BwdTraits<HEAD_DIM, MASK_BYTES + BIAS_BYTES, WGMMA>::kThreads),
                                  (BwdTraits<HEAD_DIM, MASK_BYTES + BIAS_BYTES, WGMMA>::kMinBlocks))
bwd_dkdv_kernel(const __grid_constant__ BwdParams p) {
  typedef BwdTraits<HEAD_DIM, MASK_BYTES + BIAS_BYTES, WGMMA> Tr;
  typedef typename BwdMmaFor<T, Tr, WGMMA>::type Mma;
  typedef BwdSmem<Mma, MASK_BYTES, BIAS_BYTES> Sm;
  constexpr int BM = Tr::kBlockM, BN = Tr::kBlockN, NT = Tr::kThreads;
  constexpr int NA = Tr::kNAtoms, OA = Tr::kOutAtoms, QA = Tr::kDqAtoms, DBST = Tr::kDbStride;
  const AttnParams& a = p.a;

  // ---- what this CTA owns: key tile n_tile of (b, hk), output columns d0.., query tiles [m_lo, m_hi)
  const int b = blockIdx.x / a.kv_heads, hk = blockIdx.x % a.kv_heads;
  const int n_tile = blockIdx.z, n0 = n_tile * BN;
  const int part = blockIdx.y % Tr::kDSplit, chunk = blockIdx.y / Tr::kDSplit;
  const int d0 = part * Tr::kDOut;  // first output column of dK, dV, dQ
  const int G = a.group, h_first = hk * G;
  const int Sq = a.seqlen_q, Sk = a.seqlen_k;
  const int m_tiles = (Sq + BM - 1) / BM;
  // Causal: row i sees key n0 iff i >= n0 - (Sk - Sq); earlier query tiles are never visited.
  const int m_begin = CAUSAL ? min(m_tiles, max(0, n0 - Sk + Sq) / BM) : 0;
  // Chunk c holds [m_tiles - (c+1) L, m_tiles - c L) of [m_begin, m_tiles); chunk 0 always runs
  // (with an empty range it writes dK = dV = 0).
  const int L = p.chunk_tiles;
  const int n_chunks = max(1, (m_tiles - m_begin + L - 1) / L);
  if (chunk >= n_chunks) return;
  const int m_hi = m_tiles - chunk * L, m_lo = max(m_begin, m_hi - L);
  const int p_lo = m_lo * G, p_hi = m_hi * G;  // pair index = m * G + (h - h_first), walked downwards
  const FastDivmod by_group(G);  // pair index -> query tile m

  extern __shared__ __align__(1024) unsigned char smem[];
  u16* sK = reinterpret_cast<u16*>(smem + Sm::kK);
  u16* sV = reinterpret_cast<u16*>(smem + Sm::kV);
  u16* sdS = reinterpret_cast<u16*>(smem + Sm::kDs);
  float* sDb = reinterpret_cast<float*>(smem + Sm::kFixed);
  float* sColSum = sDb;
  const bool rows_reduced = BIAS_BYTES > 0 && p.dbias_rows_reduced;
  u32* sBits = reinterpret_cast<u32*>(sDb + (BIAS_BYTES == 0 ? 0 : rows_reduced ? G * BN : BM * DBST));
  auto sQ = [&](int bi) { return reinterpret_cast<u16*>(smem + Sm::kQ + bi * Mma::tile_bytes(BM)); };
  auto sdO = [&](int bi) { return reinterpret_cast<u16*>(smem + Sm::kDo + bi * Mma::tile_bytes(BM)); };
  auto sMask = [&](int bi) { return smem + Sm::kMask + bi * Sm::kMaskTile; };
  auto sBias = [&](int bi) { return smem + Sm::kBias + bi * Sm::kBiasTile; };
  auto sStats = [&](int bi) { return reinterpret_cast<float*>(smem + Sm::kStats) + bi * 2 * BM; };

  // The mask differs between the heads of the group only when it has one head per query head.
  const bool mask_per_head = MASK_BYTES > 0 && G > 1 && a.mask_head_div == 1 && a.mask_stride[1] != 0;
  const int mask_slots = mask_per_head ? G : 1;
  // Otherwise, and unless the bias has one head per query head, the group's heads read the same
  // mask and bias tiles: a query tile's first pair copies them and the other heads reuse them
  // (slot: the parity of the query tiles visited), a G-th of the copies.
  const bool bias_per_head = BIAS_BYTES > 0 && G > 1 && a.bias_head_div == 1 && a.bias_stride[1] != 0;
  const bool aux_per_pair = G == 1 || mask_per_head || bias_per_head;

  // Batch b's q, dout, mask, bias and the query head -> mask, bias, dbias head divisions: kept in
  // shared memory, where the step reads them after its barrier, rather than in 17 of the 255
  // registers through the whole loop.
  BwdScalars& sc = *reinterpret_cast<BwdScalars*>(smem + Sm::kScalars);
  static_assert(sizeof(BwdScalars) <= Sm::kScalarBytes, "BwdSmem::kScalarBytes");
  if (threadIdx.x == 0) {
    sc.batch[0] = static_cast<const unsigned char*>(a.q) + b * a.q_stride[0] * 2;
    sc.batch[1] = static_cast<const unsigned char*>(p.dout) + b * p.do_stride[0] * 2;
    sc.batch[2] = static_cast<const unsigned char*>(a.mask) + b * a.mask_stride[0] * MASK_BYTES;
    sc.batch[3] = static_cast<const unsigned char*>(a.bias) + b * a.bias_stride[0] * BIAS_BYTES;
    sc.head_div[0] = FastDivmod(a.mask_head_div);
    sc.head_div[1] = FastDivmod(a.bias_head_div);
    sc.head_div[2] = FastDivmod(p.dbias_head_div);
  }
  __syncthreads();

  // ---- mask scan: one bit per (head slot, query tile) with a kept key in this key tile
  if constexpr (MASK_BYTES > 0) {
    const int words = (mask_slots * m_tiles + 31) / 32;
    for (int i = threadIdx.x; i < words; i += NT) sBits[i] = 0u;
    __syncthreads();
    static_assert(kMapKeys % BN == 0, "a key tile lies in one tile of the block map");
    if (a.block_map != nullptr)
      scan_map_rows<BM, NT>(sBits, a.block_map + b * a.map_stride[0] + (h_first / a.mask_head_div) * a.map_stride[1],
                            a.map_stride[1], mask_slots, a.map_stride[2], n0 / kMapKeys, m_lo, m_hi, m_tiles, Sq);
    else
      scan_mask_rows<MASK_BYTES, BN, BM, NT, CAUSAL>(
          sBits, sc.batch[2] + (h_first / a.mask_head_div) * a.mask_stride[1] * MASK_BYTES,
          a.mask_stride[1] * MASK_BYTES, mask_slots, a.mask_stride, n0, m_lo, m_hi, m_tiles, Sq, Sk,
          a.mask_vec);
    __syncthreads();
  }
  auto active = [&](int pr) -> bool {
    if constexpr (MASK_BYTES > 0) {
      const int m = by_group.div(pr);
      const int bit = (mask_per_head ? pr - m * G : 0) * m_tiles + m;
      return (sBits[bit >> 5] >> (bit & 31)) & 1u;
    }
    return true;
  };
  auto next_pair = [&](int pr) {  // the first active pair at or below pr (p_lo - 1: none)
    while (pr >= p_lo && !active(pr)) --pr;
    return pr;
  };

  // ---- deterministic mode: fixed-point dQ, and the turn bits of shared dbias tiles (bwd_tiles.cuh)
  const bool det = p.deterministic != 0;
  const bool do_dbias = BIAS_BYTES > 0 && (Tr::kDSplit == 1 || part == 0);  // one head-dim part writes dbias
  const bool db_atomic = p.dbias_accum != nullptr;
  // dbias rows start on 16-byte boundaries: 8-key groups are written whole (flush_dbias)
  const bool db_vec = ((p.dbias_stride[0] | p.dbias_stride[1] | p.dbias_stride[2]) & 7) == 0;
  // dbias cells shared by several CTAs (same key tile): over batch and/or over kv heads.
  const bool db_bcast_b = p.dbias_stride[0] == 0 && a.batch > 1;
  const bool db_bcast_h = p.dbias_stride[1] == 0 && a.kv_heads > 1;
  const int db_turn = (db_bcast_b ? b : 0) * (db_bcast_h ? a.kv_heads : 1) + (db_bcast_h ? hk : 0);
  const int db_words = ((db_bcast_b ? a.batch : 1) * (db_bcast_h ? a.kv_heads : 1) + 31) / 32;
  auto dbias_base = [&](int h) {  // element offset of dbias (b, dbias head of query head h, 0, 0)
    return static_cast<i64>(b) * p.dbias_stride[0] + static_cast<i64>(sc.head_div[2].div(h)) * p.dbias_stride[1];
  };
  const bool db_ordered = det && do_dbias && db_atomic;
  const bool db_per_m = db_ordered && !rows_reduced;
  auto db_turns = [&](int m) {  // m: query tile (0 for column sums)
    const i64 cell =
        (static_cast<i64>(n_tile) * a.batch + (db_bcast_b ? 0 : b)) * a.kv_heads + (db_bcast_h ? 0 : hk);
    return p.turns + (cell * (rows_reduced ? 1 : m_tiles) + m) * db_words;
  };
  if (db_per_m) {  // nothing to add at the query tiles this CTA skips: their turns pass at once
    for (int m = m_lo + threadIdx.x; m < m_hi; m += NT)
      if (next_pair(m * G + G - 1) < m * G) turn_mark(db_turns(m), db_turn);
  }

  // ---- tile copies
  auto load_pair = [&](int pr, int bi, int aux_bi) {  // aux_bi < 0: the mask and bias tiles are in place
    const int m = by_group.div(pr), m0 = m * BM, h = h_first + pr - m * G;
    const u16* q = reinterpret_cast<const u16*>(sc.batch[0]);
    const u16* dout = reinterpret_cast<const u16*>(sc.batch[1]);
    // 8 warps: the first half of the CTA copies Q and the mask, the second dO and the bias (each
    // thread sets up two copies, not four)
    constexpr int CT = NT == 256 ? NT / 2 : NT;  // copying threads per tile
    const int tid = threadIdx.x % CT;
    const bool first = NT != 256 || threadIdx.x < CT, second = NT != 256 || threadIdx.x >= CT;
    if (first)
      load_strided_rows<HEAD_DIM, BM, CT, typename Mma::template Layout<BM>>(
          sQ(bi), q + static_cast<i64>(m0) * a.q_stride[1] + static_cast<i64>(h) * a.q_stride[2], a.q_stride[1],
          Sq - m0, a.head_dim, tid);
    if (second)
      load_strided_rows<HEAD_DIM, BM, CT, typename Mma::template Layout<BM>>(
          sdO(bi), dout + static_cast<i64>(m0) * p.do_stride[1] + static_cast<i64>(h) * p.do_stride[2],
          p.do_stride[1], Sq - m0, a.head_dim, tid);
    if constexpr (MASK_BYTES > 0)
      if (first && aux_bi >= 0)
        load_aux_tile<MASK_BYTES, BN, CT, Mma::kSwizzledAux>(
            sMask(aux_bi), sc.batch[2] + sc.head_div[0].div(h) * a.mask_stride[1] * MASK_BYTES, a.mask_stride, m0,
            BM, n0, Sq, Sk, a.mask_vec, tid);
    if constexpr (BIAS_BYTES > 0)
      if (second && aux_bi >= 0)
        load_aux_tile<BIAS_BYTES, BN, CT, Mma::kSwizzledAux>(
            sBias(aux_bi), sc.batch[3] + sc.head_div[1].div(h) * a.bias_stride[1] * BIAS_BYTES, a.bias_stride, m0,
            BM, n0, Sq, Sk, a.bias_vec, tid);
    // {lse2, D} of each row (rows past Sq: zeros, with zero dO, so dS = 0 there)
    if (threadIdx.x < BM) {
      const int row = m0 + threadIdx.x;
      const float* src = p.row_stats + ((static_cast<i64>(b) * a.heads + h) * Sq + row) * 2;
      cp_async_8(smem_u32(sStats(bi) + 2 * threadIdx.x), row < Sq ? src : p.row_stats, row < Sq);
    }
  };

  const u16* k = static_cast<const u16*>(a.k) + b * a.k_stride[0] + hk * a.k_stride[2];
  const u16* v = static_cast<const u16*>(a.v) + b * a.v_stride[0] + hk * a.v_stride[2];
  load_strided_rows<HEAD_DIM, BN, NT, typename Mma::template Layout<BN>>(
      sK, k + static_cast<i64>(n0) * a.k_stride[1], a.k_stride[1], Sk - n0, a.head_dim);
  load_strided_rows<HEAD_DIM, BN, NT, typename Mma::template Layout<BN>>(
      sV, v + static_cast<i64>(n0) * a.v_stride[1], a.v_stride[1], Sk - n0, a.head_dim);
  int pr = next_pair(p_hi - 1);
  if (pr >= p_lo) load_pair(pr, 0, 0);
  cp_async_commit();
  if (BIAS_BYTES > 0) {
    const int n_db = rows_reduced ? G * BN : BM * DBST;
    for (int i = threadIdx.x; i < n_db; i += NT) sDb[i] = 0.f;
  }

  // ---- dbias written directly (one writer per element) is not zeroed by the host: zeros for the
  // tiles of this strip that no step flushes, the query tiles of [m_lo, m_hi) without an active
  // pair (of the head, when each query head has its own dbias head) and, from the chunk holding
  // m_begin, the rows above the causal diagonal. Written here, while the first pair's copies land
  // (spread over the steps instead, the stores slowed the steps' loads more than they saved).
  if (BIAS_BYTES > 0 && do_dbias && !db_atomic && !rows_reduced) {
    const bool per_head = p.dbias_head_div == 1;
#pragma unroll 1
    for (int hs = 0; hs < (per_head ? G : 1); ++hs) {
      const i64 base = dbias_base(h_first + hs);
      if (m_lo == m_begin) zero_dbias_rows<T, BIAS_BYTES, BN, NT>(p, base, 0, min(Sq, m_begin * BM), n0, db_vec);
      if constexpr (MASK_BYTES > 0) {
#pragma unroll 1
        for (int m = m_lo; m < m_hi; ++m) {
          bool flushed = false;  // some pair of tile m flushes this dbias head
          for (int h2 = per_head ? hs : 0; h2 < (per_head ? hs + 1 : G); ++h2) flushed = flushed || active(m * G + h2);
          if (!flushed) zero_dbias_rows<T, BIAS_BYTES, BN, NT>(p, base, m * BM, min(Sq, m * BM + BM), n0, db_vec);
        }
      }
    }
  }

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, tq = lane % 4;
  const int key_w = warp * 16;  // this warp's first key in the tile

  float acc_dk[OA][4], acc_dv[OA][4];
#pragma unroll
  for (int o = 0; o < OA; ++o)
#pragma unroll
    for (int e = 0; e < 4; ++e) { acc_dk[o][e] = 0.f; acc_dv[o][e] = 0.f; }
  int steps = 0;  // pairs computed; the pair's buffer is steps % 2
  int tiles_seen = 0;  // query tiles finished before this pair's (shared mask/bias tiles: their slot)
  float db[NA][4];  // kRegisterRoom: this lane's dS summed since the last flush (fresh: none yet)
  bool db_fresh = true;

  while (pr >= p_lo) {
    const int m = by_group.div(pr), hs = pr - m * G, h = h_first + hs, m0 = m * BM;
    const int buf = steps & 1;
    const int pn = next_pair(pr - 1);
    const bool last_of_m = pn < p_lo || by_group.div(pn) != m;
    const int aux = aux_per_pair ? buf : tiles_seen & 1;  // this pair's mask and bias slot
    cp_async_wait<0>();
    Mma::copies_visible();
    __syncthreads();  // (A)
    if (pn >= p_lo) load_pair(pn, buf ^ 1, aux_per_pair || last_of_m ? aux ^ 1 : -1);
    cp_async_commit();
    const u16* q_s = sQ(buf);
    const u16* do_s = sdO(buf);
    const float* stats = sStats(buf);  // row r: {lse2, D} at 2r, 2r + 1

    // S^T = K Q^T, dP^T = V dO^T (keys x rows)
    float s[NA][4], dp[NA][4];
    Mma::sdp_issue(s, dp, sK, sV, q_s, do_s, key_w, lane);

    // P = 2^(s2 - lse2) in s, once S^T is complete (wgmma: while dP^T computes)
    [[maybe_unused]] float th[SOFTCAP ? NA : 1][4];  // softcap: tanh of each score, for its derivative
    constexpr bool kFragBias = BIAS_BYTES == 2 && Tr::kRegisterRoom;
    Mma::wait_s(s);
    if (n0 + BN > Sk || (CAUSAL && n0 + BN - 1 > m0 + Sk - Sq))
      probabilities<true, T, Sm, MASK_BYTES, BIAS_BYTES, kFragBias, CAUSAL, SOFTCAP>(
          s, th, sMask(aux), sBias(aux), stats, a, key_w, lane, n0, m0);
    else
      probabilities<false, T, Sm, MASK_BYTES, BIAS_BYTES, kFragBias, CAUSAL, SOFTCAP>(
          s, th, sMask(aux), sBias(aux), stats, a, key_w, lane, n0, m0);

    // dS = P (dP - D) [* (1 - tanh^2)] ; dbias += dS (fp32) ; P^T, dS^T packed (bwd_mma.cuh)
    Mma::wait_dp(dp);
    u32 p_t[NA][2], ds_t[NA][2];
    float col0 = 0.f, col1 = 0.f;  // row-broadcast bias: this lane's dS summed over its rows
    constexpr int kTileDbias = Tr::kRegisterRoom ? kDbiasRegs : kDbiasTile;
    if (!do_dbias)
      gradients<kNoDbias, T, SOFTCAP, DBST>(s, dp, th, stats, sDb, key_w + g, 2 * tq, p_t, ds_t, db, db_fresh, col0,
                                            col1);
    else if (rows_reduced)
      gradients<kDbiasColumns, T, SOFTCAP, DBST>(s, dp, th, stats, sDb, key_w + g, 2 * tq, p_t, ds_t, db, db_fresh,
                                                 col0, col1);
    else
      gradients<kTileDbias, T, SOFTCAP, DBST>(s, dp, th, stats, sDb, key_w + g, 2 * tq, p_t, ds_t, db, db_fresh,
                                              col0, col1);

    // dV += P^T dO ; dK += dS^T Q (P^T, dS^T from registers as A operands) ; dS^T for dQ
    Mma::dkdv_issue(acc_dk, acc_dv, p_t, ds_t, q_s, do_s, d0, lane);
    Mma::store_ds(sdS, ds_t, key_w, g, tq);
    Mma::copies_visible();

    // dbias of a row-broadcast bias: column sums per head slot (each key belongs to one warp: no
    // race between warps); otherwise flush sDb after the tile's last head (or each head's own)
    bool flush_db = false;
    if (do_dbias) {
      if (rows_reduced) {
        col0 = quad_sum(col0);
        col1 = quad_sum(col1);
        if (tq == 0) {
          float* cs = sColSum + (p.dbias_head_div == 1 ? hs : 0) * BN + key_w + g;
          cs[0] += col0;
          cs[8] += col1;
        }
      } else {
        flush_db = p.dbias_head_div == 1 || last_of_m;
        if (Tr::kRegisterRoom && flush_db) store_db_tile<DBST>(sDb, db, key_w + g, 2 * tq);
        db_fresh = flush_db;
      }
    }

    // deterministic dbias: the turn of tile m is held from its first pair (the highest active
    // head) to the flush of its last
    if (db_per_m && threadIdx.x == 0 && next_pair(m * G + G - 1) == pr) turn_wait(db_turns(m), db_turn);
    __syncthreads();  // (B)

    // dbias tile from sDb (complete after (B)): write in the bias dtype, or fp32 add (shared cells);
    // sDb is zeroed for the next query tile (whose adds start after the next (A)) unless dbias sums
    // in registers. With registers to spare, while the dQ product computes; else after it.
    auto flush = [&] {
      if (flush_db)
        flush_dbias<T, BIAS_BYTES, BM, BN, NT, DBST, !Tr::kRegisterRoom>(p, sDb, dbias_base(h), m0, n0, db_atomic,
                                                                         db_vec);
    };
    const bool dq_warp = Tr::kDqWarps == Tr::kWarps || warp < Tr::kDqWarps;  // uniform unless D = 96
    // dQ += dS K (unscaled; bwd_convert_dq_kernel multiplies by scale): this warp's 16 rows x
    // kDqCols columns, reduced into dq_accum (deterministic: in fixed point, bwd_tiles.cuh)
    if (dq_warp) {
      const int wm = warp % Tr::kDqWarpsM, wd = warp / Tr::kDqWarpsM;
      const int c0 = d0 + wd * Tr::kDqCols;
      // this lane's first element: row r = wm * 16 + g of the tile, column c0 + 2 tq; the others are
      // constant offsets from it (predicated adds: rows past Sq, columns past the head dim)
      const int r = wm * 16 + g, d_left = a.head_dim - c0 - 2 * tq;
      auto row_index = [&] { return static_cast<i64>(b * a.heads + h) * Sq + m0 + r; };  // dq_accum row
      float fixed_q[2] = {1.f, 1.f};  // deterministic: the fixed-point scales of rows r, r + 8
      auto load_fixed_q = [&] {
        if (det)
#pragma unroll
          for (int hh = 0; hh < 2; ++hh)
            if (m0 + r + 8 * hh < Sq) fixed_q[hh] = __ldg(p.dq_scale + row_index() + 8 * hh);
      };
      if constexpr (Tr::kRegisterRoom) load_fixed_q();  // in flight while dQ computes
      float acc_dq[QA][4];
      Mma::dq(acc_dq, sdS, sK, wm, c0, lane, acc_dk, acc_dv, p_t, ds_t, [&] {
        if constexpr (Tr::kRegisterRoom) flush();
      });
      if constexpr (!Tr::kRegisterRoom) load_fixed_q();  // no registers to hold them through dQ
      float* dqa = p.dq_accum + row_index() * a.head_dim + c0 + 2 * tq;
#pragma unroll
      for (int hh = 0; hh < 2; ++hh)
#pragma unroll
        for (int o = 0; o < QA; ++o) {
          const bool add = m0 + r + 8 * hh < Sq && o * 8 < d_left;
          float* dst = dqa + hh * 8 * a.head_dim + o * 8;
          if (det)
            red_add_fixed2(dst, acc_dq[o][2 * hh], acc_dq[o][2 * hh + 1], fixed_q[hh], add);
          else
            red_add_f32x2(dst, acc_dq[o][2 * hh], acc_dq[o][2 * hh + 1], add);
        }
    }
    if (!Tr::kRegisterRoom || !dq_warp) flush();
    if (db_per_m && last_of_m) {  // uniform: every thread has flushed its part of tile m
      __threadfence();
      __syncthreads();
      if (threadIdx.x == 0) turn_mark(db_turns(m), db_turn);
    }

    pr = pn;
    ++steps;
    tiles_seen += last_of_m;
  }
  cp_async_wait<0>();
  __syncthreads();  // sColSum is complete

  // ---- dbias of a row-broadcast bias: one column sum per (head slot, key); never chunked
  if (rows_reduced && do_dbias) {
    if (db_ordered) {
      if (threadIdx.x == 0) turn_wait(db_turns(0), db_turn);
      __syncthreads();
    }
    const int slots = p.dbias_head_div == 1 ? G : 1;
    for (int i = threadIdx.x; i < slots * BN; i += NT) {
      const int slot = i / BN, key = n0 + i % BN;
      if (key >= Sk) continue;
      store_dbias<T, BIAS_BYTES>(p, dbias_base(h_first + slot) + key, sColSum[i], db_atomic);
    }
    if (db_ordered) {
      __threadfence();
      __syncthreads();
      if (threadIdx.x == 0) turn_mark(db_turns(0), db_turn);
    }
  }
  if (p.tiles_visited != nullptr && threadIdx.x == 0) atomicAdd(p.tiles_visited, static_cast<u64>(steps));

  // ---- several chunks: this chunk's fp32 dK, dV to its slot (each thread its own fragments,
  // float4 i at [i * NT + thread]); the last chunk to finish sums the slots in chunk order.
  if (n_chunks > 1) {
    const i64 tile = (static_cast<i64>(part) * gridDim.x + blockIdx.x) * gridDim.z + n_tile;
    const int max_chunks = gridDim.y / Tr::kDSplit;
    float4* slots = reinterpret_cast<float4*>(p.dkv_partial) + tile * max_chunks * (2 * OA * NT);
    float4* mine = slots + chunk * (2 * OA * NT);
#pragma unroll
    for (int o = 0; o < OA; ++o) {
      mine[o * NT + threadIdx.x] = make_float4(acc_dk[o][0], acc_dk[o][1], acc_dk[o][2], acc_dk[o][3]);
      mine[(OA + o) * NT + threadIdx.x] = make_float4(acc_dv[o][0], acc_dv[o][1], acc_dv[o][2], acc_dv[o][3]);
    }
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
      sc.is_last = atomicAdd(p.dkv_count + tile, 1) == n_chunks - 1;
      __threadfence();  // acquire: the other chunks' slots are read after this
    }
    __syncthreads();
    if (!sc.is_last) return;
    // dK, dV = 0 + slot 0 + slot 1 + ... (read from L2, in this order whichever chunk is last;
    // four column atoms at a time, so that at most 32 loaded registers are in flight)
#pragma unroll
    for (int o = 0; o < OA; ++o)
#pragma unroll
      for (int e = 0; e < 4; ++e) { acc_dk[o][e] = 0.f; acc_dv[o][e] = 0.f; }
    static_assert(OA % 4 == 0, "column atoms in groups of four");
#pragma unroll
    for (int o0 = 0; o0 < OA; o0 += 4) {
#pragma unroll 1
      for (int c = 0; c < n_chunks; ++c) {
        const float4* src = slots + c * (2 * OA * NT);
#pragma unroll
        for (int o = o0; o < o0 + 4; ++o) {
          const float4 x = __ldcg(src + o * NT + threadIdx.x), y = __ldcg(src + (OA + o) * NT + threadIdx.x);
          acc_dk[o][0] += x.x;
          acc_dk[o][1] += x.y;
          acc_dk[o][2] += x.z;
          acc_dk[o][3] += x.w;
          acc_dv[o][0] += y.x;
          acc_dv[o][1] += y.y;
          acc_dv[o][2] += y.z;
          acc_dv[o][3] += y.w;
        }
      }
    }
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
}

// Deterministic mode: the bounds of fixed-point dQ (bwd_tiles.cuh), max |K_jd| and max ||V_j||, into
// p.kv_bound[0], [1] (zeroed; non-negative floats order as their bits, so an atomicMax of the bits,
// in any order, leaves the same maximum). One warp per key row of K and V, grid-stride.
template <typename T>
__global__ void __launch_bounds__(128) bwd_kv_bound_kernel(const __grid_constant__ BwdParams p) {
  const AttnParams& a = p.a;
  const i64 rows = static_cast<i64>(a.batch) * a.seqlen_k * a.kv_heads;
  const int lane = threadIdx.x % 32;
  float k_max = 0.f, v_max = 0.f;
  for (i64 row = static_cast<i64>(blockIdx.x) * 4 + threadIdx.x / 32; row < rows; row += gridDim.x * 4) {
    const i64 b = row / (static_cast<i64>(a.seqlen_k) * a.kv_heads), j = row / a.kv_heads % a.seqlen_k;
    const int hk = static_cast<int>(row % a.kv_heads);
    const u16* k = static_cast<const u16*>(a.k) + b * a.k_stride[0] + j * a.k_stride[1] + hk * a.k_stride[2];
    const u16* v = static_cast<const u16*>(a.v) + b * a.v_stride[0] + j * a.v_stride[1] + hk * a.v_stride[2];
    float v_sq = 0.f;
    for (int d = 8 * lane; d < a.head_dim; d += 256) {
      float kk[8], vv[8];
      load8<T>(k + d, kk);
      load8<T>(v + d, vv);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        k_max = fmaxf(k_max, fabsf(kk[j]));
        v_sq += vv[j] * vv[j];
      }
    }
    v_max = fmaxf(v_max, sqrtf(warp_sum(v_sq)));
  }
  k_max = warp_max(k_max);
  if (lane == 0) {
    atomicMax(p.kv_bound, __float_as_uint(k_max));
    atomicMax(p.kv_bound + 1, __float_as_uint(v_max));
  }
}

// Row stats {lse2 = lse * log2(e) (+inf where lse = -inf: 2^(s2 - inf) = 0), D = rowsum(dO * O)} in
// fp32, and zeroes the row of dq_accum; deterministic mode: the row's fixed-point scale
// q = fixed_point_scale(2 ||dO|| max||V_j|| max|K|) into p.dq_scale (after bwd_kv_bound_kernel).
// One warp per (batch, head, row), eight columns per lane (16-byte loads: head dims are multiples of
// 8 and rows 16-byte aligned, see qkv_operand).
template <typename T>
__global__ void __launch_bounds__(128) bwd_preprocess_kernel(const __grid_constant__ BwdParams p) {
  const AttnParams& a = p.a;
  const i64 rows = static_cast<i64>(a.batch) * a.heads * a.seqlen_q;
  const i64 row = static_cast<i64>(blockIdx.x) * 4 + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const u16* o = static_cast<const u16*>(p.out) + bshd_row_offset(a, row, p.o_stride);
  const u16* d_o = static_cast<const u16*>(p.dout) + bshd_row_offset(a, row, p.do_stride);
  float* dqa = p.dq_accum + row * a.head_dim;
  float sum = 0.f, do_sq = 0.f;
  for (int d = 8 * lane; d < a.head_dim; d += 256) {
    float oo[8], dd[8];
    load8<T>(o + d, oo);
    load8<T>(d_o + d, dd);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      sum += oo[j] * dd[j];
      do_sq += dd[j] * dd[j];
    }
    float4* z = reinterpret_cast<float4*>(dqa + d);
    z[0] = z[1] = make_float4(0.f, 0.f, 0.f, 0.f);
  }
  sum = warp_sum(sum);
  do_sq = warp_sum(do_sq);
  if (lane == 0) {
    const float lse = p.lse[row];
    *reinterpret_cast<float2*>(p.row_stats + 2 * row) =
        make_float2(lse == neg_inf() ? __int_as_float(0x7f800000) : lse * kLog2e, sum);
    if (p.dq_scale != nullptr)
      p.dq_scale[row] = fixed_point_scale(2.f * sqrtf(do_sq) * __uint_as_float(p.kv_bound[0]) *
                                          __uint_as_float(p.kv_bound[1]));
  }
}

// dq (B, Sq, H, D) in T = scale * dq_accum (B, H, Sq, D) (deterministic: scale / q_row times the
// fixed-point sums); one warp per (batch, head, row), eight columns per lane.
template <typename T>
__global__ void __launch_bounds__(128) bwd_convert_dq_kernel(const __grid_constant__ BwdParams p) {
  const AttnParams& a = p.a;
  const i64 rows = static_cast<i64>(a.batch) * a.heads * a.seqlen_q;
  const i64 row = static_cast<i64>(blockIdx.x) * 4 + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const i64 dq_stride[3] = {static_cast<i64>(a.seqlen_q) * a.heads * a.head_dim,
                            static_cast<i64>(a.heads) * a.head_dim, a.head_dim};  // contiguous
  u16* dq = static_cast<u16*>(p.dq) + bshd_row_offset(a, row, dq_stride);
  const float* src = p.dq_accum + row * a.head_dim;
  const bool fixed = p.dq_scale != nullptr;
  const float s = fixed ? a.scale / p.dq_scale[row] : a.scale;
  for (int d = 8 * lane; d < a.head_dim; d += 256) {
    // columns d.. as bits: fp32 sums, or (deterministic) pairs of int32 sums in 64-bit words
    const uint4 lo = *reinterpret_cast<const uint4*>(src + d), hi = *reinterpret_cast<const uint4*>(src + d + 4);
    const u32 w[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
    u32 packed[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      float2 x = make_float2(__uint_as_float(w[2 * j]), __uint_as_float(w[2 * j + 1]));
      if (fixed) {
        const int2 c = fixed_point_pair(w[2 * j] | static_cast<u64>(w[2 * j + 1]) << 32);
        x = make_float2(c.x, c.y);
      }
      packed[j] = T::pack(x.x * s, x.y * s);
    }
    *reinterpret_cast<uint4*>(dq + d) = make_uint4(packed[0], packed[1], packed[2], packed[3]);
  }
}

}  // namespace dmattn
