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
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

#include "parallel/process_group.h"

namespace mop {

struct TokenExchangePlan {
  int ep = 1, rank = 0, experts = 0, local_experts = 0;
  std::vector<size_t> send_tokens;      // (ep) token rows this rank sends to each rank
  std::vector<size_t> recv_tokens;      // (ep) token rows arriving from each rank
  std::vector<int32_t> local_offsets;   // (El + 1) expert-major pair rows of the local experts
  std::vector<int32_t> dest_base;       // (E) first row of this rank's pairs of expert e on e's owner
  int64_t tokens_out() const;           // S: rows this rank sends
  int64_t tokens_in() const;            // Rt: rows it receives
  int64_t pairs_in() const { return local_offsets.back(); }  // R: rows its local experts process
};

// counts: (ep, E + ep) for every rank s of the group: [pairs s routed to each global expert,
// tokens s sends to each rank]. Pure.
TokenExchangePlan make_token_exchange_plan(int ep, int rank, int E, const int64_t* counts);

// Collective over ep (one all-gather of E + ep counts). offsets_E1: this rank's expert-sorted pair
// offsets over all E experts; tokens_ep: tokens it sends to each rank of the group.
TokenExchangePlan plan_token_exchange(ProcessGroup& ep, const int32_t* offsets_E1, int E, const int32_t* tokens_ep);

}  // namespace mop
