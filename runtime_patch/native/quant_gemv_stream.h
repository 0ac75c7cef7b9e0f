// The streaming decode GEMV (sm_90): the same functions as quant_gemv.cu's register kernel
// (lab.gemv.q4 / q8 and their fusions), for the shapes where its loads and its arithmetic must
// overlap to approach the copy bandwidth.
//
// Why: in the register kernel a warp issues one round of weight loads, waits for all of them, then
// computes; the SM's HBM traffic for that warp stops while it computes. On Llama-3-8B's q4 gate_up
// (28672 x 4096) a block's arithmetic (~2 us of issue for its 16 warps) and its loads (~5 us)
// added up rather than overlapped: 23.9 us, 70% of the copy bandwidth, against q8's 97% on the same
// shape (bench.gemv, 2026-12-01).
//
// How: one block per SM (persistent), tiles of whole rows. A producer warp streams each tile's packed
// rows and scales (contiguous in MLC's layout) into a ring of shared-memory stages with 1-D bulk
// copies (cp.async.bulk, the TMA unit: one instruction per contiguous run, completion counted in
// bytes on the stage's mbarrier), up to StreamPlan::stages tiles ahead, so that HBM always has
// ~kStreamBytesInFlight per SM requested while the consumer warps compute. Consumer warp w takes
// row w / S of every tile and segment w % S of its groups (S = segments per row, so that a lane holds
// at most kStreamGroups groups); a lane keeps its groups of x in registers for the whole kernel (q4:
// already paired, PairedChunk), reads each tile's words and scales from shared memory (16-byte
// loads, consecutive lanes on consecutive vectors: no bank conflicts), and leaves its warp's partial
// sum in the stage's slot before releasing the stage (the `empty` mbarrier). The producer, once a
// stage is released, sums the row's segments, applies the fusion (residual add, SwiGLU) and writes
// the outputs, then refills the stage.
//
// Launched early (fusion.early, lab::LaunchAfterPrevious) the producer issues the first `stages`
// tiles before lab::WaitForPrevious and x's copy after it; the epilogue (residual, out) comes after
// the wait as well.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "cuda_common.h"
#include "quant_gemv_math.h"

namespace lab::gemv {

constexpr int kStreamConsumers = 8;                // consumer warps at most (T x S of them)
constexpr int kStreamGroups = 4;                   // groups of 32 weights a lane holds x for, at most
constexpr int kStreamMaxStages = 16;
constexpr int kStreamBarrierBytes = 1024;          // full[16], empty[16], x's; then the partial sums
constexpr int kStreamHeaderBytes = 2048;           // barriers + partial sums [stages][kStreamConsumers]
constexpr int kStreamDefaultKiB = 96;              // bytes a block keeps requested (lab.gemv.stream)

// What the host decided and the kernel reads: T rows of a tile (with Swiglu T / 2 gate rows then
// their T / 2 up rows), S segments of a row, the ring's stages and their bytes.
struct StreamLayout {
  int rows, segments, stages, tiles;
  int stage_stride;   // bytes between stages (128-aligned)
  int scale_offset;   // bytes from a stage's start to its scales [rows][k / 32]
  int x_offset;       // bytes from shared memory's start to x
  int stage_offset;   // bytes from shared memory's start to stage 0
};

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
__device__ __forceinline__ uint32_t SharedAddress(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void BarrierInit(uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}

__device__ __forceinline__ void BarrierExpectBytes(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}

__device__ __forceinline__ void BarrierArrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}

// Returns once the barrier's phase of this parity has completed (acquire: what the arrivals
// released, and the bulk copies' bytes, are visible).
__device__ __forceinline__ void BarrierWait(uint32_t bar, uint32_t parity) {
  uint32_t done = 0;
  while (!done) {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  }
}

// `bytes` (a multiple of 16, both addresses 16-byte aligned) from global to shared memory,
// counted on `bar` when they have landed.
__device__ __forceinline__ void BulkCopy(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(dst),
               "l"(src), "r"(bytes), "r"(bar)
               : "memory");
}
#endif

// n: rows of W (2I with Swiglu, whose output has I). Block: (T x S + 1) warps, the last the producer.
template <int Bits, bool Swiglu, typename OutT>
__global__ void __launch_bounds__((kStreamConsumers + 1) * 32, 1)
GemvStream(const __half* __restrict__ x, const uint32_t* __restrict__ w, const __half* __restrict__ scale,
           OutT* __restrict__ out, int n, int k, Fusion fusion, StreamLayout lay) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr int L = kLoadsPerGroup<Bits>;
  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t base = SharedAddress(smem);
  const int consumers = lay.rows * lay.segments;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int groups = k / 32;
  const int64_t row_bytes = int64_t(k) * Bits / 8, scale_row_bytes = k / 16;
  const auto full = [&](int s) { return base + 8u * s; };
  const auto empty = [&](int s) { return base + 8u * (kStreamMaxStages + s); };
  const uint32_t x_bar = base + 8u * (2 * kStreamMaxStages);
  float* partial = reinterpret_cast<float*>(smem + kStreamBarrierBytes);  // [stages][consumers]
  const int my_tiles = (lay.tiles - int(blockIdx.x) + int(gridDim.x) - 1) / int(gridDim.x);
  const int outputs = Swiglu ? n / 2 : n;
  const int half_rows = lay.rows / 2;  // Swiglu: gate rows of a tile

  lab::AllowNext();  // only a kernel launched early takes it up
  if (threadIdx.x == 0) {
    for (int s = 0; s < lay.stages; ++s) BarrierInit(full(s), 1), BarrierInit(empty(s), consumers);
    BarrierInit(x_bar, 1);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();

  if (warp == consumers) {  // the producer
    // tile i of this block (the block's i-th) into stage i % stages
    const auto issue = [&](int i) {
      const int s = i % lay.stages, tile = int(blockIdx.x) + i * int(gridDim.x);
      const uint32_t stage = base + lay.stage_offset + uint32_t(s) * lay.stage_stride;
      const auto* wb = reinterpret_cast<const unsigned char*>(w);
      const auto* sb = reinterpret_cast<const unsigned char*>(scale);
      if constexpr (!Swiglu) {
        const int r0 = tile * lay.rows, count = min(lay.rows, n - r0);
        const uint32_t wbytes = uint32_t(count * row_bytes), sbytes = uint32_t(count * scale_row_bytes);
        BarrierExpectBytes(full(s), wbytes + sbytes);
        BulkCopy(stage, wb + r0 * row_bytes, wbytes, full(s));
        BulkCopy(stage + lay.scale_offset, sb + r0 * scale_row_bytes, sbytes, full(s));
      } else {
        const int o0 = tile * half_rows, count = min(half_rows, outputs - o0);
        const uint32_t wbytes = uint32_t(count * row_bytes), sbytes = uint32_t(count * scale_row_bytes);
        BarrierExpectBytes(full(s), 2 * (wbytes + sbytes));
        for (int part = 0; part < 2; ++part) {  // gate rows o0.., up rows I + o0..
          const int64_t r0 = o0 + int64_t(part) * outputs;
          BulkCopy(stage + part * half_rows * row_bytes, wb + r0 * row_bytes, wbytes, full(s));
          BulkCopy(stage + lay.scale_offset + part * half_rows * scale_row_bytes, sb + r0 * scale_row_bytes, sbytes,
                   full(s));
        }
      }
    };
    // tile i's outputs, from its stage's partial sums (the consumers have released the stage)
    const float unscale = Bits == 4 ? 1.f / kXScale : 1.f;
    const auto finish = [&](int i) {
      const int s = i % lay.stages, tile = int(blockIdx.x) + i * int(gridDim.x);
      const float* sums = partial + s * kStreamConsumers;
      const auto row_sum = [&](int t) {
        float v = 0.f;
        for (int seg = 0; seg < lay.segments; ++seg) v += sums[t * lay.segments + seg];
        return v * unscale;
      };
      if constexpr (!Swiglu) {
        const int row = tile * lay.rows + lane;
        if (lane < lay.rows && row < n) {
          float v = row_sum(lane);
          if (fusion.residual != nullptr) v += __half2float(fusion.residual[row]);
          out[row] = OutT(v);
        }
      } else {
        const int o = tile * half_rows + lane;
        if (lane < half_rows && o < outputs) {
          float v = SiluTimes(row_sum(lane), row_sum(half_rows + lane));
          if (fusion.residual != nullptr) v += __half2float(fusion.residual[o]);
          out[o] = OutT(v);
        }
      }
    };
    const int ahead = min(lay.stages, my_tiles);
    if (fusion.early) {
      if (lane == 0)
        for (int i = 0; i < ahead; ++i) issue(i);  // constants: before the kernel ahead has finished
      lab::WaitForPrevious();
      if (lane == 0) BarrierExpectBytes(x_bar, uint32_t(k) * 2), BulkCopy(base + lay.x_offset, x, uint32_t(k) * 2, x_bar);
    } else if (lane == 0) {
      BarrierExpectBytes(x_bar, uint32_t(k) * 2);
      BulkCopy(base + lay.x_offset, x, uint32_t(k) * 2, x_bar);
      for (int i = 0; i < ahead; ++i) issue(i);
    }
    for (int i = ahead; i < my_tiles; ++i) {
      const int s = i % lay.stages;
      BarrierWait(empty(s), uint32_t((i / lay.stages) - 1) & 1u);
      finish(i - lay.stages);
      __syncwarp();
      if (lane == 0) issue(i);
    }
    for (int i = max(0, my_tiles - lay.stages); i < my_tiles; ++i) {
      BarrierWait(empty(i % lay.stages), uint32_t(i / lay.stages) & 1u);
      finish(i);
    }
    return;
  }

  // a consumer: row t of each tile, segment seg of its groups; this lane's groups g0 + 32 p
  const int t = warp / lay.segments, seg = warp % lay.segments;
  const int seg_groups = (groups + lay.segments - 1) / lay.segments;
  const int g_begin = seg * seg_groups, g_end = min(groups, g_begin + seg_groups);
  const int g0 = g_begin + lane;
  BarrierWait(x_bar, 0);
  uint4 xr[kStreamGroups][4];  // q4: paired chunks (PairedChunk); q8: x's values as they are
  const uint4* xs = reinterpret_cast<const uint4*>(smem + lay.x_offset);
#pragma unroll
  for (int p = 0; p < kStreamGroups; ++p) {
    const int g = g0 + 32 * p;
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      uint4 v = g < g_end ? xs[4 * g + c] : make_uint4(0, 0, 0, 0);
      if constexpr (Bits == 4) v = PairedChunk(v);
      xr[p][c] = v;
    }
  }
  const int tile_rows_valid_base = Swiglu ? outputs : n;
  for (int i = 0; i < my_tiles; ++i) {
    const int s = i % lay.stages, tile = int(blockIdx.x) + i * int(gridDim.x);
    BarrierWait(full(s), uint32_t(i / lay.stages) & 1u);
    const int first = tile * (Swiglu ? half_rows : lay.rows) + (Swiglu ? t % half_rows : t);
    if (first < tile_rows_valid_base) {
      const unsigned char* stage = smem + lay.stage_offset + s * lay.stage_stride;
      const uint4* wrow = reinterpret_cast<const uint4*>(stage + t * row_bytes);
      const __half* srow = reinterpret_cast<const __half*>(stage + lay.scale_offset + t * scale_row_bytes);
      float acc = 0.f;
#pragma unroll
      for (int p = 0; p < kStreamGroups; ++p) {
        const int g = g0 + 32 * p;
        if (g >= g_end) break;
        uint4 words[L];
#pragma unroll
        for (int l = 0; l < L; ++l) words[l] = wrow[g * L + l];
        const float sc = __half2float(srow[g]);
        if constexpr (Bits == 4) {
          acc += sc * GroupQ4(words[0], reinterpret_cast<const __half2*>(xr[p]));
        } else {
          float xf[32];
          const __half2* xh = reinterpret_cast<const __half2*>(xr[p]);
#pragma unroll
          for (int j = 0; j < 16; ++j) {
            const float2 f = __half22float2(xh[j]);
            xf[2 * j] = f.x, xf[2 * j + 1] = f.y;
          }
          acc += sc * GroupQ8(words, xf);
        }
      }
#pragma unroll
      for (int offset = 16; offset > 0; offset /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, offset);
      if (lane == 0) partial[s * kStreamConsumers + warp] = acc;
    }
    __syncwarp();
    if (lane == 0) BarrierArrive(empty(s));
  }
#endif
}

// The streaming kernel's shape for an n x k weight, or rows == 0 where it does not apply (k not a
// multiple of 256: a row's scales are not whole 16-byte runs; a lane would hold more than
// kStreamGroups groups of x with every consumer on one row; Swiglu with one row per tile).
// kib: bytes a block keeps requested, in KiB (stages = kib / stage bytes, 2..kStreamMaxStages).
inline StreamLayout PlanStream(int bits, bool swiglu, int64_t n, int64_t k, int max_shared, int kib) {
  StreamLayout lay{};
  const int64_t groups = k / 32;
  if (k % 256 != 0 || n < 1) return lay;
  const int segments = int((groups + 32 * kStreamGroups - 1) / (32 * kStreamGroups));
  if (segments > kStreamConsumers) return lay;
  int rows = kStreamConsumers / segments;
  if (swiglu) rows -= rows % 2;
  if (rows < (swiglu ? 2 : 1)) return lay;
  const int64_t row_bytes = k * bits / 8, scale_row_bytes = k / 16;
  const auto align = [](int64_t v) { return (v + 127) / 128 * 128; };
  const int64_t stage = align(rows * (row_bytes + scale_row_bytes));
  const int64_t x_offset = kStreamHeaderBytes, stage_offset = align(x_offset + 2 * k);
  int stages = int(std::clamp<int64_t>(int64_t(kib) * 1024 / stage, 2, kStreamMaxStages));
  while (stages >= 2 && stage_offset + stages * stage > max_shared) --stages;
  if (stages < 2) return lay;
  const int64_t outputs = swiglu ? n / 2 : n, per_tile = swiglu ? rows / 2 : rows;
  lay.rows = rows;
  lay.segments = segments;
  lay.stages = stages;
  lay.tiles = int((outputs + per_tile - 1) / per_tile);
  lay.stage_stride = int(stage);
  lay.scale_offset = int(rows * row_bytes);
  lay.x_offset = int(x_offset);
  lay.stage_offset = int(stage_offset);
  return lay;
}

inline int StreamSharedBytes(const StreamLayout& lay) { return lay.stage_offset + lay.stages * lay.stage_stride; }

}  // namespace lab::gemv
