// The KV caches' attention on the GPU: TVM's paged cache (in the slots where TVM puts its TIR
// kernels, engine/model/kv_cache.py, with those kernels' arguments and results) and the project's
// static cache (engine/model/static_kv.py). TVM's kernels use no tensor cores, and its decode
// kernel runs one thread block per (sequence, KV head): 8 blocks for a batch-1 Llama-3-8B step on a
// GPU of 132 SMs.
//
// lab.attention.prefill_ragged: the self-attention of a prefill over the tokens it appends,
//   (q [n, Hq, d], q_indptr [b+1], k [m, Hkv, d], v [m, Hkv, d], kv_indptr [b+1],
//    q_rope_position, k_rope_pos_offset, output [n, Hq, d], lse [n, Hq] float32,
//    causal, rotary_mode, rope_scale, rope_theta, sm_scale)
//   per sequence: the fused flash attention of flash_prefill.cu (tensor cores, scores kept in
//   registers) where the head dim is 32, 64 or 128 on compute capability 8.0 or newer. Otherwise
//   (or after lab.attention.prefill_path("unfused"), for the benchmarks) per chunk of query rows:
//   S = Q K^T as cuBLAS strided-batched GEMMs (float16 in, float32 out, tensor cores), a causal
//   softmax kernel of ours writing float16 P, O = P V the same way. A chunk's S and P live in a
//   workspace of at most kWorkspaceBytes per device (grown on demand); with causal masking a chunk
//   only reads the keys its last row can see.
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
//
// The static cache: cache [layers, 2 (K, V), slots, Hkv, max_len, d] float16, positions [slots]
// int32 (each slot's length), ids [slots, 1] int32. Its functions are called inside the decode
// step's CUDA graph (TVM captures them), so a decode launch depends only on the tensors' shapes
// (never on a length read to the host) and uses buffers that never move once allocated:
// lab.kv.prefill_attention(q [n, Hq, d], k [n, Hkv, d], v, cache, layer, slot, start, sm_scale, out)
//   the chunk's k and v written at positions start.. of the slot, then the causal attention of its
//   queries over positions 0..start+n, the prefill's attention above with keys read in place.
// lab.kv.prefill_attention_rope(qkv [n, Hq + 2 Hkv, d], cache, layer, slot, start, rope_theta,
//   rope_factor, low_freq_factor, high_freq_factor, original_max_position_embeddings, sm_scale, out)
//   the same on a layer's fused projection: one kernel (RopeAppendRows) rotates q into out and k
//   into the cache (RoPE at positions start.., RopeSpec, as the decode below rotates) and copies v
//   there, then the attention with out as its q; what the model's prefill calls (no RoPE kernel).
//   out may have fewer rows than qkv, r: the attention of the chunk's last r rows only (every
//   row's k and v still written; the model's last layer in a prefill asks for its last row).
// lab.kv.decode_attention(q [b, Hq, d], k [b, Hkv, d], v, cache, layer, positions, sm_scale, out)
//   one token per slot at positions[slot]: its k and v written there, attention over 0..position.
//   Split over the keys as decode_paged, with the splits fixed by the shapes (fill the GPU, at
//   most one per StaticKeysPerSplit keys of max_len: 256 for Llama's heads) and, on the device,
//   only as many used as the length needs. A context up to StaticKeysPerSplit keys is one block
//   per (slot, KV head) that writes the output itself; a longer one's last block of a (slot, KV
//   head) to finish merges the splits (an arrival counter per (slot, KV head), reset by that
//   block), so a step is one kernel whatever the context. On sm_90, where few (slot, KV head)
//   pairs would leave most SMs idle (batch 1) and the cache is short, a thread-block cluster per
//   pair shares the context instead (ClusterSize): on the tensor cores where head_dim is 64 or 128
//   (StaticDecodeMma), else StaticDecodeCluster. Every static decode kernel is launched while the
//   kernel ahead (the qkv projection's GEMV) still runs, where that kernel allows it
//   (lab::LaunchAfterPrevious: StaticDecodeMma loads its first cache tile before
//   lab::WaitForPrevious), and lets the o projection's GEMV start early in turn (lab::AllowNext).
// lab.kv.decode_attention_rope(qkv [b, Hq + 2 Hkv, d], cache, layer, positions, rope_theta,
//   rope_factor, low_freq_factor, high_freq_factor, original_max_position_embeddings, sm_scale,
//   invariant, out)   the same on a layer's fused projection, q and k rotated in the kernel (RoPE at
//   positions[slot], RopeSpec); what the model's decode step calls (no RoPE kernel before it).
// lab.kv.argmax(logits [b, vocab] float32, out [b] int32)   the greedy tokens (ArgmaxRows)
// lab.kv.advance(next [b], ids, positions, out)     ids[:, 0] = next, positions += 1, out = next; and
//                                                   the tokens into the device's mailbox, if it has one
//   (argmax and advance are launched while the kernel ahead still runs, lab::LaunchAfterPrevious,
//   and wait for it before reading anything: after the decode's graph the LM head's GEMV lets the
//   argmax start at once, and the argmax the advance, so neither waits for a launch)
// lab.kv.mailbox() -> address                       pinned host words the advance calls write (below)
// lab.kv.settle_prefill(next [n], ids, positions, slot, length, out)
//                                                   ids[slot] = next[n-1], positions[slot] = length
// lab.kv.set_ids(new [b, 1], ids, out)              ids = new, out = new
#include <cooperative_groups.h>
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
#include <array>
#include <atomic>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "cuda_common.h"
#include "flash_prefill.h"
#include "mma_fragments.h"

namespace {

using lab::Data;
using lab::IsCompact;

constexpr int64_t kWorkspaceBytes = int64_t(256) << 20;
constexpr int kSoftmaxThreads = 256;

// A device buffer that grows on demand (freed and allocated again, after the stream's last use).
struct Growable {
  void* data = nullptr;
  int64_t bytes = 0;

  void* Get(int64_t need, cudaStream_t stream) {
    if (need > bytes) {
      if (data != nullptr) {
        LAB_CHECK_CUDA(cudaStreamSynchronize(stream));  // the last use of the old buffer is on it
        LAB_CHECK_CUDA(cudaFree(data));
      }
      LAB_CHECK_CUDA(cudaMalloc(&data, need));
      bytes = need;
    }
    return data;
  }
};

// Per (thread, device): the prefills' S/P workspace and log-sum-exp scratch, the paged decode's
// partials, and the device's SM count and compute capability (a disco worker is one thread on one
// device). Never used by a function that runs inside a captured CUDA graph: a buffer that grows
// moves.
struct DeviceState {
  Growable workspace, lse, partials;
  int sms = 0, major = 0;
};

DeviceState& State(int device) {
  thread_local std::unordered_map<int, DeviceState> states;
  DeviceState& s = states[device];
  if (s.sms == 0) s.sms = lab::Facts(device).sms, s.major = lab::Facts(device).major;
  return s;
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

// The weight 2^(x - top) of a base-2 log value x against the largest `top`, 0 for x = -inf (a
// share or team that saw no key; exp2f(-inf - -inf) would be NaN).
__device__ float Weight(float x, float top) { return x == -INFINITY ? 0.f : exp2f(x - top); }

// 8 consecutive halfs (a 16-byte vector) as floats.
__device__ void Unpack8(const uint4& raw, float* dst) {
  const __half2* h = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __half22float2(h[i]);
    dst[2 * i] = f.x, dst[2 * i + 1] = f.y;
  }
}

// A decode block's query vectors: lane l of each team holds elements 8l..8l+7 of the group's G
// heads (rows d apart from q_group; zeros past `group`). Loaded by the caller at the kernel's
// start, so that their latency overlaps the lengths' and RoPE's (AttendSplit uses them).
template <int D, int G>
struct QueryRows {
  uint4 raw[G];
  __device__ QueryRows(const __half* q_group, int group) {
    const int lane = threadIdx.x % (D / 8);
#pragma unroll
    for (int g = 0; g < G; ++g)
      raw[g] = g < group ? __ldg(reinterpret_cast<const uint4*>(q_group + g * D) + lane) : make_uint4(0, 0, 0, 0);
  }
};

// Where a decode block finds the key and value of token t. Paged: through the sequence's page
// table. Static: the slot's contiguous rows, the step's own token (at `pos`) from the step's k, v.
// load_key(t, i) / load_value(t, i): the 16-byte vector i (elements 8i..8i+7) of token t's key / value.
struct PagedKeys {
  const __half* pages;
  const int32_t* page_values;
  int p0, kv_heads, hk, page_size, d;

  __device__ const __half* key(int t) const {
    const int64_t page = page_values[p0 + t / page_size];
    return pages + ((page * 2 * kv_heads + hk) * page_size + t % page_size) * d;
  }
  __device__ uint4 load_key(int t, int i) const { return __ldg(reinterpret_cast<const uint4*>(key(t)) + i); }
  __device__ uint4 load_value(int t, int i) const {
    return __ldg(reinterpret_cast<const uint4*>(key(t) + int64_t(kv_heads) * page_size * d) + i);
  }
};

// The step's own key may be in shared memory (rotated by the kernel, StepRows::Rotate): read with a generic
// load; the cache's rows with __ldg.
struct StaticKeys {
  const __half* k_rows;  // the slot's KV head: [max_len, d]
  const __half* v_rows;
  const __half* k_new;   // the step's token: [d]
  const __half* v_new;
  int pos, d;

  __device__ uint4 load_key(int t, int i) const {
    return t == pos ? reinterpret_cast<const uint4*>(k_new)[i]
                    : __ldg(reinterpret_cast<const uint4*>(k_rows + int64_t(t) * d) + i);
  }
  __device__ uint4 load_value(int t, int i) const {
    return __ldg(reinterpret_cast<const uint4*>(t == pos ? v_new : v_rows + int64_t(t) * d) + i);
  }
};

// RoPE inside the static decode (lab.kv.decode_attention_rope): the rotation of the step's q and k
// at the slot's position as TVM's llama_rope_with_position_map computes it (float32 angle and
// cos/sin, x * cos + rotate_half(x) * sin rounded once to float16), the angle of element i < d/2
// (and i + d/2) pos * freqs[i]: the frequencies (RopeFrequencies, with Llama-3's scaling where
// asked) are computed once on the host in double precision and rounded, where TVM divides by a
// float32 power on every call (at most an ulp of the angle apart; the power and the division were
// ~200 of a decode warp's instructions).
struct RopeSpec {
  const float* freqs = nullptr;  // [d / 2] on the device; null: no RoPE (q and k come rotated)
};

// The angle of element i < d/2 (and i + d/2) at position `pos`.
__device__ float RopeAngle(const RopeSpec& rope, int pos, int i) { return float(pos) * __ldg(rope.freqs + i); }

// cos_sin[i] = cos, cos_sin[d/2 + i] = sin of element i's angle at `pos`, for i < d/2, by the
// block's first d/2 threads (the caller synchronises before use).
template <int D>
__device__ void RopeTable(const RopeSpec& rope, int pos, float* cos_sin) {
  const int i = threadIdx.x;
  if (i >= D / 2) return;
  sincosf(RopeAngle(rope, pos, i), &cos_sin[D / 2 + i], &cos_sin[i]);
}

// x: the 8 elements 8l..8l+7 of a head held by lane l of a team of D / 8 lanes (every lane of the
// warp calls it); rotated by the table and rounded to float16 (as a stored rotated q or k is).
template <int D>
__device__ void RotateHalf(float* x, const float* cos_sin) {
  constexpr int kTeam = D / 8;
  const int l = threadIdx.x % kTeam;
  const bool first = l < kTeam / 2;
#pragma unroll
  for (int t = 0; t < 8; ++t) {
    const float partner = __shfl_xor_sync(0xffffffffu, x[t], kTeam / 2);
    const int i = (l % (kTeam / 2)) * 8 + t;
    const float rotated = cos_sin[i] * x[t] + cos_sin[D / 2 + i] * (first ? -partner : partner);
    x[t] = __half2float(__float2half(rotated));
  }
}

// Keys a team loads before it computes on them (unrolled: U keys' 16-byte loads in flight per
// lane at once; a loop that loaded one key per iteration waited a full memory latency per key).
// Fewer for 8 query heads per KV head, whose q and output rows take the registers.
__host__ __device__ constexpr int KeysInFlight(int group) { return group <= 4 ? 8 : 4; }

// A block's share [t0, t1) of one (sequence b, KV head hk)'s keys. A key is handled by a team of
// D / 8 lanes, each with 8 elements of head_dim (16-byte loads); the block's teams take U keys
// each per round (consecutive keys to consecutive teams), all loaded before any is used, and a
// round computes only as many keys as the share has. Each team keeps an online softmax per query
// head of the KV group; the teams of a warp are combined with shuffles, the warps in shared
// memory, into the share's normalized output and base-2 lse, handed to `emit(g, j, o, lse,
// head_row)` for each element j of each query head g of the group (head_row = b * q_heads +
// hk * group + g; lse is -inf for a share without keys). Every thread of the block must call it
// (it synchronises).
// query: the group's query vectors (QueryRows); rope_cs: null, or the RopeTable of the sequence's
// position (q is rotated here).
template <int D, int G, int Warps, class Keys, class Emit>  // G: query heads per KV head this instance holds
__device__ void AttendSplit(const QueryRows<D, G>& query, const float* rope_cs, const Keys& keys, int b, int hk,
                            int group, int t0, int t1, float scale2, const Emit& emit) {
  constexpr int kTeam = D / 8, kTeams = Warps * 32 / kTeam, U = KeysInFlight(G);
  __shared__ float sm_m[Warps][G], sm_d[Warps][G];
  __shared__ float sm_o[Warps][G][D];
  const int team = threadIdx.x / kTeam, lane = threadIdx.x % kTeam, warp = threadIdx.x / 32;
  const int q_heads = int(gridDim.y) * group;

  float qr[G][8], o[G][8], m[G], d[G];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    m[g] = -INFINITY;
    d[g] = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) o[g][i] = 0.f, qr[g][i] = 0.f;
    if (g < group) {
      Unpack8(query.raw[g], qr[g]);
      if (rope_cs != nullptr) RotateHalf<D>(qr[g], rope_cs);
    }
  }
  // Every lane of a warp runs the same rounds (the shuffles need the whole warp); a key past the
  // split's end is loaded as zeros and given no weight.
  for (int base = t0; base < t1; base += kTeams * U) {
    uint4 kr[U], vr[U];
#pragma unroll
    for (int j = 0; j < U; ++j) {
      const int t = base + j * kTeams + team;
      kr[j] = vr[j] = make_uint4(0, 0, 0, 0);
      if (t < t1) {
        kr[j] = keys.load_key(t, lane);
        vr[j] = keys.load_value(t, lane);
      }
    }
    float s[G][U];
#pragma unroll
    for (int g = 0; g < G; ++g)
#pragma unroll
      for (int j = 0; j < U; ++j) s[g][j] = 0.f;
#pragma unroll
    for (int j = 0; j < U; ++j) {
      if (base + j * kTeams >= t1) break;  // no team has key j of this round (the same for the block)
      const __half2* h = reinterpret_cast<const __half2*>(&kr[j]);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float2 f = __half22float2(h[i]);
#pragma unroll
        for (int g = 0; g < G; ++g) s[g][j] += qr[g][2 * i] * f.x + qr[g][2 * i + 1] * f.y;
      }
    }
#pragma unroll
    for (int g = 0; g < G; ++g) {
      float top = m[g];
#pragma unroll
      for (int j = 0; j < U; ++j) {
        if (base + j * kTeams >= t1) break;
#pragma unroll
        for (int offset = kTeam / 2; offset > 0; offset /= 2) s[g][j] += __shfl_xor_sync(0xffffffffu, s[g][j], offset);
        const bool valid = base + j * kTeams + team < t1;
        s[g][j] = valid ? s[g][j] * scale2 : -INFINITY;
        top = fmaxf(top, s[g][j]);
      }
      // top is finite once the team has seen a key; before that every weight below is 0
      const float rescale = Weight(m[g], top);
      d[g] *= rescale;
#pragma unroll
      for (int i = 0; i < 8; ++i) o[g][i] *= rescale;
#pragma unroll
      for (int j = 0; j < U; ++j) {
        if (base + j * kTeams >= t1) break;
        s[g][j] = Weight(s[g][j], top);
        d[g] += s[g][j];
      }
      m[g] = top;
    }
#pragma unroll
    for (int j = 0; j < U; ++j) {
      if (base + j * kTeams >= t1) break;
      const __half2* h = reinterpret_cast<const __half2*>(&vr[j]);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float2 f = __half22float2(h[i]);
#pragma unroll
        for (int g = 0; g < G; ++g) {
          o[g][2 * i] += s[g][j] * f.x;
          o[g][2 * i + 1] += s[g][j] * f.y;
        }
      }
    }
  }
  // The teams of a warp hold the same elements of head_dim (lane % kTeam): combine them.
#pragma unroll
  for (int offset = kTeam; offset < 32; offset *= 2) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
      const float m_o = __shfl_xor_sync(0xffffffffu, m[g], offset);
      const float d_o = __shfl_xor_sync(0xffffffffu, d[g], offset);
      const float top = fmaxf(m[g], m_o);
      const float a = Weight(m[g], top);
      const float c = Weight(m_o, top);
      d[g] = d[g] * a + d_o * c;
#pragma unroll
      for (int i = 0; i < 8; ++i) o[g][i] = o[g][i] * a + __shfl_xor_sync(0xffffffffu, o[g][i], offset) * c;
      m[g] = top;
    }
  }
  if (threadIdx.x % 32 < kTeam) {
#pragma unroll
    for (int g = 0; g < G; ++g) {  // static indices keep m, d and o in registers
      if (g >= group) break;
      if (lane == 0) sm_m[warp][g] = m[g], sm_d[warp][g] = d[g];
#pragma unroll
      for (int i = 0; i < 8; ++i) sm_o[warp][g][lane * 8 + i] = o[g][i];
    }
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < group * D; idx += blockDim.x) {
    const int g = idx / D, j = idx % D;
    float top = -INFINITY;
#pragma unroll
    for (int w = 0; w < Warps; ++w) top = fmaxf(top, sm_m[w][g]);
    float dsum = 0.f, osum = 0.f;
    if (top != -INFINITY) {
#pragma unroll
      for (int w = 0; w < Warps; ++w) {
        const float a = Weight(sm_m[w][g], top);
        dsum += sm_d[w][g] * a;
        osum += sm_o[w][g][j] * a;
      }
    }
    emit(g, j, dsum > 0.f ? osum / dsum : 0.f, dsum > 0.f ? top + log2f(dsum) : -INFINITY,
         int64_t(b) * q_heads + hk * group + g);
  }
}

// Where AttendSplit's share goes. Partials: a split's row (head_row * splits + split) of the
// global partials, merged later. Direct: the output itself (the share is the whole context).
// Shared: this block's shared memory, o [G][D] and lse [G] (a cluster combines them).
struct PartialsOut {
  float* part_o;
  float* part_lse;
  int split, splits, d;
  __device__ void operator()(int g, int j, float o, float lse, int64_t head_row) const {
    const int64_t row = head_row * splits + split;
    part_o[row * d + j] = o;
    if (j == 0) part_lse[row] = lse;
  }
};

struct DirectOut {
  __half* out;
  int d;
  __device__ void operator()(int g, int j, float o, float lse, int64_t head_row) const {
    out[head_row * d + j] = __float2half(o);
  }
};

struct PartialsOrDirect {
  PartialsOut partials;
  DirectOut direct;
  bool whole;  // the share is the whole context: the output itself
  __device__ void operator()(int g, int j, float o, float lse, int64_t head_row) const {
    if (whole) {
      direct(g, j, o, lse, head_row);
    } else {
      partials(g, j, o, lse, head_row);
    }
  }
};

struct SharedOut {
  float* o;
  float* lse;
  int d;
  __device__ void operator()(int g, int j, float value, float l, int64_t head_row) const {
    o[g * d + j] = value;
    if (j == 0) lse[g] = l;
  }
};

constexpr int kMaxSplits = 64;

__device__ float WarpMax(float x) {
  for (int offset = 16; offset > 0; offset /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

__device__ float WarpSum(float x) {
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// Merge the first `used` of the `splits` partials of `nrows` (at most kMaxGroup) consecutive
// query-head rows from `row0` into out (and lse, where given), with the whole block (its size a
// multiple of 32). Every partial's lse is loaded once into shared memory and turned into its
// weight 2^(lse - max) by a warp per row; then each output element sums its weighted partials
// with independent loads (unrolled, so they are in flight together: one load after another made
// the merge latency-bound, 14-28 us per call). Loads bypass L1 (__ldcg): the partials may come
// from other blocks of the same kernel.
__device__ void MergeRows(const float* part_o, const float* part_lse, int64_t row0, int nrows, int used, int splits,
                          int d, __half* __restrict__ out, float* __restrict__ lse) {
  __shared__ float weight[kMaxGroup][kMaxSplits];
  __shared__ float top[kMaxGroup], total[kMaxGroup];
  for (int i = threadIdx.x; i < nrows * used; i += blockDim.x)
    weight[i / used][i % used] = __ldcg(part_lse + (row0 + i / used) * splits + i % used);
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int r = warp; r < nrows; r += blockDim.x / 32) {
    float m = -INFINITY;
    for (int s = lane; s < used; s += 32) m = fmaxf(m, weight[r][s]);
    m = WarpMax(m);
    float sum = 0.f;
    for (int s = lane; s < used; s += 32) {
      const float w = Weight(weight[r][s], m);  // m = -inf only where every weight is
      weight[r][s] = w;
      sum += w;
    }
    sum = WarpSum(sum);
    if (lane == 0) top[r] = m, total[r] = sum;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < nrows * d; i += blockDim.x) {
    const int r = i / d, j = i % d;
    const float* partial = part_o + (row0 + r) * splits * d + j;
    float acc = 0.f;
#pragma unroll 8
    for (int s = 0; s < used; ++s) acc += weight[r][s] * __ldcg(partial + int64_t(s) * d);
    out[(row0 + r) * d + j] = __float2half(total[r] > 0.f ? acc / total[r] : 0.f);
  }
  if (lse != nullptr && threadIdx.x < nrows)
    lse[row0 + threadIdx.x] = total[threadIdx.x] > 0.f ? top[threadIdx.x] + log2f(total[threadIdx.x]) : kEmptyLse;
}

// Paged: a block per (split, KV head, sequence), the key range from the page table's lengths.
template <int D, int G>
__global__ void __launch_bounds__(kDecodeWarps * 32)
DecodePartial(const __half* __restrict__ q, const __half* __restrict__ pages, const int32_t* __restrict__ page_indptr,
              const int32_t* __restrict__ page_values, const int32_t* __restrict__ last_page_len,
              float* __restrict__ part_o, float* __restrict__ part_lse, int kv_heads, int group, int page_size,
              int splits, float scale2) {
  const int split = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;
  const int p0 = page_indptr[b], p1 = page_indptr[b + 1];
  const QueryRows<D, G> query(q + (int64_t(b) * kv_heads + hk) * group * D, group);
  const int len = p1 > p0 ? (p1 - p0 - 1) * page_size + last_page_len[b] : 0;
  const int chunk = (len + splits - 1) / splits;
  const int t0 = split * chunk, t1 = min(len, t0 + chunk);
  AttendSplit<D, G, kDecodeWarps>(query, nullptr, PagedKeys{pages, page_values, p0, kv_heads, hk, page_size, D}, b,
                                  hk, group, t0, t1, scale2, PartialsOut{part_o, part_lse, split, splits, D});
}

// One block per (sequence, query head), a thread per element of head_dim: merge the splits.
__global__ void DecodeMerge(const float* __restrict__ part_o, const float* __restrict__ part_lse,
                            __half* __restrict__ out, float* __restrict__ lse, int splits, int d) {
  MergeRows(part_o, part_lse, blockIdx.x, 1, splits, splits, d, out, lse);
}

// The step's token (k_new, v_new: its rows of one (slot, KV head)) into that head's cache rows at
// `pos`, by the block whose share of the keys ends with it.
template <int D>
__device__ void AppendToken(const __half* k_new, const __half* v_new, __half* k_rows, __half* v_rows, int pos) {
  for (int i = threadIdx.x; i < D; i += blockDim.x) {
    k_rows[int64_t(pos) * D + i] = k_new[i];
    v_rows[int64_t(pos) * D + i] = v_new[i];
  }
}

// Where a static decode step finds its tokens: q [b, Hq, d] and k, v [b, Hkv, d] (lab.kv.
// decode_attention: rotated already), or the rows of a layer's fused projection qkv
// [b, Hq + 2 Hkv, d] (lab.kv.decode_attention_rope: q at head 0, k at Hq, v at Hq + Hkv; the kernel
// rotates q and k, rope.freqs != null). Strides in elements between slots.
struct StepQkv {
  const __half* q;
  const __half* k;
  const __half* v;
  int64_t q_stride, kv_stride;
  RopeSpec rope;
};

// A block's view of its (slot b, KV head hk): the group's query rows and the step's key and value
// rows, all loaded at the kernel's start, before the slot's length is known (StepRows), then
// (Rotate) the RoPE table and the step's key rotated into shared memory where the block's share
// ends with the token (`owner`, the same for the whole block; no other block reads the token's
// key). A first version loaded the key and the query only after the table and a barrier: three
// memory round trips in a row instead of one, and the kernel took 1 us longer than without RoPE.
template <int D>
struct RopeShared {
  float cos_sin[D];
  __align__(16) __half k_rotated[D];
};

template <int D, int G>
struct StepRows {
  const __half* k_new;
  const __half* v_new;
  QueryRows<D, G> query;
  uint4 k_raw;  // lane (threadIdx.x % (D / 8))'s vector of the step's key, for the first warp (RoPE)

  __device__ StepRows(const StepQkv& step, int b, int hk, int group)
      : k_new(step.k + b * step.kv_stride + int64_t(hk) * D),
        v_new(step.v + b * step.kv_stride + int64_t(hk) * D),
        query(step.q + b * step.q_stride + int64_t(hk) * group * D, group),
        k_raw(make_uint4(0, 0, 0, 0)) {
    if (step.rope.freqs != nullptr && threadIdx.x < 32)
      k_raw = __ldg(reinterpret_cast<const uint4*>(k_new) + threadIdx.x % (D / 8));
  }

  // With RoPE: the table of `pos` (returned, in `shared`) and, for the owner, the rotated key as
  // k_new. Every thread calls it (it synchronises); null and nothing done without RoPE.
  __device__ const float* Rotate(const StepQkv& step, int pos, bool owner, RopeShared<D>& shared) {
    constexpr int kTeam = D / 8;
    if (step.rope.freqs == nullptr) return nullptr;
    RopeTable<D>(step.rope, pos, shared.cos_sin);
    __syncthreads();
    if (owner && threadIdx.x < 32) {  // the first warp (every lane: RotateHalf shuffles)
      float x[8];
      Unpack8(k_raw, x);
      RotateHalf<D>(x, shared.cos_sin);
      if (threadIdx.x < kTeam) {
        __align__(16) __half h[8];
#pragma unroll
        for (int t = 0; t < 8; ++t) h[t] = __float2half(x[t]);  // exact: x is rounded already
        reinterpret_cast<uint4*>(shared.k_rotated)[threadIdx.x] = *reinterpret_cast<const uint4*>(h);
      }
    }
    __syncthreads();
    if (owner) k_new = shared.k_rotated;
    return shared.cos_sin;
  }
};

// Whether this block is the last of `count` blocks to arrive at `counter` (every thread calls it).
// The block's global writes before the call are visible to the last block when it returns true
// there; the last block resets the counter itself when done (graph-safe).
__device__ bool LastToArrive(unsigned* counter, unsigned count) {
  __shared__ bool last;
  __threadfence();  // this block's writes are visible before its arrival is
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(counter, 1u) == count - 1;
  __syncthreads();
  if (last) __threadfence();
  return last;
}

// The static decode's blocks: 8 warps (4 at head_dim 256, whose shared combine is twice as large).
__host__ __device__ constexpr int StaticWarps(int d) { return d >= 256 ? 4 : 8; }

// Keys per split of the static decode: two rounds of the block's teams. A context up to this
// long is one block per (slot, KV head) that writes the output itself (no partials, no merge: at
// a 128-256-token context the merge's arrival and second pass were most of the kernel's time);
// a longer one is split, one block per this many keys, up to the launch's `splits`.
__host__ __device__ constexpr int StaticKeysPerSplit(int d, int group) {
  return 2 * (StaticWarps(d) * 32 / (d / 8)) * KeysInFlight(group);
}

// A block's share [t0, t1) of (slot b, KV head hk)'s keys, the token at `pos`: RoPE
// (StepRows::Rotate), the attention over the share handed to `emit`, and, by the block whose share
// ends with the token, its key and value appended to the cache. Every thread calls it (it
// synchronises); a kernel calls it once (AttendSplit's shared memory is per instance).
template <int D, int G, class Emit>
__device__ void AttendStaticShare(const StepQkv& step, StepRows<D, G>& rows, RopeShared<D>& rope_shared,
                                  __half* k_cache, __half* v_cache, int b, int hk, int group, int pos, int max_len,
                                  int t0, int t1, float scale2, const Emit& emit) {
  const int len = pos + 1;
  const bool owner = t0 < len && t1 == len;
  const float* rope_cs = rows.Rotate(step, pos, owner, rope_shared);
  const int64_t head = int64_t(b) * gridDim.y + hk;
  __half* k_rows = k_cache + head * max_len * D;
  __half* v_rows = v_cache + head * max_len * D;
  const StaticKeys keys{k_rows, v_rows, rows.k_new, rows.v_new, pos, D};
  AttendSplit<D, G, StaticWarps(D)>(rows.query, rope_cs, keys, b, hk, group, t0, t1, scale2, emit);
  if (owner) AppendToken<D>(rows.k_new, rows.v_new, k_rows, v_rows, pos);
}

// Static: a block per (split, KV head, slot); slot b's token is at positions[b], so the context is
// positions[b] + 1 keys, shared by the first `used` splits (one per StaticKeysPerSplit keys, at
// most `splits`); the others return at once. The block whose share ends with the token writes its
// k and v into the cache. With one split used, that block writes the output; otherwise the last
// of the used blocks of (b, hk) to arrive merges them and resets the arrival counter for the next
// step.
template <int D, int G>
__global__ void __launch_bounds__(StaticWarps(D) * 32)
StaticDecode(StepQkv step, __half* __restrict__ k_cache, __half* __restrict__ v_cache,
             const int32_t* __restrict__ positions, float* __restrict__ part_o, float* __restrict__ part_lse,
             unsigned* __restrict__ arrivals, __half* __restrict__ out, int group, int max_len, int splits,
             float scale2) {
  constexpr int kKeys = StaticKeysPerSplit(D, G);
  __shared__ RopeShared<D> rope_shared;
  const int split = blockIdx.x, hk = blockIdx.y, b = blockIdx.z, kv_heads = gridDim.y;
  lab::WaitForPrevious();  // launched early (StaticDecodeLaunch): the step's q, k, v are the previous kernel's
  const int position = positions[b];
  StepRows<D, G> rows(step, b, hk, group);
  lab::AllowNext();  // the next kernel (the o projection's GEMV) may load its weights meanwhile
  const int pos = min(max(position, 0), max_len - 1);  // the host keeps it in range; never write outside
  const int len = pos + 1;
  const int used = min(splits, (len + kKeys - 1) / kKeys);
  if (split >= used) return;
  const int64_t head = (int64_t(b) * kv_heads + hk);
  const int chunk = (len + used - 1) / used;
  const int t0 = split * chunk, t1 = min(len, t0 + chunk);
  AttendStaticShare<D, G>(step, rows, rope_shared, k_cache, v_cache, b, hk, group, pos, max_len, t0, t1, scale2,
                          PartialsOrDirect{PartialsOut{part_o, part_lse, split, splits, D}, DirectOut{out, D},
                                           used == 1});
  if (used == 1 || !LastToArrive(arrivals + head, unsigned(used))) return;
  MergeRows(part_o, part_lse, int64_t(b) * kv_heads * group + hk * group, group, used, splits, D, out, nullptr);
  if (threadIdx.x == 0) arrivals[head] = 0;
}

// Static, on a GPU with thread-block clusters (sm_90): a cluster of `gridDim.x` blocks per
// (KV head, slot) shares the context (each block a contiguous share: all of them read keys at
// once, each computes a few), and the blocks combine the shares from each other's shared memory
// (each a slice of the output elements) and write the output. No partials in global memory, no
// arrival counter, no second pass: at the 128-256-token contexts of a decode benchmark the split
// kernel's merge chain (fence, atomic, reloads) and the single block's serial rounds each cost
// more than the attention itself. The block whose share ends with the token writes its k and v
// into the cache.
constexpr int kMaxCluster = 8;  // the portable cluster size

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
// The output rows [group][D] of one (slot, KV head) from its cluster's shares: each block's
// normalized output share_o [group][D] (16-byte aligned) and base-2 lse share_lse [group] in its
// shared memory (-inf for a block that saw no key). A thread per run of 4 elements of one head
// (run u by block u % splits), reading the shares of all blocks at once (its loads are
// independent). Called between two cluster syncs: the shares written before, no block leaving
// while another still reads them.
template <int D>
__device__ void CombineClusterShares(const cooperative_groups::cluster_group& cluster, float* share_o,
                                     float* share_lse, __half* __restrict__ out, int group) {
  const int split = blockIdx.x, splits = gridDim.x;
  for (int u = threadIdx.x * splits + split; u < group * D / 4; u += blockDim.x * splits) {
    const int g = u / (D / 4), j = u % (D / 4) * 4;
    float lse[kMaxCluster], top = -INFINITY;
    float4 o[kMaxCluster];
#pragma unroll
    for (int r = 0; r < kMaxCluster; ++r) {
      lse[r] = r < splits ? *cluster.map_shared_rank(share_lse + g, r) : -INFINITY;
      o[r] = r < splits ? *cluster.map_shared_rank(reinterpret_cast<float4*>(share_o + g * D + j), r)
                        : make_float4(0.f, 0.f, 0.f, 0.f);
    }
#pragma unroll
    for (int r = 0; r < kMaxCluster; ++r) top = fmaxf(top, lse[r]);
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    if (top != -INFINITY) {  // always, where block 0's share starts at the first key
      float total = 0.f;
#pragma unroll
      for (int r = 0; r < kMaxCluster; ++r) {
        const float w = exp2f(lse[r] - top);  // 0 for a block without keys
        total += w;
        acc.x += w * o[r].x, acc.y += w * o[r].y, acc.z += w * o[r].z, acc.w += w * o[r].w;
      }
      const float inv = 1.f / total;
      acc.x *= inv, acc.y *= inv, acc.z *= inv, acc.w *= inv;
    }
    __half2* dst = reinterpret_cast<__half2*>(out + g * D + j);
    dst[0] = __floats2half2_rn(acc.x, acc.y);
    dst[1] = __floats2half2_rn(acc.z, acc.w);
  }
}
#endif

template <int D, int G>
__global__ void __launch_bounds__(StaticWarps(D) * 32)
StaticDecodeCluster(StepQkv step, __half* __restrict__ k_cache, __half* __restrict__ v_cache,
                    const int32_t* __restrict__ positions, __half* __restrict__ out, int group, int max_len,
                    float scale2) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  __shared__ __align__(16) float share_o[G * D];
  __shared__ float share_lse[G];
  __shared__ RopeShared<D> rope_shared;
  const cg::cluster_group cluster = cg::this_cluster();
  const int split = blockIdx.x, splits = gridDim.x, hk = blockIdx.y, b = blockIdx.z, kv_heads = gridDim.y;
  lab::WaitForPrevious();  // launched early (StaticDecodeLaunch): the step's q, k, v are the previous kernel's
  const int position = positions[b];
  StepRows<D, G> rows(step, b, hk, group);
  lab::AllowNext();  // the next kernel (the o projection's GEMV) may load its weights meanwhile
  const int pos = min(max(position, 0), max_len - 1);  // the host keeps it in range; never write outside
  const int len = pos + 1;
  const int chunk = (len + splits - 1) / splits;
  const int t0 = min(len, split * chunk), t1 = min(len, t0 + chunk);
  AttendStaticShare<D, G>(step, rows, rope_shared, k_cache, v_cache, b, hk, group, pos, max_len, t0, t1, scale2,
                          SharedOut{share_o, share_lse, D});
  cluster.sync();  // every share is in its block's shared memory
  CombineClusterShares<D>(cluster, share_o, share_lse, out + (int64_t(b) * kv_heads + hk) * group * D, group);
  cluster.sync();  // no block exits while another still reads its shared memory
#endif
}

// Static, on the tensor cores (sm_90, head_dim 64 or 128, at most 8 query heads per KV head): a
// cluster per (KV head, slot) as StaticDecodeCluster, each block of kMmaWarps warps, each warp
// taking tiles of kMmaTile keys. The context's tiles are dealt round the blocks first (tile i to
// block i % splits, then warp i / splits % kMmaWarps), so a short context is spread over the SMs.
// Per tile, S = Q K^T and O += P V are mma.sync m16n8k16 (float16 operands, float32 accumulators)
// with the group's query heads as A's rows (at most 8 of its 16 used: the padding costs nothing,
// the instruction count is the point): the SIMT kernel spent ~1200 instructions a warp on dot
// products, shuffles and per-team softmax state at a 128-256-key context, this one a few mma.
//
// Fragments (lane l, r = l / 4, c = l % 4; mma_fragments.h): a lane holds the 16-byte chunks
// 4j + c (j < D / 32) of one row: of query head r (A, zero past the group), of keys r and r + 8 of
// the tile (S's B operand), of values r and r + 8. S's reduction over head_dim runs over those
// chunks in any order (A and B agree on it): k16 step 2j + h takes words 2h, 2h + 1 of chunk j.
// S's accumulators are P's A operand as they stand (keys 2c, 2c + 1 and 8 + 2c, 9 + 2c of head r);
// V's B operand is the loaded words transposed in registers (movmatrix), so that O's lane holds
// elements 8 (4j + c) + 2m, + 1 of head r: its own chunks again. RoPE pairs element i with
// i + D/2, chunk j with chunk j + D/64 of the same lane: the rotation needs no shuffle; each warp
// makes its own cos/sin table (no block barrier before the first tile).
//
// The step's own token: its key (rotated) and value stand in for the cache's row at `pos` in the
// tile that holds it, and the lanes holding that row write them into the cache. A warp's online
// softmax state is combined with its block's in shared memory, the blocks' in the cluster's
// (CombineClusterShares).
constexpr int kMmaWarps = 4;
constexpr int kMmaTile = 16;

// The head dims StaticDecodeMma has: a lane's chunks pair for RoPE at 64 and 128.
__host__ __device__ constexpr bool TensorCoreHeadDim(int64_t d) { return d == 64 || d == 128; }

// A lane's chunks 4j + c (j < D / 32) of row t of a [max_len, D] head, zeros where t is not a
// cached key (t >= len, or the step's own token at pos, filled in by the caller).
template <int D>
__device__ void LoadOwnChunks(const __half* rows, int t, int len, int pos, uint4* dst) {
  const int c = threadIdx.x % 4;
  const bool cached = t < len && t != pos;
#pragma unroll
  for (int j = 0; j < D / 32; ++j)
    dst[j] = cached ? __ldg(reinterpret_cast<const uint4*>(rows + int64_t(t) * D) + 4 * j + c) : make_uint4(0, 0, 0, 0);
}

// Rows r and r + 8 of tile `tile` (r = lane / 4): the lane's chunks of the keys into kt, of the
// values into vt (LoadOwnChunks).
template <int D>
__device__ void LoadTile(const __half* k_rows, const __half* v_rows, int tile, int r, int len, int pos,
                         uint4 (*kt)[D / 32], uint4 (*vt)[D / 32]) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    LoadOwnChunks<D>(k_rows, tile * kMmaTile + 8 * h + r, len, pos, kt[h]);
    LoadOwnChunks<D>(v_rows, tile * kMmaTile + 8 * h + r, len, pos, vt[h]);
  }
}

// Chunks lo (elements i..i+7 < D/2) and hi (i + D/2..) rotated by the table's cos (cs[i..]) and sin
// (cs[D/2 + i..]), rounded to float16, as RotateHalf rotates them.
template <int D>
__device__ void RotateChunks(uint4& lo, uint4& hi, const float* cs) {
  float x[8], y[8];
  Unpack8(lo, x);
  Unpack8(hi, y);
  __align__(16) __half a[8], z[8];
#pragma unroll
  for (int t = 0; t < 8; ++t) {
    a[t] = __float2half(cs[t] * x[t] + cs[D / 2 + t] * (-y[t]));
    z[t] = __float2half(cs[t] * y[t] + cs[D / 2 + t] * x[t]);
  }
  lo = *reinterpret_cast<const uint4*>(a);
  hi = *reinterpret_cast<const uint4*>(z);
}

__device__ __forceinline__ uint32_t Word(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

template <int D, int G>
__global__ void __launch_bounds__(kMmaWarps * 32)
StaticDecodeMma(StepQkv step, __half* __restrict__ k_cache, __half* __restrict__ v_cache,
                const int32_t* __restrict__ positions, __half* __restrict__ out, int group, int max_len,
                float scale2) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  using lab::mma::MmaTopRows;
  using lab::mma::PackHalf2;
  using lab::mma::Transpose;
  constexpr int kOwn = D / 32, kHalf = kOwn / 2;
  static_assert(TensorCoreHeadDim(D), "the lanes' chunks pair for RoPE at head_dim 64 and 128");
  __shared__ __align__(16) float warp_o[kMmaWarps][G][D];
  __shared__ float warp_m[kMmaWarps][G], warp_l[kMmaWarps][G];
  __shared__ __align__(16) float share_o[G * D];
  __shared__ float share_lse[G];
  __shared__ __align__(16) float rope_cs[kMmaWarps][D];
  const cg::cluster_group cluster = cg::this_cluster();
  const int split = blockIdx.x, splits = gridDim.x, hk = blockIdx.y, b = blockIdx.z, kv_heads = gridDim.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, r = lane / 4, c = lane % 4;
  // Before lab::WaitForPrevious (the kernel is launched while the qkv projection's GEMV still runs,
  // StaticDecodeLaunch): only what the kernel before it cannot write (the model never writes the
  // cache or the frequencies there). The lane's RoPE frequencies (elements lane + 32 t), and the
  // warp's first tile of the cache, loaded before the slot's length is known (every row below
  // max_len is the cache's memory): once the length is known its rows past the context are zeroed
  // (stale or never written: a NaN there would survive P's zero weight) and the token's own row is
  // replaced below.
  float freq[D / 64];
  const bool rope = step.rope.freqs != nullptr;
#pragma unroll
  for (int t = 0; t < D / 64; ++t) freq[t] = rope ? __ldg(step.rope.freqs + lane + 32 * t) : 0.f;
  const int64_t head = int64_t(b) * kv_heads + hk;
  __half* k_rows = k_cache + head * max_len * D;
  __half* v_rows = v_cache + head * max_len * D;
  const int first = split + splits * warp, stride = splits * kMmaWarps;
  uint4 kt[2][kOwn], vt[2][kOwn];  // the tile's keys and values r, r + 8
  if (first * kMmaTile < max_len) LoadTile<D>(k_rows, v_rows, first, r, max_len, -1, kt, vt);
  lab::WaitForPrevious();
  // the next kernel (the o projection's GEMV) may load its weights meanwhile; allowed before the
  // wait, o's blocks took SMs and bandwidth from the qkv GEMV's last wave (q4f16_1 628.6 against
  // 641.0 tokens/s, docs/BENCHMARKS.md fourteenth round)
  lab::AllowNext();
  // the slot's position, query head r's chunks, the step's key and value
  const int position = positions[b];
  uint4 q[kOwn], k_new[kOwn], v_new[kOwn];
  {
    const __half* q_row = step.q + b * step.q_stride + (int64_t(hk) * group + r) * D;
    const __half* k_row = step.k + b * step.kv_stride + int64_t(hk) * D;
    const __half* v_row = step.v + b * step.kv_stride + int64_t(hk) * D;
#pragma unroll
    for (int j = 0; j < kOwn; ++j) {
      q[j] = r < group ? __ldg(reinterpret_cast<const uint4*>(q_row) + 4 * j + c) : make_uint4(0, 0, 0, 0);
      k_new[j] = __ldg(reinterpret_cast<const uint4*>(k_row) + 4 * j + c);
      v_new[j] = __ldg(reinterpret_cast<const uint4*>(v_row) + 4 * j + c);
    }
  }
  const int pos = min(max(position, 0), max_len - 1);  // the host keeps it in range; never write outside
  const int len = pos + 1, tiles = (len + kMmaTile - 1) / kMmaTile;
  if (first < tiles) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      if (first * kMmaTile + 8 * h + r < len) continue;
#pragma unroll
      for (int j = 0; j < kOwn; ++j) kt[h][j] = vt[h][j] = make_uint4(0, 0, 0, 0);
    }
  }
  const float* cs = rope_cs[warp];  // the warp's table: cos of element i at i, sin at D/2 + i
  if (rope) {  // while the tile loads
#pragma unroll
    for (int t = 0; t < D / 64; ++t)
      sincosf(float(pos) * freq[t], &rope_cs[warp][D / 2 + lane + 32 * t], &rope_cs[warp][lane + 32 * t]);
    __syncwarp();
#pragma unroll
    for (int j = 0; j < kHalf; ++j) RotateChunks<D>(q[j], q[j + kHalf], cs + 8 * (4 * j + c));
  }

  float m = -INFINITY, l = 0.f;
  float o[kOwn][4][2];
#pragma unroll
  for (int j = 0; j < kOwn; ++j)
#pragma unroll
    for (int n = 0; n < 4; ++n) o[j][n][0] = o[j][n][1] = 0.f;
  for (int tile = first; tile < tiles; tile += stride) {
    if (tile != first) LoadTile<D>(k_rows, v_rows, tile, r, len, pos, kt, vt);
    const int key0 = tile * kMmaTile;
    if (pos - key0 < kMmaTile && pos >= key0) {  // the step's token is in this tile (the same for the warp)
      if (rope) {
#pragma unroll
        for (int j = 0; j < kHalf; ++j) RotateChunks<D>(k_new[j], k_new[j + kHalf], cs + 8 * (4 * j + c));
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        if (key0 + 8 * h + r != pos) continue;
#pragma unroll
        for (int j = 0; j < kOwn; ++j) {
          kt[h][j] = k_new[j], vt[h][j] = v_new[j];
          reinterpret_cast<uint4*>(k_rows + int64_t(pos) * D)[4 * j + c] = k_new[j];
          reinterpret_cast<uint4*>(v_rows + int64_t(pos) * D)[4 * j + c] = v_new[j];
        }
      }
    }
    // S: keys key0 + 8h + 2c, + 1 of head r (two chains per key half: even and odd chunks)
    float s[2][2][2] = {};
#pragma unroll
    for (int j = 0; j < kOwn; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e)
#pragma unroll
        for (int h = 0; h < 2; ++h)
          MmaTopRows(s[h][j % 2], Word(q[j], 2 * e), Word(q[j], 2 * e + 1), Word(kt[h][j], 2 * e),
                     Word(kt[h][j], 2 * e + 1));
    float x[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int key = key0 + 8 * (i / 2) + 2 * c + i % 2;
      const float dot = s[i / 2][0][i % 2] + s[i / 2][1][i % 2];
      x[i] = key < len ? dot * scale2 : -INFINITY;
    }
    float top = fmaxf(fmaxf(x[0], x[1]), fmaxf(x[2], x[3]));
    top = fmaxf(top, __shfl_xor_sync(0xffffffffu, top, 1));
    top = fmaxf(top, __shfl_xor_sync(0xffffffffu, top, 2));
    top = fmaxf(top, m);  // finite: the tile's first key is in the context, so exp2(-inf - top) = 0
    const float rescale = exp2f(m - top);
    float p[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) p[i] = exp2f(x[i] - top);
    l = l * rescale + ((p[0] + p[1]) + (p[2] + p[3]));
    m = top;
    if (tile != first) {
#pragma unroll
      for (int j = 0; j < kOwn; ++j)
#pragma unroll
        for (int n = 0; n < 4; ++n) o[j][n][0] *= rescale, o[j][n][1] *= rescale;
    }
    const uint32_t p_lo = PackHalf2(p[0], p[1]), p_hi = PackHalf2(p[2], p[3]);
#pragma unroll
    for (int j = 0; j < kOwn; ++j)
#pragma unroll
      for (int n = 0; n < 4; ++n)
        MmaTopRows(o[j][n], p_lo, p_hi, Transpose(Word(vt[0][j], n)), Transpose(Word(vt[1][j], n)));
  }
  l += __shfl_xor_sync(0xffffffffu, l, 1);
  l += __shfl_xor_sync(0xffffffffu, l, 2);
  if (r < group) {
#pragma unroll
    for (int j = 0; j < kOwn; ++j)
#pragma unroll
      for (int n = 0; n < 4; ++n)
        *reinterpret_cast<float2*>(&warp_o[warp][r][8 * (4 * j + c) + 2 * n]) = make_float2(o[j][n][0], o[j][n][1]);
    if (c == 0) warp_m[warp][r] = m, warp_l[warp][r] = l;
  }
  __syncthreads();
  // The block's share, a thread per run of 4 elements of one head (the warps' weights once a run).
  for (int u = threadIdx.x; u < group * D / 4; u += blockDim.x) {
    const int g = u / (D / 4), j = u % (D / 4) * 4;
    float top = -INFINITY;
#pragma unroll
    for (int w = 0; w < kMmaWarps; ++w) top = fmaxf(top, warp_m[w][g]);
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    float total = 0.f;
    if (top != -INFINITY) {  // the block saw a key; a warp that saw none weighs exp2(-inf) = 0
#pragma unroll
      for (int w = 0; w < kMmaWarps; ++w) {
        const float weight = exp2f(warp_m[w][g] - top);
        const float4 o_w = *reinterpret_cast<const float4*>(&warp_o[w][g][j]);
        total += warp_l[w][g] * weight;
        acc.x += o_w.x * weight, acc.y += o_w.y * weight, acc.z += o_w.z * weight, acc.w += o_w.w * weight;
      }
      const float inv = 1.f / total;
      acc.x *= inv, acc.y *= inv, acc.z *= inv, acc.w *= inv;
    }
    *reinterpret_cast<float4*>(&share_o[g * D + j]) = acc;
    if (j == 0) share_lse[g] = top != -INFINITY ? top + log2f(total) : -INFINITY;
  }
  cluster.sync();  // every share is in its block's shared memory
  CombineClusterShares<D>(cluster, share_o, share_lse, out + head * group * D, group);
  cluster.sync();  // no block exits while another still reads its shared memory
#endif
}

// Static prefill: the chunk's rows k, v [n, Hkv, d] into the slot's cache rows [Hkv, max_len, d]
// at `start`. A block per (token, KV head), a thread per element.
__global__ void AppendRows(const __half* __restrict__ k, const __half* __restrict__ v, __half* __restrict__ k_rows,
                           __half* __restrict__ v_rows, int kv_heads, int max_len, int start, int d) {
  const int i = blockIdx.x, h = blockIdx.y;
  const int64_t src = (int64_t(i) * kv_heads + h) * d, dst = (int64_t(h) * max_len + start + i) * d;
  for (int j = threadIdx.x; j < d; j += blockDim.x) {
    k_rows[dst + j] = k[src + j];
    v_rows[dst + j] = v[src + j];
  }
}

// 8 floats as a 16-byte vector of halfs, each rounded to nearest.
__device__ uint4 Pack8(const float* x) {
  uint4 raw;
  __half2* h = reinterpret_cast<__half2*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) h[i] = __floats2half2_rn(x[2 * i], x[2 * i + 1]);
  return raw;
}

constexpr int kRopeAppendThreads = 128;

// Static prefill with RoPE (lab.kv.prefill_attention_rope): row i of a layer's fused projection
// qkv [n, Hq + 2 Hkv, D], at position start + i: its q heads, from row q_from on, rotated into
// q_out [n - q_from, Hq, D] (the attention's q: the rows whose attention is asked for), its k
// heads rotated and its v heads copied into the slot's cache rows [Hkv, max_len, D] at start + i. One pass over qkv: a block per row makes the row's cos/sin table
// (RopeTable: D/2 sincosf, one per frequency, shared by all the row's q and k heads; TVM's
// llama_rope_with_position_map computed a power, a cos and a sin per element, 153 us a layer of a
// 4096-token Llama-3-8B prefill on an H200), then each thread takes a 16-byte vector j < D/16 of a q
// or k head with its rotate_half partner j + D/16 (elements e and e + D/2 pair), so the rotation
// needs no exchange between threads, or a 16-byte vector of a v head. Rotated as RotateHalf
// rotates the decode's q and k (float32, rounded once to float16).
template <int D>
__global__ void __launch_bounds__(kRopeAppendThreads) RopeAppendRows(const __half* __restrict__ qkv, RopeSpec rope,
                                                                    __half* __restrict__ q_out,
                                                                    __half* __restrict__ k_rows,
                                                                    __half* __restrict__ v_rows, int q_heads,
                                                                    int kv_heads, int max_len, int start,
                                                                    int q_from) {
  constexpr int kVectors = D / 8, kPair = D / 16;  // a head's 16-byte vectors; a vector's partner, that many further
  static_assert(D / 2 <= kRopeAppendThreads, "RopeTable takes a thread per frequency");
  __shared__ __align__(16) float cos_sin[D];       // cos of element e < D/2 at e, its sin at D/2 + e
  const int i = blockIdx.x, pos = start + i;
  RopeTable<D>(rope, pos, cos_sin);
  __syncthreads();
  const uint4* row = reinterpret_cast<const uint4*>(qkv) + int64_t(i) * (q_heads + 2 * kv_heads) * kVectors;
  const int rotated = (q_heads + kv_heads) * kPair, copied = kv_heads * kVectors;
  for (int t = i < q_from ? q_heads * kPair + threadIdx.x : threadIdx.x; t < rotated + copied; t += blockDim.x) {
    if (t >= rotated) {  // a vector of a v head
      const int h = (t - rotated) / kVectors, j = (t - rotated) % kVectors;
      const uint4 value = __ldg(row + (q_heads + kv_heads + h) * kVectors + j);
      reinterpret_cast<uint4*>(v_rows + (int64_t(h) * max_len + pos) * D)[j] = value;
      continue;
    }
    const int h = t / kPair, j = t % kPair;
    float lo[8], hi[8], lo_out[8], hi_out[8];
    Unpack8(__ldg(row + h * kVectors + j), lo);
    Unpack8(__ldg(row + h * kVectors + j + kPair), hi);
    const float* c = cos_sin + 8 * j;
    const float* sn = cos_sin + D / 2 + 8 * j;
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      lo_out[e] = c[e] * lo[e] + sn[e] * -hi[e];
      hi_out[e] = c[e] * hi[e] + sn[e] * lo[e];
    }
    uint4* dst = reinterpret_cast<uint4*>(h < q_heads ? q_out + (int64_t(i - q_from) * q_heads + h) * D
                                                      : k_rows + (int64_t(h - q_heads) * max_len + pos) * D);
    dst[j] = Pack8(lo_out);
    dst[j + kPair] = Pack8(hi_out);
  }
}

// The steps' tokens for the host, in pinned host memory the GPU writes (lab.kv.mailbox): int32
// words [0] = how many advance calls of this device have written (the last word written), then a
// ring of kMailboxRing entries of kMailboxSlots tokens, call k's tokens in entry k % kMailboxRing.
// The host reads a step's tokens as soon as its advance has run, whatever is queued behind it on
// the stream: it can keep the next step queued while it reads (no stream-ordered copy, no sync).
constexpr int kMailboxRing = 64, kMailboxSlots = 256;

struct Mailbox {
  volatile int32_t* host = nullptr;  // the device's view of the pinned words (UVA: the same address)
  int32_t* calls = nullptr;          // device memory: how many advance calls have written
};

// One block of at least n threads (n <= kMailboxSlots) where there is a mailbox, else a grid.
__global__ void Advance(const int32_t* __restrict__ next, int32_t* __restrict__ ids, int32_t* __restrict__ positions,
                        int32_t* __restrict__ out, int n, Mailbox mailbox) {
  lab::AllowNext();
  lab::WaitForPrevious();  // launched while the argmax runs (LaunchAfterPrevious): its tokens after this
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const int32_t call = mailbox.calls != nullptr ? *mailbox.calls : 0;
  if (i < n) {
    ids[i] = next[i];
    positions[i] += 1;
    out[i] = next[i];
    if (mailbox.host != nullptr) mailbox.host[1 + (call % kMailboxRing) * kMailboxSlots + i] = next[i];
  }
  if (mailbox.host == nullptr) return;
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence_system();  // the tokens are visible to the host before the count is
    mailbox.host[0] = call + 1;
    *mailbox.calls = call + 1;
  }
}

__global__ void SettlePrefill(const int32_t* __restrict__ next, int n, int32_t* __restrict__ ids,
                              int32_t* __restrict__ positions, int slot, int length, int32_t* __restrict__ out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = next[i];
  if (i == n - 1) {
    ids[slot] = next[i];
    positions[slot] = length;
  }
}

// lab.kv.argmax: a row's largest logit, the first index where several are equal (topi.argmax's and
// torch.argmax's choice). A grid of (parts, rows) blocks, each the best of its part of the row; the
// last block of a row to finish (an arrival counter per row, which it resets: graph-safe) takes
// the best of the parts. TVM's argmax kernel took 24 us for Llama-3's 128256 logits on an H200 (a
// block per row).
constexpr int kArgmaxThreads = 256, kArgmaxPerThread = 8, kArgmaxMaxParts = 128;

struct Best {
  float value;
  int index;
};

// b if it is larger, or equal and earlier; NaN never wins
__device__ Best Better(Best a, Best b) {
  return (b.value > a.value || (b.value == a.value && b.index < a.index)) ? b : a;
}

__device__ Best BlockBest(Best best, Best* shared) {
  for (int offset = 16; offset > 0; offset /= 2)
    best = Better(best, Best{__shfl_xor_sync(0xffffffffu, best.value, offset),
                             __shfl_xor_sync(0xffffffffu, best.index, offset)});
  if (threadIdx.x % 32 == 0) shared[threadIdx.x / 32] = best;
  __syncthreads();
  for (int w = 0; w < int(blockDim.x / 32); ++w) best = Better(best, shared[w]);
  return best;
}

__global__ void __launch_bounds__(kArgmaxThreads)
ArgmaxRows(const float* __restrict__ logits, int64_t vocab, float* __restrict__ part_value,
           int* __restrict__ part_index, unsigned* __restrict__ arrivals, int32_t* __restrict__ out) {
  __shared__ Best shared[kArgmaxThreads / 32];
  lab::AllowNext();  // the advance after it may launch (it waits for this kernel)
  lab::WaitForPrevious();  // launched while the LM head runs (LaunchAfterPrevious): the logits after this
  const int part = blockIdx.x, parts = gridDim.x, row = blockIdx.y;
  const int64_t per_part = (vocab + parts - 1) / parts;
  const int64_t begin = part * per_part, end = min(vocab, begin + per_part);
  const float* x = logits + int64_t(row) * vocab;
  Best best{-INFINITY, INT_MAX};
#pragma unroll 4
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) best = Better(best, Best{__ldg(x + i), int(i)});
  best = BlockBest(best, shared);
  if (parts > 1) {
    if (threadIdx.x == 0) {
      part_value[int64_t(row) * parts + part] = best.value;
      part_index[int64_t(row) * parts + part] = best.index;
    }
    // (its barriers also end the first BlockBest's reads of `shared`)
    if (!LastToArrive(arrivals + row, unsigned(parts))) return;
    best = Best{-INFINITY, INT_MAX};
    for (int i = threadIdx.x; i < parts; i += blockDim.x)
      best = Better(best, Best{__ldcg(part_value + int64_t(row) * parts + i), __ldcg(part_index + int64_t(row) * parts + i)});
    best = BlockBest(best, shared);
  }
  if (threadIdx.x == 0) {
    out[row] = best.index < vocab ? best.index : 0;  // a row of NaN: 0
    if (parts > 1) arrivals[row] = 0;
  }
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

// Which prefill attention CausalAttention runs where they apply (lab.attention.prefill_path: the
// benchmarks time them in one process): the fused kernel by default (its warpgroup-MMA version on
// sm_90), the fused kernel on mma.sync only, or the unfused one.
enum PrefillKernel { kFused = 0, kUnfused = 1, kFusedMma = 2 };
constexpr const char* kPrefillKernelNames[] = {"fused", "unfused", "fused_mma"};
std::atomic<int> prefill_path{kFused};
int PrefillPath() { return prefill_path.load(std::memory_order_relaxed); }

// Causal attention of n query rows (q, row stride q_ld) over m keys whose key i has row
// k + i * kv_ld (and v likewise) for the first KV head and the next head kv_head_stride further.
// Query row i sees keys j <= i + shift (shift = m - n). lse of row i goes to
// lse[(lse_row0 + i) * q_heads + h]. The fused kernel (flash_prefill.cu) where it applies (head
// dims 32, 64, 128 on compute capability 8.0 or newer); otherwise, per chunk of query rows,
// S = Q K^T and O = P V as cuBLAS strided-batched GEMMs over the KV heads (one call per query head
// of a group), a causal softmax kernel of ours between them, S and P through a workspace.
void CausalAttention(DeviceState& state, cudaStream_t stream, cublasHandle_t handle, const __half* q, int64_t q_ld,
                     int64_t n, const __half* k, const __half* v, int64_t kv_ld, int64_t kv_head_stride, int64_t m,
                     bool causal, __half* out, float* lse, int64_t lse_row0, int64_t q_heads, int64_t kv_heads,
                     int64_t d, float scale2, const char* fn) {
  const int64_t group = q_heads / kv_heads, shift = m - n;
  if (causal ? m - n + 1 <= 0 : m <= 0) TVM_FFI_THROW(ValueError) << fn << ": a causal query row sees no key";
  lab::FlashPrefillArgs flash;
  flash.q = q, flash.q_ld = q_ld, flash.k = k, flash.v = v, flash.kv_ld = kv_ld, flash.kv_head_stride = kv_head_stride;
  flash.out = out, flash.lse = lse, flash.lse_row0 = lse_row0, flash.n = n, flash.m = m, flash.q_heads = q_heads;
  flash.kv_heads = kv_heads, flash.d = d, flash.causal = causal, flash.scale2 = scale2;
  const int path = PrefillPath();
  flash.warpgroup = path == kFused;
  if (path != kUnfused && lab::FlashPrefillApplies(flash, state.major)) return lab::FlashPrefill(flash, stream);
  const float one = 1.f, zero = 0.f;
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(n, kWorkspaceBytes / (q_heads * m * 6)));
  char* ws = static_cast<char*>(state.workspace.Get(q_heads * chunk * m * 6, stream));
  for (int64_t i0 = 0; i0 < n; i0 += chunk) {
    const int64_t rows = std::min(chunk, n - i0);
    const int64_t cols = causal ? std::min(m, i0 + rows + shift) : m;
    float* s = reinterpret_cast<float*>(ws);
    __half* p = reinterpret_cast<__half*>(ws + q_heads * rows * cols * 4);
    const __half* qb = q + i0 * q_ld;
    __half* ob = out + i0 * q_ld;
    for (int64_t r = 0; r < group; ++r) {
      // Row-major S_h[rows, cols] = Q_h[rows, d] K_hk[cols, d]^T for h = hk * group + r, batched
      // over hk; in cuBLAS's column-major terms S_h^T = K_hk^T^T Q_h^T.
      LAB_CHECK_CUBLAS(cublasGemmStridedBatchedEx(
          handle, CUBLAS_OP_T, CUBLAS_OP_N, int(cols), int(rows), int(d), &one,
          k, CUDA_R_16F, int(kv_ld), kv_head_stride, qb + r * d, CUDA_R_16F, int(q_ld), group * d, &zero,
          s + r * kv_heads * rows * cols, CUDA_R_32F, int(cols), rows * cols, int(kv_heads),
          CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    }
    CausalSoftmax<<<unsigned(group * kv_heads * rows), kSoftmaxThreads, 0, stream>>>(
        s, p, lse, int(rows), int(cols), int(kv_heads), int(group), int(i0), lse_row0, int(q_heads), int(causal),
        shift, scale2);
    LAB_CHECK_CUDA(cudaGetLastError());
    for (int64_t r = 0; r < group; ++r) {
      // O_h[rows, d] = P_h[rows, cols] V_hk[cols, d]: column-major O_h^T = V_hk^T P_h^T.
      LAB_CHECK_CUBLAS(cublasGemmStridedBatchedEx(
          handle, CUBLAS_OP_N, CUBLAS_OP_N, int(d), int(rows), int(cols), &one,
          v, CUDA_R_16F, int(kv_ld), kv_head_stride, p + r * kv_heads * rows * cols, CUDA_R_16F, int(cols),
          rows * cols, &zero, ob + r * d, CUDA_R_16F, int(q_ld), group * d, int(kv_heads),
          CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    }
  }
}

// lab.attention.prefill_path(name) -> the previous name: "fused", "fused_mma" or "unfused" (above).
std::string SetPrefillPath(const std::string& name) {
  for (int want : {kFused, kFusedMma, kUnfused})
    if (name == kPrefillKernelNames[want]) return kPrefillKernelNames[prefill_path.exchange(want)];
  TVM_FFI_THROW(ValueError) << "lab.attention.prefill_path: " << name << " is not fused, fused_mma or unfused";
}

void PrefillRagged(DLTensor* q, DLTensor* q_indptr, DLTensor* k, DLTensor* v, DLTensor* kv_indptr,
                   DLTensor* q_rope_position, DLTensor* k_rope_pos_offset, DLTensor* output,
                   DLTensor* lse, int64_t causal, int64_t rotary_mode, double rope_scale,
                   double rope_theta, double sm_scale) {
  const char* fn = "lab.attention.prefill_ragged";
  Check(q, "q", 3, 16, kDLFloat);
  Check(k, "k", 3, 16, kDLFloat);
  Check(v, "v", 3, 16, kDLFloat);
  Check(output, "output", 3, 16, kDLFloat);
  Check(lse, "lse", 2, 32, kDLFloat);
  Check(q_indptr, "q_indptr", 1, 32, kDLInt);
  Check(kv_indptr, "kv_indptr", 1, 32, kDLInt);
  if (rotary_mode != 0)
    TVM_FFI_THROW(ValueError) << fn << ": inline RoPE is not supported (the model applies RoPE before the KV "
                                 "cache: RopeMode.NORMAL)";
  const int64_t q_heads = q->shape[1], kv_heads = k->shape[1], d = q->shape[2];
  if (q_heads % kv_heads != 0 || k->shape[2] != d || v->shape[2] != d || v->shape[1] != kv_heads ||
      output->shape[1] != q_heads || output->shape[2] != d || lse->shape[1] != q_heads)
    TVM_FFI_THROW(ValueError) << fn << ": head counts or head dims do not agree";
  const int64_t batch = q_indptr->shape[0] - 1;
  if (batch < 1 || kv_indptr->shape[0] != batch + 1)
    TVM_FFI_THROW(ValueError) << fn << ": q_indptr and kv_indptr must have batch + 1 entries";

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
  const int64_t q_row = q_heads * d, kv_row = kv_heads * d;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t n = qo[b + 1] - qo[b], m = kvo[b + 1] - kvo[b];
    if (n == 0) continue;
    CausalAttention(state, stream, handle, Data<__half>(q) + qo[b] * q_row, q_row, n,
                    Data<__half>(k) + kvo[b] * kv_row, Data<__half>(v) + kvo[b] * kv_row, kv_row, d, m, causal != 0,
                    Data<__half>(output) + qo[b] * q_row, Data<float>(lse), qo[b], q_heads, kv_heads, d, scale2, fn);
  }
}

using DecodeKernel = void (*)(const __half*, const __half*, const int32_t*, const int32_t*, const int32_t*, float*,
                              float*, int, int, int, int, float);
using StaticKernel = void (*)(StepQkv, __half*, __half*, const int32_t*, float*, float*, unsigned*, __half*, int, int,
                              int, float);

// The kernel instance for head_dim d and `group` query heads per KV head (registers hold G heads).
template <template <int, int> class Pick>
auto ForShape(int64_t d, int64_t group) {
  auto by_group = [&](auto dim) {
    constexpr int D = decltype(dim)::value;
    return group <= 1 ? Pick<D, 1>::kernel : group <= 2 ? Pick<D, 2>::kernel
         : group <= 4 ? Pick<D, 4>::kernel : Pick<D, 8>::kernel;
  };
  return d == 32 ? by_group(std::integral_constant<int, 32>{}) : d == 64 ? by_group(std::integral_constant<int, 64>{})
       : d == 128 ? by_group(std::integral_constant<int, 128>{}) : by_group(std::integral_constant<int, 256>{});
}

template <int D, int G>
struct PagedPick {
  static constexpr DecodeKernel kernel = DecodePartial<D, G>;
};

template <int D, int G>
struct StaticPick {
  static constexpr StaticKernel kernel = StaticDecode<D, G>;
};

using ClusterKernel = void (*)(StepQkv, __half*, __half*, const int32_t*, __half*, int, int, float);

template <int D, int G>
struct ClusterPick {
  static constexpr ClusterKernel kernel = StaticDecodeCluster<D, G>;
};

template <int D, int G>
struct MmaPick {
  static constexpr ClusterKernel Get() {
    if constexpr (TensorCoreHeadDim(D)) {
      return StaticDecodeMma<D, G>;
    } else {
      return nullptr;
    }
  }
  static constexpr ClusterKernel kernel = Get();
};

// Whether a cluster launch runs StaticDecodeMma (head_dim 64 or 128) rather than
// StaticDecodeCluster. lab.kv.decode_tensor_cores(on) -> the previous setting: the benchmarks'
// choice for a process (bench.static_kv times both in one run); on by default.
std::atomic<bool> tensor_cores_on{true};

bool UseTensorCores(int64_t d) { return TensorCoreHeadDim(d) && tensor_cores_on.load(std::memory_order_relaxed); }

int64_t SetDecodeTensorCores(int64_t on) {
  if (on != 0 && on != 1)
    TVM_FFI_THROW(ValueError) << "lab.kv.decode_tensor_cores: " << on << " is not 1 (the tensor-core kernel) or 0 "
                              << "(the SIMT one)";
  return tensor_cores_on.exchange(on == 1) ? 1 : 0;
}

// The static decode's cluster size for a cache of max_len keys and `pairs` (slot, KV head) pairs:
// 0 where the split kernel runs instead. Clusters help where the pairs alone leave most SMs idle
// (batch 1: 8 pairs at tp=1); their blocks (~190 registers x 256 threads for the SIMT kernel, 214 x
// 128 for StaticDecodeMma) must fit
// one wave, or a batch of 16 runs 8 waves of them (44.6 us a call against ~20 for one block
// per pair). So: sm_90 or later, a cache of at most kMaxCluster blocks of two rounds each (longer
// ones are read faster split over more blocks), and one block per kClusterKeys keys (the SIMT
// kernel) or per kMmaClusterKeys (StaticDecodeMma: each warp one tile of the cache at its full
// length), at most kMaxCluster, at most as many as leave one block per SM (fewer than 2: the split
// kernel).
// StaticDecodeMma at 32 keys a block put half its warps on no tile where a cache is shorter than
// 512 keys: at 64, Llama-3-8B's 256-key cache of the decode benchmark (prompt 128 + 128 new
// tokens) takes clusters of 4 instead of 8, q4f16_1 decode 641.0-641.4 -> 645.3-645.4 tokens/s,
// q8f16_1 416.2-416.7 -> 417.1-417.4; at 128 keys (clusters of 2) it lost, 616.6 (one call, 1 x H200,
// 2026-12-01, docs/BENCHMARKS.md fourteenth round).
// lab.kv.decode_cluster(n) -> the previous n: the benchmarks' choice of cluster size for a process
// (bench.static_kv times several in one run); 0 (the default) is the rule above, 1 the split kernel,
// 2..kMaxCluster that size where clusters apply.
constexpr int64_t kClusterKeys = 32;
constexpr int64_t kMmaClusterKeys = kMmaWarps * kMmaTile;
std::atomic<int> cluster_override{0};

int64_t ClusterSize(const DeviceState& state, int64_t pairs, int64_t max_len, int64_t d, int64_t group) {
  if (state.major < 9 || max_len > kMaxCluster * StaticKeysPerSplit(int(d), int(group))) return 0;
  const int chosen = cluster_override.load(std::memory_order_relaxed);
  if (chosen == 1) return 0;
  const int64_t keys = UseTensorCores(d) ? kMmaClusterKeys : kClusterKeys;
  const int64_t size = std::min<int64_t>({chosen > 1 ? int64_t(chosen) : int64_t(kMaxCluster),
                                          (max_len + keys - 1) / keys,
                                          state.sms / std::max<int64_t>(1, pairs)});
  return size >= 2 ? size : 0;
}

int64_t SetDecodeCluster(int64_t n) {
  if (n < 0 || n > kMaxCluster)
    TVM_FFI_THROW(ValueError) << "lab.kv.decode_cluster: " << n << " is not 0 (the rule), 1 (no cluster) or 2.."
                              << kMaxCluster;
  return cluster_override.exchange(int(n));
}

void CheckDecodeShape(const char* fn, int64_t group, int64_t d) {
  if (group > kMaxGroup)
    TVM_FFI_THROW(ValueError) << fn << ": " << group << " query heads per KV head, at most " << kMaxGroup
                              << " supported (build with decode_attention=tir)";
  if (d != 32 && d != 64 && d != 128 && d != 256)
    TVM_FFI_THROW(ValueError) << fn << ": head_dim " << d << " is not 32, 64, 128 or 256 (build with decode_attention=tir)";
}

// Splits of a (sequence, KV head)'s keys: about kDecodeBlocksPerSM blocks per SM for `rows`
// sequences (enough loads in flight to keep HBM busy), at most `most`.
int64_t DecodeSplits(const DeviceState& state, int64_t rows, int64_t kv_heads, int64_t most) {
  const int64_t blocks = int64_t(kDecodeBlocksPerSM) * state.sms, per_split = rows * kv_heads;
  return std::max<int64_t>(1, std::min<int64_t>(most, (blocks + per_split - 1) / per_split));
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
  CheckDecodeShape(fn, group, d);
  if (batch == 0) return;

  const int device = q->device.device_id;
  DeviceState& state = State(device);
  auto stream = static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, device));
  // Invariant (decode_paged_invariant, the build option batch_invariant), the splits are those of
  // a batch of 1 at any batch, so a sequence's keys are summed in the same order whatever else is
  // in the batch (bit-identical tokens when a scheduler splits the batch; more, smaller blocks at
  // large batches).
  const int64_t splits = DecodeSplits(state, invariant ? 1 : batch, kv_heads, 64);
  float* part_o = static_cast<float*>(state.partials.Get(batch * q_heads * splits * (d + 1) * 4, stream));
  float* part_lse = part_o + batch * q_heads * splits * d;
  const dim3 grid{unsigned(splits), unsigned(kv_heads), unsigned(batch)};
  const float scale2 = float(sm_scale * 1.4426950408889634);
  ForShape<PagedPick>(d, group)<<<grid, kDecodeWarps * 32, 0, stream>>>(
      Data<__half>(q), Data<__half>(pages), Data<int32_t>(page_indptr), Data<int32_t>(page_values),
      Data<int32_t>(length_info), part_o, part_lse, int(kv_heads), int(group), int(page_size), int(splits), scale2);
  LAB_CHECK_CUDA(cudaGetLastError());
  DecodeMerge<<<unsigned(batch * q_heads), unsigned(std::max<int64_t>(32, d)), 0, stream>>>(
      part_o, part_lse, Data<__half>(output), Data<float>(lse), int(splits), int(d));
  LAB_CHECK_CUDA(cudaGetLastError());
}

// --- the static cache -----------------------------------------------------------------------

struct StaticShape {
  int64_t layers, slots, kv_heads, max_len, d;
};

// The cache's shape, checked against a step's q, k, v [rows, heads, d] and the layer.
// The cache's shape, checked: [layers, 2, slots, kv_heads, max_len, head_dim] float16, and the layer
// one of its layers; out [rows, heads, head_dim] float16.
StaticShape CheckCache(const char* fn, DLTensor* cache, DLTensor* out, int64_t layer) {
  Check(cache, "cache", 6, 16, kDLFloat);
  Check(out, "out", 3, 16, kDLFloat);
  if (cache->shape[1] != 2)
    TVM_FFI_THROW(ValueError) << fn << ": the cache must be [layers, 2, slots, kv_heads, max_len, head_dim]";
  const StaticShape s{cache->shape[0], cache->shape[2], cache->shape[3], cache->shape[4], cache->shape[5]};
  if (layer < 0 || layer >= s.layers) TVM_FFI_THROW(ValueError) << fn << ": layer " << layer << " of " << s.layers;
  return s;
}

StaticShape CheckStatic(const char* fn, DLTensor* q, DLTensor* k, DLTensor* v, DLTensor* cache, DLTensor* out,
                        int64_t layer) {
  Check(q, "q", 3, 16, kDLFloat);
  Check(k, "k", 3, 16, kDLFloat);
  Check(v, "v", 3, 16, kDLFloat);
  const StaticShape s = CheckCache(fn, cache, out, layer);
  const int64_t rows = q->shape[0];
  if (q->shape[2] != s.d || k->shape[1] != s.kv_heads || k->shape[2] != s.d ||
      v->shape[1] != s.kv_heads || v->shape[2] != s.d || k->shape[0] != rows || v->shape[0] != rows ||
      out->shape[0] != rows || out->shape[1] != q->shape[1] || out->shape[2] != s.d || q->shape[1] % s.kv_heads != 0)
    TVM_FFI_THROW(ValueError) << fn << ": q, k, v, out and the cache [layers, 2, slots, kv_heads, max_len, "
                                 "head_dim] do not agree";
  return s;
}

// The layer's K (kv = 0) or V (kv = 1) rows of every slot: [slots, kv_heads, max_len, d].
__half* CacheRows(DLTensor* cache, const StaticShape& s, int64_t layer, int kv) {
  return Data<__half>(cache) + (layer * 2 + kv) * s.slots * s.kv_heads * s.max_len * s.d;
}

// A prompt chunk of n tokens at `start` of `slot`: checked to fit the cache; its layer's K and V rows
// of the slot ([kv_heads, max_len, d] each).
struct ChunkRows {
  __half* k;
  __half* v;
  int64_t head_rows;  // elements from one KV head's rows to the next's
};

ChunkRows CheckChunk(const char* fn, DLTensor* cache, const StaticShape& s, int64_t layer, int64_t slot,
                     int64_t start, int64_t n) {
  if (slot < 0 || slot >= s.slots || start < 0 || start + n > s.max_len)
    TVM_FFI_THROW(ValueError) << fn << ": slot " << slot << " positions " << start << ".." << start + n
                              << " do not fit a cache of " << s.slots << " slots of " << s.max_len;
  const int64_t head_rows = s.max_len * s.d, slot_offset = slot * s.kv_heads * head_rows;
  return {CacheRows(cache, s, layer, 0) + slot_offset, CacheRows(cache, s, layer, 1) + slot_offset, head_rows};
}

// The causal attention of a chunk's n queries (q [n, q_heads, d]) over the slot's positions
// 0..start+n, the chunk's keys and values already in the cache rows, into out [n, q_heads, d]; q
// may be out itself (lab.kv.prefill_attention_rope): each of CausalAttention's kernels reads a
// block's (or chunk's) query rows of a head before it writes the output rows of the same head and
// rows, and no other block or chunk reads them.
void AttendChunk(const char* fn, int device, cudaStream_t stream, const StaticShape& s, const ChunkRows& rows,
                 const __half* q, int64_t n, int64_t q_heads, int64_t start, double sm_scale, __half* out) {
  DeviceState& state = State(device);
  cublasHandle_t handle = lab::CublasHandle(device);
  LAB_CHECK_CUBLAS(cublasSetStream(handle, stream));
  float* lse = static_cast<float*>(state.lse.Get(n * q_heads * 4, stream));  // not needed: no merge follows
  CausalAttention(state, stream, handle, q, q_heads * s.d, n, rows.k, rows.v, s.d, rows.head_rows, start + n, true,
                  out, lse, 0, q_heads, s.kv_heads, s.d, float(sm_scale * 1.4426950408889634), fn);
}

void KvPrefillAttention(DLTensor* q, DLTensor* k, DLTensor* v, DLTensor* cache, int64_t layer, int64_t slot,
                        int64_t start, double sm_scale, DLTensor* out) {
  const char* fn = "lab.kv.prefill_attention";
  const StaticShape s = CheckStatic(fn, q, k, v, cache, out, layer);
  const int64_t n = q->shape[0], q_heads = q->shape[1];
  const ChunkRows rows = CheckChunk(fn, cache, s, layer, slot, start, n);
  if (n == 0) return;
  const int device = q->device.device_id;
  auto stream = static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, device));
  AppendRows<<<dim3(unsigned(n), unsigned(s.kv_heads)), unsigned(std::min<int64_t>(256, s.d)), 0, stream>>>(
      Data<__half>(k), Data<__half>(v), rows.k, rows.v, int(s.kv_heads), int(s.max_len), int(start), int(s.d));
  LAB_CHECK_CUDA(cudaGetLastError());
  AttendChunk(fn, device, stream, s, rows, Data<__half>(q), n, q_heads, start, sm_scale, Data<__half>(out));
}

// The static decode of a step whose tokens `step` holds (q_heads query heads each).
void StaticDecodeLaunch(const char* fn, const StepQkv& step, const StaticShape& s, int64_t q_heads, DLTensor* cache,
                        int64_t layer, DLTensor* positions, double sm_scale, int64_t invariant, DLTensor* out) {
  Check(positions, "positions", 1, 32, kDLInt);
  const int64_t batch = out->shape[0], group = q_heads / s.kv_heads;
  if (batch != s.slots || positions->shape[0] != s.slots)
    TVM_FFI_THROW(ValueError) << fn << ": a step of " << batch << " tokens for a cache of " << s.slots
                              << " slots (one token per slot)";
  CheckDecodeShape(fn, group, s.d);
  const int device = out->device.device_id;
  DeviceState& state = State(device);
  auto stream = static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, device));
  const float scale2 = float(sm_scale * 1.4426950408889634);
  // Fixed by the shapes (the launch is replayed by a CUDA graph); with `invariant` the choice and
  // the split are those of a batch of 1 whatever the batch.
  const int64_t pairs = (invariant ? 1 : batch) * s.kv_heads;
  if (const int64_t cluster = ClusterSize(state, pairs, s.max_len, s.d, group); cluster > 0) {
    cudaLaunchConfig_t config = {};
    const bool tensor_cores = UseTensorCores(s.d);
    config.gridDim = dim3{unsigned(cluster), unsigned(s.kv_heads), unsigned(batch)};
    config.blockDim = dim3{unsigned(tensor_cores ? kMmaWarps * 32 : StaticWarps(int(s.d)) * 32)};
    config.stream = stream;
    cudaLaunchAttribute attribute[2];
    attribute[0].id = cudaLaunchAttributeClusterDimension;
    attribute[0].val.clusterDim.x = unsigned(cluster);
    attribute[0].val.clusterDim.y = 1;
    attribute[0].val.clusterDim.z = 1;
    // launched while the kernel before it (the qkv projection's GEMV, which allows it) still runs:
    // the kernels load what that kernel does not write, then lab::WaitForPrevious
    attribute[1] = lab::AfterPreviousAttribute();
    config.attrs = attribute;
    config.numAttrs = 2;
    const ClusterKernel kernel = tensor_cores ? ForShape<MmaPick>(s.d, group) : ForShape<ClusterPick>(s.d, group);
    LAB_CHECK_CUDA(cudaLaunchKernelEx(&config, kernel, step, CacheRows(cache, s, layer, 0),
                                      CacheRows(cache, s, layer, 1), Data<int32_t>(positions), Data<__half>(out),
                                      int(group), int(s.max_len), scale2));
    return;
  }
  // Enough splits to fill the GPU, at most one per StaticKeysPerSplit keys of max_len; `invariant`
  // as decode_paged's.
  const int64_t keys_per_split = StaticKeysPerSplit(int(s.d), int(group));
  const int64_t splits = DecodeSplits(state, invariant ? 1 : batch, s.kv_heads,
                                      std::min<int64_t>(kMaxSplits, (s.max_len + keys_per_split - 1) / keys_per_split));
  const int64_t partials = batch * q_heads * splits;
  float* part_o = static_cast<float*>(lab::StableBuffer(device, 0, partials * (s.d + 1) * 4, stream));
  float* part_lse = part_o + partials * s.d;
  auto* arrivals = static_cast<unsigned*>(lab::StableBuffer(device, 1, batch * s.kv_heads * 4, stream));
  StepQkv step_arg = step;
  __half* k_cache = CacheRows(cache, s, layer, 0);
  __half* v_cache = CacheRows(cache, s, layer, 1);
  const int32_t* position_data = Data<int32_t>(positions);
  __half* out_data = Data<__half>(out);
  int group32 = int(group), max_len32 = int(s.max_len), splits32 = int(splits);
  float scale_arg = scale2;
  void* args[] = {&step_arg, &k_cache, &v_cache, &position_data, &part_o, &part_lse, &arrivals, &out_data,
                  &group32, &max_len32, &splits32, &scale_arg};
  LAB_CHECK_CUDA(lab::LaunchAfterPrevious(reinterpret_cast<const void*>(ForShape<StaticPick>(s.d, group)),
                                          dim3{unsigned(splits), unsigned(s.kv_heads), unsigned(batch)},
                                          dim3{unsigned(StaticWarps(int(s.d)) * 32)}, 0, stream, args, state.major));
}

void KvDecodeAttention(DLTensor* q, DLTensor* k, DLTensor* v, DLTensor* cache, int64_t layer, DLTensor* positions,
                       double sm_scale, int64_t invariant, DLTensor* out) {
  const char* fn = "lab.kv.decode_attention";
  const StaticShape s = CheckStatic(fn, q, k, v, cache, out, layer);
  const int64_t q_heads = q->shape[1];
  const StepQkv step{Data<__half>(q), Data<__half>(k), Data<__half>(v), q_heads * s.d, s.kv_heads * s.d, RopeSpec{}};
  StaticDecodeLaunch(fn, step, s, q_heads, cache, layer, positions, sm_scale, invariant, out);
}

// A RoPE's frequencies, freqs[i] for i < d/2 (RopeSpec): 1 / theta^(2i/d), with Llama-3's scaling
// where factor != 0 as TVM's rope_freq_llama3 scales them ((1 - s) f / factor + s f,
// s = clamp(original_max / (2 pi) / (high - low) * f - low / (high - low), 0, 1)); in double
// precision, rounded once. On the device, one table per (device, head_dim, parameters), made at the
// first call (never during a capture: a graph keeps its address) and kept for the process.
using RopeParameters = std::array<double, 5>;  // theta, factor, low_freq_factor, high_freq_factor, original_max

const float* RopeFrequencies(int device, int64_t d, const RopeParameters& rope, cudaStream_t stream) {
  thread_local std::map<std::tuple<int, int64_t, RopeParameters>, float*> tables;
  const auto key = std::make_tuple(device, d, rope);
  if (auto it = tables.find(key); it != tables.end()) return it->second;
  const auto [theta, factor, low, high, original_max] = rope;
  std::vector<float> freqs(size_t(d / 2));
  for (int64_t i = 0; i < d / 2; ++i) {
    double f = std::pow(theta, -double(2 * i) / double(d));
    if (factor != 0.0) {
      const double smooth = std::clamp(original_max / (2.0 * 3.141592653589793) / (high - low) * f - low / (high - low),
                                       0.0, 1.0);
      f = (1.0 - smooth) * f / factor + smooth * f;
    }
    freqs[size_t(i)] = float(f);
  }
  auto* table = static_cast<float*>(lab::NewBufferOutsideCapture(int64_t(freqs.size() * sizeof(float)), stream));
  LAB_CHECK_CUDA(cudaMemcpyAsync(table, freqs.data(), freqs.size() * sizeof(float), cudaMemcpyHostToDevice, stream));
  LAB_CHECK_CUDA(cudaStreamSynchronize(stream));  // `freqs` is freed on return
  tables.emplace(key, table);
  return table;
}

// lab.kv.decode_attention_rope(qkv [b, Hq + 2 Hkv, d], cache, layer, positions, rope_theta,
// rope_factor, low_freq_factor, high_freq_factor, original_max_position_embeddings, sm_scale,
// invariant, out [b, Hq, d]): RopeSpec (rope_factor 0: no scaling; else Llama-3's, its constants
// derived as TVM's rope_freq_llama3 derives them).
// A layer's fused projection qkv [rows, q_heads + 2 kv_heads, head_dim] and its RoPE parameters
// (the functions' arguments, as engine.model.static_kv.rope_arguments makes them), checked against
// out and the cache; the RoPE's frequency table on the device.
// `last_rows`: out may hold the last 1..rows rows only (a prefill asked for those rows' attention).
RopeSpec CheckQkvRope(const char* fn, DLTensor* qkv, DLTensor* out, const StaticShape& s, const RopeParameters& rope,
                      cudaStream_t stream, bool last_rows = false) {
  Check(qkv, "qkv", 3, 16, kDLFloat);
  const int64_t rows = qkv->shape[0], q_heads = out->shape[1];
  const bool rows_agree = last_rows ? out->shape[0] <= rows && (out->shape[0] >= 1 || rows == 0) : out->shape[0] == rows;
  if (qkv->shape[2] != s.d || out->shape[2] != s.d || !rows_agree ||
      qkv->shape[1] != q_heads + 2 * s.kv_heads || q_heads % s.kv_heads != 0)
    TVM_FFI_THROW(ValueError) << fn << ": qkv [rows, q_heads + 2 kv_heads, head_dim], out ["
                              << (last_rows ? "1..rows" : "rows")
                              << ", q_heads, head_dim] and the cache [layers, 2, slots, kv_heads, max_len, head_dim] do "
                                 "not agree";
  const auto [theta, factor, low_freq_factor, high_freq_factor, original_max] = rope;
  if (!(theta > 0.0)) TVM_FFI_THROW(ValueError) << fn << ": rope_theta must be positive, got " << theta;
  if (factor != 0.0 && (!(factor > 0.0) || !(high_freq_factor > low_freq_factor)))
    TVM_FFI_THROW(ValueError) << fn << ": Llama-3 RoPE scaling needs factor > 0 and high_freq_factor > low_freq_factor";
  RopeSpec spec;
  spec.freqs = RopeFrequencies(out->device.device_id, s.d, rope, stream);
  return spec;
}

void KvDecodeAttentionRope(DLTensor* qkv, DLTensor* cache, int64_t layer, DLTensor* positions, double theta,
                           double factor, double low_freq_factor, double high_freq_factor, double original_max,
                           double sm_scale, int64_t invariant, DLTensor* out) {
  const char* fn = "lab.kv.decode_attention_rope";
  const StaticShape s = CheckCache(fn, cache, out, layer);
  const int64_t q_heads = out->shape[1];
  auto stream = static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, out->device.device_id));
  const RopeSpec rope =
      CheckQkvRope(fn, qkv, out, s, {theta, factor, low_freq_factor, high_freq_factor, original_max}, stream);
  const int64_t stride = qkv->shape[1] * s.d;
  const __half* base = Data<__half>(qkv);
  const StepQkv step{base, base + q_heads * s.d, base + (q_heads + s.kv_heads) * s.d, stride, stride, rope};
  StaticDecodeLaunch(fn, step, s, q_heads, cache, layer, positions, sm_scale, invariant, out);
}

// lab.kv.prefill_attention_rope(qkv [n, Hq + 2 Hkv, d], cache, layer, slot, start, rope_theta,
// rope_factor, low_freq_factor, high_freq_factor, original_max_position_embeddings, sm_scale,
// out [r, Hq, d], 1 <= r <= n): RopeAppendRows (the last r rows' q rotated into out, every row's k
// rotated and v into the slot's rows at start..), then the causal attention of the chunk's last r
// rows with out as their q (AttendChunk: in place; r = 1 where only the last position's output is
// needed, the model's last layer in a prefill).
void KvPrefillAttentionRope(DLTensor* qkv, DLTensor* cache, int64_t layer, int64_t slot, int64_t start, double theta,
                            double factor, double low_freq_factor, double high_freq_factor, double original_max,
                            double sm_scale, DLTensor* out) {
  const char* fn = "lab.kv.prefill_attention_rope";
  const StaticShape s = CheckCache(fn, cache, out, layer);
  const int64_t n = qkv->shape[0], q_heads = out->shape[1];
  const int device = out->device.device_id;
  auto stream = static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, device));
  const RopeSpec rope = CheckQkvRope(fn, qkv, out, s, {theta, factor, low_freq_factor, high_freq_factor, original_max},
                                     stream, /*last_rows=*/true);
  const ChunkRows rows = CheckChunk(fn, cache, s, layer, slot, start, n);
  for (const DLTensor* t : {qkv, cache, out})
    if (reinterpret_cast<uintptr_t>(Data<char>(t)) % 16 != 0)
      TVM_FFI_THROW(ValueError) << fn << ": qkv, the cache and out must be 16-byte aligned";
  if (n == 0) return;
  const int64_t asked = out->shape[0], q_from = n - asked;  // the rows whose attention out holds
  auto kernel = s.d == 32 ? RopeAppendRows<32> : s.d == 64 ? RopeAppendRows<64> : s.d == 128 ? RopeAppendRows<128>
              : s.d == 256 ? RopeAppendRows<256> : nullptr;
  if (kernel == nullptr)
    TVM_FFI_THROW(ValueError) << fn << ": head_dim " << s.d << " is not 32, 64, 128 or 256 (use kv_cache=paged)";
  __half* q = Data<__half>(out);
  kernel<<<unsigned(n), kRopeAppendThreads, 0, stream>>>(Data<__half>(qkv), rope, q, rows.k, rows.v, int(q_heads),
                                                          int(s.kv_heads), int(s.max_len), int(start), int(q_from));
  LAB_CHECK_CUDA(cudaGetLastError());
  AttendChunk(fn, device, stream, s, rows, q, asked, q_heads, start + q_from, sm_scale, q);
}

void CheckInt32(const char* fn, std::initializer_list<std::pair<const DLTensor*, const char*>> tensors) {
  for (const auto& [t, role] : tensors) {
    if (t->device.device_type != kDLCUDA || t->dtype.code != kDLInt || t->dtype.bits != 32 || !IsCompact(t))
      TVM_FFI_THROW(TypeError) << fn << ": " << role << " must be a compact int32 tensor on the GPU";
  }
}

int64_t Numel(const DLTensor* t) {
  int64_t n = 1;
  for (int i = 0; i < t->ndim; ++i) n *= t->shape[i];
  return n;
}

cudaStream_t StreamOf(const DLTensor* t) {
  return static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, t->device.device_id));
}

// Per device, the mailbox made by lab.kv.mailbox (never freed: host readers keep its address).
std::unordered_map<int, std::pair<Mailbox, int32_t*>>& Mailboxes() {
  static auto* boxes = new std::unordered_map<int, std::pair<Mailbox, int32_t*>>();
  return *boxes;
}
std::mutex mailbox_mutex;

// lab.kv.mailbox() -> the host address of this device's mailbox (made on the first call, zeroed):
// int32 words as the Advance kernel writes them; kMailboxRing and kMailboxSlots as `ring`, `slots`.
int64_t KvMailbox() {
  int device = 0;
  LAB_CHECK_CUDA(cudaGetDevice(&device));
  std::lock_guard<std::mutex> lock(mailbox_mutex);
  auto it = Mailboxes().find(device);
  if (it != Mailboxes().end()) return reinterpret_cast<int64_t>(it->second.second);
  const size_t bytes = sizeof(int32_t) * (1 + size_t(kMailboxRing) * kMailboxSlots);
  void* host = nullptr;
  LAB_CHECK_CUDA(cudaHostAlloc(&host, bytes, cudaHostAllocMapped | cudaHostAllocPortable));
  std::memset(host, 0, bytes);
  void* device_view = nullptr;
  LAB_CHECK_CUDA(cudaHostGetDevicePointer(&device_view, host, 0));
  int32_t* calls = nullptr;
  LAB_CHECK_CUDA(cudaMalloc(&calls, sizeof(int32_t)));
  LAB_CHECK_CUDA(cudaMemset(calls, 0, sizeof(int32_t)));
  LAB_CHECK_CUDA(cudaDeviceSynchronize());
  Mailboxes()[device] = {Mailbox{static_cast<volatile int32_t*>(device_view), calls}, static_cast<int32_t*>(host)};
  return reinterpret_cast<int64_t>(host);
}

void KvAdvance(DLTensor* next, DLTensor* ids, DLTensor* positions, DLTensor* out) {
  const char* fn = "lab.kv.advance";
  CheckInt32(fn, {{next, "next"}, {ids, "ids"}, {positions, "positions"}, {out, "out"}});
  const int64_t n = Numel(next);
  if (Numel(ids) != n || Numel(positions) != n || Numel(out) != n)
    TVM_FFI_THROW(ValueError) << fn << ": next, ids, positions and out must have one entry per slot";
  Mailbox mailbox;
  {
    std::lock_guard<std::mutex> lock(mailbox_mutex);
    auto it = Mailboxes().find(next->device.device_id);
    if (it != Mailboxes().end() && n <= kMailboxSlots) mailbox = it->second.first;
  }
  const unsigned threads = mailbox.host != nullptr ? unsigned(std::max<int64_t>(32, (n + 31) / 32 * 32)) : 128;
  const int32_t* next_data = Data<int32_t>(next);
  int32_t *ids_data = Data<int32_t>(ids), *positions_data = Data<int32_t>(positions), *out_data = Data<int32_t>(out);
  int n32 = int(n);
  void* args[] = {&next_data, &ids_data, &positions_data, &out_data, &n32, &mailbox};
  LAB_CHECK_CUDA(lab::LaunchAfterPrevious(reinterpret_cast<const void*>(Advance), dim3(unsigned((n + threads - 1) / threads)),
                                          dim3(threads), 0, StreamOf(next), args, lab::Facts(next->device.device_id).major));
}

void KvSettlePrefill(DLTensor* next, DLTensor* ids, DLTensor* positions, int64_t slot, int64_t length, DLTensor* out) {
  const char* fn = "lab.kv.settle_prefill";
  CheckInt32(fn, {{next, "next"}, {ids, "ids"}, {positions, "positions"}, {out, "out"}});
  const int64_t n = Numel(next);
  if (slot < 0 || slot >= Numel(positions) || Numel(out) != n || n < 1)
    TVM_FFI_THROW(ValueError) << fn << ": slot " << slot << " of " << Numel(positions);
  SettlePrefill<<<unsigned((n + 127) / 128), 128, 0, StreamOf(next)>>>(
      Data<int32_t>(next), int(n), Data<int32_t>(ids), Data<int32_t>(positions), int(slot), int(length),
      Data<int32_t>(out));
  LAB_CHECK_CUDA(cudaGetLastError());
}

// lab.kv.argmax(logits [rows, vocab] float32, out [rows] int32); scratch that never moves (the
// call is captured in the decode step's graph; made by the first call, before the capture).
void KvArgmax(DLTensor* logits, DLTensor* out) {
  const char* fn = "lab.kv.argmax";
  Check(logits, "logits", 2, 32, kDLFloat);
  CheckInt32(fn, {{out, "out"}});
  const int64_t rows = logits->shape[0], vocab = logits->shape[1];
  if (Numel(out) != rows) TVM_FFI_THROW(ValueError) << fn << ": out must have one entry per row of logits";
  if (vocab < 1 || vocab > INT_MAX) TVM_FFI_THROW(ValueError) << fn << ": a row of " << vocab << " logits";
  if (rows == 0) return;
  const int device = logits->device.device_id;
  cudaStream_t stream = StreamOf(logits);
  const int64_t parts = std::min<int64_t>(kArgmaxMaxParts, (vocab + kArgmaxThreads * kArgmaxPerThread - 1) /
                                                               (kArgmaxThreads * kArgmaxPerThread));
  float* part_value = static_cast<float*>(lab::StableBuffer(device, 2, rows * parts * 8, stream));
  int* part_index = reinterpret_cast<int*>(part_value + rows * parts);
  auto* arrivals = static_cast<unsigned*>(lab::StableBuffer(device, 3, rows * 4, stream));
  const float* logits_data = Data<float>(logits);
  int64_t vocab_arg = vocab;
  int32_t* out_data = Data<int32_t>(out);
  void* args[] = {&logits_data, &vocab_arg, &part_value, &part_index, &arrivals, &out_data};
  LAB_CHECK_CUDA(lab::LaunchAfterPrevious(reinterpret_cast<const void*>(ArgmaxRows), dim3(unsigned(parts), unsigned(rows)),
                                          dim3(kArgmaxThreads), 0, stream, args, lab::Facts(device).major));
}

void KvSetIds(DLTensor* new_ids, DLTensor* ids, DLTensor* out) {
  const char* fn = "lab.kv.set_ids";
  CheckInt32(fn, {{new_ids, "new"}, {ids, "ids"}, {out, "out"}});
  const int64_t n = Numel(new_ids);
  if (Numel(ids) != n || Numel(out) != n) TVM_FFI_THROW(ValueError) << fn << ": new, ids and out differ in size";
  cudaStream_t stream = StreamOf(new_ids);
  LAB_CHECK_CUDA(cudaMemcpyAsync(Data<int32_t>(ids), Data<int32_t>(new_ids), n * 4, cudaMemcpyDeviceToDevice, stream));
  LAB_CHECK_CUDA(cudaMemcpyAsync(Data<int32_t>(out), Data<int32_t>(new_ids), n * 4, cudaMemcpyDeviceToDevice, stream));
}

}  // namespace

TVM_FFI_STATIC_INIT_BLOCK() {
  namespace refl = tvm::ffi::reflection;
  refl::GlobalDef().def("lab.attention.prefill_ragged", PrefillRagged);
  refl::GlobalDef().def("lab.attention.prefill_path", SetPrefillPath);
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
  refl::GlobalDef().def("lab.kv.prefill_attention", KvPrefillAttention);
  refl::GlobalDef().def("lab.kv.prefill_attention_rope", KvPrefillAttentionRope);
  refl::GlobalDef().def("lab.kv.decode_attention", KvDecodeAttention);
  refl::GlobalDef().def("lab.kv.decode_attention_rope", KvDecodeAttentionRope);
  refl::GlobalDef().def("lab.kv.advance", KvAdvance);
  refl::GlobalDef().def("lab.kv.argmax", KvArgmax);
  refl::GlobalDef().def("lab.kv.decode_cluster", SetDecodeCluster);
  refl::GlobalDef().def("lab.kv.decode_tensor_cores", SetDecodeTensorCores);
  refl::GlobalDef().def("lab.kv.mailbox", KvMailbox);
  refl::GlobalDef().def("lab.kv.settle_prefill", KvSettlePrefill);
  refl::GlobalDef().def("lab.kv.set_ids", KvSetIds);
}
