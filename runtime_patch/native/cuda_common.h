// Helpers shared by runtime_patch's CUDA plugins (runtime_patch/native/build.py CUDA_PLUGINS): error
// checks (a tensor's device and layout, a launch), the cuBLAS handle of a (thread, device) (not in plugins built without cuBLAS:
// LAB_NO_CUBLAS), a device's SM count and compute capability, a kernel's resident blocks, reading
// DLTensors, device buffers that a captured graph may keep, and programmatic dependent launch. Each
// plugin compiles its own copy (inline).
#pragma once

#ifndef LAB_NO_CUBLAS
#include <cublas_v2.h>
#endif
#include <cuda_runtime.h>
#include <dlpack/dlpack.h>
#include <tvm/ffi/error.h>

#include <cstdint>
#include <initializer_list>
#include <map>
#include <tuple>
#include <unordered_map>

#include "cuda_check.h"

namespace lab {

#ifndef LAB_NO_CUBLAS
inline const char* CublasStatusName(cublasStatus_t s) {
  switch (s) {
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    default: return "cuBLAS error";
  }
}

#define LAB_CHECK_CUBLAS(expr)                                                             \
  do {                                                                                     \
    cublasStatus_t status_ = (expr);                                                       \
    if (status_ != CUBLAS_STATUS_SUCCESS)                                                  \
      TVM_FFI_THROW(RuntimeError) << #expr << " failed: " << lab::CublasStatusName(status_); \
  } while (0)

// One handle per (thread, device): cuBLAS handles are not thread-safe, and a disco worker is one
// thread on one device.
inline cublasHandle_t CublasHandle(int device) {
  thread_local std::unordered_map<int, cublasHandle_t> handles;
  auto it = handles.find(device);
  if (it != handles.end()) return it->second;
  int previous = 0;
  cudaGetDevice(&previous);
  cudaSetDevice(device);
  cublasHandle_t handle = nullptr;
  LAB_CHECK_CUBLAS(cublasCreate(&handle));
  cudaSetDevice(previous);
  handles.emplace(device, handle);
  return handle;
}
#endif  // LAB_NO_CUBLAS

// What a plugin sizes its launches by: the SM count and the compute capability, asked once per
// (thread, device) (a disco worker is one thread on one device).
struct DeviceFacts {
  int sms = 0, major = 0, minor = 0;
};

inline const DeviceFacts& Facts(int device) {
  thread_local std::unordered_map<int, DeviceFacts> facts;
  auto it = facts.find(device);
  if (it != facts.end()) return it->second;
  DeviceFacts f;
  LAB_CHECK_CUDA(cudaDeviceGetAttribute(&f.sms, cudaDevAttrMultiProcessorCount, device));
  LAB_CHECK_CUDA(cudaDeviceGetAttribute(&f.major, cudaDevAttrComputeCapabilityMajor, device));
  LAB_CHECK_CUDA(cudaDeviceGetAttribute(&f.minor, cudaDevAttrComputeCapabilityMinor, device));
  return facts.emplace(device, f).first->second;
}

// Resident blocks per SM of `kernel` launched with `threads` threads and `smem` bytes of dynamic
// shared memory (asked once per kernel, shape and thread: a disco worker is one thread on one
// device); the kernel is first allowed `smem` where that is above what it allows now (by default
// 48 KiB less its static shared memory; the allowance is only ever raised, so a launch of a size
// asked before stays allowed). 0 where a block does not fit an SM.
inline int ResidentBlocks(const void* kernel, int threads, int smem) {
  thread_local std::map<std::tuple<const void*, int, int>, int> resident;
  const auto key = std::make_tuple(kernel, threads, smem);
  auto it = resident.find(key);
  if (it != resident.end()) return it->second;
  cudaFuncAttributes attributes{};
  LAB_CHECK_CUDA(cudaFuncGetAttributes(&attributes, kernel));
  if (smem > attributes.maxDynamicSharedSizeBytes)
    LAB_CHECK_CUDA(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  int blocks = 0;
  LAB_CHECK_CUDA(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, smem));
  return resident.emplace(key, blocks).first->second;
}

// Blocks of a grid-stride kernel (no dynamic shared memory) over `items` items, `threads` a block,
// one item a thread a stride: as many as are resident on all SMs of `device` at once, no more than
// the items need, at least 1.
inline int64_t GridStrideBlocks(const void* kernel, int threads, int64_t items, int device) {
  const int64_t resident = int64_t(ResidentBlocks(kernel, threads, 0)) * Facts(device).sms;
  return std::max<int64_t>(1, std::min<int64_t>(resident, (items + threads - 1) / threads));
}

// Row-major with no gaps (strides of size-1 dimensions do not matter).
inline bool IsCompact(const DLTensor* t) {
  if (t->strides == nullptr) return true;
  int64_t expected = 1;
  for (int i = t->ndim - 1; i >= 0; --i) {
    if (t->shape[i] != 1 && t->strides[i] != expected) return false;
    expected *= t->shape[i];
  }
  return true;
}

// The product of all dimensions but the last: the rows of a [..., K] tensor.
inline int64_t Rows(const DLTensor* t) {
  int64_t rows = 1;
  for (int i = 0; i < t->ndim - 1; ++i) rows *= t->shape[i];
  return rows;
}

inline bool IsHalf(DLDataType d) { return d.code == kDLFloat && d.bits == 16 && d.lanes == 1; }

// Every tensor on a CUDA device and compact, or an error naming `fn`.
inline void CheckOnGpuCompact(const char* fn, std::initializer_list<const DLTensor*> tensors) {
  for (const DLTensor* t : tensors) {
    if (t->device.device_type != kDLCUDA) TVM_FFI_THROW(ValueError) << fn << ": a tensor is not on a CUDA device";
    if (!IsCompact(t)) TVM_FFI_THROW(ValueError) << fn << ": a tensor is not compact";
  }
}

// The last kernel launch's error, if any, as an error naming `fn`.
inline void CheckLaunch(const char* fn) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) TVM_FFI_THROW(RuntimeError) << fn << ": launch failed: " << cudaGetErrorString(err);
}

// The first element, byte_offset applied.
template <typename T>
T* Data(const DLTensor* t) {
  return reinterpret_cast<T*>(static_cast<char*>(t->data) + t->byte_offset);
}

// A device buffer for a function captured into a CUDA graph (the graph keeps its address), made at
// the function's first call of a shape, which TVM runs before capturing (its warm-up run); an error
// naming the fix while a capture is under way.
inline void* NewBufferOutsideCapture(int64_t bytes, cudaStream_t stream) {
  cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
  LAB_CHECK_CUDA(cudaStreamIsCapturing(stream, &capturing));
  if (capturing != cudaStreamCaptureStatusNone)
    TVM_FFI_THROW(RuntimeError) << "lab: a buffer of " << bytes << " bytes is first needed while a CUDA graph is "
                                << "being captured; call the function once before capturing";
  void* data = nullptr;
  LAB_CHECK_CUDA(cudaMalloc(&data, bytes));
  return data;
}

// A zeroed device buffer that never moves once made, one per (thread, device, purpose, size) in
// each plugin (a disco worker is one thread on one device; a plugin numbers its own purposes).
inline void* StableBuffer(int device, int purpose, int64_t bytes, cudaStream_t stream) {
  thread_local std::map<std::tuple<int, int, int64_t>, void*> buffers;
  const auto key = std::make_tuple(device, purpose, bytes);
  auto it = buffers.find(key);
  if (it != buffers.end()) return it->second;
  void* data = NewBufferOutsideCapture(bytes, stream);
  LAB_CHECK_CUDA(cudaMemsetAsync(data, 0, bytes, stream));
  buffers.emplace(key, data);
  return data;
}

// Programmatic dependent launch (compute capability 9.0 and newer). A kernel launched by
// LaunchAfterPrevious may start before the kernel ahead of it on the stream has finished: once every
// block of that kernel has called AllowNext or exited. Until WaitForPrevious it may only do work that
// depends on nothing an earlier kernel writes (a GEMV's weight loads); reading what an earlier kernel
// writes, and writing what it reads, come after WaitForPrevious, which returns once the earlier
// kernels have finished and their writes are visible. A kernel that calls AllowNext early lets its
// successor's blocks take the SMs it leaves free (and load their constants) while it runs; one that
// does not lets the successor start only as its own blocks exit. In a captured CUDA graph the
// dependency becomes a programmatic edge. On older GPUs the attribute is left out and both device
// calls are no-ops.
// The launch attribute that makes a launch one of these (for launches that need other attributes
// beside it, e.g. a thread-block cluster's).
inline cudaLaunchAttribute AfterPreviousAttribute() {
  cudaLaunchAttribute attribute = {};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  return attribute;
}

inline cudaError_t LaunchAfterPrevious(const void* kernel, dim3 grid, dim3 block, size_t shared_bytes,
                                       cudaStream_t stream, void** args, int device_major) {
  cudaLaunchAttribute attribute[1] = {AfterPreviousAttribute()};
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = shared_bytes;
  config.stream = stream;
  config.attrs = attribute;
  config.numAttrs = device_major >= 9 ? 1 : 0;
  return cudaLaunchKernelExC(&config, kernel, args);
}

#ifdef __CUDACC__
__device__ __forceinline__ void WaitForPrevious() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void AllowNext() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}
#endif  // __CUDACC__

}  // namespace lab
