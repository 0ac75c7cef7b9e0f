// Allreduces begun on a communication stream of their own, for the micro-batched decode of
// `full_overlap` (engine/model.py `batch_decode_pair`, runtime_patch/collectives.py).
//
// Compiled into the nccl plugin beside TVM's shipped nccl.cc, so that it reaches that CCL's
// per-worker context (CCLThreadLocalContext) and splits a second communicator off its global one:
// TVM's collectives (the token broadcast, the vocabulary allgather) keep the first on their
// stream, ours use the second on a non-blocking stream, so the two never share a communicator
// across streams.
//
//   lab.ccl.overlap_init()                     on every worker, once (collective: ncclCommSplit)
//   lab.ccl.allreduce_begin(partial, reduced)  event on the compute stream -> the comm stream waits
//                                              -> ncclAllReduce(sum) there -> a "done" event
//   lab.ccl.allreduce_wait(reduced, partial, token)  the compute stream waits for that event
//   lab.ccl.set_overlap(on)                    off: begin makes the compute stream wait at once
//                                              (the same kernels, serialized: the reference that
//                                              measures how much allreduce time overlap hides)
//
// The compute stream is the one TVM launches its kernels on (TVMFFIEnvGetStream; the legacy
// default stream when none is set). A begin is matched with its wait by the reduced buffer's
// address. `token` (int32[1]) is never written: it only orders the model's residual add after the
// wait in the Relax graph.
#include <cuda_runtime.h>
#include <tvm/ffi/extra/c_env_api.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/reflection/registry.h>

#include <unordered_map>
#include <vector>

#include "cuda_check.h"
#include "nccl_context.h"

namespace lab_overlap {

using tvm::runtime::nccl::AsNCCLDataType;
using tvm::runtime::nccl::CCLThreadLocalContext;

// Per worker thread, like TVM's CCL context. Never destroyed: workers leave with os._exit, and
// destroying a communicator at thread exit could wait on peers that are gone.
struct Overlap {
  ncclComm_t comm = nullptr;
  cudaStream_t stream = nullptr;
  cudaEvent_t ready = nullptr;
  std::vector<cudaEvent_t> spare;
  std::unordered_map<void*, cudaEvent_t> in_flight;  // reduced buffer -> its "done" event
  bool overlap = true;
};

Overlap& State() {
  static thread_local Overlap* state = new Overlap();
  return *state;
}

CCLThreadLocalContext* Context() {
  CCLThreadLocalContext* ctx = CCLThreadLocalContext::Get();
  if (ctx->global_comm == nullptr || ctx->worker == nullptr)
    TVM_FFI_THROW(RuntimeError) << "lab.ccl: the nccl CCL is not initialised on this thread "
                                   "(call it on a disco worker of an nccl session)";
  return ctx;
}

cudaStream_t ComputeStream(const CCLThreadLocalContext* ctx) {
  return static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, ctx->device_id));
}

void Init() {
  CCLThreadLocalContext* ctx = Context();
  Overlap& s = State();
  if (s.comm != nullptr) return;
  LAB_CHECK_CUDA(cudaSetDevice(ctx->device_id));
  LAB_CHECK_CUDA(cudaDeviceSynchronize());  // nothing of the first communicator in flight
  NCCL_CALL(ncclCommSplit(ctx->global_comm, 0, ctx->worker->worker_id, &s.comm, nullptr));
  LAB_CHECK_CUDA(cudaStreamCreateWithFlags(&s.stream, cudaStreamNonBlocking));
  LAB_CHECK_CUDA(cudaEventCreateWithFlags(&s.ready, cudaEventDisableTiming));
}

Overlap& Ready() {
  Overlap& s = State();
  if (s.comm == nullptr)
    TVM_FFI_THROW(RuntimeError) << "lab.ccl.allreduce_begin before lab.ccl.overlap_init on this worker";
  return s;
}

void Begin(DLTensor* partial, DLTensor* reduced) {
  CCLThreadLocalContext* ctx = Context();
  Overlap& s = Ready();
  int64_t numel = 1;
  for (int i = 0; i < partial->ndim; ++i) numel *= partial->shape[i];
  cudaStream_t compute = ComputeStream(ctx);
  LAB_CHECK_CUDA(cudaEventRecord(s.ready, compute));
  LAB_CHECK_CUDA(cudaStreamWaitEvent(s.stream, s.ready, 0));
  NCCL_CALL(ncclAllReduce(static_cast<char*>(partial->data) + partial->byte_offset,
                          static_cast<char*>(reduced->data) + reduced->byte_offset, numel,
                          AsNCCLDataType(partial->dtype), ncclSum, s.comm, s.stream));
  cudaEvent_t done;
  if (s.spare.empty()) {
    LAB_CHECK_CUDA(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
  } else {
    done = s.spare.back();
    s.spare.pop_back();
  }
  LAB_CHECK_CUDA(cudaEventRecord(done, s.stream));
  auto [it, fresh] = s.in_flight.emplace(reduced->data, done);
  if (!fresh)
    TVM_FFI_THROW(RuntimeError) << "lab.ccl.allreduce_begin: an allreduce into this buffer is already in flight";
  if (!s.overlap) LAB_CHECK_CUDA(cudaStreamWaitEvent(compute, done, 0));
}

void Wait(DLTensor* reduced, DLTensor* partial, DLTensor* token) {
  CCLThreadLocalContext* ctx = Context();
  Overlap& s = Ready();
  auto it = s.in_flight.find(reduced->data);
  if (it == s.in_flight.end())
    TVM_FFI_THROW(RuntimeError) << "lab.ccl.allreduce_wait: no allreduce in flight into this buffer";
  LAB_CHECK_CUDA(cudaStreamWaitEvent(ComputeStream(ctx), it->second, 0));
  s.spare.push_back(it->second);  // may be recorded again: the wait above is already enqueued
  s.in_flight.erase(it);
}

TVM_FFI_STATIC_INIT_BLOCK() {
  namespace refl = tvm::ffi::reflection;
  refl::GlobalDef()
      .def("lab.ccl.overlap_init", Init)
      .def("lab.ccl.allreduce_begin", Begin)
      .def("lab.ccl.allreduce_wait", Wait)
      .def("lab.ccl.set_overlap", [](bool on) { State().overlap = on; });
}

}  // namespace lab_overlap
