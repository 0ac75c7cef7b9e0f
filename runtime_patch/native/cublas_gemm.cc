// lab.gemm.nt(x, w, out): out = x @ w^T on the GPU with cuBLAS (tensor cores), for the prefill
// linears of engine/model.py (relax call_dps_packed). x [..., K] and w [N, K] are float16,
// out [..., N] is float16 or float32; accumulation is in float32, as in the TIR linears.
// (The prefill's residual adds come with the RMSNorm after them: lab.norm.add_rms, rms_norm.cu.)
// The GEMMs run on the stream TVM's kernels use (TVMFFIEnvGetStream), so they are ordered with them.
//
// Which cuBLAS kernel runs a shape is chosen by timing, once per (device, shape, row bucket) in a
// thread (a disco worker is one thread on one device): the first call of a shape times cuBLAS's
// default choice (cublasGemmEx, CUBLAS_GEMM_DEFAULT) against up to kCandidates algorithms of
// cuBLASLt's heuristic on the call's own operands (kRounds interleaved rounds, the median of each),
// and keeps a cuBLASLt algorithm only where it is at least kMinGain faster than the default (the
// same kernel then runs every time: the choice does not flip on noise). Rows are bucketed by the
// power of two at or above them, so a prompt of any length tunes at most once per bucket. A call
// made while its stream is captured into a CUDA graph cannot time: it runs the bucket's choice if
// one was made, else the default. `lab.gemm.nt_path("default")` turns the tuning off (every call
// the default, for the benchmarks' comparison); `lab.gemm.nt_plan(m, n, k, out_f32)` says what a
// call runs on the current device.
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
#include <tvm/ffi/string.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <map>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "cublas_gemm.h"
#include "cuda_common.h"

namespace lab {

namespace {

constexpr int kCandidates = 16;            // cuBLASLt heuristic results timed against the default
constexpr int kRounds = 5;                 // interleaved timing rounds (median per candidate)
constexpr double kMinGain = 0.01;          // a cuBLASLt algorithm must beat the default by this much
constexpr size_t kWorkspaceBytes = 32u << 20;  // each device's cuBLASLt workspace
constexpr double kSampleSeconds = 1e-3;    // calls per sample: ~this long, at least 1, at most 32

enum class Path : int { kTuned = 0, kDefault = 1 };
const char* const kPathNames[] = {"tuned", "default"};
std::atomic<int> g_path{int(Path::kTuned)};

// A (thread, device)'s cuBLASLt handle and workspace, made on first use, kept for the process.
struct LtDevice {
  cublasLtHandle_t handle = nullptr;
  void* workspace = nullptr;
};

LtDevice& Lt(int device) {
  thread_local std::unordered_map<int, LtDevice> devices;
  auto it = devices.find(device);
  if (it != devices.end()) return it->second;
  int previous = 0;
  LAB_CHECK_CUDA(cudaGetDevice(&previous));
  LAB_CHECK_CUDA(cudaSetDevice(device));
  LtDevice d;
  LAB_CHECK_CUBLAS(cublasLtCreate(&d.handle));
  LAB_CHECK_CUDA(cudaMalloc(&d.workspace, kWorkspaceBytes));
  LAB_CHECK_CUDA(cudaSetDevice(previous));
  return devices.emplace(device, d).first->second;
}

// The descriptors of one call's shape: column-major out^T[n, m] = (w[n, k] as k x n)^T x^T[k, m].
class LtShape {
 public:
  LtShape(int64_t m, int64_t n, int64_t k, bool out_f32) {
    LAB_CHECK_CUBLAS(cublasLtMatmulDescCreate(&op_, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    const cublasOperation_t t = CUBLAS_OP_T, nt = CUBLAS_OP_N;
    LAB_CHECK_CUBLAS(cublasLtMatmulDescSetAttribute(op_, CUBLASLT_MATMUL_DESC_TRANSA, &t, sizeof(t)));
    LAB_CHECK_CUBLAS(cublasLtMatmulDescSetAttribute(op_, CUBLASLT_MATMUL_DESC_TRANSB, &nt, sizeof(nt)));
    LAB_CHECK_CUBLAS(cublasLtMatrixLayoutCreate(&a_, CUDA_R_16F, k, n, k));
    LAB_CHECK_CUBLAS(cublasLtMatrixLayoutCreate(&b_, CUDA_R_16F, k, m, k));
    LAB_CHECK_CUBLAS(cublasLtMatrixLayoutCreate(&c_, out_f32 ? CUDA_R_32F : CUDA_R_16F, n, m, n));
  }
  ~LtShape() {
    cublasLtMatrixLayoutDestroy(c_);
    cublasLtMatrixLayoutDestroy(b_);
    cublasLtMatrixLayoutDestroy(a_);
    cublasLtMatmulDescDestroy(op_);
  }
  LtShape(const LtShape&) = delete;
  LtShape& operator=(const LtShape&) = delete;

  cublasStatus_t Run(const LtDevice& d, const cublasLtMatmulAlgo_t& algo, const __half* x, const __half* w, void* out,
                     cudaStream_t stream) const {
    const float alpha = 1.0f, beta = 0.0f;
    return cublasLtMatmul(d.handle, op_, &alpha, w, a_, x, b_, &beta, out, c_, out, c_, &algo, d.workspace,
                          kWorkspaceBytes, stream);
  }

  // Up to `count` algorithms of cuBLASLt's heuristic for this shape, best first, that need no more
  // than `alignment` bytes of alignment of each operand's address.
  std::vector<cublasLtMatmulAlgo_t> Heuristic(const LtDevice& d, int count, uint32_t alignment) const {
    cublasLtMatmulPreference_t pref = nullptr;
    LAB_CHECK_CUBLAS(cublasLtMatmulPreferenceCreate(&pref));
    const size_t bytes = kWorkspaceBytes;
    LAB_CHECK_CUBLAS(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &bytes,
                                                          sizeof(bytes)));
    for (auto attr : {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                      CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES})
      LAB_CHECK_CUBLAS(cublasLtMatmulPreferenceSetAttribute(pref, attr, &alignment, sizeof(alignment)));
    std::vector<cublasLtMatmulHeuristicResult_t> found(count);
    int returned = 0;
    const cublasStatus_t status =
        cublasLtMatmulAlgoGetHeuristic(d.handle, op_, a_, b_, c_, c_, pref, count, found.data(), &returned);
    cublasLtMatmulPreferenceDestroy(pref);
    std::vector<cublasLtMatmulAlgo_t> algos;
    if (status != CUBLAS_STATUS_SUCCESS) return algos;  // none: the default runs
    for (int i = 0; i < returned; ++i)
      if (found[i].state == CUBLAS_STATUS_SUCCESS && found[i].workspaceSize <= kWorkspaceBytes)
        algos.push_back(found[i].algo);
    return algos;
  }

 private:
  cublasLtMatmulDesc_t op_ = nullptr;
  cublasLtMatrixLayout_t a_ = nullptr, b_ = nullptr, c_ = nullptr;
};

void RunDefault(int device, cudaStream_t stream, int64_t m, int64_t n, int64_t k, const __half* x, const __half* w,
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

// What the tuning chose for a (shape, row bucket), and what it measured.
struct Choice {
  bool lt = false;               // a cuBLASLt algorithm (else the default)
  cublasLtMatmulAlgo_t algo{};   // where lt
  int index = -1;                // its rank in the heuristic's list
  int candidates = 0;            // heuristic algorithms that ran
  int64_t tuned_rows = 0;        // the row count it was timed at
  double us = 0, default_us = 0; // median microseconds a call: the choice's, the default's
};

// (device, row bucket, n, k, float32 out, the operands' common address alignment)
using Key = std::tuple<int, int64_t, int64_t, int64_t, bool, uint32_t>;

// The largest power of two, up to 256, that divides every one of the addresses.
uint32_t Alignment(std::initializer_list<const void*> addresses) {
  uint32_t a = 256;
  for (const void* p : addresses)
    while (reinterpret_cast<uintptr_t>(p) % a != 0) a >>= 1;
  return a;
}

std::map<Key, Choice>& Choices() {
  thread_local std::map<Key, Choice> choices;
  return choices;
}

int64_t RowBucket(int64_t m) {
  int64_t b = 1;
  while (b < m) b <<= 1;
  return b;
}

std::string AlgoText(const cublasLtMatmulAlgo_t& algo) {
  int id = -1, tile = -1, stages = -1, splits = -1;
  size_t written = 0;
  cublasLtMatmulAlgoConfigGetAttribute(&algo, CUBLASLT_ALGO_CONFIG_ID, &id, sizeof(id), &written);
  cublasLtMatmulAlgoConfigGetAttribute(&algo, CUBLASLT_ALGO_CONFIG_TILE_ID, &tile, sizeof(tile), &written);
  cublasLtMatmulAlgoConfigGetAttribute(&algo, CUBLASLT_ALGO_CONFIG_STAGES_ID, &stages, sizeof(stages), &written);
  cublasLtMatmulAlgoConfigGetAttribute(&algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &splits, sizeof(splits), &written);
  return "algo " + std::to_string(id) + ", tile " + std::to_string(tile) + ", stages " + std::to_string(stages) +
         ", split-k " + std::to_string(splits);
}

// Times the default and the heuristic's algorithms on this call's operands (the stream is not
// being captured) and returns the choice (module comment). Leaves `out` written by the last run.
Choice Tune(int device, cudaStream_t stream, int64_t m, int64_t n, int64_t k, const __half* x, const __half* w,
            void* out, bool out_f32, uint32_t alignment) {
  const LtDevice& d = Lt(device);
  const LtShape shape(m, n, k, out_f32);
  std::vector<cublasLtMatmulAlgo_t> algos = shape.Heuristic(d, kCandidates, alignment);
  // Candidate 0 is the default; i > 0 is algos[i - 1]. One warm-up run each; an algorithm that
  // refuses the shape is dropped.
  std::vector<int> live = {0};
  RunDefault(device, stream, m, n, k, x, w, out, out_f32);
  for (size_t i = 0; i < algos.size(); ++i)
    if (shape.Run(d, algos[i], x, w, out, stream) == CUBLAS_STATUS_SUCCESS) live.push_back(static_cast<int>(i) + 1);
  LAB_CHECK_CUDA(cudaGetLastError());
  auto run = [&](int c) {
    if (c == 0)
      RunDefault(device, stream, m, n, k, x, w, out, out_f32);
    else
      LAB_CHECK_CUBLAS(shape.Run(d, algos[c - 1], x, w, out, stream));
  };
  cudaEvent_t guess[2];
  for (auto& e : guess) LAB_CHECK_CUDA(cudaEventCreate(&e));
  LAB_CHECK_CUDA(cudaEventRecord(guess[0], stream));
  run(0);
  LAB_CHECK_CUDA(cudaEventRecord(guess[1], stream));
  LAB_CHECK_CUDA(cudaEventSynchronize(guess[1]));
  float guess_ms = 0;
  LAB_CHECK_CUDA(cudaEventElapsedTime(&guess_ms, guess[0], guess[1]));
  for (auto& e : guess) cudaEventDestroy(e);
  const int calls = std::clamp(static_cast<int>(kSampleSeconds * 1e3 / std::max(guess_ms, 1e-3f)), 1, 32);

  const size_t nc = live.size();
  std::vector<cudaEvent_t> events(2 * nc * kRounds);
  for (auto& e : events) LAB_CHECK_CUDA(cudaEventCreate(&e));
  for (int r = 0; r < kRounds; ++r)
    for (size_t i = 0; i < nc; ++i) {
      LAB_CHECK_CUDA(cudaEventRecord(events[2 * (r * nc + i)], stream));
      for (int c = 0; c < calls; ++c) run(live[i]);
      LAB_CHECK_CUDA(cudaEventRecord(events[2 * (r * nc + i) + 1], stream));
    }
  LAB_CHECK_CUDA(cudaEventSynchronize(events.back()));
  std::vector<double> median(nc);
  for (size_t i = 0; i < nc; ++i) {
    std::vector<double> samples;
    for (int r = 0; r < kRounds; ++r) {
      float ms = 0;
      LAB_CHECK_CUDA(cudaEventElapsedTime(&ms, events[2 * (r * nc + i)], events[2 * (r * nc + i) + 1]));
      samples.push_back(ms * 1e3 / calls);
    }
    std::nth_element(samples.begin(), samples.begin() + kRounds / 2, samples.end());
    median[i] = samples[kRounds / 2];
  }
  for (auto& e : events) cudaEventDestroy(e);

  Choice choice;
  choice.candidates = static_cast<int>(nc) - 1;
  choice.tuned_rows = m;
  choice.default_us = choice.us = median[0];
  for (size_t i = 1; i < nc; ++i)
    if (median[i] < choice.us && median[i] <= median[0] * (1.0 - kMinGain)) {
      choice.lt = true;
      choice.index = live[i] - 1;
      choice.algo = algos[live[i] - 1];
      choice.us = median[i];
    }
  // The output of the chosen kernel (the rounds' last run was another candidate's: the same sums
  // in another order).
  run(choice.lt ? choice.index + 1 : 0);
  return choice;
}

bool Capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  LAB_CHECK_CUDA(cudaStreamIsCapturing(stream, &status));
  return status != cudaStreamCaptureStatusNone;
}

}  // namespace

void CublasGemmNT(int device, cudaStream_t stream, int64_t m, int64_t n, int64_t k, const __half* x, const __half* w,
                  void* out, bool out_f32) {
  if (Path(g_path.load()) == Path::kDefault) return RunDefault(device, stream, m, n, k, x, w, out, out_f32);
  const uint32_t alignment = Alignment({x, w, out});
  const Key key{device, RowBucket(m), n, k, out_f32, alignment};
  auto& choices = Choices();
  auto it = choices.find(key);
  if (it == choices.end()) {
    if (Capturing(stream)) return RunDefault(device, stream, m, n, k, x, w, out, out_f32);
    choices.emplace(key, Tune(device, stream, m, n, k, x, w, out, out_f32, alignment));
    return;
  }
  const Choice& c = it->second;
  if (!c.lt) return RunDefault(device, stream, m, n, k, x, w, out, out_f32);
  const LtShape shape(m, n, k, out_f32);
  LAB_CHECK_CUBLAS(shape.Run(Lt(device), c.algo, x, w, out, stream));
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

// lab.gemm.nt_path(name) -> the previous path: "tuned" (the default: module comment) or "default"
// (cuBLAS's own choice every call).
tvm::ffi::String SetPath(tvm::ffi::String name) {
  const std::string wanted(name);
  for (int i = 0; i < 2; ++i)
    if (wanted == lab::kPathNames[i]) return tvm::ffi::String(lab::kPathNames[lab::g_path.exchange(i)]);
  TVM_FFI_THROW(ValueError) << "lab.gemm.nt_path: " << wanted << " is not one of tuned, default";
  return {};
}

// lab.gemm.nt_plan(m, n, k, out_f32) -> what a call of m rows against an [n, k] weight runs on the
// current device in this thread: "default (path)", "not tuned yet", or the tuning's choice and its
// measured times (one line for each alignment of the operands' addresses it was tuned at).
tvm::ffi::String DescribePlan(int64_t m, int64_t n, int64_t k, bool out_f32) {
  if (lab::Path(lab::g_path.load()) == lab::Path::kDefault) return tvm::ffi::String("default (path)");
  int device = 0;
  LAB_CHECK_CUDA(cudaGetDevice(&device));
  std::string text;
  for (const auto& [key, c] : lab::Choices()) {
    if (key != lab::Key{device, lab::RowBucket(m), n, k, out_f32, std::get<5>(key)}) continue;
    char times[200];
    std::snprintf(times, sizeof(times), " at %lld rows, %u-byte aligned: %.1f us, the default %.1f us, %d cuBLASLt candidates",
                  static_cast<long long>(c.tuned_rows), std::get<5>(key), c.us, c.default_us, c.candidates);
    text += (text.empty() ? "" : "\n") + std::string("tuned ") +
            (c.lt ? "cuBLASLt heuristic #" + std::to_string(c.index) + " (" + lab::AlgoText(c.algo) + ")" : "default") +
            times;
  }
  return tvm::ffi::String(text.empty() ? "not tuned yet" : text);
}

}  // namespace

TVM_FFI_STATIC_INIT_BLOCK() {
  namespace refl = tvm::ffi::reflection;
  refl::GlobalDef().def("lab.gemm.nt", GemmNT);
  refl::GlobalDef().def("lab.gemm.nt_path", SetPath);
  refl::GlobalDef().def("lab.gemm.nt_plan", DescribePlan);
}
