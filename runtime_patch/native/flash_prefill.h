// The prefill's fused causal attention (flash_prefill.cu), called by cuda_attention.cu for both
// prefill slots (TVM's paged cache's ragged prefill, the static cache's prompt chunks).
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace lab {

// Causal (or full) attention of n query rows over m keys, query row i seeing keys j <= i + m - n.
struct FlashPrefillArgs {
  const __half* q = nullptr;       // query row i of head h at q + i * q_ld + h * d
  int64_t q_ld = 0;                // also the output's row stride
  const __half* k = nullptr;       // key j of KV head g at k + j * kv_ld + g * kv_head_stride (v alike)
  const __half* v = nullptr;
  int64_t kv_ld = 0, kv_head_stride = 0;
  __half* out = nullptr;           // as q
  float* lse = nullptr;            // base-2 log-sum-exp of row i, head h at lse[(lse_row0 + i) * q_heads + h]; or null
  int64_t lse_row0 = 0;
  int64_t n = 0, m = 0, q_heads = 0, kv_heads = 0, d = 0;
  bool causal = true;
  float scale2 = 0.f;              // sm_scale * log2(e): scores in base 2
  bool warpgroup = true;           // the warpgroup-MMA kernel where it applies (d = 128 on sm_90)
};

// Whether the fused kernel handles these shapes on a device of compute capability `major`
// (tensor-core mma.sync needs 8.0): d of 32, 64 or 128 and rows on 16-byte boundaries.
bool FlashPrefillApplies(const FlashPrefillArgs& args, int major);

// Launches it on `stream` (FlashPrefillApplies must hold): on a device of compute capability 9.0
// with d = 128 and args.warpgroup, the warpgroup-MMA (wgmma) kernel, else the mma.sync one. The
// scores and probabilities stay in registers: nothing of size n x m is written to memory.
void FlashPrefill(const FlashPrefillArgs& args, cudaStream_t stream);

}  // namespace lab
