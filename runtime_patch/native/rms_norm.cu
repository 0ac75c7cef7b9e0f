// lab.norm.rms(x, weight, eps, out): out = rms_norm(x) * weight over the last dimension, rounded as
// transformers' LlamaRMSNorm (rms_norm.h): the decode steps' RMSNorms (decode_norm=library,
// engine.model.kernels.RMSNorm). x and out [.., hidden] float16, bfloat16 or float32 (the same),
// weight [hidden] of that dtype; rows of a multiple of 16 bytes, at most kNormThreads x
// kNormVectors vectors; every tensor 16-byte aligned.
//
// A block per row. Each thread loads its 16-byte vectors of the weight, then of the row, without
// waiting in between, so the row's one memory round trip covers both; the squares are summed in
// float32 over the block (one barrier), and each thread writes its normalised vectors. TVM's kernel for Llama-3-8B's
// 4096-wide row (1024 threads of 2-byte loads, the weight read only after the reduction's
// barriers: two round trips) took 1.9-2.0 us in a traced decode step, 65 of them a step. The
// kernel is launched while the kernel ahead (a GEMV, which allows it) still runs
// (lab::LaunchAfterPrevious): its block loads the weight (a constant) before lab::WaitForPrevious,
// the row (the GEMV's output) after, so the norm's launch and its first round trip hide under the
// GEMV's last blocks. It lets its own successor launch at once (lab::AllowNext): the qkv and gate_up
// GEMVs after it, which wait for it before anything (quant_gemv.cu), are resident when it ends.
// (Letting them start only once its own wait has returned, with their first weight loads issued
// before theirs to stream while the norm runs, lost: q4f16_1 604 against 628 tokens/s; the late
// start alone was neutral. docs/BENCHMARKS.md, thirteenth round.)
#include <cuda_bf16.h>
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
#include "rms_norm.h"

namespace {

using lab::Data;
using lab::norm::InverseRms;
using lab::norm::Lanes;
using lab::norm::Normalised;

constexpr int kNormThreads = 512;  // threads per block, at most (one vector each of a 4096-wide float16 row)
constexpr int kNormVectors = 4;    // vectors of a row a thread holds, at most

template <typename T>
__global__ void __launch_bounds__(kNormThreads) RmsNormRows(const uint4* __restrict__ x,
                                                            const uint4* __restrict__ weight,
                                                            uint4* __restrict__ out, int row_vectors, float eps) {
  __shared__ float shared_squares[kNormThreads / 32];
  constexpr int N = Lanes<T>::N;
  const int64_t first = int64_t(blockIdx.x) * row_vectors;
  uint4 v[kNormVectors], w[kNormVectors];
  lab::AllowNext();  // the GEMV after it may launch now (it waits for this norm before reading anything)
#pragma unroll
  for (int k = 0; k < kNormVectors; ++k) {
    const int i = threadIdx.x + k * blockDim.x;
    if (i < row_vectors) w[k] = __ldg(weight + i);
  }
  lab::WaitForPrevious();
#pragma unroll
  for (int k = 0; k < kNormVectors; ++k) {
    const int i = threadIdx.x + k * blockDim.x;
    if (i < row_vectors) v[k] = x[first + i];
  }
  float squares = 0.f;
#pragma unroll
  for (int k = 0; k < kNormVectors; ++k) {
    if (threadIdx.x + k * blockDim.x >= row_vectors) break;
    float f[N];
    Lanes<T>::Unpack(v[k], f);
#pragma unroll
    for (int n = 0; n < N; ++n) squares += f[n] * f[n];
  }
  const float inverse = InverseRms(squares, int64_t(row_vectors) * N, eps, shared_squares);
#pragma unroll
  for (int k = 0; k < kNormVectors; ++k) {
    const int i = threadIdx.x + k * blockDim.x;
    if (i < row_vectors) out[first + i] = Normalised<T>(v[k], w[k], inverse);
  }
}

void RmsNorm(DLTensor* x, DLTensor* weight, double eps, DLTensor* out) {
  const char* fn = "lab.norm.rms";
  lab::CheckOnGpuCompact(fn, {x, weight, out});
  const DLDataType t = x->dtype;
  const bool f16 = t.code == kDLFloat && t.bits == 16, bf16 = t.code == kDLBfloat && t.bits == 16,
             f32 = t.code == kDLFloat && t.bits == 32;
  auto same = [&](const DLTensor* o) { return o->dtype.code == t.code && o->dtype.bits == t.bits && o->dtype.lanes == 1; };
  if (!(f16 || bf16 || f32) || t.lanes != 1 || !same(weight) || !same(out))
    TVM_FFI_THROW(TypeError) << fn << ": x, weight and out must all be float16, bfloat16 or float32";
  const int64_t hidden = x->ndim > 0 ? x->shape[x->ndim - 1] : 0;
  bool shapes = x->ndim > 0 && out->ndim == x->ndim && weight->ndim == 1 && weight->shape[0] == hidden;
  for (int i = 0; shapes && i < x->ndim; ++i) shapes = out->shape[i] == x->shape[i];
  if (!shapes)
    TVM_FFI_THROW(ValueError) << fn << ": x [.., hidden], weight [hidden] and out (x's shape) do not agree";
  const int64_t row_bytes = hidden * (t.bits / 8), row_vectors = row_bytes / 16;
  if (row_bytes % 16 != 0 || row_vectors > int64_t(kNormThreads) * kNormVectors)
    TVM_FFI_THROW(ValueError) << fn << ": rows of " << row_bytes << " bytes; the kernel takes a multiple of 16 up to "
                              << kNormThreads * kNormVectors * 16 << " (build with decode_norm=tir)";
  for (const DLTensor* p : {x, weight, out})
    if (reinterpret_cast<uintptr_t>(Data<char>(p)) % 16 != 0)
      TVM_FFI_THROW(ValueError) << fn << ": x, weight and out must be 16-byte aligned";
  const int64_t rows = lab::Rows(x);
  if (rows == 0 || row_vectors == 0) return;
  const int device = x->device.device_id;
  auto stream = static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, device));
  const unsigned threads = unsigned(std::min<int64_t>(kNormThreads, (row_vectors + 31) / 32 * 32));
  auto kernel = f16 ? RmsNormRows<__half> : bf16 ? RmsNormRows<__nv_bfloat16> : RmsNormRows<float>;
  const uint4* x_data = Data<uint4>(x);
  const uint4* weight_data = Data<uint4>(weight);
  uint4* out_data = Data<uint4>(out);
  int row_vectors32 = int(row_vectors);
  float eps32 = float(eps);
  void* args[] = {&x_data, &weight_data, &out_data, &row_vectors32, &eps32};
  LAB_CHECK_CUDA(lab::LaunchAfterPrevious(reinterpret_cast<const void*>(kernel), dim3(unsigned(rows)), dim3(threads), 0,
                                          stream, args, lab::Facts(device).major));
}

}  // namespace

TVM_FFI_STATIC_INIT_BLOCK() {
  namespace refl = tvm::ffi::reflection;
  refl::GlobalDef().def("lab.norm.rms", RmsNorm);
}
