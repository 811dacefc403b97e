// The plan of an expert-parallel exchange that sends each token once per rank (the GPU path).
//
// Experts are split over the EP group as in expert_dispatch.h (rank q owns [q El, (q + 1) El)).
// Instead of one row per (token, expert) pair, a source sends a token's hidden row once to each
// rank that owns at least one of its experts, with K small fields saying where each of the token's
// pairs on that rank goes (its row among the owner's expert-major pair rows, or -1) and its gate.
// The owner expands the token rows into its pairs, runs its experts, and sends back one row per
// token: the gate-weighted sum of its experts' outputs. At top-k 8 over 2 ranks that is about
// 1 row per token each way instead of 4.
//
// Everything follows from one small all-gather: every rank's pairs per global expert and tokens
// per destination rank, so each source knows where its pairs land on their owners and no second
// round is needed. Expert-major pair rows on an owner are (local expert, source, the source's
// expert-sorted order), the same order as expert_dispatch's: the grouped GEMM sees the same rows.
//
// Balanced (parallel/expert_balance.h): a moved block (s, e) leaves e's rows on its owner and
// becomes guest rows on s, after s's own experts' rows, in the source's expert-sorted order: guest
// experts ascending, so grouped by lending owner, each owner's experts ascending. s still sends
// each token to every owner of one of its experts (the token counts are gathered before the plan
// exists); a pair that moved is marked absent on the owner (dest_base -1), so a token whose only
// pairs there moved travels with no pair and comes back as a zero row.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

#include "parallel/expert_balance.h"
#include "parallel/process_group.h"

namespace mop {

struct TokenExchangePlan {
  int ep = 1, rank = 0, experts = 0, local_experts = 0;
  std::vector<size_t> send_tokens;      // (ep) token rows this rank sends to each rank
  std::vector<size_t> recv_tokens;      // (ep) token rows arriving from each rank
  std::vector<int32_t> local_offsets;   // (El + 1) expert-major pair rows of the local experts
  std::vector<int32_t> dest_base;       // (E) first row of this rank's pairs of expert e on e's owner; -1: moved
  // Balancing (all empty, balanced false, without moved blocks):
  bool balanced = false;                // some block of the layer moved: every rank joins the weight exchanges
  std::vector<int32_t> guest_experts;   // (G) global experts this rank computes its own pairs of, ascending
  std::vector<int32_t> guest_offsets;   // (G + 1) their rows, counted from the end of the local experts' rows
  std::vector<int32_t> guest_base;      // (E) first guest row of expert e, or -1
  std::vector<std::vector<int32_t>> lent;  // (ep) local experts lent to each rank (its guests), ascending
  std::vector<size_t> lending;          // (ep) how many: lent[q].size()
  std::vector<size_t> borrowed;         // (ep) guest experts from each owner
  // Expert pairs computed per rank of the group (balanced) and without the moves: their largest and sum.
  int64_t load_max = 0, load_max_unbalanced = 0, load_total = 0;
  int64_t tokens_out() const;           // S: rows this rank sends
  int64_t tokens_in() const;            // Rt: rows it receives
  int64_t pairs_in() const { return local_offsets.back(); }  // R: rows its local experts process
  int64_t guest_pairs() const { return guest_offsets.empty() ? 0 : guest_offsets.back(); }  // Rg
  size_t lent_out() const;              // experts this rank lends, over all borrowers
  EpLoad layer_load() const;            // the loads above as one layer's EpLoad (with the guest pairs)
};

// counts: (ep, E + ep) for every rank s of the group: [pairs s routed to each global expert,
// tokens s sends to each rank]. moved: (ep, E) 0/1 from plan_expert_balance, or empty. Pure.
TokenExchangePlan make_token_exchange_plan(int ep, int rank, int E, const int64_t* counts,
                                           const std::vector<uint8_t>& moved = {});

// Collective over ep: every rank's counts as make_token_exchange_plan takes them, (ep, E + ep),
// from one all-gather. offsets_E1: this rank's expert-sorted pair offsets over all E experts;
// tokens_ep: tokens it sends to each rank of the group (null: zeros, for an exchange of pairs).
std::vector<int64_t> gather_token_exchange_counts(ProcessGroup& ep, const int32_t* offsets_E1, int E,
                                                  const int32_t* tokens_ep);
// The plan from those counts; balance: with the moves of plan_expert_balance, or none.
TokenExchangePlan plan_token_exchange(ProcessGroup& ep, const int32_t* offsets_E1, int E, const int32_t* tokens_ep,
                                      const ExpertBalanceOptions* balance = nullptr);

}  // namespace mop
