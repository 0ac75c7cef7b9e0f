// lab.dequant.q4 / lab.dequant.q8 (q_weight, q_scale, out [N, K] float16): the whole weight
// dequantized for the prefill's cuBLAS GEMM (engine/model/kernels.py `_library_gemm`); a thread per
// group of 32 weights, 16-byte loads and stores, so the pass runs at about the copy bandwidth.
//
// lab.gemv.q4 / lab.gemv.q8 (x, q_weight, q_scale, out): the batch-1 decode GEMV of a q4f16_1 or
// q8f16_1 linear, out[n] = sum_k x[k] * (q[n, k] - m) * scale[n, k / 32] (m = 7 or 127), for
// engine/model/kernels.py's `decode` (decode_gemv="library"; relax call_dps_packed, inside the
// decode's CUDA graph: the kernel is launched on TVMFFIEnvGetStream, which TVM points at its
// capture stream while capturing).
//
// q_weight [N, K * bits / 32] uint32 holds 32 / bits values per word, lowest bits first; q_scale
// [N, K/32] float16 (MLC's layouts, engine/quantize.py).
//
// Memory: a lane takes whole groups of 32 weights (q4: one 16-byte load, q8: two) and the warp's
// lanes consecutive groups, so a warp load reads 512 or 1024 contiguous bytes of a row. A lane
// first issues the loads of kInFlight groups (and their scales), then computes on them: the
// earlier loop, one group's load then its arithmetic, waited a memory latency per group and left
// the 4096-row GEMVs at 36-49% of the copy bandwidth.
//
// Arithmetic: q4 is instruction-bound if each weight is converted to float32 (as TVM's GEMV does).
// Here a shift and one masked OR turn two nibbles into two float16 values 1024 + q at once
// (0x6400 is 1024.0 in float16, whose last 10 bits are the integer), one half2 subtraction
// removes 1024 + 7, and half2 multiply-adds combine them with x. Per 32-bit word the half2 sum is
// taken into float32; x is scaled by 1/16 for that sum, so no product sum of a word overflows
// float16 for any float16 x. q8 reads twice the bytes per weight, so it can afford float32
// products (exact for any x): a byte permute makes two float16 values 1024 + q of a word's bytes
// at once, a half2 subtraction removes 1024 + 127 (exact), and they are multiplied in float32.
//
// A warp computes kRows rows (1, 2 or 4, RowsPerWarp below): x's values are loaded once per group
// for all of them.
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <dlpack/dlpack.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/c_env_api.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/reflection/registry.h>

#include <algorithm>
#include <cstdint>

#include "cuda_common.h"

namespace {

using lab::Data;
using lab::IsCompact;
using lab::Rows;

constexpr int kWarps = 8;
constexpr float kXScale = 1.f / 16.f;  // q4's half2 sums (above)

// 16-byte loads per group of one row, and groups in flight per lane (about 16 loads).
template <int Bits>
constexpr int kLoadsPerGroup = Bits / 4;
template <int Bits, int Rows>
constexpr int kInFlight = 16 / (Rows * kLoadsPerGroup<Bits>) < 8 ? 16 / (Rows * kLoadsPerGroup<Bits>) : 8;

__device__ __half2 AsHalf2(uint32_t bits) { return *reinterpret_cast<__half2*>(&bits); }

// One q4 group: sum_j x[j] * (q[j] - 7) for the 32 values of 4 words, with x as the 16 pairs
// xp[4 * j + i] = (x[8j + i], x[8j + i + 4]) / 16 (the pairs one word's shifts yield).
__device__ float GroupQ4(const uint4& words, const __half2* xp) {
  const __half2 bias = __float2half2_rn(1024.f + 7.f);
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
  return sum;
}

// One q8 group: sum_j x[j] * (q[j] - 127) for the 32 values of 8 words, x as floats.
__device__ float GroupQ8(const uint4* words, const float* xf) {
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

template <int Bits, int kRows, typename OutT>
__global__ void __launch_bounds__(kWarps * 32)
GemvQuant(const __half* __restrict__ x, const uint32_t* __restrict__ w, const __half* __restrict__ scale,
          OutT* __restrict__ out, int n, int k) {
  constexpr int L = kLoadsPerGroup<Bits>, P = kInFlight<Bits, kRows>;
  const int lane = threadIdx.x % 32;
  const int row0 = (blockIdx.x * kWarps + threadIdx.x / 32) * kRows;
  if (row0 >= n) return;  // the whole warp
  const int groups = k / 32;
  const int64_t row_vecs = int64_t(groups) * L;  // 16-byte vectors per row
  const uint4* wv = reinterpret_cast<const uint4*>(w);
  float acc[kRows] = {};
  for (int g0 = lane; g0 < groups; g0 += 32 * P) {
    uint4 words[P][kRows][L];
    __half scales[P][kRows];
#pragma unroll
    for (int p = 0; p < P; ++p) {
      const int g = g0 + 32 * p;
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const int row = min(row0 + r, n - 1);  // a row past the end repeats the last (not stored)
        if (g < groups) {
#pragma unroll
          for (int l = 0; l < L; ++l) words[p][r][l] = __ldg(wv + row * row_vecs + int64_t(g) * L + l);
          scales[p][r] = scale[int64_t(row) * groups + g];
        }
      }
    }
#pragma unroll
    for (int p = 0; p < P; ++p) {
      const int g = g0 + 32 * p;
      if (g >= groups) break;
      __half xs[32];
      const uint4* xv = reinterpret_cast<const uint4*>(x + int64_t(g) * 32);
#pragma unroll
      for (int i = 0; i < 4; ++i) *reinterpret_cast<uint4*>(xs + 8 * i) = __ldg(xv + i);
      if constexpr (Bits == 4) {
        __half2 xp[16];
        const __half2 xscale = __float2half2_rn(kXScale);
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
          for (int i = 0; i < 4; ++i) xp[4 * j + i] = __hmul2(__halves2half2(xs[8 * j + i], xs[8 * j + i + 4]), xscale);
#pragma unroll
        for (int r = 0; r < kRows; ++r) acc[r] += __half2float(scales[p][r]) * GroupQ4(words[p][r][0], xp);
      } else {
        float xf[32];
#pragma unroll
        for (int i = 0; i < 32; ++i) xf[i] = __half2float(xs[i]);
#pragma unroll
        for (int r = 0; r < kRows; ++r) acc[r] += __half2float(scales[p][r]) * GroupQ8(words[p][r], xf);
      }
    }
  }
  const float unscale = Bits == 4 ? 1.f / kXScale : 1.f;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    float v = acc[r];
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
    if (lane == 0 && row0 + r < n) out[row0 + r] = OutT(v * unscale);
  }
}

// Rows per warp for an output of n rows. q4 shares its x loads and their conversion over 4 rows
// where the output is wide (its GEMVs are bound by instructions per weight; 4 rows measured
// 27.6 us against 39.9 at 1-2 rows for Llama-3-8B's 28672 x 4096 gate_up on an H200). Otherwise
// (q8, whose 4-row kernel fits one block per SM, and narrow q4 outputs) 1 or 2 rows: the fewest
// waves of resident warps times rows per warp (a warp's time grows with its rows), so that a
// narrow GEMV is not one full wave and a few stragglers (Llama-3-8B's 4096 x 14336 down
// projection at one row per warp ran 1.3 waves: 31.4 us, 18.0 at two rows). Ties go to 2 rows.
constexpr int64_t kQ4WideFrom = 16384;

template <int Bits, typename OutT>
int RowsPerWarp(int64_t n, int device) {
  if (Bits == 4 && n >= kQ4WideFrom) return 4;
  static thread_local int resident[2] = {0, 0};  // blocks per SM of the 1- and 2-row kernels
  if (resident[0] == 0) {
    LAB_CHECK_CUDA(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
        resident, reinterpret_cast<const void*>(GemvQuant<Bits, 1, OutT>), kWarps * 32, 0));
    LAB_CHECK_CUDA(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
        resident + 1, reinterpret_cast<const void*>(GemvQuant<Bits, 2, OutT>), kWarps * 32, 0));
  }
  int sms = 0;
  LAB_CHECK_CUDA(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  int64_t cost[2];
  for (int i = 0; i < 2; ++i) {
    const int64_t rows = i + 1, slots = std::max<int64_t>(1, int64_t(resident[i]) * sms * kWarps);
    cost[i] = ((n + rows - 1) / rows + slots - 1) / slots * rows;
  }
  return cost[1] <= cost[0] ? 2 : 1;
}

template <int Bits, typename OutT>
void Launch(int64_t n, int64_t k, const __half* x, const uint32_t* w, const __half* s, OutT* out, int device,
            cudaStream_t stream) {
  const int rows = RowsPerWarp<Bits, OutT>(n, device);
  const unsigned blocks = unsigned((n + kWarps * rows - 1) / (kWarps * rows));
  if (rows == 4) {
    GemvQuant<Bits, 4, OutT><<<blocks, kWarps * 32, 0, stream>>>(x, w, s, out, int(n), int(k));
  } else if (rows == 2) {
    GemvQuant<Bits, 2, OutT><<<blocks, kWarps * 32, 0, stream>>>(x, w, s, out, int(n), int(k));
  } else {
    GemvQuant<Bits, 1, OutT><<<blocks, kWarps * 32, 0, stream>>>(x, w, s, out, int(n), int(k));
  }
}

// One thread per group of 32 weights of a row: its words (one or two 16-byte loads) and scale,
// 32 float16 values out (four 16-byte stores). Exact: (q - m) * scale rounded once to float16.
template <int Bits>
__global__ void Dequantize(const uint32_t* __restrict__ w, const __half* __restrict__ scale,
                           __half* __restrict__ out, int64_t groups) {
  constexpr int L = kLoadsPerGroup<Bits>, per_word = 32 / Bits;
  constexpr uint32_t mask = (1u << Bits) - 1;
  constexpr float offset = float((1 << (Bits - 1)) - 1);
  const uint4* wv = reinterpret_cast<const uint4*>(w);
  for (int64_t g = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; g < groups; g += int64_t(gridDim.x) * blockDim.x) {
    uint32_t words[4 * L];
#pragma unroll
    for (int l = 0; l < L; ++l) *reinterpret_cast<uint4*>(words + 4 * l) = __ldg(wv + g * L + l);
    const float s = __half2float(scale[g]);
    __align__(16) __half values[32];
#pragma unroll
    for (int i = 0; i < 32; ++i)
      values[i] = __float2half((float((words[i / per_word] >> (Bits * (i % per_word))) & mask) - offset) * s);
    uint4* dst = reinterpret_cast<uint4*>(out + g * 32);
#pragma unroll
    for (int i = 0; i < 4; ++i) dst[i] = reinterpret_cast<const uint4*>(values)[i];
  }
}

template <int Bits>
void DequantizePacked(DLTensor* w, DLTensor* scale, DLTensor* out) {
  const char* fn = Bits == 4 ? "lab.dequant.q4" : "lab.dequant.q8";
  constexpr int per_word = 32 / Bits;
  for (const DLTensor* t : {w, scale, out}) {
    if (t->device.device_type != kDLCUDA) TVM_FFI_THROW(ValueError) << fn << ": a tensor is not on a CUDA device";
    if (!IsCompact(t)) TVM_FFI_THROW(ValueError) << fn << ": a tensor is not compact";
  }
  if (w->dtype.code != kDLUInt || w->dtype.bits != 32 || scale->dtype.code != kDLFloat || scale->dtype.bits != 16 ||
      out->dtype.code != kDLFloat || out->dtype.bits != 16 || w->ndim != 2 || scale->ndim != 2 || out->ndim != 2)
    TVM_FFI_THROW(TypeError) << fn << ": expects q_weight uint32 [N, K/" << per_word
                             << "], q_scale float16 [N, K/32], out float16 [N, K]";
  const int64_t n = w->shape[0], k = w->shape[1] * per_word;
  if (scale->shape[0] != n || scale->shape[1] * 32 != k || out->shape[0] != n || out->shape[1] != k)
    TVM_FFI_THROW(ValueError) << fn << ": shapes do not agree (q_weight [" << n << ", " << w->shape[1]
                              << "], q_scale [" << scale->shape[0] << ", " << scale->shape[1] << "], out ["
                              << out->shape[0] << ", " << out->shape[1] << "])";
  const int64_t groups = n * (k / 32);
  if (groups == 0) return;
  const int device = w->device.device_id;
  auto stream = static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, device));
  int sms = 0;
  LAB_CHECK_CUDA(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  constexpr int threads = 256;
  const int64_t blocks = std::min<int64_t>((groups + threads - 1) / threads, int64_t(sms) * 16);
  Dequantize<Bits><<<unsigned(blocks), threads, 0, stream>>>(Data<uint32_t>(w), Data<__half>(scale),
                                                              Data<__half>(out), groups);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) TVM_FFI_THROW(RuntimeError) << fn << ": launch failed: " << cudaGetErrorString(err);
}

template <int Bits>
void GemvPacked(DLTensor* x, DLTensor* w, DLTensor* scale, DLTensor* out) {
  const char* fn = Bits == 4 ? "lab.gemv.q4" : "lab.gemv.q8";
  constexpr int per_word = 32 / Bits;
  for (const DLTensor* t : {x, w, scale, out}) {
    if (t->device.device_type != kDLCUDA) TVM_FFI_THROW(ValueError) << fn << ": a tensor is not on a CUDA device";
    if (!IsCompact(t)) TVM_FFI_THROW(ValueError) << fn << ": a tensor is not compact";
  }
  const bool f16 = [](DLDataType d) { return d.code == kDLFloat && d.bits == 16 && d.lanes == 1; }(x->dtype);
  if (!f16 || w->dtype.code != kDLUInt || w->dtype.bits != 32 || scale->dtype.bits != 16 || w->ndim != 2 ||
      scale->ndim != 2)
    TVM_FFI_THROW(TypeError) << fn << ": expects x float16, q_weight uint32 [N, K/" << per_word
                             << "], q_scale float16 [N, K/32]";
  const int64_t n = w->shape[0], k = w->shape[1] * per_word;
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
  const auto* xp = Data<__half>(x);
  const auto* wp = Data<uint32_t>(w);
  const auto* sp = Data<__half>(scale);
  if (f32) {
    Launch<Bits>(n, k, xp, wp, sp, Data<float>(out), device, stream);
  } else {
    Launch<Bits>(n, k, xp, wp, sp, Data<__half>(out), device, stream);
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) TVM_FFI_THROW(RuntimeError) << fn << ": launch failed: " << cudaGetErrorString(err);
}

}  // namespace

TVM_FFI_STATIC_INIT_BLOCK() {
  namespace refl = tvm::ffi::reflection;
  refl::GlobalDef().def("lab.gemv.q4", GemvPacked<4>);
  refl::GlobalDef().def("lab.gemv.q8", GemvPacked<8>);
  refl::GlobalDef().def("lab.dequant.q4", DequantizePacked<4>);
  refl::GlobalDef().def("lab.dequant.q8", DequantizePacked<8>);
}
