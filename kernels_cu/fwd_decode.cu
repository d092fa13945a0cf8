// fwd_decode.cu — short queries over long keys (decode): the rows of one kv head (its GQA group's
// query heads x Sq, at most kMaxRows) against a key range, gathering only the keys the mask keeps.
//
// A top-k decode mask keeps ~1% of the keys, scattered: at tile granularity (fwd_kernel) nearly
// every 64-key tile still holds one, and its K/V/bias are loaded whole. Here the unit is the key:
//
// Grid (num_splits, B * Hk): CTA (s, b * Hk + kvh) owns keys [s * keys_per_split, +keys_per_split).
//   1. scan     the threads read 16-key groups of every distinct mask row and mark the keys that
//               some row sees (mask and causal); a block-wide prefix sum compacts them, in key
//               order, into sKeys. Without a mask every key is live and the tile kernels run.
//   2. batches  kBatch live keys at a time, a ring of two: while batch i is computed, cp.async
//               gathers K and V rows of batch i + 1 and each thread's mask/bias elements for it
//               are in flight in registers.
//        scores   thread = (key j, row set): s2[r][j] = unit * mod(q_r . k_j) or -inf (ScoreMod), q in
//                 fp32 in shared memory (the same address across a warp: broadcast)
//        softmax  warp w owns rows w, w + 4, ...: running max m, sum l, alpha, p in place
//        P V      thread = (column pair c, key subset): O[r][c] = O[r][c] * alpha_r + sum_j p_rj V_j
//   3. partial  O / l and lse = (m + log2 l) ln 2 of each row, fp32, to o_split / lse_split.
//   4. combine  the last CTA of (b, kvh) to arrive (an arrival counter, which it resets for the next
//               call) merges the splits, a warp per row (combine.cuh), while the partials are still
//               in L2: no second launch and no round trip to memory.
//
// Shared memory (config.decode_config mirrors the carve-up):
//   sQ     kMaxRows x HEAD_DIM fp32          q rows, loaded once
//   ring   2 x [K | V]                        kBatch rows of HEAD_DIM + 8 elements each (a thread
//                                             per key reads its row without bank conflicts)
//   sS     kMaxRows x kBatch fp32             scores, then probabilities
//   sAlpha kMaxRows fp32 ; sStat kMaxRows x (m, l) ; sScan one int per warp + 1
//   sLive  kMaxSplitKeys bits                 the scan's live keys, then compacted into
//   sKeys  kMaxSplitKeys int                  the live keys of the split
#include "combine.cuh"
#include "score_mod.cuh"
#include "tile_io.cuh"

namespace dmattn {

template <int HEAD_DIM>
struct DecodeTraits {
  static constexpr int kThreads = 128;
  static constexpr int kWarps = kThreads / 32;
  static constexpr int kMaxRows = 16;                    // config.DECODE_MAX_ROWS
  static constexpr int kBatch = HEAD_DIM <= 128 ? 64 : 32;  // config.decode_batch
  static constexpr int kMaxSplitKeys = 4096;             // config.DECODE_MAX_SPLIT_KEYS
  static constexpr int kRowElems = HEAD_DIM + 8;
  static constexpr int kRowSets = kThreads / kBatch;     // scores: threads per key, rows split
  static constexpr int kRowsPerThread = kMaxRows / kRowSets;
  static constexpr int kPairs = HEAD_DIM / 2;            // P V: threads per key subset
  static constexpr int kSubs = kThreads / kPairs;        // key subsets (HEAD_DIM 96, 192: some threads idle)
  static constexpr int kGroups = kMaxSplitKeys / 16 / kThreads;  // scan: 16-key groups per thread
  static_assert(kMaxSplitKeys % (16 * kThreads) == 0 && kBatch % 32 == 0, "whole scan groups and warps");
  static_assert(2 * 2 * kBatch * kRowElems * 2 >= kThreads * kMaxRows * 8, "the ring holds the P V subsets' sums");
  static_assert(2 * 2 * kBatch * kRowElems * 2 >= kWarps * kMaxSplits * 4, "the ring holds the merge weights");
};

// Exclusive prefix sum of x over the CTA in thread order; `total` gets the sum. Barriers inside.
__device__ __forceinline__ int block_exclusive_sum(int x, int* warp_sums, int& total) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int incl = x;
#pragma unroll
  for (int o = 1; o < 32; o *= 2) {
    const int y = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += y;
  }
  __syncthreads();  // warp_sums may still be read by the previous call
  if (lane == 31) warp_sums[warp] = incl;
  __syncthreads();
  int before = 0;
  total = 0;
  for (int w = 0; w < blockDim.x / 32; ++w) {
    before += w < warp ? warp_sums[w] : 0;
    total += warp_sums[w];
  }
  return before + incl - x;
}

// Keep bits of 16 mask elements at key0 .. key0 + 15 of one row (bit i: key0 + i), keys >= key_end
// cleared. vec: the row is 16-byte aligned with unit key stride and whole chunks lie in bounds.
template <int ELEM>
__device__ __forceinline__ u32 keep_bits16(const unsigned char* row, i64 key_stride, int key0, int key_end, bool vec) {
  typedef typename Raw<ELEM>::type E;
  constexpr int kPerChunk = 16 / ELEM;
  u32 bits = 0;
  if (vec) {
#pragma unroll
    for (int c = 0; c < ELEM; ++c) {
      if (key0 + c * kPerChunk >= key_end) break;
      const uint4 chunk = *reinterpret_cast<const uint4*>(row + (static_cast<i64>(key0) + c * kPerChunk) * ELEM);
      const E* e = reinterpret_cast<const E*>(&chunk);
#pragma unroll
      for (int i = 0; i < kPerChunk; ++i) bits |= static_cast<u32>(mask_keep(e[i])) << (c * kPerChunk + i);
    }
  } else {
#pragma unroll
    for (int i = 0; i < 16; ++i)
      if (key0 + i < key_end)
        bits |= static_cast<u32>(mask_keep(reinterpret_cast<const E*>(row)[(key0 + i) * key_stride])) << i;
  }
  return key_end - key0 >= 16 ? bits : bits & ((1u << max(key_end - key0, 0)) - 1u);
}

template <typename T, int HEAD_DIM, int MASK_BYTES, int BIAS_BYTES, bool CAUSAL, bool SOFTCAP>
__global__ void __launch_bounds__(DecodeTraits<HEAD_DIM>::kThreads)
fwd_decode_kernel(const __grid_constant__ FwdParams p) {
  typedef DecodeTraits<HEAD_DIM> Tr;
  constexpr int BK = Tr::kBatch, RT = Tr::kRowsPerThread, kRows = Tr::kMaxRows;
  static_assert(MASK_BYTES > 0, "without a mask every key is live: the tile kernels (fwd.cu) run it");
  typedef typename Raw<MASK_BYTES>::type MaskRaw;
  typedef typename Raw<BIAS_BYTES ? BIAS_BYTES : 2>::type BiasRaw;
  const AttnParams& a = p.a;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int split = blockIdx.x, b = blockIdx.y / a.kv_heads, kvh = blockIdx.y % a.kv_heads;
  const int n_rows = a.group * a.seqlen_q;  // row r: query head kvh * group + r / Sq, sequence row r % Sq
  const int key_begin = split * p.keys_per_split;
  const int key_end = min(a.seqlen_k, key_begin + p.keys_per_split);
  const int d_chunks = a.head_dim / 8;

  extern __shared__ __align__(16) unsigned char smem[];
  constexpr int kSlotElems = 2 * BK * Tr::kRowElems;  // K then V of one batch
  float* sQ = reinterpret_cast<float*>(smem);
  u16* sRing = reinterpret_cast<u16*>(sQ + kRows * HEAD_DIM);
  float* sS = reinterpret_cast<float*>(sRing + 2 * kSlotElems);
  float* sAlpha = sS + kRows * BK;
  float2* sStat = reinterpret_cast<float2*>(sAlpha + kRows);
  int* sScan = reinterpret_cast<int*>(sStat + kRows);
  u32* sLive = reinterpret_cast<u32*>(sScan + Tr::kWarps + 1);
  int* sKeys = reinterpret_cast<int*>(sLive + Tr::kMaxSplitKeys / 32);
  auto sK = [&](int slot) { return sRing + slot * kSlotElems; };
  auto sV = [&](int slot) { return sRing + slot * kSlotElems + BK * Tr::kRowElems; };

  // Per row: query head, sequence row, and the causal limit (the last key it sees).
  auto row_head = [&](int r) { return kvh * a.group + r / a.seqlen_q; };
  auto row_seq = [&](int r) { return r % a.seqlen_q; };
  auto row_limit = [&](int r) { return CAUSAL ? row_seq(r) + a.seqlen_k - a.seqlen_q : a.seqlen_k - 1; };
  auto aux_row = [&](const void* base, const i64 (&st)[4], int elem, int div, int r) {
    return static_cast<const unsigned char*>(base) +
           (b * st[0] + (row_head(r) / div) * st[1] + row_seq(r) * st[2]) * elem;
  };

  // q rows in fp32.
  for (int i = tid; i < n_rows * (a.head_dim / 2); i += Tr::kThreads) {
    const int r = i / (a.head_dim / 2), d = 2 * (i % (a.head_dim / 2));
    const u16* q = static_cast<const u16*>(a.q) + b * a.q_stride[0] + row_seq(r) * a.q_stride[1] +
                   row_head(r) * a.q_stride[2] + d;
    const u32 x = *reinterpret_cast<const u32*>(q);
    sQ[r * HEAD_DIM + d] = T::to_float(static_cast<u16>(x & 0xffffu));
    sQ[r * HEAD_DIM + d + 1] = T::to_float(static_cast<u16>(x >> 16));
  }

  // 1. The live keys: kept by the mask and causally visible for some row. Work item = (distinct
  // mask row, 16-key group); a mask broadcast over sequence rows is read once per head, under the
  // causal limit of the last row (which sees the most keys). kScanBatch items' loads are in flight
  // together (the scan is bound by memory latency).
  int n_live = 0;
  {
    constexpr int kScanBatch = 4;
    const int keys = max(key_end - key_begin, 0);
    const int groups = (keys + 15) / 16;
    const int seq_n = a.mask_stride[2] == 0 ? 1 : a.seqlen_q;
    const int head_n = a.mask_stride[1] != 0 && a.mask_head_div == 1 ? a.group : 1;
    for (int i = tid; i < Tr::kMaxSplitKeys / 32; i += Tr::kThreads) sLive[i] = 0u;
    __syncthreads();
#pragma unroll 1
    for (int first = tid; first < seq_n * head_n * groups; first += Tr::kThreads * kScanBatch) {
      u32 bits[kScanBatch];
#pragma unroll
      for (int u = 0; u < kScanBatch; ++u) {
        const int item = first + u * Tr::kThreads, g = item % groups, sr = item / groups;
        const int r = (sr / seq_n) * a.seqlen_q + (seq_n == 1 ? a.seqlen_q - 1 : sr % seq_n);
        bits[u] = item < seq_n * head_n * groups
            ? keep_bits16<MASK_BYTES>(aux_row(a.mask, a.mask_stride, MASK_BYTES, a.mask_head_div, r),
                                      a.mask_stride[3], key_begin + 16 * g, min(key_end, row_limit(r) + 1),
                                      a.mask_vec != 0)
            : 0u;
      }
#pragma unroll
      for (int u = 0; u < kScanBatch; ++u) {
        const int g = (first + u * Tr::kThreads) % groups;
        if (bits[u]) atomicOr(sLive + g / 2, bits[u] << (16 * (g % 2)));
      }
    }
    __syncthreads();
    // Compaction in key order: thread tid owns groups tid, tid + kThreads, ...
    int base = 0;
#pragma unroll
    for (int u = 0; u < Tr::kGroups; ++u) {
      const int g = tid + u * Tr::kThreads;
      const u32 live = (sLive[g / 2] >> (16 * (g % 2))) & 0xffffu;
      int total;
      int at = base + block_exclusive_sum(__popc(live), sScan, total);
      for (u32 m = live; m; m &= m - 1) sKeys[at++] = key_begin + 16 * g + __ffs(m) - 1;
      base += total;
    }
    n_live = base;
    __syncthreads();  // sKeys is complete
  }
  const int n_batches = (n_live + BK - 1) / BK;

  // 2. Batches of live keys.
  auto load_kv = [&](int batch, int slot) {
    const int count = min(BK, n_live - batch * BK);
    for (int i = tid; i < count * d_chunks; i += Tr::kThreads) {
      const int j = i / d_chunks, c = i % d_chunks;
      const i64 key = sKeys[batch * BK + j];
      const u16* kg = static_cast<const u16*>(a.k) + b * a.k_stride[0] + key * a.k_stride[1] + kvh * a.k_stride[2];
      const u16* vg = static_cast<const u16*>(a.v) + b * a.v_stride[0] + key * a.v_stride[1] + kvh * a.v_stride[2];
      cp_async_16(smem_u32(sK(slot) + j * Tr::kRowElems + c * 8), kg + c * 8, true);
      cp_async_16(smem_u32(sV(slot) + j * Tr::kRowElems + c * 8), vg + c * 8, true);
    }
  };
  // This thread's scores: key j of the batch, rows rs, rs + kRowSets, ...
  const int j_mine = tid % BK, rs = tid / BK;
  // Raw mask and bias elements of this thread's (row, key) pairs of a batch, in flight until used.
  struct Aux { MaskRaw m[RT]; BiasRaw bias[RT]; int key; };
  auto load_aux = [&](int batch) {
    Aux x;
    x.key = batch * BK + j_mine < n_live ? sKeys[batch * BK + j_mine] : -1;
#pragma unroll
    for (int q = 0; q < RT; ++q) {
      const int r = rs + q * Tr::kRowSets;
      x.m[q] = 0;
      x.bias[q] = 0;
      if (r >= n_rows || x.key < 0) continue;
      x.m[q] = reinterpret_cast<const MaskRaw*>(aux_row(a.mask, a.mask_stride, MASK_BYTES, a.mask_head_div, r))[
            x.key * a.mask_stride[3]];
      if constexpr (BIAS_BYTES > 0)
        x.bias[q] = reinterpret_cast<const BiasRaw*>(aux_row(a.bias, a.bias_stride, BIAS_BYTES, a.bias_head_div, r))[
            x.key * a.bias_stride[3]];
    }
    return x;
  };

  const ScoreMod<(BIAS_BYTES > 0), SOFTCAP> mod(a);
  float row_max[kRows / Tr::kWarps], row_sum[kRows / Tr::kWarps];  // softmax: rows warp + 4 i
#pragma unroll
  for (int i = 0; i < kRows / Tr::kWarps; ++i) { row_max[i] = neg_inf(); row_sum[i] = 0.f; }
  const int c_mine = tid % Tr::kPairs, sub = tid / Tr::kPairs;  // P V: column pair, key subset
  const bool pv_thread = sub < Tr::kSubs && 2 * c_mine < a.head_dim;
  float acc[kRows][2];
#pragma unroll
  for (int r = 0; r < kRows; ++r) acc[r][0] = acc[r][1] = 0.f;

  Aux cur{};
  if (n_batches > 0) {
    load_kv(0, 0);
    cur = load_aux(0);
  }
  cp_async_commit();
  for (int batch = 0, slot = 0; batch < n_batches; ++batch, slot ^= 1) {
    cp_async_wait<0>();
    __syncthreads();  // batch lands; every thread is done with the previous one (its slot is free)
    Aux next{};
    if (batch + 1 < n_batches) {
      load_kv(batch + 1, slot ^ 1);
      next = load_aux(batch + 1);
    }
    cp_async_commit();

    // scores: s2 = unit * mod(q_r . k_j), -inf where the mask, causality or the batch's end hide the key
    float dot[RT];
#pragma unroll
    for (int q = 0; q < RT; ++q) dot[q] = 0.f;
    const u16* kr = sK(slot) + j_mine * Tr::kRowElems;
    for (int c = 0; c < d_chunks; ++c) {
      const uint4 kc = *reinterpret_cast<const uint4*>(kr + c * 8);
      const u16* kh = reinterpret_cast<const u16*>(&kc);
      float kf[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) kf[e] = T::to_float(kh[e]);
#pragma unroll
      for (int q = 0; q < RT; ++q) {
        const int r = rs + q * Tr::kRowSets;
        if (r >= n_rows) break;
        const float4 q0 = *reinterpret_cast<const float4*>(sQ + r * HEAD_DIM + c * 8);
        const float4 q1 = *reinterpret_cast<const float4*>(sQ + r * HEAD_DIM + c * 8 + 4);
        dot[q] += q0.x * kf[0] + q0.y * kf[1] + q0.z * kf[2] + q0.w * kf[3] +
                  q1.x * kf[4] + q1.y * kf[5] + q1.z * kf[6] + q1.w * kf[7];
      }
    }
#pragma unroll
    for (int q = 0; q < RT; ++q) {
      const int r = rs + q * Tr::kRowSets;
      if (r >= n_rows) break;
      const bool keep = cur.key >= 0 && mask_keep(cur.m[q]) && cur.key <= row_limit(r);
      float bias = 0.f;
      if constexpr (BIAS_BYTES > 0) bias = bias_to_float<T>(cur.bias[q]);
      sS[r * BK + j_mine] = keep ? mod(dot[q], bias) * mod.unit : neg_inf();
    }
    __syncthreads();

    // softmax, in base 2 (softmax.cuh's recurrence, one row per warp at a time)
#pragma unroll
    for (int i = 0; i < kRows / Tr::kWarps; ++i) {
      const int r = warp + i * Tr::kWarps;
      if (r >= n_rows) break;
      float s[BK / 32];
      float mx = row_max[i];
#pragma unroll
      for (int e = 0; e < BK / 32; ++e) {
        s[e] = sS[r * BK + lane + 32 * e];
        mx = fmaxf(mx, s[e]);
      }
      mx = warp_max(mx);
      const float m_use = mx == neg_inf() ? 0.f : mx;
      const float alpha = fast_exp2(row_max[i] - m_use);
      float sum = 0.f;
#pragma unroll
      for (int e = 0; e < BK / 32; ++e) {
        const float pe = fast_exp2(s[e] - m_use);
        sS[r * BK + lane + 32 * e] = pe;
        sum += pe;
      }
      sum = warp_sum(sum);
      row_max[i] = mx;
      row_sum[i] = row_sum[i] * alpha + sum;
      if (lane == 0) sAlpha[r] = alpha;
    }
    __syncthreads();

    // P V
    if (pv_thread) {
      const int count = min(BK, n_live - batch * BK);
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        if (r >= n_rows) break;
        acc[r][0] *= sAlpha[r];
        acc[r][1] *= sAlpha[r];
      }
      const u16* vc = sV(slot) + 2 * c_mine;
      for (int j = sub; j < count; j += Tr::kSubs) {
        const u32 v2 = *reinterpret_cast<const u32*>(vc + j * Tr::kRowElems);
        const float v0 = T::to_float(static_cast<u16>(v2 & 0xffffu)), v1 = T::to_float(static_cast<u16>(v2 >> 16));
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          if (r >= n_rows) break;
          const float pr = sS[r * BK + j];
          acc[r][0] = fmaf(pr, v0, acc[r][0]);
          acc[r][1] = fmaf(pr, v1, acc[r][1]);
        }
      }
    }
    cur = next;
  }

  // 3. This split's partial: O / l summed over the key subsets, and lse.
#pragma unroll
  for (int i = 0; i < kRows / Tr::kWarps; ++i) {
    const int r = warp + i * Tr::kWarps;
    if (r < n_rows && lane == 0) sStat[r] = make_float2(row_max[i], row_sum[i]);
  }
  __syncthreads();  // the ring is free: it holds the subsets' sums now
  float2* sRed = reinterpret_cast<float2*>(sRing);  // [sub][row][pair]: kThreads x kRows float2 fit the ring
  if (pv_thread && sub > 0)
#pragma unroll
    for (int r = 0; r < kRows; ++r)
      if (r < n_rows) sRed[(sub * kRows + r) * Tr::kPairs + c_mine] = make_float2(acc[r][0], acc[r][1]);
  __syncthreads();
  const i64 rows_total = static_cast<i64>(a.batch) * a.heads * a.seqlen_q;
  auto global_row = [&](int r) { return (static_cast<i64>(b) * a.heads + row_head(r)) * a.seqlen_q + row_seq(r); };
  if (pv_thread && sub == 0) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      if (r >= n_rows) break;
      float2 o = make_float2(acc[r][0], acc[r][1]);
      for (int s = 1; s < Tr::kSubs; ++s) {
        const float2 x = sRed[(s * kRows + r) * Tr::kPairs + c_mine];
        o.x += x.x;
        o.y += x.y;
      }
      const float l = sStat[r].y, inv_l = l > 0.f ? 1.f / l : 0.f;
      float* dst = p.o_split + (split * rows_total + global_row(r)) * a.head_dim + 2 * c_mine;
      *reinterpret_cast<float2*>(dst) = make_float2(o.x * inv_l, o.y * inv_l);
    }
  }
  if (tid < n_rows) {
    const float2 st = sStat[tid];
    p.lse_split[split * rows_total + global_row(tid)] = st.y > 0.f ? st.x * kLn2 + logf(st.y) : neg_inf();
  }
  if (p.tiles_visited != nullptr && tid == 0) atomicAdd(p.tiles_visited, static_cast<u64>(n_batches));

  // 4. The last CTA of (b, kvh) merges the splits.
  __threadfence();  // this CTA's partial is visible GPU-wide before it counts as arrived
  __syncthreads();
  if (tid == 0) {
    const u32 arrived = atomicAdd(p.arrivals + blockIdx.y, 1u);
    sScan[Tr::kWarps] = arrived == static_cast<u32>(p.num_splits) - 1;
    if (arrived == static_cast<u32>(p.num_splits) - 1) p.arrivals[blockIdx.y] = 0;  // ready for the next call
  }
  __syncthreads();
  if (!sScan[Tr::kWarps]) return;
  __threadfence();
  float* sWeight = reinterpret_cast<float*>(sRing) + warp * kMaxSplits;  // the ring is free again
  for (int r = warp; r < n_rows; r += Tr::kWarps) combine_row_warp<T>(p, global_row(r), sWeight);
}

}  // namespace dmattn
