// A one-shot allreduce of the project's own over CUDA IPC (NVLink, or PCIe peer-to-peer), safe to
// capture in a CUDA graph and replay. The tensor-parallel decode does 64 allreduces of [batch, 4096]
// fp16 per token (8 KiB at batch 1); inside a CUDA graph on 2 x H200 NCCL takes ~15.6 us for one,
// PyTorch's symmetric-memory one-shot ~6.2 us. The model calls `lab.ccl.allreduce` through relax's
// call_dps_packed; TVM's CUDA-graph rewrite captures it (its name does not start with vm.builtin).
//
//   lab.ccl.ipc_create(rank, world, max_bytes) -> text   on this rank's current device: cudaMalloc
//       and zero the one region that the peers will map (below); returns
//       "<cudaIpcMemHandle_t in hex>@<PCI bus id>@<world>,<max_bytes>,<capacity>"
//       (capacity: blocks of the kernel this GPU holds at once). world 2..8.
//   lab.ccl.ipc_open(texts) -> bool   every rank's create text, in rank order, joined by ";".
//       false (and the reason is kept, for ipc_status) where a peer's device is not visible or lacks
//       peer access to this one (cudaDeviceCanAccessPeer): lab.ccl.allreduce then always uses TVM's
//       CCL, never a wrong sum. Else maps every peer's region (cudaIpcOpenMemHandle, lazy peer
//       access) and returns true. The caller must check that every rank returned true (e.g. gather
//       the results): ranks that disagree on using the one-shot would wait for each other forever
//       (the kernel traps after kSpinTimeoutNs, saying so).
//   lab.ccl.ipc_status() -> text   what lab.ccl.allreduce does on the current device, in one line.
//   lab.ccl.ipc_disable(why)   the one-shot off on this device (TVM's CCL for every call): a
//       session calls it on every rank when not every rank's ipc_open returned true.
//   A later ipc_create in the same process (a new session) makes a new region.
//   lab.ccl.allreduce(input, output)   output = sum over ranks of input (same shape; float16,
//       bfloat16 or float32; compact; may be the same tensor). After a successful ipc_open, messages
//       up to the one-shot limit (max_bytes, less where a GPU cannot hold the grid at once) run our
//       kernel on TVM's stream (TVMFFIEnvGetStream). Anything else (not opened, another dtype, a
//       larger message, a CPU tensor) goes to TVM's own CCL, `runtime.disco.allreduce` (NCCL on
//       CUDA, cpu_shm on CPU); outside a disco worker that global does not exist: an error says so.
//       Every rank must make the same sequence of calls (sizes and dtypes), as with any collective.
//   lab.ccl.allreduce_add_rms_norm(partial, residual, norm_weight, eps, output, normed)
//       output = residual + sum over ranks of partial, normed = rms_norm(output) * norm_weight over
//       the last dimension (rows of a multiple of 16 bytes; every tensor 16-byte aligned): the
//       residual add and the next RMSNorm of a tensor-parallel layer, in the same kernel. The
//       one-shot runs a block per row (the same protocol; the row's residual and weight copied to
//       shared memory while the peers' data travel) where the rows fit (at most kMaxBlocks and the
//       blocks a GPU holds at once, a row of at most kRowVectors vectors); else TVM's CCL sums into
//       output and AddRmsNorm adds and normalises.
//
// Protocol ("push", low-latency lines). Each rank stores its input straight into every peer's
// region over NVLink, as 16-byte lines of two 8-byte words {4 payload bytes, 4-byte flag}, the flag
// being the call's epoch; it then polls only its own (local) region until every word from every
// peer carries the epoch, and sums. An aligned 8-byte access is single-copy atomic, so a word whose
// flag is this call's epoch carries this call's payload: no fence, no separate flag store and no
// second barrier, the data are the barrier (one NVLink one-way latency per call instead of a store,
// a system fence and a flag store; the price is 2x bytes on the wire, cheap at decode sizes).
// Every rank sums the ranks' values in rank order 0..world-1 in float32 (its own from its input,
// bit-identical to what the peers received) and rounds once: all ranks get identical bits, the
// same bits as cpu_shm's order.
//
// Region of a rank (one cudaMalloc, zeroed at creation):
//   [0, 4096)          uint32 epoch[kMaxBlocks]: block b's call counter, read and advanced by block b
//                      of this rank's own kernel only (peers never touch it)
//   [4096, ...)        line slots, slot (parity, source, block) at
//                      4096 + ((parity * world + source) * kMaxBlocks + block) * slot_lines * 16,
//                      slot_lines = 2 * slot_vectors lines of 16 bytes: the 16-byte vectors of the
//                      message that block `block` handles, as written by rank `source` (the slot
//                      of source == this rank is unused). slot_vectors = max(kThreads,
//                      ceil(max_bytes / 16 / kMaxBlocks)): the layout depends only on (world,
//                      max_bytes), so every rank computes every region's layout alike.
//   size = 4096 + 2 * world * kMaxBlocks * slot_vectors * 32 bytes (2 ranks, 1 MiB: 8 MiB).
//
// Grid: a message of V 16-byte vectors (the last one may be partial) runs on
// min(kMaxBlocks, ceil(V / kThreads)) blocks of up to kThreads threads, one vector per thread where
// it fits (8 KiB: 2 blocks of 256; 128 KiB: 32; 512 KiB: 128; 1 MiB: 128 blocks of 2 vectors per
// thread); block b takes vectors [b * per_block, (b + 1) * per_block). The grid depends only on the
// size, so every rank runs the same grid for the same call. All blocks of a grid must be resident at
// once (a waiting block holds its SM; the peer's matching block might be queued behind its own
// waiting blocks), so the one-shot is used only where the grid fits on every rank's GPU (capacity,
// exchanged in the create texts).
//
// Graph safety and ordering. Nothing the host passes changes between calls: the kernel's arguments
// are pointers fixed at ipc_open (regions are never freed or re-mapped) and the message's shape.
// The epoch lives on the device: block b's thread 0 reads epoch[b] from this rank's region and
// writes epoch[b] + 1 (1, 2, ..., 2^32 - 1, then 2: parity alternates, 0 never occurs, so a
// zeroed slot never matches). All ranks run the same calls with the same grids, so block b's
// counter agrees across ranks at every call, whatever the interleaving of sizes, and a replayed
// graph just advances it. Block b reads and writes only slots of block b, of parity epoch & 1.
// Reuse: rank s writes slot (p, s, b) of rank r at block b's calls k and k + 2 (same parity). Before
// writing at k + 2 it finished its kernel of call k + 1 (stream order), whose block b waited for
// rank r's block b data of call k + 1; rank r sent those in a kernel that started after its kernel
// of call k had finished, including every read of (p, s, b). So a slot is never overwritten before
// it is read, and data of call k + 1 (other parity) may arrive early without harm. A slot word
// still holding an old epoch is never mistaken for the current one, unless exactly a multiple of
// 2^32 - 2 calls of that block went by since it was written (4e9 calls: about 4 days at 64 calls x
// 200 tokens/s, and then only in a slot no call in between reached). Input and output are read and
// written by this rank only, the input before the output, per vector by one thread (in place is
// fine); nothing of the call is left for a later call to wait for.
//
// A wait is bounded: after kSpinTimeoutNs without a peer's data the block prints which rank it
// waited for and traps (a dead or hung peer, or ranks that made different calls).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_pipeline.h>
#include <cuda_runtime.h>
#include <dlpack/dlpack.h>
#include <tvm/ffi/any.h>
#include <tvm/ffi/container/shape.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/c_env_api.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/reflection/registry.h>
#include <tvm/ffi/string.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstdio>
#include <mutex>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

#include "cuda_common.h"
#include "rms_norm.h"

namespace {

using lab::norm::InverseRms;
using lab::norm::Lanes;
using lab::norm::Normalised;

constexpr int kThreads = 256;          // threads per block, at most
constexpr int kAddNormThreads = 512;   // threads per block of the add-and-norm one-shot, at most
constexpr int kMaxBlocks = 128;        // blocks per call, at most: the layout has a slot per block
constexpr int kMaxWorld = 8;
constexpr int64_t kHeaderBytes = 4096;  // epoch counters, padded
constexpr int64_t kLineBytes = 16;      // {payload, flag, payload, flag}: 8 bytes of the message
constexpr unsigned long long kSpinTimeoutNs = 30ull * 1000 * 1000 * 1000;

static_assert(kMaxBlocks * sizeof(uint32_t) <= kHeaderBytes, "epoch counters must fit the header");

// ------------------------------------------------------------------------------------------------
// Device side

struct Params {
  const char* input;
  char* output;
  char* regions[kMaxWorld];  // every rank's region as mapped in this process (this rank's: local)
  char* mine;                // regions[rank] (indexing the parameters by a variable copies them to local memory)
  int64_t nbytes;            // of the message
  int64_t slot_lines;        // lines per (parity, source, block) slot
  int per_block;             // 16-byte vectors per block
  int rank;
  int aligned;               // input and output both 16-byte aligned
  // lab.ccl.allreduce_add_rms_norm (a block per row, per_block = the row's vectors): output =
  // residual + sum, normed = rms_norm(output) * norm_weight
  const char* residual;
  char* normed;
  const char* norm_weight;
  float eps;
};

__device__ __forceinline__ uint32_t LoadVolatile(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.volatile.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void StoreVolatile(uint32_t* p, uint32_t v) {
  asm volatile("st.volatile.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

// One line: two 8-byte words, each single-copy atomic (an aligned 64-bit element of a vector
// access), so a reader sees a word's payload and flag together or not at all.
__device__ __forceinline__ void StoreLine(char* p, uint64_t a, uint64_t b) {
  asm volatile("st.volatile.global.v2.u64 [%0], {%1, %2};" ::"l"(p), "l"(a), "l"(b) : "memory");
}

__device__ __forceinline__ void LoadLine(const char* p, uint64_t& a, uint64_t& b) {
  asm volatile("ld.volatile.global.v2.u64 {%0, %1}, [%2];" : "=l"(a), "=l"(b) : "l"(p) : "memory");
}

__device__ __forceinline__ uint64_t GlobalTimer() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// The 16 bytes at `offset` of a message of `nbytes` (zero-padded past its end). Unaligned tensors
// and the last, partial vector are read 2 bytes at a time (every supported dtype is a multiple).
__device__ __forceinline__ uint4 LoadVector(const char* base, int64_t offset, int64_t nbytes, bool aligned) {
  if (aligned && offset + 16 <= nbytes) return *reinterpret_cast<const uint4*>(base + offset);
  const int halves = int(min(int64_t(16), nbytes - offset)) / 2;
  const uint16_t* src = reinterpret_cast<const uint16_t*>(base + offset);
  uint32_t w[4] = {0, 0, 0, 0};
#pragma unroll
  for (int k = 0; k < 8; ++k)
    if (k < halves) w[k / 2] |= uint32_t(src[k]) << (16 * (k % 2));
  return make_uint4(w[0], w[1], w[2], w[3]);
}

__device__ __forceinline__ void StoreVector(char* base, int64_t offset, int64_t nbytes, bool aligned, uint4 v) {
  if (aligned && offset + 16 <= nbytes) {
    *reinterpret_cast<uint4*>(base + offset) = v;
    return;
  }
  const int halves = int(min(int64_t(16), nbytes - offset)) / 2;
  uint16_t* dst = reinterpret_cast<uint16_t*>(base + offset);
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int k = 0; k < 8; ++k)
    if (k < halves) dst[k] = uint16_t(w[k / 2] >> (16 * (k % 2)));
}

__device__ __forceinline__ bool Flagged(uint64_t a, uint64_t b, uint64_t c, uint64_t d, uint32_t epoch) {
  return uint32_t(a >> 32) == epoch && uint32_t(b >> 32) == epoch && uint32_t(c >> 32) == epoch &&
         uint32_t(d >> 32) == epoch;
}

// The add-and-norm pieces that the one-shot kernel (AddNorm) and AddRmsNorm share, rounding as the
// separate kernels do (the norm's own in rms_norm.h). sum + residual rounded to T; its squares added
// to `squares`.
template <typename T>
__device__ uint4 AddResidual(uint4 sum, uint4 residual, float& squares) {
  constexpr int N = Lanes<T>::N;
  float x[N], r[N];
  Lanes<T>::Unpack(sum, x);
  Lanes<T>::Unpack(residual, r);
#pragma unroll
  for (int k = 0; k < N; ++k) x[k] += r[k];
  const uint4 total = Lanes<T>::Pack(x);
  Lanes<T>::Unpack(total, x);
#pragma unroll
  for (int k = 0; k < N; ++k) squares += x[k] * x[k];
  return total;
}

// One call: block b pushes its vectors to every peer, then waits for the peers' and sums.
// With AddNorm (lab.ccl.allreduce_add_rms_norm) a block holds one row: the sum is rounded to T (as
// the allreduce's output), the residual added and rounded (as the separate add), and once the
// block has the row's mean square, normed = T(T(x / sqrt(ms + eps)) * weight) (transformers'
// LlamaRMSNorm): the two kernels that follow every decode allreduce are this one. Its blocks have
// up to kAddNormThreads threads, a vector of a 4096-wide float16 row each (at 256 threads a thread
// waited for its second vector after its first, then normalised both in turn).
// __launch_bounds__(kThreads, 2): at most 128 registers, so two blocks fit an SM.
template <typename T, int W, bool AddNorm>
__global__ void __launch_bounds__(AddNorm ? kAddNormThreads : kThreads, AddNorm ? 1 : 2) OneShotAllReduce(Params p) {
  constexpr int N = Lanes<T>::N;
  __shared__ uint32_t shared_epoch;
  __shared__ int shared_reported;
  __shared__ float shared_squares[kAddNormThreads / 32];
  // AddNorm: the block's row of residual, of norm weight and of output (row_vectors each), the first
  // two copied in while the data of the peers is on its way; each thread uses only the vectors it copies
  extern __shared__ uint4 row_shared[];
  float squares = 0.f;
  const int block = blockIdx.x;
  const int64_t first = int64_t(block) * p.per_block;
  const int n = int(min(int64_t(p.per_block), (p.nbytes + 15) / 16 - first));  // >= 1 (the host's grid)
  char* const mine = p.mine;

  if constexpr (AddNorm) {
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      __pipeline_memcpy_async(row_shared + i, p.residual + (first + i) * 16, 16);
      __pipeline_memcpy_async(row_shared + n + i, p.norm_weight + int64_t(i) * 16, 16);
    }
    __pipeline_commit();
  }
  // The first vector's load does not depend on the epoch: issue it before the epoch's round trip.
  uint4 x0 = make_uint4(0, 0, 0, 0);
  if (int(threadIdx.x) < n) x0 = LoadVector(p.input, first * 16 + int64_t(threadIdx.x) * 16, p.nbytes, p.aligned);
  if (threadIdx.x == 0) {
    uint32_t* counter = reinterpret_cast<uint32_t*>(mine) + block;
    const uint32_t previous = LoadVolatile(counter);
    const uint32_t epoch = previous == 0xFFFFFFFFu ? 2u : previous + 1u;
    StoreVolatile(counter, epoch);  // read by this block's next call, a later kernel
    shared_epoch = epoch;
    shared_reported = 0;
  }
  __syncthreads();
  const uint32_t epoch = shared_epoch;
  const uint64_t flag = uint64_t(epoch) << 32;
  const int64_t parity = epoch & 1;
  const int64_t slot_bytes = p.slot_lines * kLineBytes;
  // slot (parity, source, block) of a region
  auto slot = [=](char* region, int source) -> char* {
    return region + kHeaderBytes + ((parity * W + source) * kMaxBlocks + block) * slot_bytes;
  };

  // 1. Push: this rank's vectors into its slot in every peer's region.
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const uint4 x = i == int(threadIdx.x) ? x0 : LoadVector(p.input, (first + i) * 16, p.nbytes, p.aligned);
#pragma unroll
    for (int q = 0; q < W; ++q) {
      if (q == p.rank) continue;
      char* line = slot(p.regions[q], p.rank) + int64_t(i) * 2 * kLineBytes;
      StoreLine(line, flag | x.x, flag | x.y);
      StoreLine(line + kLineBytes, flag | x.z, flag | x.w);
    }
  }

  // 2. Wait for every peer's lines of the same vectors (all peers polled per round trip), sum in
  // rank order in float32, store.
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    uint64_t got[W][4];
    bool ready[W];
#pragma unroll
    for (int s = 0; s < W; ++s) {
      ready[s] = s == p.rank;
      got[s][0] = got[s][1] = got[s][2] = got[s][3] = 0;
    }
    uint32_t spins = 0;
    uint64_t start = 0;
    while (true) {
      bool all = true;
#pragma unroll
      for (int s = 0; s < W; ++s) {
        if (!ready[s]) {
          const char* line = slot(mine, s) + int64_t(i) * 2 * kLineBytes;
          LoadLine(line, got[s][0], got[s][1]);
          LoadLine(line + kLineBytes, got[s][2], got[s][3]);
          ready[s] = Flagged(got[s][0], got[s][1], got[s][2], got[s][3], epoch);
          all = all && ready[s];
        }
      }
      if (all) break;
      if ((++spins & 1023u) == 0) {
        const uint64_t now = GlobalTimer();
        if (start == 0) {
          start = now;
        } else if (now - start > kSpinTimeoutNs) {
          int missing = -1;
#pragma unroll
          for (int s = W - 1; s >= 0; --s)
            if (!ready[s]) missing = s;
          if (atomicExch(&shared_reported, 1) == 0)
            printf("lab.ccl.allreduce: rank %d, block %d: no data from rank %d for %llu s (call %u of this "
                   "block); a peer died or hung, or the ranks did not make the same sequence of calls. "
                   "Trapping.\n",
                   p.rank, block, missing, kSpinTimeoutNs / 1000000000ull, epoch);
          __trap();
        }
      }
    }
    const uint4 own = i == int(threadIdx.x) ? x0 : LoadVector(p.input, (first + i) * 16, p.nbytes, p.aligned);
    float acc[N], f[N];
#pragma unroll
    for (int s = 0; s < W; ++s) {
      const uint4 v = s == p.rank ? own
                                  : make_uint4(uint32_t(got[s][0]), uint32_t(got[s][1]), uint32_t(got[s][2]),
                                               uint32_t(got[s][3]));
      Lanes<T>::Unpack(v, f);
#pragma unroll
      for (int k = 0; k < N; ++k) acc[k] = s == 0 ? f[k] : acc[k] + f[k];
    }
    uint4 sum = Lanes<T>::Pack(acc);
    if constexpr (AddNorm) {
      __pipeline_wait_prior(0);  // this thread's copies of its residual and weight vectors
      sum = AddResidual<T>(sum, row_shared[i], squares);
      row_shared[2 * n + i] = sum;
    }
    StoreVector(p.output, (first + i) * 16, p.nbytes, p.aligned, sum);
  }
  if constexpr (AddNorm) {
    // the row's mean square over the block, then each thread normalises the vectors it stored
    const float inverse = InverseRms(squares, int64_t(p.per_block) * N, p.eps, shared_squares);
    for (int i = threadIdx.x; i < n; i += blockDim.x)
      StoreVector(p.normed, (first + i) * 16, p.nbytes, p.aligned,
                  Normalised<T>(row_shared[2 * n + i], row_shared[n + i], inverse));
  }
}

// The same add and norm after a sum made elsewhere (TVM's CCL, where the one-shot does not apply):
// a block per row; output = output + residual, normed as above.
template <typename T>
__global__ void __launch_bounds__(kThreads) AddRmsNorm(char* output, const char* residual, char* normed,
                                                       const char* norm_weight, int64_t row_vectors, float eps) {
  __shared__ float shared_squares[kThreads / 32];
  const int64_t first = int64_t(blockIdx.x) * row_vectors, row_bytes = row_vectors * 16;
  uint4* out = reinterpret_cast<uint4*>(output);
  float squares = 0.f;
  for (int64_t i = threadIdx.x; i < row_vectors; i += blockDim.x)
    out[first + i] = AddResidual<T>(out[first + i], reinterpret_cast<const uint4*>(residual)[first + i], squares);
  const float inverse = InverseRms(squares, row_vectors * Lanes<T>::N, eps, shared_squares);
  for (int64_t i = threadIdx.x; i < row_vectors; i += blockDim.x)
    reinterpret_cast<uint4*>(normed)[first + i] =
        Normalised<T>(out[first + i], LoadVector(norm_weight, i * 16, row_bytes, true), inverse);
}

// ------------------------------------------------------------------------------------------------
// Host side

using Kernel = void (*)(Params);

template <typename T, bool AddNorm>
Kernel KernelForWorld(int world) {
  switch (world) {
    case 2: return OneShotAllReduce<T, 2, AddNorm>;
    case 3: return OneShotAllReduce<T, 3, AddNorm>;
    case 4: return OneShotAllReduce<T, 4, AddNorm>;
    case 5: return OneShotAllReduce<T, 5, AddNorm>;
    case 6: return OneShotAllReduce<T, 6, AddNorm>;
    case 7: return OneShotAllReduce<T, 7, AddNorm>;
    case 8: return OneShotAllReduce<T, 8, AddNorm>;
    default: return nullptr;
  }
}

// nullptr for a dtype the kernel does not sum
Kernel KernelFor(DLDataType dtype, int world, bool add_norm = false) {
  if (dtype.lanes != 1) return nullptr;
  if (dtype.code == kDLFloat && dtype.bits == 16)
    return add_norm ? KernelForWorld<__half, true>(world) : KernelForWorld<__half, false>(world);
  if (dtype.code == kDLBfloat && dtype.bits == 16)
    return add_norm ? KernelForWorld<__nv_bfloat16, true>(world) : KernelForWorld<__nv_bfloat16, false>(world);
  if (dtype.code == kDLFloat && dtype.bits == 32)
    return add_norm ? KernelForWorld<float, true>(world) : KernelForWorld<float, false>(world);
  return nullptr;
}

using AddNormKernel = void (*)(char*, const char*, char*, const char*, int64_t, float);

AddNormKernel AddNormFor(DLDataType dtype) {
  if (dtype.code == kDLFloat && dtype.bits == 16) return AddRmsNorm<__half>;
  if (dtype.code == kDLBfloat && dtype.bits == 16) return AddRmsNorm<__nv_bfloat16>;
  return AddRmsNorm<float>;
}

struct Grid {
  int blocks, per_block, threads;
};

// A function of the message's size only: every rank launches the same grid for the same call.
Grid GridFor(int64_t vectors) {
  int64_t blocks = std::min<int64_t>(kMaxBlocks, (vectors + kThreads - 1) / kThreads);
  const int64_t per_block = (vectors + blocks - 1) / blocks;
  blocks = (vectors + per_block - 1) / per_block;  // no empty block
  const int64_t threads = std::min<int64_t>(kThreads, (per_block + 31) / 32 * 32);
  return {int(blocks), int(per_block), int(threads)};
}

// At least a row of kRowVectors (8192 float16 values, Llama-3-70B's hidden size) per slot: the
// add-and-norm kernel's block holds a whole row.
constexpr int64_t kRowVectors = 1024;

// The add-and-norm kernel's dynamic shared memory at the longest row: residual, weight and output.
constexpr int kAddNormSharedBytes = int(3 * kRowVectors * 16);

int64_t SlotVectors(int64_t max_bytes) {
  const int64_t vectors = (max_bytes + 15) / 16;
  return std::max<int64_t>(kRowVectors, (vectors + kMaxBlocks - 1) / kMaxBlocks);
}

int64_t RegionBytes(int world, int64_t max_bytes) {
  return kHeaderBytes + 2 * int64_t(world) * kMaxBlocks * SlotVectors(max_bytes) * 2 * kLineBytes;
}

// What one rank's ipc_create text says.
struct Entry {
  std::string text, handle_hex, bus;
  int world = 0, capacity = 0;
  int64_t max_bytes = 0;
};

// Per device of this process (a disco worker has one). Never destroyed: graphs captured with its
// pointers may be replayed until the process exits.
struct Ipc {
  int device = -1, rank = -1, world = 0, capacity = 0;
  int64_t max_bytes = 0;
  char* local = nullptr;
  std::string text;
  bool open_called = false, opened = false;
  std::string handles, reason;  // what ipc_open got; why the one-shot is off
  char* regions[kMaxWorld] = {};
  int64_t limit = 0;  // one-shot up to this many bytes
  int blocks_at_once = 0;  // of the kernel, on every rank's GPU
};

std::mutex mutex;
std::unordered_map<int, Ipc*>& States() {
  static auto* states = new std::unordered_map<int, Ipc*>();
  return *states;
}

int CurrentDevice() {
  int device = 0;
  LAB_CHECK_CUDA(cudaGetDevice(&device));
  return device;
}

std::string Hex(const void* data, size_t n) {
  static const char* digits = "0123456789abcdef";
  std::string out;
  const auto* bytes = static_cast<const unsigned char*>(data);
  for (size_t i = 0; i < n; ++i) out += digits[bytes[i] >> 4], out += digits[bytes[i] & 15];
  return out;
}

bool Unhex(const std::string& hex, void* data, size_t n) {
  if (hex.size() != 2 * n) return false;
  auto value = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  };
  auto* bytes = static_cast<unsigned char*>(data);
  for (size_t i = 0; i < n; ++i) {
    const int hi = value(hex[2 * i]), lo = value(hex[2 * i + 1]);
    if (hi < 0 || lo < 0) return false;
    bytes[i] = static_cast<unsigned char>(hi * 16 + lo);
  }
  return true;
}

std::vector<std::string> Split(const std::string& s, char sep) {
  std::vector<std::string> parts;
  std::string part;
  std::istringstream in(s);
  while (std::getline(in, part, sep)) parts.push_back(part);
  if (!s.empty() && s.back() == sep) parts.emplace_back();
  return parts;
}

Entry ParseEntry(const std::string& text, int index) {
  Entry e;
  e.text = text;
  const std::vector<std::string> parts = Split(text, '@');
  std::vector<std::string> numbers;
  if (parts.size() == 3) numbers = Split(parts[2], ',');
  bool ok = parts.size() == 3 && numbers.size() == 3;
  if (ok) {
    e.handle_hex = parts[0];
    e.bus = parts[1];
    try {
      e.world = std::stoi(numbers[0]);
      e.max_bytes = std::stoll(numbers[1]);
      e.capacity = std::stoi(numbers[2]);
    } catch (const std::exception&) {
      ok = false;
    }
  }
  cudaIpcMemHandle_t handle;
  if (!ok || !Unhex(e.handle_hex, &handle, sizeof(handle)))
    TVM_FFI_THROW(ValueError) << "lab.ccl.ipc_open: entry " << index << " (\"" << text
                              << "\") is not a lab.ccl.ipc_create text; pass every rank's text in rank order, "
                                 "joined by ';'";
  return e;
}

// Blocks of the kernel this GPU holds at once (all dtypes of this world), on an otherwise idle GPU.
int Capacity(int device, int world) {
  const int sms = lab::Facts(device).sms;
  int per_sm = INT_MAX;
  for (DLDataType dtype : {DLDataType{kDLFloat, 16, 1}, DLDataType{kDLBfloat, 16, 1}, DLDataType{kDLFloat, 32, 1}}) {
    for (bool add_norm : {false, true}) {
      // the add-and-norm rows plus the kernel's own shared memory are above the default 48 KiB:
      // ResidentBlocks allows the kernel its rows first (the launches rely on it)
      per_sm = std::min(per_sm, lab::ResidentBlocks(reinterpret_cast<const void*>(KernelFor(dtype, world, add_norm)),
                                                    add_norm ? kAddNormThreads : kThreads,
                                                    add_norm ? kAddNormSharedBytes : 0));
    }
  }
  return per_sm * sms;
}

tvm::ffi::String IpcCreate(int64_t rank, int64_t world, int64_t max_bytes) {
  if (world < 2 || world > kMaxWorld)
    TVM_FFI_THROW(ValueError) << "lab.ccl.ipc_create: world " << world << " is not in 2.." << kMaxWorld;
  if (rank < 0 || rank >= world)
    TVM_FFI_THROW(ValueError) << "lab.ccl.ipc_create: rank " << rank << " is not in 0.." << world - 1;
  if (max_bytes < 16 || max_bytes > (int64_t(1) << 30))
    TVM_FFI_THROW(ValueError) << "lab.ccl.ipc_create: max_bytes " << max_bytes << " is not in 16..2^30";
  const int device = CurrentDevice();
  std::lock_guard<std::mutex> lock(mutex);
  // A later session in this process (worker 0 lives in the controller, which may open several
  // sessions one after another) gets a region of its own: the earlier one is left mapped (never
  // freed, a graph of that session may still point at it) and no longer used.
  auto* s = new Ipc();
  s->device = device;
  s->rank = int(rank);
  s->world = int(world);
  s->max_bytes = max_bytes;
  s->capacity = Capacity(device, s->world);
  const int64_t bytes = RegionBytes(s->world, max_bytes);
  LAB_CHECK_CUDA(cudaMalloc(&s->local, bytes));
  LAB_CHECK_CUDA(cudaMemset(s->local, 0, bytes));
  LAB_CHECK_CUDA(cudaDeviceSynchronize());  // zero before any peer can write (they open it later)
  cudaIpcMemHandle_t handle;
  LAB_CHECK_CUDA(cudaIpcGetMemHandle(&handle, s->local));
  char bus[64] = {0};
  LAB_CHECK_CUDA(cudaDeviceGetPCIBusId(bus, sizeof(bus), device));
  std::ostringstream text;
  text << Hex(&handle, sizeof(handle)) << "@" << bus << "@" << world << "," << max_bytes << "," << s->capacity;
  s->text = text.str();
  s->reason = "NCCL: lab.ccl.ipc_open not called";
  States()[device] = s;
  return s->text;
}

bool IpcOpen(const tvm::ffi::String& handles_text) {
  const std::string handles(handles_text);
  const int device = CurrentDevice();
  std::lock_guard<std::mutex> lock(mutex);
  auto it = States().find(device);
  if (it == States().end())
    TVM_FFI_THROW(RuntimeError) << "lab.ccl.ipc_open: call lab.ccl.ipc_create on device " << device << " first";
  Ipc* s = it->second;
  if (s->open_called) {
    if (handles == s->handles) return s->opened;
    TVM_FFI_THROW(ValueError) << "lab.ccl.ipc_open: already called on device " << device << " with other handles";
  }
  const std::vector<std::string> texts = Split(handles, ';');
  if (int(texts.size()) != s->world)
    TVM_FFI_THROW(ValueError) << "lab.ccl.ipc_open: got " << texts.size() << " texts for " << s->world
                              << " ranks; pass every rank's lab.ccl.ipc_create text in rank order, joined by ';'";
  std::vector<Entry> entries;
  for (int q = 0; q < s->world; ++q) {
    entries.push_back(ParseEntry(texts[q], q));
    const Entry& e = entries.back();
    if (e.world != s->world || e.max_bytes != s->max_bytes)
      TVM_FFI_THROW(ValueError) << "lab.ccl.ipc_open: rank " << q << " created its region for " << e.world
                                << " ranks and " << e.max_bytes << " bytes, this rank (" << s->rank << ") for "
                                << s->world << " and " << s->max_bytes << "; create every rank's alike";
  }
  if (entries[s->rank].text != s->text)
    TVM_FFI_THROW(ValueError) << "lab.ccl.ipc_open: entry " << s->rank << " is not this rank's lab.ccl.ipc_create "
                              << "text: pass the texts in rank order";
  s->open_called = true;
  s->handles = handles;

  // Peer access from this device to every peer's: without it, no one-shot (TVM's CCL instead).
  for (int q = 0; q < s->world; ++q) {
    if (q == s->rank) continue;
    const Entry& e = entries[q];
    for (const auto& [other_device, other] : States()) {
      if (other != s && other->text == e.text) {
        s->reason = "NCCL: ranks " + std::to_string(s->rank) + " and " + std::to_string(q) +
                    " are in one process; the one-shot needs a process per rank";
        return false;
      }
    }
    int peer = -1;
    if (cudaDeviceGetByPCIBusId(&peer, e.bus.c_str()) != cudaSuccess) {
      (void)cudaGetLastError();
      s->reason = "NCCL: the GPU of rank " + std::to_string(q) + " (PCI " + e.bus +
                  ") is not visible to this process (CUDA_VISIBLE_DEVICES?)";
      return false;
    }
    if (peer == device) {
      s->reason = "NCCL: ranks " + std::to_string(s->rank) + " and " + std::to_string(q) + " share device " +
                  std::to_string(device);
      return false;
    }
    int can = 0;
    LAB_CHECK_CUDA(cudaDeviceCanAccessPeer(&can, device, peer));
    if (!can) {
      s->reason = "NCCL: no peer access between devices " + std::to_string(device) + " and " + std::to_string(peer) +
                  " (PCI " + entries[s->rank].bus + ", " + e.bus + ")";
      return false;
    }
  }
  for (int q = 0; q < s->world; ++q) {
    if (q == s->rank) {
      s->regions[q] = s->local;
      continue;
    }
    cudaIpcMemHandle_t handle;
    Unhex(entries[q].handle_hex, &handle, sizeof(handle));
    void* mapped = nullptr;
    const cudaError_t err = cudaIpcOpenMemHandle(&mapped, handle, cudaIpcMemLazyEnablePeerAccess);
    if (err != cudaSuccess) {
      (void)cudaGetLastError();
      s->reason = std::string("NCCL: cudaIpcOpenMemHandle of rank ") + std::to_string(q) +
                  "'s region failed: " + cudaGetErrorString(err);
      TVM_FFI_THROW(RuntimeError) << "lab.ccl.ipc_open: " << s->reason;
    }
    s->regions[q] = static_cast<char*>(mapped);
  }
  int capacity = INT_MAX;
  for (const Entry& e : entries) capacity = std::min(capacity, e.capacity);
  s->limit = capacity >= kMaxBlocks ? s->max_bytes : std::min<int64_t>(s->max_bytes, int64_t(capacity) * kThreads * 16);
  s->blocks_at_once = capacity;
  if (s->limit <= 0) {
    s->reason = "NCCL: a GPU cannot hold one block of the one-shot kernel";
    return false;
  }
  s->opened = true;
  s->reason.clear();
  return true;
}

// Turn the one-shot off on this device (every call then goes to TVM's CCL): what a session does
// on every rank when some rank's ipc_open returned false, so that no two ranks disagree.
void IpcDisable(const tvm::ffi::String& why) {
  const int device = CurrentDevice();
  std::lock_guard<std::mutex> lock(mutex);
  auto it = States().find(device);
  if (it == States().end()) return;
  it->second->opened = false;
  it->second->reason = std::string(why);
}

tvm::ffi::String IpcStatus() {
  int device = 0;
  const cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    return std::string("NCCL: no CUDA device here (") + cudaGetErrorString(err) + ")";
  }
  std::lock_guard<std::mutex> lock(mutex);
  auto it = States().find(device);
  if (it == States().end())
    return "NCCL: lab.ccl.ipc_create and lab.ccl.ipc_open not called on device " + std::to_string(device);
  const Ipc* s = it->second;
  if (!s->opened) return s->reason;
  std::ostringstream out;
  out << "one-shot over CUDA IPC, " << s->world << " ranks, up to " << s->limit << " bytes; NCCL above";
  return out.str();
}

void Fallback(tvm::ffi::AnyView input, tvm::ffi::AnyView output, const std::string& why) {
  std::optional<tvm::ffi::Function> allreduce = tvm::ffi::Function::GetGlobal("runtime.disco.allreduce");
  if (!allreduce.has_value())
    TVM_FFI_THROW(RuntimeError) << "lab.ccl.allreduce: no one-shot here (" << why
                                << ") and TVM's CCL allreduce (runtime.disco.allreduce) is not registered in "
                                   "this process: call it on a disco worker, or lab.ccl.ipc_open first";
  (*allreduce)(input, tvm::ffi::Shape({0}), false, output);  // 0: sum; false: the whole session
}

int64_t Numel(const DLTensor* t) {
  int64_t n = 1;
  for (int i = 0; i < t->ndim; ++i) n *= t->shape[i];
  return n;
}

void CheckPair(const char* fn, const DLTensor* a, const DLTensor* b, const char* what) {
  if (Numel(a) != Numel(b) || a->dtype.code != b->dtype.code || a->dtype.bits != b->dtype.bits ||
      a->dtype.lanes != b->dtype.lanes)
    TVM_FFI_THROW(ValueError) << fn << ": " << what << " differ in size or dtype";
  if (!lab::IsCompact(a) || !lab::IsCompact(b))
    TVM_FFI_THROW(ValueError) << fn << ": " << what << " must be compact (row-major, no gaps)";
  if (a->device.device_type != b->device.device_type || a->device.device_id != b->device.device_id)
    TVM_FFI_THROW(ValueError) << fn << ": " << what << " are on different devices";
}

// The one-shot kernel for a message of `nbytes` on `input`'s device (AddNorm: `rows` rows of
// `row_vectors` vectors, a block each), its parameters' shared part, or why not (kernel null).
Kernel OneShotFor(const DLTensor* input, int64_t nbytes, bool add_norm, int64_t rows, int64_t row_vectors,
                  Params& p, std::string& why) {
  std::lock_guard<std::mutex> lock(mutex);
  const int device = input->device.device_id;
  auto it = input->device.device_type == kDLCUDA ? States().find(device) : States().end();
  const Ipc* s = it == States().end() ? nullptr : it->second;
  Kernel kernel = nullptr;
  if (s == nullptr) {
    why = input->device.device_type == kDLCUDA ? "lab.ccl.ipc_open not called on device " + std::to_string(device)
                                               : "not a CUDA tensor";
  } else if (!s->opened) {
    why = s->reason;
  } else if ((kernel = KernelFor(input->dtype, s->world, add_norm)) == nullptr) {
    why = "dtype is not float16, bfloat16 or float32";
  } else if (nbytes > s->limit) {
    kernel = nullptr;
    why = std::to_string(nbytes) + " bytes is above the one-shot limit of " + std::to_string(s->limit);
  } else if (add_norm && (rows > std::min(kMaxBlocks, s->blocks_at_once) || row_vectors > SlotVectors(s->max_bytes))) {
    kernel = nullptr;
    why = std::to_string(rows) + " rows of " + std::to_string(row_vectors * 16) +
          " bytes do not fit the one-shot's blocks (a row per block)";
  } else {
    for (int q = 0; q < s->world; ++q) p.regions[q] = s->regions[q];
    p.slot_lines = 2 * SlotVectors(s->max_bytes);
    p.rank = s->rank;
    p.mine = s->local;
  }
  return kernel;
}

void Launch(Kernel kernel, const Params& params, const Grid& grid, int device, size_t shared_bytes = 0) {
  Params p = params;
  auto stream = static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, device));
  const int previous = CurrentDevice();
  if (previous != device) LAB_CHECK_CUDA(cudaSetDevice(device));
  void* args[] = {&p};
  const cudaError_t err = cudaLaunchKernel(reinterpret_cast<const void*>(kernel), dim3(grid.blocks),
                                           dim3(grid.threads), args, shared_bytes, stream);
  if (previous != device) cudaSetDevice(previous);
  LAB_CHECK_CUDA(err);
}

int64_t Bytes(const DLTensor* t) { return Numel(t) * ((int64_t(t->dtype.bits) * t->dtype.lanes + 7) / 8); }

void AllReduce(tvm::ffi::AnyView input_view, tvm::ffi::AnyView output_view) {
  DLTensor* input = input_view.cast<DLTensor*>();
  DLTensor* output = output_view.cast<DLTensor*>();
  CheckPair("lab.ccl.allreduce", input, output, "input and output");
  const int64_t nbytes = Bytes(input);
  if (nbytes == 0) return;
  Params p{};
  std::string why;
  const Kernel kernel = OneShotFor(input, nbytes, false, 0, 0, p, why);
  if (kernel == nullptr) return Fallback(input_view, output_view, why);
  p.input = lab::Data<const char>(input);
  p.output = lab::Data<char>(output);
  p.nbytes = nbytes;
  p.aligned = (reinterpret_cast<uintptr_t>(p.input) % 16 == 0) && (reinterpret_cast<uintptr_t>(p.output) % 16 == 0);
  const Grid grid = GridFor((nbytes + 15) / 16);
  p.per_block = grid.per_block;
  Launch(kernel, p, grid, input->device.device_id);
}

// lab.ccl.allreduce_add_rms_norm(partial, residual, norm_weight, eps, output, normed):
// output = residual + sum over ranks of partial; normed = rms_norm(output) * norm_weight over the
// last dimension. The one-shot kernel with a block per row where it applies; else TVM's CCL
// into output, then AddRmsNorm.
void AllReduceAddRmsNorm(tvm::ffi::AnyView partial_view, tvm::ffi::AnyView residual_view,
                         tvm::ffi::AnyView weight_view, double eps, tvm::ffi::AnyView output_view,
                         tvm::ffi::AnyView normed_view) {
  const char* fn = "lab.ccl.allreduce_add_rms_norm";
  DLTensor* partial = partial_view.cast<DLTensor*>();
  DLTensor* residual = residual_view.cast<DLTensor*>();
  DLTensor* weight = weight_view.cast<DLTensor*>();
  DLTensor* output = output_view.cast<DLTensor*>();
  DLTensor* normed = normed_view.cast<DLTensor*>();
  CheckPair(fn, partial, output, "partial and output");
  CheckPair(fn, partial, residual, "partial and residual");
  CheckPair(fn, partial, normed, "partial and normed");
  if (partial->ndim < 1 || weight->ndim != 1 || weight->shape[0] != partial->shape[partial->ndim - 1] ||
      weight->dtype.code != partial->dtype.code || weight->dtype.bits != partial->dtype.bits)
    TVM_FFI_THROW(ValueError) << fn << ": norm_weight must be a vector of the rows' width and dtype";
  if (partial->device.device_type != kDLCUDA)
    TVM_FFI_THROW(ValueError) << fn << ": the tensors are not on a CUDA device";
  const int64_t nbytes = Bytes(partial), row_bytes = Bytes(weight);
  if (nbytes == 0) return;
  if (row_bytes % 16 != 0 || KernelFor(partial->dtype, 2) == nullptr)
    TVM_FFI_THROW(ValueError) << fn << ": rows must be float16, bfloat16 or float32 and a multiple of 16 bytes";
  const char* data[] = {lab::Data<const char>(partial), lab::Data<const char>(residual), lab::Data<const char>(weight),
                        lab::Data<const char>(output), lab::Data<const char>(normed)};
  for (const char* d : data)
    if (reinterpret_cast<uintptr_t>(d) % 16 != 0) TVM_FFI_THROW(ValueError) << fn << ": a tensor is not 16-byte aligned";
  const int64_t rows = nbytes / row_bytes, row_vectors = row_bytes / 16;
  const int device = partial->device.device_id;
  Params p{};
  std::string why;
  const Kernel kernel = OneShotFor(partial, nbytes, true, rows, row_vectors, p, why);
  if (kernel != nullptr) {
    p.input = lab::Data<const char>(partial);
    p.output = lab::Data<char>(output);
    p.nbytes = nbytes;
    p.aligned = 1;
    p.per_block = int(row_vectors);
    p.residual = lab::Data<const char>(residual);
    p.normed = lab::Data<char>(normed);
    p.norm_weight = lab::Data<const char>(weight);
    p.eps = float(eps);
    const Grid grid{int(rows), int(row_vectors), int(std::min<int64_t>(kAddNormThreads, (row_vectors + 31) / 32 * 32))};
    return Launch(kernel, p, grid, device, size_t(3 * row_bytes));
  }
  Fallback(partial_view, output_view, why);
  auto stream = static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, device));
  const int threads = int(std::min<int64_t>(kThreads, (row_vectors + 31) / 32 * 32));
  AddNormFor(partial->dtype)<<<unsigned(rows), threads, 0, stream>>>(
      lab::Data<char>(output), lab::Data<const char>(residual), lab::Data<char>(normed), lab::Data<const char>(weight),
      row_vectors, float(eps));
  LAB_CHECK_CUDA(cudaGetLastError());
}

}  // namespace

TVM_FFI_STATIC_INIT_BLOCK() {
  namespace refl = tvm::ffi::reflection;
  refl::GlobalDef()
      .def("lab.ccl.ipc_create", IpcCreate)
      .def("lab.ccl.ipc_open", IpcOpen)
      .def("lab.ccl.ipc_status", IpcStatus)
      .def("lab.ccl.ipc_disable", IpcDisable)
      .def("lab.ccl.allreduce", AllReduce)
      .def("lab.ccl.allreduce_add_rms_norm", AllReduceAddRmsNorm);
}
