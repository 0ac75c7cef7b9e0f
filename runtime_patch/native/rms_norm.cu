// lab.norm.rms(x, weight, eps, out): out = rms_norm(x) * weight over the last dimension, rounded as
// transformers' LlamaRMSNorm (rms_norm.h): the decode steps' RMSNorms (decode_norm=library,
// engine.model.kernels.RMSNorm; in a batch-1 step with the library GEMVs at tp=1 only the first
// layer's, the others split over the GEMVs around them: quant_gemv.cu, NormSums) and the library
// prefill's first.
// lab.norm.add_rms(partial, residual, weight, eps, total, normed): total = residual + partial
// rounded to the dtype (transformers' residual add), normed = rms_norm(total) * weight: the
// library prefill's residual adds at tp=1, each with the norm after it (engine.model.llama), in
// one pass (NormRows): a GEMM's output and the residual read once, the sum and its norm written.
// x and out [.., hidden] float16, bfloat16 or float32 (the same), weight [hidden] of that dtype;
// rows of a multiple of 16 bytes, at most kNormThreads x kNormVectors vectors; every tensor
// 16-byte aligned.
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
// start alone was neutral. docs/BENCHMARKS.md, thirteenth round. Letting them start once the row
// has been read, on an SM of the norm's own, lost 0.8% alone (639.2-639.4 against 644.2-644.9)
// and 12% with their weights by bulk copies before their wait; eighteenth round.)
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
#include <initializer_list>
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

// Many rows (a prefill's): a block of 128 threads per row, V vectors a thread (4 for a 4096-wide
// float16 row), so that 16 rows an SM are resident where the 512-thread blocks above keep 4 (their
// load, reduction and store per row in turn: 34 us a norm of 4096 rows of 4096 on an H200; a warp
// per row, 16 vectors a lane, needed 154 registers and reached only 24). With Add, total =
// residual + partial (rounded to T, as transformers' residual add) is written and normalised (the
// add and the norm after it in one pass). V = 0: rows of any length, each thread's sums written
// first and read back for the norm. The weight is read after the reduction (L1/L2: the same for
// every row). The same rounding as RmsNormRows.
constexpr int kRowThreads = 128;

template <typename T, int V, bool Add>
__global__ void __launch_bounds__(kRowThreads) NormRows(const uint4* __restrict__ x, const uint4* __restrict__ residual,
                                                       const uint4* __restrict__ weight, uint4* total,
                                                       uint4* __restrict__ normed, int row_vectors, float eps) {
  __shared__ float shared_squares[kRowThreads / 32];
  constexpr int N = Lanes<T>::N;
  constexpr int kHeld = V > 0 ? V : 1;
  const int64_t first = int64_t(blockIdx.x) * row_vectors;
  lab::WaitForPrevious();
  uint4 v[kHeld], r[kHeld];
  float squares = 0.f;
  // v (with Add: v + r, stored to total) as floats, its squares counted
  auto settle = [&](uint4 row, uint4 res, int i) {
    float a[N];
    Lanes<T>::Unpack(row, a);
    if constexpr (Add) {
      float b[N];
      Lanes<T>::Unpack(res, b);
#pragma unroll
      for (int n = 0; n < N; ++n) a[n] += b[n];
      row = Lanes<T>::Pack(a);
      total[first + i] = row;
      Lanes<T>::Unpack(row, a);
    }
#pragma unroll
    for (int n = 0; n < N; ++n) squares += a[n] * a[n];
    return row;
  };
  if constexpr (V > 0) {
    // every load issued before the first store (total may be x or residual, so a load after a
    // store would wait for it)
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const int i = threadIdx.x + kRowThreads * k;
      if (i < row_vectors) {
        v[k] = x[first + i];
        if constexpr (Add) r[k] = residual[first + i];
      }
    }
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const int i = threadIdx.x + kRowThreads * k;
      if (i < row_vectors) v[k] = settle(v[k], r[k], i);
    }
  } else {
    for (int i = threadIdx.x; i < row_vectors; i += kRowThreads)
      settle(x[first + i], Add ? residual[first + i] : uint4{}, i);
  }
  const float inverse = InverseRms(squares, int64_t(row_vectors) * N, eps, shared_squares);
  if constexpr (V > 0) {
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const int i = threadIdx.x + kRowThreads * k;
      if (i < row_vectors) normed[first + i] = Normalised<T>(v[k], __ldg(weight + i), inverse);
    }
  } else {
    for (int i = threadIdx.x; i < row_vectors; i += kRowThreads)  // this thread's own values, read back
      normed[first + i] = Normalised<T>(Add ? total[first + i] : x[first + i], __ldg(weight + i), inverse);
  }
}

// NormRows of T for rows of `row_vectors`: V the threads' share rounded up to 1, 2, 4 or 8, else 0
template <typename T, bool Add>
const void* NormRowsKernel(int64_t row_vectors) {
  if (row_vectors <= kRowThreads * 1) return reinterpret_cast<const void*>(NormRows<T, 1, Add>);
  if (row_vectors <= kRowThreads * 2) return reinterpret_cast<const void*>(NormRows<T, 2, Add>);
  if (row_vectors <= kRowThreads * 4) return reinterpret_cast<const void*>(NormRows<T, 4, Add>);
  if (row_vectors <= kRowThreads * 8) return reinterpret_cast<const void*>(NormRows<T, 8, Add>);
  return reinterpret_cast<const void*>(NormRows<T, 0, Add>);
}

template <bool Add>
void LaunchNormRows(DLDataType t, int64_t rows, int64_t row_vectors, const uint4* x, const uint4* residual,
                    const uint4* weight, uint4* total, uint4* normed, float eps, cudaStream_t stream, int device) {
  const bool f16 = t.code == kDLFloat && t.bits == 16, bf16 = t.code == kDLBfloat && t.bits == 16;
  const void* kernel = f16 ? NormRowsKernel<__half, Add>(row_vectors)
                       : bf16 ? NormRowsKernel<__nv_bfloat16, Add>(row_vectors) : NormRowsKernel<float, Add>(row_vectors);
  int row_vectors32 = int(row_vectors);
  void* args[] = {&x, &residual, &weight, &total, &normed, &row_vectors32, &eps};
  LAB_CHECK_CUDA(lab::LaunchAfterPrevious(kernel, dim3(unsigned(rows)), dim3(kRowThreads), 0, stream, args,
                                          lab::Facts(device).major));
}

// From this many rows on, NormRows (a prefill's; a decode step's 1-64 rows keep the 512-thread
// kernel, which overlaps the GEMV ahead of it)
constexpr int64_t kNormRowsFrom = 512;

// What both functions check of their tensors: `rowed` ([.., hidden], one shape: the first's) and
// `weight` [hidden] on the GPU, compact, of one type (float16, bfloat16 or float32) and 16-byte
// aligned; `names` names them all in the errors. Returns the type and a row's bytes.
struct NormTensors {
  DLDataType type;
  int64_t row_bytes;
};

NormTensors CheckNormTensors(const char* fn, const char* names, std::initializer_list<const DLTensor*> rowed,
                             const DLTensor* weight) {
  const DLTensor* first = *rowed.begin();
  lab::CheckOnGpuCompact(fn, rowed);
  lab::CheckOnGpuCompact(fn, {weight});
  const DLDataType t = first->dtype;
  const bool floats = (t.code == kDLFloat && (t.bits == 16 || t.bits == 32)) || (t.code == kDLBfloat && t.bits == 16);
  auto same = [&](const DLTensor* o) { return o->dtype.code == t.code && o->dtype.bits == t.bits && o->dtype.lanes == 1; };
  bool types = floats && t.lanes == 1 && same(weight);
  for (const DLTensor* o : rowed) types = types && same(o);
  if (!types) TVM_FFI_THROW(TypeError) << fn << ": " << names << " must all be float16, bfloat16 or float32";
  const int64_t hidden = first->ndim > 0 ? first->shape[first->ndim - 1] : 0;
  bool shapes = first->ndim > 0 && weight->ndim == 1 && weight->shape[0] == hidden;
  for (const DLTensor* o : rowed) {
    shapes = shapes && o->ndim == first->ndim;
    for (int i = 0; shapes && i < first->ndim; ++i) shapes = o->shape[i] == first->shape[i];
  }
  if (!shapes)
    TVM_FFI_THROW(ValueError) << fn << ": " << names
                              << " do not agree (weight [hidden], the others [.., hidden] of one shape)";
  auto aligned = [](const DLTensor* p) { return reinterpret_cast<uintptr_t>(Data<char>(p)) % 16 == 0; };
  bool all_aligned = aligned(weight);
  for (const DLTensor* p : rowed) all_aligned = all_aligned && aligned(p);
  if (!all_aligned) TVM_FFI_THROW(ValueError) << fn << ": " << names << " must be 16-byte aligned";
  return {t, hidden * (t.bits / 8)};
}

void RmsNorm(DLTensor* x, DLTensor* weight, double eps, DLTensor* out) {
  const char* fn = "lab.norm.rms";
  const auto [t, row_bytes] = CheckNormTensors(fn, "x, weight and out", {x, out}, weight);
  const bool f16 = t.code == kDLFloat && t.bits == 16, bf16 = t.code == kDLBfloat && t.bits == 16;
  const int64_t row_vectors = row_bytes / 16;
  if (row_bytes % 16 != 0 || row_vectors > int64_t(kNormThreads) * kNormVectors)
    TVM_FFI_THROW(ValueError) << fn << ": rows of " << row_bytes << " bytes; the kernel takes a multiple of 16 up to "
                              << kNormThreads * kNormVectors * 16 << " (build with decode_norm=tir)";
  const int64_t rows = lab::Rows(x);
  if (rows == 0 || row_vectors == 0) return;
  const int device = x->device.device_id;
  auto stream = static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, device));
  if (rows >= kNormRowsFrom && row_vectors <= int64_t(kRowThreads) * 8) {
    LaunchNormRows<false>(t, rows, row_vectors, Data<uint4>(x), nullptr, Data<uint4>(weight), nullptr, Data<uint4>(out),
                          float(eps), stream, device);
    return;
  }
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

void AddRmsNorm(DLTensor* partial, DLTensor* residual, DLTensor* weight, double eps, DLTensor* total,
                DLTensor* normed) {
  const char* fn = "lab.norm.add_rms";
  const auto [t, row_bytes] =
      CheckNormTensors(fn, "partial, residual, weight, total and normed", {partial, residual, total, normed}, weight);
  const int64_t row_vectors = row_bytes / 16;
  if (row_bytes % 16 != 0 || row_vectors > INT32_MAX)
    TVM_FFI_THROW(ValueError) << fn << ": rows of " << row_bytes << " bytes; the kernel takes a multiple of 16";
  const int64_t rows = lab::Rows(partial);
  if (rows == 0 || row_vectors == 0) return;
  const int device = partial->device.device_id;
  auto stream = static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, device));
  if (rows > INT32_MAX) TVM_FFI_THROW(ValueError) << fn << ": " << rows << " rows; at most 2^31 - 1";
  LaunchNormRows<true>(t, rows, row_vectors, Data<uint4>(partial), Data<uint4>(residual), Data<uint4>(weight),
                       Data<uint4>(total), Data<uint4>(normed), float(eps), stream, device);
}

}  // namespace

TVM_FFI_STATIC_INIT_BLOCK() {
  namespace refl = tvm::ffi::reflection;
  refl::GlobalDef().def("lab.norm.rms", RmsNorm);
  refl::GlobalDef().def("lab.norm.add_rms", AddRmsNorm);
}
