// Expert-parallel dispatch and combine on host memory (the CPU backend).
//
// The routed experts are split evenly over the ranks of the EP group in rank order: rank q owns
// global experts [q El, (q + 1) El), El = E / ep. Each rank routes its own tokens and sorts the
// (token, k) rows by global expert (moe_route_layout), so the rows for rank q are one contiguous
// block. Dispatch sends each block to its owner with one all-to-all-v; the owner regroups what
// arrives (source-major) into expert-major order, so its local experts run as one grouped GEMM
// over El experts. Return is the exact reverse. Nothing is dropped, whatever the imbalance: the
// buffers are sized from the exchanged counts.
//
// The plan is computed once per layer and micro-batch (one small all-to-all of per-expert counts)
// and reused by combine and by backward, whose dispatch/return are the same two moves.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

#include "parallel/process_group.h"

namespace mop {

struct ExpertPlan {
  int ep = 1, local_experts = 0;
  std::vector<size_t> send_rows;      // (ep) rows this rank sends to each owner
  std::vector<size_t> recv_rows;      // (ep) rows arriving from each source
  std::vector<int32_t> local_offsets; // (El + 1) expert-major row offsets of the local experts
  std::vector<int32_t> order;         // (R) received row i (source-major) sits at order[i] expert-major
  int64_t rows_out() const;           // M: rows this rank routed
  int64_t rows_in() const;            // R: rows its local experts process
};

// offsets_E1: this rank's expert-sorted row offsets over all E global experts (E + 1 entries).
// Collective over ep (one all-to-all of per-expert counts).
ExpertPlan plan_expert_exchange(ProcessGroup& ep, const int32_t* offsets_E1, int E);
// The plan from counts already exchanged: send_cnt (E) rows this rank routed to each global
// expert; recv_cnt (ep, E / ep) rows each source routed to each local expert. Pure.
ExpertPlan make_expert_plan(int ep, int E, const int64_t* send_cnt, const int64_t* recv_cnt);

// Row counts (per rank) as element counts of rows of D values, for all_to_all_v.
std::vector<size_t> row_elements(const std::vector<size_t>& rows, int D);

// rows_MD (this rank's routed rows, expert-sorted) -> rows_RD (local experts' rows, expert-major).
template <class T> void expert_dispatch(ProcessGroup& ep, const ExpertPlan& p, const T* rows_MD, T* rows_RD, int D);
// The reverse: rows_RD (expert-major, one per received row) -> rows_MD, back where they came from.
template <class T> void expert_return(ProcessGroup& ep, const ExpertPlan& p, const T* rows_RD, T* rows_MD, int D);

}  // namespace mop
