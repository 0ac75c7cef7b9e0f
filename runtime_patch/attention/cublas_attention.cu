// lab.attention.prefill_ragged: the self-attention of a prefill over the tokens it appends, for
// TVM's paged KV cache (engine/model.py puts it in the cache's "ragged prefill" slot, where TVM
// puts its TIR kernel; same arguments, same results):
//
//   (q [n, Hq, d], q_indptr [b+1], k [m, Hkv, d], v [m, Hkv, d], kv_indptr [b+1],
//    q_rope_position, k_rope_pos_offset, output [n, Hq, d], lse [n, Hq] float32,
//    causal, rotary_mode, rope_scale, rope_theta, sm_scale)
//
// lse is in base 2 of the scaled scores, log2(sum_j 2^(s_j * sm_scale * log2(e))), as TVM's merge
// kernel expects when a prefix in the pages is attended to afterwards.
//
// TVM's TIR kernel runs on CUDA cores (no tensor cores); here the two products run as cuBLAS
// strided-batched GEMMs (float16 in, float32 accumulation, tensor cores) and a kernel of ours does
// the causal softmax between them: per sequence and per chunk of query rows,
//   S = Q K^T (float32) -> P = softmax(S * sm_scale) (float16, 0 where masked) -> O = P V.
// A chunk's S and P live in a workspace of at most kWorkspaceBytes per device (grown on demand);
// with causal masking a chunk only reads the keys its last row can see.
#include <cublas_v2.h>
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
#include <unordered_map>
#include <vector>

namespace {

constexpr int64_t kWorkspaceBytes = int64_t(256) << 20;
constexpr int kSoftmaxThreads = 256;

#define CHECK_CUDA(expr)                                                                   \
  do {                                                                                     \
    cudaError_t err_ = (expr);                                                             \
    if (err_ != cudaSuccess)                                                               \
      TVM_FFI_THROW(RuntimeError) << #expr << " failed: " << cudaGetErrorString(err_);     \
  } while (0)

#define CHECK_CUBLAS(expr)                                                                 \
  do {                                                                                     \
    cublasStatus_t status_ = (expr);                                                       \
    if (status_ != CUBLAS_STATUS_SUCCESS)                                                  \
      TVM_FFI_THROW(RuntimeError) << #expr << " failed: cuBLAS status " << int(status_);   \
  } while (0)

// Per (thread, device): a cuBLAS handle and the S/P workspace. A disco worker is one thread on one
// device; cuBLAS handles are not thread-safe.
struct DeviceState {
  cublasHandle_t handle = nullptr;
  void* workspace = nullptr;
  int64_t workspace_bytes = 0;
};

DeviceState& State(int device) {
  thread_local std::unordered_map<int, DeviceState> states;
  DeviceState& s = states[device];
  if (s.handle == nullptr) CHECK_CUBLAS(cublasCreate(&s.handle));
  return s;
}

void* Workspace(DeviceState& s, int64_t bytes, cudaStream_t stream) {
  if (bytes > s.workspace_bytes) {
    if (s.workspace != nullptr) {
      CHECK_CUDA(cudaStreamSynchronize(stream));  // the last use of the old buffer is on it
      CHECK_CUDA(cudaFree(s.workspace));
    }
    CHECK_CUDA(cudaMalloc(&s.workspace, bytes));
    s.workspace_bytes = bytes;
  }
  return s.workspace;
}

__device__ float BlockReduce(float value, bool is_max, float* shared) {
  for (int offset = 16; offset > 0; offset /= 2) {
    float other = __shfl_xor_sync(0xffffffffu, value, offset);
    value = is_max ? fmaxf(value, other) : value + other;
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // `shared` may still be read by the previous reduction
  if (lane == 0) shared[warp] = value;
  __syncthreads();
  value = shared[0];
  for (int w = 1; w < int(blockDim.x / 32); ++w) value = is_max ? fmaxf(value, shared[w]) : value + shared[w];
  return value;
}

// One block per row of S [group][Hkv][rows][cols]: P = 2^(S * scale2 - lse) for the columns a
// causal row sees (col <= row + first_row + causal_shift), 0 for the others; lse of the row.
__global__ void CausalSoftmax(const float* __restrict__ s, __half* __restrict__ p, float* __restrict__ lse,
                              int rows, int cols, int kv_heads, int group, int first_row,
                              int64_t lse_row0, int q_heads, int causal, int64_t causal_shift,
                              float scale2) {
  __shared__ float shared[kSoftmaxThreads / 32];
  const int64_t row_id = blockIdx.x;  // ((r * kv_heads + hk) * rows + i)
  const int i = int(row_id % rows);
  const int hk = int((row_id / rows) % kv_heads);
  const int r = int(row_id / (int64_t(rows) * kv_heads));
  const int64_t seen = first_row + i + causal_shift;  // the last key this row sees
  const int64_t last = causal && seen < cols - 1 ? seen : cols - 1;
  const float* srow = s + row_id * cols;
  __half* prow = p + row_id * cols;

  float m = -INFINITY;
  for (int64_t j = threadIdx.x; j <= last; j += blockDim.x) m = fmaxf(m, srow[j] * scale2);
  m = BlockReduce(m, true, shared);
  float sum = 0.f;
  for (int64_t j = threadIdx.x; j <= last; j += blockDim.x) sum += exp2f(srow[j] * scale2 - m);
  sum = BlockReduce(sum, false, shared);
  const float row_lse = m + log2f(sum);
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x)
    prow[j] = __float2half(j <= last ? exp2f(srow[j] * scale2 - row_lse) : 0.f);
  if (threadIdx.x == 0) lse[(lse_row0 + first_row + i) * q_heads + hk * group + r] = row_lse;
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

void Check(const DLTensor* t, const char* role, int ndim, int bits, DLDataTypeCode code) {
  if (t->device.device_type != kDLCUDA)
    TVM_FFI_THROW(ValueError) << "lab.attention.prefill_ragged: " << role << " is not on a CUDA device";
  if (t->ndim != ndim || t->dtype.code != code || t->dtype.bits != bits || t->dtype.lanes != 1)
    TVM_FFI_THROW(TypeError) << "lab.attention.prefill_ragged: " << role << " must be a " << ndim
                             << "-d " << (code == kDLFloat ? "float" : "int") << bits << " tensor";
  if (!IsCompact(t)) TVM_FFI_THROW(ValueError) << "lab.attention.prefill_ragged: " << role << " is not compact";
}

template <typename T>
T* Data(const DLTensor* t) {
  return reinterpret_cast<T*>(static_cast<char*>(t->data) + t->byte_offset);
}

std::vector<int32_t> HostIndptr(const DLTensor* t, cudaStream_t stream) {
  std::vector<int32_t> host(t->shape[0]);
  CHECK_CUDA(cudaMemcpyAsync(host.data(), Data<int32_t>(t), host.size() * sizeof(int32_t),
                             cudaMemcpyDeviceToHost, stream));
  CHECK_CUDA(cudaStreamSynchronize(stream));
  return host;
}

void PrefillRagged(DLTensor* q, DLTensor* q_indptr, DLTensor* k, DLTensor* v, DLTensor* kv_indptr,
                   DLTensor* q_rope_position, DLTensor* k_rope_pos_offset, DLTensor* output,
                   DLTensor* lse, int64_t causal, int64_t rotary_mode, double rope_scale,
                   double rope_theta, double sm_scale) {
  Check(q, "q", 3, 16, kDLFloat);
  Check(k, "k", 3, 16, kDLFloat);
  Check(v, "v", 3, 16, kDLFloat);
  Check(output, "output", 3, 16, kDLFloat);
  Check(lse, "lse", 2, 32, kDLFloat);
  Check(q_indptr, "q_indptr", 1, 32, kDLInt);
  Check(kv_indptr, "kv_indptr", 1, 32, kDLInt);
  if (rotary_mode != 0)
    TVM_FFI_THROW(ValueError) << "lab.attention.prefill_ragged: inline RoPE is not supported (the model "
                                 "applies RoPE before the KV cache: RopeMode.NORMAL)";
  const int64_t q_heads = q->shape[1], kv_heads = k->shape[1], d = q->shape[2];
  if (q_heads % kv_heads != 0 || k->shape[2] != d || v->shape[2] != d || v->shape[1] != kv_heads ||
      output->shape[1] != q_heads || output->shape[2] != d || lse->shape[1] != q_heads)
    TVM_FFI_THROW(ValueError) << "lab.attention.prefill_ragged: head counts or head dims do not agree";
  const int64_t group = q_heads / kv_heads;
  const int64_t batch = q_indptr->shape[0] - 1;
  if (batch < 1 || kv_indptr->shape[0] != batch + 1)
    TVM_FFI_THROW(ValueError) << "lab.attention.prefill_ragged: q_indptr and kv_indptr must have batch + 1 entries";

  const int device = q->device.device_id;
  DeviceState& state = State(device);
  auto stream = static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, device));
  CHECK_CUBLAS(cublasSetStream(state.handle, stream));

  // One sequence: the lengths are the tensors' (no device read); several: read the indptrs.
  std::vector<int32_t> qo{0, int32_t(q->shape[0])}, kvo{0, int32_t(k->shape[0])};
  if (batch > 1) {
    qo = HostIndptr(q_indptr, stream);
    kvo = HostIndptr(kv_indptr, stream);
  }
  const float scale2 = float(sm_scale * 1.4426950408889634);  // exp(x) = 2^(x log2 e)
  const float one = 1.f, zero = 0.f;
  const int64_t q_row = q_heads * d, kv_row = kv_heads * d;

  for (int64_t b = 0; b < batch; ++b) {
    const int64_t n = qo[b + 1] - qo[b], m = kvo[b + 1] - kvo[b];
    if (n == 0) continue;
    const int64_t shift = m - n;  // a query row i sees keys j <= i + shift
    const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(n, kWorkspaceBytes / (q_heads * m * 6)));
    char* ws = static_cast<char*>(Workspace(state, q_heads * chunk * m * 6, stream));
    const __half* kb = Data<__half>(k) + kvo[b] * kv_row;
    const __half* vb = Data<__half>(v) + kvo[b] * kv_row;
    for (int64_t i0 = 0; i0 < n; i0 += chunk) {
      const int64_t rows = std::min(chunk, n - i0);
      const int64_t cols = causal ? std::min(m, i0 + rows + shift) : m;
      if (cols <= 0) TVM_FFI_THROW(ValueError) << "lab.attention.prefill_ragged: a causal query row sees no key";
      float* s = reinterpret_cast<float*>(ws);
      __half* p = reinterpret_cast<__half*>(ws + q_heads * rows * cols * 4);
      const __half* qb = Data<__half>(q) + (qo[b] + i0) * q_row;
      __half* ob = Data<__half>(output) + (qo[b] + i0) * q_row;
      for (int64_t r = 0; r < group; ++r) {
        // Row-major S_h[rows, cols] = Q_h[rows, d] K_hk[cols, d]^T for h = hk * group + r, batched
        // over hk; in cuBLAS's column-major terms S_h^T = K_hk^T^T Q_h^T.
        CHECK_CUBLAS(cublasGemmStridedBatchedEx(
            state.handle, CUBLAS_OP_T, CUBLAS_OP_N, int(cols), int(rows), int(d), &one,
            kb, CUDA_R_16F, int(kv_row), d, qb + r * d, CUDA_R_16F, int(q_row), group * d, &zero,
            s + r * kv_heads * rows * cols, CUDA_R_32F, int(cols), rows * cols, int(kv_heads),
            CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
      }
      CausalSoftmax<<<unsigned(group * kv_heads * rows), kSoftmaxThreads, 0, stream>>>(
          s, p, Data<float>(lse), int(rows), int(cols), int(kv_heads), int(group), int(i0), qo[b],
          int(q_heads), int(causal), shift, scale2);
      CHECK_CUDA(cudaGetLastError());
      for (int64_t r = 0; r < group; ++r) {
        // O_h[rows, d] = P_h[rows, cols] V_hk[cols, d]: column-major O_h^T = V_hk^T P_h^T.
        CHECK_CUBLAS(cublasGemmStridedBatchedEx(
            state.handle, CUBLAS_OP_N, CUBLAS_OP_N, int(d), int(rows), int(cols), &one,
            vb, CUDA_R_16F, int(kv_row), d, p + r * kv_heads * rows * cols, CUDA_R_16F, int(cols),
            rows * cols, &zero, ob + r * d, CUDA_R_16F, int(q_row), group * d, int(kv_heads),
            CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
      }
    }
  }
}

}  // namespace

TVM_FFI_STATIC_INIT_BLOCK() {
  namespace refl = tvm::ffi::reflection;
  refl::GlobalDef().def("lab.attention.prefill_ragged", PrefillRagged);
}
