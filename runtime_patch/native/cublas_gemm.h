// The cuBLAS GEMM of the prefill linears (cublas_gemm.cc), also called by quant_gemm.cu's dequant
// path on the weight it dequantized.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace lab {

// Row-major out[m, n] = x[m, k] w[n, k]^T on `stream` (float16 x and w, float32 sums; out float16,
// or float32 where `out_f32`).
void CublasGemmNT(int device, cudaStream_t stream, int64_t m, int64_t n, int64_t k, const __half* x, const __half* w,
                  void* out, bool out_f32);

}  // namespace lab
