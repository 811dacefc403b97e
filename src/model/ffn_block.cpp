#include "model/ffn_block.h"

#include <algorithm>

#include "ops/cpu/grouped_matmul.h"
#include "ops/cpu/matmul.h"
#include "ops/cpu/moe_permute.h"
#include "ops/cpu/rmsnorm.h"
#include "ops/cpu/swiglu.h"
#include "parallel/expert_balance.h"
#include "parallel/process_group.h"
#include "parallel/token_exchange.h"

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

// Load-balancing loss over the whole micro-batch when its tokens are spread over dp ranks: the
// expert counts and the probability sums are summed over the ranks (one small all-reduce), so the
// loss and its gradient are those of the single-rank run. Returns the (global) loss.
template <class T>
double global_lb_loss(FfnSaved<T>& s, ProcessGroup& dp, int N, int E, int K) {
  cpu::moe_lb_loss_forward(s.counts.data(), s.probs.data(), s.idx.data(), N, E, K);  // local counts
  std::vector<double> v(size_t(2 * E + 1), 0.0);  // (probability sums, counts, tokens)
  for (int n = 0; n < N; ++n)
    for (int e = 0; e < E; ++e) v[size_t(e)] += double(s.probs[size_t(n) * E + e]);
  for (int e = 0; e < E; ++e) v[size_t(E + e)] = double(s.counts[size_t(e)]);
  v[size_t(2 * E)] = double(N);
  dp.all_reduce_sum(v.data(), v.size());
  s.lb_tokens = int64_t(v[size_t(2 * E)]);
  for (int e = 0; e < E; ++e) s.counts[size_t(e)] = int32_t(v[size_t(E + e)]);
  if (s.lb_tokens == 0 || K == 0) return 0.0;
  const double Nt = double(s.lb_tokens);
  double loss = 0;
  for (int e = 0; e < E; ++e) loss += v[size_t(E + e)] / (Nt * K) * (v[size_t(e)] / Nt);
  return E * loss;
}

bool expert_parallel(const MoeComm& comm) { return comm.ep && comm.ep->size() > 1; }

// Balanced expert parallelism on the host (parallel/expert_balance.h; the GPU's is
// model/cuda/gpu_decoder_comm.cpp). The rows of a moved block stay where they are in the
// expert-sorted buffers and are computed here with the lent weights; the others travel as without
// balancing, packed in the same order.

// The rows of the experts that were not moved, between the whole expert-sorted buffer (M rows)
// and a packed one: to_packed, or back.
template <class T>
void pack_unmoved(T* packed, T* whole, const std::vector<int32_t>& off, const std::vector<uint8_t>& moved, int D,
                  bool to_packed) {
  size_t at = 0;
  for (size_t e = 0; e + 1 < off.size(); ++e) {
    const size_t n = size_t(off[e + 1] - off[e]) * size_t(D);
    if (moved[e]) continue;
    T* w = whole + size_t(off[e]) * size_t(D);
    if (to_packed) std::copy(w, w + n, packed + at);
    else std::copy(packed + at, packed + at + n, w);
    at += n;
  }
}

// Everything the balanced forward decides from the counts (one all-gather over ep) and the lent
// weights; then the unmoved rows' exchange and the guests' rows.
template <class T>
void balanced_experts_forward(FfnSaved<T>& s, const LayerView<T>& w, const ModelConfig& c, const MoeComm& comm) {
  ProcessGroup& ep = *comm.ep;
  const int P = ep.size(), me = ep.rank(), E = int(c.experts), F = int(c.expert_ffn), D = int(c.hidden);
  const int El = E / P;
  const size_t W = size_t(E + P), n_gu = size_t(2 * F) * D, n_w = size_t(3 * F) * D;
  // Rows per global expert from every rank (no token columns: this exchange moves rows).
  const std::vector<int64_t> cnt = gather_token_exchange_counts(ep, s.offsets.data(), E, nullptr);
  const std::vector<uint8_t> moved = plan_expert_balance(P, E, cnt.data(), *comm.balance);
  auto tp = std::make_shared<TokenExchangePlan>(make_token_exchange_plan(P, me, E, cnt.data(), moved));
  std::vector<int64_t> send_cnt(static_cast<size_t>(E)), recv_cnt(static_cast<size_t>(E));  // recv: (source, El)
  for (int e = 0; e < E; ++e) send_cnt[size_t(e)] = moved[size_t(me) * E + e] ? 0 : cnt[size_t(me) * W + e];
  for (int q = 0; q < P; ++q)
    for (int j = 0; j < El; ++j)
      recv_cnt[size_t(q) * El + j] = moved[size_t(q) * E + me * El + j] ? 0 : cnt[size_t(q) * W + me * El + j];
  auto plan = std::make_shared<ExpertPlan>(make_expert_plan(P, E, send_cnt.data(), recv_cnt.data()));
  s.moved.assign(moved.begin() + ptrdiff_t(me) * E, moved.begin() + ptrdiff_t(me + 1) * E);

  // The lent experts' weights to their guests, each as (2F, D) then (D, F).
  const std::vector<int32_t>& guests = tp->guest_experts;
  HostArray<T> lend(tp->lent_out() * n_w, Mem::comm);
  size_t i = 0;
  for (const std::vector<int32_t>& to : tp->lent)
    for (int32_t j : to) {
      std::copy(w.w_gu + size_t(j) * n_gu, w.w_gu + size_t(j + 1) * n_gu, lend.data() + i * n_w);
      std::copy(w.w_down + size_t(j) * (n_w - n_gu), w.w_down + size_t(j + 1) * (n_w - n_gu),
                lend.data() + i * n_w + n_gu);
      ++i;
    }
  s.guest_w = HostArray<T>(guests.size() * n_w);
  ep.all_to_all_v(lend.data(), row_elements(tp->lending, int(n_w)), s.guest_w.data(), row_elements(tp->borrowed, int(n_w)));

  // The unmoved rows to their owners and back, as without balancing.
  const size_t R = size_t(plan->rows_in());
  s.xl = HostArray<T>(R * D);
  s.gu = HostArray<T>(R * 2 * F);
  s.a = HostArray<T>(R * F);
  HostArray<T> xs(size_t(plan->rows_out()) * D, Mem::workspace), yl(R * D, Mem::workspace);
  pack_unmoved(xs.data(), s.xp.data(), s.offsets, s.moved, D, /*to_packed=*/true);
  expert_dispatch(ep, *plan, xs.data(), s.xl.data(), D);
  cpu::grouped_matmul_forward(s.gu.data(), s.xl.data(), w.w_gu, plan->local_offsets.data(), El, D, 2 * F);
  cpu::swiglu_forward(s.a.data(), s.gu.data(), int(R), F);
  cpu::grouped_matmul_forward(yl.data(), s.a.data(), w.w_down, plan->local_offsets.data(), El, F, D);
  expert_return(ep, *plan, yl.data(), xs.data(), D);
  pack_unmoved(xs.data(), s.yp.data(), s.offsets, s.moved, D, /*to_packed=*/false);

  // The guests' rows where they are.
  const size_t Rg = size_t(tp->guest_pairs());
  s.guest_gu = HostArray<T>(Rg * 2 * F);
  s.guest_a = HostArray<T>(Rg * F);
  for (size_t g = 0; g < guests.size(); ++g) {
    const int e = guests[g], n = s.offsets[size_t(e) + 1] - s.offsets[size_t(e)];
    const size_t r0 = size_t(s.offsets[size_t(e)]), g0 = size_t(tp->guest_offsets[g]);
    const T* wg = s.guest_w.data() + g * n_w;
    cpu::matmul_forward(s.guest_gu.data() + g0 * 2 * F, s.xp.data() + r0 * D, wg, n, D, 2 * F);
    cpu::swiglu_forward(s.guest_a.data() + g0 * F, s.guest_gu.data() + g0 * 2 * F, n, F);
    cpu::matmul_forward(s.yp.data() + r0 * D, s.guest_a.data() + g0 * F, wg + n_gu, n, F, D);
  }
  s.ep_load = tp->layer_load();
  s.plan = std::move(plan);
  s.guests = std::move(tp);
}

// The mirror: the unmoved rows' output gradients to the owners and their input gradients back;
// the guests' rows here, their weight gradients home, added to the owners'.
template <class T>
void balanced_experts_backward(T* dxp, T* dyp, const FfnSaved<T>& s, const LayerView<T>& w, const LayerView<T>& g,
                               const ModelConfig& c, const MoeComm& comm) {
  ProcessGroup& ep = *comm.ep;
  const ExpertPlan& p = *s.plan;
  const TokenExchangePlan& tp = *s.guests;
  const int F = int(c.expert_ffn), D = int(c.hidden), El = p.local_experts;
  const size_t n_gu = size_t(2 * F) * D, n_w = size_t(3 * F) * D, R = size_t(p.rows_in());
  HostArray<T> ys(size_t(p.rows_out()) * D, Mem::workspace), dyl(R * D, Mem::workspace), da(R * F, Mem::workspace),
      dgu(R * 2 * F, Mem::workspace), dxl(R * D, Mem::workspace);
  pack_unmoved(ys.data(), dyp, s.offsets, s.moved, D, /*to_packed=*/true);
  expert_dispatch(ep, p, ys.data(), dyl.data(), D);
  cpu::grouped_matmul_backward(da.data(), g.w_down, dyl.data(), s.a.data(), w.w_down, p.local_offsets.data(), El, F, D);
  cpu::swiglu_backward(dgu.data(), da.data(), s.gu.data(), int(R), F);
  cpu::grouped_matmul_backward(dxl.data(), g.w_gu, dgu.data(), s.xl.data(), w.w_gu, p.local_offsets.data(), El, D,
                               2 * F);
  expert_return(ep, p, dxl.data(), ys.data(), D);
  pack_unmoved(ys.data(), dxp, s.offsets, s.moved, D, /*to_packed=*/false);

  const std::vector<int32_t>& guests = tp.guest_experts;
  HostArray<T> gdw(guests.size() * n_w, Mem::comm);  // zeros: the guests' weight gradients
  for (size_t k = 0; k < guests.size(); ++k) {
    const int e = guests[k], n = s.offsets[size_t(e) + 1] - s.offsets[size_t(e)];
    const size_t r0 = size_t(s.offsets[size_t(e)]), g0 = size_t(tp.guest_offsets[k]);
    const T* wg = s.guest_w.data() + k * n_w;
    T* dw = gdw.data() + k * n_w;
    HostArray<T> gda(size_t(n) * F, Mem::workspace), gdgu(size_t(n) * 2 * F, Mem::workspace);
    cpu::matmul_backward(gda.data(), dw + n_gu, dyp + r0 * D, s.guest_a.data() + g0 * F, wg + n_gu, n, F, D);
    cpu::swiglu_backward(gdgu.data(), gda.data(), s.guest_gu.data() + g0 * 2 * F, n, F);
    cpu::matmul_backward(dxp + r0 * D, dw, gdgu.data(), s.xp.data() + r0 * D, wg, n, D, 2 * F);
  }
  HostArray<T> back(tp.lent_out() * n_w, Mem::comm);
  ep.all_to_all_v(gdw.data(), row_elements(tp.borrowed, int(n_w)), back.data(), row_elements(tp.lending, int(n_w)));
  size_t i = 0;  // in the order they were lent
  for (const std::vector<int32_t>& to : tp.lent)
    for (int32_t j : to) {
      const T* b = back.data() + i++ * n_w;
      for (size_t x = 0; x < n_gu; ++x) g.w_gu[size_t(j) * n_gu + x] += b[x];
      for (size_t x = 0; x < n_w - n_gu; ++x) g.w_down[size_t(j) * (n_w - n_gu) + x] += b[n_gu + x];
    }
}

}  // namespace

template <class T>
void ffn_block_forward(T* y, FfnSaved<T>& s, const T* x2, const LayerView<T>& w, const ModelConfig& c, int layer,
                       int N, const MoeComm& comm) {
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
  s.lb_tokens = N;
  if (comm.dp && comm.dp->size() > 1)
    s.lb_loss = global_lb_loss(s, *comm.dp, N, E, K);
  else
    s.lb_loss = N > 0 ? double(cpu::moe_lb_loss_forward(s.counts.data(), s.probs.data(), s.idx.data(), N, E, K)) : 0.0;

  s.row = HostArray<int32_t>(size_t(M));
  s.offsets.assign(size_t(E) + 1, 0);
  cpu::moe_route_layout(s.row.data(), s.offsets.data(), s.idx.data(), N, E, K);
  s.xp = HostArray<T>(size_t(M) * D);
  s.yp = HostArray<T>(size_t(M) * D);
  cpu::moe_permute(s.xp.data(), s.h2.data(), s.row.data(), N, K, D);
  if (expert_parallel(comm) && comm.balance) {
    balanced_experts_forward(s, w, c, comm);
  } else if (!expert_parallel(comm)) {
    s.gu = HostArray<T>(size_t(M) * 2 * F);
    s.a = HostArray<T>(size_t(M) * F);
    cpu::grouped_matmul_forward(s.gu.data(), s.xp.data(), w.w_gu, s.offsets.data(), E, D, 2 * F);
    cpu::swiglu_forward(s.a.data(), s.gu.data(), M, F);
    cpu::grouped_matmul_forward(s.yp.data(), s.a.data(), w.w_down, s.offsets.data(), E, F, D);
  } else {
    // Send the rows to the ranks owning their experts, run the local experts, bring the rows back.
    auto plan = std::make_shared<ExpertPlan>(plan_expert_exchange(*comm.ep, s.offsets.data(), E));
    const int El = plan->local_experts;
    const size_t R = size_t(plan->rows_in());
    s.xl = HostArray<T>(R * D);
    s.gu = HostArray<T>(R * 2 * F);
    s.a = HostArray<T>(R * F);
    HostArray<T> yl(R * D, Mem::workspace);
    expert_dispatch(*comm.ep, *plan, s.xp.data(), s.xl.data(), D);
    cpu::grouped_matmul_forward(s.gu.data(), s.xl.data(), w.w_gu, plan->local_offsets.data(), El, D, 2 * F);
    cpu::swiglu_forward(s.a.data(), s.gu.data(), int(R), F);
    cpu::grouped_matmul_forward(yl.data(), s.a.data(), w.w_down, plan->local_offsets.data(), El, F, D);
    expert_return(*comm.ep, *plan, yl.data(), s.yp.data(), D);
    s.plan = std::move(plan);
  }
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
                        const LayerView<T>& g, const ModelConfig& c, int layer, int N, T lb_scale,
                        const MoeComm& comm) {
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
    HostArray<T> dxp(size_t(M) * D, Mem::workspace);
    if (s.guests) {
      MOP_CHECK(expert_parallel(comm), "ffn backward: forward ran expert-parallel, backward has no EP group");
      balanced_experts_backward(dxp.data(), dyp.data(), s, w, g, c, comm);
    } else if (!s.plan) {
      HostArray<T> da(size_t(M) * F, Mem::workspace), dgu(size_t(M) * 2 * F, Mem::workspace);
      cpu::grouped_matmul_backward(da.data(), g.w_down, dyp.data(), s.a.data(), w.w_down, s.offsets.data(), E, F, D);
      cpu::swiglu_backward(dgu.data(), da.data(), s.gu.data(), M, F);
      cpu::grouped_matmul_backward(dxp.data(), g.w_gu, dgu.data(), s.xp.data(), w.w_gu, s.offsets.data(), E, D, 2 * F);
    } else {
      // The mirror of the forward exchange: output gradients travel to the experts, input
      // gradients travel back.
      MOP_CHECK(expert_parallel(comm), "ffn backward: forward ran expert-parallel, backward has no EP group");
      const ExpertPlan& p = *s.plan;
      const int El = p.local_experts;
      const size_t R = size_t(p.rows_in());
      HostArray<T> dyl(R * D, Mem::workspace), da(R * F, Mem::workspace), dgu(R * 2 * F, Mem::workspace),
          dxl(R * D, Mem::workspace);
      expert_dispatch(*comm.ep, p, dyp.data(), dyl.data(), D);
      cpu::grouped_matmul_backward(da.data(), g.w_down, dyl.data(), s.a.data(), w.w_down, p.local_offsets.data(), El,
                                   F, D);
      cpu::swiglu_backward(dgu.data(), da.data(), s.gu.data(), int(R), F);
      cpu::grouped_matmul_backward(dxl.data(), g.w_gu, dgu.data(), s.xl.data(), w.w_gu, p.local_offsets.data(), El, D,
                                   2 * F);
      expert_return(*comm.ep, p, dxl.data(), dxp.data(), D);
    }
    cpu::moe_permute_backward(dh2.data(), dxp.data(), s.row.data(), N, K, D);

    HostArray<T> dprobs(size_t(N) * E, Mem::workspace);
    if (lb_scale != T(0) && N > 0) {
      if (s.lb_tokens == N) {
        cpu::moe_lb_loss_backward(dprobs.data(), lb_scale, s.counts.data(), N, E, K);
      } else {  // global statistics: this rank's tokens get their share of the whole micro-batch's loss
        const double Nt = double(s.lb_tokens);
        std::vector<T> ge(static_cast<size_t>(E));
        for (int e = 0; e < E; ++e) ge[size_t(e)] = T(double(lb_scale) * E * (double(s.counts[size_t(e)]) / (Nt * K)) / Nt);
        for (int n = 0; n < N; ++n)
          for (int e = 0; e < E; ++e) dprobs[size_t(n) * E + e] += ge[size_t(e)];
      }
    }
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
  template void ffn_block_forward(T*, FfnSaved<T>&, const T*, const LayerView<T>&, const ModelConfig&, int, int,   \
                                  const MoeComm&);                                                              \
  template void ffn_block_backward(T*, const T*, const FfnSaved<T>&, const T*, const LayerView<T>&,                \
                                   const LayerView<T>&, const ModelConfig&, int, int, T, const MoeComm&);
INSTANTIATE(float)
INSTANTIATE(double)
#undef INSTANTIATE

}  // namespace mop
