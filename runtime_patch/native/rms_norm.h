// The RMSNorm pieces shared by the kernels that normalise a row (lab.norm.rms, rms_norm.cu; the
// one-shot allreduce's add-and-norm, oneshot_allreduce.cu): 16-byte vectors of float16, bfloat16
// or float32 as floats, a block's inverse RMS of a row, and the normalised vector rounded as
// transformers' LlamaRMSNorm rounds (x / rms to the dtype, then times the weight, to the dtype).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace lab {
namespace norm {

// The element types: a 16-byte vector as floats, and back (rounded to nearest even).
template <typename T>
struct Lanes;

template <>
struct Lanes<float> {
  static constexpr int N = 4;
  __device__ static void Unpack(uint4 v, float* f) {
    f[0] = __uint_as_float(v.x), f[1] = __uint_as_float(v.y), f[2] = __uint_as_float(v.z), f[3] = __uint_as_float(v.w);
  }
  __device__ static uint4 Pack(const float* f) {
    return make_uint4(__float_as_uint(f[0]), __float_as_uint(f[1]), __float_as_uint(f[2]), __float_as_uint(f[3]));
  }
};

// Unpack and Pack of the two-byte types, a 32-bit word holding two values: over the type's own
// Lo / Hi (the word's halves as floats) and Two (two floats as a word), which `Halves` (the type's
// Lanes) defines.
template <class Halves>
struct PairedLanes {
  static constexpr int N = 8;
  __device__ static void Unpack(uint4 v, float* f) {
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) f[2 * k] = Halves::Lo(w[k]), f[2 * k + 1] = Halves::Hi(w[k]);
  }
  __device__ static uint4 Pack(const float* f) {
    return make_uint4(Halves::Two(f[0], f[1]), Halves::Two(f[2], f[3]), Halves::Two(f[4], f[5]),
                      Halves::Two(f[6], f[7]));
  }
};

template <>
struct Lanes<__half> : PairedLanes<Lanes<__half>> {
  __device__ static float Lo(uint32_t w) { return __half2float(__ushort_as_half(uint16_t(w & 0xFFFF))); }
  __device__ static float Hi(uint32_t w) { return __half2float(__ushort_as_half(uint16_t(w >> 16))); }
  __device__ static uint32_t Two(float lo, float hi) {
    return uint32_t(__half_as_ushort(__float2half_rn(lo))) | (uint32_t(__half_as_ushort(__float2half_rn(hi))) << 16);
  }
};

template <>
struct Lanes<__nv_bfloat16> : PairedLanes<Lanes<__nv_bfloat16>> {
  __device__ static float Lo(uint32_t w) { return __uint_as_float(w << 16); }          // exact
  __device__ static float Hi(uint32_t w) { return __uint_as_float(w & 0xFFFF0000u); }  // exact
  __device__ static uint32_t Two(float lo, float hi) {
    return uint32_t(__bfloat16_as_ushort(__float2bfloat16_rn(lo))) |
           (uint32_t(__bfloat16_as_ushort(__float2bfloat16_rn(hi))) << 16);
  }
};

// 1 / sqrt(mean square + eps) of a row whose `elements` squares the block's threads hold between them.
__device__ inline float InverseRms(float squares, int64_t elements, float eps, float* shared) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) squares += __shfl_xor_sync(0xffffffffu, squares, offset);
  if (threadIdx.x % 32 == 0) shared[threadIdx.x / 32] = squares;
  __syncthreads();
  squares = 0.f;
  for (int w = 0; w < int(blockDim.x + 31) / 32; ++w) squares += shared[w];
  return rsqrtf(squares / float(elements) + eps);
}

// T(T(x * inverse) * weight)
template <typename T>
__device__ uint4 Normalised(uint4 x_packed, uint4 weight, float inverse) {
  constexpr int N = Lanes<T>::N;
  float x[N], w[N];
  Lanes<T>::Unpack(x_packed, x);
  Lanes<T>::Unpack(weight, w);
#pragma unroll
  for (int k = 0; k < N; ++k) x[k] *= inverse;
  Lanes<T>::Unpack(Lanes<T>::Pack(x), x);
#pragma unroll
  for (int k = 0; k < N; ++k) x[k] *= w[k];
  return Lanes<T>::Pack(x);
}

}  // namespace norm
}  // namespace lab
