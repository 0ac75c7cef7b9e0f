// Another kernel's operands pulled into L2 by a latency-bound kernel (sm_90), so that the bytes the
// next kernel reads come from L2 instead of HBM.
//
// Why: at batch 1 a decode layer's attention (~4.5 us on an H200) and its RMSNorms (~1.9 us) read
// a few hundred KB each; HBM is idle while they run, then the next GEMV streams its weight at the
// copy bandwidth. A kernel that issues `cp.async.bulk.prefetch.L2` for the next GEMV's weight (a
// hint: no registers, no waiting, the copy engine of the SM (TMA) fetches the lines) moves those
// bytes into the idle time. The GEMV then finds them in L2 (or in flight: its loads join the
// prefetch's, no line is read twice).
//
// The host side (PrefetchRanges) turns tensors into byte ranges, at most `budget` bytes in all (a
// prefetch larger than what L2 keeps evicts its own first lines), 16-byte aligned as the
// instruction needs (a tensor's first and last few bytes may be left out: a hint loses nothing).
// The device side (PrefetchIntoL2) spreads the ranges' chunks over every thread of the grid, one
// instruction per chunk; a kernel calls it once, after issuing its own first loads (which then
// stand ahead of the prefetch in the memory system).
#pragma once

#include <cuda_runtime.h>
#include <dlpack/dlpack.h>
#include <tvm/ffi/error.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace lab {

constexpr int kMaxPrefetchRanges = 4;
constexpr int64_t kPrefetchChunk = 4096;  // bytes per prefetch instruction

struct L2Prefetch {
  const char* base[kMaxPrefetchRanges] = {};
  int64_t bytes[kMaxPrefetchRanges] = {};  // multiples of 16
  int ranges = 0;
};

// `tensors` (on `device`, in order) as ranges of at most `budget` bytes in all; none for budget 0.
inline L2Prefetch PrefetchRanges(const char* fn, const std::vector<const DLTensor*>& tensors, int device,
                                 int64_t budget) {
  if (tensors.size() > size_t(kMaxPrefetchRanges))
    TVM_FFI_THROW(ValueError) << fn << ": at most " << kMaxPrefetchRanges << " tensors to prefetch, got "
                              << tensors.size();
  L2Prefetch p;
  for (const DLTensor* t : tensors) {
    if (t->device.device_type != kDLCUDA || t->device.device_id != device)
      TVM_FFI_THROW(ValueError) << fn << ": a tensor to prefetch is not on the kernel's GPU (cuda:" << device << ")";
    int64_t bytes = (int64_t(t->dtype.bits) * t->dtype.lanes + 7) / 8;
    for (int i = 0; i < t->ndim; ++i) bytes *= t->shape[i];
    const uintptr_t start = reinterpret_cast<uintptr_t>(t->data) + t->byte_offset;
    const uintptr_t aligned = (start + 15) & ~uintptr_t(15);
    bytes = std::min<int64_t>(budget, bytes - int64_t(aligned - start)) & ~int64_t(15);
    if (bytes <= 0) continue;
    p.base[p.ranges] = reinterpret_cast<const char*>(aligned);
    p.bytes[p.ranges++] = bytes;
    budget -= bytes;
  }
  return p;
}

// Every thread of the grid calls it (any grid shape); `p` is the same for all of them.
__device__ __forceinline__ void PrefetchIntoL2(const L2Prefetch& p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (p.ranges == 0) return;
  const int64_t workers = int64_t(gridDim.x) * gridDim.y * gridDim.z * blockDim.x;
  const int64_t worker =
      ((int64_t(blockIdx.z) * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t first = 0;  // the range's first chunk in the grid's numbering
  for (int r = 0; r < p.ranges; ++r) {
    const int64_t chunks = (p.bytes[r] + kPrefetchChunk - 1) / kPrefetchChunk;
    // the first chunk of this range at or after `worker` in steps of `workers`
    for (int64_t i = ((worker - first) % workers + workers) % workers; i < chunks; i += workers) {
      const int64_t offset = i * kPrefetchChunk;
      const uint32_t size = uint32_t(min(kPrefetchChunk, p.bytes[r] - offset));
      asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p.base[r] + offset), "r"(size) : "memory");
    }
    first += chunks;
  }
#endif
}

}  // namespace lab
