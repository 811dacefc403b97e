#pragma once
#include <cstdint>

namespace mop::cpu {

// out[n] = wte[tokens[n]]. Token ids are checked against V (throws mop::Error).
template <class T> void embedding_forward(T* out_ND, const int32_t* tokens_N, const T* wte_VD, int N, int D, int V);
// dwte[tokens[n]] += dout[n].
template <class T> void embedding_backward(T* dwte_VD, const T* dout_ND, const int32_t* tokens_N, int N, int D, int V);

}  // namespace mop::cpu
