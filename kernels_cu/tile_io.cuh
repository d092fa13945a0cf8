// tile_io.cuh — global -> shared tile loads (cp.async), shared by forward and backward.
#pragma once
#include "mma.cuh"
#include "tile_traits.cuh"

namespace dmattn {

// Loads ROWS rows of HEAD_DIM elements into shared memory (row stride `stride` elements).
// row_ptr(r) gives row r's global address, or nullptr for a row outside the problem; such rows
// and columns >= head_dim are zero-filled, so they add nothing to any product.
template <int HEAD_DIM, int ROWS, int THREADS, typename RowPtr>
__device__ __forceinline__ void load_head_rows(u16* smem, int head_dim, const void* any_valid,
                                               RowPtr row_ptr) {
  constexpr int kChunks = HEAD_DIM / 8;  // 16-byte chunks per row
  // Not unrolled: unrolling hoists every chunk's address into registers for the whole kernel.
#pragma unroll 1
  for (int i = threadIdx.x; i < ROWS * kChunks; i += THREADS) {
    const int r = i / kChunks, c = i % kChunks;
    const u16* g = row_ptr(r);
    const bool valid = g != nullptr && c * 8 < head_dim;
    cp_async_16(smem_u32(smem + r * (HEAD_DIM + 8) + c * 8), valid ? g + c * 8 : any_valid, valid);
  }
}

// A (rows x block_n) tile of a mask or bias, element size ELEM bytes, read through strides.
// Rows past seqlen_q and keys past seqlen_k are zero-filled: for a mask that means "hidden", and
// those positions are hidden by bounds checks anyway. `vec`: rows are 16-byte aligned and seqlen_k
// is a multiple of 16 / ELEM, so whole chunks are copied asynchronously; otherwise the elements are
// copied one by one (a view with a padded or zero key stride).
template <int ELEM, int BLOCK_N, int THREADS>
__device__ __forceinline__ void load_aux_tile(unsigned char* smem, const unsigned char* base,
                                              const i64 (&stride)[4], int row0, int rows,
                                              int key0, int seqlen_q, int seqlen_k, bool vec) {
  typedef typename Raw<ELEM>::type E;
  constexpr int kRowBytes = aux_row_bytes(BLOCK_N, ELEM);
  if (vec) {
    constexpr int kPerChunk = 16 / ELEM;
    constexpr int kChunks = BLOCK_N / kPerChunk;
#pragma unroll 1
    for (int i = threadIdx.x; i < rows * kChunks; i += THREADS) {
      const int r = i / kChunks, c = i % kChunks;
      const int row = row0 + r, key = key0 + c * kPerChunk;
      const bool valid = row < seqlen_q && key < seqlen_k;
      const unsigned char* g = base + (static_cast<i64>(row) * stride[2] + key) * ELEM;
      cp_async_16(smem_u32(smem + r * kRowBytes + c * 16), valid ? g : base, valid);
    }
  } else {
#pragma unroll 1
    for (int i = threadIdx.x; i < rows * BLOCK_N; i += THREADS) {
      const int r = i / BLOCK_N, c = i % BLOCK_N;
      const int row = row0 + r, key = key0 + c;
      E x = 0;
      if (row < seqlen_q && key < seqlen_k)
        x = reinterpret_cast<const E*>(base)[static_cast<i64>(row) * stride[2] +
                                             static_cast<i64>(key) * stride[3]];
      reinterpret_cast<E*>(smem + r * kRowBytes)[c] = x;
    }
  }
}

}  // namespace dmattn
