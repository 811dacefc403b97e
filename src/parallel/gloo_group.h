// GlooGroup: a ProcessGroup for host memory over Gloo's TCP transport.
//
// Rendezvous goes through a gloo Store, either
//   * `store`: a store shared by several groups (make_groups() passes the run's TcpStore or
//     FileStore), which the group keeps alive, or
//   * `store_dir`: a FileStore directory every rank can see (a shared filesystem across nodes,
//     any directory on one node).
// Each rank publishes its address under `prefix`; several groups share one store as long as
// their prefixes differ. A FileStore keeps its keys as files, so a (directory, prefix) pair
// must not be reused by a later run: use a fresh directory (mkdtemp) or a per-run prefix.
//
// The constructor blocks until all `size` ranks have constructed their GlooGroup with the
// same store and prefix (or throws mop::Error after the timeout). The store is not used after
// that.
//
// Every operation (and the connection itself) gives up after `timeout` and throws mop::Error
// naming the group, the rank, the operation and the timeout; when gloo's error names a peer
// address (connection reset or closed: the peer process died), the message names that peer's
// rank. The group is then broken.
//
// Async operations run FIFO on one worker thread per group (started by the first one), so the
// caller computes meanwhile; blocking operations first wait for the queued ones.
#pragma once
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "parallel/process_group.h"
#include "parallel/work_queue.h"

namespace gloo {
class Context;
namespace rendezvous {
class Store;
}
}  // namespace gloo

namespace mop {

struct GlooOptions {
  std::shared_ptr<gloo::rendezvous::Store> store;  // shared rendezvous store, or
  std::string store_dir;                    // FileStore directory, shared by all ranks
  std::string prefix = "mop";               // key prefix inside the store; also the default name
  std::string hostname = "127.0.0.1";       // address this rank listens on (ignored if iface set)
  std::string iface;                        // network interface to listen on, e.g. "eth0"
  std::chrono::milliseconds timeout{600'000};  // per operation and for the rendezvous
  std::string name;                         // for error messages; empty: prefix
  std::vector<int> global_ranks;            // group rank -> world rank, for error messages
};

class GlooGroup final : public ProcessGroup {
 public:
  GlooGroup(int rank, int size, const GlooOptions& opt);
  ~GlooGroup() override;
  GlooGroup(const GlooGroup&) = delete;
  GlooGroup& operator=(const GlooGroup&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const std::string& name() const override { return name_; }
  std::chrono::milliseconds timeout() const { return timeout_; }

  void barrier() override;

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
  // The operations themselves, run on the caller's thread (blocking) or the worker (async).
  void all_reduce_now(void* data, size_t n, DType t);
  void all_gather_now(const void* in, size_t n, void* out, DType t);
  void reduce_scatter_now(const void* in, void* out, size_t n, DType t);
  void all_to_all_v_now(const void* in, const std::vector<size_t>& send_counts, void* out,
                        const std::vector<size_t>& recv_counts, DType t);

  // Runs fn (gloo calls); turns gloo's exceptions into mop::Error and marks the group broken.
  template <class F> void run(const char* op, F&& fn);
  void exchange_addresses();
  std::string failure_message(const char* op, const std::string& what) const;
  std::string rank_label(int group_rank) const;
  uint32_t next_tag() { return tag_++; }

  int rank_;
  int size_;
  std::string name_;
  std::chrono::milliseconds timeout_;
  std::vector<int> global_ranks_;
  std::shared_ptr<gloo::rendezvous::Store> store_;  // kept alive: rank 0's may be the server
  std::shared_ptr<gloo::Context> ctx_;
  // Peer address strings as gloo may print them in errors -> group rank, so "Connection closed
  // by peer [10.0.0.7]:4182" can be told as "rank 5" (see RecordingStore in the .cpp).
  std::vector<std::pair<std::string, int>> peer_addrs_;
  // Touched only by the thread running operations: the caller, or the worker after drain().
  uint32_t tag_ = 0;
  bool broken_ = false;
  std::string broken_by_;
  WorkQueue queue_;  // last: destroyed (its tasks finished) before ctx_
};

}  // namespace mop
