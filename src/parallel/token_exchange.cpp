#include "parallel/token_exchange.h"

#include <limits>
#include <numeric>

#include "core/error.h"

namespace mop {

int64_t TokenExchangePlan::tokens_out() const {
  return int64_t(std::accumulate(send_tokens.begin(), send_tokens.end(), size_t(0)));
}
int64_t TokenExchangePlan::tokens_in() const {
  return int64_t(std::accumulate(recv_tokens.begin(), recv_tokens.end(), size_t(0)));
}

TokenExchangePlan make_token_exchange_plan(int ep, int rank, int E, const int64_t* counts) {
  MOP_CHECK(ep >= 1 && E % ep == 0, "{} experts cannot be split evenly over an expert-parallel group of {}", E, ep);
  MOP_CHECK(rank >= 0 && rank < ep, "token exchange: rank {} outside a group of {}", rank, ep);
  const int El = E / ep, W = E + ep;
  auto pairs = [&](int s, int e) { return counts[size_t(s) * W + size_t(e)]; };
  auto tokens = [&](int s, int q) { return counts[size_t(s) * W + size_t(E + q)]; };
  for (int s = 0; s < ep; ++s)
    for (int i = 0; i < W; ++i)
      MOP_CHECK(counts[size_t(s) * W + size_t(i)] >= 0, "token exchange: rank {} sent a negative count", s);
  TokenExchangePlan p;
  p.ep = ep, p.rank = rank, p.experts = E, p.local_experts = El;
  p.send_tokens.resize(size_t(ep));
  p.recv_tokens.resize(size_t(ep));
  for (int q = 0; q < ep; ++q) {
    p.send_tokens[size_t(q)] = size_t(tokens(rank, q));
    p.recv_tokens[size_t(q)] = size_t(tokens(q, rank));
  }
  // Every owner's expert-major layout: (local expert, source, row). The base of (e, s) is the
  // rows of the owner's earlier experts plus those of e from earlier sources.
  p.dest_base.resize(size_t(E));
  p.local_offsets.assign(size_t(El) + 1, 0);
  for (int q = 0; q < ep; ++q) {
    int64_t row = 0;
    for (int j = 0; j < El; ++j) {
      const int e = q * El + j;
      if (q == rank) p.local_offsets[size_t(j)] = int32_t(row);
      for (int s = 0; s < ep; ++s) {
        if (s == rank) p.dest_base[size_t(e)] = int32_t(row);
        row += pairs(s, e);
      }
      MOP_CHECK(row <= std::numeric_limits<int32_t>::max(), "token exchange: rank {} would receive {} rows", q, row);
    }
    if (q == rank) p.local_offsets[size_t(El)] = int32_t(row);
  }
  return p;
}

TokenExchangePlan plan_token_exchange(ProcessGroup& ep, const int32_t* off, int E, const int32_t* tokens_ep) {
  const int P = ep.size();
  MOP_CHECK(E % P == 0, "{} experts cannot be split evenly over an expert-parallel group of {}", E, P);
  const size_t W = size_t(E + P);
  std::vector<int64_t> mine(W), all(W * size_t(P));
  for (int e = 0; e < E; ++e) mine[size_t(e)] = off[e + 1] - off[e];
  for (int q = 0; q < P; ++q) mine[size_t(E + q)] = tokens_ep[q];
  ep.all_gather(mine.data(), W, all.data());
  return make_token_exchange_plan(P, ep.rank(), E, all.data());
}

}  // namespace mop
