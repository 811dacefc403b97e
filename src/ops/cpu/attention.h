#pragma once
#include <cstdint>

namespace mop::cpu {

// Causal softmax attention over packed documents. Documents are [cu_seqlens[b], cu_seqlens[b+1]),
// cu_seqlens[0] = 0, cu_seqlens[n_docs] = N: query i attends to key j iff both lie in the same
// document and j <= i. GQA: query head h reads kv head h / (H / KVH).
// q_NHd (N, H, hd); k, v (N, KVH, hd); out_NHd (N, H, hd);
// lse_NH = log(sum_j exp(scale * q_i . k_j)) per query and head (natural log), saved for backward
// and for merging partial results over key blocks later (ring attention).
template <class T>
void attention_forward(T* out_NHd, T* lse_NH, const T* q_NHd, const T* k_NKd, const T* v_NKd, const int32_t* cu_seqlens,
                       int n_docs, int N, int H, int KVH, int hd, T scale);
// dq, dk, dv written. Recomputes the probabilities from q, k and lse.
template <class T>
void attention_backward(T* dq_NHd, T* dk_NKd, T* dv_NKd, const T* dout_NHd, const T* out_NHd, const T* lse_NH,
                        const T* q_NHd, const T* k_NKd, const T* v_NKd, const int32_t* cu_seqlens, int n_docs, int N,
                        int H, int KVH, int hd, T scale);

}  // namespace mop::cpu
