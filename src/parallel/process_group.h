// ProcessGroup: a fixed set of ranks that run collectives together, on host memory.
//
// Rules every caller must follow:
//   * Every collective is blocking: it returns when this rank's part is complete (its output
//     holds the result and its input may be reused).
//   * Every rank of the group must call the same collectives, in the same order, with matching
//     arguments (same n, same root, send_counts on one rank matching recv_counts on the peer).
//     A mismatch is not detected in general: it hangs until the timeout or corrupts data.
//   * A group is used by one thread at a time. Two groups over the same ranks are independent
//     and may be used from different threads.
//   * After a collective throws (timeout, peer gone), the group is broken: later collectives
//     on it throw at once. Make a new group.
//
// Supported element types: float, double, int32_t, int64_t. Data pointers are host memory.
// Counts are in elements. For n == 0 a collective does nothing (every rank must pass 0).
#pragma once
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/error.h"

namespace mop {

template <class T>
concept CollectiveType = std::same_as<T, float> || std::same_as<T, double> ||
                         std::same_as<T, int32_t> || std::same_as<T, int64_t>;

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
    MOP_CHECK(int(send_counts.size()) == size() && int(recv_counts.size()) == size(),
              "process group '{}': all_to_all_v needs {} send and recv counts, got {} and {}",
              name(), size(), send_counts.size(), recv_counts.size());
    do_all_to_all_v(in, send_counts, out, recv_counts, dtype_of<T>());
  }

  // data[0..n) on every rank <- data[0..n) of rank `root`.
  template <CollectiveType T> void broadcast(T* data, size_t n, int root) {
    MOP_CHECK(root >= 0 && root < size(), "process group '{}': broadcast root {} not in [0, {})",
              name(), root, size());
    do_broadcast(data, n, root, dtype_of<T>());
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
};

}  // namespace mop
