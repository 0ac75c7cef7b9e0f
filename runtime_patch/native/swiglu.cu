// lab.swiglu(gate_up, out): out [.., I] = silu(gate) * up of gate_up [.., 2I] = [gate, up], float16:
// the SiLU after the prefill's library gate_up GEMM (engine.model.kernels.Linear.swiglu). Rounded
// as transformers' LlamaMLP computes it in float16 (torch's silu and mul): h = fp16(silu(float(gate))),
// out = fp16(float(h) * float(up)), silu(g) = g / (1 + exp(-g)) in float32 (IEEE division and
// expf: torch's kernel is not built with fast math either).
//
// Memory-bound: each element of gate_up is read once and each of out written once, in 16-byte
// vectors (8 values), by a grid that fills the GPU (its resident blocks) and strides over the
// vectors. TVM's fused split/silu/multiply kernel took 244 us for a 4096-token Llama-3-8B prefill
// on an H200 (352 MB moved: ~75 us at the bandwidth).
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
#include "half_bits.h"

namespace {

using lab::Data;

constexpr int kSwigluThreads = 256;

__device__ __forceinline__ uint32_t SwigluPair(uint32_t gate_bits, uint32_t up_bits) {
  const float2 g = __half22float2(lab::AsHalf2(gate_bits));
  const float2 u = __half22float2(lab::AsHalf2(up_bits));
  // silu rounded to float16 first, as torch's silu returns it, then the product rounded again
  const float2 h = __half22float2(__floats2half2_rn(g.x / (1.f + expf(-g.x)), g.y / (1.f + expf(-g.y))));
  return lab::AsBits(__floats2half2_rn(h.x * u.x, h.y * u.y));
}

// Vector t of out (row t / half_vectors, vector t % half_vectors of it) from the row's gate vector
// and its up vector half_vectors further. Index is 32-bit where the vector count allows (its
// division is a few instructions, a 64-bit one a call).
template <typename Index>
__global__ void __launch_bounds__(kSwigluThreads) SwigluRows(const uint4* __restrict__ gate_up,
                                                             uint4* __restrict__ out, Index total,
                                                             Index half_vectors) {
  for (Index t = Index(blockIdx.x) * kSwigluThreads + threadIdx.x; t < total; t += Index(gridDim.x) * kSwigluThreads) {
    const Index row = t / half_vectors, j = t - row * half_vectors;
    const uint4* in = gate_up + row * 2 * half_vectors + j;
    const uint4 g = __ldg(in), u = __ldg(in + half_vectors);
    out[t] = make_uint4(SwigluPair(g.x, u.x), SwigluPair(g.y, u.y), SwigluPair(g.z, u.z), SwigluPair(g.w, u.w));
  }
}

template <typename Index>
void Launch(const uint4* gate_up, uint4* out, int64_t total, int64_t half_vectors, int device, cudaStream_t stream) {
  const auto kernel = SwigluRows<Index>;
  const int64_t blocks = lab::GridStrideBlocks(reinterpret_cast<const void*>(kernel), kSwigluThreads, total, device);
  kernel<<<unsigned(blocks), kSwigluThreads, 0, stream>>>(gate_up, out, Index(total), Index(half_vectors));
  lab::CheckLaunch("lab.swiglu");
}

void Swiglu(DLTensor* gate_up, DLTensor* out) {
  const char* fn = "lab.swiglu";
  lab::CheckOnGpuCompact(fn, {gate_up, out});
  if (!lab::IsHalf(gate_up->dtype) || !lab::IsHalf(out->dtype))
    TVM_FFI_THROW(TypeError) << fn << ": gate_up and out must be float16";
  const int64_t width = gate_up->ndim > 0 ? gate_up->shape[gate_up->ndim - 1] : 0;
  bool shapes = gate_up->ndim > 0 && out->ndim == gate_up->ndim && out->shape[out->ndim - 1] * 2 == width;
  for (int i = 0; shapes && i + 1 < gate_up->ndim; ++i) shapes = out->shape[i] == gate_up->shape[i];
  if (!shapes)
    TVM_FFI_THROW(ValueError) << fn << ": gate_up [.., 2I] and out [.., I] do not agree (gate_up's last dimension "
                              << width << ")";
  const int64_t half = width / 2;
  if (half % 8 != 0)
    TVM_FFI_THROW(ValueError) << fn << ": I = " << half << " is not a multiple of 8 (16-byte vectors of float16)";
  for (const DLTensor* t : {gate_up, out})
    if (reinterpret_cast<uintptr_t>(Data<char>(t)) % 16 != 0)
      TVM_FFI_THROW(ValueError) << fn << ": gate_up and out must be 16-byte aligned";
  const int64_t rows = lab::Rows(out), half_vectors = half / 8, total = rows * half_vectors;
  if (total == 0) return;
  const int device = out->device.device_id;
  auto stream = static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, device));
  // a 32-bit index where it covers gate_up's vectors (2 total) and the grid's last stride past the
  // end (at most total + kSwigluThreads: the grid has no more blocks than the vectors need)
  if (2 * total < (int64_t(1) << 31))
    Launch<uint32_t>(Data<uint4>(gate_up), Data<uint4>(out), total, half_vectors, device, stream);
  else
    Launch<uint64_t>(Data<uint4>(gate_up), Data<uint4>(out), total, half_vectors, device, stream);
}

}  // namespace

TVM_FFI_STATIC_INIT_BLOCK() {
  namespace refl = tvm::ffi::reflection;
  refl::GlobalDef().def("lab.swiglu", Swiglu);
}
