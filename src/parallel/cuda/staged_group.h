// StagedGroup: a DeviceGroup (parallel/cuda/device_group.h) that moves device buffers through
// host memory and runs the collective on a host ProcessGroup (Gloo). NCCL refuses two ranks on one
// GPU; this group does not, so several ranks can share a GPU: the multi-rank GPU code paths run and
// are checked against the single-rank run on a machine with one GPU. It is slow (every operation
// synchronises the stream and copies twice over PCIe) and meant for tests and debugging.
//
// Reductions of bf16 and f16 are summed in fp32 on the host and rounded once to nearest even (what
// NCCL does for two ranks). Every operation is complete on the stream when it returns; works are
// already done. Timeouts and dead peers are the host group's (Gloo: parallel.timeout_s).
#pragma once
#include <string>
#include <vector>

#include "parallel/cuda/device_group.h"

namespace mop {

class StagedGroup final : public DeviceGroup {
 public:
  // host: the same ranks (same rank and size). device: this rank's CUDA device; stream on it.
  StagedGroup(ProcessGroup& host, int device, cudaStream_t stream, std::string name);
  ~StagedGroup() override = default;

  int rank() const override { return host_.rank(); }
  int size() const override { return host_.size(); }
  const std::string& name() const override { return name_; }
  int device() const override { return device_; }
  cudaStream_t stream() const override { return stream_; }
  void barrier() override;


 protected:
  std::unique_ptr<DeviceWork> enqueue_all_reduce_sum(void* data, size_t n, DType t) override;
  std::unique_ptr<DeviceWork> enqueue_all_gather(const void* in, size_t n, void* out, DType t) override;
  std::unique_ptr<DeviceWork> enqueue_reduce_scatter_sum(const void* in, void* out, size_t n, DType t) override;
  std::unique_ptr<DeviceWork> enqueue_all_to_all_v(const void* in, const std::vector<size_t>& send_counts, void* out,
                                                   const std::vector<size_t>& recv_counts, DType t) override;
  void do_broadcast(void* data, size_t n, int root, DType t) override;
  void do_send(const void* data, size_t n, int peer, int tag, DType t) override;
  void do_recv(void* data, size_t n, int peer, int tag, DType t) override;

 private:
  std::unique_ptr<DeviceWork> done_work();  // an event recorded on the stream now

  ProcessGroup& host_;
  int device_;
  cudaStream_t stream_;
  std::string name_;
};

}  // namespace mop
