// GPUs visible to this process, asked of the CUDA runtime directly: 0 when there is no driver or
// no device (the multigpu tests then skip).
#pragma once
#include <cuda_runtime.h>

namespace mop::test {

inline int gpu_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

}  // namespace mop::test
