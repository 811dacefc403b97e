// DeviceGroup: a ProcessGroup over DEVICE memory whose operations are ordered on a CUDA stream.
//
// Two implementations: NcclGroup (parallel/cuda/nccl_group.h; one GPU per rank, the data path)
// and StagedGroup (parallel/cuda/staged_group.h; copies through host memory and a host group,
// for ranks that share a GPU, which NCCL refuses: tests and debugging on one GPU).
//
// Every operation is enqueued on the group's stream (given at construction, not owned). Callers
// order it against their compute streams with events: record an event on the compute stream and
// cudaStreamWaitEvent(group.stream(), ev) before a collective that reads what the compute wrote;
// after an async collective, cudaStreamWaitEvent(compute, work->event()) before computing on its
// output.
//   * Blocking operations (ProcessGroup's rules) return when the operation has finished on the
//     device, so their outputs may be read at once.
//   * *_async operations return a DeviceWork: wait() is a host wait (bounded by the group's
//     timeout), event() is for streams. Its destructor does not wait (the operation is
//     stream-ordered); the buffers must stay alive until the work is done by either measure.
//
// Element types: f32, f64, bf16 (uint16_t storage), f16, i32, i64 through the DType entry points;
// the typed templates of ProcessGroup cover float, double, int32_t and int64_t.
#pragma once
#include <cuda_runtime_api.h>

#include <memory>
#include <vector>

#include "parallel/process_group.h"

namespace mop {

class DeviceWork : public Work {
 public:
  // Recorded on the group's stream right after the operation.
  virtual cudaEvent_t event() const = 0;
};

class DeviceGroup : public ProcessGroup {
 public:
  virtual int device() const = 0;
  virtual cudaStream_t stream() const = 0;
  // False for a group that only times (SkipGroup): callers needing the data fall back to a host group.
  virtual bool moves_data() const { return true; }

  using ProcessGroup::all_gather;
  using ProcessGroup::all_gather_async;
  using ProcessGroup::all_reduce_sum;
  using ProcessGroup::all_reduce_sum_async;
  using ProcessGroup::all_to_all_v;
  using ProcessGroup::all_to_all_v_async;
  using ProcessGroup::reduce_scatter_sum;
  using ProcessGroup::reduce_scatter_sum_async;
  // DType entry points (bf16 included); device pointers; ProcessGroup's contracts. In-place
  // variants are allowed as NCCL allows them: all_gather with in == out + rank() * n,
  // reduce_scatter_sum with out == in + rank() * n.
  void all_reduce_sum(void* data, size_t n, DType t) { all_reduce_sum_async(data, n, t)->wait(); }
  void all_gather(const void* in, size_t n, void* out, DType t) { all_gather_async(in, n, out, t)->wait(); }
  void reduce_scatter_sum(const void* in, void* out, size_t n, DType t) {
    reduce_scatter_sum_async(in, out, n, t)->wait();
  }
  void all_to_all_v(const void* in, const std::vector<size_t>& send_counts, void* out,
                    const std::vector<size_t>& recv_counts, DType t) {
    all_to_all_v_async(in, send_counts, out, recv_counts, t)->wait();
  }
  std::unique_ptr<DeviceWork> all_reduce_sum_async(void* data, size_t n, DType t) {
    return enqueue_all_reduce_sum(data, n, t);
  }
  std::unique_ptr<DeviceWork> all_gather_async(const void* in, size_t n, void* out, DType t) {
    return enqueue_all_gather(in, n, out, t);
  }
  std::unique_ptr<DeviceWork> reduce_scatter_sum_async(const void* in, void* out, size_t n, DType t) {
    return enqueue_reduce_scatter_sum(in, out, n, t);
  }
  std::unique_ptr<DeviceWork> all_to_all_v_async(const void* in, const std::vector<size_t>& send_counts, void* out,
                                                 const std::vector<size_t>& recv_counts, DType t) {
    return enqueue_all_to_all_v(in, send_counts, out, recv_counts, t);
  }

 protected:
  // What an implementation provides: enqueue on stream() and return the operation's work.
  virtual std::unique_ptr<DeviceWork> enqueue_all_reduce_sum(void* data, size_t n, DType t) = 0;
  virtual std::unique_ptr<DeviceWork> enqueue_all_gather(const void* in, size_t n, void* out, DType t) = 0;
  virtual std::unique_ptr<DeviceWork> enqueue_reduce_scatter_sum(const void* in, void* out, size_t n, DType t) = 0;
  virtual std::unique_ptr<DeviceWork> enqueue_all_to_all_v(const void* in, const std::vector<size_t>& send_counts,
                                                           void* out, const std::vector<size_t>& recv_counts,
                                                           DType t) = 0;

  void do_all_reduce_sum(void* data, size_t n, DType t) override { all_reduce_sum(data, n, t); }
  void do_all_gather(const void* in, size_t n, void* out, DType t) override { all_gather(in, n, out, t); }
  void do_reduce_scatter_sum(const void* in, void* out, size_t n, DType t) override {
    reduce_scatter_sum(in, out, n, t);
  }
  void do_all_to_all_v(const void* in, const std::vector<size_t>& send_counts, void* out,
                       const std::vector<size_t>& recv_counts, DType t) override {
    all_to_all_v(in, send_counts, out, recv_counts, t);
  }
  // Through the ProcessGroup interface every error, enqueue errors included, comes out of wait().
  std::unique_ptr<Work> do_all_reduce_sum_async(void* data, size_t n, DType t) override {
    return deferred([&] { return all_reduce_sum_async(data, n, t); });
  }
  std::unique_ptr<Work> do_all_gather_async(const void* in, size_t n, void* out, DType t) override {
    return deferred([&] { return all_gather_async(in, n, out, t); });
  }
  std::unique_ptr<Work> do_reduce_scatter_sum_async(const void* in, void* out, size_t n, DType t) override {
    return deferred([&] { return reduce_scatter_sum_async(in, out, n, t); });
  }
  std::unique_ptr<Work> do_all_to_all_v_async(const void* in, const std::vector<size_t>& send_counts, void* out,
                                              const std::vector<size_t>& recv_counts, DType t) override {
    return deferred([&] { return all_to_all_v_async(in, send_counts, out, recv_counts, t); });
  }

 private:
  template <class F> static std::unique_ptr<Work> deferred(F&& fn) {
    try {
      return fn();
    } catch (...) {
      return std::make_unique<CompletedWork>(std::current_exception());
    }
  }
};

}  // namespace mop
