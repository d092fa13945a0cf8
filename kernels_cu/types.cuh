// types.cuh — element types of q/k/v (fp16, bf16) and their conversions.
//
// Written with PTX instead of <cuda_fp16.h>/<cuda_bf16.h> so that the same sources compile under
// NVRTC (no CUDA include path needed) and under nvcc (CI's compile check). Storage is raw 16-bit.
#pragma once

namespace dmattn {

typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
// Bias values are raised to this floor before they meet log2(e), so the bf16 and fp32 minima (what
// users write for "masked") stay finite in base 2: rows of equal huge-negative scores still give a
// uniform softmax. A power of two (-2^126), so that floor * unit is exact (softmax.cuh).
// kBiasFloorBf16x2: the floor as two bf16 halves.
constexpr float kBiasFloor = -8.507059173023462e37f;
constexpr u32 kBiasFloorBf16x2 = 0xfe80fe80u;

// Each element type names the mma.sync flavour and how to pack two floats into one register.
struct fp16_t {
  static __device__ __forceinline__ u32 pack(float lo, float hi) {
    u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
  }
  static __device__ __forceinline__ float to_float(u16 x) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x));
    return f;
  }
  // The two halves of a packed pair, low first.
  static __device__ __forceinline__ float2 unpack(u32 x) {
    return make_float2(to_float(static_cast<u16>(x & 0xffffu)), to_float(static_cast<u16>(x >> 16)));
  }
  // Bias values: fp16's minimum is finite in base 2, no floor needed.
  static __device__ __forceinline__ float2 bias_pair(u32 x) { return unpack(x); }
  static __device__ __forceinline__ float bias(u16 x) { return to_float(x); }
};

struct bf16_t {
  static __device__ __forceinline__ u32 pack(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
  }
  static __device__ __forceinline__ float to_float(u16 x) {
    return __uint_as_float(static_cast<u32>(x) << 16);
  }
  static __device__ __forceinline__ float2 unpack(u32 x) {
    return make_float2(__uint_as_float(x << 16), __uint_as_float(x & 0xffff0000u));
  }
  // Bias values: both halves raised to kBiasFloor with one packed max, then unpacked.
  static __device__ __forceinline__ float2 bias_pair(u32 x) {
    asm("max.bf16x2 %0, %1, %2;" : "=r"(x) : "r"(x), "r"(kBiasFloorBf16x2));
    return unpack(x);
  }
  static __device__ __forceinline__ float bias(u16 x) { return fmaxf(to_float(x), kBiasFloor); }
};

// Eight 2-byte elements (16 aligned bytes at src) as floats.
template <typename T>
__device__ __forceinline__ void load8(const u16* src, float (&x)[8]) {
  const uint4 u = *reinterpret_cast<const uint4*>(src);
  const u32 w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float2 f = T::unpack(w[j]);
    x[2 * j] = f.x;
    x[2 * j + 1] = f.y;
  }
}

// Raw storage of a mask or bias element of BYTES bytes.
// A compile-time bool as a type: picks a copy of a generic lambda (`[&](auto tag)`).
template <bool B> struct BoolConst { static constexpr bool value = B; };

template <int BYTES> struct Raw;
template <> struct Raw<1> { typedef unsigned char type; };
template <> struct Raw<2> { typedef u16 type; };
template <> struct Raw<4> { typedef u32 type; };
template <> struct Raw<8> { typedef u64 type; };

// A bias element as the float the score adds: 16-bit biases have the q/k/v element type T, 32-bit
// ones are float32; at least kBiasFloor (see there).
template <typename T> __device__ __forceinline__ float bias_to_float(u16 x) { return T::bias(x); }
template <typename T> __device__ __forceinline__ float bias_to_float(u32 x) {
  return fmaxf(__uint_as_float(x), kBiasFloor);
}

// Two neighbouring bias elements (keys 2c, 2c + 1) as floats, in one shared-memory load.
template <typename T> __device__ __forceinline__ float2 bias_pair(const u16* row, int c) {
  return T::bias_pair(reinterpret_cast<const u32*>(row)[c]);
}
template <typename T> __device__ __forceinline__ float2 bias_pair(const u32* row, int c) {
  const float2 x = reinterpret_cast<const float2*>(row)[c];
  return make_float2(fmaxf(x.x, kBiasFloor), fmaxf(x.y, kBiasFloor));
}

// A mask element is "keep" when any bit other than a float sign bit is set: bool/uint8/int8 (1 byte),
// float16/bfloat16 (2 bytes, -0.0 counts as zero), float32 (4 bytes, likewise).
__device__ __forceinline__ bool mask_keep(unsigned char x) { return x != 0; }
__device__ __forceinline__ bool mask_keep(u16 x) { return (x & 0x7fffu) != 0; }
__device__ __forceinline__ bool mask_keep(u32 x) { return (x & 0x7fffffffu) != 0; }

// keep flags of two neighbouring mask elements (keys 2c, 2c + 1), in one shared-memory load.
__device__ __forceinline__ void mask_pair(const unsigned char* row, int c, bool& k0, bool& k1) {
  const u16 x = reinterpret_cast<const u16*>(row)[c];
  k0 = (x & 0xffu) != 0;
  k1 = (x >> 8) != 0;
}
__device__ __forceinline__ void mask_pair(const u16* row, int c, bool& k0, bool& k1) {
  const u32 x = reinterpret_cast<const u32*>(row)[c];
  k0 = (x & 0x7fffu) != 0;
  k1 = (x & 0x7fff0000u) != 0;
}
__device__ __forceinline__ void mask_pair(const u32* row, int c, bool& k0, bool& k1) {
  const uint2 x = reinterpret_cast<const uint2*>(row)[c];
  k0 = (x.x & 0x7fffffffu) != 0;
  k1 = (x.y & 0x7fffffffu) != 0;
}

// True when any element of a 16-byte chunk of mask elements is "keep".
template <int BYTES> __device__ __forceinline__ bool chunk_any_keep(uint4 c) {
  if (BYTES == 1) return (c.x | c.y | c.z | c.w) != 0u;
  const u32 m = BYTES == 2 ? 0x7fff7fffu : 0x7fffffffu;
  return ((c.x & m) | (c.y & m) | (c.z & m) | (c.w & m)) != 0u;
}

// Nonzero when some byte among the first n of a 16-byte chunk of a bool/uint8 mask is zero
// ("hidden"), by the borrow trick: (w - 0x01010101) & ~w & 0x80808080 is nonzero exactly when w has
// a zero byte. Counting only the first n bytes stays exact: a borrow flags a byte only above a truly
// zero one, which then counts too.
__device__ __forceinline__ u32 chunk_zero_bytes(uint4 c, int n = 16) {
  const u32 w[4] = {c.x, c.y, c.z, c.w};
  u32 zero = 0u;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int bytes = n - 4 * i;  // of word i
    const u32 counted = bytes >= 4 ? 0x80808080u : bytes <= 0 ? 0u : 0x80808080u & ((1u << (8 * bytes)) - 1u);
    zero |= (w[i] - 0x01010101u) & ~w[i] & counted;
  }
  return zero;
}

// True when the first n elements of a 16-byte chunk of mask elements all keep (n >= 16 / BYTES: the
// whole chunk; the last chunk a row reads may be cut short).
template <int BYTES> __device__ __forceinline__ bool chunk_all_keep(uint4 c, int n) {
  if constexpr (BYTES == 1) {
    return chunk_zero_bytes(c, n) == 0u;
  } else {
    const u32 w[4] = {c.x, c.y, c.z, c.w};
    constexpr int kPerWord = 4 / BYTES;
    constexpr u32 kKeepBits = BYTES == 2 ? 0x7fffu : 0x7fffffffu;
    bool all = true;
#pragma unroll
    for (int i = 0; i < 16 / BYTES; ++i)
      all &= i >= n || ((w[i / kPerWord] >> (8 * BYTES * (i % kPerWord))) & kKeepBits) != 0u;
    return all;
  }
}

// n / d and n % d for 0 <= n < 2^31 by a divisor d >= 1 known only at run time, without the
// ~20-instruction integer division (per-item and per-step index math in the scans and loops): the
// quotient is umulhi(n, mul) >> shift with mul = ceil(2^(31 + l) / d), l = ceil(log2 d)
// (Granlund and Montgomery; d = 1 passes n through).
struct FastDivmod {
  int d;
  u32 mul;
  int shift;
  __device__ explicit FastDivmod(int divisor) : d(divisor), mul(0), shift(0) {
    int l = 0;
    while ((1 << l) < d) ++l;
    if (d > 1) {
      mul = static_cast<u32>(((1ull << (31 + l)) + d - 1) / d);
      shift = l - 1;
    }
  }
  __device__ __forceinline__ int div(int n) const {
    return d == 1 ? n : static_cast<int>(__umulhi(static_cast<u32>(n), mul) >> shift);
  }
  __device__ __forceinline__ int mod(int n) const { return n - div(n) * d; }
};

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

// 2^x on the special-function unit; 2^-inf = +0.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// tanh(x) = 1 - 2 / (e^{2x} + 1) on the special-function unit (absolute error ~1e-6; exact limits
// +-1 at +-inf). Far fewer registers than tanhf, which matters inside the attention tiles.
__device__ __forceinline__ float fast_tanh(float x) {
  return 1.f - __fdividef(2.f, fast_exp2(x * 2.8853900817779268f) + 1.f);
}

}  // namespace dmattn
