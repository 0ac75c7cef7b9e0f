// lab.gemm.nt(x, w, out): out = x @ w^T on the GPU with cuBLAS (tensor cores), for the prefill
// linears of engine/model.py (relax call_dps_packed). x [..., K] and w [N, K] are float16,
// out [..., N] is float16 or float32; accumulation is in float32, as in the TIR linears.
// (The prefill's residual adds come with the RMSNorm after them: lab.norm.add_rms, rms_norm.cu.)
// The GEMMs run on the stream TVM's kernels use (TVMFFIEnvGetStream), so they are ordered with them.
#include <cublas_v2.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <dlpack/dlpack.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/c_env_api.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/reflection/registry.h>

#include <cstdint>

#include "cublas_gemm.h"
#include "cuda_common.h"

namespace lab {

void CublasGemmNT(int device, cudaStream_t stream, int64_t m, int64_t n, int64_t k, const __half* x, const __half* w,
                  void* out, bool out_f32) {
  cublasHandle_t handle = CublasHandle(device);
  LAB_CHECK_CUBLAS(cublasSetStream(handle, stream));
  // Row-major out[m, n] = x[m, k] w[n, k]^T is column-major out^T[n, m] = w^T^T[n, k] x^T[k, m].
  const float alpha = 1.0f, beta = 0.0f;
  LAB_CHECK_CUBLAS(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(n), static_cast<int>(m),
                                static_cast<int>(k), &alpha, w, CUDA_R_16F, static_cast<int>(k), x, CUDA_R_16F,
                                static_cast<int>(k), &beta, out, out_f32 ? CUDA_R_32F : CUDA_R_16F,
                                static_cast<int>(n), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

}  // namespace lab

namespace {

using lab::Data;
using lab::IsCompact;

void Check(const DLTensor* t, const char* role, bool allow_f32) {
  if (t->device.device_type != kDLCUDA)
    TVM_FFI_THROW(ValueError) << "lab.gemm.nt: " << role << " is not on a CUDA device";
  bool f16 = t->dtype.code == kDLFloat && t->dtype.bits == 16 && t->dtype.lanes == 1;
  bool f32 = t->dtype.code == kDLFloat && t->dtype.bits == 32 && t->dtype.lanes == 1;
  if (!(f16 || (allow_f32 && f32)))
    TVM_FFI_THROW(TypeError) << "lab.gemm.nt: " << role << " must be float16"
                             << (allow_f32 ? " or float32" : "");
  if (!IsCompact(t)) TVM_FFI_THROW(ValueError) << "lab.gemm.nt: " << role << " is not compact";
  if (t->ndim < 1) TVM_FFI_THROW(ValueError) << "lab.gemm.nt: " << role << " is a scalar";
}

void GemmNT(DLTensor* x, DLTensor* w, DLTensor* out) {
  Check(x, "x", false);
  Check(w, "w", false);
  Check(out, "out", true);
  if (w->ndim != 2) TVM_FFI_THROW(ValueError) << "lab.gemm.nt: w must be [N, K]";
  const int64_t n = w->shape[0], k = w->shape[1];
  const int64_t m = lab::Rows(x), m_out = lab::Rows(out);
  if (x->shape[x->ndim - 1] != k || out->shape[out->ndim - 1] != n || m_out != m)
    TVM_FFI_THROW(ValueError) << "lab.gemm.nt: shapes do not agree (x [.., " << x->shape[x->ndim - 1]
                              << "], w [" << n << ", " << k << "], out [.., " << out->shape[out->ndim - 1]
                              << "], rows " << m << " vs " << m_out << ")";
  if (m == 0) return;
  const int device = x->device.device_id;
  lab::CublasGemmNT(device, static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, device)), m, n, k, Data<__half>(x),
                    Data<__half>(w), Data<void>(out), out->dtype.bits == 32);
}

}  // namespace

TVM_FFI_STATIC_INIT_BLOCK() {
  namespace refl = tvm::ffi::reflection;
  refl::GlobalDef().def("lab.gemm.nt", GemmNT);
}
