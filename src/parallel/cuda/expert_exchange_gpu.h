// Expert-parallel exchange on the GPU, each token sent once per rank (parallel/token_exchange.h):
//
//   forward   source: count its tokens per rank and all-gather every rank's counts (device), then
//             after the layer's one host sync the plan from them, the send layout (ops/cuda/moe_ep.h), the token
//             rows and their pair fields to the owners; owner: expand into expert-major pairs, run
//             the experts, reduce each token's pairs to one gate-weighted row, send it back; source:
//             sum the rows from each rank.
//   backward  the mirror: d(output) once per rank to the owners; owner: per-pair gradients and
//             gate gradients, the experts' backward, each token's pair gradients summed; back
//             home, summed over the ranks; the gate gradients go back with them.
//
// The device group's stream is the compute stream the rows are produced and consumed on (the
// exchange is on the critical path). Each exchange returns its work: a caller about to wait on the
// host for the stream waits on it first, so a peer that died is a timeout naming the group, not a
// hang in cudaStreamSynchronize.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "core/alloc.h"
#include "ops/cuda/pinned.h"
#include "parallel/cuda/device_group.h"
#include "parallel/expert_balance.h"
#include "parallel/token_exchange.h"

namespace mop {

// One MoE layer's exchange: what its forward decides and its backward reuses.
struct GpuTokenExchange {
  TokenExchangePlan plan;
  int N = 0, K = 0, E = 0;
  Buffer tokens_ep;                  // (ep) int32: tokens this rank sends to each rank
  std::vector<int32_t> tokens_host;  // (ep) host copy (the host-group fallback only)
  bool device_plan = false;          // the counts were gathered on the device into plan_host
  Buffer plan_rows;                  // (ep + 1, E + ep) int64: every rank's plan row, then this rank's
  PinnedHost<int64_t> plan_host;     // (ep, E + ep) their host copy
  Buffer index;                      // int32: dest_base (E), local_offsets (El + 1), guest_base (E), guest_offsets (G + 1)
  PinnedHost<int32_t> index_host;    // its host side (written before each upload); sized for max_guests
  Buffer slot;                       // (N, ep) int32: each token's send row per rank, or -1
  Buffer pos, gate;                  // (Rt, K) int32, f32 received: each pair's expert-major row (or -1), gate
  size_t n_cap = 0, rt_cap = 0;      // tokens slot holds; received tokens pos and gate hold
  const int32_t* dest_base() const { return index.as<int32_t>(); }
  const int32_t* local_offsets() const { return index.as<int32_t>() + E; }
  const int32_t* guest_base() const { return local_offsets() + plan.local_experts + 1; }
  const int32_t* guest_offsets() const { return guest_base() + E; }
};

// Before the layer's host sync, on ep's stream: counts this rank's tokens per rank (idx: (N, K)
// global expert ids of E; offsets: its expert-sorted pair offsets), all-gathers every rank's counts
// over ep and queues their copy to x.plan_host. Returns the gather's work (wait on it before the
// host sync). A group that moves no data (SkipGroup): only the counts' copy to x.tokens_host, no
// work; the plan then gathers over the host group.
std::unique_ptr<DeviceWork> token_exchange_count(GpuTokenExchange& x, DeviceGroup& ep, const int32_t* idx_NK,
                                                 const int32_t* offsets_E1, int N, int K, int E);
// After it (the copies done; offsets_host: the offsets' host copy): the plan (from x.plan_host, or
// a collective over host_ep; balance: with plan_expert_balance's moves), its index upload, and x's
// buffers sized for it.
void token_exchange_plan(GpuTokenExchange& x, ProcessGroup& host_ep, const int32_t* offsets_host, cudaStream_t stream,
                         const ExpertBalanceOptions* balance = nullptr);
// The send layout (x.slot) and, through the exchange, each received token's pair fields (x.pos,
// x.gate). Routing on the device: idx, w, row (N, K), offsets (E + 1). send_pos, send_gate: (S, K)
// scratch, read by the exchange.
std::unique_ptr<DeviceWork> token_exchange_layout(GpuTokenExchange& x, DeviceGroup& ep, const int32_t* idx_NK,
                                                  const float* w_NK, const int32_t* row_NK, const int32_t* offsets_E1,
                                                  int32_t* send_pos_SK, float* send_gate_SK);

// Capacity for n rows of a buffer whose row count varies with the routing: grown only past it,
// with 1/8 slack, so a reallocation (which waits for the device) is rare.
inline size_t grow_rows(size_t n) { return n + n / 8 + 64; }

// Rows of `width` elements: to_owners moves S rows (send_tokens per rank) into Rt rows (recv_tokens
// per rank); !to_owners the reverse. Stream-ordered on ep's stream; no host wait.
std::unique_ptr<DeviceWork> token_exchange_rows(DeviceGroup& ep, const TokenExchangePlan& p, const void* in,
                                                void* out, int width, DType t, bool to_owners);

}  // namespace mop
