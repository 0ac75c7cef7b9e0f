// The arithmetic of the batch-1 decode GEMVs (quant_gemv.cu's register kernel, quant_gemv_stream.h's
// streaming one): a q4 / q8 group of 32 weights against x, x's q4 pairs, the fused epilogues'
// roundings, and what a GEMV fuses (Fusion). The formats and the reasons are in quant_gemv.cu's
// header comment.
#pragma once

#include <cuda_fp16.h>

#include <cstdint>

namespace lab::gemv {

constexpr float kXScale = 1.f / 16.f;  // q4's half2 sums (quant_gemv.cu)

// 16-byte loads per group of one row.
template <int Bits>
constexpr int kLoadsPerGroup = Bits / 4;

__device__ __forceinline__ __half2 AsHalf2(uint32_t bits) { return *reinterpret_cast<__half2*>(&bits); }
__device__ __forceinline__ uint32_t AsBits(__half2 h) { return *reinterpret_cast<uint32_t*>(&h); }

// (bits & mask) | high as one instruction: written as `(bits & mask) | high` with two constants, the
// compiler emits two LOP3s (one immediate each), 8 of the ~21 instructions of a q4 word (SASS, sm_90).
__device__ __forceinline__ uint32_t MaskOr(uint32_t bits, uint32_t mask, uint32_t high) {
  uint32_t out;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(out) : "r"(bits), "r"(mask), "r"(high));  // (a & b) | c
  return out;
}

// Where x's chunk j (8 values) lies in shared memory: within each aligned run of 8 chunks, j's low
// 3 bits XOR the next 3. The 8 lanes of a quarter-warp read chunk c of 8 consecutive groups,
// j = 4g + c: in order they fall on 2 of the 8 16-byte bank quads, permuted on all 8. A
// permutation of each aligned run of 8: shared memory is allocated for k rounded up to 64.
__device__ __forceinline__ int Swizzled(int j) { return j ^ ((j >> 3) & 7); }

// One q4 group: sum_j x[j] * (q[j] - 7) for the 32 values of 4 words, with x as the 16 pairs
// xp[4 * j + i] = (x[8j + i], x[8j + i + 4]) / 16 (nibbles i and i + 4 of word j). Nibbles 0 and 4 go
// under float16 1024.0 (0x6400: its last 10 bits are the integer), 1 and 5 in place under 64.0
// (0x5400, whose mantissa step is 1/16: a nibble shifted left by 4 adds q), and the same for the
// word shifted right by 8: one shift per word instead of three (-2 of ~19 instructions per 8 weights).
__device__ __forceinline__ float GroupQ4(const uint4& words, const __half2* xp) {
  const __half2 low_bias = __float2half2_rn(1024.f + 7.f), high_bias = __float2half2_rn(64.f + 7.f);
  const uint32_t word[4] = {words.x, words.y, words.z, words.w};
  float sum = 0.f;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const uint32_t halves[2] = {word[j], word[j] >> 8};
    __half2 part = __float2half2_rn(0.f);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const __half2 low = __hsub2(AsHalf2(MaskOr(halves[h], 0x000F000Fu, 0x64006400u)), low_bias);
      const __half2 high = __hsub2(AsHalf2(MaskOr(halves[h], 0x00F000F0u, 0x54005400u)), high_bias);
      part = __hfma2(low, xp[4 * j + 2 * h], part);
      part = __hfma2(high, xp[4 * j + 2 * h + 1], part);
    }
    const float2 f = __half22float2(part);
    sum += f.x + f.y;
  }
  return sum;
}

// One q8 group: sum_j x[j] * (q[j] - 127) for the 32 values of 8 words, x as floats.
__device__ __forceinline__ float GroupQ8(const uint4* words, const float* xf) {
  const __half2 bias = __float2half2_rn(1024.f + 127.f);
  float sum = 0.f;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const uint32_t word[4] = {words[h].x, words[h].y, words[h].z, words[h].w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      // bytes (b0, b2) and (b1, b3) as float16 1024 + b: 0x64 is the high byte of 1024.0
      const float2 even = __half22float2(__hsub2(AsHalf2(__byte_perm(word[j], 0x64u, 0x4240)), bias));
      const float2 odd = __half22float2(__hsub2(AsHalf2(__byte_perm(word[j], 0x64u, 0x4341)), bias));
      const float* xw = xf + 16 * h + 4 * j;
      sum += even.x * xw[0] + odd.x * xw[1] + even.y * xw[2] + odd.y * xw[3];
    }
  }
  return sum;
}

// x's chunk of 8 values x[0..8) as the pairs (x[0], x[4]), (x[1], x[5]), (x[2], x[6]), (x[3], x[7]):
// a q4 word's nibbles i and i + 4 come out of one masked OR together (GroupQ4, quant_gemv_mma.h).
__device__ __forceinline__ uint4 Pairs(uint4 raw) {
  const __half* h = reinterpret_cast<const __half*>(&raw);
  uint4 paired;
  __half2* p = reinterpret_cast<__half2*>(&paired);
#pragma unroll
  for (int i = 0; i < 4; ++i) p[i] = __halves2half2(h[i], h[i + 4]);
  return paired;
}

// The same pairs scaled by 1/16 (exact but for float16 values below 2^-10, as the sum's scaling
// always was), for the SIMT kernel's half2 sums.
__device__ __forceinline__ uint4 PairedChunk(uint4 raw) {
  uint4 paired = Pairs(raw);
  __half2* p = reinterpret_cast<__half2*>(&paired);
  const __half2 xscale = __float2half2_rn(kXScale);
#pragma unroll
  for (int i = 0; i < 4; ++i) p[i] = __hmul2(p[i], xscale);
  return paired;
}

// What a GEMV does besides its product (the Swiglu epilogue is a template parameter: it maps rows).
struct Fusion {
  const __half* residual = nullptr;  // out = residual + W x where not null (lab.gemv.q4_add / q8_add)
  bool early = false;                // launched by lab::LaunchAfterPrevious (the *_early functions)
};

__device__ __forceinline__ float RoundHalf(float v) { return __half2float(__float2half_rn(v)); }

// silu(gate) * up with the separate kernels' roundings: gate, up, silu(gate) and the product each
// rounded to float16.
__device__ __forceinline__ float SiluTimes(float gate, float up) {
  const float g = RoundHalf(gate);
  return RoundHalf(g / (1.f + expf(-g))) * RoundHalf(up);
}

}  // namespace lab::gemv
