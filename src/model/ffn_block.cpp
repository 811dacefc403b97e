#include "model/ffn_block.h"

#include "ops/cpu/grouped_matmul.h"
#include "ops/cpu/matmul.h"
#include "ops/cpu/moe_permute.h"
#include "ops/cpu/rmsnorm.h"
#include "ops/cpu/swiglu.h"

namespace mop {

cpu::RouterConfig router_config(const ModelConfig& c) {
  cpu::RouterConfig r;
  r.kind = c.router == "sigmoid" ? cpu::RouterKind::sigmoid : cpu::RouterKind::softmax;
  r.E = int(c.experts);
  r.K = int(c.top_k);
  r.norm_topk = c.norm_topk;
  r.n_groups = int(c.router_groups);
  r.topk_groups = int(c.router_topk_groups);
  r.routed_scale = c.routed_scale;
  return r;
}

namespace {

// A dense SwiGLU: out = down(silu(gate x) * up x), (gate; up) one (2F, D) matrix.
template <class T>
void swiglu_mlp_forward(T* out_ND, HostArray<T>& gu, HostArray<T>& a, const T* x_ND, const T* w_gu, const T* w_down,
                        int N, int D, int F) {
  gu = HostArray<T>(size_t(N) * 2 * F);
  a = HostArray<T>(size_t(N) * F);
  cpu::matmul_forward(gu.data(), x_ND, w_gu, N, D, 2 * F);
  cpu::swiglu_forward(a.data(), gu.data(), N, F);
  cpu::matmul_forward(out_ND, a.data(), w_down, N, F, D);
}

// dx_ND written.
template <class T>
void swiglu_mlp_backward(T* dx_ND, const T* dout_ND, const HostArray<T>& gu, const HostArray<T>& a, const T* x_ND,
                         const T* w_gu, const T* w_down, T* g_gu, T* g_down, int N, int D, int F) {
  HostArray<T> da(size_t(N) * F, Mem::workspace), dgu(size_t(N) * 2 * F, Mem::workspace);
  cpu::matmul_backward(da.data(), g_down, dout_ND, a.data(), w_down, N, F, D);
  cpu::swiglu_backward(dgu.data(), da.data(), gu.data(), N, F);
  cpu::matmul_backward(dx_ND, g_gu, dgu.data(), x_ND, w_gu, N, D, 2 * F);
}

}  // namespace

template <class T>
void ffn_block_forward(T* y, FfnSaved<T>& s, const T* x2, const LayerView<T>& w, const ModelConfig& c, int layer,
                       int N) {
  const int D = int(c.hidden);
  s.h2 = HostArray<T>(size_t(N) * D);
  s.rstd2 = HostArray<T>(size_t(N));
  cpu::rmsnorm_forward(s.h2.data(), s.rstd2.data(), x2, w.ln2, N, D, T(c.norm_eps));
  const size_t ND = size_t(N) * D;

  if (!c.is_moe_layer(layer)) {
    swiglu_mlp_forward(y, s.gu, s.a, s.h2.data(), w.w_gu, w.w_down, N, D, int(c.dense_width()));
    for (size_t i = 0; i < ND; ++i) y[i] += x2[i];
    return;
  }

  const int E = int(c.experts), K = int(c.top_k), F = int(c.expert_ffn), M = N * K;
  const cpu::RouterConfig rc = router_config(c);
  HostArray<T> logits(size_t(N) * E, Mem::workspace);
  cpu::matmul_forward(logits.data(), s.h2.data(), w.router, N, D, E);
  s.probs = HostArray<T>(size_t(N) * E);
  s.w = HostArray<T>(size_t(N) * K);
  s.idx = HostArray<int32_t>(size_t(N) * K);
  cpu::router_forward(s.probs.data(), s.idx.data(), s.w.data(), logits.data(), w.router_bias, rc, N);
  s.counts.assign(size_t(E), 0);
  s.lb_loss = N > 0 ? double(cpu::moe_lb_loss_forward(s.counts.data(), s.probs.data(), s.idx.data(), N, E, K)) : 0.0;

  s.row = HostArray<int32_t>(size_t(M));
  s.offsets.assign(size_t(E) + 1, 0);
  cpu::moe_route_layout(s.row.data(), s.offsets.data(), s.idx.data(), N, E, K);
  s.xp = HostArray<T>(size_t(M) * D);
  s.gu = HostArray<T>(size_t(M) * 2 * F);
  s.a = HostArray<T>(size_t(M) * F);
  s.yp = HostArray<T>(size_t(M) * D);
  cpu::moe_permute(s.xp.data(), s.h2.data(), s.row.data(), N, K, D);
  cpu::grouped_matmul_forward(s.gu.data(), s.xp.data(), w.w_gu, s.offsets.data(), E, D, 2 * F);
  cpu::swiglu_forward(s.a.data(), s.gu.data(), M, F);
  cpu::grouped_matmul_forward(s.yp.data(), s.a.data(), w.w_down, s.offsets.data(), E, F, D);
  cpu::moe_combine(y, s.yp.data(), s.w.data(), s.row.data(), N, K, D);

  if (c.shared_experts > 0) {
    HostArray<T> ys(ND, Mem::workspace);
    swiglu_mlp_forward(ys.data(), s.sgu, s.sa, s.h2.data(), w.shared_gu, w.shared_down, N, D, int(c.shared_width()));
    for (size_t i = 0; i < ND; ++i) y[i] += ys[i];
  }
  for (size_t i = 0; i < ND; ++i) y[i] += x2[i];
}

template <class T>
void ffn_block_backward(T* dx2, const T* dy, const FfnSaved<T>& s, const T* x2, const LayerView<T>& w,
                        const LayerView<T>& g, const ModelConfig& c, int layer, int N, T lb_scale) {
  const int D = int(c.hidden);
  const size_t ND = size_t(N) * D;
  HostArray<T> dh2(ND, Mem::workspace);

  if (!c.is_moe_layer(layer)) {
    swiglu_mlp_backward(dh2.data(), dy, s.gu, s.a, s.h2.data(), w.w_gu, w.w_down, g.w_gu, g.w_down, N, D,
                        int(c.dense_width()));
  } else {
    const int E = int(c.experts), K = int(c.top_k), F = int(c.expert_ffn), M = N * K;
    HostArray<T> dyp(size_t(M) * D, Mem::workspace), dw(size_t(N) * K, Mem::workspace);
    cpu::moe_combine_backward(dyp.data(), dw.data(), dy, s.yp.data(), s.w.data(), s.row.data(), N, K, D);
    HostArray<T> da(size_t(M) * F, Mem::workspace), dgu(size_t(M) * 2 * F, Mem::workspace);
    cpu::grouped_matmul_backward(da.data(), g.w_down, dyp.data(), s.a.data(), w.w_down, s.offsets.data(), E, F, D);
    cpu::swiglu_backward(dgu.data(), da.data(), s.gu.data(), M, F);
    HostArray<T> dxp(size_t(M) * D, Mem::workspace);
    cpu::grouped_matmul_backward(dxp.data(), g.w_gu, dgu.data(), s.xp.data(), w.w_gu, s.offsets.data(), E, D, 2 * F);
    cpu::moe_permute_backward(dh2.data(), dxp.data(), s.row.data(), N, K, D);

    HostArray<T> dprobs(size_t(N) * E, Mem::workspace);
    if (lb_scale != T(0) && N > 0)
      cpu::moe_lb_loss_backward(dprobs.data(), lb_scale, s.counts.data(), N, E, K);
    HostArray<T> dlogits(size_t(N) * E, Mem::workspace), dh_router(ND, Mem::workspace);
    cpu::router_backward(dlogits.data(), dw.data(), dprobs.data(), s.probs.data(), s.idx.data(), router_config(c), N);
    cpu::matmul_backward(dh_router.data(), g.router, dlogits.data(), s.h2.data(), w.router, N, D, E);
    for (size_t i = 0; i < ND; ++i) dh2[i] += dh_router[i];

    if (c.shared_experts > 0) {
      HostArray<T> dhs(ND, Mem::workspace);
      swiglu_mlp_backward(dhs.data(), dy, s.sgu, s.sa, s.h2.data(), w.shared_gu, w.shared_down, g.shared_gu,
                          g.shared_down, N, D, int(c.shared_width()));
      for (size_t i = 0; i < ND; ++i) dh2[i] += dhs[i];
    }
  }
  cpu::rmsnorm_backward(dx2, g.ln2, dh2.data(), x2, w.ln2, s.rstd2.data(), N, D);
  for (size_t i = 0; i < ND; ++i) dx2[i] += dy[i];
}

#define INSTANTIATE(T)                                                                                              \
  template void ffn_block_forward(T*, FfnSaved<T>&, const T*, const LayerView<T>&, const ModelConfig&, int, int);  \
  template void ffn_block_backward(T*, const T*, const FfnSaved<T>&, const T*, const LayerView<T>&,                \
                                   const LayerView<T>&, const ModelConfig&, int, int, T);
INSTANTIATE(float)
INSTANTIATE(double)
#undef INSTANTIATE

}  // namespace mop
