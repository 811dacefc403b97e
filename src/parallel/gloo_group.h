// GlooGroup: a ProcessGroup for host memory over Gloo's TCP transport.
//
// Rendezvous goes through a gloo FileStore: a directory every rank can see (a shared
// filesystem across nodes, any directory on one node). Each rank publishes its address under
// `prefix`; several groups can share one directory as long as their prefixes differ. The
// FileStore keeps its keys as files, so a (directory, prefix) pair must not be reused by a
// later run: use a fresh directory (mkdtemp) or a per-run prefix. Debian's gloo has no TCP
// store, so FileStore is the only rendezvous for now.
//
// The constructor blocks until all `size` ranks have constructed their GlooGroup with the
// same directory and prefix (or throws mop::Error after the timeout).
//
// Every collective (and the connection itself) gives up after `timeout` and throws mop::Error
// naming the group, the rank, the operation and the timeout. The group is then broken.
#pragma once
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "parallel/process_group.h"

namespace gloo {
class Context;
}

namespace mop {

struct GlooOptions {
  std::string store_dir;                    // FileStore directory, shared by all ranks (required)
  std::string prefix = "mop";               // key prefix inside the store; also the default name
  std::string hostname = "127.0.0.1";       // address this rank listens on (ignored if iface set)
  std::string iface;                        // network interface to listen on, e.g. "eth0"
  std::chrono::milliseconds timeout{600'000};  // per collective and for the rendezvous
  std::string name;                         // for error messages; empty: prefix
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

 private:
  // Runs fn (one gloo call); turns gloo's exceptions into mop::Error and marks the group broken.
  template <class F> void run(const char* op, F&& fn);
  uint32_t next_tag() { return tag_++; }

  int rank_;
  int size_;
  std::string name_;
  std::chrono::milliseconds timeout_;
  std::shared_ptr<gloo::Context> ctx_;
  uint32_t tag_ = 0;
  bool broken_ = false;
  std::string broken_by_;
};

}  // namespace mop
