// tile_io.cuh — global -> shared tile loads (cp.async), shared by forward and backward.
#pragma once
#include "mma.cuh"
#include "tile_traits.cuh"

namespace dmattn {

// Shared-memory layouts of a ROWS x HEAD_DIM tile: offset(r, c) is the element offset of row r's
// 16-byte chunk c; kRowElems what one row down adds to it (rows a multiple of 8 apart share the
// swizzle phase).
//   PaddedRows     rows of D + 8 elements: the 8 rows an ldmatrix reads sit in 8 bank groups
//   Swizzled128    Hopper wgmma slabs (wgmma.cuh): 64 columns per slab of ROWS x 128 bytes, chunk c
//                  of row r at chunk (c % 8) ^ (r % 8)
template <int HEAD_DIM>
struct PaddedRows {
  static constexpr int kRowElems = HEAD_DIM + 8;
  static __device__ __forceinline__ int offset(int r, int c) { return r * (HEAD_DIM + 8) + c * 8; }
};
template <int ROWS>
struct Swizzled128 {
  static constexpr int kRowElems = 64;
  static __device__ __forceinline__ int offset(int r, int c) {
    return (c / 8) * ROWS * 64 + r * 64 + (((c % 8) ^ (r % 8)) * 8);
  }
};

// The copies below are made by THREADS threads, numbered `tid` (a CTA may give different tiles to
// different groups of its threads).
//
// Loads ROWS rows of HEAD_DIM elements into shared memory (Layout). row_ptr(r) gives row r's
// global address, or nullptr for a row outside the problem; such rows and columns >= head_dim are
// zero-filled, so they add nothing to any product.
template <int HEAD_DIM, int ROWS, int THREADS, typename Layout, typename RowPtr>
__device__ __forceinline__ void load_rows(u16* smem, int head_dim, const void* any_valid, RowPtr row_ptr,
                                          int tid = threadIdx.x) {
  constexpr int kChunks = HEAD_DIM / 8;  // 16-byte chunks per row
  // Not unrolled: unrolling hoists every chunk's address into registers for the whole kernel.
#pragma unroll 1
  for (int i = tid; i < ROWS * kChunks; i += THREADS) {
    const int r = i / kChunks, c = i % kChunks;
    const u16* g = row_ptr(r);
    const bool valid = g != nullptr && c * 8 < head_dim;
    cp_async_16(smem_u32(smem + Layout::offset(r, c)), valid ? g + c * 8 : any_valid, valid);
  }
}

// The same for rows at a fixed stride: row r at gmem + r * row_stride, rows >= valid_rows
// zero-filled. This is the per-key-tile copy (K and V), so it is written for few instructions:
// when THREADS is a multiple of the chunks per row, each thread keeps one column chunk and walks
// rows THREADS / kChunks apart (a multiple of 8, so the swizzle phase is fixed too): one pointer
// add, one compare and one cp.async per 16 bytes, no division.
template <int HEAD_DIM, int ROWS, int THREADS, typename Layout>
__device__ __forceinline__ void load_strided_rows(u16* smem, const u16* gmem, i64 row_stride,
                                                  int valid_rows, int head_dim, int tid = threadIdx.x) {
  constexpr int kChunks = HEAD_DIM / 8;
  if constexpr (THREADS % kChunks == 0 && (THREADS / kChunks) % 8 == 0 && ROWS * kChunks % THREADS == 0) {
    constexpr int kRowStep = THREADS / kChunks;
    const int c = tid % kChunks, r0 = tid / kChunks;
    const bool col_ok = c * 8 < head_dim;
    const u16* g = gmem + r0 * row_stride + c * 8;
    const u32 s0 = smem_u32(smem + Layout::offset(r0, c));
#pragma unroll
    for (int j = 0; j < ROWS * kChunks / THREADS; ++j) {
      const bool valid = col_ok && r0 + j * kRowStep < valid_rows;
      cp_async_16(s0 + 2 * j * kRowStep * Layout::kRowElems, valid ? g : gmem, valid);
      g += kRowStep * row_stride;
    }
  } else {
    load_rows<HEAD_DIM, ROWS, THREADS, Layout>(smem, head_dim, gmem, [&](int r) -> const u16* {
      return r < valid_rows ? gmem + r * row_stride : nullptr;
    }, tid);
  }
}

// Loads ROWS rows into a PaddedRows tile (the backward's Q/dO/K/V tiles).
template <int HEAD_DIM, int ROWS, int THREADS, typename RowPtr>
__device__ __forceinline__ void load_head_rows(u16* smem, int head_dim, const void* any_valid,
                                               RowPtr row_ptr) {
  load_rows<HEAD_DIM, ROWS, THREADS, PaddedRows<HEAD_DIM>>(smem, head_dim, any_valid, row_ptr);
}

// Where element `col` of row r of a (rows x BLOCK_N) mask or bias tile of ELEM-byte elements sits
// in shared memory (bytes from the tile's start). Both layouts put the four rows a quad reads at
// once (2tq + {0, 1} apart) on distinct banks:
//   padded      rows of aux_row_bytes (BLOCK_N * ELEM + 16): the forward, the mma.sync backward;
//   SWIZZLE     unpadded rows, 16-byte chunk c of row r at chunk c ^ (r % 8): the wgmma backward,
//               which needs the 16 bytes per row (2 KiB per tile pair) to fit D = 128.
template <int ELEM, int BLOCK_N, bool SWIZZLE>
struct AuxRows {
  static constexpr int kRowBytes = SWIZZLE ? BLOCK_N * ELEM : aux_row_bytes(BLOCK_N, ELEM);
  static_assert(!SWIZZLE || BLOCK_N * ELEM % 128 == 0, "whole groups of 8 chunks per row to swizzle");
  static __device__ __forceinline__ int chunk_offset(int r, int c) {
    return r * kRowBytes + (SWIZZLE ? c ^ (r & 7) : c) * 16;
  }
  static __device__ __forceinline__ int offset(int r, int col) {
    return chunk_offset(r, col * ELEM / 16) + col * ELEM % 16;
  }
};

// A (rows x block_n) tile of a mask or bias, element size ELEM bytes, read through strides.
// Rows past seqlen_q and keys past seqlen_k are zero-filled: for a mask that means "hidden", and
// those positions are hidden by bounds checks anyway. `vec`: rows are 16-byte aligned and seqlen_k
// is a multiple of 16 / ELEM, so whole chunks are copied asynchronously; otherwise the elements are
// copied one by one (a view with a padded or zero key stride).
template <int ELEM, int BLOCK_N, int THREADS, bool SWIZZLE = false>
__device__ __forceinline__ void load_aux_tile(unsigned char* smem, const unsigned char* base,
                                              const i64 (&stride)[4], int row0, int rows,
                                              int key0, int seqlen_q, int seqlen_k, bool vec,
                                              int tid = threadIdx.x) {
  typedef typename Raw<ELEM>::type E;
  typedef AuxRows<ELEM, BLOCK_N, SWIZZLE> Rows;
  constexpr int kPerChunk = 16 / ELEM;
  constexpr int kChunks = BLOCK_N / kPerChunk;
  // Whole chunks: each thread keeps one chunk column and walks rows kRowStep apart: one pointer add,
  // one compare and one cp.async per 16 bytes (and, swizzled with a step that is not a multiple of
  // 8 rows, the destination's swizzle phase).
  static_assert(THREADS % kChunks == 0, "whole rows per pass");
  constexpr int kRowStep = THREADS / kChunks;
  constexpr bool kSamePhase = !SWIZZLE || kRowStep % 8 == 0;
  if (vec) {
    const int c = tid % kChunks, r0 = tid / kChunks;
    const int key = key0 + c * kPerChunk;
    const unsigned char* g = base + (static_cast<i64>(row0 + r0) * stride[2] + key) * ELEM;
    const i64 step = static_cast<i64>(kRowStep) * stride[2] * ELEM;
    u32 dst = smem_u32(smem + Rows::chunk_offset(r0, c));
#pragma unroll 1
    for (int r = r0; r < rows; r += kRowStep) {
      const bool valid = row0 + r < seqlen_q && key < seqlen_k;
      cp_async_16(kSamePhase ? dst : smem_u32(smem + Rows::chunk_offset(r, c)), valid ? g : base, valid);
      g += step;
      dst += kRowStep * Rows::kRowBytes;
    }
  } else {
#pragma unroll 1
    for (int i = tid; i < rows * BLOCK_N; i += THREADS) {
      const int r = i / BLOCK_N, c = i % BLOCK_N;
      const int row = row0 + r, key = key0 + c;
      E x = 0;
      if (row < seqlen_q && key < seqlen_k)
        x = reinterpret_cast<const E*>(base)[static_cast<i64>(row) * stride[2] +
                                             static_cast<i64>(key) * stride[3]];
      *reinterpret_cast<E*>(smem + Rows::offset(r, c)) = x;
    }
  }
}

}  // namespace dmattn
