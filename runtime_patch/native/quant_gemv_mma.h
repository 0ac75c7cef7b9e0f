// The q4f16_1 decode GEMV on tensor cores (sm_80 and newer): the same functions as quant_gemv.cu's
// SIMT kernel (lab.gemv.q4 and its fusions), with fewer instructions per weight.
//
// Why: the SIMT kernel spends ~2.2 instructions per weight (a masked OR, a half2 subtraction and a
// half2 multiply-add per two weights, a float32 conversion and addition per 8), and its warps load,
// then compute, in step: on Llama-3-8B's gate_up it reached 70% of the copy bandwidth where q8, at
// 1.5 instructions per weight byte instead of 4.4, reaches 97% (bench.gemv, 2026-12-01). A streaming
// kernel (one block per SM, bulk copies into a ring of shared-memory stages, 8 consumer warps) kept
// the loads going but was slower still: its warps issued 0.53 instructions a cycle (ncu), compute-bound.
//
// How: mma.sync m16n8k16 does the products and their float32 sums. A block computes 16 rows (with
// Swiglu 8 gate rows as rows 0-7 and their up rows as rows 8-15), its 8 warps each a slice of the
// inputs: warp w takes chunks w, w + 8, ... of 128 inputs (4 groups). In a chunk, lane (r = lane / 4,
// c = lane % 4) loads group 4 chunk + c of rows r and r + 8, one 16-byte load each, and their scales.
// A word's nibbles become float16 q * s in two instructions per pair: a masked OR gives 1024 + q
// (0x6400) or 64 + q (0x5400 with the nibble 4 bits up), and one half2 fma with s and -1024 s (-64 s),
// both exact, rounds q * s once. These are the A fragment (a0 = row r's (nibble i, nibble i + 4),
// a2 = its (i + 1, i + 5), a1 / a3 the same of row r + 8: the k order inside a chunk is a permutation
// that B follows); B is x's matching pairs (every column the same x, so every column of C is the
// product; column 0 is read). The bias is taken out once per group: out = sum q s x - 7 sum_groups s X,
// X a group's sum of x (float32, made once per block beside x's pairs in shared memory).
// Per 16 weights of two rows: 8 masked ORs, 8 fmas, 2 shifts, 2 mma: ~1.3 instructions a weight with
// the loads. Numerics: each weight's q * s rounded to float16 once (MLC's dequantize rounds (q - 7) s
// once), products and sums in float32.
//
// The 8 warps' sums meet in shared memory; 16 threads add them and write (residual, SwiGLU).
// Launched early (fusion.early) it issues its first round of weight loads before
// lab::WaitForPrevious, x's copy after, as the SIMT kernel does.
#pragma once

#include <cuda_fp16.h>
#include <cuda_pipeline.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_common.h"
#include "mma_fragments.h"
#include "quant_gemv_math.h"

namespace lab::gemv {

constexpr int kMmaWarps = 8;
constexpr int kMmaRows = 16;         // rows of W a block computes
constexpr int kMmaChunk = 128;       // inputs a warp takes at a time (4 groups; a lane one group of two rows)
constexpr int kMmaChunksPerRound = 4;  // loads a lane issues before it computes on them: 2 x 4 x 16 bytes

// x's pairs in shared memory (chunks where Swizzled puts them: lanes c = 0..3 of a quarter-warp
// read chunks 4 apart, on 4 different bank quads), then the groups' sums.
inline int MmaSharedBytes(int64_t k) { return int((k + 63) / 64 * 64 * 2 + k / 32 * 4); }

template <bool Swiglu, typename OutT>
__global__ void __launch_bounds__(kMmaWarps * 32, 2)
GemvMmaQ4(const __half* __restrict__ x, const uint32_t* __restrict__ w, const __half* __restrict__ scale,
          OutT* __restrict__ out, int n, int k, Fusion fusion) {
  extern __shared__ uint4 x_shared[];  // k / 8 chunks of pairs, then k / 32 float sums
  __shared__ float partial[kMmaWarps][kMmaRows];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, r = lane / 4, c = lane % 4;
  const int groups = k / 32, chunks = k / kMmaChunk;
  float* group_sum = reinterpret_cast<float*>(x_shared + (k + 63) / 64 * 8);
  const int outputs = Swiglu ? n / 2 : n;
  int64_t row_a, row_b;  // rows r and r + 8 of the block (past the end: the last, computed, not stored)
  if constexpr (Swiglu) {
    const int o = min(int(blockIdx.x) * (kMmaRows / 2) + r, outputs - 1);
    row_a = o, row_b = int64_t(outputs) + o;
  } else {
    row_a = min(int(blockIdx.x) * kMmaRows + r, n - 1);
    row_b = min(int(blockIdx.x) * kMmaRows + r + 8, n - 1);
  }
  const uint4* wa = reinterpret_cast<const uint4*>(w) + row_a * groups;  // q4: one 16-byte vector a group
  const uint4* wb = reinterpret_cast<const uint4*>(w) + row_b * groups;
  const __half* sa = scale + row_a * groups;
  const __half* sb = scale + row_b * groups;
  const uint4* xv = reinterpret_cast<const uint4*>(x);
  // each thread copies the 4 chunks of its groups, so that it can pair them and sum them alone
  const auto copy_x = [&] {
    for (int g = threadIdx.x; g < groups; g += blockDim.x)
      for (int j = 0; j < 4; ++j) __pipeline_memcpy_async(x_shared + Swizzled(4 * g + j), xv + 4 * g + j, 16);
    __pipeline_commit();
  };
  lab::AllowNext();
  if (!fusion.early) copy_x();
  const int per_warp = (chunks + kMmaWarps - 1) / kMmaWarps;  // the most chunks a warp has
  const int rounds = (per_warp + kMmaChunksPerRound - 1) / kMmaChunksPerRound;  // the same for every thread
  const int mine = max(0, (chunks - warp + kMmaWarps - 1) / kMmaWarps);  // this warp's chunks
  // This lane's group in its warp's i-th chunk is g0 + 32 i, and that group's x chunks lie at
  // x_at[j] + 128 i: adding 128 chunks changes neither the low 3 bits of a chunk's index nor the 3
  // above them, which Swizzled XORs.
  const int g0 = 4 * warp + c;
  int x_at[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) x_at[j] = Swizzled(4 * g0 + j);
  // C of each word position j (4 chains: one accumulator would chain every mma on the one before):
  // acc[j][0] row r, acc[j][2] row r + 8 (every column the same)
  float acc[4][4] = {};
  float bias_a = 0.f, bias_b = 0.f;  // sum over this lane's groups of s X
  for (int round = 0; round < rounds; ++round) {
    uint4 qa[kMmaChunksPerRound], qb[kMmaChunksPerRound];
    __half s_a[kMmaChunksPerRound], s_b[kMmaChunksPerRound];
#pragma unroll
    for (int p = 0; p < kMmaChunksPerRound; ++p) {
      const int i = round * kMmaChunksPerRound + p, g = g0 + 32 * i;
      if (i < mine) qa[p] = __ldg(wa + g), qb[p] = __ldg(wb + g), s_a[p] = sa[g], s_b[p] = sb[g];
    }
    if (round == 0) {
      if (fusion.early) {
        lab::WaitForPrevious();  // x is the previous kernel's output; the weights above are constants
        copy_x();
      }
      __pipeline_wait_prior(0);  // this thread's chunks have arrived
      for (int g = threadIdx.x; g < groups; g += blockDim.x) {
        float sum = 0.f;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          uint4& chunk = x_shared[Swizzled(4 * g + j)];
          const __half2* h = reinterpret_cast<const __half2*>(&chunk);
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const float2 f = __half22float2(h[i]);
            sum += f.x + f.y;
          }
          chunk = Pairs(chunk);
        }
        group_sum[g] = sum;
      }
      __syncthreads();
    }
#pragma unroll
    for (int p = 0; p < kMmaChunksPerRound; ++p) {
      const int i = round * kMmaChunksPerRound + p;
      if (i >= mine) break;  // the same for the whole warp
      uint4 xc[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) xc[j] = x_shared[x_at[j] + 128 * i];
      const uint32_t* xp = reinterpret_cast<const uint32_t*>(xc);  // pairs 4 j + i (quant_gemv_math.h)
      const float xs = group_sum[g0 + 32 * i];
      bias_a += __half2float(s_a[p]) * xs, bias_b += __half2float(s_b[p]) * xs;
      const __half2 sa2 = __half2half2(s_a[p]), sb2 = __half2half2(s_b[p]);
      const __half2 low_a = __hmul2(sa2, __float2half2_rn(-1024.f)), high_a = __hmul2(sa2, __float2half2_rn(-64.f));
      const __half2 low_b = __hmul2(sb2, __float2half2_rn(-1024.f)), high_b = __hmul2(sb2, __float2half2_rn(-64.f));
      const uint32_t word_a[4] = {qa[p].x, qa[p].y, qa[p].z, qa[p].w};
      const uint32_t word_b[4] = {qb[p].x, qb[p].y, qb[p].z, qb[p].w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const uint32_t ha = h ? word_a[j] >> 8 : word_a[j], hb = h ? word_b[j] >> 8 : word_b[j];
          uint32_t a[4];
          a[0] = AsBits(__hfma2(AsHalf2(MaskOr(ha, 0x000F000Fu, 0x64006400u)), sa2, low_a));
          a[1] = AsBits(__hfma2(AsHalf2(MaskOr(hb, 0x000F000Fu, 0x64006400u)), sb2, low_b));
          a[2] = AsBits(__hfma2(AsHalf2(MaskOr(ha, 0x00F000F0u, 0x54005400u)), sa2, high_a));
          a[3] = AsBits(__hfma2(AsHalf2(MaskOr(hb, 0x00F000F0u, 0x54005400u)), sb2, high_b));
          lab::mma::Mma(acc[j], a, xp[4 * j + 2 * h], xp[4 * j + 2 * h + 1]);
        }
      }
    }
  }
  // the bias of the groups of this lane's quad (lanes r, c = 0..3 hold the same rows)
  bias_a += __shfl_xor_sync(0xffffffffu, bias_a, 1);
  bias_a += __shfl_xor_sync(0xffffffffu, bias_a, 2);
  bias_b += __shfl_xor_sync(0xffffffffu, bias_b, 1);
  bias_b += __shfl_xor_sync(0xffffffffu, bias_b, 2);
  if (c == 0) {
    partial[warp][r] = (acc[0][0] + acc[1][0]) + (acc[2][0] + acc[3][0]) - 7.f * bias_a;
    partial[warp][r + 8] = (acc[0][2] + acc[1][2]) + (acc[2][2] + acc[3][2]) - 7.f * bias_b;
  }
  __syncthreads();
  const int t = threadIdx.x;
  if constexpr (Swiglu) {
    const int o = int(blockIdx.x) * (kMmaRows / 2) + t;
    if (t < kMmaRows / 2 && o < outputs) {
      float gate = 0.f, up = 0.f;
#pragma unroll
      for (int i = 0; i < kMmaWarps; ++i) gate += partial[i][t], up += partial[i][t + 8];
      float v = SiluTimes(gate, up);
      if (fusion.residual != nullptr) v += __half2float(fusion.residual[o]);
      out[o] = OutT(v);
    }
  } else {
    const int row = int(blockIdx.x) * kMmaRows + t;
    if (t < kMmaRows && row < n) {
      float v = 0.f;
#pragma unroll
      for (int i = 0; i < kMmaWarps; ++i) v += partial[i][t];
      if (fusion.residual != nullptr) v += __half2float(fusion.residual[row]);
      out[row] = OutT(v);
    }
  }
}

}  // namespace lab::gemv
