// FFN half of a decoder layer: y = x2 + ffn(rmsnorm(x2)), where ffn is a dense SwiGLU (the first
// dense_layers layers) or the MoE: router -> top-k -> dropless permutation by expert -> SwiGLU
// experts (grouped GEMMs) -> weighted combine, plus the shared experts.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "core/alloc.h"
#include "model/batch.h"
#include "model/config.h"
#include "model/params.h"
#include "ops/cpu/router.h"
#include "parallel/expert_balance.h"
#include "parallel/expert_dispatch.h"

namespace mop {

class ProcessGroup;
struct TokenExchangePlan;     // parallel/token_exchange.h

// How an MoE layer reaches other ranks; the defaults are one rank holding every expert.
struct MoeComm {
  ProcessGroup* ep = nullptr;  // routed experts split evenly over these ranks (parallel/expert_dispatch.h)
  ProcessGroup* dp = nullptr;  // ranks whose tokens form one micro-batch: load-balancing statistics are summed
  // parallel.ep_balance: blocks of rows computed by the rank that routed them, with the experts'
  // weights lent by their owners (parallel/expert_balance.h); null: every row goes to its owner.
  const ExpertBalanceOptions* balance = nullptr;
};

template <class T> struct FfnSaved {
  HostArray<T> h2, rstd2;      // (N, D), (N)
  // MoE (M = N K rows in expert order)
  HostArray<T> probs, w;       // (N, E), (N, K)
  HostArray<int32_t> idx, row; // (N, K) expert ids and their rows in the expert-sorted buffer
  std::vector<int32_t> offsets;// (E + 1)
  std::vector<int32_t> counts; // (E) tokens per expert in this micro-batch (over all dp ranks)
  int64_t lb_tokens = 0;       // tokens behind counts (N, or the sum over dp ranks)
  HostArray<T> xp, gu, a, yp;  // (M, D), (M, 2F), (M, F), (M, D); for a dense layer: gu, a only
  // Expert parallel: xl holds the R rows the local experts process (expert-major); gu and a are
  // then (R, 2F), (R, F).
  std::shared_ptr<const ExpertPlan> plan;
  HostArray<T> xl;
  // Balanced (MoeComm::balance): moved (E) 1 where this rank's rows of expert e stayed here as a
  // guest's (they stay in xp and yp; plan moves the others), the guests and loans (guest_experts,
  // guest_offsets, lent, borrowed of the plan), the lent weights ((2F, D) then (D, F) per guest)
  // and the guest rows' gu (Rg, 2F) and a (Rg, F) in guest order.
  std::vector<uint8_t> moved;
  std::shared_ptr<const TokenExchangePlan> guests;
  HostArray<T> guest_w, guest_gu, guest_a;
  EpLoad ep_load;              // this layer's (LossStats::ep_load)
  HostArray<T> sgu, sa;        // shared experts: (N, 2Fs), (N, Fs)
  double lb_loss = 0;          // load-balancing loss of this layer (unscaled)
};

cpu::RouterConfig router_config(const ModelConfig& c);

template <class T>
void ffn_block_forward(T* y_ND, FfnSaved<T>& s, const T* x2_ND, const LayerView<T>& w, const ModelConfig& c, int layer,
                       int N, const MoeComm& comm = {});
// dx2 = dy + d(branch)/dx2 (written). lb_scale multiplies this layer's load-balancing loss in the
// objective (0 when it is off).
template <class T>
void ffn_block_backward(T* dx2_ND, const T* dy_ND, const FfnSaved<T>& s, const T* x2_ND, const LayerView<T>& w,
                        const LayerView<T>& g, const ModelConfig& c, int layer, int N, T lb_scale,
                        const MoeComm& comm = {});

}  // namespace mop
