// The prefill's quantized linears (engine/model/kernels.py `_library_gemm`):
//
// lab.gemm.q4 / lab.gemm.q8 (x, q_weight, q_scale, out, workspace): out [.., N] = x [.., K] W^T for
// a q4f16_1 / q8f16_1 weight W, by one of two paths:
// - "fused" (a prompt of up to kFusedUpTo rows, kWgFusedUpTo on sm_90): one tensor-core kernel that
//   reads the packed weight and dequantizes it into the mma's operand registers: the float16
//   weight is never written to memory. GemmQuant (mma.sync) up to 64 rows and on GPUs other than
//   sm_90; GemmQuantWg (Hopper's warpgroup MMA, the weight as its A operand) from 65 rows on sm_90.
// - "dequant" (longer prompts, and shapes the fused kernel does not take): the whole weight
//   dequantized into `workspace` [N, K] float16 (Dequantize), then cuBLAS (lab::CublasGemmNT).
//   Where the GEMM's arithmetic is much larger than the weight, cuBLAS's kernels outrun ours by
//   more than the dequantize pass costs.
// Both compute with the same float16 weights, (q - m) * scale rounded once (m = 7 or 127), and
// float32 sums. The workspace is an output of the call in the compiled graph (allocated by TVM's
// memory plan, as the dequantized weight always was); the fused path keeps its split-K partial
// sums there.
//
// lab.gemm.quant_path(name) -> previous: "auto" (the default: by the row count), "fused" or
// "dequant" for this process (the benchmarks time both in one process).
// lab.gemm.quant_plan(m, n, k, bits) -> text: what a call of those sizes runs here, in words.
//
// lab.dequant.q4 / lab.dequant.q8 (q_weight, q_scale, out [N, K] float16): the dequantize pass
// alone (bench.gemv times it).
//
// q_weight [N, K * bits / 32] uint32 holds 32 / bits values per word, lowest bits first; q_scale
// [N, K/32] float16 (MLC's layouts, engine/quantize.py).
#include <cuda_fp16.h>
#include <cuda_pipeline.h>
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
#include <string>
#include <type_traits>

#include "cublas_gemm.h"
#include "cuda_common.h"
#include "half_bits.h"
#include "mma_fragments.h"
#include "wgmma.h"

namespace {

using lab::AsBits;
using lab::AsHalf2;
using lab::Data;
using lab::MaskOr;
using lab::Rows;
using lab::mma::LoadMatrices;
using lab::mma::Mma;

// ------------------------------------------------------------------------------------------------
// The dequantize pass

// One thread per 8 consecutive weights: its word (q4) or two (q8), their group's scale, one
// 16-byte store; a warp reads 128 or 256 contiguous bytes and writes 512 (the first version, a
// thread per group of 32 with four 16-byte stores 64 bytes apart, ran at 45-56% of the copy
// bandwidth). Exact: (q - m) * scale rounded once to float16.
template <int Bits>
__global__ void Dequantize(const uint32_t* __restrict__ w, const __half* __restrict__ scale,
                           __half* __restrict__ out, int64_t chunks) {
  constexpr int words = Bits / 4, per_word = 32 / Bits;  // words per 8 weights
  constexpr uint32_t mask = (1u << Bits) - 1;
  constexpr float offset = float((1 << (Bits - 1)) - 1);
  for (int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; c < chunks; c += int64_t(gridDim.x) * blockDim.x) {
    uint32_t word[words];
    if constexpr (words == 1) {
      word[0] = __ldg(w + c);
    } else {
      const uint2 pair = __ldg(reinterpret_cast<const uint2*>(w) + c);
      word[0] = pair.x, word[1] = pair.y;
    }
    const float s = __half2float(scale[c / 4]);  // 4 chunks of 8 per group of 32
    __align__(16) __half values[8];
#pragma unroll
    for (int i = 0; i < 8; ++i)
      values[i] = __float2half((float((word[i / per_word] >> (Bits * (i % per_word))) & mask) - offset) * s);
    reinterpret_cast<uint4*>(out)[c] = *reinterpret_cast<const uint4*>(values);
  }
}

template <int Bits>
void LaunchDequantize(const uint32_t* w, const __half* scale, __half* out, int64_t n, int64_t k, int device,
                      cudaStream_t stream) {
  const int64_t chunks = n * (k / 8);
  if (chunks == 0) return;
  constexpr int threads = 256;
  const int64_t blocks = std::min<int64_t>((chunks + threads - 1) / threads, int64_t(lab::Facts(device).sms) * 16);
  Dequantize<Bits><<<unsigned(blocks), threads, 0, stream>>>(w, scale, out, chunks);
}

// ------------------------------------------------------------------------------------------------
// The fused kernel
//
// A block computes a tile of 16 MT rows x kBN = 128 outputs, a warp all its rows (mma.sync
// m16n8k16: float16 operands, float32 accumulators; MT = 1, 2, 4 or 8 m16 tiles, chosen by the
// row count): 4 warps of 32 outputs, or 8 warps of 16 at MT = 8. K is walked in tiles of kBK = 64
// values (two quantization groups) through a ring of kStages shared-memory stages, each filled by
// cp.async: x's tile, the weight's [128, 64] tile as packed words, and its scales; the copies run
// kStages - 1 tiles ahead.
//
// The weight is dequantized straight into the mma's B operand registers: lane l's B fragment of a
// k16 slice is the weight of output row l / 4 at k = 2 (l % 4) + {0, 1} and + 8: one byte of each
// of two q4 words (two q8 half-words), so a lane reads 2 words of the packed tile and makes each
// into two float16 values in 4 instructions (q8: 3). Each weight is dequantized once per block, by
// the warp that multiplies it; nothing float16 of the weight is stored. (The first two versions wrote
// the dequantized tile to shared memory for ldmatrix: 8 warps of 32 x 32 loading the packed words
// into registers one tile ahead ran at 20% of the tensor cores, waiting a memory latency every
// tile; 4 warps of 64 x 32 with this ring ran at 13%: 567 instructions a warp a tile, 2 warps a
// scheduler for want of shared memory, each instruction 5.4 cycles apart; ncu, 2026-11-30.)
//
// Exact, as the dequantize pass: a nibble (or byte) q placed in the low bits of float16 0x6400 is
// 1024 + q; one half2 subtraction of 1024 + m leaves q - m exactly, one half2 multiply by the scale
// rounds (q - m) * scale once.
//
// Shared memory: x's rows of 64 values have their 16-byte chunks permuted (chunk XOR row % 8),
// so the 8 rows an ldmatrix reads fall in different banks; a packed row's 16-byte chunks are
// permuted too (q4: chunk XOR bit 2 of the row, q8: chunk XOR bits 1-2), so the 8 rows a warp's
// B loads read at once fall in different banks.
//
// The last wave's tiles run with K split (Schedule, below) into float32 partial sums in the
// workspace, which a second kernel adds and rounds once (GemmQuantReduce).
//
// A block's output tile: row tiles run fastest, so the blocks that read the same weight tile run
// side by side and share it through L2.

constexpr int kBN = 128, kBK = 64;
constexpr int kStages = 4;
constexpr int kChunks = kBK / 8;  // 16-byte chunks of a shared x row
// Where the fused path applies (up to this many rows; above, dequant + cuBLAS): the mma.sync kernel
// up to 128 rows, the warpgroup one (GemmQuantWg, on sm_90) up to 256. Set from bench.prefill_gemm
// on an H200 (docs/BENCHMARKS.md: at 256 rows the warpgroup kernel took 289 us a Llama-3-8B layer
// against 362 for dequant + cuBLAS; at 512, 558 against 484).
constexpr int64_t kFusedUpTo = 128;
constexpr int64_t kWgFusedUpTo = 256;
constexpr int kMaxSplits = 16;
constexpr int kMinTilesPerSplit = 8;

// The bytes of one pipeline stage (x's tile of 16 MT rows, the packed weight tile, its scales).
template <int Bits, int MT>
struct Layout {
  static constexpr int kX = 16 * MT * kBK * 2;
  static constexpr int kRowChunks = kBK * Bits / 8 / 16;  // 16-byte chunks of a packed tile row: 2 (q4), 4 (q8)
  static constexpr int kPacked = kBN * kRowChunks * 16;
  static constexpr int kScales = kBN * 2 * 2;             // two groups' scales per output row
  static constexpr int kStage = kX + kPacked + kScales;
  static constexpr int kTotal = kStages * kStage;
};

__device__ __forceinline__ int Offset(int row, int chunk) { return row * kBK + ((chunk ^ (row & 7)) * 8); }

// Where chunk `chunk` of packed row `row` lies (in 16-byte chunks from the tile's start).
template <int Bits>
__device__ __forceinline__ int PackedChunk(int row, int chunk) {
  if constexpr (Bits == 4) {
    return row * 2 + (chunk ^ ((row >> 2) & 1));
  } else {
    return row * 4 + (chunk ^ ((row >> 1) & 3));
  }
}

// Two weights (q - m) * scale as a half2 operand register, from `word`: q4: the two nibbles of the
// byte `sel` (= t | t << 8) copies into bytes 0 and 2: the low nibble under float16 0x6400 (1024,
// whose last mantissa bit is 1) is 1024 + q, the high nibble under 0x5400 (64, whose last bit is
// 1/16) is 64 + q; q8: the two bytes `sel` picks beside 0x64 (1024 + q each).
template <int Bits>
__device__ __forceinline__ uint32_t Operand(uint32_t word, uint32_t sel, __half2 scale) {
  if constexpr (Bits == 4) {
    const uint32_t q = MaskOr(__byte_perm(word, 0u, sel), 0x00F0000Fu, 0x54006400u);
    return AsBits(__hmul2(__hsub2(AsHalf2(q), __halves2half2(__float2half(1024.f + 7.f), __float2half(64.f + 7.f))),
                          scale));
  } else {
    return AsBits(__hmul2(__hsub2(AsHalf2(__byte_perm(word, 0x64u, sel)), __float2half2_rn(1024.f + 127.f)), scale));
  }
}

template <typename OutT>
__device__ __forceinline__ void StorePair(OutT* p, float a, float b);
template <>
__device__ __forceinline__ void StorePair<__half>(__half* p, float a, float b) {
  *reinterpret_cast<__half2*>(p) = __floats2half2_rn(a, b);
}
template <>
__device__ __forceinline__ void StorePair<float>(float* p, float a, float b) {
  *reinterpret_cast<float2*>(p) = make_float2(a, b);
}

// A block's copies of its K tiles into the pipeline's stages (cp.async, every thread), shared by
// both fused kernels: x's tile of kBM rows (rows past m zero-filled) at Offset's places, the packed
// weight tile of kBN rows (rows past n repeat the last; their products are not stored) at
// PackedChunk's, and the tile's two groups' scales of each row. A thread's copies keep their places
// from tile to tile: x's rows tid / 8 + R i at chunk tid % 8 (R = threads / 8, a multiple of 8: the
// chunk permutation repeats), the packed rows (tid + threads i) / kRowChunks, row tid's scales; the
// sources advance a tile a call.
template <int Bits, int kThreads, int kBM>
struct TileCopies {
  static constexpr int kRowChunks = kBK * Bits / 8 / 16;  // 16-byte chunks of a packed tile row: 2 (q4), 4 (q8)
  static constexpr int kXCopies = (kBM * kChunks + kThreads - 1) / kThreads;
  static constexpr int kXRowsPerCopy = kThreads / kChunks;
  static constexpr int kPackedCopies = kBN * kRowChunks / kThreads;
  static_assert(kThreads >= kBN, "a thread copies one output row's scales");
  static_assert(kXRowsPerCopy % 8 == 0, "x's copies keep their chunk permutation");

  const __half* x_src;
  int x_dst, x_rows_left;  // copy i is inside where R i < x_rows_left
  int k;
  const uint4* w_src[kPackedCopies];
  int w_dst[kPackedCopies];
  const __half* s_src;

  // Tiles tile0.. of the block's output rows m0.. (of m) and outputs n0.. (of n).
  __device__ TileCopies(const __half* x, const uint32_t* w, const __half* scale, int m, int n, int k_, int m0, int n0,
                        int tile0)
      : k(k_) {
    const int x_row = threadIdx.x / kChunks, x_chunk = threadIdx.x % kChunks;
    x_rows_left = m - m0 - x_row;
    x_src = x + int64_t(m0 + (x_rows_left > 0 ? x_row : 0)) * k + int64_t(tile0) * kBK + x_chunk * 8;
    x_dst = Offset(x_row, x_chunk);
    const int64_t row_words = int64_t(k) * Bits / 32;
#pragma unroll
    for (int i = 0; i < kPackedCopies; ++i) {
      const int c = threadIdx.x + i * kThreads, r = c / kRowChunks, chunk = c % kRowChunks;
      w_src[i] = reinterpret_cast<const uint4*>(w + int64_t(min(n0 + r, n - 1)) * row_words) + int64_t(tile0) * kRowChunks +
                 chunk;
      w_dst[i] = PackedChunk<Bits>(r, chunk);
    }
    s_src = scale + int64_t(min(n0 + int(threadIdx.x) % kBN, n - 1)) * (k / 32) + 2 * tile0;
  }

  // The next tile into a stage's parts: x's tile, the packed weight tile, the scales [kBN][2]
  // (committed by the caller).
  __device__ __forceinline__ void Issue(__half* xs, uint4* ps, __half* ss) {
#pragma unroll
    for (int i = 0; i < kXCopies; ++i) {
      if (kXCopies * kThreads == kBM * kChunks || threadIdx.x + i * kThreads < kBM * kChunks) {
        const bool inside = kXRowsPerCopy * i < x_rows_left;
        __pipeline_memcpy_async(xs + x_dst + i * kXRowsPerCopy * kBK,
                                x_src + (inside ? int64_t(kXRowsPerCopy * i) * k : 0), 16, inside ? 0 : 16);
      }
    }
#pragma unroll
    for (int i = 0; i < kPackedCopies; ++i) {
      __pipeline_memcpy_async(ps + w_dst[i], w_src[i], 16);
      w_src[i] += kRowChunks;
    }
    if (kThreads == kBN || threadIdx.x < kBN) __pipeline_memcpy_async(ss + 2 * threadIdx.x, s_src, 4);
    x_src += kBK;
    s_src += 2;
  }
};

// A block's K tiles, those of its split (blockIdx.z of gridDim.z: the split launch of Schedule,
// below), and the ring of kStages pipeline stages they go through, each laid out as L (L::kX bytes
// of x's tile, then L::kPacked of the packed tile, then the scales) from `smem` on.
template <int Bits, int kThreads, int kBM, typename L, int kStages>
struct TileRing {
  unsigned char* smem;
  int tiles;  // of this split
  TileCopies<Bits, kThreads, kBM> copies;

  // The tiles of the block's output rows m0.. (of m) and outputs n0.. (of n).
  __device__ TileRing(unsigned char* smem_, const __half* x, const uint32_t* w, const __half* scale, int m, int n, int k,
                      int m0, int n0)
      : smem(smem_), tiles(SplitStart(k, blockIdx.z + 1) - SplitStart(k, blockIdx.z)),
        copies(x, w, scale, m, n, k, m0, n0, SplitStart(k, blockIdx.z)) {}

  // The first tile of split z (of gridDim.z; z = gridDim.z: the end).
  static __device__ __forceinline__ int SplitStart(int k, unsigned z) {
    return int(int64_t(k / kBK) * z / gridDim.z);
  }

  // Stage s's parts: x's tile, the packed weight tile, its scales.
  __device__ __forceinline__ __half* X(int s) const { return reinterpret_cast<__half*>(smem + s * L::kStage); }
  __device__ __forceinline__ uint4* Packed(int s) const { return reinterpret_cast<uint4*>(smem + s * L::kStage + L::kX); }
  __device__ __forceinline__ __half* Scales(int s) const {
    return reinterpret_cast<__half*>(smem + s * L::kStage + L::kX + L::kPacked);
  }

  // Tile t (of this split) into stage t % kStages; every call commits a group (maybe empty).
  __device__ __forceinline__ void Issue(int t) {
    if (t < tiles) {
      const int s = t % kStages;
      copies.Issue(X(s), Packed(s), Scales(s));
    }
    __pipeline_commit();
  }
};

// A block's shape by its m16 tiles of rows (MT): up to 4, 4 warps of 32 outputs each; at 8 (65-128
// rows), 8 warps of 16 outputs, each weight dequantized once for all 128 rows with 64 accumulators a
// lane. (Measured the same as two blocks of 64 rows, which dequantize every weight twice: 245 us a
// Llama-3-8B layer at 128 rows either way, bench.prefill_gemm. The dequantization is not what
// bounds it; the A operands' shared-memory traffic and the latency between a warp's instructions
// are, docs/ARCHITECTURE.md.)
template <int MT>
constexpr int kNJ = MT == 8 ? 2 : 4;  // n8 tiles of outputs per warp
template <int MT>
constexpr int kThreadsOf = 32 * kBN / (8 * kNJ<MT>);
// Resident blocks an SM: 4 (16 warps); 3 at four m16 tiles (64 accumulators a lane need more than
// 128 registers: at 128 they spilled); 2 blocks of 8 warps at eight (128 registers, a few bytes
// spilled; one block of 165 registers measured the same).
template <int MT>
constexpr int kMinBlocks = MT == 8 ? 2 : MT == 4 ? 3 : 4;

// Output tiles tile_base + blockIdx.x (row tile q % row_tiles, column tile q / row_tiles) into
// out [m, n] (OutT); or, with gridDim.z > 1, split z's float32 partial sums of the block's tile at
// partial + (z gridDim.x + blockIdx.x) kBM kBN, [kBM][kBN] (GemmQuantReduce adds them).
template <int Bits, int MT, typename OutT>
__global__ void __launch_bounds__(kThreadsOf<MT>, kMinBlocks<MT>)
GemmQuant(const __half* __restrict__ x, const uint32_t* __restrict__ w, const __half* __restrict__ scale,
          OutT* __restrict__ out, float* __restrict__ partial, int m, int n, int k, int tile_base, int row_tiles) {
  using L = Layout<Bits, MT>;
  constexpr int kThreads = kThreadsOf<MT>, NJ = kNJ<MT>, kWarpCols = 8 * NJ;
  constexpr int kBM = 16 * MT;
  extern __shared__ __align__(16) unsigned char smem[];
  const int q = tile_base + int(blockIdx.x);
  const int m0 = (q % row_tiles) * kBM, n0 = (q / row_tiles) * kBN;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  TileRing<Bits, kThreads, kBM, L, kStages> ring(smem, x, w, scale, m, n, k, m0, n0);

  // This lane's B operands: output rows warp * 8 NJ + j * 8 + lane / 4 (j < NJ), k = 2 t + {0, 1}
  // and + 8 of each slice (t = lane % 4).
  const int t4 = lane % 4;
  const uint32_t sel = Bits == 4 ? uint32_t(t4 | (t4 << 8)) : (t4 % 2 == 0 ? 0x4140u : 0x4342u);

  float acc[MT][NJ][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NJ; ++j) acc[i][j][0] = acc[i][j][1] = acc[i][j][2] = acc[i][j][3] = 0.f;

  // Tile t lives in group t of the committed cp.async groups.
#pragma unroll
  for (int t = 0; t < kStages - 1; ++t) ring.Issue(t);

  for (int t = 0; t < ring.tiles; ++t) {
    __pipeline_wait_prior(kStages - 2);  // tile t
    __syncthreads();  // every copy of tile t landed; tile t - 1's stage is free
    ring.Issue(t + kStages - 1);  // into the stage tile t - 1 left
    const int s = t % kStages;
    const __half* xs = ring.X(s);
    const uint32_t* ps = reinterpret_cast<const uint32_t*>(ring.Packed(s));
    const __half* ss = ring.Scales(s);
    // The tile's B operands first (4 slices x NJ n8 tiles x 2 registers), then its products: the
    // loads and conversions of the whole tile are independent of each other and of the mma chain.
    uint32_t b[kBK / 16][NJ][2];
    __half2 row_scales[NJ];  // the two groups' scales of each of the lane's rows
#pragma unroll
    for (int j = 0; j < NJ; ++j) row_scales[j] = reinterpret_cast<const __half2*>(ss)[warp * kWarpCols + j * 8 + lane / 4];
#pragma unroll
    for (int group = 0; group < 2; ++group) {
#pragma unroll
      for (int j = 0; j < NJ; ++j) {
        const int r = warp * kWarpCols + j * 8 + lane / 4;
        const __half2 scale2 = group == 0 ? __low2half2(row_scales[j]) : __high2half2(row_scales[j]);
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int slice = 2 * group + half;
          if constexpr (Bits == 4) {
            // words 2 slice and 2 slice + 1 of the row: chunk slice / 2, words (slice % 2) * 2 + {0, 1}
            const uint2 words = reinterpret_cast<const uint2*>(ps + 4 * PackedChunk<4>(r, slice / 2))[slice % 2];
            b[slice][j][0] = Operand<4>(words.x, sel, scale2);
            b[slice][j][1] = Operand<4>(words.y, sel, scale2);
          } else {
            // words 4 slice + t / 2 and 4 slice + 2 + t / 2: chunk `slice`
            const uint32_t* chunk = ps + 4 * PackedChunk<8>(r, slice);
            b[slice][j][0] = Operand<8>(chunk[t4 / 2], sel, scale2);
            b[slice][j][1] = Operand<8>(chunk[2 + t4 / 2], sel, scale2);
          }
        }
      }
    }
#pragma unroll
    for (int slice = 0; slice < kBK / 16; ++slice) {
#pragma unroll
      for (int i = 0; i < MT; ++i) {
        uint32_t a[4];
        LoadMatrices(a, xs + Offset(i * 16 + lane % 16, 2 * slice + lane / 16));
#pragma unroll
        for (int j = 0; j < NJ; ++j) Mma(acc[i][j], a, b[slice][j][0], b[slice][j][1]);
      }
    }
  }

  // Lane l holds rows l / 4 and l / 4 + 8 of each 16 x 8 accumulator, columns 2 (l % 4) and + 1.
  float* part = gridDim.z > 1 ? partial + (int64_t(blockIdx.z) * gridDim.x + blockIdx.x) * kBM * kBN : nullptr;
#pragma unroll
  for (int i = 0; i < MT; ++i) {
#pragma unroll
    for (int j = 0; j < NJ; ++j) {
      const int col = warp * kWarpCols + j * 8 + 2 * t4;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = i * 16 + lane / 4 + 8 * h;
        if (part != nullptr) {
          StorePair(part + row * kBN + col, acc[i][j][2 * h], acc[i][j][2 * h + 1]);
        } else if (m0 + row < m && n0 + col < n) {
          StorePair(out + int64_t(m0 + row) * n + n0 + col, acc[i][j][2 * h], acc[i][j][2 * h + 1]);
        }
      }
    }
  }
}

// The split launch's tiles: out's elements of tile tile_base + blockIdx.x (of `rows` = kBM rows)
// are the sums of the splits' partial tiles, rounded once; 4 elements a thread.
template <typename OutT>
__global__ void GemmQuantReduce(const float* __restrict__ partial, OutT* __restrict__ out, int m, int n, int rows,
                            int tile_base, int row_tiles, int splits) {
  const int e = (blockIdx.y * blockDim.x + threadIdx.x) * 4;  // within the tile, [rows][kBN]
  if (e >= rows * kBN) return;
  const int q = tile_base + int(blockIdx.x);
  const int row = (q % row_tiles) * rows + e / kBN, col = (q / row_tiles) * kBN + e % kBN;
  if (row >= m || col >= n) return;
  const int64_t stride = int64_t(gridDim.x) * rows * kBN;
  const float* p = partial + int64_t(blockIdx.x) * rows * kBN + e;
  float4 sum = *reinterpret_cast<const float4*>(p);
  for (int z = 1; z < splits; ++z) {
    const float4 v = *reinterpret_cast<const float4*>(p + z * stride);
    sum.x += v.x, sum.y += v.y, sum.z += v.z, sum.w += v.w;
  }
  StorePair(out + int64_t(row) * n + col, sum.x, sum.y);
  StorePair(out + int64_t(row) * n + col + 2, sum.z, sum.w);
}

// ------------------------------------------------------------------------------------------------
// The fused kernel on Hopper's warpgroup MMA (sm_90a), from 65 rows
//
// GemmQuant's mma.sync kernel at 128 rows ran at ~230 TFLOP/s (Llama-3-8B's four q4 linears 243 us
// a layer against cuBLAS's 140 on float16 weights): every warp loads all 128 rows of x from shared
// memory for its 16 outputs (ldmatrix: 128 KB a block a K tile), and the tensor pipe stays ~32%
// busy. Here the roles are swapped: out^T [n, m] = W [n, k] x^T, so the weight is wgmma's A,
// dequantized into registers (as GemmQuant's B operands: the same Operand), and x is B, read by the
// tensor cores straight from shared memory (the same 128-byte-swizzled rows GemmQuant's ldmatrix
// reads): no operand of x passes through registers. A block is two warpgroups of 64 outputs each
// (kBN = 128 outputs) over kWgBM = 128 rows; a warpgroup's 4 k16 slices a K tile are 4
// m64n128k16 wgmmas, 64 float32 accumulators a thread.
//
// The ring: kWgStages<Bits> stages, the copies (cp.async, every thread) kWgStages - 1 tiles ahead. A
// warpgroup makes a tile's A operands, issues its 4 wgmmas back to back and waits for them (Wait<0>)
// before the next tile; the SM's other warpgroups (4 resident) keep the tensor cores busy meanwhile.
// (Waiting only for the tile before, with two sets of A registers, made ptxas serialize every wgmma:
// it cannot tell the sets apart, ptxas C7513, and gave both the same registers.)
constexpr int kWgBM = 128;
constexpr int kWgThreads = 256;
template <int Bits>
constexpr int kWgStages = Bits == 4 ? 5 : 4;  // 2 blocks an SM either way (105 / 101 KB)

template <int Bits>
struct WgLayout {
  static constexpr int kX = kWgBM * kBK * 2;  // first in a stage: 1024-byte aligned (the swizzle's unit)
  static constexpr int kRowChunks = kBK * Bits / 8 / 16;
  static constexpr int kPacked = kBN * kRowChunks * 16;
  static constexpr int kScales = kBN * 2 * 2;
  static constexpr int kStage = (kX + kPacked + kScales + 1023) / 1024 * 1024;
  static constexpr int kTotal = kWgStages<Bits> * kStage + 1024;  // + aligning the first stage
};

template <typename OutT>
__device__ __forceinline__ OutT FromFloat(float v) {
  if constexpr (std::is_same_v<OutT, float>) {
    return v;
  } else {
    return __float2half_rn(v);
  }
}

// Output tiles tile_base + blockIdx.x (row tile q % row_tiles of kWgBM rows, column tile q / row_tiles
// of kBN outputs) as GemmQuant, split K's partial sums the same way ([kWgBM][kBN] a tile).
template <int Bits, typename OutT>
__global__ void __launch_bounds__(kWgThreads, 2)
GemmQuantWg(const __half* __restrict__ x, const uint32_t* __restrict__ w, const __half* __restrict__ scale,
            OutT* __restrict__ out, float* __restrict__ partial, int m, int n, int k, int tile_base, int row_tiles) {
#if LAB_WGMMA
  using L = WgLayout<Bits>;
  constexpr int kS = kWgStages<Bits>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const uint32_t raw_address = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw));
  const uint32_t pad = (1024u - raw_address % 1024u) % 1024u;
  unsigned char* smem = smem_raw + pad;
  const uint32_t smem_address = raw_address + pad;
  const int q = tile_base + int(blockIdx.x);
  const int m0 = (q % row_tiles) * kWgBM, n0 = (q / row_tiles) * kBN;
  TileRing<Bits, kWgThreads, kWgBM, L, kS> ring(smem, x, w, scale, m, n, k, m0, n0);

  // This thread's A operands: outputs r and r + 8 of the block's 128 (r below), k = 2 c + {0, 1} and
  // + 8 of each k16 slice.
  const int lane = threadIdx.x % 32, c4 = lane % 4;
  const int r = (threadIdx.x / 128) * 64 + (threadIdx.x / 32 % 4) * 16 + lane / 4;
  const uint32_t sel = Bits == 4 ? uint32_t(c4 | (c4 << 8)) : (c4 % 2 == 0 ? 0x4140u : 0x4342u);

  float acc[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) acc[i] = 0.f;

#pragma unroll
  for (int t = 0; t < kS - 1; ++t) ring.Issue(t);

  for (int t = 0; t < ring.tiles; ++t) {
    __pipeline_wait_prior(kS - 2);  // tile t
    lab::wgmma::FenceSharedWrites();
    __syncthreads();  // tile t landed for every thread; every warpgroup is done with tile t - 1
    ring.Issue(t + kS - 1);  // into tile t - 1's stage
    const int s = t % kS;
    uint32_t a[kBK / 16][4];  // 4 slices' A operands
    const uint4* ps = ring.Packed(s);
    const __half2* ss = reinterpret_cast<const __half2*>(ring.Scales(s));  // a row's two groups
#pragma unroll
    for (int h = 0; h < 2; ++h) {  // rows r (a0, a2) and r + 8 (a1, a3)
      const int row = r + 8 * h;
      const __half2 scales = ss[row];  // the tile's two groups
      const __half2 low = __low2half2(scales), high = __high2half2(scales);
      if constexpr (Bits == 4) {
        // chunk c holds words 4c..4c+3: slices 2c (words 4c, 4c + 1) and 2c + 1
        const uint4 c0 = ps[PackedChunk<4>(row, 0)], c1 = ps[PackedChunk<4>(row, 1)];
        a[0][h] = Operand<4>(c0.x, sel, low), a[0][2 + h] = Operand<4>(c0.y, sel, low);
        a[1][h] = Operand<4>(c0.z, sel, low), a[1][2 + h] = Operand<4>(c0.w, sel, low);
        a[2][h] = Operand<4>(c1.x, sel, high), a[2][2 + h] = Operand<4>(c1.y, sel, high);
        a[3][h] = Operand<4>(c1.z, sel, high), a[3][2 + h] = Operand<4>(c1.w, sel, high);
      } else {
#pragma unroll
        for (int slice = 0; slice < kBK / 16; ++slice) {
          // chunk `slice` holds the slice's 16 values in 4 words: words c / 2 and 2 + c / 2
          const uint32_t* chunk = reinterpret_cast<const uint32_t*>(ps + PackedChunk<8>(row, slice));
          const __half2 sc = slice < 2 ? low : high;
          a[slice][h] = Operand<8>(chunk[c4 / 2], sel, sc);
          a[slice][2 + h] = Operand<8>(chunk[2 + c4 / 2], sel, sc);
        }
      }
    }
    lab::wgmma::Fence();
    const uint32_t x_address = smem_address + uint32_t(s * L::kStage);
#pragma unroll
    for (int slice = 0; slice < kBK / 16; ++slice)
      lab::wgmma::MmaM64N128K16(acc, a[slice], lab::wgmma::SwizzledRowsDescriptor(x_address + 32u * slice));
    lab::wgmma::Commit();
    lab::wgmma::Wait<0>();  // the A registers and the stage are free again
  }

  // acc[4j + 2h + e] is out^T's (output r + 8h, row 8j + 2 c4 + e).
  float* part = gridDim.z > 1 ? partial + (int64_t(blockIdx.z) * gridDim.x + blockIdx.x) * kWgBM * kBN : nullptr;
#pragma unroll
  for (int j = 0; j < kWgBM / 8; ++j) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int row = 8 * j + 2 * c4 + e, col = r + 8 * h;
        const float v = acc[4 * j + 2 * h + e];
        if (part != nullptr) {
          part[row * kBN + col] = v;
        } else if (m0 + row < m && n0 + col < n) {
          out[int64_t(m0 + row) * n + n0 + col] = FromFloat<OutT>(v);
        }
      }
    }
  }
#else
  __trap();
#endif
}

// Where the fused kernel applies: whole tiles of K, outputs in fours (the split-K reduction's
// vectors), x on a 16-byte boundary.
bool FusedApplies(int64_t n, int64_t k, const void* x) {
  return k % kBK == 0 && n % 8 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0 && n < (int64_t(1) << 31) / kBN;
}

// m16 tiles of rows per block: as few as the rows need, up to 8.
int RowTiles(int64_t m) { return m <= 16 ? 1 : m <= 32 ? 2 : m <= 64 ? 4 : 8; }

// How a fused call's output tiles are scheduled. A grid of T tiles on S resident block slots runs
// floor(T / S) full waves and a last wave of r = T mod S tiles that leaves S - r slots idle (the
// 448 tiles of Llama-3-8B's gate_up at 128 rows on 396 slots: a second wave 13% full, ~45% of the
// kernel's time, ncu 2026-11-30). So the first T - r tiles run whole, and the last r with their K
// split s ~ S / r ways into float32 partial sums (within the workspace) that GemmQuantReduce adds:
// the last wave is full and s times shorter, and only those r tiles' sums go through memory.
struct Schedule {
  int64_t whole = 0, split = 0;  // output tiles run whole, and with K split
  int splits = 1;
};

// bm: rows of x a block takes.
Schedule ScheduleFor(int64_t m, int64_t n, int64_t k, int64_t slots, int64_t bm) {
  const int64_t tiles = ((m + bm - 1) / bm) * ((n + kBN - 1) / kBN);
  Schedule plan;
  const int64_t rest = tiles % slots;
  plan.whole = tiles - rest;
  if (rest == 0) return plan;
  const int64_t capacity = (n * k * 2) / (rest * bm * kBN * 4);  // splits whose sums fit the workspace
  const int64_t splits = std::min<int64_t>({slots / rest, (k / kBK) / kMinTilesPerSplit, capacity, kMaxSplits});
  if (splits <= 1) {
    plan.whole = tiles;
  } else {
    plan.split = rest;
    plan.splits = int(splits);
  }
  return plan;
}

// Resident blocks of a fused kernel on all SMs of `device` (lab::ResidentBlocks, which also allows
// the kernel its dynamic shared memory).
int64_t SlotsOf(const void* kernel, int threads, int smem, int device) {
  const int per_sm = lab::ResidentBlocks(kernel, threads, smem);
  if (per_sm == 0) TVM_FFI_THROW(RuntimeError) << "lab.gemm: the fused kernel does not fit an SM";
  return int64_t(per_sm) * lab::Facts(device).sms;
}

// The fused kernel a call of m rows runs: GemmQuantWg (warpgroup MMA) from kWgFrom rows on a GPU of
// compute capability 9.0 (whose code is built for sm_90a), else GemmQuant with as many m16 tiles of
// rows as m needs.
constexpr int64_t kWgFrom = 65;

bool HasWarpgroupKernel(int device) {
  const lab::DeviceFacts& facts = lab::Facts(device);
  return facts.major == 9 && facts.minor == 0;
}

bool UsesWarpgroups(int64_t m, int device) { return m >= kWgFrom && HasWarpgroupKernel(device); }

template <int Bits, typename OutT>
const void* WgKernel() {
  return reinterpret_cast<const void*>(GemmQuantWg<Bits, OutT>);
}

template <int Bits, int MT, typename OutT>
const void* MmaKernel() {
  return reinterpret_cast<const void*>(GemmQuant<Bits, MT, OutT>);
}

// f(std::integral_constant<int, MT>{}) for the m16 tiles of rows (MT) a block takes at m rows.
template <typename F>
auto WithRowTiles(int64_t m, F&& f) {
  switch (RowTiles(m)) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 4: return f(std::integral_constant<int, 4>{});
    default: return f(std::integral_constant<int, 8>{});
  }
}

template <int Bits, typename OutT>
Schedule ScheduleOn(int64_t m, int64_t n, int64_t k, int device) {
  if (UsesWarpgroups(m, device))
    return ScheduleFor(m, n, k, SlotsOf(WgKernel<Bits, OutT>(), kWgThreads, WgLayout<Bits>::kTotal, device), kWgBM);
  return WithRowTiles(m, [&](auto mt) {
    constexpr int MT = decltype(mt)::value;
    return ScheduleFor(m, n, k, SlotsOf(MmaKernel<Bits, MT, OutT>(), kThreadsOf<MT>, Layout<Bits, MT>::kTotal, device),
                       16 * MT);
  });
}

// The plan's launches: the whole tiles, the split ones and their reduction (rows: of a tile).
template <typename OutT, typename LaunchTiles>
void LaunchPlan(const Schedule& plan, float* partial, OutT* out, int64_t m, int64_t n, int rows, int row_tiles,
                cudaStream_t stream, LaunchTiles&& launch) {
  if (plan.whole > 0) launch(dim3(unsigned(plan.whole)), 0);
  if (plan.split > 0) {
    launch(dim3(unsigned(plan.split), 1, unsigned(plan.splits)), int(plan.whole));
    const int per_tile = rows * kBN / 4, threads = 256;
    GemmQuantReduce<OutT><<<dim3(unsigned(plan.split), unsigned((per_tile + threads - 1) / threads)), threads, 0, stream>>>(
        partial, out, int(m), int(n), rows, int(plan.whole), row_tiles, plan.splits);
  }
}

template <int Bits, typename OutT>
void LaunchFused(const __half* x, const uint32_t* w, const __half* s, OutT* out, float* partial, int64_t m, int64_t n,
                 int64_t k, int device, cudaStream_t stream) {
  const Schedule plan = ScheduleOn<Bits, OutT>(m, n, k, device);
  if (UsesWarpgroups(m, device)) {
    constexpr int smem = WgLayout<Bits>::kTotal;
    const int row_tiles = int((m + kWgBM - 1) / kWgBM);
    LaunchPlan(plan, partial, out, m, n, kWgBM, row_tiles, stream, [&](dim3 grid, int tile_base) {
      GemmQuantWg<Bits, OutT><<<grid, kWgThreads, smem, stream>>>(x, w, s, out, partial, int(m), int(n), int(k),
                                                                  tile_base, row_tiles);
    });
    return;
  }
  WithRowTiles(m, [&](auto mt) {
    constexpr int MT = decltype(mt)::value;
    constexpr int smem = Layout<Bits, MT>::kTotal;
    const int row_tiles = int((m + 16 * MT - 1) / (16 * MT));
    LaunchPlan(plan, partial, out, m, n, 16 * MT, row_tiles, stream, [&](dim3 grid, int tile_base) {
      GemmQuant<Bits, MT, OutT><<<grid, kThreadsOf<MT>, smem, stream>>>(x, w, s, out, partial, int(m), int(n), int(k),
                                                                       tile_base, row_tiles);
    });
  });
}

// ------------------------------------------------------------------------------------------------
// The calls

enum class Path : int { kAuto = 0, kFused = 1, kDequant = 2 };
const char* const kPathNames[] = {"auto", "fused", "dequant"};
std::atomic<int> g_path{int(Path::kAuto)};

// Whether a call of m rows of x (at address x) against an n x k weight runs fused on `device`.
bool RunsFused(int64_t m, int64_t n, int64_t k, const void* x, int device) {
  const Path path = Path(g_path.load());
  const int64_t up_to = HasWarpgroupKernel(device) ? kWgFusedUpTo : kFusedUpTo;
  return FusedApplies(n, k, x) && lab::Facts(device).major >= 8 &&
         (path == Path::kFused || (path == Path::kAuto && m <= up_to));
}

// lab.gemm.quant_plan(m, n, k, bits) -> "dequant" | "fused (K): T tiles" | "fused (K): T tiles whole, R
// with K split s ways" (K: wgmma or mma.sync, the kernel): what a call (float16 out) runs on the
// current device under the current path.
tvm::ffi::String DescribePlan(int64_t m, int64_t n, int64_t k, int64_t bits) {
  if (bits != 4 && bits != 8) TVM_FFI_THROW(ValueError) << "lab.gemm.quant_plan: bits must be 4 or 8";
  int device = 0;
  LAB_CHECK_CUDA(cudaGetDevice(&device));
  if (!RunsFused(m, n, k, nullptr, device)) return tvm::ffi::String("dequant");
  const Schedule plan = bits == 4 ? ScheduleOn<4, __half>(m, n, k, device) : ScheduleOn<8, __half>(m, n, k, device);
  std::string text = std::string(UsesWarpgroups(m, device) ? "fused (wgmma)" : "fused (mma.sync)") + ": " +
                     std::to_string(plan.whole) + " tiles";
  if (plan.split > 0)
    text += (plan.whole > 0 ? " whole, " : ", ") + std::to_string(plan.split) + " with K split " +
            std::to_string(plan.splits) + " ways";
  return tvm::ffi::String(text);
}

tvm::ffi::String SetPath(tvm::ffi::String name) {
  const std::string wanted(name);
  for (int i = 0; i < 3; ++i) {
    if (wanted == kPathNames[i]) return tvm::ffi::String(kPathNames[g_path.exchange(i)]);
  }
  TVM_FFI_THROW(ValueError) << "lab.gemm.quant_path: " << wanted << " is not one of auto, fused, dequant";
  return {};
}

template <int Bits>
void CheckPacked(const char* fn, const DLTensor* w, const DLTensor* scale, int64_t* n, int64_t* k) {
  constexpr int per_word = 32 / Bits;
  lab::CheckOnGpuCompact(fn, {w, scale});
  if (w->dtype.code != kDLUInt || w->dtype.bits != 32 || !lab::IsHalf(scale->dtype) || w->ndim != 2 || scale->ndim != 2)
    TVM_FFI_THROW(TypeError) << fn << ": expects q_weight uint32 [N, K/" << per_word << "], q_scale float16 [N, K/32]";
  *n = w->shape[0], *k = w->shape[1] * per_word;
  if (scale->shape[0] != *n || scale->shape[1] * 32 != *k)
    TVM_FFI_THROW(ValueError) << fn << ": shapes do not agree (q_weight [" << *n << ", " << w->shape[1]
                              << "], q_scale [" << scale->shape[0] << ", " << scale->shape[1] << "])";
}

template <int Bits>
void DequantizePacked(DLTensor* w, DLTensor* scale, DLTensor* out) {
  const char* fn = Bits == 4 ? "lab.dequant.q4" : "lab.dequant.q8";
  int64_t n = 0, k = 0;
  CheckPacked<Bits>(fn, w, scale, &n, &k);
  lab::CheckOnGpuCompact(fn, {out});
  if (!lab::IsHalf(out->dtype) || out->ndim != 2 || out->shape[0] != n || out->shape[1] != k)
    TVM_FFI_THROW(ValueError) << fn << ": out must be float16 [" << n << ", " << k << "]";
  const int device = w->device.device_id;
  auto stream = static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, device));
  LaunchDequantize<Bits>(Data<uint32_t>(w), Data<__half>(scale), Data<__half>(out), n, k, device, stream);
  lab::CheckLaunch(fn);
}

template <int Bits>
void GemmQuantized(DLTensor* x, DLTensor* w, DLTensor* scale, DLTensor* out, DLTensor* workspace) {
  const char* fn = Bits == 4 ? "lab.gemm.q4" : "lab.gemm.q8";
  int64_t n = 0, k = 0;
  CheckPacked<Bits>(fn, w, scale, &n, &k);
  lab::CheckOnGpuCompact(fn, {x, out, workspace});
  const bool f32 = out->dtype.code == kDLFloat && out->dtype.bits == 32 && out->dtype.lanes == 1;
  if (!lab::IsHalf(x->dtype) || !(f32 || lab::IsHalf(out->dtype)) || !lab::IsHalf(workspace->dtype))
    TVM_FFI_THROW(TypeError) << fn << ": expects x float16, out float16 or float32, workspace float16";
  const int64_t m = Rows(x);
  if (x->shape[x->ndim - 1] != k || out->shape[out->ndim - 1] != n || Rows(out) != m || workspace->ndim != 2 ||
      workspace->shape[0] != n || workspace->shape[1] != k)
    TVM_FFI_THROW(ValueError) << fn << ": shapes do not agree (x [.., " << x->shape[x->ndim - 1] << "], q_weight ["
                              << n << ", " << w->shape[1] << "], out [.., " << out->shape[out->ndim - 1]
                              << "], workspace [" << workspace->shape[0] << ", "
                              << (workspace->ndim > 1 ? workspace->shape[1] : -1) << "], rows " << m << " vs "
                              << Rows(out) << ")";
  if (m == 0) return;
  const int device = x->device.device_id;
  auto stream = static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, device));
  const auto* xp = Data<__half>(x);
  const auto* wp = Data<uint32_t>(w);
  const auto* sp = Data<__half>(scale);
  if (RunsFused(m, n, k, Data<void>(x), device)) {
    float* partial = reinterpret_cast<float*>(Data<__half>(workspace));  // split-K's partial sums
    if (f32) {
      LaunchFused<Bits, float>(xp, wp, sp, Data<float>(out), partial, m, n, k, device, stream);
    } else {
      LaunchFused<Bits, __half>(xp, wp, sp, Data<__half>(out), partial, m, n, k, device, stream);
    }
    lab::CheckLaunch(fn);
    return;
  }
  LaunchDequantize<Bits>(wp, sp, Data<__half>(workspace), n, k, device, stream);
  lab::CheckLaunch(fn);
  lab::CublasGemmNT(device, stream, m, n, k, xp, Data<__half>(workspace), Data<void>(out), f32);
}

}  // namespace

TVM_FFI_STATIC_INIT_BLOCK() {
  namespace refl = tvm::ffi::reflection;
  refl::GlobalDef().def("lab.gemm.q4", GemmQuantized<4>);
  refl::GlobalDef().def("lab.gemm.q8", GemmQuantized<8>);
  refl::GlobalDef().def("lab.gemm.quant_path", SetPath);
  refl::GlobalDef().def("lab.gemm.quant_plan", DescribePlan);
  refl::GlobalDef().def("lab.dequant.q4", DequantizePacked<4>);
  refl::GlobalDef().def("lab.dequant.q8", DequantizePacked<8>);
}
