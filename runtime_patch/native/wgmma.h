// Warpgroup MMA (wgmma, sm_90a): the Hopper tensor-core instructions the prefill's quantized GEMM
// (quant_gemm.cu GemmQuantWg) and the fused prefill attention (flash_prefill.cu) use. A warpgroup
// is 4 consecutive warps (128 threads); one wgmma.mma_async multiplies A [64 x 16] by B [16 x N]
// into D [64 x N] float32, A from registers or shared memory, B from shared memory (in shared
// memory each through a descriptor), asynchronously: it is ordered by Fence, grouped by Commit,
// and waited for by Wait.
//
// Fragments of one thread (warp w of the warpgroup, lane l, g = l / 4, c = l % 4; PTX ISA,
// "Asynchronous Warpgroup Level Matrix Multiply-Accumulate"):
//   A [64 x 16], 4 registers of two halfs, warp w holding rows 16 w.. as mma.m16n8k16's A
//     (mma_fragments.h): a0 = (row 16w+g, columns 2c, 2c+1), a1 = (row 16w+g+8, the same),
//     a2 = (row 16w+g, columns 2c+8, 2c+9), a3 = (row 16w+g+8, columns 2c+8, 2c+9);
//   D [64 x N] float, N / 2 registers: d[4j + e] = (row 16w+g, column 8j+2c+e), d[4j + 2 + e] =
//     (row 16w+g+8, column 8j+2c+e), e = 0, 1.
// These compile only for sm_90a (__CUDA_ARCH_FEAT_SM90_ALL); elsewhere the functions trap, and the
// host must not launch a kernel that uses them (lab::Facts' major.minor is 9.0).
#pragma once

#include <cstdint>

namespace lab {
namespace wgmma {

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define LAB_WGMMA 1
#else
#define LAB_WGMMA 0
#endif

// The descriptor of B in shared memory, N rows of 64 float16 (128 bytes: K-major), 16-byte chunks
// permuted in the 128-byte swizzle (chunk c of row r at chunk c ^ (r % 8)) from `address` on (a
// shared-window address; the tile's start 1024-byte aligned, a k16 slice s at + 32 s): rows in
// groups of 8 are 1024 bytes apart (the stride), the leading offset unused.
__device__ __forceinline__ uint64_t SwizzledRowsDescriptor(uint32_t address) {
  return uint64_t((address & 0x3FFFFu) >> 4) | (uint64_t(1) << 16) | (uint64_t(1024 >> 4) << 32) | (uint64_t(1) << 62);
}

// The descriptor of an operand in shared memory whose 64-element (128-byte) rows run along M or N
// (MN-major: B = V [keys, d] of O = P V, the keys being K), 16-byte chunks swizzled as above (chunk
// c of row r at c ^ (r % 8)): a k16 slice's 16 rows (K) from `address` on, 8-row groups 1024 bytes
// apart (the stride), the next 64 columns (M / N) `column_bytes` further (the leading offset).
__device__ __forceinline__ uint64_t SwizzledColumnsDescriptor(uint32_t address, uint32_t column_bytes) {
  return uint64_t((address & 0x3FFFFu) >> 4) | (uint64_t((column_bytes >> 4) & 0x3FFFu) << 16) |
         (uint64_t(1024 >> 4) << 32) | (uint64_t(1) << 62);
}

// Orders the registers' earlier writes (A, D) before the wgmmas after it.
__device__ __forceinline__ void Fence() {
#if LAB_WGMMA
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}

// Closes the group of the wgmmas issued since the last Commit.
__device__ __forceinline__ void Commit() {
#if LAB_WGMMA
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}

// Returns once at most `Pending` committed groups are still running (their registers and shared
// memory are free again).
template <int Pending>
__device__ __forceinline__ void Wait() {
#if LAB_WGMMA
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(Pending) : "memory");
#endif
}

// Orders this thread's generic-proxy writes to shared memory (st.shared, cp.async) before the async
// proxy's reads of it (wgmma's B): each writer calls it, then the block's barrier.
__device__ __forceinline__ void FenceSharedWrites() {
#if LAB_WGMMA
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

#define LAB_WGMMA_D8(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), \
                        "+f"(d[i + 6]), "+f"(d[i + 7])

// d [64 x 128] += a [64 x 16] b [16 x 128], a from registers, b by its descriptor: K-major (B^T's
// rows, SwizzledRowsDescriptor), or with TransposeB MN-major (SwizzledColumnsDescriptor: the
// instruction's transpose-B flag).
template <bool TransposeB = false>
__device__ __forceinline__ void MmaM64N128K16(float (&d)[64], const uint32_t (&a)[4], uint64_t b) {
#if LAB_WGMMA
  asm volatile(
      "{\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "{%64, %65, %66, %67}, %68, 1, 1, 1, %69;\n"
      "}\n"
      : LAB_WGMMA_D8(0), LAB_WGMMA_D8(8), LAB_WGMMA_D8(16), LAB_WGMMA_D8(24), LAB_WGMMA_D8(32), LAB_WGMMA_D8(40),
        LAB_WGMMA_D8(48), LAB_WGMMA_D8(56)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "n"(int(TransposeB)));
#else
  __trap();
#endif
}

// d [64 x 64] (+)= a [64 x 16] b [16 x 64], both by descriptor, K-major (SwizzledRowsDescriptor);
// `accumulate` false overwrites d (the first k16 slice of a product).
__device__ __forceinline__ void MmaM64N64K16SS(float (&d)[32], uint64_t a, uint64_t b, bool accumulate) {
#if LAB_WGMMA
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
      "%32, %33, p, 1, 1, 0, 0;\n"
      "}\n"
      : LAB_WGMMA_D8(0), LAB_WGMMA_D8(8), LAB_WGMMA_D8(16), LAB_WGMMA_D8(24)
      : "l"(a), "l"(b), "r"(int(accumulate)));
#else
  __trap();
#endif
}

#undef LAB_WGMMA_D8

}  // namespace wgmma
}  // namespace lab
