// pipeline.cuh — warp specialization on Hopper (sm_90a): producer warps fill shared-memory slots
// that consumer warps read, handed over through a pair of mbarriers per slot; named barriers that
// synchronize part of the CTA; setmaxnreg, which moves registers from the producers (few live
// values) to the consumers (the accumulators).
#pragma once
#include "tma.cuh"
#include "wgmma.cuh"

namespace dmattn {

// A ring of S slots. Each has a "full" barrier (the producer's arrivals and bytes: the data has
// landed) and an "empty" one (every consumer has released it). Both sides count the fills they
// made or used, n = 0, 1, 2, ...: fill n goes to slot n % S, as that slot's (n / S)-th.
template <int S>
struct Ring {
  u32 full;   // shared address of S barriers
  u32 empty;  // S more
  __device__ __forceinline__ u32 full_bar(u32 n) const { return full + 8 * (n % S); }
  // Producer, before fill n: the slot's previous use has been released (a fresh slot is free).
  __device__ __forceinline__ void acquire(u32 n) const { mbar_wait(empty + 8 * (n % S), ((n / S) & 1) ^ 1); }
  // Consumer: fill n has landed.
  __device__ __forceinline__ void wait(u32 n) const { mbar_wait(full_bar(n), (n / S) & 1); }
  // Consumer: done with fill n (one arrival; the empty barrier counts every consumer's).
  __device__ __forceinline__ void release(u32 n) const { mbar_arrive(empty + 8 * (n % S)); }
  // The same for a warp: lane 0 arrives once the lanes in `lanes` are done.
  __device__ __forceinline__ void release_by_warp(u32 n, int lane, u32 lanes = 0xffffffffu) const {
    __syncwarp(lanes);
    if (lane == 0) release(n);
  }
  __device__ __forceinline__ void init(int producers, int consumers) const {
    for (int j = 0; j < S; ++j) {
      mbar_init(full + 8 * j, producers);
      mbar_init(empty + 8 * j, consumers);
    }
  }
};

// Barrier `id` (1..15; 0 is __syncthreads) over `threads` threads (a multiple of 32): sync waits
// for all of them, arrive counts this warp without waiting.
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_barrier_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// The registers per thread of the calling warpgroup from here on (every thread of the warpgroup
// executes it). The kernel starts with the __launch_bounds__ share; producers give registers back
// and consumers take them.
template <int REGS>
__device__ __forceinline__ void regs_decrease() {
#if DMATTN_WGMMA
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(REGS));
#endif
}
template <int REGS>
__device__ __forceinline__ void regs_increase() {
#if DMATTN_WGMMA
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(REGS));
#endif
}

}  // namespace dmattn
