// A 32-bit word as two float16 values and back, and the one-instruction masked OR that the
// quantized kernels build float16 values from packed nibbles with (quant_gemv.cu, quant_gemm.cu).
#pragma once

#include <cuda_fp16.h>

#include <cstdint>

namespace lab {

__device__ __forceinline__ __half2 AsHalf2(uint32_t bits) { return *reinterpret_cast<__half2*>(&bits); }
__device__ __forceinline__ uint32_t AsBits(__half2 h) { return *reinterpret_cast<uint32_t*>(&h); }

// (bits & mask) | high in one LOP3. Written as `(bits & mask) | high` with both constants
// immediate, nvcc emits two LOP3s (one immediate each): 8 of the ~21 instructions of a q4 word in
// the decode GEMV (SASS, sm_90, 2026-12-01).
__device__ __forceinline__ uint32_t MaskOr(uint32_t bits, uint32_t mask, uint32_t high) {
  uint32_t out;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(out) : "r"(bits), "r"(mask), "r"(high));  // (a & b) | c
  return out;
}

}  // namespace lab
