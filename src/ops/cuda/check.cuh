// One error-check macro family for CUDA calls: throws mop::Error naming the call.
#pragma once
#include <cuda_runtime.h>

#include "core/error.h"

#define MOP_CUDA_CHECK(call)                                                                      \
  do {                                                                                           \
    cudaError_t err_ = (call);                                                                   \
    if (err_ != cudaSuccess) [[unlikely]]                                                        \
      throw ::mop::Error(::fmt::format("CUDA error {} ({}) in {}", cudaGetErrorName(err_),       \
                                       cudaGetErrorString(err_), #call),                         \
                         __FILE__, __LINE__);                                                    \
  } while (0)

// After a kernel launch: reports a bad launch configuration at the launch site.
#define MOP_CUDA_LAUNCH_CHECK() MOP_CUDA_CHECK(cudaGetLastError())
