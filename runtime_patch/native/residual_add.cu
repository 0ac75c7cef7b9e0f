// The residual add after lab.gemm.nt_add's GEMM (cublas_gemm.cc): out = fp16(float(out) +
// float(residual)), in place over float16 vectors of 8 (16 bytes), by a grid that fills the GPU
// (its resident blocks) and strides over the vectors. With the GEMM's own rounding of its output
// this is transformers' `residual + o_proj(x)` in float16, rounded twice. (cuBLASLt's epilogue,
// which adds the residual before one rounding, was tried: ~1.4 ms less over a 4096-token
// Llama-3-8B prefill by bench.prefill_gemm, the same TTFT end to end, but its residual stream left
// transformers' by an ulp an add; docs/BENCHMARKS.md, fifteenth round.)
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "cublas_gemm.h"
#include "cuda_common.h"
#include "half_bits.h"

namespace {

constexpr int kAddThreads = 256;

__device__ __forceinline__ uint32_t AddPair(uint32_t a_bits, uint32_t b_bits) {
  const float2 a = __half22float2(lab::AsHalf2(a_bits)), b = __half22float2(lab::AsHalf2(b_bits));
  return lab::AsBits(__floats2half2_rn(a.x + b.x, a.y + b.y));
}

__global__ void __launch_bounds__(kAddThreads) AddInPlace(uint4* __restrict__ out, const uint4* __restrict__ residual,
                                                          int64_t vectors) {
  for (int64_t t = int64_t(blockIdx.x) * kAddThreads + threadIdx.x; t < vectors; t += int64_t(gridDim.x) * kAddThreads) {
    const uint4 a = out[t], b = __ldg(residual + t);
    out[t] = make_uint4(AddPair(a.x, b.x), AddPair(a.y, b.y), AddPair(a.z, b.z), AddPair(a.w, b.w));
  }
}

}  // namespace

namespace lab {

void AddResidualInPlace(int device, cudaStream_t stream, __half* out, const __half* residual, int64_t count) {
  const int64_t vectors = count / 8;
  if (vectors == 0) return;
  const int64_t blocks = GridStrideBlocks(reinterpret_cast<const void*>(AddInPlace), kAddThreads, vectors, device);
  AddInPlace<<<unsigned(blocks), kAddThreads, 0, stream>>>(reinterpret_cast<uint4*>(out),
                                                           reinterpret_cast<const uint4*>(residual), vectors);
  CheckLaunch("lab.gemm.nt_add");
}

}  // namespace lab
