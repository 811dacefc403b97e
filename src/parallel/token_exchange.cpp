#include "parallel/token_exchange.h"

#include <algorithm>
#include <limits>
#include <numeric>

#include "core/error.h"
#include "parallel/expert_balance.h"

namespace mop {

int64_t TokenExchangePlan::tokens_out() const {
  return int64_t(std::accumulate(send_tokens.begin(), send_tokens.end(), size_t(0)));
}
int64_t TokenExchangePlan::tokens_in() const {
  return int64_t(std::accumulate(recv_tokens.begin(), recv_tokens.end(), size_t(0)));
}
size_t TokenExchangePlan::lent_out() const { return std::accumulate(lending.begin(), lending.end(), size_t(0)); }
EpLoad TokenExchangePlan::layer_load() const {
  return EpLoad{double(load_max), double(load_max_unbalanced), double(load_total) / ep, guest_pairs()};
}

TokenExchangePlan make_token_exchange_plan(int ep, int rank, int E, const int64_t* counts,
                                           const std::vector<uint8_t>& moved) {
  MOP_CHECK(ep >= 1 && E % ep == 0, "{} experts cannot be split evenly over an expert-parallel group of {}", E, ep);
  MOP_CHECK(rank >= 0 && rank < ep, "token exchange: rank {} outside a group of {}", rank, ep);
  MOP_CHECK(moved.empty() || moved.size() == size_t(ep) * size_t(E),
            "token exchange: {} moved flags for {} ranks x {} experts", moved.size(), ep, E);
  const int El = E / ep, W = E + ep;
  auto pairs = [&](int s, int e) { return counts[size_t(s) * W + size_t(e)]; };
  auto tokens = [&](int s, int q) { return counts[size_t(s) * W + size_t(E + q)]; };
  auto mv = [&](int s, int e) { return !moved.empty() && moved[size_t(s) * size_t(E) + size_t(e)] != 0; };
  for (int s = 0; s < ep; ++s)
    for (int i = 0; i < W; ++i)
      MOP_CHECK(counts[size_t(s) * W + size_t(i)] >= 0, "token exchange: rank {} sent a negative count", s);
  for (int s = 0; s < ep; ++s)
    for (int e = s * El; e < (s + 1) * El; ++e)
      MOP_CHECK(!mv(s, e), "token exchange: rank {}'s block of its own expert {} cannot move to it", s, e);
  TokenExchangePlan p;
  p.ep = ep, p.rank = rank, p.experts = E, p.local_experts = El;
  p.send_tokens.resize(size_t(ep));
  p.recv_tokens.resize(size_t(ep));
  for (int q = 0; q < ep; ++q) {
    p.send_tokens[size_t(q)] = size_t(tokens(rank, q));
    p.recv_tokens[size_t(q)] = size_t(tokens(q, rank));
  }
  // Every owner's expert-major layout: (local expert, source, row). The base of (e, s) is the
  // rows of the owner's earlier experts plus those of e from earlier sources; moved blocks have none.
  p.dest_base.resize(size_t(E));
  p.local_offsets.assign(size_t(El) + 1, 0);
  for (int q = 0; q < ep; ++q) {
    int64_t row = 0;
    for (int j = 0; j < El; ++j) {
      const int e = q * El + j;
      if (q == rank) p.local_offsets[size_t(j)] = int32_t(row);
      for (int s = 0; s < ep; ++s) {
        if (s == rank) p.dest_base[size_t(e)] = mv(s, e) ? -1 : int32_t(row);
        if (!mv(s, e)) row += pairs(s, e);
      }
      MOP_CHECK(row <= std::numeric_limits<int32_t>::max(), "token exchange: rank {} would receive {} rows", q, row);
    }
    if (q == rank) p.local_offsets[size_t(El)] = int32_t(row);
  }
  // This rank's guests (its own pairs of other owners' experts) and what it lends.
  p.guest_base.assign(size_t(E), -1);
  p.guest_offsets.assign(1, 0);
  p.borrowed.assign(size_t(ep), 0);
  p.lent.assign(size_t(ep), {});
  for (int e = 0; e < E; ++e) {
    for (int s = 0; s < ep; ++s) p.balanced = p.balanced || mv(s, e);
    if (mv(rank, e)) {
      p.guest_experts.push_back(e);
      p.guest_base[size_t(e)] = p.guest_offsets.back();
      p.guest_offsets.push_back(int32_t(p.guest_offsets.back() + pairs(rank, e)));
      ++p.borrowed[size_t(e / El)];
    }
  }
  p.lending.assign(size_t(ep), 0);
  for (int q = 0; q < ep; ++q) {
    for (int j = 0; j < El; ++j)
      if (mv(q, rank * El + j)) p.lent[size_t(q)].push_back(j);
    p.lending[size_t(q)] = p.lent[size_t(q)].size();
  }
  const std::vector<int64_t> load = expert_loads(ep, E, counts, moved), before = expert_loads(ep, E, counts, {});
  p.load_max = *std::max_element(load.begin(), load.end());
  p.load_max_unbalanced = *std::max_element(before.begin(), before.end());
  p.load_total = std::accumulate(load.begin(), load.end(), int64_t(0));
  return p;
}

std::vector<int64_t> gather_token_exchange_counts(ProcessGroup& ep, const int32_t* off, int E,
                                                  const int32_t* tokens_ep) {
  const int P = ep.size();
  MOP_CHECK(E % P == 0, "{} experts cannot be split evenly over an expert-parallel group of {}", E, P);
  const size_t W = size_t(E + P);
  std::vector<int64_t> mine(W, 0), all(W * size_t(P));
  for (int e = 0; e < E; ++e) mine[size_t(e)] = off[e + 1] - off[e];
  for (int q = 0; tokens_ep && q < P; ++q) mine[size_t(E + q)] = tokens_ep[q];
  ep.all_gather(mine.data(), W, all.data());
  return all;
}

TokenExchangePlan plan_token_exchange(ProcessGroup& ep, const int32_t* off, int E, const int32_t* tokens_ep,
                                      const ExpertBalanceOptions* balance) {
  const int P = ep.size();
  const std::vector<int64_t> all = gather_token_exchange_counts(ep, off, E, tokens_ep);
  return make_token_exchange_plan(P, ep.rank(), E, all.data(),
                                  balance ? plan_expert_balance(P, E, all.data(), *balance) : std::vector<uint8_t>{});
}

}  // namespace mop
