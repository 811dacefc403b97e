#include "model/attention_block.h"

#include <cmath>
#include <cstring>

#include "ops/cpu/attention.h"
#include "ops/cpu/matmul.h"
#include "ops/cpu/rmsnorm.h"
#include "ops/cpu/rope.h"

namespace mop {

template <class T>
void attention_block_forward(T* x2, AttnSaved<T>& s, const T* x, const LayerView<T>& w, const ModelConfig& c,
                             const TokenBatch& b) {
  const int N = b.N, D = int(c.hidden), H = int(c.heads), KV = int(c.kv_heads), hd = int(c.hd());
  const int Q = H * hd, K = KV * hd, O = Q + 2 * K;
  s.h1 = HostArray<T>(size_t(N) * D);
  s.rstd1 = HostArray<T>(size_t(N));
  cpu::rmsnorm_forward(s.h1.data(), s.rstd1.data(), x, w.ln1, N, D, T(c.norm_eps));

  HostArray<T> qkv(size_t(N) * O, Mem::workspace);
  cpu::matmul_forward(qkv.data(), s.h1.data(), w.wqkv, N, D, O);
  s.q_raw = HostArray<T>(size_t(N) * Q);
  s.k_raw = HostArray<T>(size_t(N) * K);
  s.v = HostArray<T>(size_t(N) * K);
  for (int n = 0; n < N; ++n) {
    const T* row = qkv.data() + size_t(n) * O;
    std::memcpy(s.q_raw.data() + size_t(n) * Q, row, sizeof(T) * Q);
    std::memcpy(s.k_raw.data() + size_t(n) * K, row + Q, sizeof(T) * K);
    std::memcpy(s.v.data() + size_t(n) * K, row + Q + K, sizeof(T) * K);
  }
  s.q = HostArray<T>(size_t(N) * Q);
  s.k = HostArray<T>(size_t(N) * K);
  if (c.qk_norm) {
    s.rstd_q = HostArray<T>(size_t(N) * H);
    s.rstd_k = HostArray<T>(size_t(N) * KV);
    cpu::rmsnorm_forward(s.q.data(), s.rstd_q.data(), s.q_raw.data(), w.q_norm, N * H, hd, T(c.norm_eps));
    cpu::rmsnorm_forward(s.k.data(), s.rstd_k.data(), s.k_raw.data(), w.k_norm, N * KV, hd, T(c.norm_eps));
  } else {
    std::memcpy(s.q.data(), s.q_raw.data(), sizeof(T) * s.q.size());
    std::memcpy(s.k.data(), s.k_raw.data(), sizeof(T) * s.k.size());
  }
  cpu::rope_forward(s.q.data(), s.q.data(), b.positions, N, H, hd, c.rope_theta);
  cpu::rope_forward(s.k.data(), s.k.data(), b.positions, N, KV, hd, c.rope_theta);

  s.att = HostArray<T>(size_t(N) * Q);
  s.lse = HostArray<T>(size_t(N) * H);
  const T scale = T(1.0 / std::sqrt(double(hd)));
  cpu::attention_forward(s.att.data(), s.lse.data(), s.q.data(), s.k.data(), s.v.data(), b.cu_seqlens, b.n_docs, N, H,
                         KV, hd, scale);
  cpu::matmul_forward(x2, s.att.data(), w.wo, N, Q, D);
  for (size_t i = 0; i < size_t(N) * D; ++i) x2[i] += x[i];
}

template <class T>
void attention_block_backward(T* dx, const T* dx2, const AttnSaved<T>& s, const T* x, const LayerView<T>& w,
                              const LayerView<T>& g, const ModelConfig& c, const TokenBatch& b) {
  const int N = b.N, D = int(c.hidden), H = int(c.heads), KV = int(c.kv_heads), hd = int(c.hd());
  const int Q = H * hd, K = KV * hd, O = Q + 2 * K;
  HostArray<T> datt(size_t(N) * Q, Mem::workspace);
  cpu::matmul_backward(datt.data(), g.wo, dx2, s.att.data(), w.wo, N, Q, D);

  HostArray<T> dq(size_t(N) * Q, Mem::workspace), dk(size_t(N) * K, Mem::workspace), dv(size_t(N) * K, Mem::workspace);
  const T scale = T(1.0 / std::sqrt(double(hd)));
  cpu::attention_backward(dq.data(), dk.data(), dv.data(), datt.data(), s.att.data(), s.lse.data(), s.q.data(),
                          s.k.data(), s.v.data(), b.cu_seqlens, b.n_docs, N, H, KV, hd, scale);
  cpu::rope_backward(dq.data(), dq.data(), b.positions, N, H, hd, c.rope_theta);
  cpu::rope_backward(dk.data(), dk.data(), b.positions, N, KV, hd, c.rope_theta);

  HostArray<T> dqkv(size_t(N) * O, Mem::workspace);
  HostArray<T> dq_raw(size_t(N) * Q, Mem::workspace), dk_raw(size_t(N) * K, Mem::workspace);
  if (c.qk_norm) {
    cpu::rmsnorm_backward(dq_raw.data(), g.q_norm, dq.data(), s.q_raw.data(), w.q_norm, s.rstd_q.data(), N * H, hd);
    cpu::rmsnorm_backward(dk_raw.data(), g.k_norm, dk.data(), s.k_raw.data(), w.k_norm, s.rstd_k.data(), N * KV, hd);
  } else {
    std::memcpy(dq_raw.data(), dq.data(), sizeof(T) * dq.size());
    std::memcpy(dk_raw.data(), dk.data(), sizeof(T) * dk.size());
  }
  for (int n = 0; n < N; ++n) {
    T* row = dqkv.data() + size_t(n) * O;
    std::memcpy(row, dq_raw.data() + size_t(n) * Q, sizeof(T) * Q);
    std::memcpy(row + Q, dk_raw.data() + size_t(n) * K, sizeof(T) * K);
    std::memcpy(row + Q + K, dv.data() + size_t(n) * K, sizeof(T) * K);
  }
  HostArray<T> dh1(size_t(N) * D, Mem::workspace);
  cpu::matmul_backward(dh1.data(), g.wqkv, dqkv.data(), s.h1.data(), w.wqkv, N, D, O);
  cpu::rmsnorm_backward(dx, g.ln1, dh1.data(), x, w.ln1, s.rstd1.data(), N, D);
  for (size_t i = 0; i < size_t(N) * D; ++i) dx[i] += dx2[i];
}

template void attention_block_forward(float*, AttnSaved<float>&, const float*, const LayerView<float>&,
                                      const ModelConfig&, const TokenBatch&);
template void attention_block_forward(double*, AttnSaved<double>&, const double*, const LayerView<double>&,
                                      const ModelConfig&, const TokenBatch&);
template void attention_block_backward(float*, const float*, const AttnSaved<float>&, const float*,
                                       const LayerView<float>&, const LayerView<float>&, const ModelConfig&,
                                       const TokenBatch&);
template void attention_block_backward(double*, const double*, const AttnSaved<double>&, const double*,
                                       const LayerView<double>&, const LayerView<double>&, const ModelConfig&,
                                       const TokenBatch&);

}  // namespace mop
