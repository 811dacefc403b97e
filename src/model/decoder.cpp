#include "model/decoder.h"

#include <algorithm>
#include <cstring>

#include "ops/cpu/cross_entropy.h"
#include "ops/cpu/embedding.h"
#include "ops/cpu/matmul.h"
#include "ops/cpu/rmsnorm.h"

namespace mop {

void LossStats::add(const LossStats& o) {
  ce_sum += o.ce_sum;
  ce_tokens += o.ce_tokens;
  lb_sum += o.lb_sum;
  ep_load.add(o.ep_load);
  if (counts.size() < o.counts.size()) counts.resize(o.counts.size(), 0);
  for (size_t i = 0; i < o.counts.size(); ++i) counts[i] += o.counts[i];
}

template <class T>
FlatParams<T>::FlatParams(const ParamTable& t, const ModelConfig& c, const T* params, T* grads)
    : w_(make_view<T>(t, c, const_cast<T*>(params))), g_(grads ? make_view<T>(t, c, grads) : ModelView<T>{}) {
  if (!grads) g_.layers.resize(size_t(c.layers));
}

template <class T> void FlatParams<T>::acquire_outer(bool, ModelView<T>& w, ModelView<T>& g) {
  w.embed = w_.embed, w.final_norm = w_.final_norm, w.head = w_.head;
  g.embed = g_.embed, g.final_norm = g_.final_norm, g.head = g_.head;
}

template <class T> void FlatParams<T>::acquire_layer(int l, bool, LayerView<T>& w, LayerView<T>& g) {
  w = w_.layers[size_t(l)];
  g = g_.layers[size_t(l)];
}

template <class T> Decoder<T>::Decoder(const ModelConfig& c, const ParamTable& t) : c_(c), table_(t) {
  w_.layers.resize(size_t(c.layers));
  g_.layers.resize(size_t(c.layers));
}

template <class T> void Decoder<T>::bind(const T* params, T* grads) {
  flat_ = std::make_unique<FlatParams<T>>(table_, c_, params, grads);
  src_ = flat_.get();
}

template <class T> void Decoder<T>::bind(ParamSource<T>* source) {
  flat_.reset();
  src_ = source;
}

template <class T> void Decoder<T>::layer_forward(int l, const T* x_in, T* x_out, LayerSaved& s, const TokenBatch& b) {
  s.x2 = HostArray<T>(size_t(b.N) * c_.hidden);
  attention_block_forward(s.x2.data(), s.attn, x_in, w_.layers[l], c_, b);
  ffn_block_forward(x_out, s.ffn, s.x2.data(), w_.layers[l], c_, l, b.N, comm_);
}

template <class T>
double Decoder<T>::head_loss(const T* hf, const TokenBatch& b, T* dhf, T ce_scale, int64_t* tokens) {
  const int N = b.N, D = int(c_.hidden), V = int(c_.vocab_size);
  const int R = std::max(1, head_chunk_rows);
  const size_t rows = size_t(std::min(N, R));
  HostArray<T> logits(rows * V, Mem::workspace), dlogits(dhf ? rows * V : 0, Mem::workspace),
      loss(size_t(R), Mem::workspace), lse(size_t(R), Mem::workspace);
  double sum = 0;
  *tokens = 0;
  for (int r0 = 0; r0 < N; r0 += R) {
    const int n = std::min(R, N - r0);
    const T* x = hf + size_t(r0) * D;
    const int32_t* tg = b.targets + r0;
    for (int i = 0; i < n; ++i) *tokens += tg[i] >= 0;
    cpu::matmul_forward(logits.data(), x, w_.head, n, D, V);
    sum += cpu::cross_entropy_forward(loss.data(), lse.data(), logits.data(), tg, n, V);
    if (!dhf) continue;
    cpu::cross_entropy_backward(dlogits.data(), logits.data(), lse.data(), tg, ce_scale, n, V);
    cpu::matmul_backward(dhf + size_t(r0) * D, g_.head, dlogits.data(), x, w_.head, n, D, V);
  }
  return sum;
}

template <class T>
LossStats Decoder<T>::forward_backward(const TokenBatch& b, T ce_scale, T lb_scale, Recompute r) {
  MOP_CHECK(src_, "forward_backward: no parameters bound");
  MOP_CHECK(b.targets, "forward_backward needs targets");
  src_->acquire_outer(true, w_, g_);
  MOP_CHECK(g_.embed, "forward_backward needs gradients bound");
  const int N = b.N, D = int(c_.hidden), L = int(c_.layers), E = int(c_.experts);
  const size_t ND = size_t(N) * D;
  LossStats st;
  st.counts.assign(size_t(L) * E, 0);

  // Layer inputs x_0..x_L. With recomputation they are the only activations kept across layers.
  const Mem xcat = r == Recompute::full ? Mem::checkpoints : Mem::activations;
  std::vector<HostArray<T>> xs(size_t(L) + 1);
  std::vector<LayerSaved> saved(static_cast<size_t>(L));
  xs[0] = HostArray<T>(ND, xcat);
  cpu::embedding_forward(xs[0].data(), b.tokens, w_.embed, N, D, int(c_.vocab_size));
  for (int l = 0; l < L; ++l) {
    xs[l + 1] = HostArray<T>(ND, xcat);
    src_->acquire_layer(l, false, w_.layers[l], g_.layers[l]);
    layer_forward(l, xs[l].data(), xs[l + 1].data(), saved[l], b);
    src_->release_layer(l, false);
    st.lb_sum += saved[l].ffn.lb_loss;
    st.ep_load.add(saved[l].ffn.ep_load);
    for (size_t e = 0; e < saved[l].ffn.counts.size(); ++e) st.counts[size_t(l) * E + e] = saved[l].ffn.counts[e];
    if (r == Recompute::full) saved[l] = LayerSaved{};
  }

  HostArray<T> hf(ND), rstd(static_cast<size_t>(N)), dhf(ND, Mem::workspace);
  cpu::rmsnorm_forward(hf.data(), rstd.data(), xs[L].data(), w_.final_norm, N, D, T(c_.norm_eps));
  st.ce_sum = head_loss(hf.data(), b, dhf.data(), ce_scale, &st.ce_tokens);

  HostArray<T> dx(ND, Mem::workspace), dx2(ND, Mem::workspace);
  cpu::rmsnorm_backward(dx.data(), g_.final_norm, dhf.data(), xs[L].data(), w_.final_norm, rstd.data(), N, D);
  for (int l = L - 1; l >= 0; --l) {
    LayerSaved& s = saved[l];
    src_->acquire_layer(l, true, w_.layers[l], g_.layers[l]);
    if (r == Recompute::full) {
      HostArray<T> x_out(ND, Mem::workspace);
      layer_forward(l, xs[l].data(), x_out.data(), s, b);
    }
    ffn_block_backward(dx2.data(), dx.data(), s.ffn, s.x2.data(), w_.layers[l], g_.layers[l], c_, l, N,
                       c_.is_moe_layer(l) ? lb_scale : T(0), comm_);
    attention_block_backward(dx.data(), dx2.data(), s.attn, xs[l].data(), w_.layers[l], g_.layers[l], c_, b);
    saved[l] = LayerSaved{};
    xs[l + 1] = HostArray<T>();
    src_->release_layer(l, true);
  }
  cpu::embedding_backward(g_.embed, dx.data(), b.tokens, N, D, int(c_.vocab_size));
  src_->release_outer(true);
  return st;
}

template <class T> LossStats Decoder<T>::forward_loss(const TokenBatch& b) {
  const int N = b.N, D = int(c_.hidden), L = int(c_.layers), E = int(c_.experts);
  const size_t ND = size_t(N) * D;
  LossStats st;
  st.counts.assign(size_t(L) * E, 0);
  MOP_CHECK(src_, "forward_loss: no parameters bound");
  src_->acquire_outer(false, w_, g_);
  HostArray<T> x(ND), y(ND);
  cpu::embedding_forward(x.data(), b.tokens, w_.embed, N, D, int(c_.vocab_size));
  for (int l = 0; l < L; ++l) {
    LayerSaved s;
    src_->acquire_layer(l, false, w_.layers[l], g_.layers[l]);
    layer_forward(l, x.data(), y.data(), s, b);
    src_->release_layer(l, false);
    st.lb_sum += s.ffn.lb_loss;
    st.ep_load.add(s.ffn.ep_load);
    for (size_t e = 0; e < s.ffn.counts.size(); ++e) st.counts[size_t(l) * E + e] = s.ffn.counts[e];
    std::swap(x, y);
  }
  HostArray<T> hf(ND), rstd(static_cast<size_t>(N));
  cpu::rmsnorm_forward(hf.data(), rstd.data(), x.data(), w_.final_norm, N, D, T(c_.norm_eps));
  if (b.targets) st.ce_sum = head_loss(hf.data(), b, nullptr, T(0), &st.ce_tokens);
  src_->release_outer(false);
  return st;
}

template <class T> void Decoder<T>::logits_at(const TokenBatch& b, int row, T* logits_V) {
  const int N = b.N, D = int(c_.hidden), L = int(c_.layers);
  MOP_CHECK(row >= 0 && row < N, "logits_at: row {} outside batch of {} tokens", row, N);
  const size_t ND = size_t(N) * D;
  MOP_CHECK(src_, "logits_at: no parameters bound");
  src_->acquire_outer(false, w_, g_);
  HostArray<T> x(ND), y(ND);
  cpu::embedding_forward(x.data(), b.tokens, w_.embed, N, D, int(c_.vocab_size));
  for (int l = 0; l < L; ++l) {
    LayerSaved s;
    src_->acquire_layer(l, false, w_.layers[l], g_.layers[l]);
    layer_forward(l, x.data(), y.data(), s, b);
    src_->release_layer(l, false);
    std::swap(x, y);
  }
  std::vector<T> h(static_cast<size_t>(D));
  T rstd;
  cpu::rmsnorm_forward(h.data(), &rstd, x.data() + size_t(row) * D, w_.final_norm, 1, D, T(c_.norm_eps));
  cpu::matmul_forward(logits_V, h.data(), w_.head, 1, D, int(c_.vocab_size));
  src_->release_outer(false);
}

template class FlatParams<float>;
template class FlatParams<double>;
template class Decoder<float>;
template class Decoder<double>;

}  // namespace mop
