// ProcessGroup: a fixed set of ranks that run collectives together, on host memory.
//
// Rules every caller must follow:
//   * A blocking collective returns when this rank's part is complete (its output holds the
//     result and its input may be reused).
//   * An *_async collective returns a Work at once; the buffers belong to the operation until
//     Work::wait() returns (or Work::done() says true). Destroying a Work never cancels the
//     operation (the peers are taking part): on the host backend it waits for it; NcclWork's
//     leaves it ordered on the communication stream (parallel/cuda/nccl_group.h).
//   * Every rank of the group must call the same collectives, in the same order, with matching
//     arguments (same n, same root, send_counts on one rank matching recv_counts on the peer).
//     Blocking and async calls count alike: the order is the order of the calls, not of the
//     waits. A mismatch is not detected in general: it hangs until the timeout or corrupts data.
//   * A group is used by one thread at a time. Async operations run in call order on the
//     group's own worker (Gloo) or stream (NCCL); a blocking call made while async work is
//     pending runs after it (it waits for it first). Two groups over the same ranks are
//     independent and may be used from different threads.
//   * After an operation throws (timeout, peer gone), the group is broken: later operations
//     on it throw at once. Make a new group.
//
// Supported element types: float, double, int32_t, int64_t. Data pointers are host memory
// (device memory for NcclGroup, see parallel/cuda/nccl_group.h). Counts are in elements.
// For n == 0 a collective does nothing (every rank must pass 0).
#pragma once
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "core/dtype.h"
#include "core/error.h"

namespace mop {

template <class T>
concept CollectiveType = std::same_as<T, float> || std::same_as<T, double> ||
                         std::same_as<T, int32_t> || std::same_as<T, int64_t>;

// A pending operation. wait() blocks the calling thread until it has finished and rethrows its
// error (every time it is called); done() never blocks.
class Work {
 public:
  virtual ~Work() = default;
  virtual void wait() = 0;
  virtual bool done() = 0;
};

// A Work that finished before it was returned (the default for backends without overlap).
class CompletedWork final : public Work {
 public:
  explicit CompletedWork(std::exception_ptr error = nullptr) : error_(std::move(error)) {}
  void wait() override {
    if (error_) std::rethrow_exception(error_);
  }
  bool done() override { return true; }

 private:
  std::exception_ptr error_;
};

class ProcessGroup {
 public:
  virtual ~ProcessGroup() = default;

  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual const std::string& name() const = 0;

  // data[0..n) <- elementwise sum over ranks of data[0..n). In place.
  template <CollectiveType T> void all_reduce_sum(T* data, size_t n) {
    do_all_reduce_sum(data, n, dtype_of<T>());
  }

  // out[r*n .. (r+1)*n) <- in[0..n) of rank r. `out` holds size()*n elements; in and out
  // must not overlap.
  template <CollectiveType T> void all_gather(const T* in, size_t n, T* out) {
    do_all_gather(in, n, out, dtype_of<T>());
  }

  // `in` holds size()*n elements; out[0..n) <- sum over ranks of in[rank()*n .. (rank()+1)*n).
  template <CollectiveType T> void reduce_scatter_sum(const T* in, T* out, size_t n) {
    do_reduce_scatter_sum(in, out, n, dtype_of<T>());
  }

  // Personalised exchange. send_counts[p] elements go from this rank to rank p, taken from
  // `in` in rank order (rows for rank 0 first, then rank 1, ...). recv_counts[p] elements
  // arrive from rank p into `out`, also in rank order. Both vectors have size() entries;
  // recv_counts[p] on this rank must equal send_counts[rank()] on rank p. Any count may be 0
  // (all of them too). in and out must not overlap.
  template <CollectiveType T>
  void all_to_all_v(const T* in, const std::vector<size_t>& send_counts, T* out,
                    const std::vector<size_t>& recv_counts) {
    check_counts(send_counts, recv_counts);
    do_all_to_all_v(in, send_counts, out, recv_counts, dtype_of<T>());
  }

  // data[0..n) on every rank <- data[0..n) of rank `root`.
  template <CollectiveType T> void broadcast(T* data, size_t n, int root) {
    MOP_CHECK(root >= 0 && root < size(), "process group '{}': broadcast root {} not in [0, {})",
              name(), root, size());
    do_broadcast(data, n, root, dtype_of<T>());
  }

  // Point to point. send() may block until `peer` has posted the matching recv() (rendezvous,
  // like MPI_Ssend), so order them so that every send meets its recv: in a ring, even ranks
  // send first and odd ranks receive first. Messages between two ranks with the same tag
  // arrive in the order they were sent; n must match on both sides. tag >= 0.
  template <CollectiveType T> void send(const T* data, size_t n, int peer, int tag) {
    check_peer("send", peer, tag);
    do_send(data, n, peer, tag, dtype_of<T>());
  }
  template <CollectiveType T> void recv(T* data, size_t n, int peer, int tag) {
    check_peer("recv", peer, tag);
    do_recv(data, n, peer, tag, dtype_of<T>());
  }

  // Async twins of the collectives above: same arguments and results, but they return at once
  // (errors, argument errors included, come out of Work::wait()).
  template <CollectiveType T>
  std::unique_ptr<Work> all_gather_async(const T* in, size_t n, T* out) {
    return do_all_gather_async(in, n, out, dtype_of<T>());
  }
  template <CollectiveType T>
  std::unique_ptr<Work> reduce_scatter_sum_async(const T* in, T* out, size_t n) {
    return do_reduce_scatter_sum_async(in, out, n, dtype_of<T>());
  }
  template <CollectiveType T> std::unique_ptr<Work> all_reduce_sum_async(T* data, size_t n) {
    return do_all_reduce_sum_async(data, n, dtype_of<T>());
  }
  // The count vectors are copied; the data buffers must stay alive until the Work is done.
  template <CollectiveType T>
  std::unique_ptr<Work> all_to_all_v_async(const T* in, const std::vector<size_t>& send_counts,
                                           T* out, const std::vector<size_t>& recv_counts) {
    try {
      check_counts(send_counts, recv_counts);
    } catch (const Error&) {
      return std::make_unique<CompletedWork>(std::current_exception());
    }
    return do_all_to_all_v_async(in, send_counts, out, recv_counts, dtype_of<T>());
  }

  // Returns once every rank has entered the barrier.
  virtual void barrier() = 0;

 protected:
  virtual void do_all_reduce_sum(void* data, size_t n, DType t) = 0;
  virtual void do_all_gather(const void* in, size_t n, void* out, DType t) = 0;
  virtual void do_reduce_scatter_sum(const void* in, void* out, size_t n, DType t) = 0;
  virtual void do_all_to_all_v(const void* in, const std::vector<size_t>& send_counts, void* out,
                               const std::vector<size_t>& recv_counts, DType t) = 0;
  virtual void do_broadcast(void* data, size_t n, int root, DType t) = 0;
  virtual void do_send(const void* data, size_t n, int peer, int tag, DType t) = 0;
  virtual void do_recv(void* data, size_t n, int peer, int tag, DType t) = 0;

  // Defaults: run the blocking operation now and hand back a finished Work.
  virtual std::unique_ptr<Work> do_all_reduce_sum_async(void* data, size_t n, DType t) {
    return now([&] { do_all_reduce_sum(data, n, t); });
  }
  virtual std::unique_ptr<Work> do_all_gather_async(const void* in, size_t n, void* out,
                                                    DType t) {
    return now([&] { do_all_gather(in, n, out, t); });
  }
  virtual std::unique_ptr<Work> do_reduce_scatter_sum_async(const void* in, void* out, size_t n,
                                                            DType t) {
    return now([&] { do_reduce_scatter_sum(in, out, n, t); });
  }
  virtual std::unique_ptr<Work> do_all_to_all_v_async(const void* in,
                                                      const std::vector<size_t>& send_counts,
                                                      void* out,
                                                      const std::vector<size_t>& recv_counts,
                                                      DType t) {
    return now([&] { do_all_to_all_v(in, send_counts, out, recv_counts, t); });
  }

  template <class F> static std::unique_ptr<Work> now(F&& fn) {
    try {
      fn();
    } catch (...) {
      return std::make_unique<CompletedWork>(std::current_exception());
    }
    return std::make_unique<CompletedWork>();
  }

 private:
  void check_counts(const std::vector<size_t>& send_counts,
                    const std::vector<size_t>& recv_counts) const {
    MOP_CHECK(int(send_counts.size()) == size() && int(recv_counts.size()) == size(),
              "process group '{}': all_to_all_v needs {} send and recv counts, got {} and {}",
              name(), size(), send_counts.size(), recv_counts.size());
  }
  void check_peer(const char* op, int peer, int tag) const {
    MOP_CHECK(peer >= 0 && peer < size() && peer != rank(),
              "process group '{}': {} peer {} must be another rank in [0, {}) (this is rank {})",
              name(), op, peer, size(), rank());
    MOP_CHECK(tag >= 0, "process group '{}': {} tag {} must be >= 0", name(), op, tag);
  }
};

}  // namespace mop
