#include "parallel/expert_dispatch.h"

#include <cstring>
#include <numeric>

#include "core/alloc.h"
#include "core/error.h"

namespace mop {

int64_t ExpertPlan::rows_out() const { return int64_t(std::accumulate(send_rows.begin(), send_rows.end(), size_t(0))); }
int64_t ExpertPlan::rows_in() const { return int64_t(std::accumulate(recv_rows.begin(), recv_rows.end(), size_t(0))); }

ExpertPlan make_expert_plan(int ep, int E, const int64_t* send_cnt, const int64_t* recv_cnt) {
  MOP_CHECK(ep >= 1 && E % ep == 0, "{} experts cannot be split evenly over an expert-parallel group of {}", E, ep);
  ExpertPlan p;
  p.ep = ep;
  const int El = E / ep;
  p.local_experts = El;
  p.send_rows.assign(size_t(ep), 0);
  p.recv_rows.assign(size_t(ep), 0);
  for (int q = 0; q < ep; ++q)
    for (int j = 0; j < El; ++j) {
      p.send_rows[size_t(q)] += size_t(send_cnt[q * El + j]);
      p.recv_rows[size_t(q)] += size_t(recv_cnt[q * El + j]);
    }
  p.local_offsets.assign(size_t(El) + 1, 0);
  for (int j = 0; j < El; ++j) {
    int64_t n = 0;
    for (int s = 0; s < ep; ++s) n += recv_cnt[s * El + j];
    p.local_offsets[size_t(j) + 1] = int32_t(p.local_offsets[size_t(j)] + n);
  }
  // Received order is (source, expert, row); expert-major is (expert, source, row).
  p.order.resize(size_t(p.rows_in()));
  std::vector<int64_t> fill(p.local_offsets.begin(), p.local_offsets.end() - 1);
  size_t i = 0;
  for (int s = 0; s < ep; ++s)
    for (int j = 0; j < El; ++j)
      for (int64_t r = 0; r < recv_cnt[s * El + j]; ++r) p.order[i++] = int32_t(fill[size_t(j)]++);
  return p;
}

ExpertPlan plan_expert_exchange(ProcessGroup& ep, const int32_t* off, int E) {
  const int P = ep.size();
  MOP_CHECK(E % P == 0, "{} experts cannot be split evenly over an expert-parallel group of {}", E, P);
  // Per-expert counts: owner q receives, from every source, the counts of its E / P experts.
  std::vector<int64_t> send_cnt(static_cast<size_t>(E)), recv_cnt(static_cast<size_t>(E));
  for (int e = 0; e < E; ++e) send_cnt[size_t(e)] = off[e + 1] - off[e];
  std::vector<size_t> per_rank(size_t(P), size_t(E / P));
  ep.all_to_all_v(send_cnt.data(), per_rank, recv_cnt.data(), per_rank);  // recv_cnt: (source, E / P)
  return make_expert_plan(P, E, send_cnt.data(), recv_cnt.data());
}

std::vector<size_t> row_elements(const std::vector<size_t>& rows, int D) {
  std::vector<size_t> v(rows);
  for (size_t& x : v) x *= size_t(D);
  return v;
}

template <class T> void expert_dispatch(ProcessGroup& ep, const ExpertPlan& p, const T* rows_MD, T* rows_RD, int D) {
  const size_t R = size_t(p.rows_in());
  HostArray<T> recv(R * size_t(D), Mem::comm);
  ep.all_to_all_v(rows_MD, row_elements(p.send_rows, D), recv.data(), row_elements(p.recv_rows, D));
  for (size_t i = 0; i < R; ++i)
    std::memcpy(rows_RD + size_t(p.order[i]) * D, recv.data() + i * D, sizeof(T) * size_t(D));
}

template <class T> void expert_return(ProcessGroup& ep, const ExpertPlan& p, const T* rows_RD, T* rows_MD, int D) {
  const size_t R = size_t(p.rows_in());
  HostArray<T> send(R * size_t(D), Mem::comm);
  for (size_t i = 0; i < R; ++i)
    std::memcpy(send.data() + i * D, rows_RD + size_t(p.order[i]) * D, sizeof(T) * size_t(D));
  ep.all_to_all_v(send.data(), row_elements(p.recv_rows, D), rows_MD, row_elements(p.send_rows, D));
}

#define INSTANTIATE(T)                                                                              \
  template void expert_dispatch(ProcessGroup&, const ExpertPlan&, const T*, T*, int);              \
  template void expert_return(ProcessGroup&, const ExpertPlan&, const T*, T*, int);
INSTANTIATE(float)
INSTANTIATE(double)
#undef INSTANTIATE

}  // namespace mop
