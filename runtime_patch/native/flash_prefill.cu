// The prefill's causal attention in one kernel (flash attention, the FlashAttention-2 schedule):
// a block of 4 warps takes 64 query rows of one query head, 16 rows per warp, and walks the keys
// its rows can see in tiles of 64. Per tile, S = Q K^T on the tensor cores (mma.sync m16n8k16,
// float16 in, float32 accumulators), the causal mask, an online softmax in base 2 (the running
// maximum and sum of each row; the output rescaled when the maximum grows), and O += P V with P
// converted from S's accumulator registers straight into the next mma's operand registers. The
// scores never leave registers; the output is divided by the row sums once, at the end.
//
// Memory: the block's Q tile is read once; each K and V tile goes through shared memory with
// cp.async, two buffers so that tile t + 1 loads while tile t computes. Rows are stored with their
// 16-byte chunks permuted (chunk XOR row) so that the 8 rows an ldmatrix reads at once fall in
// different banks. Rows past the keys or the queries are zero-filled (V's zeros keep 0 * garbage
// out of the sums). Blocks are issued longest first over the whole grid (the last
// query rows see the most keys; the heads are the grid's x, its fastest-issued dimension, and the
// row blocks its y, last rows first, so that every head's longest blocks start in the first wave
// and the short ones fill the tail: with the rows as x, the last head's longest blocks started in
// the last wave and 19% of the SMs' cycles idled in a 4096-token prefill, ncu on an H200).
//
// GQA: the block's query head h reads KV head h / (q_heads / kv_heads); the other query heads of
// the group read the same tiles through L2.
//
// On sm_90 at head dim 128 a second kernel, on the warpgroup MMA, runs instead once its blocks fill
// the SMs (FlashPrefillWgKernel below: the tensor cores read Q, K and V from shared memory once for
// a warpgroup of four warps; docs/ARCHITECTURE.md, docs/BENCHMARKS.md fifteenth round).
#include "flash_prefill.h"

#include <cuda_fp16.h>
#include <cuda_pipeline.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "cuda_common.h"
#include "mma_fragments.h"
#include "wgmma.h"

namespace lab {
namespace {

using mma::LoadMatrices;
using mma::LoadMatricesTransposed;
using mma::Mma;
using mma::PackHalf2;

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kRows = 16 * kWarps;  // query rows per block
constexpr int kKeys = 64;           // keys per tile

template <int D>
struct Tile {
  static constexpr int kChunks = D / 8;   // 16-byte chunks of a row
  static constexpr int kSlices = D / 16;  // k16 slices of a head (S = Q K^T)
  static constexpr int kColumns = D / 8;  // n8 tiles of a head (O)
  // rows sharing one 128-byte line of banks, and the chunk permutation's period
  static constexpr int kRowsPerLine = kChunks >= 8 ? 1 : 8 / kChunks;
  static constexpr int kPeriod = kChunks >= 8 ? 8 : kChunks;
  static constexpr int kSmemBytes = (kRows + 4 * kKeys) * D * 2;  // Q, then K and V twice

  // The element offset of chunk `chunk` of row `row`.
  __device__ static int Offset(int row, int chunk) {
    return row * D + (chunk ^ ((row / kRowsPerLine) % kPeriod)) * 8;
  }
};

// Rows [row0, row0 + count) of a [rows, D] tile from global memory (row r at src + r * ld) into
// shared memory, zero-filled past `valid` rows.
template <int D>
__device__ void CopyRows(__half* smem, const __half* src, int64_t ld, int count, int valid) {
  for (int c = threadIdx.x; c < count * Tile<D>::kChunks; c += kThreads) {
    const int r = c / Tile<D>::kChunks, chunk = c % Tile<D>::kChunks;
    const bool inside = r < valid;
    __pipeline_memcpy_async(smem + Tile<D>::Offset(r, chunk), src + (inside ? r : 0) * ld + chunk * 8, 16,
                            inside ? 0 : 16);
  }
}

// The end of either kernel for one warp's 16 query rows from warp_row on (head h): each row's sum
// over the 4 lanes of its quad, then rows warp_row + lane / 4 and + 8 of O (accumulators o[4c + e]
// of column tile c: mma.sync's and wgmma's layout) divided by it into a.out, and the row's base-2
// log-sum-exp into a.lse where asked. Rows from a.n on are not written.
template <int D>
__device__ __forceinline__ void WriteRows(const FlashPrefillArgs& a, const float (&o)[D / 2], float (&row_sum)[2],
                                          const float (&row_max)[2], int warp_row, int h, int lane) {
  const int g = lane / 4, t4 = lane % 4;
  for (int r = 0; r < 2; ++r) {
    row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 1);
    row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 2);
  }
  for (int r = 0; r < 2; ++r) {
    const int row = warp_row + g + r * 8;
    if (row >= int(a.n)) continue;
    const float inverse = row_sum[r] > 0.f ? 1.f / row_sum[r] : 0.f;
    __half* dst = a.out + int64_t(row) * a.q_ld + h * D + 2 * t4;
#pragma unroll
    for (int c = 0; c < D / 8; ++c)
      *reinterpret_cast<__half2*>(dst + c * 8) = __floats2half2_rn(o[4 * c + 2 * r] * inverse, o[4 * c + 2 * r + 1] * inverse);
    if (a.lse != nullptr && t4 == 0)
      a.lse[(a.lse_row0 + row) * a.q_heads + h] =
          row_sum[r] > 0.f ? row_max[r] * a.scale2 + log2f(row_sum[r]) : -INFINITY;
  }
}

template <int D>
__global__ void __launch_bounds__(kThreads, 2) FlashPrefillKernel(FlashPrefillArgs a) {
  using T = Tile<D>;
  extern __shared__ __align__(16) unsigned char smem[];
  __half* sq = reinterpret_cast<__half*>(smem);
  __half* sk = sq + kRows * D;        // [2][kKeys][D]
  __half* sv = sk + 2 * kKeys * D;    // [2][kKeys][D]
  const int n = int(a.n), m = int(a.m), shift = m - n;
  const int q0 = (gridDim.y - 1 - blockIdx.y) * kRows;  // longest first over the grid (file header)
  const int h = blockIdx.x, hk = h / int(a.q_heads / a.kv_heads);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int last_row = min(q0 + kRows, n) - 1;
  const int last_key = a.causal ? min(m - 1, last_row + shift) : m - 1;
  const int tiles = last_key / kKeys + 1;
  const __half* k = a.k + hk * a.kv_head_stride;
  const __half* v = a.v + hk * a.kv_head_stride;

  CopyRows<D>(sq, a.q + q0 * a.q_ld + h * D, a.q_ld, kRows, n - q0);
  __pipeline_commit();
  CopyRows<D>(sk, k, a.kv_ld, kKeys, m);
  CopyRows<D>(sv, v, a.kv_ld, kKeys, m);
  __pipeline_commit();
  __pipeline_wait_prior(1);  // Q
  __syncthreads();
  // Q's k16 slices as mma operands: matrices (rows 0-7 | 8-15) x (columns 0-7 | 8-15)
  uint32_t qf[T::kSlices][4];
#pragma unroll
  for (int s = 0; s < T::kSlices; ++s)
    LoadMatrices(qf[s], sq + T::Offset(warp * 16 + (lane / 8) % 2 * 8 + lane % 8, 2 * s + lane / 16));

  float o[T::kColumns][4];
#pragma unroll
  for (int c = 0; c < T::kColumns; ++c) o[c][0] = o[c][1] = o[c][2] = o[c][3] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};
  const int g = lane / 4, t4 = lane % 4;
  const int warp_row = q0 + warp * 16;  // the warp's first query row

  for (int t = 0; t < tiles; ++t) {
    const int buffer = t & 1;
    if (t + 1 < tiles) {
      const int j1 = (t + 1) * kKeys;
      CopyRows<D>(sk + (buffer ^ 1) * kKeys * D, k + j1 * a.kv_ld, a.kv_ld, kKeys, m - j1);
      CopyRows<D>(sv + (buffer ^ 1) * kKeys * D, v + j1 * a.kv_ld, a.kv_ld, kKeys, m - j1);
    }
    __pipeline_commit();
    __pipeline_wait_prior(1);  // every group but the one just committed: this tile's
    __syncthreads();
    const __half* kt = sk + buffer * kKeys * D;
    const __half* vt = sv + buffer * kKeys * D;
    const int j0 = t * kKeys;

    // S[16 rows x 64 keys] of this warp: key tiles of 8 as pairs, one ldmatrix for both
    float s[kKeys / 8][4];
    #pragma unroll
    for (int c = 0; c < kKeys / 8; ++c) s[c][0] = s[c][1] = s[c][2] = s[c][3] = 0.f;
    #pragma unroll
    for (int slice = 0; slice < T::kSlices; ++slice) {
      #pragma unroll
      for (int c = 0; c < kKeys / 8; c += 2) {
        uint32_t b[4];
        LoadMatrices(b, kt + T::Offset(c * 8 + lane / 16 * 8 + lane % 8, 2 * slice + (lane / 8) % 2));
        Mma(s[c], qf[slice], b[0], b[1]);
        Mma(s[c + 1], qf[slice], b[2], b[3]);
      }
    }
    // Mask keys past the context and, causally, past each row's position.
    if (j0 + kKeys > m || (a.causal && j0 + kKeys - 1 > warp_row + shift)) {
      #pragma unroll
      for (int c = 0; c < kKeys / 8; ++c) {
        for (int e = 0; e < 4; ++e) {
          const int key = j0 + c * 8 + 2 * t4 + (e & 1), row = warp_row + g + (e >> 1) * 8;
          if (key >= m || (a.causal && key > row + shift)) s[c][e] = -INFINITY;
        }
      }
    }
    // Online softmax: the rows' new maxima (a row's 64 keys are spread over the 4 lanes of a quad)
    float top[2] = {row_max[0], row_max[1]};
    #pragma unroll
    for (int c = 0; c < kKeys / 8; ++c) {
      top[0] = fmaxf(top[0], fmaxf(s[c][0], s[c][1]));
      top[1] = fmaxf(top[1], fmaxf(s[c][2], s[c][3]));
    }
    float base[2];
    #pragma unroll
    for (int r = 0; r < 2; ++r) {
      top[r] = fmaxf(top[r], __shfl_xor_sync(0xffffffffu, top[r], 1));
      top[r] = fmaxf(top[r], __shfl_xor_sync(0xffffffffu, top[r], 2));
      base[r] = top[r] == -INFINITY ? 0.f : top[r] * a.scale2;
      const float rescale = row_max[r] == -INFINITY ? 0.f : exp2f(row_max[r] * a.scale2 - base[r]);
      row_max[r] = top[r];
      row_sum[r] *= rescale;
      #pragma unroll
      for (int c = 0; c < T::kColumns; ++c) {
        o[c][2 * r] *= rescale;
        o[c][2 * r + 1] *= rescale;
      }
    }
    #pragma unroll
    for (int c = 0; c < kKeys / 8; ++c) {
      for (int e = 0; e < 4; ++e) s[c][e] = exp2f(fmaf(s[c][e], a.scale2, -base[e >> 1]));
      row_sum[0] += s[c][0] + s[c][1];
      row_sum[1] += s[c][2] + s[c][3];
    }
    // O += P V: P's accumulators of key tiles 2 kk and 2 kk + 1 are the A operand of keys
    // 16 kk..16 kk + 15; V's rows through ldmatrix.trans are the B operand.
    #pragma unroll
    for (int kk = 0; kk < kKeys / 16; ++kk) {
      const uint32_t p[4] = {PackHalf2(s[2 * kk][0], s[2 * kk][1]), PackHalf2(s[2 * kk][2], s[2 * kk][3]),
                             PackHalf2(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                             PackHalf2(s[2 * kk + 1][2], s[2 * kk + 1][3])};
      #pragma unroll
      for (int c = 0; c < T::kColumns; c += 2) {
        uint32_t b[4];
        LoadMatricesTransposed(b, vt + T::Offset(kk * 16 + (lane / 8) % 2 * 8 + lane % 8, c + lane / 16));
        Mma(o[c], p, b[0], b[1]);
        Mma(o[c + 1], p, b[2], b[3]);
      }
    }
    __syncthreads();  // this buffer is refilled by the copies issued at tile t + 1
  }

  WriteRows<D>(a, reinterpret_cast<const float(&)[D / 2]>(o), row_sum, row_max, warp_row, h, lane);
}

// ------------------------------------------------------------------------------------------------
// Head dim 128 on Hopper (sm_90a): the warpgroup MMA
//
// The kernel above reached 189-196 TFLOP/s at 4096 tokens (half of PyTorch's SDPA on an H200): each
// warp ldmatrix-loads every K and V tile for its own 16 rows, 32 KB of shared-memory reads a warp a
// tile, and the tensor pipe waits on them. Here a warpgroup (4 warps) takes 64 query rows and the
// tensor cores read the operands from shared memory once for all four warps:
//   S [64 x 64 keys] = Q K^T: 8 m64n64k16 wgmmas, Q and K both by descriptor (K-major: a row's
//     head elements contiguous);
//   O [64 x 128] += P V: 4 m64n128k16 wgmmas, P from registers (S's accumulators, scaled and
//     rounded: the accumulator layout is the A-operand layout, as with mma.sync), V by descriptor
//     MN-major (V [keys, d] has d, the N dimension, contiguous: the instruction's transpose flag).
// The online softmax between them is the kernel above's (base 2, the running maximum and sum of a
// row over the 4 lanes of a quad). A block is Wgs warpgroups (4, or 2 where a grid of 4 would not
// fill the SMs) sharing the K and V tiles: up to Wgs query heads of one KV head over the same 64
// rows (the most that divides the GQA group: Llama-3's group of 4 takes four heads, each K and V
// tile read from L2 once for all of them; same keys, same causal extent), the rest of the
// warpgroups taking further rows. Tiles of 64 keys, two buffers (cp.async, every thread), rows of
// 64 elements (128 bytes) in the 128-byte swizzle (chunk c of row r at c ^ (r % 8)) that the
// descriptors describe; 128 KB and one block an SM for 4 warpgroups, 96 KB and two for 2; 128
// registers. One barrier a tile keeps the warpgroups in step; within a tile the second half of
// them issues its S only after the first half (a named barrier: ping-pong), so that one half's
// softmax overlaps the other's MMAs. Llama-3-8B's heads at 4096 tokens on an H200: 2 warpgroups a
// block 498-511 us, 4 warpgroups 460, + the grid's longest-first order (file header) 378, +
// ping-pong 343 (cuDNN's FlashAttention through SDPA 359-361; docs/BENCHMARKS.md, sixteenth round).
constexpr int kWgD = 128;
constexpr int kWgRows = 64;    // query rows of a warpgroup
constexpr int kWgKeys = 64;    // keys per tile
constexpr int kWgHalf = kWgRows * 128;            // bytes of one 64-column half of a [64, 128] tile
constexpr int kWgTile = 2 * kWgHalf;               // bytes of a [64, 128] float16 tile
// Shared memory of a block of Wgs warpgroups: Q of each, K and V twice, + alignment
template <int Wgs>
constexpr int WgSmem() { return (Wgs + 4) * kWgTile + 1024; }

// 2^x on the special-function unit (ex2.approx; a result below 2^-126 flushes to 0: a probability
// that small does not count against the row's sum of at least 1).
__device__ __forceinline__ float Exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Rows [0, 64) of a [rows, 128] float16 tile from src (row r at src + r * ld) into the swizzled
// layout at `tile`, zero-filled from row `valid` on; `part` of `parts` threads' share.
__device__ __forceinline__ void CopyTileWg(unsigned char* tile, const __half* src, int64_t ld, int valid, int part,
                                           int parts) {
  for (int c = part; c < kWgRows * 16; c += parts) {
    const int r = c / 16, chunk = c % 16, half = chunk / 8, cc = chunk % 8;
    const bool inside = r < valid;
    __pipeline_memcpy_async(tile + half * kWgHalf + r * 128 + ((cc ^ (r % 8)) * 16), src + (inside ? r : 0) * ld + chunk * 8,
                            16, inside ? 0 : 16);
  }
}

// Named barriers (bar.sync / bar.arrive): Sync waits until Count threads have come (by either),
// Arrive counts this thread's warp in and goes on.
constexpr int kPingPongBarrier = 1;  // 0 is __syncthreads'
template <int Id, int Count>
__device__ __forceinline__ void NamedBarrierSync() {
  asm volatile("bar.sync %0, %1;" ::"n"(Id), "n"(Count) : "memory");
}
template <int Id, int Count>
__device__ __forceinline__ void NamedBarrierArrive() {
  asm volatile("bar.arrive %0, %1;" ::"n"(Id), "n"(Count) : "memory");
}

template <int Wgs, int Heads>
__global__ void __launch_bounds__(128 * Wgs, 4 / Wgs) FlashPrefillWgKernel(FlashPrefillArgs a) {
#if LAB_WGMMA
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const uint32_t raw_address = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw));
  const uint32_t pad = (1024u - raw_address % 1024u) % 1024u;
  unsigned char* smem = smem_raw + pad;
  const uint32_t base = raw_address + pad;  // Q of each warpgroup | K0 | K1 | V0 | V1, kWgTile each
  constexpr int kThreadsWg = 128 * Wgs;
  const int n = int(a.n), m = int(a.m), shift = m - n;
  // The warpgroup and warp as values the compiler knows to be warp-uniform (lane 0's, shuffled):
  // wgmmas under a condition it cannot prove uniform are serialized (ptxas C7518 / C7520).
  const int wg = __shfl_sync(0xffffffffu, int(threadIdx.x) / 128, 0);
  const int warp = __shfl_sync(0xffffffffu, int(threadIdx.x % 128) / 32, 0), lane = threadIdx.x % 32;
  // warpgroup w: head w % Heads of the block's Heads query heads, rows 64 (w / Heads) on
  constexpr int kBlockRows = kWgRows * (Wgs / Heads);
  const int q0 = (gridDim.y - 1 - blockIdx.y) * kBlockRows;  // longest first over the grid (file header)
  const int h = blockIdx.x * Heads + wg % Heads;
  const int row0 = q0 + (wg / Heads) * kWgRows;              // this warpgroup's first row
  const int hk = h / int(a.q_heads / a.kv_heads);
  const int block_last_row = min(q0 + kBlockRows, n) - 1;
  const int last_key = a.causal ? min(m - 1, block_last_row + shift) : m - 1;
  const int tiles = last_key / kWgKeys + 1;
  // the last key this warpgroup's rows see (its tiles past it are skipped)
  const int wg_last_key = a.causal ? min(m - 1, min(row0 + kWgRows, n) - 1 + shift) : m - 1;
  const __half* k = a.k + hk * a.kv_head_stride;
  const __half* v = a.v + hk * a.kv_head_stride;

  // Q of every warpgroup (rows past n zero), then K and V tile 0
  for (int w = 0; w < Wgs; ++w) {
    const int r0 = q0 + (w / Heads) * kWgRows, head = blockIdx.x * Heads + w % Heads;
    CopyTileWg(smem + w * kWgTile, a.q + int64_t(r0) * a.q_ld + head * kWgD, a.q_ld, n - r0, threadIdx.x,
               kThreadsWg);
  }
  CopyTileWg(smem + Wgs * kWgTile, k, a.kv_ld, m, threadIdx.x, kThreadsWg);
  CopyTileWg(smem + (Wgs + 2) * kWgTile, v, a.kv_ld, m, threadIdx.x, kThreadsWg);
  __pipeline_commit();

  float o[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) o[i] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};
  const int g = lane / 4, t4 = lane % 4;
  const int warp_row = row0 + warp * 16;  // the warp's first query row
  const uint32_t q_address = base + wg * kWgTile;

  for (int t = 0; t < tiles; ++t) {
    const int buffer = t & 1;
    __pipeline_wait_prior(0);  // this tile (and at t = 0 Q)
    wgmma::FenceSharedWrites();
    // One barrier a tile: this tile has landed for every thread, and every warpgroup is done with
    // tile t - 1, whose buffer the copies of tile t + 1 refill next.
    __syncthreads();
    if (t + 1 < tiles) {
      const int j1 = (t + 1) * kWgKeys;
      CopyTileWg(smem + (Wgs + (buffer ^ 1)) * kWgTile, k + int64_t(j1) * a.kv_ld, a.kv_ld, m - j1, threadIdx.x,
                 kThreadsWg);
      CopyTileWg(smem + (Wgs + 2 + (buffer ^ 1)) * kWgTile, v + int64_t(j1) * a.kv_ld, a.kv_ld, m - j1, threadIdx.x,
                 kThreadsWg);
    }
    __pipeline_commit();
    const int j0 = t * kWgKeys;
    const bool active = j0 <= wg_last_key;  // uniform over the warpgroup
    const uint32_t k_address = base + (Wgs + buffer) * kWgTile, v_address = base + (Wgs + 2 + buffer) * kWgTile;
    // Ping-pong: the block's second half of warpgroups issues its S only once the first half has
    // issued its own, so that the first half's softmax runs while the second half's S is on the
    // tensor cores, and the second half's while the first half's P V is (without it the barrier
    // above keeps every warpgroup in step: all of them in their softmax at once, the tensor cores idle).
    const bool leads = wg < Wgs / 2;
    if (!leads) NamedBarrierSync<kPingPongBarrier, kThreadsWg>();
    if (!active && leads) NamedBarrierArrive<kPingPongBarrier, kThreadsWg>();
    if (active) {
      float s[32];
      wgmma::Fence();
#pragma unroll
      for (int slice = 0; slice < kWgD / 16; ++slice) {
        const uint32_t offset = (slice / 4) * kWgHalf + (slice % 4) * 32;
        wgmma::MmaM64N64K16SS(s, wgmma::SwizzledRowsDescriptor(q_address + offset),
                              wgmma::SwizzledRowsDescriptor(k_address + offset), slice > 0);
      }
      wgmma::Commit();
      if (leads) NamedBarrierArrive<kPingPongBarrier, kThreadsWg>();
      wgmma::Wait<0>();
      // s[4j + e]: row warp_row + g (e < 2) or + 8, key j0 + 8j + 2 t4 + e % 2
      if (j0 + kWgKeys > m || (a.causal && j0 + kWgKeys - 1 > warp_row + shift)) {
#pragma unroll
        for (int j = 0; j < kWgKeys / 8; ++j) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int key = j0 + j * 8 + 2 * t4 + (e & 1), row = warp_row + g + (e >> 1) * 8;
            if (key >= m || (a.causal && key > row + shift)) s[4 * j + e] = -INFINITY;
          }
        }
      }
      float top[2] = {row_max[0], row_max[1]};
#pragma unroll
      for (int j = 0; j < kWgKeys / 8; ++j) {
        top[0] = fmaxf(top[0], fmaxf(s[4 * j], s[4 * j + 1]));
        top[1] = fmaxf(top[1], fmaxf(s[4 * j + 2], s[4 * j + 3]));
      }
      float base2[2], rescale[2];
      bool grew = false;
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        top[r] = fmaxf(top[r], __shfl_xor_sync(0xffffffffu, top[r], 1));
        top[r] = fmaxf(top[r], __shfl_xor_sync(0xffffffffu, top[r], 2));
        base2[r] = top[r] == -INFINITY ? 0.f : top[r] * a.scale2;
        rescale[r] = row_max[r] == -INFINITY ? 0.f : Exp2(row_max[r] * a.scale2 - base2[r]);
        grew |= top[r] != row_max[r];
        row_max[r] = top[r];
        row_sum[r] *= rescale[r];
      }
      // O is rescaled only where a row's maximum grew (past the first tiles it rarely does)
      if (__any_sync(0xffffffffu, grew)) {
#pragma unroll
        for (int j = 0; j < kWgD / 8; ++j) {
          o[4 * j] *= rescale[0];
          o[4 * j + 1] *= rescale[0];
          o[4 * j + 2] *= rescale[1];
          o[4 * j + 3] *= rescale[1];
        }
      }
      uint32_t p[kWgKeys / 16][4];
#pragma unroll
      for (int j = 0; j < kWgKeys / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) s[4 * j + e] = Exp2(fmaf(s[4 * j + e], a.scale2, -base2[e >> 1]));
        row_sum[0] += s[4 * j] + s[4 * j + 1];
        row_sum[1] += s[4 * j + 2] + s[4 * j + 3];
      }
      // P's k16 slice kk (keys 16 kk..): key tiles 2 kk and 2 kk + 1 of S, as an A operand
#pragma unroll
      for (int kk = 0; kk < kWgKeys / 16; ++kk) {
        p[kk][0] = PackHalf2(s[8 * kk], s[8 * kk + 1]);
        p[kk][1] = PackHalf2(s[8 * kk + 2], s[8 * kk + 3]);
        p[kk][2] = PackHalf2(s[8 * kk + 4], s[8 * kk + 5]);
        p[kk][3] = PackHalf2(s[8 * kk + 6], s[8 * kk + 7]);
      }
      wgmma::Fence();
#pragma unroll
      for (int kk = 0; kk < kWgKeys / 16; ++kk)  // keys 16 kk.. are V's rows 16 kk.. (2048 bytes a slice)
        wgmma::MmaM64N128K16<true>(o, p[kk], wgmma::SwizzledColumnsDescriptor(v_address + kk * 2048, kWgHalf));
      wgmma::Commit();
      wgmma::Wait<0>();
    }
  }

  WriteRows<kWgD>(a, o, row_sum, row_max, warp_row, h, lane);
#else
  __trap();
#endif
}

// The grid of the warpgroup kernel of Wgs warpgroups a block for `args`, and the query heads a
// block takes: the most of Wgs, Wgs / 2, .. 1 that divides the GQA group (those heads share one KV
// head and the same rows), the rest of its warpgroups taking further rows.
template <int Wgs>
dim3 WgGrid(const FlashPrefillArgs& args, int* heads_per_block) {
  const int64_t group = args.q_heads / args.kv_heads;
  int heads = Wgs;
  while (group % heads != 0) heads /= 2;
  *heads_per_block = heads;
  const int64_t block_rows = kWgRows * (Wgs / heads);
  return dim3(unsigned(args.q_heads / heads), unsigned((args.n + block_rows - 1) / block_rows));
}

template <int Wgs, int Heads>
void LaunchWg(const FlashPrefillArgs& args, dim3 grid, cudaStream_t stream) {
  constexpr int kSmem = WgSmem<Wgs>();
  const auto kernel = FlashPrefillWgKernel<Wgs, Heads>;
  LAB_CHECK_CUDA(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem));
  kernel<<<grid, 128 * Wgs, kSmem, stream>>>(args);
  LAB_CHECK_CUDA(cudaGetLastError());
}

template <int Wgs>
void LaunchWg(const FlashPrefillArgs& args, dim3 grid, int heads, cudaStream_t stream) {
  if (Wgs >= 4 && heads == 4) return LaunchWg<Wgs, Wgs >= 4 ? 4 : 1>(args, grid, stream);
  if (heads == 2) return LaunchWg<Wgs, 2>(args, grid, stream);
  return LaunchWg<Wgs, 1>(args, grid, stream);
}

template <int D>
void Launch(const FlashPrefillArgs& args, cudaStream_t stream) {
  const auto kernel = FlashPrefillKernel<D>;
  LAB_CHECK_CUDA(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tile<D>::kSmemBytes));
  const dim3 grid(unsigned(args.q_heads), unsigned((args.n + kRows - 1) / kRows));
  kernel<<<grid, kThreads, Tile<D>::kSmemBytes, stream>>>(args);
  LAB_CHECK_CUDA(cudaGetLastError());
}

bool Aligned(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

bool FlashPrefillApplies(const FlashPrefillArgs& a, int major) {
  return major >= 8 && (a.d == 32 || a.d == 64 || a.d == 128) && a.q_heads % a.kv_heads == 0 && a.m >= 1 &&
         (a.m >= a.n || !a.causal) &&
         a.n <= int64_t(kRows) * 65535 && a.m <= INT32_MAX && a.q_ld % 8 == 0 && a.kv_ld % 8 == 0 && a.kv_head_stride % 8 == 0 &&
         Aligned(a.q) && Aligned(a.k) && Aligned(a.v) && Aligned(a.out);
}

void FlashPrefill(const FlashPrefillArgs& args, cudaStream_t stream) {
  if (args.n == 0) return;
  switch (args.d) {
    case 32: return Launch<32>(args, stream);
    case 64: return Launch<64>(args, stream);
    case 128: {
      int device = 0;
      LAB_CHECK_CUDA(cudaGetDevice(&device));
      const DeviceFacts& facts = Facts(device);
      // The warpgroup kernel once its blocks fill the SMs, of 4 warpgroups where that grid does,
      // else of 2: a block does the work of two or four of the mma.sync kernel's, so a grid short
      // of one block an SM finishes sooner spread over more of them (1 x H200: a 1000-token MHA
      // prefill of 8 heads, 64 blocks, 77 against 67 us).
      if (args.warpgroup && facts.major == 9 && facts.minor == 0) {
        int heads = 0;
        const dim3 grid4 = WgGrid<4>(args, &heads);
        if (int64_t(grid4.x) * grid4.y >= facts.sms) return LaunchWg<4>(args, grid4, heads, stream);
        const dim3 grid2 = WgGrid<2>(args, &heads);
        if (int64_t(grid2.x) * grid2.y >= facts.sms) return LaunchWg<2>(args, grid2, heads, stream);
      }
      return Launch<128>(args, stream);
    }
    default: TVM_FFI_THROW(ValueError) << "lab.attention: no fused prefill kernel for head dim " << args.d;
  }
}

}  // namespace lab
