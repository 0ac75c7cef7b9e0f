// LAB_CHECK_CUDA: a failed CUDA runtime call becomes a TVM RuntimeError naming the call. Shared by
// every plugin with CUDA code (cuda_common.h for the CUDA plugins, nccl_overlap.cc).
#pragma once

#include <cuda_runtime.h>
#include <tvm/ffi/error.h>

#define LAB_CHECK_CUDA(expr)                                                               \
  do {                                                                                     \
    cudaError_t err_ = (expr);                                                             \
    if (err_ != cudaSuccess)                                                               \
      TVM_FFI_THROW(RuntimeError) << #expr << " failed: " << cudaGetErrorString(err_);     \
  } while (0)
