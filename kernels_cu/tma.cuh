// tma.cuh — Hopper asynchronous copies (sm_90) and the mbarriers that count them: a tile of a global
// tensor described by a tensor map (CUtensorMap, encoded on the host: dmattn_cupy/_cuda/tma.py)
// lands in shared memory and counts its bytes on an mbarrier; one thread issues a whole tile, so
// the copy costs the other threads no instructions at all. cp.async copies can count on an
// mbarrier too (mbar_arrive_cp_async).
//
// Barriers are passed by shared-memory address (smem_u32), 32 bits instead of a 64-bit pointer.
// A barrier is filled any number of times: fill j (0, 1, 2, ...) completes once `count` arrivals
// (mbar_init) have been made and every byte they announced (mbar_expect_tx) has landed; whoever
// reads the data waits for phase j with parity j & 1. A ring slot's "empty" barrier is waited for
// with the opposite parity, so that a fresh barrier reads as already free (pipeline.cuh).
#pragma once
#include "mma.cuh"

namespace dmattn {

#if __CUDA_ARCH__ >= 900
#define DMATTN_TMA 1
#else
#define DMATTN_TMA 0
#endif

__device__ __forceinline__ void mbar_init(u32 bar, int count = 1) {
#if DMATTN_TMA
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
#endif
}
// Makes mbar_init visible to the async proxy (the copies); a CTA barrier must follow.
__device__ __forceinline__ void mbar_init_fence() {
#if DMATTN_TMA
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}
// One arrival that also announces `bytes` more to land in this fill.
__device__ __forceinline__ void mbar_expect_tx(u32 bar, u32 bytes) {
#if DMATTN_TMA
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
               : "memory");
#endif
}
// One arrival (release: this thread's earlier shared-memory reads and writes happen before the
// phase completes for the waiters).
__device__ __forceinline__ void mbar_arrive(u32 bar) {
#if DMATTN_TMA
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
#endif
}
// One arrival once every cp.async this thread has issued so far has landed (the barrier's count
// includes it: .noinc). Many small copies are cheaper this way than as bulk copies, which the
// copy engine takes one instruction at a time.
__device__ __forceinline__ void mbar_arrive_cp_async(u32 bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}
// Waits until the fill of parity `parity` has completed.
__device__ __forceinline__ void mbar_wait(u32 bar, int parity) {
#if DMATTN_TMA
  asm volatile(
      "{\n .reg .pred done;\n WAIT:\n mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      " @!done bra WAIT;\n}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
#endif
}

// The box of a rank-4 tensor map at coordinates (c0 innermost .. c3) into shared memory at dst
// (1024-byte aligned for the 128-byte swizzle); its bytes count on bar. Out-of-range elements land
// as zeros.
__device__ __forceinline__ void tma_load_4d(void* dst, const TensorMap& map, u32 bar, int c0, int c1, int c2,
                                            int c3) {
#if DMATTN_TMA
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5, %6}], "
      "[%2];\n" ::"r"(smem_u32(dst)),
      "l"(reinterpret_cast<u64>(&map)), "r"(bar), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
      : "memory");
#endif
}

}  // namespace dmattn
