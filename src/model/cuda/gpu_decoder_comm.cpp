// GpuDecoder across ranks: expert-parallel MoE layers (each token's row once to every rank owning
// one of its experts, one gate-weighted row back: parallel/cuda/expert_exchange_gpu.h) and the
// load-balancing statistics of the whole micro-batch. Same math as the CPU path (model/ffn_block.cpp, parallel/zero.cpp).
// Balanced layers (GpuDecoderOptions::ep_balance, parallel/expert_balance.h) also compute their
// moved blocks as guest rows after the local experts' (gpu_acts.h), with the experts' weights lent
// and their gradients returned on the side stream (lend_experts, return_guest_grads).
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <utility>

#include "model/cuda/gpu_acts.h"
#include "model/cuda/gpu_decoder.h"
#include "ops/cuda/check.cuh"
#include "ops/cuda/elementwise.h"
#include "ops/cuda/grouped_matmul.h"
#include "ops/cuda/moe_ep.h"
#include "ops/cuda/moe_permute.h"
#include "ops/cuda/swiglu.h"
#include "parallel/process_group.h"
#include "parallel/cuda/device_group.h"
#include "parallel/cuda/expert_exchange_gpu.h"
#include "parallel/cuda/skip_group.h"
#include "parallel/expert_dispatch.h"

namespace mop {

using bf16 = __nv_bfloat16;

bool GpuDecoder::expert_parallel() const { return comm_.ep && comm_.ep->size() > 1; }

void GpuDecoder::set_comm(const GpuComm& comm) {
  MOP_CHECK(!state_ready_, "GpuDecoder::set_comm after upload_params: the state's layout depends on the groups");
  MOP_CHECK(!comm.world || comm.world->stream() == comm_stream_, "GpuDecoder: the world group must run on comm_stream()");
  MOP_CHECK(!comm.edp || comm.edp->stream() == comm_stream_, "GpuDecoder: the edp group must run on comm_stream()");
  MOP_CHECK(!comm.ep || comm.ep->stream() == stream_, "GpuDecoder: the ep group must run on stream()");
  comm_ = comm;
  MOP_CHECK(!expert_parallel() || opt_.recompute != GpuRecompute::full,
            "train.checkpointing = full with parallel.ep > 1 on the GPU would repeat the expert exchange in "
            "backward; use selective (it keeps the experts' rows) or none");
  MOP_CHECK(!expert_parallel() || comm_.ep_host, "GpuDecoder: expert parallelism needs the host ep group");
  MOP_CHECK(!expert_parallel() || !opt_.ep_balance || (comm_.ep_side && comm_.ep_side->stream() == side_stream_),
            "GpuDecoder: balanced expert parallelism needs the ep group on side_stream()");
  const size_t L = size_t(c_.layers), E = size_t(c_.experts);
  lb_global_.assign(L, 0.0);
  lb_grad_factor_.assign(L, 1.f);
  lb_sums_.assign(L, std::vector<double>(2 * E + 1, 0.0));
  lb_work_.clear();
  lb_work_.resize(L);
  lb_mean_pin_ = PinnedHost<float>(E);
  counts_pin_ = PinnedHost<int32_t>(L * E);
  acts_.reset();  // the activation layout depends on expert parallelism
  acts_N_ = -1;
}

void GpuDecoder::global_lb_copy(int l) {
  Acts& a = *acts_;
  auto& y = a.layers[size_t(l)];
  const size_t E = size_t(c_.experts);
  // moe_lb_loss left the column means of the probabilities in a.dprobs.
  MOP_CUDA_CHECK(cudaMemcpyAsync(lb_mean_pin_.data(), a.dprobs, E * 4, cudaMemcpyDeviceToHost, stream_));
  MOP_CUDA_CHECK(cudaMemcpyAsync(counts_pin_.data() + size_t(l) * E, y.counts, E * 4, cudaMemcpyDeviceToHost, stream_));
}

// The sums go out on the world group's worker; nothing before backward needs them, so the forward
// goes on (the host waits for them in global_lb_finish, by which time they are long done).
void GpuDecoder::global_lb_start(int l) {
  const int N = acts_->N, E = int(c_.experts);
  const int32_t* cnt = counts_pin_.data() + size_t(l) * size_t(E);
  std::vector<double>& v = lb_sums_[size_t(l)];  // (probability sums, counts, tokens)
  for (int e = 0; e < E; ++e) {
    v[size_t(e)] = N > 0 ? double(lb_mean_pin_.data()[e]) * N : 0.0;
    v[size_t(E + e)] = double(cnt[e]);
  }
  v[size_t(2 * E)] = double(N);
  lb_work_[size_t(l)] = comm_.world_host->all_reduce_sum_async(v.data(), v.size());
}

void GpuDecoder::global_lb_finish() {
  Acts& a = *acts_;
  const int N = a.N, E = int(c_.experts), K = int(c_.top_k);
  for (int l = 0; l < int(lb_work_.size()); ++l) {  // empty without set_comm (one rank)
    std::unique_ptr<Work> work = std::move(lb_work_[size_t(l)]);
    if (!work) continue;
    work->wait();
    const std::vector<double>& v = lb_sums_[size_t(l)];
    int32_t* cnt = counts_pin_.data() + size_t(l) * size_t(E);
    const double Nt = v[size_t(2 * E)];
    double loss = 0;
    for (int e = 0; e < E; ++e) {
      cnt[e] = int32_t(v[size_t(E + e)]);
      if (Nt > 0) loss += v[size_t(E + e)] / (Nt * K) * (v[size_t(e)] / Nt);
    }
    lb_global_[size_t(l)] = E * loss;
    // Backward's kernel computes dloss * E * (counts / (N K)) / N with this rank's N; the global
    // gradient is dloss * E * (counts / (Nt K)) / Nt, so dloss is scaled by (N / Nt)^2.
    lb_grad_factor_[size_t(l)] = Nt > 0 ? float((double(N) / Nt) * (double(N) / Nt)) : 0.f;
    // The global counts replace the local ones on the device (backward and the statistics read
    // them); the next write of cnt is the next micro-batch's copy, ordered after this one.
    MOP_CUDA_CHECK(cudaMemcpyAsync(a.layers[size_t(l)].counts, cnt, size_t(E) * 4, cudaMemcpyHostToDevice, stream_));
  }
}

void GpuDecoder::route_log(int l) {
  Acts& a = *acts_;
  auto& y = a.layers[size_t(l)];
  const size_t L = size_t(c_.layers), NK = size_t(a.N) * size_t(c_.top_k), key = size_t(micro_) * L + size_t(l);
  if (route_mode_ == RouteLog::record) {
    if (route_log_.size() <= key) route_log_.resize(key + 1);
    Buffer& b = route_log_[key];
    if (b.bytes() != NK * 8) b = Buffer(Device::cuda, Mem::workspace, NK * 8);
    MOP_CUDA_CHECK(cudaMemcpyAsync(b.data(), y.idx, NK * 4, cudaMemcpyDeviceToDevice, stream_));
    MOP_CUDA_CHECK(cudaMemcpyAsync(b.as<char>() + NK * 4, y.w, NK * 4, cudaMemcpyDeviceToDevice, stream_));
    return;
  }
  MOP_CHECK(key < route_log_.size() && route_log_[key].bytes() == NK * 8,
            "GpuDecoder: no recorded routing of {} tokens for micro-batch {}, layer {} (record_routing first, same "
            "batch shape)", a.N, micro_, l);
  const Buffer& b = route_log_[key];
  MOP_CUDA_CHECK(cudaMemcpyAsync(y.idx, b.data(), NK * 4, cudaMemcpyDeviceToDevice, stream_));
  MOP_CUDA_CHECK(cudaMemcpyAsync(y.w, b.as<char>() + NK * 4, NK * 4, cudaMemcpyDeviceToDevice, stream_));
}

void GpuDecoder::skip_comm() {
  MOP_CHECK(state_ready_ && !comm_skipped(), "GpuDecoder::skip_comm: before upload_params, or twice");
  MOP_CHECK(!route_log_.empty() || !expert_parallel(),
            "GpuDecoder::skip_comm with expert parallelism needs a step with record_routing first");
  synchronize();
  auto skip = [&](DeviceGroup*& g) {
    if (!g) return;
    skip_groups_.push_back(std::make_unique<SkipGroup>(g->rank(), g->size(), g->device(), g->stream(), g->name()));
    DeviceGroup* to = skip_groups_.back().get();
    for (Unit& u : units_)
      if (u.group == g) u.group = to;
    g = to;
  };
  skip(comm_.world), skip(comm_.ep), skip(comm_.edp), skip(comm_.ep_side);
  route_mode_ = route_log_.empty() ? RouteLog::off : RouteLog::replay;
}

// Rows of the layer's owner side grow with the routing (the stream is past the layer's host sync
// here, and no kernel still reads the old buffers: the last reader was this layer's backward of
// the previous step, which ended in a host wait).

void GpuDecoder::experts_forward_ep(int l) {
  Acts& a = *acts_;
  auto& y = a.layers[size_t(l)];
  const LayerView<bf16>& w = w_.layers[size_t(l)];
  const int N = a.N, K = int(c_.top_k), F = int(c_.expert_ffn), D = int(c_.hidden), E = int(c_.experts);
  cudaStream_t st = stream_;
  Acts::EpLayer& el = a.ep[size_t(l)];
  GpuTokenExchange& x = el.x;
  const int P = comm_.ep->size();
  // Skipped steps replay the recorded step's routing, so its gathered counts are theirs too (the
  // skipping group gathers nothing, and a host round trip would be communication the real step
  // does not have).
  const size_t key = size_t(micro_) * size_t(c_.layers) + size_t(l);
  if (route_mode_ == RouteLog::record && x.device_plan) {
    if (plan_log_.size() <= key) plan_log_.resize(key + 1);
    plan_log_[key].assign(x.plan_host.data(), x.plan_host.data() + x.plan_host.size());
  } else if (route_mode_ == RouteLog::replay) {
    MOP_CHECK(key < plan_log_.size() && plan_log_[key].size() == x.plan_host.size(),
              "GpuDecoder: no recorded exchange counts for micro-batch {}, layer {}", micro_, l);
    std::copy(plan_log_[key].begin(), plan_log_[key].end(), x.plan_host.data());
    x.device_plan = true;
  }
  token_exchange_plan(x, *comm_.ep_host, y.offsets_host.data(), st, opt_.ep_balance ? &opt_.balance : nullptr);
  const TokenExchangePlan& p = x.plan;
  const size_t R = size_t(p.pairs_in()), Rg = size_t(p.guest_pairs()), Rt = size_t(p.tokens_in());
  const size_t Rall = R + Rg;  // the pair buffers' rows: the local experts', then the guests'
  const int El = p.local_experts, G = int(p.guest_experts.size());
  ep_load_.add(p.layer_load());
  const bool keep = opt_.recompute == GpuRecompute::none;  // else selective (full is refused)
  auto bf16_rows = [](size_t rows, int width, Mem m) { return Buffer(Device::cuda, m, rows * size_t(width) * 2); };
  if (Rall > el.r_cap) {
    el.r_cap = grow_rows(Rall);
    el.xl = Buffer(), el.gu = Buffer(), el.a = Buffer(), el.yl = Buffer();
    if (keep) el.xl = bf16_rows(el.r_cap, D, Mem::activations), el.a = bf16_rows(el.r_cap, F, Mem::activations);
    el.gu = bf16_rows(el.r_cap, 2 * F, Mem::activations);
    el.yl = bf16_rows(el.r_cap, D, Mem::activations);
  }
  if (!keep && (Rt > el.rt_cap || !el.xr.data())) {
    el.rt_cap = grow_rows(Rt);
    el.xr = Buffer();
    el.xr = bf16_rows(el.rt_cap, D, Mem::activations);
  }
  if (G > 0 && !el.guest_w.data()) {  // the layer's first guests: room for as many as a plan may hold
    const size_t most = size_t(opt_.balance.max_guests);
    el.guest_w = Buffer(Device::cuda, Mem::comm, most * 3 * size_t(F) * size_t(D) * 2);
    el.gslot = Buffer(Device::cuda, Mem::comm, size_t(N) * size_t(K) * sizeof(int32_t));
  }
  if (Rall > a.ep_r_cap) {
    a.ep_r_cap = grow_rows(Rall);
    a.ep_xl = Buffer(), a.ep_a = Buffer(), a.ep_tmp = Buffer(), a.ep_da = Buffer(), a.ep_dgu = Buffer(),
    a.ep_dxl = Buffer();
    if (!keep) a.ep_xl = bf16_rows(a.ep_r_cap, D, Mem::activations), a.ep_a = bf16_rows(a.ep_r_cap, F, Mem::activations);
    a.ep_tmp = bf16_rows(a.ep_r_cap, D, Mem::workspace);
    a.ep_da = bf16_rows(a.ep_r_cap, F, Mem::workspace);
    a.ep_dgu = bf16_rows(a.ep_r_cap, 2 * F, Mem::workspace);
    if (opt_.ep_overlap) a.ep_dxl = bf16_rows(a.ep_r_cap, D, Mem::workspace);
  }
  if (Rt > a.ep_rt_cap || !a.ep_recv.data()) {
    a.ep_rt_cap = grow_rows(Rt);
    a.ep_recv = Buffer(), a.ep_dgate = Buffer();
    a.ep_recv = bf16_rows(a.ep_rt_cap, D, Mem::comm);
    a.ep_dgate = Buffer(Device::cuda, Mem::comm, a.ep_rt_cap * size_t(K) * 4);
  }
  if (p.balanced) lend_experts(l);  // on the side stream, beside what follows
  mark("moe_sync");  // the layer's host sync, the plan's all-gather, the buffers
  bf16* xl = keep ? el.xl.as<bf16>() : a.ep_xl.as<bf16>();
  bf16* act = keep ? el.a.as<bf16>() : a.ep_a.as<bf16>();
  bf16* xr = keep ? a.ep_recv.as<bf16>() : el.xr.as<bf16>();
  bf16* recv = a.ep_recv.as<bf16>();
  bf16 *gu = el.gu.as<bf16>(), *yl = el.yl.as<bf16>();
  const int32_t* off_d = x.local_offsets();
  const int32_t* off_h = p.local_offsets.data();
  const int32_t* gslot = el.gslot.as<int32_t>();
  const bf16* gw_gu = el.guest_w.as<bf16>();
  const bf16* gw_down = gw_gu + size_t(G) * 2 * F * D;
  // Where each pair goes, then each token's row once to each rank owning one of its experts.
  token_exchange_layout(x, *comm_.ep, y.idx, y.w, y.row, y.offsets, a.ep_send_pos, a.ep_send_gate);
  if (G > 0) cuda::moe_ep_guest_rows(el.gslot.as<int32_t>(), y.idx, y.row, y.offsets, x.guest_base(), N, K, E, st);
  cuda::moe_permute(a.ep_send, y.h2, x.slot.as<int32_t>(), N, P, D, st);
  comm_pending_ = token_exchange_rows(*comm_.ep, p, a.ep_send, xr, D, DType::bf16, /*to_owners=*/true);
  mark("ep_exchange");  // with the send layout and packing kernels
  if (R > 0) {
    cuda::moe_permute(xl, xr, x.pos.as<int32_t>(), int(Rt), K, D, st);
    cuda::grouped_matmul_forward(gu, xl, w.w_gu, off_d, off_h, El, D, 2 * F, st);
  }
  // The guests' weights are in (and the lent ones read) by now, the local experts' first product
  // having run beside their transfer.
  if (p.balanced) MOP_CUDA_CHECK(cudaStreamWaitEvent(st, side_lent_, 0));
  const int32_t* goff_d = x.guest_offsets();
  const int32_t* goff_h = p.guest_offsets.data();
  if (Rg > 0) {  // the guest rows straight from this rank's own tokens
    cuda::moe_permute(xl + R * D, y.h2, gslot, N, K, D, st);
    cuda::grouped_matmul_forward(gu + R * 2 * F, xl + R * D, gw_gu, goff_d, goff_h, G, D, 2 * F, st);
  }
  if (Rall > 0) cuda::swiglu_forward(act, gu, int(Rall), F, st);
  if (R > 0) cuda::grouped_matmul_forward(yl, act, w.w_down, off_d, off_h, El, F, D, st);
  if (Rg > 0) cuda::grouped_matmul_forward(yl + R * D, act + R * F, gw_down, goff_d, goff_h, G, F, D, st);
  // Each received token's pairs as one gate-weighted row (recv is free again), back home, summed
  // over the ranks into the layer's expert output; the guest pairs' share of each token is summed
  // here (into dh, unused in the forward) and joins that sum.
  if (Rt > 0) cuda::moe_combine(recv, yl, x.gate.as<float>(), x.pos.as<int32_t>(), int(Rt), K, D, st);
  if (Rg > 0) cuda::moe_combine(a.dh, yl + R * D, y.w, gslot, N, K, D, st);
  mark("forward");
  comm_pending_ = token_exchange_rows(*comm_.ep, p, recv, a.ep_send, D, DType::bf16, /*to_owners=*/false);
  cuda::moe_ep_home_sum(a.dtmp, a.ep_send, x.slot.as<int32_t>(), Rg > 0 ? a.dh : nullptr, N, P, D, st);
  mark("ep_exchange");
}

// The weights of the experts this rank lends go out, and its guests' come in, on the side stream
// after the compute stream has made this layer's weights readable (gathered into their slot at
// zero 3). Every rank of the group takes part once any block of the layer moved.
void GpuDecoder::lend_experts(int l) {
  Acts& a = *acts_;
  Acts::EpLayer& el = a.ep[size_t(l)];
  const TokenExchangePlan& p = el.x.plan;
  const LayerView<bf16>& w = w_.layers[size_t(l)];
  const size_t F = size_t(c_.expert_ffn), D = size_t(c_.hidden), n_gu = 2 * F * D, n_down = D * F;
  const size_t lent = p.lent_out(), G = p.guest_experts.size();
  cudaStream_t ss = side_stream_;
  if (lent > a.lend_cap) {  // grown only while the side stream is idle (its last send read the old one)
    MOP_CUDA_CHECK(cudaStreamSynchronize(ss));
    a.lend_cap = lent;
    a.lend_send = Buffer();
    a.lend_send = Buffer(Device::cuda, Mem::comm, lent * (n_gu + n_down) * 2);
  }
  MOP_CUDA_CHECK(cudaEventRecord(side_in_, stream_));
  MOP_CUDA_CHECK(cudaStreamWaitEvent(ss, side_in_, 0));
  bf16* send_gu = a.lend_send.as<bf16>();
  bf16* send_down = send_gu + lent * n_gu;
  size_t i = 0;
  for (const std::vector<int32_t>& to : p.lent)
    for (int32_t j : to) {
      MOP_CUDA_CHECK(cudaMemcpyAsync(send_gu + i * n_gu, w.w_gu + size_t(j) * n_gu, n_gu * 2, cudaMemcpyDeviceToDevice, ss));
      MOP_CUDA_CHECK(cudaMemcpyAsync(send_down + i * n_down, w.w_down + size_t(j) * n_down, n_down * 2,
                                     cudaMemcpyDeviceToDevice, ss));
      ++i;
    }
  bf16* recv_gu = el.guest_w.as<bf16>();
  bf16* recv_down = recv_gu + G * n_gu;
  const int gu = int(n_gu), down = int(n_down);
  comm_.ep_side->all_to_all_v_async(send_gu, row_elements(p.lending, gu), recv_gu, row_elements(p.borrowed, gu),
                                    DType::bf16);
  side_last_ = comm_.ep_side->all_to_all_v_async(send_down, row_elements(p.lending, down), recv_down,
                                                 row_elements(p.borrowed, down), DType::bf16);
  MOP_CUDA_CHECK(cudaEventRecord(side_lent_, ss));
}

// The guests' weight gradients (this layer's, in guest_dw[guest_dw_turn_]) to the experts' owners
// on the side stream once the weight-gradient stream has them, and the returned gradients of the
// experts this rank lent added to its own (after its own products of them, wgrad_all_). The
// expert unit's reduction and the end of backward wait for side_added_.
template <class G>
void GpuDecoder::return_guest_grads(int l, const LayerView<G>& g) {
  Acts& a = *acts_;
  const TokenExchangePlan& p = a.ep[size_t(l)].x.plan;
  const size_t F = size_t(c_.expert_ffn), D = size_t(c_.hidden), n_gu = 2 * F * D, n_down = D * F;
  const size_t lent = p.lent_out(), Gn = p.guest_experts.size();
  cudaStream_t ss = side_stream_;
  if (lent > a.lent_dw_cap) {
    MOP_CUDA_CHECK(cudaStreamSynchronize(ss));
    a.lent_dw_cap = lent;
    a.lent_dw = Buffer();
    a.lent_dw = Buffer(Device::cuda, Mem::comm, lent * (n_gu + n_down) * sizeof(G));
  }
  MOP_CUDA_CHECK(cudaStreamWaitEvent(ss, wgrad_all_, 0));
  const int turn = guest_dw_turn_;
  const G* dw_gu = Gn ? a.guest_dw[turn].as<G>() : nullptr;
  const G* dw_down = Gn ? dw_gu + Gn * n_gu : nullptr;
  G* back_gu = a.lent_dw.as<G>();
  G* back_down = back_gu + lent * n_gu;
  const DType t = std::is_same_v<G, float> ? DType::f32 : DType::bf16;
  const int gu = int(n_gu), down = int(n_down);
  comm_.ep_side->all_to_all_v_async(dw_gu, row_elements(p.borrowed, gu), back_gu, row_elements(p.lending, gu), t);
  side_last_ = comm_.ep_side->all_to_all_v_async(dw_down, row_elements(p.borrowed, down), back_down,
                                                 row_elements(p.lending, down), t);
  if (Gn) MOP_CUDA_CHECK(cudaEventRecord(guest_dw_free_[turn], ss));
  auto add = [&](G* to, const G* from, size_t n) {
    if constexpr (std::is_same_v<G, float>) cuda::add_f32(to, from, n, ss);
    else cuda::add_bf16(to, to, from, n, ss);
  };
  size_t i = 0;  // in the borrowers' order, each borrower's experts ascending: the order they were lent in
  for (const std::vector<int32_t>& to : p.lent)
    for (int32_t j : to) {
      add(g.w_gu + size_t(j) * n_gu, back_gu + i * n_gu, n_gu);
      add(g.w_down + size_t(j) * n_down, back_down + i * n_down, n_down);
      ++i;
    }
  MOP_CUDA_CHECK(cudaEventRecord(side_added_, ss));
  side_pending_ = true;
}

void GpuDecoder::join_side() {
  if (!side_pending_) return;
  MOP_CUDA_CHECK(cudaStreamWaitEvent(stream_, side_added_, 0));
  side_pending_ = false;
}

// With ep_overlap the weight gradients go to the wgrad stream once dxl exists (the return exchange
// needs nothing else): there they run beside the exchange (and the waiting for a slower peer), the
// rest of this layer's backward and the next MoE layer's outgoing exchange; that layer joins them
// (join_wgrad) before it rewrites their inputs. Their persistent kernels leave SMs free for the
// communication kernels (a persistent kernel keeps its SMs to the end, so a collective launched
// after it would wait). Without it, the same products in the same order on the compute stream.
template <class G>
void GpuDecoder::experts_backward_ep(int l, const LayerView<G>& g) {
  Acts& a = *acts_;
  auto& y = a.layers[size_t(l)];
  const LayerView<bf16>& w = w_.layers[size_t(l)];
  const int N = a.N, E = int(c_.experts), K = int(c_.top_k), F = int(c_.expert_ffn), D = int(c_.hidden);
  cudaStream_t st = stream_;
  Acts::EpLayer& el = a.ep[size_t(l)];
  const GpuTokenExchange& x = el.x;
  const TokenExchangePlan& p = x.plan;
  MOP_CHECK(p.local_offsets.size() == size_t(p.local_experts) + 1 && x.N == N,
            "GpuDecoder: expert-parallel backward of layer {} without its forward", l);
  const int P = comm_.ep->size();
  const size_t R = size_t(p.pairs_in()), Rg = size_t(p.guest_pairs()), Rt = size_t(p.tokens_in());
  const size_t Rall = R + Rg;
  const int El = p.local_experts, Gn = int(p.guest_experts.size());
  const bool keep = opt_.recompute == GpuRecompute::none, overlap = opt_.ep_overlap;
  bf16* xl = keep ? el.xl.as<bf16>() : a.ep_xl.as<bf16>();
  bf16* act = keep ? el.a.as<bf16>() : a.ep_a.as<bf16>();
  bf16* recv = a.ep_recv.as<bf16>();
  bf16 *gu = el.gu.as<bf16>(), *yl = el.yl.as<bf16>();
  bf16* dyl = a.ep_tmp.as<bf16>();
  bf16* dxl = overlap ? a.ep_dxl.as<bf16>() : dyl;  // in place: dyl's last reader runs first
  bf16* da = a.ep_da.as<bf16>();
  bf16* dgu = a.ep_dgu.as<bf16>();
  const int32_t* off_d = x.local_offsets();
  const int32_t* off_h = p.local_offsets.data();
  const int32_t* goff_d = x.guest_offsets();
  const int32_t* goff_h = p.guest_offsets.data();
  const int32_t* gslot = el.gslot.as<int32_t>();
  const bf16* gw_gu = el.guest_w.as<bf16>();
  const bf16* gw_down = gw_gu + size_t(Gn) * 2 * F * D;
  G* const no_dw = nullptr;
  // d(expert output) once to each owner; there, each pair's gradient and its gate's.
  mark("backward");
  cuda::moe_permute(a.ep_send, a.dx, x.slot.as<int32_t>(), N, P, D, st);
  comm_pending_ = token_exchange_rows(*comm_.ep, p, a.ep_send, recv, D, DType::bf16, /*to_owners=*/true);
  mark("ep_exchange");
  join_wgrad();  // the previous MoE layer's weight gradients read the buffers written below
  if (Rt > 0)
    cuda::moe_combine_backward(dyl, a.ep_dgate.as<float>(), recv, yl, x.gate.as<float>(), x.pos.as<int32_t>(), int(Rt),
                               K, D, st);
  if (Rg > 0)  // the guest pairs' from this rank's own d(output)
    cuda::moe_combine_backward(dyl + R * D, a.guest_dgate.as<float>(), a.dx, yl + R * D, y.w, gslot, N, K, D, st);
  cudaStream_t ws = overlap ? wgrad_stream_ : st;
  G *gdw_gu = nullptr, *gdw_down = nullptr;  // the guests' weight gradients, sent to their owners
  if (Rg > 0) {
    const size_t bytes = size_t(opt_.balance.max_guests) * 3 * size_t(F) * size_t(D) * sizeof(G);
    if (a.guest_dw_cap < bytes) {  // once, at the size of the most guests a plan may hold
      MOP_CUDA_CHECK(cudaStreamSynchronize(side_stream_));
      for (Buffer& b : a.guest_dw) b = Buffer(), b = Buffer(Device::cuda, Mem::comm, bytes);
      a.guest_dw_cap = bytes;
    }
    guest_dw_turn_ ^= 1;  // the other buffer may still be on its way out
    gdw_gu = a.guest_dw[guest_dw_turn_].as<G>();
    gdw_down = gdw_gu + size_t(Gn) * 2 * F * D;
    MOP_CUDA_CHECK(cudaStreamWaitEvent(ws, guest_dw_free_[guest_dw_turn_], 0));
  }
  if (Rall > 0) {
    if (!keep) {  // the forward's bits again: the same expansion and SwiGLU
      if (R > 0) cuda::moe_permute(xl, el.xr.as<bf16>(), x.pos.as<int32_t>(), int(Rt), K, D, st);
      if (Rg > 0) cuda::moe_permute(xl + R * D, y.h2, gslot, N, K, D, st);
      cuda::swiglu_forward(act, gu, int(Rall), F, st);
    }
    if (R > 0) cuda::grouped_matmul_backward(da, no_dw, dyl, act, w.w_down, off_d, off_h, El, F, D, st);
    if (Rg > 0)
      cuda::grouped_matmul_backward(da + R * F, no_dw, dyl + R * D, act + R * F, gw_down, goff_d, goff_h, Gn, F, D, st);
    if (!overlap) {
      if (R > 0)
        cuda::grouped_matmul_backward(nullptr, g.w_down, dyl, act, w.w_down, off_d, off_h, El, F, D, st, dw_overwrite_);
      if (Rg > 0)
        cuda::grouped_matmul_backward(nullptr, gdw_down, dyl + R * D, act + R * F, gw_down, goff_d, goff_h, Gn, F, D,
                                      st, /*dw_overwrite=*/true);
    }
    cuda::swiglu_backward(dgu, da, gu, int(Rall), F, st);
    if (R > 0) cuda::grouped_matmul_backward(dxl, no_dw, dgu, xl, w.w_gu, off_d, off_h, El, D, 2 * F, st);
    if (Rg > 0)
      cuda::grouped_matmul_backward(dxl + R * D, no_dw, dgu + R * 2 * F, xl + R * D, gw_gu, goff_d, goff_h, Gn, D,
                                    2 * F, st);
  }
  if (overlap) {
    MOP_CUDA_CHECK(cudaEventRecord(wgrad_in_, st));
    MOP_CUDA_CHECK(cudaStreamWaitEvent(ws, wgrad_in_, 0));
  }
  {
    const cuda::GroupedSmLimit limit(overlap ? wgrad_sms_ : 0);
    if (R > 0) {
      if (overlap) cuda::grouped_matmul_backward(nullptr, g.w_down, dyl, act, w.w_down, off_d, off_h, El, F, D, ws,
                                                 dw_overwrite_);
      cuda::grouped_matmul_backward(nullptr, g.w_gu, dgu, xl, w.w_gu, off_d, off_h, El, D, 2 * F, ws, dw_overwrite_);
    } else if (dw_overwrite_) {  // no pairs here: the local experts' gradients are zero
      MOP_CUDA_CHECK(cudaMemsetAsync(g.w_down, 0, size_t(El) * D * F * sizeof(G), ws));
      MOP_CUDA_CHECK(cudaMemsetAsync(g.w_gu, 0, size_t(El) * 2 * F * D * sizeof(G), ws));
    }
    if (Rg > 0) {
      if (overlap)
        cuda::grouped_matmul_backward(nullptr, gdw_down, dyl + R * D, act + R * F, gw_down, goff_d, goff_h, Gn, F, D,
                                      ws, /*dw_overwrite=*/true);
      cuda::grouped_matmul_backward(nullptr, gdw_gu, dgu + R * 2 * F, xl + R * D, gw_gu, goff_d, goff_h, Gn, D, 2 * F,
                                    ws, /*dw_overwrite=*/true);
    }
  }
  if (overlap) {
    MOP_CUDA_CHECK(cudaEventRecord(wgrad_done_, ws));
    wgrad_pending_ = true;
  }
  if (p.balanced) {  // every rank of the group: the guests' gradients out, the lent experts' back
    MOP_CUDA_CHECK(cudaEventRecord(wgrad_all_, ws));
    return_guest_grads(l, g);
  }
  // Each token's pair gradients summed (recv is free again), back home with the gate gradients;
  // the guest pairs' summed per token here (into dx2, unused until the layer's norm backward).
  if (Rt > 0) cuda::moe_permute_backward(recv, dxl, x.pos.as<int32_t>(), int(Rt), K, D, st);
  if (Rg > 0) cuda::moe_permute_backward(a.dx2, dxl + R * D, gslot, N, K, D, st);
  mark("backward");
  token_exchange_rows(*comm_.ep, p, a.ep_dgate.data(), a.ep_send_gate, K, DType::f32, /*to_owners=*/false);
  comm_pending_ = token_exchange_rows(*comm_.ep, p, recv, a.ep_send, D, DType::bf16, /*to_owners=*/false);
  cuda::moe_ep_home_sum(a.dh, a.ep_send, x.slot.as<int32_t>(), Rg > 0 ? a.dx2 : nullptr, N, P, D, st);
  mark("ep_exchange");
  cuda::moe_ep_gate_grads(a.dw, a.ep_send_gate, x.slot.as<int32_t>(), y.idx, N, K, E, P, st,
                          Rg > 0 ? a.guest_dgate.as<float>() : nullptr);
}

void GpuDecoder::join_wgrad() {
  if (!wgrad_pending_) return;
  MOP_CUDA_CHECK(cudaStreamWaitEvent(stream_, wgrad_done_, 0));
  wgrad_pending_ = false;
}

template void GpuDecoder::experts_backward_ep(int, const LayerView<float>&);
template void GpuDecoder::experts_backward_ep(int, const LayerView<bf16>&);
template void GpuDecoder::return_guest_grads(int, const LayerView<float>&);
template void GpuDecoder::return_guest_grads(int, const LayerView<bf16>&);

}  // namespace mop
