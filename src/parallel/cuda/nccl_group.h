// NcclGroup: a ProcessGroup over DEVICE memory, one CUDA device per rank, on NCCL.
//
// Every operation is enqueued on the group's communication stream (given at construction, not
// owned). Callers order it against their compute streams with events: record an event on the
// compute stream and cudaStreamWaitEvent(group.stream(), ev) before a collective that reads
// what the compute wrote; after an async collective, cudaStreamWaitEvent(compute,
// work->event()) before computing on its output. The CPU never has to wait for that.
//
//   * Blocking operations (ProcessGroup's rules) enqueue and then wait on the host until the
//     operation has finished on the device, so their outputs may be read at once.
//   * *_async operations return an NcclWork at once: wait() is a host wait, event() is for
//     streams. Its destructor does not wait (the operation is stream-ordered); the buffers must
//     stay alive until the work is done by either measure.
//   * send/recv ignore `tag` (NCCL has none; messages between two ranks arrive in order) and,
//     being blocking, pair up like ProcessGroup's: even ranks send first in a ring.
//
// The communicator is non-blocking (ncclConfig_t.blocking = 0): initialisation and every
// enqueue are polled with ncclCommGetAsyncError, and every host wait gives up after the
// group's timeout. On an error or a timeout the communicator is aborted (ncclCommAbort), the
// group is broken, and mop::Error names the group, the rank, the operation and the timeout.
//
// Element types: f32, f64, bf16 (uint16_t storage), f16, i32, i64 through the DType entry
// points; the typed templates of ProcessGroup cover float, double, int32_t and int64_t.
#pragma once
#include <cuda_runtime.h>

#include <array>
#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "parallel/process_group.h"

namespace mop {

struct NcclComm;  // the communicator, shared by the group and its pending works

struct NcclOptions {
  std::string name = "nccl";                   // for error messages
  std::chrono::milliseconds timeout{600'000};  // initialisation and every host wait
};

class NcclWork final : public Work {
 public:
  NcclWork(std::shared_ptr<NcclComm> comm, const char* op);
  ~NcclWork() override;
  NcclWork(const NcclWork&) = delete;
  NcclWork& operator=(const NcclWork&) = delete;

  void wait() override;  // host wait, at most the group's timeout (then aborts and throws)
  bool done() override;
  // Recorded on the communication stream right after the operation.
  cudaEvent_t event() const { return event_; }

 private:
  std::shared_ptr<NcclComm> comm_;
  const char* op_;
  cudaEvent_t event_ = nullptr;
};

class NcclGroup final : public ProcessGroup {
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
  int device() const;
  cudaStream_t stream() const;

  void barrier() override;

  // DType entry points (bf16 included); device pointers; same contracts as ProcessGroup's.
  using ProcessGroup::all_gather;
  using ProcessGroup::all_gather_async;
  using ProcessGroup::all_reduce_sum;
  using ProcessGroup::all_reduce_sum_async;
  using ProcessGroup::all_to_all_v;
  using ProcessGroup::all_to_all_v_async;
  using ProcessGroup::reduce_scatter_sum;
  using ProcessGroup::reduce_scatter_sum_async;
  void all_reduce_sum(void* data, size_t n, DType t) { do_all_reduce_sum(data, n, t); }
  void all_gather(const void* in, size_t n, void* out, DType t) { do_all_gather(in, n, out, t); }
  void reduce_scatter_sum(const void* in, void* out, size_t n, DType t) {
    do_reduce_scatter_sum(in, out, n, t);
  }
  void all_to_all_v(const void* in, const std::vector<size_t>& send_counts, void* out,
                    const std::vector<size_t>& recv_counts, DType t);
  std::unique_ptr<NcclWork> all_reduce_sum_async(void* data, size_t n, DType t);
  std::unique_ptr<NcclWork> all_gather_async(const void* in, size_t n, void* out, DType t);
  std::unique_ptr<NcclWork> reduce_scatter_sum_async(const void* in, void* out, size_t n,
                                                     DType t);
  std::unique_ptr<NcclWork> all_to_all_v_async(const void* in,
                                               const std::vector<size_t>& send_counts,
                                               void* out, const std::vector<size_t>& recv_counts,
                                               DType t);

 protected:
  void do_all_reduce_sum(void* data, size_t n, DType t) override;
  void do_all_gather(const void* in, size_t n, void* out, DType t) override;
  void do_reduce_scatter_sum(const void* in, void* out, size_t n, DType t) override;
  void do_all_to_all_v(const void* in, const std::vector<size_t>& send_counts, void* out,
                       const std::vector<size_t>& recv_counts, DType t) override;
  void do_broadcast(void* data, size_t n, int root, DType t) override;
  void do_send(const void* data, size_t n, int peer, int tag, DType t) override;
  void do_recv(void* data, size_t n, int peer, int tag, DType t) override;

  std::unique_ptr<Work> do_all_reduce_sum_async(void* data, size_t n, DType t) override;
  std::unique_ptr<Work> do_all_gather_async(const void* in, size_t n, void* out,
                                            DType t) override;
  std::unique_ptr<Work> do_reduce_scatter_sum_async(const void* in, void* out, size_t n,
                                                    DType t) override;
  std::unique_ptr<Work> do_all_to_all_v_async(const void* in,
                                              const std::vector<size_t>& send_counts, void* out,
                                              const std::vector<size_t>& recv_counts,
                                              DType t) override;

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
