// lab.gemm.nt(x, w, out): out = x @ w^T on the GPU with cuBLAS (tensor cores), for the prefill
// linears of engine/model.py (relax call_dps_packed). x [..., K] and w [N, K] are float16,
// out [..., N] is float16 or float32; accumulation is in float32, as in the TIR linears.
// lab.gemm.nt_add(x, w, residual, out): out = residual + x @ w^T, all float16, with cuBLASLt: the
// residual is the GEMM's C (beta = 1), added to the float32 sums before the one rounding to out (the
// prefill's o and down projections at tp=1, engine.model.kernels.Linear.plus: no add kernel
// after them; TVM's took 63 us each for a 4096-token Llama-3-8B prefill on an H200).
// The GEMMs run on the stream TVM's kernels use (TVMFFIEnvGetStream), so they are ordered with them.
#include <cublasLt.h>
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
#include <map>
#include <memory>
#include <tuple>

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

// cuBLASLt's handle and workspace of a (thread, device): a disco worker is one thread on one device,
// whose calls are ordered on its one stream, so they never use the workspace at once. The heuristic
// only offers algorithms whose scratch fits the workspace (kLtWorkspaceBytes, allocated once:
// split-K ones need some).
constexpr size_t kLtWorkspaceBytes = size_t(32) << 20;

struct LtDevice {
  cublasLtHandle_t handle = nullptr;
  void* workspace = nullptr;
};

LtDevice& Lt(int device) {
  thread_local std::map<int, LtDevice> devices;
  auto it = devices.find(device);
  if (it != devices.end()) return it->second;
  int previous = 0;
  LAB_CHECK_CUDA(cudaGetDevice(&previous));
  LAB_CHECK_CUDA(cudaSetDevice(device));
  LtDevice d;
  LAB_CHECK_CUBLAS(cublasLtCreate(&d.handle));
  LAB_CHECK_CUDA(cudaMalloc(&d.workspace, kLtWorkspaceBytes));
  LAB_CHECK_CUDA(cudaSetDevice(previous));
  return devices.emplace(device, d).first->second;
}

// The descriptors and the heuristic's algorithm of one GEMM shape, made at its first call (~tens of
// us of host time) and kept: a prefill calls the same few shapes 64 times.
struct LtPlan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulAlgo_t algo{};
  ~LtPlan() {
    if (c != nullptr) cublasLtMatrixLayoutDestroy(c);
    if (b != nullptr) cublasLtMatrixLayoutDestroy(b);
    if (a != nullptr) cublasLtMatrixLayoutDestroy(a);
    if (desc != nullptr) cublasLtMatmulDescDestroy(desc);
  }
};

constexpr size_t kMaxLtPlans = 256;  // shapes kept per thread (the rows vary with the prompt); then all dropped

// Row-major out[m, n] = residual[m, n] + x[m, k] w[n, k]^T is column-major out^T = w^T^T x^T + residual^T:
// A = w as a k x n column-major matrix (ld k) transposed, B = x as k x m (ld k), C = D = n x m (ld n).
// `alignment`: the bytes every pointer is a multiple of (at most 16), which the algorithm may assume.
const LtPlan& PlanFor(int device, const LtDevice& lt, int64_t m, int64_t n, int64_t k, uint32_t alignment) {
  thread_local std::map<std::tuple<int, int64_t, int64_t, int64_t, uint32_t>, std::unique_ptr<LtPlan>> plans;
  const auto key = std::make_tuple(device, m, n, k, alignment);
  if (auto it = plans.find(key); it != plans.end()) return *it->second;
  if (plans.size() >= kMaxLtPlans) plans.clear();
  auto plan = std::make_unique<LtPlan>();
  LAB_CHECK_CUBLAS(cublasLtMatmulDescCreate(&plan->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t transpose = CUBLAS_OP_T, none = CUBLAS_OP_N;
  LAB_CHECK_CUBLAS(
      cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_TRANSA, &transpose, sizeof(transpose)));
  LAB_CHECK_CUBLAS(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_TRANSB, &none, sizeof(none)));
  LAB_CHECK_CUBLAS(cublasLtMatrixLayoutCreate(&plan->a, CUDA_R_16F, uint64_t(k), uint64_t(n), k));
  LAB_CHECK_CUBLAS(cublasLtMatrixLayoutCreate(&plan->b, CUDA_R_16F, uint64_t(k), uint64_t(m), k));
  LAB_CHECK_CUBLAS(cublasLtMatrixLayoutCreate(&plan->c, CUDA_R_16F, uint64_t(n), uint64_t(m), n));
  cublasLtMatmulPreference_t preference = nullptr;
  LAB_CHECK_CUBLAS(cublasLtMatmulPreferenceCreate(&preference));
  const size_t workspace = kLtWorkspaceBytes;
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  cublasStatus_t status = cublasLtMatmulPreferenceSetAttribute(
      preference, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace, sizeof(workspace));
  for (const auto attribute : {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                               CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES})
    if (status == CUBLAS_STATUS_SUCCESS)
      status = cublasLtMatmulPreferenceSetAttribute(preference, attribute, &alignment, sizeof(alignment));
  if (status == CUBLAS_STATUS_SUCCESS)
    status = cublasLtMatmulAlgoGetHeuristic(lt.handle, plan->desc, plan->a, plan->b, plan->c, plan->c, preference, 1,
                                            &result, &found);
  cublasLtMatmulPreferenceDestroy(preference);
  LAB_CHECK_CUBLAS(status);
  if (found == 0)
    TVM_FFI_THROW(RuntimeError) << "lab.gemm.nt_add: cuBLASLt has no algorithm for x [" << m << ", " << k << "] w ["
                                << n << ", " << k << "] with a float16 residual";
  plan->algo = result.algo;
  return *plans.emplace(key, std::move(plan)).first->second;
}


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

void GemmNTAdd(DLTensor* x, DLTensor* w, DLTensor* residual, DLTensor* out) {
  const char* fn = "lab.gemm.nt_add";
  lab::CheckOnGpuCompact(fn, {x, w, residual, out});
  for (const DLTensor* t : {x, w, residual, out}) {
    if (!lab::IsHalf(t->dtype)) TVM_FFI_THROW(TypeError) << fn << ": x, w, residual and out must be float16";
    if (t->ndim < 1) TVM_FFI_THROW(ValueError) << fn << ": a tensor is a scalar";
  }
  if (w->ndim != 2) TVM_FFI_THROW(ValueError) << fn << ": w must be [N, K]";
  const int64_t n = w->shape[0], k = w->shape[1];
  const int64_t m = lab::Rows(x);
  if (x->shape[x->ndim - 1] != k || out->shape[out->ndim - 1] != n || residual->shape[residual->ndim - 1] != n ||
      lab::Rows(out) != m || lab::Rows(residual) != m)
    TVM_FFI_THROW(ValueError) << fn << ": shapes do not agree (x [.., " << x->shape[x->ndim - 1] << "], w [" << n
                              << ", " << k << "], residual [.., " << residual->shape[residual->ndim - 1]
                              << "], out [.., " << out->shape[out->ndim - 1] << "], rows " << m << ", "
                              << lab::Rows(residual) << ", " << lab::Rows(out) << ")";
  if (Data<char>(out) == Data<char>(residual))
    TVM_FFI_THROW(ValueError) << fn << ": out must not be residual (give the sum a tensor of its own)";
  if (m == 0) return;
  const int device = x->device.device_id;
  const LtDevice& lt = Lt(device);
  uint32_t alignment = 16;
  for (const DLTensor* t : {x, w, residual, out})
    while (reinterpret_cast<uintptr_t>(Data<char>(t)) % alignment != 0) alignment /= 2;
  const LtPlan& plan = PlanFor(device, lt, m, n, k, alignment);
  const float alpha = 1.0f, beta = 1.0f;
  LAB_CHECK_CUBLAS(cublasLtMatmul(lt.handle, plan.desc, &alpha, Data<__half>(w), plan.a, Data<__half>(x), plan.b, &beta,
                                  Data<__half>(residual), plan.c, Data<__half>(out), plan.c, &plan.algo, lt.workspace,
                                  kLtWorkspaceBytes, static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, device))));
}

}  // namespace

TVM_FFI_STATIC_INIT_BLOCK() {
  namespace refl = tvm::ffi::reflection;
  refl::GlobalDef().def("lab.gemm.nt", GemmNT);
  refl::GlobalDef().def("lab.gemm.nt_add", GemmNTAdd);
}
