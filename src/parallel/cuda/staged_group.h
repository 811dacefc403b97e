// StagedGroup: a DeviceGroup (parallel/cuda/device_group.h) that moves device buffers through
// host memory and runs the collective on a host ProcessGroup (Gloo). NCCL refuses two ranks on one
// GPU; this group does not, so several ranks can share a GPU: the multi-rank GPU code paths run and
// are checked against the single-rank run on a machine with one GPU. It is slow (every operation
// crosses PCIe twice and runs on the CPU) and meant for tests and debugging.
//
// It is asynchronous the way NCCL is, so that a missing event between the compute and the
// communication streams shows up on one GPU as it would on several:
//   stream:  copy the input to page-locked memory | signal the worker | wait for the worker's
//            counter (a one-thread kernel, parallel/cuda/host_counter.h) | copy the result back
//   worker:  one thread per group, operations in call order: waits for the stream's signal, runs
//            the host collective, stores the counter.
// The enqueueing thread never waits, and later work on the stream waits on the device. Environment
// MOP_STAGED_LAG_US = N delays every operation N microseconds more on the worker, which widens the
// windows in which a missing dependency corrupts data (tests set it).
//
// Reductions of bf16 and f16 are summed in fp32 on the host and rounded once to nearest even (what
// NCCL does for two ranks). Timeouts and dead peers are the host group's (Gloo: parallel.timeout_s);
// a stream that does not reach an operation within `timeout` is an error too. After an error the
// group is broken: later operations throw it.
#pragma once
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "ops/cuda/pinned.h"
#include "parallel/cuda/device_group.h"
#include "parallel/cuda/host_counter.h"
#include "parallel/work_queue.h"

namespace mop {

class StagedGroup final : public DeviceGroup {
 public:
  // host: a group over the same ranks (same rank and size) that only this group uses, from its
  // worker thread (Groups::twin makes one). device: this rank's CUDA device; stream on it.
  StagedGroup(std::unique_ptr<ProcessGroup> host, int device, cudaStream_t stream, std::string name,
              std::chrono::milliseconds timeout);
  ~StagedGroup() override;  // waits for the operations in flight

  int rank() const override { return host_->rank(); }
  int size() const override { return host_->size(); }
  const std::string& name() const override { return name_; }
  int device() const override { return device_; }
  cudaStream_t stream() const override { return stream_; }
  void barrier() override;

  struct Op;  // one operation in flight (staged_group.cpp)

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
  // The host part of an operation: `in` holds the staged input, `out` receives the result.
  using HostPart = std::function<void(ProcessGroup& host, const char* in, char* out)>;
  std::unique_ptr<DeviceWork> stage(const char* what, const void* in, size_t in_bytes, void* out, size_t out_bytes,
                                    HostPart part);
  void run_on_worker(Op& op);
  PinnedHost<char> take_buffer(size_t bytes);
  void recycle();  // the buffers of finished operations back to the pool
  static void mark_ready(void* op);

  std::unique_ptr<ProcessGroup> host_;
  int device_;
  cudaStream_t stream_;
  std::string name_;
  std::chrono::milliseconds timeout_;
  std::chrono::microseconds lag_{0};

  HostCounter done_;        // the last operation the worker finished
  uint32_t enqueued_ = 0;   // sequence number of the last operation enqueued
  std::mutex mu_;           // guards ready_, error_
  std::condition_variable ready_cv_;
  uint32_t ready_ = 0;      // the last operation whose input the stream has staged
  std::exception_ptr error_;
  std::deque<std::shared_ptr<Op>> in_flight_;
  std::vector<PinnedHost<char>> pool_;
  WorkQueue worker_;        // last: destroyed (drained and joined) first
};

}  // namespace mop
