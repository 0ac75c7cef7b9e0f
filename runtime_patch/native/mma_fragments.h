// Tensor-core fragments shared by the plugins' kernels (compute capability 8.0 and newer):
// mma.sync m16n8k16 with float16 operands and float32 accumulators, ldmatrix, movmatrix.
//
// Fragments of one warp, lane l, r = l / 4, c = l % 4 (PTX ISA, "Matrix Fragments for mma.m16n8k16"):
//   A [16 x 16] row-major, 4 registers of two halfs: a0 = (row r, columns 2c, 2c+1), a1 = (row r+8,
//     the same columns), a2 = (row r, columns 2c+8, 2c+9), a3 = (row r+8, columns 2c+8, 2c+9);
//   B [16 x 8], 2 registers: b0 = (rows 2c, 2c+1, column r), b1 = (rows 2c+8, 2c+9, column r);
//   C [16 x 8] float: c0, c1 = (row r, columns 2c, 2c+1), c2, c3 = (row r+8, the same columns).
#pragma once

#include <cuda_fp16.h>

#include <cstdint>

namespace lab {
namespace mma {

// c[16 x 8] += a[16 x 16] b[16 x 8].
__device__ __forceinline__ void Mma(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
               "{%8, %9}, {%0, %1, %2, %3};\n"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// The same with A's rows 8-15 zero (a1 = a3 = 0): only the top rows' accumulators c0, c1 are kept
// (the bottom ones are written to scratch registers the compiler may reuse at once), for products
// with at most 8 live rows (a decode's query heads of one KV head).
__device__ __forceinline__ void MmaTopRows(float* c, uint32_t a0, uint32_t a2, uint32_t b0, uint32_t b1) {
  [[maybe_unused]] float unused0, unused1;
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
               "{%8, %9}, {%0, %1, %10, %10};\n"
               : "+f"(c[0]), "+f"(c[1]), "=f"(unused0), "=f"(unused1)
               : "r"(a0), "r"(0u), "r"(a2), "r"(0u), "r"(b0), "r"(b1), "f"(0.f));
}

// Four 8 x 8 matrices of float16 from shared memory (lanes 8i..8i+7 give matrix i's row addresses).
__device__ __forceinline__ void LoadMatrices(uint32_t* r, const __half* smem) {
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}

// The same, each matrix transposed.
__device__ __forceinline__ void LoadMatricesTransposed(uint32_t* r, const __half* smem) {
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}

// An 8 x 8 matrix of float16 held one register a lane (lane l: row l / 4, columns 2 (l % 4),
// 2 (l % 4) + 1), transposed in registers: the result's lane l holds row l / 4 of the transpose.
__device__ __forceinline__ uint32_t Transpose(uint32_t x) {
  uint32_t y;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
  return y;
}

__device__ __forceinline__ uint32_t PackHalf2(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

}  // namespace mma
}  // namespace lab
