// Page-locked host memory: a copy between it and the device is asynchronous (a copy to or from
// pageable memory may synchronise the host with the stream).
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>

#include "ops/cuda/check.cuh"

namespace mop {

template <class T> class PinnedHost {
 public:
  PinnedHost() = default;
  explicit PinnedHost(size_t n) : n_(n) {
    if (n > 0) MOP_CUDA_CHECK(cudaMallocHost(reinterpret_cast<void**>(&p_), n * sizeof(T)));
  }
  ~PinnedHost() {
    if (p_) cudaFreeHost(p_);
  }
  PinnedHost(PinnedHost&& o) noexcept : p_(o.p_), n_(o.n_) { o.p_ = nullptr, o.n_ = 0; }
  PinnedHost& operator=(PinnedHost&& o) noexcept {
    if (this != &o) {
      if (p_) cudaFreeHost(p_);
      p_ = o.p_, n_ = o.n_;
      o.p_ = nullptr, o.n_ = 0;
    }
    return *this;
  }
  PinnedHost(const PinnedHost&) = delete;
  PinnedHost& operator=(const PinnedHost&) = delete;
  T* data() const { return p_; }
  size_t size() const { return n_; }

 private:
  T* p_ = nullptr;
  size_t n_ = 0;
};

}  // namespace mop
