#pragma once
#include <cstdint>

namespace mop::cpu {

enum class RouterKind { softmax, sigmoid };

struct RouterConfig {
  RouterKind kind = RouterKind::softmax;
  int E = 0;                  // routed experts
  int K = 0;                  // experts per token
  bool norm_topk = true;      // renormalise the K selected weights to sum to 1
  int n_groups = 1;           // group-limited routing (DeepSeek-V3): experts split into n_groups groups
  int topk_groups = 1;        // groups a token may use; 1 group = no restriction when n_groups == 1
  double routed_scale = 1.0;  // multiplies the combine weights
};

// probs_NE: softmax(logits) or sigmoid(logits). Selection ranks probs + bias_E (bias only for
// sigmoid routing, the aux-loss-free balance bias; may be null), highest first, ties to the lower
// expert index. With n_groups > 1 a group's score is the sum of its top-2 biased scores and only
// the best topk_groups groups are eligible. Combine weights w_NK use the unbiased probs:
// w = routed_scale * p_sel / (norm_topk ? sum_k p_sel : 1).
template <class T>
void router_forward(T* probs_NE, int32_t* idx_NK, T* w_NK, const T* logits_NE, const T* bias_E, const RouterConfig& cfg,
                    int N);
// Gradient of the logits through w (selection held fixed) plus dprobs_NE (may be null: the
// load-balancing loss's gradient). dlogits written.
template <class T>
void router_backward(T* dlogits_NE, const T* dw_NK, const T* dprobs_NE, const T* probs_NE, const int32_t* idx_NK,
                     const RouterConfig& cfg, int N);

// Switch-style load-balancing loss of one layer: E * sum_e f_e * P_e with f_e = count_e / (N K)
// (fraction of the N*K assignments that went to e, treated as a constant) and P_e = mean_n probs[n, e].
// Uniform routing gives 1. counts_E is filled.
template <class T> T moe_lb_loss_forward(int32_t* counts_E, const T* probs_NE, const int32_t* idx_NK, int N, int E, int K);
// dprobs_NE += dloss * E * f_e / N.
template <class T> void moe_lb_loss_backward(T* dprobs_NE, T dloss, const int32_t* counts_E, int N, int E, int K);

}  // namespace mop::cpu
