// wgmma.cuh — Hopper warpgroup MMA (sm_90a): shared-memory matrix descriptors and the
// m64nNk16 instructions the forward and backward kernels use. A warpgroup is 4 consecutive
// warps; warp w owns rows 16w..16w+15 of the 64-row tile, and each accumulator holds, per 8-column
// chunk j,
// {(g, 8j+2t), (g, 8j+2t+1), (g+8, 8j+2t), (g+8, 8j+2t+1)} — mma.sync's C layout — so the S
// accumulator packs into the A registers of the next product exactly as with mma.sync.
//
// Shared-memory operands use the 128-byte swizzle: a tile of ROWS x 64 elements ("slab") stores
// row r at r * 128 bytes with its 16-byte chunk c at chunk (c ^ (r % 8)); slabs start on 1024-byte
// boundaries (the hardware applies the XOR to address bits 4-6 from bits 7-9).
//   K-major operand (Q as A, K as B of S = Q K^T): LBO unused, SBO = 1024 B (8 rows); the k-step
//   of 16 elements is a 32-byte advance inside the slab, the next slab after 4 steps.
//   MN-major operand (V as B of O = P V, transposed; the backward's dS^T and K as A and B of dQ =
//   dS K): 64 M/N-columns per slab contiguous, LBO = the slab stride (next 64 columns), SBO =
//   1024 B (next 8 keys); 16 keys = a 2048-byte advance.
#pragma once
#include "mma.cuh"

namespace dmattn {

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define DMATTN_WGMMA 1
#else
#define DMATTN_WGMMA 0
#endif

// Descriptor of a 128B-swizzled operand at shared address `addr`.
__device__ __forceinline__ u64 sw128_desc(u32 addr, u32 lbo_bytes, u32 sbo_bytes) {
  return static_cast<u64>((addr & 0x3FFFF) >> 4) | (static_cast<u64>(lbo_bytes >> 4) << 16) |
         (static_cast<u64>(sbo_bytes >> 4) << 32) | (1ull << 62);
}

// The same descriptor `bytes` further on (a constant k-step or slab offset): the address field
// is the low 14 bits of the descriptor, in 16-byte units, and shared addresses stay below 256 KiB,
// so a plain add moves it without recomputing the other fields.
__device__ __forceinline__ u64 desc_advance(u64 desc, u32 bytes) { return desc + (bytes >> 4); }

__device__ __forceinline__ void wgmma_fence() {
#if DMATTN_WGMMA
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#if DMATTN_WGMMA
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
#if DMATTN_WGMMA
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}
// Orders this thread's generic-proxy writes to shared memory (cp.async, st.shared) before the
// async proxy (wgmma) reads them; each writer runs it before the barrier.
__device__ __forceinline__ void fence_proxy_async() {
#if DMATTN_WGMMA
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// An in-flight wgmma reads its A registers and accumulates into its D registers until it is
// waited for, which the compiler cannot see: it could reuse those registers, or move a read of D
// above the wait. An empty asm that "rewrites" each register, placed after the wait, keeps them
// live and ordered (volatile asm statements keep their order).
template <int N>
__device__ __forceinline__ void fence_registers(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
template <int N>
__device__ __forceinline__ void fence_registers(u32 (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+r"(r[i])::"memory");
}

// The m64nNk16 products, for each element type (TAG: its tag type in types.cuh, AB: its PTX
// name); D holds the f32 accumulators in the layout described at the top of this file.
//   wgmma_ss_m64n{32,64,128}k16<MN>(d, da, db, accumulate, TAG)
//       D {=, +=} A(64x16, smem) * B(16xN, smem), both K-major (MN = 0) or both MN-major (MN = 1)
//   wgmma_rs_m64n{64,128}k16(d, a, db, TAG)
//       D += A(64x16, registers) * B(16xN, smem MN-major, transposed)
// Outside sm_90a they compile to nothing (the Hopper kernel is only built for sm_90a).
#if DMATTN_WGMMA
#define DMATTN_WGMMA_ASM(...) asm volatile(__VA_ARGS__)
#else
#define DMATTN_WGMMA_ASM(...)
#endif
#define DMATTN_WGMMA_PRODUCTS(TAG, AB) \
template <int MN = 0> \
__device__ __forceinline__ void wgmma_ss_m64n32k16(float (&d)[16], u64 da, u64 db, int accumulate, TAG) { \
  DMATTN_WGMMA_ASM( \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n" \
      "wgmma.mma_async.sync.aligned.m64n32k16.f32." AB "." AB " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, %16, %17, p, 1, 1, %19, %19;\n}\n" \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]) \
      : "l"(da), "l"(db), "r"(accumulate), "n"(MN)); \
} \
template <int MN = 0> \
__device__ __forceinline__ void wgmma_ss_m64n64k16(float (&d)[32], u64 da, u64 db, int accumulate, TAG) { \
  DMATTN_WGMMA_ASM( \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n" \
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." AB "." AB " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, %35, %35;\n}\n" \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]) \
      : "l"(da), "l"(db), "r"(accumulate), "n"(MN)); \
} \
template <int MN = 0> \
__device__ __forceinline__ void wgmma_ss_m64n128k16(float (&d)[64], u64 da, u64 db, int accumulate, TAG) { \
  DMATTN_WGMMA_ASM( \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n" \
      "wgmma.mma_async.sync.aligned.m64n128k16.f32." AB "." AB " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, %67, %67;\n}\n" \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]) \
      : "l"(da), "l"(db), "r"(accumulate), "n"(MN)); \
} \
__device__ __forceinline__ void wgmma_rs_m64n64k16(float (&d)[32], const u32 (&a)[4], u64 db, TAG) { \
  DMATTN_WGMMA_ASM( \
      "{\n.reg .pred p;\nsetp.eq.u32 p, 1, 1;\n" \
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." AB "." AB " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n" \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]) \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db)); \
} \
__device__ __forceinline__ void wgmma_rs_m64n128k16(float (&d)[64], const u32 (&a)[4], u64 db, TAG) { \
  DMATTN_WGMMA_ASM( \
      "{\n.reg .pred p;\nsetp.eq.u32 p, 1, 1;\n" \
      "wgmma.mma_async.sync.aligned.m64n128k16.f32." AB "." AB " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n" \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]) \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db)); \
}

DMATTN_WGMMA_PRODUCTS(bf16_t, "bf16")
DMATTN_WGMMA_PRODUCTS(fp16_t, "f16")
#undef DMATTN_WGMMA_PRODUCTS
#undef DMATTN_WGMMA_ASM

}  // namespace dmattn
