#include "parallel/solo_group.h"

#include <cstring>

namespace mop {

void SoloGroup::do_all_gather(const void* in, size_t n, void* out, DType t) {
  if (n) std::memmove(out, in, n * dtype_size(t));
}

void SoloGroup::do_reduce_scatter_sum(const void* in, void* out, size_t n, DType t) {
  if (n) std::memmove(out, in, n * dtype_size(t));
}

void SoloGroup::do_all_to_all_v(const void* in, const std::vector<size_t>& send_counts, void* out,
                                const std::vector<size_t>& recv_counts, DType t) {
  MOP_CHECK(send_counts[0] == recv_counts[0],
            "process group '{}': all_to_all_v sends {} elements to itself but expects {}", name_,
            send_counts[0], recv_counts[0]);
  if (send_counts[0]) std::memmove(out, in, send_counts[0] * dtype_size(t));
}

void SoloGroup::do_send(const void*, size_t, int peer, int, DType) {
  MOP_FAIL("process group '{}' has one rank: no peer {} to send to", name_, peer);
}
void SoloGroup::do_recv(void*, size_t, int peer, int, DType) {
  MOP_FAIL("process group '{}' has one rank: no peer {} to receive from", name_, peer);
}

}  // namespace mop
