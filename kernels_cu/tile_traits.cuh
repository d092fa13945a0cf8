// tile_traits.cuh — tile shapes per head dim. A head dim that is not one of the tile sizes runs on
// the next larger tile, its extra columns zero-filled on load and never stored.
#pragma once

namespace dmattn {

// HAS_AUX: the kernel reads a mask or a bias tile (their per-element work and pointers cost the
// registers that a 64-key tile needs at D = 128).
template <int HEAD_DIM, bool HAS_AUX>
struct FwdTraits {
  static constexpr int kHeadDim = HEAD_DIM;
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  // Rows of the query tile: 32 per warp (two 16-row mma atoms share each K/V fragment) up to
  // D = 128; beyond, 16 per warp so the fp32 output accumulator (16 x D / 32 per lane) fits.
  static constexpr int kBlockM = HEAD_DIM <= 128 ? 128 : 64;
  static constexpr int kBlockN = HEAD_DIM <= 64 || (HEAD_DIM == 128 && !HAS_AUX) ? 64 : 32;
  static constexpr int kMAtoms = kBlockM / (16 * kWarps);   // 16-row mma atoms per warp
  static constexpr int kNAtoms = kBlockN / 8;               // 8-key column tiles of S
  static constexpr int kDAtoms = HEAD_DIM / 8;              // 8-wide column tiles of O
  static constexpr int kKSteps = HEAD_DIM / 16;             // k16 steps of Q K^T
  // Shared-memory row stride (elements) of Q/K/V tiles: +16 bytes puts the 8 rows an ldmatrix
  // reads in 8 different 16-byte bank groups.
  static constexpr int kStride = HEAD_DIM + 8;
  static_assert(HEAD_DIM % 16 == 0, "tile head dim is a multiple of 16");
  static_assert(kBlockM % (16 * kWarps) == 0, "whole mma atoms per warp");
};

// Bytes of one shared-memory row of a (rows x kBlockN) mask or bias tile; +16 bytes spreads the
// rows of a quad's reads over distinct banks (and keeps 16-byte cp.async alignment).
__host__ __device__ constexpr int aux_row_bytes(int block_n, int elem_bytes) {
  return block_n * elem_bytes + 16;
}

}  // namespace dmattn
