#include <cstdio>
#include <string>

#include "core/alloc.h"
#include "ops/cuda/check.cuh"
#include "ops/cuda/runtime.h"

namespace mop::cuda {

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return n;
}

namespace {
void* device_alloc(size_t bytes) {
  void* p = nullptr;
  if (cudaMalloc(&p, bytes) != cudaSuccess) {
    cudaGetLastError();
    return nullptr;
  }
  return p;
}
void device_free(void* p) { cudaFree(p); }
}  // namespace

void install_alloc_hooks() {
  DeviceAllocHooks& h = device_alloc_hooks();
  h.alloc = device_alloc;
  h.free = device_free;
}

const char* device_description() {
  static std::string desc;
  if (device_count() == 0) return "no CUDA device";
  cudaDeviceProp prop{};
  MOP_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  desc = fmt::format("{} (sm_{}{}, {:.1f} GiB)", prop.name, prop.major, prop.minor,
                     double(prop.totalGlobalMem) / double(1ull << 30));
  return desc.c_str();
}

}  // namespace mop::cuda
