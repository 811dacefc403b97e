#pragma once
#include <cstdint>

namespace mop::cpu {

// loss[n] = lse[n] - logits[n, target[n]] with lse[n] = log sum_v exp(logits[n, v]).
// Rows whose target is negative (ignore, -100 in Hugging Face) get loss 0 and lse 0.
// Targets >= V throw mop::Error. Returns the sum of losses over valid rows, accumulated in double.
template <class T> double cross_entropy_forward(T* loss_N, T* lse_N, const T* logits_NV, const int32_t* targets_N, int N, int V);
// dlogits[n] = dscale * (softmax(logits[n]) - onehot(target[n])) for valid rows, 0 for ignored (written).
template <class T>
void cross_entropy_backward(T* dlogits_NV, const T* logits_NV, const T* lse_N, const int32_t* targets_N, T dscale, int N,
                            int V);

}  // namespace mop::cpu
