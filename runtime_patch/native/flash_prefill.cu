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
// out of the sums). Blocks are issued longest first (the last query rows see the most keys).
//
// GQA: the block's query head h reads KV head h / (q_heads / kv_heads); the other query heads of
// the group read the same tiles through L2.
#include "flash_prefill.h"

#include <cuda_fp16.h>
#include <cuda_pipeline.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "cuda_common.h"
#include "mma_fragments.h"

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

template <int D>
__global__ void __launch_bounds__(kThreads, 2) FlashPrefillKernel(FlashPrefillArgs a) {
  using T = Tile<D>;
  extern __shared__ __align__(16) unsigned char smem[];
  __half* sq = reinterpret_cast<__half*>(smem);
  __half* sk = sq + kRows * D;        // [2][kKeys][D]
  __half* sv = sk + 2 * kKeys * D;    // [2][kKeys][D]
  const int n = int(a.n), m = int(a.m), shift = m - n;
  const int q0 = (gridDim.x - 1 - blockIdx.x) * kRows;
  const int h = blockIdx.y, hk = h / int(a.q_heads / a.kv_heads);
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

  for (int r = 0; r < 2; ++r) {
    row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 1);
    row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 2);
  }
  for (int r = 0; r < 2; ++r) {
    const int row = warp_row + g + r * 8;
    if (row >= n) continue;
    const float inverse = row_sum[r] > 0.f ? 1.f / row_sum[r] : 0.f;
    __half* dst = a.out + row * a.q_ld + h * D + 2 * t4;
    #pragma unroll
    for (int c = 0; c < T::kColumns; ++c)
      *reinterpret_cast<__half2*>(dst + c * 8) = __floats2half2_rn(o[c][2 * r] * inverse, o[c][2 * r + 1] * inverse);
    if (a.lse != nullptr && t4 == 0)
      a.lse[(a.lse_row0 + row) * a.q_heads + h] =
          row_sum[r] > 0.f ? row_max[r] * a.scale2 + log2f(row_sum[r]) : -INFINITY;
  }
}

template <int D>
void Launch(const FlashPrefillArgs& args, cudaStream_t stream) {
  const auto kernel = FlashPrefillKernel<D>;
  LAB_CHECK_CUDA(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tile<D>::kSmemBytes));
  const dim3 grid(unsigned((args.n + kRows - 1) / kRows), unsigned(args.q_heads));
  kernel<<<grid, kThreads, Tile<D>::kSmemBytes, stream>>>(args);
  LAB_CHECK_CUDA(cudaGetLastError());
}

bool Aligned(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

bool FlashPrefillApplies(const FlashPrefillArgs& a, int major) {
  return major >= 8 && (a.d == 32 || a.d == 64 || a.d == 128) && a.q_heads % a.kv_heads == 0 && a.m >= 1 &&
         (a.m >= a.n || !a.causal) &&
         a.n <= INT32_MAX && a.m <= INT32_MAX && a.q_ld % 8 == 0 && a.kv_ld % 8 == 0 && a.kv_head_stride % 8 == 0 &&
         Aligned(a.q) && Aligned(a.k) && Aligned(a.v) && Aligned(a.out);
}

void FlashPrefill(const FlashPrefillArgs& args, cudaStream_t stream) {
  if (args.n == 0) return;
  switch (args.d) {
    case 32: return Launch<32>(args, stream);
    case 64: return Launch<64>(args, stream);
    case 128: return Launch<128>(args, stream);
    default: TVM_FFI_THROW(ValueError) << "lab.attention: no fused prefill kernel for head dim " << args.d;
  }
}

}  // namespace lab
