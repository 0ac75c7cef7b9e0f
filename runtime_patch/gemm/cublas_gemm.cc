// lab.gemm.nt(x, w, out): out = x @ w^T on the GPU with cuBLAS (tensor cores), for the prefill
// linears of engine/model.py (relax call_dps_packed). x [..., K] and w [N, K] are float16,
// out [..., N] is float16 or float32; accumulation is in float32, as in the TIR linears.
// The GEMM runs on the stream TVM's kernels use (TVMFFIEnvGetStream), so it is ordered with them.
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <dlpack/dlpack.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/c_env_api.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/reflection/registry.h>

#include <cstdint>
#include <string>
#include <unordered_map>

namespace {

const char* StatusName(cublasStatus_t s) {
  switch (s) {
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    default: return "cuBLAS error";
  }
}

#define CHECK_CUBLAS(expr)                                                             \
  do {                                                                                 \
    cublasStatus_t status_ = (expr);                                                   \
    if (status_ != CUBLAS_STATUS_SUCCESS)                                              \
      TVM_FFI_THROW(RuntimeError) << #expr << " failed: " << StatusName(status_);      \
  } while (0)

// One handle per (thread, device): cuBLAS handles are not thread-safe, and a disco worker is one
// thread on one device.
cublasHandle_t Handle(int device) {
  thread_local std::unordered_map<int, cublasHandle_t> handles;
  auto it = handles.find(device);
  if (it != handles.end()) return it->second;
  int previous = 0;
  cudaGetDevice(&previous);
  cudaSetDevice(device);
  cublasHandle_t handle = nullptr;
  CHECK_CUBLAS(cublasCreate(&handle));
  cudaSetDevice(previous);
  handles.emplace(device, handle);
  return handle;
}

bool IsCompact(const DLTensor* t) {
  if (t->strides == nullptr) return true;
  int64_t expected = 1;
  for (int i = t->ndim - 1; i >= 0; --i) {
    if (t->shape[i] != 1 && t->strides[i] != expected) return false;
    expected *= t->shape[i];
  }
  return true;
}

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

const void* Data(const DLTensor* t) { return static_cast<const char*>(t->data) + t->byte_offset; }

void GemmNT(DLTensor* x, DLTensor* w, DLTensor* out) {
  Check(x, "x", false);
  Check(w, "w", false);
  Check(out, "out", true);
  if (w->ndim != 2) TVM_FFI_THROW(ValueError) << "lab.gemm.nt: w must be [N, K]";
  const int64_t n = w->shape[0], k = w->shape[1];
  int64_t m = 1;
  for (int i = 0; i < x->ndim - 1; ++i) m *= x->shape[i];
  int64_t m_out = 1;
  for (int i = 0; i < out->ndim - 1; ++i) m_out *= out->shape[i];
  if (x->shape[x->ndim - 1] != k || out->shape[out->ndim - 1] != n || m_out != m)
    TVM_FFI_THROW(ValueError) << "lab.gemm.nt: shapes do not agree (x [.., " << x->shape[x->ndim - 1]
                              << "], w [" << n << ", " << k << "], out [.., " << out->shape[out->ndim - 1]
                              << "], rows " << m << " vs " << m_out << ")";
  if (m == 0) return;
  const int device = x->device.device_id;
  cublasHandle_t handle = Handle(device);
  auto stream = static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, device));
  CHECK_CUBLAS(cublasSetStream(handle, stream));
  // Row-major out[m, n] = x[m, k] w[n, k]^T is column-major out^T[n, m] = w^T^T[n, k] x^T[k, m].
  const float alpha = 1.0f, beta = 0.0f;
  const cudaDataType_t out_type = out->dtype.bits == 32 ? CUDA_R_32F : CUDA_R_16F;
  CHECK_CUBLAS(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(n), static_cast<int>(m),
                            static_cast<int>(k), &alpha, Data(w), CUDA_R_16F, static_cast<int>(k), Data(x),
                            CUDA_R_16F, static_cast<int>(k), &beta, const_cast<void*>(Data(out)), out_type,
                            static_cast<int>(n), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

}  // namespace

TVM_FFI_STATIC_INIT_BLOCK() {
  namespace refl = tvm::ffi::reflection;
  refl::GlobalDef().def("lab.gemm.nt", GemmNT);
}
