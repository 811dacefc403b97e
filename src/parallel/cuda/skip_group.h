// SkipGroup: a DeviceGroup whose collectives move nothing (parallel.gpu_comm = skip). For timing
// only: a step with every device collective skipped, next to the same step with them, is how much
// of the step the communication leaves exposed. Results are wrong by construction (outputs keep
// whatever the buffers held); the host-side exchanges (routing counts, statistics) still run.
#pragma once
#include <cuda_runtime.h>

#include <string>
#include <utility>

#include "parallel/cuda/device_group.h"
#include "parallel/cuda/event_work.h"

namespace mop {

class SkipGroup final : public DeviceGroup {
 public:
  SkipGroup(int rank, int size, int device, cudaStream_t stream, std::string name)
      : rank_(rank), size_(size), device_(device), stream_(stream), name_(std::move(name)) {}
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const std::string& name() const override { return name_; }
  int device() const override { return device_; }
  cudaStream_t stream() const override { return stream_; }
  bool moves_data() const override { return false; }
  void barrier() override {}

 protected:
  std::unique_ptr<DeviceWork> enqueue_all_reduce_sum(void*, size_t, DType) override { return work(); }
  std::unique_ptr<DeviceWork> enqueue_all_gather(const void*, size_t, void*, DType) override { return work(); }
  std::unique_ptr<DeviceWork> enqueue_reduce_scatter_sum(const void*, void*, size_t, DType) override { return work(); }
  std::unique_ptr<DeviceWork> enqueue_all_to_all_v(const void*, const std::vector<size_t>&, void*,
                                                 const std::vector<size_t>&, DType) override {
    return work();
  }
  void do_broadcast(void*, size_t, int, DType) override {}
  void do_send(const void*, size_t, int, int, DType) override {}
  void do_recv(void*, size_t, int, int, DType) override {}

 private:
  std::unique_ptr<DeviceWork> work() { return std::make_unique<EventWork>(stream_); }

  int rank_, size_, device_;
  cudaStream_t stream_;
  std::string name_;
};

}  // namespace mop
