// A counter in page-locked host memory that a host thread advances and CUDA streams wait on: the
// device side of an operation completed by a host thread (StagedGroup), without blocking the host
// thread that enqueued it or CUDA's host-callback thread.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace mop {

class HostCounter {
 public:
  HostCounter();  // starts at 0; needs a current CUDA device
  ~HostCounter();
  HostCounter(const HostCounter&) = delete;
  HostCounter& operator=(const HostCounter&) = delete;

  // Host: publishes `v` (after every host write made before it, e.g. a result to copy).
  void store(uint32_t v);
  // Enqueues on `stream` a wait until the counter is at least `target` (a one-thread kernel that
  // polls the mapped memory; later work on the stream starts after it).
  void stream_wait(uint32_t target, cudaStream_t stream) const;

 private:
  uint32_t* host_ = nullptr;  // mapped page-locked memory
  uint32_t* dev_ = nullptr;   // its device address
};

}  // namespace mop
