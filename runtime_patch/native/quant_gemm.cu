// The prefill's quantized linears (engine/model/kernels.py `_library_gemm`):
//
// lab.gemm.q4 / lab.gemm.q8 (x, q_weight, q_scale, out, workspace): out [.., N] = x [.., K] W^T for
// a q4f16_1 / q8f16_1 weight W, by one of two paths:
// - "fused" (a prompt of up to kFusedUpTo rows): one tensor-core kernel that reads the packed
//   weight and dequantizes each tile into shared memory on its way to the mma (GemmQuant below):
//   the float16 weight is never written to memory.
// - "dequant" (longer prompts, and shapes the fused kernel does not take): the whole weight
//   dequantized into `workspace` [N, K] float16 (Dequantize), then cuBLAS (lab::CublasGemmNT).
//   Where the GEMM's arithmetic is much larger than the weight, cuBLAS's wgmma kernels outrun an
//   mma.sync kernel by more than the dequantize pass costs.
// Both compute with the same float16 weights, (q - m) * scale rounded once (m = 7 or 127), and
// float32 sums. The workspace is an output of the call in the compiled graph (allocated by TVM's
// memory plan, as the dequantized weight always was); the fused path leaves it untouched.
//
// lab.gemm.quant_path(name) -> previous: "auto" (the default: by the row count), "fused" or
// "dequant" for this process (the benchmarks time both in one process).
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

#include "cublas_gemm.h"
#include "cuda_common.h"

namespace {

using lab::Data;
using lab::Rows;

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
// A block of 8 warps computes a tile of kBM rows x kBN outputs; a warp 32 x 32 of it (2 x 4 warps),
// mma.sync m16n8k16 (float16 operands, float32 accumulators). K is walked in tiles of kBK = 64
// (two quantization groups). Per tile: x's [kBM, 64] through cp.async into shared memory, and the
// weight's [kBN, 64] packed (one group of one output row per thread: a 16-byte load at q4, two at
// q8) loaded into registers a tile ahead, dequantized to float16 and stored into shared memory
// while the previous tile's products run; two buffers of each, one barrier per tile. Shared rows of
// 64 values have their 16-byte chunks permuted (chunk XOR row % 8), so that the 8 rows an ldmatrix
// reads, and the 8 chunks a quarter-warp stores, fall in different banks.
//
// The grid's x runs over row tiles: the blocks that read the same weight tile run side by side and
// share it through L2.
//
// Dequantizing in registers (the same exact formula as Dequantize): a nibble (or byte) q placed in
// the low bits of float16 0x6400 is 1024 + q; one half2 subtraction of 1024 + m leaves q - m
// (exact), one half2 multiply by the scale rounds (q - m) * scale once.

constexpr int kBM = 64, kBN = 128, kBK = 64;
constexpr int kWarps = 8, kThreads = 32 * kWarps;
constexpr int kChunks = kBK / 8;  // 16-byte chunks of a shared row
// Where the fused path applies (up to this many rows; above, dequant + cuBLAS). Set from
// bench.prefill_gemm on an H200 (docs/BENCHMARKS.md).
constexpr int64_t kFusedUpTo = 512;

__device__ __forceinline__ int Offset(int row, int chunk) { return row * kBK + ((chunk ^ (row & 7)) * 8); }

__device__ __forceinline__ void LoadMatrices(uint32_t* r, const __half* smem) {
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}

__device__ __forceinline__ void Mma(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
               "{%8, %9}, {%0, %1, %2, %3};\n"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t AsBits(__half2 h) { return *reinterpret_cast<uint32_t*>(&h); }
__device__ __forceinline__ __half2 AsHalf2(uint32_t bits) { return *reinterpret_cast<__half2*>(&bits); }

// A thread's share of a weight tile: one group (32 values) of one output row, packed, and its scale.
template <int Bits>
struct Group {
  uint4 words[Bits / 4];
  __half scale;
};

// The 32 values of a q4 group, in order, as 4 chunks of 8 float16.
__device__ __forceinline__ void Dequantized(const Group<4>& g, uint4* chunks) {
  const __half2 bias = __float2half2_rn(1024.f + 7.f);
  const __half2 s = __half2half2(g.scale);
  const uint32_t word[4] = {g.words[0].x, g.words[0].y, g.words[0].z, g.words[0].w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    // pairs (q[i], q[i + 4]) of word j's values, i = 0..3
    uint32_t pair[4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
      pair[i] = AsBits(__hmul2(__hsub2(AsHalf2(((word[j] >> (4 * i)) & 0x000F000Fu) | 0x64006400u), bias), s));
    // in order: (q0, q1), (q2, q3), (q4, q5), (q6, q7)
    chunks[j] = make_uint4(__byte_perm(pair[0], pair[1], 0x5410), __byte_perm(pair[2], pair[3], 0x5410),
                           __byte_perm(pair[0], pair[1], 0x7632), __byte_perm(pair[2], pair[3], 0x7632));
  }
}

// The same for a q8 group (8 words of 4 bytes).
__device__ __forceinline__ void Dequantized(const Group<8>& g, uint4* chunks) {
  const __half2 bias = __float2half2_rn(1024.f + 127.f);
  const __half2 s = __half2half2(g.scale);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const uint4 v = g.words[j / 2];
    const uint32_t word[2] = {j % 2 == 0 ? v.x : v.z, j % 2 == 0 ? v.y : v.w};
    uint32_t out[4];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      // bytes (b0, b1) and (b2, b3) as float16 1024 + b: 0x64 is the high byte of 1024.0
      out[2 * h] = AsBits(__hmul2(__hsub2(AsHalf2(__byte_perm(word[h], 0x64u, 0x4140)), bias), s));
      out[2 * h + 1] = AsBits(__hmul2(__hsub2(AsHalf2(__byte_perm(word[h], 0x64u, 0x4342)), bias), s));
    }
    chunks[j] = make_uint4(out[0], out[1], out[2], out[3]);
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

template <int Bits, typename OutT>
__global__ void __launch_bounds__(kThreads, 2)
GemmQuant(const __half* __restrict__ x, const uint32_t* __restrict__ w, const __half* __restrict__ scale,
          OutT* __restrict__ out, int m, int n, int k) {
  __shared__ __align__(16) __half xs[2][kBM * kBK];
  __shared__ __align__(16) __half ws[2][kBN * kBK];
  const int m0 = blockIdx.x * kBM, n0 = blockIdx.y * kBN;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm = warp / 4, wn = warp % 4;  // the warp's 32 x 32 of the tile
  const int tiles = k / kBK;
  const int64_t row_words = int64_t(k) * Bits / 32;

  // This thread's group of the weight tile: output row n0 + t / 2, group t % 2 (a row past n
  // repeats the last one; its products are not stored).
  const int w_row = threadIdx.x / 2, w_group = threadIdx.x % 2;
  const int64_t w_n = min(n0 + w_row, n - 1);
  const uint4* w_src = reinterpret_cast<const uint4*>(w + w_n * row_words) + w_group * (Bits / 4);
  const __half* s_src = scale + w_n * (k / 32) + w_group;
  auto load_group = [&](int t, Group<Bits>& g) {
#pragma unroll
    for (int l = 0; l < Bits / 4; ++l) g.words[l] = __ldg(w_src + t * (2 * Bits / 4) + l);
    g.scale = s_src[2 * t];
  };
  auto store_group = [&](const Group<Bits>& g, __half* tile) {
    uint4 chunks[4];
    Dequantized(g, chunks);
#pragma unroll
    for (int j = 0; j < 4; ++j) *reinterpret_cast<uint4*>(tile + Offset(w_row, 4 * w_group + j)) = chunks[j];
  };
  // x's tile: 2 chunks per thread, rows past m zero-filled.
  auto copy_x = [&](int t, __half* tile) {
#pragma unroll
    for (int i = 0; i < kBM * kChunks / kThreads; ++i) {
      const int c = threadIdx.x + i * kThreads, r = c / kChunks, chunk = c % kChunks;
      const bool inside = m0 + r < m;
      __pipeline_memcpy_async(tile + Offset(r, chunk), x + int64_t(inside ? m0 + r : 0) * k + t * kBK + chunk * 8, 16,
                              inside ? 0 : 16);
    }
    __pipeline_commit();
  };

  float acc[2][4][4];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j][0] = acc[i][j][1] = acc[i][j][2] = acc[i][j][3] = 0.f;

  Group<Bits> next;
  copy_x(0, xs[0]);
  load_group(0, next);
  store_group(next, ws[0]);
  __pipeline_wait_prior(0);
  __syncthreads();

  for (int t = 0; t < tiles; ++t) {
    const int b = t & 1;
    const bool more = t + 1 < tiles;
    if (more) {
      copy_x(t + 1, xs[b ^ 1]);
      load_group(t + 1, next);
    }
    const __half* xt = xs[b];
    const __half* wt = ws[b];
#pragma unroll
    for (int s = 0; s < kBK / 16; ++s) {
      uint32_t a[2][4], bf[2][4];
#pragma unroll
      for (int i = 0; i < 2; ++i)
        LoadMatrices(a[i], xt + Offset(wm * 32 + i * 16 + lane % 16, 2 * s + lane / 16));
#pragma unroll
      for (int j = 0; j < 2; ++j)
        LoadMatrices(bf[j], wt + Offset(wn * 32 + j * 16 + lane / 16 * 8 + lane % 8, 2 * s + (lane / 8) % 2));
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          Mma(acc[i][2 * j], a[i], bf[j][0], bf[j][1]);
          Mma(acc[i][2 * j + 1], a[i], bf[j][2], bf[j][3]);
        }
    }
    if (more) {
      store_group(next, ws[b ^ 1]);
      __pipeline_wait_prior(0);
    }
    __syncthreads();
  }

  // Lane l holds rows l / 4 and l / 4 + 8 of each 16 x 8 accumulator, columns 2 (l % 4) and + 1.
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int col = n0 + wn * 32 + j * 8 + 2 * (lane % 4);
      if (col >= n) continue;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = m0 + wm * 32 + i * 16 + lane / 4 + 8 * h;
        if (row < m) StorePair(out + int64_t(row) * n + col, acc[i][j][2 * h], acc[i][j][2 * h + 1]);
      }
    }
}

// Where the fused kernel applies: whole tiles of K, outputs in pairs (n even; the weight rows'
// 16-byte loads need k % 64 anyway), x on a 16-byte boundary.
bool FusedApplies(int64_t n, int64_t k, const void* x) {
  return k % kBK == 0 && n % 8 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0 && n < (int64_t(1) << 31) / kBN;
}

// ------------------------------------------------------------------------------------------------
// The calls

enum class Path : int { kAuto = 0, kFused = 1, kDequant = 2 };
const char* const kPathNames[] = {"auto", "fused", "dequant"};
std::atomic<int> g_path{int(Path::kAuto)};

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

template <int Bits, typename OutT>
void LaunchFused(const __half* x, const uint32_t* w, const __half* s, OutT* out, int64_t m, int64_t n, int64_t k,
                 cudaStream_t stream) {
  const dim3 grid(unsigned((m + kBM - 1) / kBM), unsigned((n + kBN - 1) / kBN));
  GemmQuant<Bits, OutT><<<grid, kThreads, 0, stream>>>(x, w, s, out, int(m), int(n), int(k));
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
  const Path path = Path(g_path.load());
  const bool fused = FusedApplies(n, k, Data<void>(x)) && lab::Facts(device).major >= 8 &&
                     (path == Path::kFused || (path == Path::kAuto && m <= kFusedUpTo));
  const auto* xp = Data<__half>(x);
  const auto* wp = Data<uint32_t>(w);
  const auto* sp = Data<__half>(scale);
  if (fused) {
    if (f32) {
      LaunchFused<Bits, float>(xp, wp, sp, Data<float>(out), m, n, k, stream);
    } else {
      LaunchFused<Bits, __half>(xp, wp, sp, Data<__half>(out), m, n, k, stream);
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
  refl::GlobalDef().def("lab.dequant.q4", DequantizePacked<4>);
  refl::GlobalDef().def("lab.dequant.q8", DequantizePacked<8>);
}
