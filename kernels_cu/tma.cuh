// tma.cuh — Hopper tensor-memory-accelerator copies (sm_90): a tile of a global tensor described
// by a tensor map (CUtensorMap, encoded on the host: dmattn_cupy/_cuda/tma.py) lands in shared
// memory, swizzled as the map says, and counts its bytes on an mbarrier; one thread issues a whole
// tile, so the copy costs the other threads no instructions at all.
//
// A barrier is filled any number of times: fill j (0, 1, 2, ...) is mbar_expect_tx by the issuing
// thread, then the copies; whoever reads the tile waits for phase j with parity j & 1.
#pragma once
#include "mma.cuh"

namespace dmattn {

#if __CUDA_ARCH__ >= 900
#define DMATTN_TMA 1
#else
#define DMATTN_TMA 0
#endif

// One arrival (the issuing thread's expect_tx) completes a phase, once the bytes have landed.
__device__ __forceinline__ void mbar_init(u64* bar) {
#if DMATTN_TMA
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(smem_u32(bar)) : "memory");
#endif
}
// Makes mbar_init visible to the async proxy (the copies); a CTA barrier must follow.
__device__ __forceinline__ void mbar_init_fence() {
#if DMATTN_TMA
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}
// The next fill of `bar` brings `bytes` (the issuing thread's arrival).
__device__ __forceinline__ void mbar_expect_tx(u64* bar, u32 bytes) {
#if DMATTN_TMA
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(bytes)
               : "memory");
#endif
}
// Waits until the fill of parity `parity` has completed.
__device__ __forceinline__ void mbar_wait(u64* bar, int parity) {
#if DMATTN_TMA
  asm volatile(
      "{\n .reg .pred done;\n WAIT:\n mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      " @!done bra WAIT;\n}\n" ::"r"(smem_u32(bar)),
      "r"(parity)
      : "memory");
#endif
}

// The box of a rank-4 tensor map at coordinates (c0 innermost .. c3) into shared memory at dst
// (1024-byte aligned for the 128-byte swizzle); its bytes count on bar. Out-of-range elements land
// as zeros.
__device__ __forceinline__ void tma_load_4d(void* dst, const TensorMap& map, u64* bar, int c0, int c1, int c2,
                                            int c3) {
#if DMATTN_TMA
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5, %6}], "
      "[%2];\n" ::"r"(smem_u32(dst)),
      "l"(reinterpret_cast<u64>(&map)), "r"(smem_u32(bar)), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
      : "memory");
#endif
}

}  // namespace dmattn
