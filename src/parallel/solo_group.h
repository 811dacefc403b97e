// SoloGroup: the ProcessGroup of one rank. Collectives are copies or nothing; no store, no
// sockets, no threads. make_groups() uses it for every group of size 1 (a single-rank run, the
// ep group when ep = 1, the expert-data-parallel group when ep = world), so callers never
// special-case size 1. Works for host memory only (it copies with memmove).
#pragma once
#include <string>

#include "parallel/process_group.h"

namespace mop {

class SoloGroup final : public ProcessGroup {
 public:
  explicit SoloGroup(std::string name) : name_(std::move(name)) {}

  int rank() const override { return 0; }
  int size() const override { return 1; }
  const std::string& name() const override { return name_; }
  void barrier() override {}

 protected:
  void do_all_reduce_sum(void*, size_t, DType) override {}
  void do_all_gather(const void* in, size_t n, void* out, DType t) override;
  void do_reduce_scatter_sum(const void* in, void* out, size_t n, DType t) override;
  void do_all_to_all_v(const void* in, const std::vector<size_t>& send_counts, void* out,
                       const std::vector<size_t>& recv_counts, DType t) override;
  void do_broadcast(void*, size_t, int, DType) override {}
  // Unreachable: ProcessGroup::send/recv reject peer == rank(), the only rank here.
  void do_send(const void*, size_t, int, int, DType) override;
  void do_recv(void*, size_t, int, int, DType) override;

 private:
  std::string name_;
};

}  // namespace mop
