// lab.gemv.q4 / lab.gemv.q8 (x, q_weight, q_scale, out): the batch-1 decode GEMV of a q4f16_1 or
// q8f16_1 linear, out[n] = sum_k x[k] * (q[n, k] - m) * scale[n, k / 32] (m = 7 or 127), for
// engine/model/kernels.py's `decode` (decode_gemv="library"; relax call_dps_packed, inside the
// decode's CUDA graph: the kernel is launched on TVMFFIEnvGetStream, which TVM points at its
// capture stream while capturing).
//
// lab.gemv.q4_add / lab.gemv.q8_add (x, q_weight, q_scale, residual, out): the same plus a residual
// row, added to the float32 sum before its one rounding (the o and down projections at tp=1).
// lab.gemv.q4_swiglu / q8_swiglu (x, q_weight, q_scale, out): W = [W_gate; W_up] (2I rows), out
// [.., I] = silu(W_gate x) * (W_up x), a warp computing gate row i and up row i, both rounded to
// float16 first, silu(gate) rounded, then the product (the separate kernels' roundings): the SiLU
// kernel after every gate_up projection (~1.8 us in a graph) is gone. (Streamed, a grid of one wave
// whose warps each load their next output's weights while computing the current one, it was slower:
// 20.4 us in a graph, q4f16_1 641.1 against 645.0-645.2 tokens/s; docs/BENCHMARKS.md fourteenth
// round.)
//
// lab.gemv.q4_add_sq / q8_add_sq (x, q_weight, q_scale, residual, norm_weight, site, out, scaled),
// early too, and lab.gemv.q4_rms / q8_rms / q4_swiglu_rms / q8_swiglu_rms (x, q_weight, q_scale,
// site, eps, out): the RMSNorm after each residual add split over the GEMVs around it (NormSums
// below): the add GEMV writes out, scaled = out * norm_weight and adds the sum of out^2 into a norm
// site; the next GEMV takes scaled as x and scales its products by 1 / rms(out). No norm kernel in a
// decode step but the first layer's: q4f16_1 641.6-642.1 -> 673.4-674.3 tokens/s, q8f16_1
// 414.7-415.6 -> 420.8-421.6, one call on an H200 (docs/BENCHMARKS.md twentieth round). The norm in
// the GEMVs lost five times before: every block normalising x in its prologue (1.7-4 us a call); the
// norm as a scalar on the products with the squares summed by every block while x is prepared
// (1.7-2.1 us; seventh round); split as here, but with a slot a block (512) that every reader copied
// and summed (1.5-2.2 us a part, q4f16_1 576.7 against 617.0; twelfth round); the add GEMV's last
// block to arrive normalising the row (a serial tail of 3.7-5.6 us a call, 555.4-555.6 against
// 645.1-645.5; nineteenth round). What differs here: a reader's extra work is one 128-byte copy with
// x and a warp's shuffles, and the writer's atomics need no barrier.
//
// lab.gemv.q4_early / q8_early / q4_add_early / q8_add_early: the plain and add GEMVs launched
// while the kernel before them still runs (lab::LaunchAfterPrevious, sm_90): their first weight
// loads are issued before lab::WaitForPrevious, x and the writes after it. For the GEMVs after a
// kernel that lets its successor start (lab::AllowNext): the o projection after the static decode
// attention (its weights stream in while the latency-bound attention runs), the down projection
// after gate_up's GEMV with SiLU (down's blocks take the SMs that gate_up's last wave leaves
// free). Only there: launched this way after a kernel that does not allow it early, a GEMV gains
// nothing, and its x (copied after its weight loads are issued, behind them) arrives later
// (bench.gemv, 2026-12-01: q4 o 5.4 -> 6.1 us).
//
// The other GEMVs (lab.gemv.q4, q4_add, q4_swiglu, q8's) are launched the same way but wait for
// the kernel ahead before anything (lab::WaitForPrevious first): after the library RMSNorm, which
// lets its successor launch at once, the qkv and gate_up GEMVs' blocks are resident when the norm
// ends, and their launch latency is gone (q4f16_1 600.9-601.3 -> 606.7-606.9 tokens/s, q8f16_1
// 397.0-397.3 -> 400.0-401.0, one call on an H200, docs/BENCHMARKS.md eleventh round). Their
// weight loads stay after the wait: issued before it, the first 1 or 2 of 4 groups a lane, the
// step got slower (494.7 and 578.5 tokens/s against 609.6), and so did an L2 prefetch of the
// weights before the wait (585). So did the qkv and gate_up rows and scales taken by 1-D bulk
// copies (cp.async.bulk into shared memory, a warp's on its mbarrier) issued before the wait:
// 576.5-576.9 against 637.0-638.0 tokens/s, the norm ahead 1.5 -> 3.2 us a call in the trace; and
// with the norm letting them launch only once it had read its row, on an SM of its own (190 KB of
// shared memory asked), 565.7-565.8 against 644.2-644.9 (docs/BENCHMARKS.md eighteenth round):
// whatever the path, weight bytes in flight across the boundary slow the short reads the chain
// waits on (the norm's row, the next GEMV's x).
//
// The weights go into registers, not shared memory: a copy of the same kernels staging each
// lane's groups in shared memory by cp.async (qkv at 6 blocks an SM, one wave; gate_up at 5) was
// no faster alone (in a graph qkv 6.31 against 6.32 us, gate_up with SiLU 19.55 against 19.54)
// and slower in the step (612.1-613.3 against 639.3-640.2 tokens/s: with more of their blocks
// resident, the attention's and the down projection's early blocks found no room: attention 4.1
// -> 5.2 us, down 8.9 -> 10.4; eighteenth round).
//
// lab.gemv.rows(r) -> the previous r: rows per warp for this process's GEMVs, 0 (the default: the
// rule, Choose) or 1, 2, 4 (where the kernel has that shape: 4 for q4 only, 2 or 4 with swiglu;
// otherwise the rule), for the benchmarks (bench.gemv --rows).
//
// q_weight [N, K * bits / 32] uint32 holds 32 / bits values per word, lowest bits first; q_scale
// [N, K/32] float16 (MLC's layouts, engine/quantize.py).
//
// Memory: a lane takes whole groups of 32 weights (q4: one 16-byte load, q8: two) and the warp's
// lanes consecutive groups, so a warp load reads 512 or 1024 contiguous bytes of a row. A lane
// first issues the loads of 4 or 8 groups of each of its rows (and their scales), then computes
// on them: the earlier loop, one group's load then its arithmetic, waited a memory latency per
// group and left the 4096-row GEMVs at 36-49% of the copy bandwidth. In the kernels of k compiled
// in (the down projections' two or four rounds a lane) the next round's loads go out group by
// group as this round's are computed (kRolling). (q8 lanes on consecutive 16-byte vectors, half a
// group each, were tried: 8 vectors a round took registers past the one-row kernels' 64 and the q8
// GEMVs got 5-15% slower.)
//
// x is copied into shared memory once per block, its 16-byte chunks XOR-permuted (Swizzled): a
// lane reads the 4 chunks of its group, and with the chunks in order the 8 lanes of a
// quarter-warp read 64 bytes apart and hit the same 4-bank quads (a 16-way conflict: 73% of the
// q4 and q8 kernels' shared-memory wavefronts were replays, ncu, 2026-11-30).
//
// Arithmetic: q4 is instruction-bound if each weight is converted to float32 (as TVM's GEMV does).
// Here one masked OR turns two nibbles into two float16 values 1024 + q or 64 + q at once
// (GroupQ4: 0x6400 is 1024.0 in float16, whose last 10 bits are the integer), one half2
// subtraction removes 1024 + 7 (64 + 7), and half2 multiply-adds combine them with x. Per 32-bit word the half2 sum is
// taken into float32; x is scaled by 1/16 for that sum: a half of it adds 4 products of at most
// 8 |x| / 16, so it stays finite for |x| up to 32752, half float16's largest (unscaled it would
// overflow from |x| = 2047). The masked ORs are one LOP3 each (lab::MaskOr, half_bits.h: written
// with two immediates nvcc emits two). The pairs of x a word's shifts need, (x[i], x[i + 4]) / 16, are
// made once per block in shared memory (each warp made them for itself per group before). q8
// reads twice the bytes per weight, so it can afford float32 products (exact for any x): a byte
// permute makes two float16 values 1024 + q of a word's bytes at once, a half2 subtraction
// removes 1024 + 127 (exact), and they are multiplied in float32.
//
// A warp computes kRows rows (1, 2 or 4, Choose below): x's values are loaded once per group for
// all of them.
#include <cuda_fp16.h>
#include <cuda_pipeline.h>
#include <cuda_runtime.h>
#include <dlpack/dlpack.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/c_env_api.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/reflection/registry.h>

#include <atomic>
#include <cstdint>
#include <type_traits>

#include "cuda_common.h"
#include "half_bits.h"

namespace {

using lab::AsHalf2;
using lab::Data;
using lab::IsCompact;
using lab::MaskOr;
using lab::Rows;

constexpr int kWarps = 8;
constexpr float kXScale = 1.f / 16.f;  // q4's half2 sums (above)

// 16-byte loads per group of one row.
template <int Bits>
constexpr int kLoadsPerGroup = Bits / 4;

// Where x's chunk j (8 values) lies in shared memory: within each aligned run of 8 chunks, j's low
// 3 bits XOR the next 3. The 8 lanes of a quarter-warp read chunk c of 8 consecutive groups,
// j = 4g + c: in order they fall on 2 of the 8 16-byte bank quads, permuted on all 8. A
// permutation of each aligned run of 8: shared memory is allocated for k rounded up to 64.
__device__ __forceinline__ int Swizzled(int j) { return j ^ ((j >> 3) & 7); }

// One q4 group: sum_j x[j] * (q[j] - 7) for the 32 values of 4 words, with x as the 16 pairs
// xp[4 * j + i] = (x[8j + i], x[8j + i + 4]) / 16 (nibbles i and i + 4 of word j). Nibbles 0 and 4 go
// under float16 1024.0 (0x6400: its last 10 bits are the integer), 1 and 5 in place under 64.0
// (0x5400, whose mantissa step is 1/16: a nibble shifted left by 4 adds q), and the same for the
// word shifted right by 8: one shift per word instead of three (-2 of ~19 instructions per 8 weights).
// Each masked OR is one LOP3 (MaskOr; written with two immediates it compiled to two: 17 instead of
// 21 instructions a word, +4% q4 decode, docs/BENCHMARKS.md tenth round).
__device__ float GroupQ4(const uint4& words, const __half2* xp) {
  const __half2 low_bias = __float2half2_rn(1024.f + 7.f), high_bias = __float2half2_rn(64.f + 7.f);
  const uint32_t word[4] = {words.x, words.y, words.z, words.w};
  float sum = -0.f;  // -0 + v is v: the first addition folds away (0 + v is not, for v = -0)
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const uint32_t halves[2] = {word[j], word[j] >> 8};
    __half2 part = __float2half2_rn(0.f);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const __half2 low = __hsub2(AsHalf2(MaskOr(halves[h], 0x000F000Fu, 0x64006400u)), low_bias);
      const __half2 high = __hsub2(AsHalf2(MaskOr(halves[h], 0x00F000F0u, 0x54005400u)), high_bias);
      part = __hfma2(low, xp[4 * j + 2 * h], part);
      part = __hfma2(high, xp[4 * j + 2 * h + 1], part);
    }
    const float2 f = __half22float2(part);
    sum += f.x + f.y;
  }
  return sum;
}

// One q8 group: sum_j x[j] * (q[j] - 127) for the 32 values of 8 words, x as floats.
__device__ float GroupQ8(const uint4* words, const float* xf) {
  const __half2 bias = __float2half2_rn(1024.f + 127.f);
  float sum = -0.f;  // -0 + v is v: the first addition folds away (0 + v is not, for v = -0)
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const uint32_t word[4] = {words[h].x, words[h].y, words[h].z, words[h].w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      // bytes (b0, b2) and (b1, b3) as float16 1024 + b: 0x64 is the high byte of 1024.0
      const float2 even = __half22float2(__hsub2(AsHalf2(__byte_perm(word[j], 0x64u, 0x4240)), bias));
      const float2 odd = __half22float2(__hsub2(AsHalf2(__byte_perm(word[j], 0x64u, 0x4341)), bias));
      const float* xw = xf + 16 * h + 4 * j;
      sum += even.x * xw[0] + odd.x * xw[1] + even.y * xw[2] + odd.y * xw[3];
    }
  }
  return sum;
}

// q4's chunk of x in shared memory, 8 values x[0..8), made into the pairs
// (x[0], x[4]), (x[1], x[5]), (x[2], x[6]), (x[3], x[7]), each scaled by 1/16 (exact but for
// float16 values below 2^-10, as the sum's scaling always was).
__device__ uint4 PairedChunk(uint4 raw) {
  const __half2 xscale = __float2half2_rn(kXScale);
  const __half* h = reinterpret_cast<const __half*>(&raw);
  uint4 paired;
  __half2* p = reinterpret_cast<__half2*>(&paired);
#pragma unroll
  for (int i = 0; i < 4; ++i) p[i] = __hmul2(__halves2half2(h[i], h[i + 4]), xscale);
  return paired;
}

// What a GEMV adds to its product, a template parameter (like Swiglu, which maps rows): a kernel's
// code is the code it runs. (With the add chosen at run time, a null residual skipped, every GEMV
// carried the add's code: q4f16_1 606.0-608.3 tokens/s against 611.0-617.0 with the add compiled
// in only where it runs, two calls on an H200, docs/BENCHMARKS.md twelfth round.)
enum class Part {
  kProduct,     // out = W x
  kAdd,         // out = residual + W x (lab.gemv.q4_add / q8_add)
  kAddSquares,  // out = residual + W x, scaled = out * norm_weight, the sum of out^2 into a site's
                // slots (lab.gemv.q4_add_sq / q8_add_sq: the next RMSNorm's parts, NormSums)
};

// NormSums: the RMSNorm split over the GEMVs around it (lab.gemv.*_add_sq and *_rms): rms_norm(h) * w =
// (h * w) / rms(h), and the scalar commutes with the next product. The GEMV that makes h (the o or
// down projection with its residual add, Part::kAddSquares) writes h and h * w and adds each warp's
// sum of h^2 into one of kSumSlots slots of a site (an atomic add, no barrier); the GEMV that reads
// it (qkv, gate_up with SiLU, the LM head: a kernel with NormedInput) takes h * w as x, copies the
// site's slots into shared memory with x, sums them (a lane each, a warp's shuffles) and scales its
// float32 products by 1 / rms(h). The sites are two (the model alternates them: the o projections'
// 0, the down projections' 1), in a zeroed buffer of the plugin's own (lab::StableBuffer); the GEMV
// that adds into site s zeroes site 1 - s after lab::WaitForPrevious (its one reader, the kernel
// ahead or the one before it, has finished by then), so each site is zero again before its next
// producer. (The twelfth round's form of this wrote a slot a block, 512 of them, and each reader
// copied and summed them all: 1.5-2.2 us a call; docs/BENCHMARKS.md.)
constexpr int kSumSlots = 32;       // a site's slots: a warp adds into slot (its index % kSumSlots)
static_assert(kSumSlots == 32, "a reader's lane sums one slot");
constexpr int kSumSlotFloats = 32;  // a slot's stride: 128 bytes, a cache line of its own
constexpr int kSumSites = 2;
constexpr int kNormSumsPurpose = 0;  // lab::StableBuffer's purposes in this plugin's GEMVs

// The tensors the parts use.
struct Fusion {
  const __half* residual = nullptr;     // kAdd, kAddSquares: [n]
  const __half* norm_weight = nullptr;  // kAddSquares: [n], the next RMSNorm's weight
  __half* scaled = nullptr;             // kAddSquares: [n], out * norm_weight
  float* sums = nullptr;                // kAddSquares: the site added into; NormedInput: the site read
  float* clear = nullptr;               // kAddSquares: the other site, zeroed
  float epsilon = 0.f;                  // NormedInput: the RMSNorm's
};

// Dynamic shared memory of a block: x, k rounded up to a multiple of 64 values (Swizzled
// permutes aligned runs of 8 chunks).
inline int SharedBytes(int64_t k) { return int((k + 63) / 64 * 64 * 2); }

// x in shared memory made ready for the rounds, each thread on the chunks it copied (its own
// asynchronous copies are complete: no barrier before): q4 pairs them (PairedChunk). The caller's
// barrier after it makes x visible to the block.
template <int Bits>
__device__ void PrepareX(uint4* x_shared, int k) {
  if constexpr (Bits == 4) {
    for (int j = threadIdx.x; j < k / 8; j += blockDim.x) x_shared[Swizzled(j)] = PairedChunk(x_shared[Swizzled(j)]);
  }
}

// The rows a warp computes, kRows of them from output row `out0` on: with Swiglu the first half
// are gate rows out0.., the second the up rows I + out0.. (I = n / 2 outputs); a row past the end
// repeats the last (computed, not stored).
template <int kRows, bool Swiglu>
__device__ __forceinline__ int RowOf(int r, int out0, int n) {
  if constexpr (!Swiglu) {
    return min(out0 + r, n - 1);
  } else {
    constexpr int kOut = kRows / 2;
    const int outputs = n / 2;
    const int o = min(out0 + r % kOut, outputs - 1);
    return r < kOut ? o : outputs + o;
  }
}

__device__ __forceinline__ float RoundHalf(float v) { return __half2float(__float2half_rn(v)); }

// silu(gate) * up with the separate kernels' roundings: gate, up, silu(gate) and the product each
// rounded to float16.
__device__ __forceinline__ float SiluTimes(float gate, float up) {
  const float g = RoundHalf(gate);
  return RoundHalf(g / (1.f + expf(-g))) * RoundHalf(up);
}

// P: groups a lane loads before it computes on them (a round); kRows * P * L 16-byte loads in flight.
// x is copied into shared memory once per block (Swizzled; SharedBytes(k) of dynamic shared memory),
// by asynchronous copies issued before the first round's weight loads (right after them in an
// early GEMV, below), so its latency overlaps theirs (q4 then pairs each chunk in place, PairedChunk); loading x per group from global memory
// in the compute loop put an L2 round trip after every round's weights (a 4096 x 4096 q4 GEMV took
// 8 us in the model). An early GEMV (Early, launched by lab::LaunchAfterPrevious) issues
// its first round's weight loads before lab::WaitForPrevious, then x's copy (the previous kernel's
// output); every write comes after; any other GEMV waits for the kernel ahead before it copies x.
// Every GEMV lets its successor start at once (lab::AllowNext): the kernels launched early take it
// up (the down projection's GEMV after gate_up's, the static decode attention after the qkv
// projection's), any other waits for the GEMV as it always did.
// Registers: q4's one-row kernels at most 64 (4 blocks an SM: a 4096-row GEMV is one wave), its
// two-row SwiGLU kernel of 4 groups a round at most 85 (3 blocks an SM: 78 used, no spills;
// Llama-3-8B's gate_up 20.7 us in a graph against 22.5 with 4 rows a warp at 2 blocks; the plain
// two-row kernel at 3 blocks made the rule tie it with one row on the qkv projection, 8.2-8.4 us
// against 7.8, and stays at 2: the qkv projection in one wave so, q4f16_1 decoded 643.6-643.8
// against 645.1-645.6 tokens/s, eighteenth round), its others at most 128 (2 blocks: at 133
// registers the 4-row kernel held one block an SM, and Llama-3-8B's gate_up took 32.4 us instead
// of 26.4); q8's one-row kernel of 4 groups a round at most 64; q8's others unbounded (bounded,
// they spill). (q4's one-row kernels at 5 blocks an SM, 48 registers without spills, were neutral
// or slower in the step, also for the o projection alone; at 6, 40 registers and spills, q4f16_1
// lost 5%: docs/BENCHMARKS.md fourteenth round.)
template <int Bits, int kRows, int P, bool Swiglu>
constexpr int kMinBlocks =
    Bits == 4 ? (kRows == 1 ? 4 : kRows == 2 && P == 4 && Swiglu ? 3 : 2) : (kRows == 1 && P == 4 ? 4 : 1);

// Where a lane has more than one round (the down projections' 14336 inputs: q4's 14 groups a lane
// in two rounds of 8, q8's in four of 4), the rolling kernels load the next round's group p into
// the registers of this round's group p as soon as it is computed, so that a round's loads stream
// while the round ahead is computed; the others issue a round's loads after the round ahead (a
// single-wave kernel's memory then idles while its warps compute). Rolling: the kernels with k
// compiled in (K != 0: q4's 4096 and 14336, q8's 14336; only the 14336 ones have more than one
// round). On an H200 (docs/BENCHMARKS.md thirteenth round), in one call each: q4f16_1 decode
// 630.0-630.2 -> 639.5-640.0 tokens/s, q8f16_1 411.5 -> 417.1-417.2 (q8's 14336 compiled in and
// rolling). Where k is a run-time value (70B's and the tp = 2 shapes, several waves) rolling lost:
// a first version rolling every kernel took q4's 70B gate_up at tp=2 from 37.3 to 47.7 us
// (bench.gemv), and q8's kernels, bounded to 2 blocks an SM with it, 5-10% slower at every shape.
template <int K>
constexpr bool kRolling = K != 0;

// n: rows of W (2I with Swiglu, whose output has I). Early: launched by lab::LaunchAfterPrevious
// with its first round's weight loads before lab::WaitForPrevious (the *_early functions), a
// template parameter like the Part.
// The residual (kAdd) is read by lane 0 after the warp's products. Copied into shared memory with x
// (16 bytes a block) it was slower: q4's o projection with its add 6.7 against 4.9 us plain in a
// graph, 5.1 read at the end (bench.gemv, 1 x H200, 2026-12-01, twelfth round).
// K: the inputs as a compile-time constant (0: k at run time; kQ4ConstantK, Launch): the rounds,
// bounds and addresses are then constants.
// NormedInput: x is h * w of an RMSNorm's input h, the sum of h^2 in fusion.sums (NormSums above);
// the products are scaled by 1 / rms(h) before anything else (SiLU, the rounding).
template <int Bits, int kRows, int P, bool Swiglu, typename OutT, Part kPart, bool Early, int K, bool NormedInput>
__global__ void __launch_bounds__(kWarps * 32, kMinBlocks<Bits, kRows, P, Swiglu>)
GemvQuant(const __half* __restrict__ x, const uint32_t* __restrict__ w, const __half* __restrict__ scale,
          OutT* __restrict__ out, int n, int k_arg, Fusion fusion) {
  const int k = K != 0 ? K : k_arg;
  constexpr int L = kLoadsPerGroup<Bits>;
  constexpr int kOut = Swiglu ? kRows / 2 : kRows;  // output rows per warp
  extern __shared__ uint4 x_shared[];  // k / 8 chunks, Swizzled
  const int lane = threadIdx.x % 32;
  const int outputs = Swiglu ? n / 2 : n;
  const int out0 = (blockIdx.x * kWarps + threadIdx.x / 32) * kOut;
  const bool active = out0 < outputs;  // the whole warp; an inactive one still takes part in the barriers
  const int groups = k / 32;
  const int64_t row_vecs = int64_t(groups) * L;  // 16-byte vectors per row
  const uint4* wv = reinterpret_cast<const uint4*>(w);
  const uint4* xv = reinterpret_cast<const uint4*>(x);
  // NormedInput: the site's slots, copied with x (in a register from the start the sum took one
  // that q8's one-row kernel, at 64, spilled)
  __shared__ float norm_slots[NormedInput ? kSumSlots : 1];
  // what comes after lab::WaitForPrevious: x (the previous kernel's output) and the norm's slots into
  // shared memory, or the other site zeroed
  const auto copy_x = [&] {
    for (int j = threadIdx.x; j < k / 8; j += blockDim.x) __pipeline_memcpy_async(x_shared + Swizzled(j), xv + j, 16);
    if constexpr (NormedInput) {
      if (threadIdx.x < kSumSlots)
        __pipeline_memcpy_async(norm_slots + threadIdx.x, fusion.sums + threadIdx.x * kSumSlotFloats, 4);
    }
    __pipeline_commit();
    if constexpr (kPart == Part::kAddSquares) {
      if (blockIdx.x == 0 && threadIdx.x < kSumSlots) fusion.clear[threadIdx.x * kSumSlotFloats] = 0.f;
    }
  };
  lab::AllowNext();  // only a kernel launched early takes it up (the *_early GEMVs, the static decode attention)
  if constexpr (!Early) {
    lab::WaitForPrevious();  // launched after the previous kernel has let it start: nothing before this
    copy_x();
  }
  // kAddSquares: lane 0's weights of the norm after it, for its output rows (constants)
  float norm_weight[kOut];
  if constexpr (kPart == Part::kAddSquares) {
#pragma unroll
    for (int o = 0; o < kOut; ++o)
      norm_weight[o] = lane == 0 && active ? __half2float(fusion.norm_weight[min(out0 + o, outputs - 1)]) : 0.f;
  }
  const int rounds = (groups + 32 * P - 1) / (32 * P);  // the same for every thread of the block
  float acc[kRows] = {};
  uint4 words[P][kRows][L];
  __half scales[P][kRows];
  // the group of a row that this lane takes as a round's p-th
  const auto group = [&](int round, int p) { return round * 32 * P + lane + 32 * p; };
  // group p of a round into words[p] / scales[p]
  const auto load = [&](int round, int p) {
    const int g = group(round, p);
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int row = RowOf<kRows, Swiglu>(r, out0, n);
      if (active && g < groups) {
#pragma unroll
        for (int l = 0; l < L; ++l) words[p][r][l] = __ldg(wv + row * row_vecs + int64_t(g) * L + l);
        scales[p][r] = scale[int64_t(row) * groups + g];
      }
    }
  };
  // after the first round's loads are issued: x in shared memory, ready for the products
  const auto x_ready = [&] {
    if constexpr (Early) {
      // the weights and scales are constants: the first round's loads are in flight before the
      // previous kernel, whose output x is, has finished
      lab::WaitForPrevious();
      copy_x();
    }
    __pipeline_wait_prior(0);  // this thread's chunks of x have arrived
    PrepareX<Bits>(x_shared, k);
    __syncthreads();  // x is ready in shared memory
  };
  // the products of group g, held in words[p] / scales[p]
  const auto accumulate = [&](int p, int g) {
    uint4 xc[4];
#pragma unroll
    for (int c = 0; c < 4; ++c) xc[c] = x_shared[Swizzled(4 * g + c)];
    if constexpr (Bits == 4) {
      const __half2* xp = reinterpret_cast<const __half2*>(xc);
#pragma unroll
      for (int r = 0; r < kRows; ++r) acc[r] += __half2float(scales[p][r]) * GroupQ4(words[p][r][0], xp);
    } else {
      float xf[32];
      const __half2* xh = reinterpret_cast<const __half2*>(xc);
#pragma unroll
      for (int i = 0; i < 16; ++i) {
        const float2 f = __half22float2(xh[i]);
        xf[2 * i] = f.x, xf[2 * i + 1] = f.y;
      }
#pragma unroll
      for (int r = 0; r < kRows; ++r) acc[r] += __half2float(scales[p][r]) * GroupQ8(words[p][r], xf);
    }
  };
  if constexpr (kRolling<K>) {
#pragma unroll
    for (int p = 0; p < P; ++p) load(0, p);
    x_ready();
    if (!active) return;
    for (int round = 0; round < rounds; ++round) {
#pragma unroll
      for (int p = 0; p < P; ++p) {
        const int g = group(round, p);
        if (g < groups) accumulate(p, g);
        // the next round's group p into the registers just used: its loads stream while this
        // round's later groups are computed
        if (round + 1 < rounds) load(round + 1, p);
      }
    }
  } else {
    for (int round = 0; round < rounds; ++round) {
#pragma unroll
      for (int p = 0; p < P; ++p) load(round, p);
      if (round == 0) x_ready();
      if (!active) continue;
#pragma unroll
      for (int p = 0; p < P; ++p) {
        const int g = group(round, p);
        if (g >= groups) break;
        accumulate(p, g);
      }
    }
    if (!active) return;
  }
  float unscale = Bits == 4 ? 1.f / kXScale : 1.f;
  if constexpr (NormedInput) {
    float norm_part = norm_slots[lane];  // written before x_ready's barrier
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) norm_part += __shfl_xor_sync(0xffffffffu, norm_part, offset);
    unscale *= rsqrtf(norm_part / float(k) + fusion.epsilon);
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], offset);
    acc[r] *= unscale;
  }
  if (lane != 0) return;
  float squares = 0.f;  // kAddSquares
#pragma unroll
  for (int o = 0; o < kOut; ++o) {
    if (out0 + o >= outputs) break;
    float v = Swiglu ? SiluTimes(acc[o], acc[kOut + o]) : acc[o];
    if constexpr (kPart == Part::kAdd || kPart == Part::kAddSquares) v += __half2float(fusion.residual[out0 + o]);
    out[out0 + o] = OutT(v);
    if constexpr (kPart == Part::kAddSquares) {
      const float h = float(OutT(v));  // the row as stored: the norm's input
      squares += h * h;
      fusion.scaled[out0 + o] = __float2half_rn(h * norm_weight[o]);
    }
  }
  if constexpr (kPart == Part::kAddSquares)
    atomicAdd(fusion.sums + (blockIdx.x * kWarps + threadIdx.x / 32) % kSumSlots * kSumSlotFloats, squares);
}

// The kernel shape for an output of n rows and k inputs: rows per warp and groups per round.
// - q4 shares its x loads and their conversion over 4 rows where a plain GEMV's output is wide (the
//   LM heads: 80.3 us against 82.7 at 2 rows for Llama-3-8B's; its GEMVs are bound by instructions
//   per weight: 4 rows measured 27.6 us against 39.9 at 1-2 rows for the 28672 x 4096 gate_up on
//   an H200 before the 2-row kernel held 3 blocks an SM).
// - Otherwise 1 or 2 rows per warp and 4 or 8 groups per round (4 where a lane has at most 4 groups
//   of a row: fewer registers, more resident warps; q8 at 2 rows always 4), choosing the fewest
//   waves of resident warps x rows per warp x rounds (a warp's time grows with both), so that a
//   narrow GEMV is not one full wave and a few stragglers: at one row per warp and 8 groups per
//   round, Llama-3-8B's 4096 x 14336 down projection ran 1.3 waves (31.4 us; 18.0 at two rows),
//   and in the model the 6144 x 4096 qkv projection took 10.9 us, 2 waves of one-row warps.
//   Ties go to more rows per warp.
// - Swiglu needs rows in (gate, up) pairs: 2 rows per warp. (q4 took 4 where wide until the 2-row
//   kernel held 3 blocks an SM: Llama-3-8B's gate_up with SiLU 20.7 against 22.5 us in a graph,
//   bench.gemv --rows, an H200, 2026-12-01, tenth round.)
// - q4 takes 2 rows per warp where a lane has more than 8 groups of a row (two rounds or more: the
//   down projections): Llama-3-8B's 4096 x 14336 down 13.2 against 14.1 us with its add in a graph,
//   70B's 8192 x 14336 at tp=2 22.6 against 23.5 (the same runs).
// - q8 takes 2 rows per warp where a lane has more than 4 groups of a row (the down projections)
//   or the output is wider than kQ8WideFrom (the LM heads): the rule chose 1 row for those, and
//   2 measured faster (bench.gemv --rows, an H200, 2026-12-01: Llama-3-8B's 4096 x 14336 down
//   20.8 against 23.2 us, 70B's 8192 x 14336 at tp=2 36.3 against 38.4, the 128256-row LM head
//   134.3 against 146.0); for qkv, o and gate_up 1 row was as fast or faster.
constexpr int64_t kQ4WideFrom = 16384;
// The input widths compiled into kernels of their own (Launch; GemvQuant's K): q4's Llama 4096 (every
// Llama-3-8B GEMV but down, 70B's o at tp=2). With k known the rounds, bounds and addresses are
// constants: 30-50 SASS instructions fewer a kernel, q4f16_1 decode 614.6-614.8 -> 623.9-624.0
// tokens/s (one call on an H200, docs/BENCHMARKS.md twelfth round); and the down projections'
// 14336 (kDownK, q4's and q8's: q4's two-row kernel of 8 groups a round 1504 -> 1456 instructions;
// these kernels load rolling, kRolling). Tried and dropped: these kernels without the row clamps
// and the warp's active test where the grid covers the output exactly (598.0 against 628.9-629.1
// tokens/s in one call; with 14336 compiled in as well, its two-row kernel then spilled 56 bytes).
constexpr int kQ4ConstantK = 4096;
constexpr int kDownK = 14336;  // the down projections' (8B; 70B at tp=2)
constexpr int64_t kQ8WideFrom = 32768;

struct Shape {
  int rows, groups_per_round;
  const void* kernel;
};

template <int Bits, int R, int P, bool Swiglu, typename OutT, Part kPart, bool Early, int K, bool NormedInput>
Shape ShapeOf() {
  return {R, P, reinterpret_cast<const void*>(GemvQuant<Bits, R, P, Swiglu, OutT, kPart, Early, K, NormedInput>)};
}

// Resident blocks per SM of a kernel with `smem` bytes of dynamic shared memory (lab::ResidentBlocks:
// the kernel is allowed more than the default where x has more than 24576 inputs).
int Resident(const void* kernel, int smem) {
  const int blocks = lab::ResidentBlocks(kernel, kWarps * 32, smem);
  if (blocks == 0) TVM_FFI_THROW(ValueError) << "lab.gemv: " << smem / 2 << " inputs do not fit in shared memory";
  return blocks;
}

std::atomic<int> g_rows{0};  // lab.gemv.rows: 0 for the rule

template <int Bits, bool Swiglu, typename OutT, Part kPart, bool Early, int K, bool NormedInput>
Shape Choose(int64_t n, int64_t k, int smem, int device) {
  const int64_t per_lane = (k / 32 + 31) / 32;  // groups of a row per lane
  const bool few = per_lane <= 4;
  Shape candidates[3];
  int count = 0;
  if constexpr (Bits == 4) candidates[count++] = ShapeOf<Bits, 4, 4, Swiglu, OutT, kPart, Early, K, NormedInput>();
  candidates[count++] = few || Bits == 8 ? ShapeOf<Bits, 2, 4, Swiglu, OutT, kPart, Early, K, NormedInput>()
                                         : ShapeOf<Bits, 2, 8, Swiglu, OutT, kPart, Early, K, NormedInput>();
  if constexpr (!Swiglu)
    candidates[count++] = few ? ShapeOf<Bits, 1, 4, Swiglu, OutT, kPart, Early, K, NormedInput>()
                              : ShapeOf<Bits, 1, 8, Swiglu, OutT, kPart, Early, K, NormedInput>();
  const auto take = [smem](const Shape& c) {
    Resident(c.kernel, smem);  // allows its shared memory
    return c;
  };
  const int wanted = g_rows.load();
  for (int i = 0; i < count; ++i)
    if (candidates[i].rows == wanted) return take(candidates[i]);
  // candidates[0]: q4's 4-row kernel, q8's 2-row one; candidates[1]: q4's 2-row one
  if (Bits == 4 && (Swiglu || per_lane > 8)) return take(candidates[1]);
  if ((Bits == 4 && n >= kQ4WideFrom) || (Bits == 8 && (!few || n > kQ8WideFrom))) return take(candidates[0]);
  const int sms = lab::Facts(device).sms;
  Shape best = candidates[count - 1];
  int64_t best_cost = -1;
  for (int i = count - 1; i >= (Bits == 4 ? 1 : 0); --i) {  // fewer rows first: ties go to more
    const Shape& c = candidates[i];
    const int64_t slots = int64_t(Resident(c.kernel, smem)) * sms * kWarps;
    const int64_t waves = ((n + c.rows - 1) / c.rows + slots - 1) / slots;
    const int64_t cost = waves * c.rows * ((per_lane + c.groups_per_round - 1) / c.groups_per_round);
    if (best_cost < 0 || cost <= best_cost) best = c, best_cost = cost;
  }
  return best;
}

int SetRows(int rows) {
  if (rows != 0 && rows != 1 && rows != 2 && rows != 4)
    TVM_FFI_THROW(ValueError) << "lab.gemv.rows: " << rows << " is not 0 (the rule), 1, 2 or 4";
  return g_rows.exchange(rows);
}

template <int Bits, bool Swiglu, typename OutT, Part kPart, bool Early, bool NormedInput>
void Launch(int64_t n, int64_t k, const __half* x, const uint32_t* w, const __half* s, OutT* out, Fusion fusion,
            int device, cudaStream_t stream) {
  const int smem = SharedBytes(k);
  // Llama's input widths compiled in (kQ4ConstantK for q4, kDownK)
  Shape shape;
  bool chosen = false;
  if constexpr (Bits == 4) {
    if (k == kQ4ConstantK) shape = Choose<Bits, Swiglu, OutT, kPart, Early, kQ4ConstantK, NormedInput>(n, k, smem, device), chosen = true;
  }
  if (!chosen)
    shape = k == kDownK ? Choose<Bits, Swiglu, OutT, kPart, Early, kDownK, NormedInput>(n, k, smem, device)
                        : Choose<Bits, Swiglu, OutT, kPart, Early, 0, NormedInput>(n, k, smem, device);
  const int64_t outputs = Swiglu ? n / 2 : n;
  const int64_t per_block = int64_t(kWarps) * (Swiglu ? shape.rows / 2 : shape.rows);
  const unsigned blocks = unsigned((outputs + per_block - 1) / per_block);
  int n32 = int(n), k32 = int(k);
  void* args[] = {&x, &w, &s, &out, &n32, &k32, &fusion};
  LAB_CHECK_CUDA(lab::LaunchAfterPrevious(shape.kernel, dim3(blocks), dim3(kWarps * 32), size_t(smem), stream, args,
                                          lab::Facts(device).major));
}

// What a registered function computes (runtime_patch/functions.py GEMV_FUSIONS), and its name.
struct Fused {
  Part part;
  bool swiglu;
  bool normed_input;  // the *_rms functions: x is h * w of a pending RMSNorm (NormSums)
  const char* name;
};

// The pending RMSNorms' sums of a device (NormSums): kSumSites sites of kSumSlots slots.
float* NormSite(int device, int64_t site, cudaStream_t stream, const char* fn) {
  if (site < 0 || site >= kSumSites)
    TVM_FFI_THROW(ValueError) << fn << ": norm site " << site << " is not 0 or 1";
  auto* sums = static_cast<float*>(
      lab::StableBuffer(device, kNormSumsPurpose, int64_t(kSumSites) * kSumSlots * kSumSlotFloats * 4, stream));
  return sums + site * kSumSlots * kSumSlotFloats;
}

// What a GEMV function takes besides x, its weight and out (null where it takes none): the residual
// (add, add_sq), the next norm's weight and `scaled` (add_sq), the site (add_sq, rms) and epsilon (rms).
struct Extra {
  DLTensor* residual = nullptr;
  DLTensor* norm_weight = nullptr;
  DLTensor* scaled = nullptr;
  int64_t site = 0;
  double epsilon = 0.;
};

// Every GEMV function: x [.., K] one row; q_weight [N, K * bits / 32] uint32; q_scale [N, K / 32]
// float16; residual [.., N] float16 or null; out [.., N] (or [.., N / 2] with swiglu) float16, or
// float32 where nothing is added (the LM head). Early: the *_early functions (plain, add, add_sq).
template <int Bits, bool Early>
void Gemv(const Fused& fused, DLTensor* x, DLTensor* w, DLTensor* scale, DLTensor* out, const Extra& extra = {}) {
  const char* fn = fused.name;
  constexpr int per_word = 32 / Bits;
  lab::CheckOnGpuCompact(fn, {x, w, scale, out});
  if (!lab::IsHalf(x->dtype) || w->dtype.code != kDLUInt || w->dtype.bits != 32 || scale->dtype.bits != 16 || w->ndim != 2 ||
      scale->ndim != 2)
    TVM_FFI_THROW(TypeError) << fn << ": expects x float16, q_weight uint32 [N, K/" << per_word
                             << "], q_scale float16 [N, K/32]";
  const int64_t n = w->shape[0], k = w->shape[1] * per_word;
  const int64_t outputs = fused.swiglu ? n / 2 : n;
  if (Rows(x) != 1 || x->shape[x->ndim - 1] != k || scale->shape[0] != n || scale->shape[1] * 32 != k ||
      Rows(out) != 1 || out->shape[out->ndim - 1] != outputs || k % 32 != 0 || (fused.swiglu && n % 2 != 0))
    TVM_FFI_THROW(ValueError) << fn << ": shapes do not agree (one row of x [.., " << x->shape[x->ndim - 1]
                              << "], q_weight [" << n << ", " << w->shape[1] << "], out [.., "
                              << out->shape[out->ndim - 1] << "]" << (fused.swiglu ? ": N / 2 outputs of an even N" : "")
                              << ")";
  if (reinterpret_cast<uintptr_t>(Data<char>(x)) % 16 != 0)
    TVM_FFI_THROW(ValueError) << fn << ": x must be 16-byte aligned";
  const int device = x->device.device_id;
  auto stream = static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, device));
  Fusion fusion;
  const auto one_half_row = [&](const DLTensor* t, const char* what) {
    lab::CheckOnGpuCompact(fn, {t});
    if (!lab::IsHalf(t->dtype) || Rows(t) != 1 || t->shape[t->ndim - 1] != outputs)
      TVM_FFI_THROW(ValueError) << fn << ": " << what << " must be one float16 row of " << outputs;
  };
  if (fused.part == Part::kAdd || fused.part == Part::kAddSquares) {
    one_half_row(extra.residual, "residual");
    fusion.residual = Data<__half>(extra.residual);
  }
  if (fused.part == Part::kAddSquares) {
    one_half_row(extra.norm_weight, "norm_weight");
    one_half_row(extra.scaled, "scaled");
    fusion.norm_weight = Data<__half>(extra.norm_weight);
    fusion.scaled = Data<__half>(extra.scaled);
    fusion.sums = NormSite(device, extra.site, stream, fn);
    fusion.clear = NormSite(device, 1 - extra.site, stream, fn);
  }
  if (fused.normed_input) {
    fusion.sums = NormSite(device, extra.site, stream, fn);
    fusion.epsilon = float(extra.epsilon);
  }
  const bool f32 = out->dtype.code == kDLFloat && out->dtype.bits == 32;
  const bool f32_allowed = fused.part == Part::kProduct && !fused.swiglu;
  if (!lab::IsHalf(out->dtype) && !(f32 && f32_allowed))
    TVM_FFI_THROW(TypeError) << fn << ": out must be float16" << (f32_allowed ? " or float32" : "");
  const auto* xp = Data<__half>(x);
  const auto* wp = Data<uint32_t>(w);
  const auto* sp = Data<__half>(scale);
  // the kernels each function launches (a function is one Fused: the branches it does not take are
  // not compiled for it where Early or the input rule them out)
  const auto launch = [&](auto normed) {
    constexpr bool kNormed = decltype(normed)::value;
    if (fused.part == Part::kAdd) {
      Launch<Bits, false, __half, Part::kAdd, Early, false>(n, k, xp, wp, sp, Data<__half>(out), fusion, device, stream);
    } else if (fused.part == Part::kAddSquares) {
      Launch<Bits, false, __half, Part::kAddSquares, Early, false>(n, k, xp, wp, sp, Data<__half>(out), fusion,
                                                                   device, stream);
    } else if (f32) {
      Launch<Bits, false, float, Part::kProduct, Early, kNormed>(n, k, xp, wp, sp, Data<float>(out), fusion, device,
                                                                 stream);
    } else if (fused.swiglu) {
      if constexpr (Early) {
        TVM_FFI_THROW(InternalError) << fn << ": there is no early SwiGLU GEMV";
      } else {
        Launch<Bits, true, __half, Part::kProduct, false, kNormed>(n, k, xp, wp, sp, Data<__half>(out), fusion, device,
                                                                   stream);
      }
    } else {
      Launch<Bits, false, __half, Part::kProduct, Early, kNormed>(n, k, xp, wp, sp, Data<__half>(out), fusion, device,
                                                                  stream);
    }
  };
  if constexpr (Early) {
    if (fused.normed_input) TVM_FFI_THROW(InternalError) << fn << ": there is no early GEMV of a pending norm";
    launch(std::false_type{});
  } else {
    fused.normed_input ? launch(std::true_type{}) : launch(std::false_type{});
  }
  lab::CheckLaunch(fn);
}

template <int Bits, bool Early>
void GemvPlain(DLTensor* x, DLTensor* w, DLTensor* scale, DLTensor* out) {
  const char* name = Bits == 4 ? (Early ? "lab.gemv.q4_early" : "lab.gemv.q4") : (Early ? "lab.gemv.q8_early" : "lab.gemv.q8");
  Gemv<Bits, Early>({Part::kProduct, false, false, name}, x, w, scale, out);
}

template <int Bits, bool Early>
void GemvAdd(DLTensor* x, DLTensor* w, DLTensor* scale, DLTensor* residual, DLTensor* out) {
  const char* name = Bits == 4 ? (Early ? "lab.gemv.q4_add_early" : "lab.gemv.q4_add")
                               : (Early ? "lab.gemv.q8_add_early" : "lab.gemv.q8_add");
  Extra extra;
  extra.residual = residual;
  Gemv<Bits, Early>({Part::kAdd, false, false, name}, x, w, scale, out, extra);
}

template <int Bits, bool Early>
void GemvAddSquares(DLTensor* x, DLTensor* w, DLTensor* scale, DLTensor* residual, DLTensor* norm_weight, int64_t site,
                    DLTensor* out, DLTensor* scaled) {
  const char* name = Bits == 4 ? (Early ? "lab.gemv.q4_add_sq_early" : "lab.gemv.q4_add_sq")
                               : (Early ? "lab.gemv.q8_add_sq_early" : "lab.gemv.q8_add_sq");
  Extra extra;
  extra.residual = residual, extra.norm_weight = norm_weight, extra.scaled = scaled, extra.site = site;
  Gemv<Bits, Early>({Part::kAddSquares, false, false, name}, x, w, scale, out, extra);
}

template <int Bits>
void GemvSwiglu(DLTensor* x, DLTensor* w, DLTensor* scale, DLTensor* out) {
  Gemv<Bits, false>({Part::kProduct, true, false, Bits == 4 ? "lab.gemv.q4_swiglu" : "lab.gemv.q8_swiglu"}, x, w,
                    scale, out);
}

template <int Bits, bool Swiglu>
void GemvNormed(DLTensor* x, DLTensor* w, DLTensor* scale, int64_t site, double epsilon, DLTensor* out) {
  const char* name = Bits == 4 ? (Swiglu ? "lab.gemv.q4_swiglu_rms" : "lab.gemv.q4_rms")
                               : (Swiglu ? "lab.gemv.q8_swiglu_rms" : "lab.gemv.q8_rms");
  Extra extra;
  extra.site = site, extra.epsilon = epsilon;
  Gemv<Bits, false>({Part::kProduct, Swiglu, true, name}, x, w, scale, out, extra);
}

}  // namespace

TVM_FFI_STATIC_INIT_BLOCK() {
  namespace refl = tvm::ffi::reflection;
  refl::GlobalDef().def("lab.gemv.q4", GemvPlain<4, false>);
  refl::GlobalDef().def("lab.gemv.q8", GemvPlain<8, false>);
  refl::GlobalDef().def("lab.gemv.q4_add", GemvAdd<4, false>);
  refl::GlobalDef().def("lab.gemv.q8_add", GemvAdd<8, false>);
  refl::GlobalDef().def("lab.gemv.q4_early", GemvPlain<4, true>);
  refl::GlobalDef().def("lab.gemv.q8_early", GemvPlain<8, true>);
  refl::GlobalDef().def("lab.gemv.q4_add_early", GemvAdd<4, true>);
  refl::GlobalDef().def("lab.gemv.q8_add_early", GemvAdd<8, true>);
  refl::GlobalDef().def("lab.gemv.rows", SetRows);
  refl::GlobalDef().def("lab.gemv.q4_swiglu", GemvSwiglu<4>);
  refl::GlobalDef().def("lab.gemv.q8_swiglu", GemvSwiglu<8>);
  refl::GlobalDef().def("lab.gemv.q4_add_sq", GemvAddSquares<4, false>);
  refl::GlobalDef().def("lab.gemv.q8_add_sq", GemvAddSquares<8, false>);
  refl::GlobalDef().def("lab.gemv.q4_add_sq_early", GemvAddSquares<4, true>);
  refl::GlobalDef().def("lab.gemv.q8_add_sq_early", GemvAddSquares<8, true>);
  refl::GlobalDef().def("lab.gemv.q4_rms", GemvNormed<4, false>);
  refl::GlobalDef().def("lab.gemv.q8_rms", GemvNormed<8, false>);
  refl::GlobalDef().def("lab.gemv.q4_swiglu_rms", GemvNormed<4, true>);
  refl::GlobalDef().def("lab.gemv.q8_swiglu_rms", GemvNormed<8, true>);
}
