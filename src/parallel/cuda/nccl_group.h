// NcclGroup: a DeviceGroup (parallel/cuda/device_group.h) on NCCL, one CUDA device per rank.
//
// Every operation is enqueued on the group's communication stream (device_group.h's rules).
//   * send/recv ignore `tag` (NCCL has none; messages between two ranks arrive in order) and,
//     being blocking, pair up like ProcessGroup's: even ranks send first in a ring.
//
// The communicator is non-blocking (ncclConfig_t.blocking = 0): initialisation and every
// enqueue are polled with ncclCommGetAsyncError, and every host wait gives up after the
// group's timeout. On an error or a timeout the communicator is aborted (ncclCommAbort), the
// group is broken, and mop::Error names the group, the rank, the operation and the timeout.
#pragma once
#include <cuda_runtime.h>

#include <array>
#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "parallel/cuda/device_group.h"

namespace mop {

struct NcclComm;  // the communicator, shared by the group and its pending works

struct NcclOptions {
  std::string name = "nccl";                   // for error messages
  std::chrono::milliseconds timeout{600'000};  // initialisation and every host wait
};

class NcclWork final : public DeviceWork {
 public:
  NcclWork(std::shared_ptr<NcclComm> comm, const char* op);
  ~NcclWork() override;
  NcclWork(const NcclWork&) = delete;
  NcclWork& operator=(const NcclWork&) = delete;

  void wait() override;  // host wait, at most the group's timeout (then aborts and throws)
  bool done() override;
  cudaEvent_t event() const override { return event_; }

 private:
  std::shared_ptr<NcclComm> comm_;
  const char* op_;
  cudaEvent_t event_ = nullptr;
};

class NcclGroup final : public DeviceGroup {
 public:
  using UniqueId = std::array<char, 128>;  // NCCL_UNIQUE_ID_BYTES
  // Made by one rank (ncclGetUniqueId) and given to all the others.
  static UniqueId new_unique_id();

  // Collective: all `size` ranks construct it with the same id; blocks until they all have.
  // `device` is this rank's CUDA device; `stream` belongs to it.
  NcclGroup(int rank, int size, const UniqueId& id, int device, cudaStream_t stream,
            const NcclOptions& opt);
  ~NcclGroup() override;
  NcclGroup(const NcclGroup&) = delete;
  NcclGroup& operator=(const NcclGroup&) = delete;

  int rank() const override;
  int size() const override;
  const std::string& name() const override;
  int device() const override;
  cudaStream_t stream() const override;

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
  // Enqueues fn (NCCL calls on the stream) and returns a work whose event follows it.
  template <class F> std::unique_ptr<NcclWork> launch(const char* op, F&& fn);
  template <class F> void run_blocking(const char* op, F&& fn) { launch(op, fn)->wait(); }

  std::shared_ptr<NcclComm> comm_;
  void* barrier_word_ = nullptr;  // one float on the device, summed by barrier()
};

// An NcclGroup over the ranks of `host` (same rank and size), e.g. a Groups member: rank 0
// makes the unique id and broadcasts it over `host` as 16 int64 words. Collective over `host`.
std::unique_ptr<NcclGroup> make_nccl_group(ProcessGroup& host, int device, cudaStream_t stream,
                                           const NcclOptions& opt);

}  // namespace mop
