// The paged KV cache's attention on the GPU, in the slots where TVM puts its TIR kernels
// (engine/model.py), with those kernels' arguments and results. TVM's kernels use no tensor cores,
// and its decode kernel runs one thread block per (sequence, KV head): 8 blocks for a batch-1
// Llama-3-8B step on a GPU of 132 SMs.
//
// lab.attention.prefill_ragged: the self-attention of a prefill over the tokens it appends,
//   (q [n, Hq, d], q_indptr [b+1], k [m, Hkv, d], v [m, Hkv, d], kv_indptr [b+1],
//    q_rope_position, k_rope_pos_offset, output [n, Hq, d], lse [n, Hq] float32,
//    causal, rotary_mode, rope_scale, rope_theta, sm_scale)
//   per sequence and chunk of query rows: S = Q K^T as cuBLAS strided-batched GEMMs (float16 in,
//   float32 out, tensor cores), a causal softmax kernel of ours writing float16 P, O = P V the same
//   way. A chunk's S and P live in a workspace of at most kWorkspaceBytes per device (grown on
//   demand); with causal masking a chunk only reads the keys its last row can see.
//
// lab.attention.decode_paged: one new token per sequence against the paged cache,
//   (q [b, Hq, d], pages [num_pages, 2, Hkv, page_size, d], page_indptr [b+1], page_values [nnz],
//    last_page_len [b], k_rope_pos_offset, q_rope_position, output [b, Hq, d], lse [b, Hq] float32,
//    rotary_mode, rope_scale, rope_theta, sm_scale)
//   split over the keys (flash decoding): a block per (split, KV head, sequence) keeps an online
//   softmax for the query heads of its KV group over its share of the keys; a second kernel merges
//   the splits. The number of splits fills the GPU whatever the batch (or, for
//   lab.attention.decode_paged_invariant, is that of a batch of 1); each block derives its key
//   range from the lengths on the device, so nothing is read back to the host.
//
// lse is in base 2 of the scaled scores, log2(sum_j 2^(s_j * sm_scale * log2(e))), as TVM's merge
// kernel expects when it combines attention over the appended tokens with attention over pages.
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

#include "cuda_common.h"

namespace {

using lab::Data;
using lab::IsCompact;

constexpr int64_t kWorkspaceBytes = int64_t(256) << 20;
constexpr int kSoftmaxThreads = 256;

// Per (thread, device): the S/P workspace and the SM count (a disco worker is one thread on one
// device).
struct DeviceState {
  void* workspace = nullptr;
  int64_t workspace_bytes = 0;
  int sms = 0;
};

DeviceState& State(int device) {
  thread_local std::unordered_map<int, DeviceState> states;
  DeviceState& s = states[device];
  if (s.sms == 0) LAB_CHECK_CUDA(cudaDeviceGetAttribute(&s.sms, cudaDevAttrMultiProcessorCount, device));
  return s;
}

void* Workspace(DeviceState& s, int64_t bytes, cudaStream_t stream) {
  if (bytes > s.workspace_bytes) {
    if (s.workspace != nullptr) {
      LAB_CHECK_CUDA(cudaStreamSynchronize(stream));  // the last use of the old buffer is on it
      LAB_CHECK_CUDA(cudaFree(s.workspace));
    }
    LAB_CHECK_CUDA(cudaMalloc(&s.workspace, bytes));
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

  // One read for the statistics: each thread's running maximum and sum, rescaled when the
  // maximum grows, then combined across the block; a second read writes P.
  float m = -INFINITY, sum = 0.f;
  for (int64_t j = threadIdx.x; j <= last; j += blockDim.x) {
    const float x = srow[j] * scale2;
    if (x > m) {
      sum = sum * exp2f(m - x) + 1.f;
      m = x;
    } else {
      sum += exp2f(x - m);
    }
  }
  const float row_max = BlockReduce(m, true, shared);
  sum = BlockReduce(m == -INFINITY ? 0.f : sum * exp2f(m - row_max), false, shared);
  const float row_lse = row_max + log2f(sum);
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x)
    prow[j] = __float2half(j <= last ? exp2f(srow[j] * scale2 - row_lse) : 0.f);
  if (threadIdx.x == 0) lse[(lse_row0 + first_row + i) * q_heads + hk * group + r] = row_lse;
}

constexpr int kDecodeWarps = 4;
constexpr int kDecodeBlocksPerSM = 8;

constexpr int kMaxGroup = 8;  // query heads per KV head (Llama-3-70B: 8)
// A split without keys (or a sequence without pages) reports this log-sum-exp, as TVM's kernel
// does (its running maximum starts at -5e4), so merging it gives it no weight and no NaN.
constexpr float kEmptyLse = -5e4f;

// 8 consecutive halfs (one 16-byte load) as floats.
__device__ void Load8(const __half* src, float* dst) {
  const uint4 raw = *reinterpret_cast<const uint4*>(src);
  const __half2* h = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __half22float2(h[i]);
    dst[2 * i] = f.x, dst[2 * i + 1] = f.y;
  }
}

// A block per (split, KV head, sequence). A key is handled by a team of D / 8 lanes, each with
// 8 elements of head_dim (16-byte loads), so a warp reads 32 / (D / 8) keys at once; each team
// keeps an online softmax per query head of the KV group, and the teams are combined in shared
// memory into the split's (output, lse).
template <int D, int G>  // G: query heads per KV head this instance can hold (registers)
__global__ void __launch_bounds__(kDecodeWarps * 32)
DecodePartial(const __half* __restrict__ q, const __half* __restrict__ pages, const int32_t* __restrict__ page_indptr,
              const int32_t* __restrict__ page_values, const int32_t* __restrict__ last_page_len,
              float* __restrict__ part_o, float* __restrict__ part_lse, int kv_heads, int group, int page_size,
              int splits, float scale2) {
  constexpr int kTeam = D / 8, kTeams = kDecodeWarps * 32 / kTeam;
  __shared__ float sm_m[kTeams][G], sm_d[kTeams][G];
  __shared__ float sm_o[kTeams][G][D];
  const int split = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;
  const int team = threadIdx.x / kTeam, lane = threadIdx.x % kTeam;
  const int q_heads = kv_heads * group;
  const int p0 = page_indptr[b], p1 = page_indptr[b + 1];
  const int len = p1 > p0 ? (p1 - p0 - 1) * page_size + last_page_len[b] : 0;
  const int chunk = (len + splits - 1) / splits;
  const int t0 = split * chunk, t1 = min(len, t0 + chunk);

  float qr[G][8], o[G][8], m[G], d[G];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    m[g] = -INFINITY;
    d[g] = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) o[g][i] = 0.f, qr[g][i] = 0.f;
    if (g < group) Load8(q + (int64_t(b) * q_heads + hk * group + g) * D + lane * 8, qr[g]);
  }
  const int64_t kv_stride = int64_t(kv_heads) * page_size * D;  // K to V of a page
  // The warp's teams take consecutive keys; every lane of a warp runs the same iterations (the
  // shuffles below need the whole warp), a team past the split's end computes on zeros and keeps
  // its state.
  constexpr int kTeamsPerWarp = 32 / kTeam;
  for (int base = t0 + (threadIdx.x / 32) * kTeamsPerWarp; base < t1; base += kTeams) {
    const int t = base + (threadIdx.x % 32) / kTeam;
    const bool valid = t < t1;
    float k[8] = {}, v[8] = {};
    if (valid) {
      const int64_t page = page_values[p0 + t / page_size];
      const __half* krow = pages + (page * 2 * kv_heads + hk) * page_size * D + int64_t(t % page_size) * D;
      Load8(krow + lane * 8, k);
      Load8(krow + kv_stride + lane * 8, v);
    }
#pragma unroll
    for (int g = 0; g < G; ++g) {
      if (g >= group) break;
      float s = 0.f;
#pragma unroll
      for (int i = 0; i < 8; ++i) s += qr[g][i] * k[i];
#pragma unroll
      for (int offset = kTeam / 2; offset > 0; offset /= 2) s += __shfl_xor_sync(0xffffffffu, s, offset);
      if (!valid) continue;
      s *= scale2;
      const float m_new = fmaxf(m[g], s);
      const float rescale = exp2f(m[g] - m_new), p = exp2f(s - m_new);
      d[g] = d[g] * rescale + p;
#pragma unroll
      for (int i = 0; i < 8; ++i) o[g][i] = o[g][i] * rescale + p * v[i];
      m[g] = m_new;
    }
  }
#pragma unroll
  for (int g = 0; g < G; ++g) {  // static indices keep m, d and o in registers
    if (g >= group) break;
    if (lane == 0) sm_m[team][g] = m[g], sm_d[team][g] = d[g];
#pragma unroll
    for (int i = 0; i < 8; ++i) sm_o[team][g][lane * 8 + i] = o[g][i];
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < group * D; idx += blockDim.x) {
    const int g = idx / D, j = idx % D;
    float top = -INFINITY;
    for (int w = 0; w < kTeams; ++w) top = fmaxf(top, sm_m[w][g]);
    float dsum = 0.f, osum = 0.f;
    if (top != -INFINITY) {
      for (int w = 0; w < kTeams; ++w) {
        const float a = sm_m[w][g] == -INFINITY ? 0.f : exp2f(sm_m[w][g] - top);
        dsum += sm_d[w][g] * a;
        osum += sm_o[w][g][j] * a;
      }
    }
    const int64_t row = (int64_t(b) * q_heads + hk * group + g) * splits + split;
    part_o[row * D + j] = dsum > 0.f ? osum / dsum : 0.f;
    if (j == 0) part_lse[row] = dsum > 0.f ? top + log2f(dsum) : -INFINITY;
  }
}

// One block per (sequence, query head), a thread per element of head_dim: merge the splits.
__global__ void DecodeMerge(const float* __restrict__ part_o, const float* __restrict__ part_lse,
                            __half* __restrict__ out, float* __restrict__ lse, int splits, int d) {
  const int64_t row = blockIdx.x;  // b * q_heads + h
  const float* lses = part_lse + row * splits;
  float top = -INFINITY;
  for (int s = 0; s < splits; ++s) top = fmaxf(top, lses[s]);
  if (top == -INFINITY) {
    for (int j = threadIdx.x; j < d; j += blockDim.x) out[row * d + j] = __float2half(0.f);
    if (threadIdx.x == 0) lse[row] = kEmptyLse;
    return;
  }
  float wsum = 0.f;
  for (int s = 0; s < splits; ++s) wsum += lses[s] == -INFINITY ? 0.f : exp2f(lses[s] - top);
  for (int j = threadIdx.x; j < d; j += blockDim.x) {
    float acc = 0.f;
    for (int s = 0; s < splits; ++s)
      if (lses[s] != -INFINITY) acc += exp2f(lses[s] - top) * part_o[(row * splits + s) * d + j];
    out[row * d + j] = __float2half(acc / wsum);
  }
  if (threadIdx.x == 0) lse[row] = top + log2f(wsum);
}

void Check(const DLTensor* t, const char* role, int ndim, int bits, DLDataTypeCode code) {
  if (t->device.device_type != kDLCUDA)
    TVM_FFI_THROW(ValueError) << "lab.attention: " << role << " is not on a CUDA device";
  if (t->ndim != ndim || t->dtype.code != code || t->dtype.bits != bits || t->dtype.lanes != 1)
    TVM_FFI_THROW(TypeError) << "lab.attention: " << role << " must be a " << ndim
                             << "-d " << (code == kDLFloat ? "float" : "int") << bits << " tensor";
  if (!IsCompact(t)) TVM_FFI_THROW(ValueError) << "lab.attention: " << role << " is not compact";
}

std::vector<int32_t> HostIndptr(const DLTensor* t, cudaStream_t stream) {
  std::vector<int32_t> host(t->shape[0]);
  LAB_CHECK_CUDA(cudaMemcpyAsync(host.data(), Data<int32_t>(t), host.size() * sizeof(int32_t),
                             cudaMemcpyDeviceToHost, stream));
  LAB_CHECK_CUDA(cudaStreamSynchronize(stream));
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
  cublasHandle_t handle = lab::CublasHandle(device);
  LAB_CHECK_CUBLAS(cublasSetStream(handle, stream));

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
        LAB_CHECK_CUBLAS(cublasGemmStridedBatchedEx(
            handle, CUBLAS_OP_T, CUBLAS_OP_N, int(cols), int(rows), int(d), &one,
            kb, CUDA_R_16F, int(kv_row), d, qb + r * d, CUDA_R_16F, int(q_row), group * d, &zero,
            s + r * kv_heads * rows * cols, CUDA_R_32F, int(cols), rows * cols, int(kv_heads),
            CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
      }
      CausalSoftmax<<<unsigned(group * kv_heads * rows), kSoftmaxThreads, 0, stream>>>(
          s, p, Data<float>(lse), int(rows), int(cols), int(kv_heads), int(group), int(i0), qo[b],
          int(q_heads), int(causal), shift, scale2);
      LAB_CHECK_CUDA(cudaGetLastError());
      for (int64_t r = 0; r < group; ++r) {
        // O_h[rows, d] = P_h[rows, cols] V_hk[cols, d]: column-major O_h^T = V_hk^T P_h^T.
        LAB_CHECK_CUBLAS(cublasGemmStridedBatchedEx(
            handle, CUBLAS_OP_N, CUBLAS_OP_N, int(d), int(rows), int(cols), &one,
            vb, CUDA_R_16F, int(kv_row), d, p + r * kv_heads * rows * cols, CUDA_R_16F, int(cols),
            rows * cols, &zero, ob + r * d, CUDA_R_16F, int(q_row), group * d, int(kv_heads),
            CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
      }
    }
  }
}

using DecodeKernel = void (*)(const __half*, const __half*, const int32_t*, const int32_t*, const int32_t*, float*,
                              float*, int, int, int, int, float);

template <int D>
DecodeKernel DecodeFor(int64_t group) {
  return group <= 1 ? DecodePartial<D, 1> : group <= 2 ? DecodePartial<D, 2> : group <= 4 ? DecodePartial<D, 4>
                                                                                           : DecodePartial<D, 8>;
}

// `invariant`: split a sequence's keys as for a batch of 1 whatever the batch (below).
void DecodePaged(bool invariant, DLTensor* q, DLTensor* pages, DLTensor* page_indptr, DLTensor* page_values,
                 DLTensor* length_info, DLTensor* output, DLTensor* lse, int64_t rotary_mode, double sm_scale) {
  const char* fn = invariant ? "lab.attention.decode_paged_invariant" : "lab.attention.decode_paged";
  Check(q, "q", 3, 16, kDLFloat);
  Check(pages, "pages", 5, 16, kDLFloat);
  Check(output, "output", 3, 16, kDLFloat);
  Check(lse, "lse", 2, 32, kDLFloat);
  Check(page_indptr, "page_indptr", 1, 32, kDLInt);
  Check(page_values, "page_values", 1, 32, kDLInt);
  if (length_info->ndim != 1)
    TVM_FFI_THROW(ValueError) << fn << ": sliding-window KV caches are not supported (build with decode_attention=tir)";
  Check(length_info, "length_info", 1, 32, kDLInt);
  if (rotary_mode != 0)
    TVM_FFI_THROW(ValueError) << fn << ": inline RoPE is not supported (the model applies RoPE before the KV cache)";
  const int64_t batch = q->shape[0], q_heads = q->shape[1], d = q->shape[2];
  const int64_t kv_heads = pages->shape[2], page_size = pages->shape[3];
  if (pages->shape[1] != 2 || pages->shape[4] != d || q_heads % kv_heads != 0 || output->shape[0] != batch ||
      output->shape[1] != q_heads || output->shape[2] != d || page_indptr->shape[0] != batch + 1)
    TVM_FFI_THROW(ValueError) << fn << ": shapes do not agree";
  const int64_t group = q_heads / kv_heads;
  if (group > kMaxGroup)
    TVM_FFI_THROW(ValueError) << fn << ": " << group << " query heads per KV head, at most " << kMaxGroup
                              << " supported (build with decode_attention=tir)";
  if (d != 32 && d != 64 && d != 128 && d != 256)
    TVM_FFI_THROW(ValueError) << fn << ": head_dim " << d << " is not 32, 64, 128 or 256 (build with decode_attention=tir)";
  if (batch == 0) return;

  const int device = q->device.device_id;
  DeviceState& state = State(device);
  auto stream = static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, device));
  // About kDecodeBlocksPerSM blocks per SM whatever the batch (enough loads in flight to keep
  // HBM busy), at most 64 splits of a sequence's keys. Invariant (decode_paged_invariant, the
  // build option batch_invariant), the splits are those of a batch of 1 at any batch, so a
  // sequence's keys are summed in the same order whatever else is in the batch (bit-identical
  // tokens when a scheduler splits the batch; more, smaller blocks at large batches).
  const int64_t blocks = int64_t(kDecodeBlocksPerSM) * state.sms;
  const int64_t per_split = invariant ? kv_heads : batch * kv_heads;
  const int64_t splits = std::max<int64_t>(1, std::min<int64_t>(64, (blocks + per_split - 1) / per_split));
  float* part_o = static_cast<float*>(Workspace(state, batch * q_heads * splits * (d + 1) * 4, stream));
  float* part_lse = part_o + batch * q_heads * splits * d;
  const dim3 grid{unsigned(splits), unsigned(kv_heads), unsigned(batch)};
  const float scale2 = float(sm_scale * 1.4426950408889634);
  const DecodeKernel kernel = d == 32 ? DecodeFor<32>(group) : d == 64 ? DecodeFor<64>(group)
                             : d == 128 ? DecodeFor<128>(group) : DecodeFor<256>(group);
  kernel<<<grid, kDecodeWarps * 32, 0, stream>>>(Data<__half>(q), Data<__half>(pages), Data<int32_t>(page_indptr),
                                                 Data<int32_t>(page_values), Data<int32_t>(length_info), part_o,
                                                 part_lse, int(kv_heads), int(group), int(page_size), int(splits),
                                                 scale2);
  LAB_CHECK_CUDA(cudaGetLastError());
  DecodeMerge<<<unsigned(batch * q_heads), unsigned(std::max<int64_t>(32, d)), 0, stream>>>(
      part_o, part_lse, Data<__half>(output), Data<float>(lse), int(splits), int(d));
  LAB_CHECK_CUDA(cudaGetLastError());
}

}  // namespace

TVM_FFI_STATIC_INIT_BLOCK() {
  namespace refl = tvm::ffi::reflection;
  refl::GlobalDef().def("lab.attention.prefill_ragged", PrefillRagged);
  // The KV cache calls these with the TIR decode kernel's arguments (k_rope_pos_offset,
  // q_rope_position, rope_scale and rope_theta are unused: RoPE is applied before the cache).
  refl::GlobalDef().def("lab.attention.decode_paged",
                        [](DLTensor* q, DLTensor* pages, DLTensor* page_indptr, DLTensor* page_values,
                           DLTensor* length_info, DLTensor*, DLTensor*, DLTensor* output, DLTensor* lse,
                           int64_t rotary_mode, double, double, double sm_scale) {
                          DecodePaged(false, q, pages, page_indptr, page_values, length_info, output, lse,
                                      rotary_mode, sm_scale);
                        });
  refl::GlobalDef().def("lab.attention.decode_paged_invariant",
                        [](DLTensor* q, DLTensor* pages, DLTensor* page_indptr, DLTensor* page_values,
                           DLTensor* length_info, DLTensor*, DLTensor*, DLTensor* output, DLTensor* lse,
                           int64_t rotary_mode, double, double, double sm_scale) {
                          DecodePaged(true, q, pages, page_indptr, page_values, length_info, output, lse,
                                      rotary_mode, sm_scale);
                        });
}
