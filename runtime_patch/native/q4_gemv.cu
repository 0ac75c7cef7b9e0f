// lab.gemv.q4(x, q_weight, q_scale, out): the batch-1 decode GEMV of a q4f16_1 linear,
// out[n] = sum_k x[k] * (q[n, k] - 7) * scale[n, k / 32], for engine/model.py's `decode`
// (decode_gemv="library"; relax call_dps_packed, inside the decode's CUDA graph: the kernel is
// launched on TVMFFIEnvGetStream, which TVM points at its capture stream while capturing).
//
// q_weight [N, K/8] uint32 holds 8 values per word, lowest bits first; q_scale [N, K/32] float16.
// TVM's GEMV converts every weight to float32 (shift, mask, convert, scale, multiply-add): an
// int4 weight costs the same instructions as an int8 one for half the bytes, so the kernel is
// instruction-bound. Here a shift and one masked OR turn two nibbles into two float16 values
// 1024 + q at once (0x6400 is 1024.0 in float16, whose last 10 bits are the integer), one half2
// subtraction removes 1024 + 7, and half2 multiply-adds combine them with x. Per 32-bit word the
// half2 sum is taken into float32; x is scaled by 1/16 for that sum, so no product sum of a word
// overflows float16 for any float16 x.
//
// A warp computes kRows rows (4 for wide outputs, else 1); a lane takes whole groups (4 words,
// one 16-byte load, one scale), the warp's lanes consecutive groups, so a warp load reads 512
// contiguous bytes of a row.
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <dlpack/dlpack.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/c_env_api.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/reflection/registry.h>

#include <cstdint>

#include "cuda_common.h"

namespace {

using lab::Data;
using lab::IsCompact;
using lab::Rows;

constexpr int kWarps = 8;
// Rows per warp: x's pairs are built once per group for all of them; few rows leave the GPU idle
// (4096 rows at 4 per warp are 128 blocks of 8 warps), so wide outputs only.
constexpr int kRowsWide = 4, kWideFrom = 16384;
constexpr float kXScale = 1.f / 16.f;

__device__ __half2 AsHalf2(uint32_t bits) { return *reinterpret_cast<__half2*>(&bits); }

template <int kRows, typename OutT>
__global__ void __launch_bounds__(kWarps * 32)
GemvQ4(const __half* __restrict__ x, const uint32_t* __restrict__ w, const __half* __restrict__ scale,
       OutT* __restrict__ out, int n, int k) {
  const int lane = threadIdx.x % 32;
  const int row0 = (blockIdx.x * kWarps + threadIdx.x / 32) * kRows;
  if (row0 >= n) return;  // the whole warp
  const int groups = k / 32;
  const int64_t row_words = k / 8;
  const __half2 bias = __float2half2_rn(1024.f + 7.f);
  float acc[kRows] = {};
  for (int g = lane; g < groups; g += 32) {
    // x of this group as the pairs the dequantization yields: word j gives (q[8j + i], q[8j + i + 4])
    __half xs[32];
    const uint4* xv = reinterpret_cast<const uint4*>(x + int64_t(g) * 32);
#pragma unroll
    for (int i = 0; i < 4; ++i) *reinterpret_cast<uint4*>(xs + 8 * i) = __ldg(xv + i);
    __half2 xp[16];
    const __half2 xscale = __float2half2_rn(kXScale);
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) xp[4 * j + i] = __hmul2(__halves2half2(xs[8 * j + i], xs[8 * j + i + 4]), xscale);
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int row = row0 + r;
      if (row >= n) break;
      const uint4 words = __ldg(reinterpret_cast<const uint4*>(w + row * row_words) + g);
      const float s = __half2float(scale[int64_t(row) * groups + g]);
      const uint32_t word[4] = {words.x, words.y, words.z, words.w};
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        __half2 part = __float2half2_rn(0.f);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const __half2 q = __hsub2(AsHalf2(((word[j] >> (4 * i)) & 0x000F000Fu) | 0x64006400u), bias);
          part = __hfma2(q, xp[4 * j + i], part);
        }
        const float2 f = __half22float2(part);
        sum += f.x + f.y;
      }
      acc[r] += s * sum;
    }
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    float v = acc[r];
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
    if (lane == 0 && row0 + r < n) out[row0 + r] = OutT(v / kXScale);
  }
}

void GemvQ4Packed(DLTensor* x, DLTensor* w, DLTensor* scale, DLTensor* out) {
  const char* fn = "lab.gemv.q4";
  for (const DLTensor* t : {x, w, scale, out}) {
    if (t->device.device_type != kDLCUDA) TVM_FFI_THROW(ValueError) << fn << ": a tensor is not on a CUDA device";
    if (!IsCompact(t)) TVM_FFI_THROW(ValueError) << fn << ": a tensor is not compact";
  }
  const bool f16 = [](DLDataType d) { return d.code == kDLFloat && d.bits == 16 && d.lanes == 1; }(x->dtype);
  if (!f16 || w->dtype.code != kDLUInt || w->dtype.bits != 32 || scale->dtype.bits != 16 || w->ndim != 2 ||
      scale->ndim != 2)
    TVM_FFI_THROW(TypeError) << fn << ": expects x float16, q_weight uint32 [N, K/8], q_scale float16 [N, K/32]";
  const int64_t n = w->shape[0], k = w->shape[1] * 8;
  if (Rows(x) != 1 || x->shape[x->ndim - 1] != k || scale->shape[0] != n || scale->shape[1] * 32 != k ||
      Rows(out) != 1 || out->shape[out->ndim - 1] != n || k % 32 != 0)
    TVM_FFI_THROW(ValueError) << fn << ": shapes do not agree (one row of x [.., " << x->shape[x->ndim - 1]
                              << "], q_weight [" << n << ", " << w->shape[1] << "], out [.., "
                              << out->shape[out->ndim - 1] << "])";
  const int device = x->device.device_id;
  auto stream = static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, device));
  const bool f32 = out->dtype.code == kDLFloat && out->dtype.bits == 32;
  if (!f32 && !(out->dtype.code == kDLFloat && out->dtype.bits == 16))
    TVM_FFI_THROW(TypeError) << fn << ": out must be float16 or float32";
  const int rows = n >= kWideFrom ? kRowsWide : 1;
  const unsigned blocks = unsigned((n + kWarps * rows - 1) / (kWarps * rows));
  const auto* xp = Data<__half>(x);
  const auto* wp = Data<uint32_t>(w);
  const auto* sp = Data<__half>(scale);
  if (f32 && rows == kRowsWide) {
    GemvQ4<kRowsWide, float><<<blocks, kWarps * 32, 0, stream>>>(xp, wp, sp, Data<float>(out), int(n), int(k));
  } else if (f32) {
    GemvQ4<1, float><<<blocks, kWarps * 32, 0, stream>>>(xp, wp, sp, Data<float>(out), int(n), int(k));
  } else if (rows == kRowsWide) {
    GemvQ4<kRowsWide, __half><<<blocks, kWarps * 32, 0, stream>>>(xp, wp, sp, Data<__half>(out), int(n), int(k));
  } else {
    GemvQ4<1, __half><<<blocks, kWarps * 32, 0, stream>>>(xp, wp, sp, Data<__half>(out), int(n), int(k));
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) TVM_FFI_THROW(RuntimeError) << fn << ": launch failed: " << cudaGetErrorString(err);
}

}  // namespace

TVM_FFI_STATIC_INIT_BLOCK() {
  namespace refl = tvm::ffi::reflection;
  refl::GlobalDef().def("lab.gemv.q4", GemvQ4Packed);
}
