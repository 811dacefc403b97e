#include "parallel/cuda/host_counter.h"

#include "ops/cuda/check.cuh"

namespace mop {

namespace {

__global__ void wait_counter_kernel(const volatile uint32_t* counter, uint32_t target) {
  // Wrap-safe "counter >= target" for a counter that only grows.
  while (int32_t(*counter - target) < 0) __nanosleep(1000);
}

}  // namespace

HostCounter::HostCounter() {
  MOP_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&host_), sizeof(uint32_t), cudaHostAllocMapped | cudaHostAllocPortable));
  *host_ = 0;
  MOP_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&dev_), host_, 0));
}

HostCounter::~HostCounter() {
  if (host_) cudaFreeHost(host_);
}

void HostCounter::store(uint32_t v) { __atomic_store_n(host_, v, __ATOMIC_RELEASE); }

void HostCounter::stream_wait(uint32_t target, cudaStream_t stream) const {
  wait_counter_kernel<<<1, 1, 0, stream>>>(dev_, target);
  MOP_CUDA_CHECK(cudaGetLastError());
}

}  // namespace mop
