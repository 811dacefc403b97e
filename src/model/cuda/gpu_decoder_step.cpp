// GpuDecoder's step: the layers' forward, the LM head and loss, and backward with the recompute
// mode's layer reruns. Same math and order as model/decoder.cpp.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "model/cuda/gpu_acts.h"
#include "model/cuda/gpu_decoder.h"
#include "model/ffn_block.h"
#include "ops/cuda/attention.h"
#include "ops/cuda/cast.h"
#include "ops/cuda/check.cuh"
#include "ops/cuda/cross_entropy.h"
#include "ops/cuda/elementwise.h"
#include "ops/cuda/embedding.h"
#include "ops/cuda/grouped_matmul.h"
#include "ops/cuda/matmul.h"
#include "ops/cuda/moe_permute.h"
#include "ops/cuda/rmsnorm.h"
#include "ops/cuda/rope.h"
#include "ops/cuda/router.h"
#include "ops/cuda/swiglu.h"
#include "parallel/process_group.h"

namespace mop {

using bf16 = __nv_bfloat16;

LossStats GpuDecoder::forward_backward(const TokenBatch& b, float ce_scale, float lb_scale) {
  return run(b, ce_scale, lb_scale, true);
}
LossStats GpuDecoder::forward_loss(const TokenBatch& b) { return run(b, 0.f, 0.f, false); }

// recompute: backward's rerun. The routing, the residual stream and the layer output are kept from
// the forward, so the rerun computes only what the layer's backward reads; selective recompute
// also keeps the attention and the FFN GEMM outputs and reruns only the norms, QK-norm/RoPE, the
// output projection, the permutation and SwiGLU.
void GpuDecoder::layer_forward(int l, bool recompute) {
  Acts& a = *acts_;
  const int N = a.N, D = int(c_.hidden), H = int(c_.heads), KV = int(c_.kv_heads), hd = int(c_.hd());
  const int E = int(c_.experts), K = int(c_.top_k), F = int(c_.expert_ffn);
  const int Q = H * hd, KD = KV * hd, O = Q + 2 * KD, M = N * K;
  const float eps = float(c_.norm_eps), scale = float(1.0 / std::sqrt(double(hd)));
  cudaStream_t st = stream_;
  auto& y = a.layers[size_t(l)];
  const LayerView<bf16>& w = w_.layers[size_t(l)];
  const bf16* x = a.xs[size_t(l)];
  const bool heavy = !recompute || opt_.recompute == GpuRecompute::full;  // attention and FFN GEMMs

  cuda::rmsnorm_forward(y.h1, y.rstd1, x, w.ln1, N, D, eps, st);
  if (heavy) {
    cuda::matmul_forward(a.qkv, y.h1, w.wqkv, N, D, O, st);
    // The fused product's column blocks into contiguous q, k, v (the attention backward's inputs).
    cuda::copy_rows_bf16(y.q_raw, Q, a.qkv, O, size_t(N), Q, st);
    cuda::copy_rows_bf16(y.k_raw, KD, a.qkv + Q, O, size_t(N), KD, st);
    cuda::copy_rows_bf16(y.v, KD, a.qkv + Q + KD, O, size_t(N), KD, st);
  }
  cuda::qk_norm_rope_forward(y.q, c_.qk_norm ? y.rstd_q : nullptr, y.q_raw, w.q_norm, a.positions, N, H, hd, Q, eps,
                             c_.rope_theta, st);
  cuda::qk_norm_rope_forward(y.k, c_.qk_norm ? y.rstd_k : nullptr, y.k_raw, w.k_norm, a.positions, N, KV, hd, KD, eps,
                             c_.rope_theta, st);
  if (heavy)
    cuda::attention_forward(y.att, y.lse, y.q, y.k, y.v, a.cu, a.cu_host, a.n_docs, a.max_doc, N, H, KV, hd, scale, Q,
                            KD, a.workspace.data(), a.workspace_bytes, st);
  cuda::matmul_forward(a.dtmp, y.att, w.wo, N, Q, D, st);
  // x2 = x + o and h2 = rmsnorm(x2) in one pass.
  cuda::rmsnorm_residual_forward(y.x2, y.h2, y.rstd2, x, a.dtmp, w.ln2, N, D, eps, st);

  if (!c_.is_moe_layer(l)) {
    const int Fd = int(c_.dense_width());
    if (heavy) cuda::matmul_forward(y.gu, y.h2, w.w_gu, N, D, 2 * Fd, st);
    cuda::swiglu_forward(y.a, y.gu, N, Fd, st);
    if (!recompute) cuda::matmul_forward(a.dtmp, y.a, w.w_down, N, Fd, D, st);
  } else {
    if (!recompute) {
      const cpu::RouterConfig rc = router_config(c_);
      cuda::matmul_forward_f32out(a.logits, y.h2, w.router, N, D, E, st);
      cuda::router_forward(y.probs, y.idx, y.w, a.logits, router_bias_[size_t(l)], rc, N, st);
      if (route_mode_ != RouteLog::off) route_log(l);
      cuda::moe_expert_counts(y.counts, y.idx, N, E, K, st);
      cuda::moe_lb_loss(y.lb, a.dprobs, y.probs, y.counts, N, E, K, st);
      // Several data-parallel ranks: the statistics of the whole micro-batch (counts made global
      // on the device after the route layout has used the local ones).
      const bool global_lb = comm_.world_host && comm_.world_host->size() > 1;
      cuda::moe_route_layout(y.row, y.offsets, y.idx, N, E, K, a.workspace.data(), a.workspace_bytes, st);
      if (global_lb) global_lb_copy(l);
      if (expert_parallel())  // every rank's counts gathered on the device (none with a skipping group)
        if (auto w = token_exchange_count(a.ep[size_t(l)].x, *comm_.ep, y.idx, y.offsets, N, K, E))
          comm_pending_ = std::move(w);
      // The one host synchronisation of the layer: the grouped GEMM takes its sizes from the host
      // (and the statistics go to the other ranks from there, asynchronously).
      mark("forward");
      MOP_CUDA_CHECK(cudaMemcpyAsync(y.offsets_host.data(), y.offsets, size_t(E + 1) * 4, cudaMemcpyDeviceToHost, st));
      wait_comm();
      MOP_CUDA_CHECK(cudaStreamSynchronize(st));
      if (global_lb) global_lb_start(l);
      if (!expert_parallel()) mark("moe_sync");  // else after the exchange's plan
    }
    if (expert_parallel()) {
      // The owner side keeps the layer's pairs, their SwiGLU input and output (set_comm refuses
      // full recompute), so a rerun has nothing to redo here; the expert output lands in dtmp.
      if (!recompute) experts_forward_ep(l);
    } else {
      cuda::moe_permute(y.xp, y.h2, y.row, N, K, D, st);
      if (heavy) cuda::grouped_matmul_forward(y.gu, y.xp, w.w_gu, y.offsets, y.offsets_host.data(), E, D, 2 * F, st);
      cuda::swiglu_forward(y.a, y.gu, M, F, st);
      if (heavy) cuda::grouped_matmul_forward(y.yp, y.a, w.w_down, y.offsets, y.offsets_host.data(), E, F, D, st);
      if (!recompute) cuda::moe_combine(a.dtmp, y.yp, y.w, y.row, N, K, D, st);
    }
    if (c_.shared_experts > 0) {
      const int Fs = int(c_.shared_width());
      if (heavy) cuda::matmul_forward(y.sgu, y.h2, w.shared_gu, N, D, 2 * Fs, st);
      cuda::swiglu_forward(y.sa, y.sgu, N, Fs, st);
      if (!recompute) {
        cuda::matmul_forward(a.dh, y.sa, w.shared_down, N, Fs, D, st);
        cuda::add_bf16(a.dtmp, a.dtmp, a.dh, size_t(N) * D, st);
      }
    }
  }
  if (!recompute) cuda::add_bf16(a.xs[size_t(l) + 1], y.x2, a.dtmp, size_t(N) * D, st);
}

// Final norm, then the LM head and the loss a chunk of rows at a time: the N x V logits never
// exist whole, and the chunk's logits buffer becomes its gradient in place. head_grad null: loss only.
template <class T>
void GpuDecoder::head(T* head_grad, bool has_targets, float ce_scale) {
  Acts& a = *acts_;
  const int N = a.N, D = int(c_.hidden), V = int(c_.vocab_size), L = int(c_.layers);
  cudaStream_t st = stream_;
  cuda::rmsnorm_forward(a.hf, a.rstdf, a.xs[size_t(L)], w_.final_norm, N, D, float(c_.norm_eps), st);
  if (!has_targets) return;
  const int R = a.head_rows;
  for (int r0 = 0; r0 < N; r0 += R) {
    const int n = std::min(R, N - r0);
    cuda::matmul_forward(a.logits_chunk, a.hf + size_t(r0) * D, w_.head, n, D, V, st);
    cuda::cross_entropy_forward_backward(a.ce_loss + r0, a.ce_lse + r0, head_grad ? a.logits_chunk : nullptr,
                                         a.logits_chunk, a.targets + r0, n, V, ce_scale, st);
    if (head_grad)
      cuda::matmul_backward(a.dh + size_t(r0) * D, head_grad, a.logits_chunk, a.hf + size_t(r0) * D, w_.head, n, D, V,
                            st);
  }
}

template <class G>
void GpuDecoder::backward_pass(const ModelView<G>& g, float lb_scale) {
  Acts& a = *acts_;
  const int N = a.N, D = int(c_.hidden), L = int(c_.layers), V = int(c_.vocab_size);
  cudaStream_t st = stream_;
  mark("head");
  cuda::rmsnorm_backward(a.dx, g.final_norm, a.dh, a.xs[size_t(L)], w_.final_norm, a.rstdf, N, D, a.scratch, st);
  head_grads_done();
  for (int l = L - 1; l >= 0; --l) {
    mark("backward");
    acquire_layer(l, /*backward=*/true);
    if (opt_.zero >= 1) mark("zero_wait");
    if (opt_.recompute != GpuRecompute::none) layer_forward(l, /*recompute=*/true), mark("recompute");
    layer_backward(l, g.layers[size_t(l)], lb_scale);
    release_layer(l, /*backward=*/true);
  }
  join_wgrad();  // what reads the gradients next runs on the compute stream
  join_side();   // and the lent experts' returned gradients are in
  cuda::embedding_backward(g.embed, a.dx, a.tokens, N, D, V, a.workspace.data(), a.workspace_bytes, st);
  embed_grads_done();
  mark("backward");
}

// dx holds d(layer output) on entry and d(layer input) on exit.
template <class G>
void GpuDecoder::layer_backward(int l, const LayerView<G>& g, float lb_scale) {
  Acts& a = *acts_;
  const int N = a.N, D = int(c_.hidden), H = int(c_.heads), KV = int(c_.kv_heads), hd = int(c_.hd());
  const int E = int(c_.experts), K = int(c_.top_k), F = int(c_.expert_ffn);
  const int Q = H * hd, KD = KV * hd, O = Q + 2 * KD, M = N * K;
  const float scale = float(1.0 / std::sqrt(double(hd)));
  cudaStream_t st = stream_;
  float* scratch = a.scratch;
  auto& y = a.layers[size_t(l)];
  const LayerView<bf16>& w = w_.layers[size_t(l)];
  const bf16* x = a.xs[size_t(l)];
  // FFN branch: out = x2 + f(h2); dx holds d(out).
  if (!c_.is_moe_layer(l)) {
    const int Fd = int(c_.dense_width());
    cuda::matmul_backward(a.da, g.w_down, a.dx, y.a, w.w_down, N, Fd, D, st);
    cuda::swiglu_backward(a.dgu, a.da, y.gu, N, Fd, st);
    cuda::matmul_backward(a.dh, g.w_gu, a.dgu, y.h2, w.w_gu, N, D, 2 * Fd, st);
  } else {
    const cpu::RouterConfig rc = router_config(c_);
    if (expert_parallel()) {
      experts_backward_ep(l, g);
    } else {
      cuda::moe_combine_backward(a.dyp, a.dw, a.dx, y.yp, y.w, y.row, N, K, D, st);
      cuda::grouped_matmul_backward(a.da, g.w_down, a.dyp, y.a, w.w_down, y.offsets, y.offsets_host.data(), E, F, D,
                                    st, dw_overwrite_);
      cuda::swiglu_backward(a.dgu, a.da, y.gu, M, F, st);
      cuda::grouped_matmul_backward(a.dxp, g.w_gu, a.dgu, y.xp, w.w_gu, y.offsets, y.offsets_host.data(), E, D, 2 * F,
                                    st, dw_overwrite_);
      cuda::moe_permute_backward(a.dh, a.dxp, y.row, N, K, D, st);
    }
    MOP_CUDA_CHECK(cudaMemsetAsync(a.dprobs, 0, size_t(N) * E * 4, st));
    const float lb_factor = lb_grad_factor_.empty() ? 1.f : lb_grad_factor_[size_t(l)];
    if (lb_scale != 0.f && lb_factor != 0.f)
      cuda::moe_lb_loss_backward(a.dprobs, lb_scale * lb_factor, y.counts, N, E, K, st);
    cuda::router_backward(a.dlogits, a.dw, a.dprobs, y.probs, y.idx, rc, N, st);
    // The router GEMM's backward reads bf16: the fp32 logit gradients are rounded once here.
    cuda::cast_f32_to_bf16(a.dlogits_bf, a.dlogits, size_t(N) * E, st);
    cuda::matmul_backward(a.dtmp, g.router, a.dlogits_bf, y.h2, w.router, N, D, E, st);
    cuda::add_bf16(a.dh, a.dh, a.dtmp, size_t(N) * D, st);
    if (c_.shared_experts > 0) {
      const int Fs = int(c_.shared_width());
      cuda::matmul_backward(a.da, g.shared_down, a.dx, y.sa, w.shared_down, N, Fs, D, st);
      cuda::swiglu_backward(a.dgu, a.da, y.sgu, N, Fs, st);
      cuda::matmul_backward(a.dtmp, g.shared_gu, a.dgu, y.h2, w.shared_gu, N, D, 2 * Fs, st);
      cuda::add_bf16(a.dh, a.dh, a.dtmp, size_t(N) * D, st);
    }
  }
  cuda::rmsnorm_backward(a.dx2, g.ln2, a.dh, y.x2, w.ln2, y.rstd2, N, D, scratch, st);
  cuda::add_bf16(a.dx2, a.dx2, a.dx, size_t(N) * D, st);

  // Attention branch: x2 = x + o_proj(att); dx2 holds d(x2).
  cuda::matmul_backward(a.datt, g.wo, a.dx2, y.att, w.wo, N, Q, D, st);
  cuda::attention_backward(a.dq, a.dk, a.dv, a.datt, y.att, y.lse, y.q, y.k, y.v, a.cu, a.cu_host, a.n_docs, a.max_doc,
                           N, H, KV, hd, scale, Q, KD, a.workspace.data(), a.workspace_bytes, st);
  // datt is free again: it receives dq before the norm.
  cuda::qk_norm_rope_backward(a.datt, g.q_norm, a.dq, y.q_raw, w.q_norm, c_.qk_norm ? y.rstd_q : nullptr, a.positions,
                              N, H, hd, Q, c_.rope_theta, scratch, st);
  cuda::qk_norm_rope_backward(a.dkr, g.k_norm, a.dk, y.k_raw, w.k_norm, c_.qk_norm ? y.rstd_k : nullptr, a.positions, N,
                              KV, hd, KD, c_.rope_theta, scratch, st);
  cuda::copy_rows_bf16(a.dqkv, O, a.datt, Q, size_t(N), Q, st);
  cuda::copy_rows_bf16(a.dqkv + Q, O, a.dkr, KD, size_t(N), KD, st);
  cuda::copy_rows_bf16(a.dqkv + Q + KD, O, a.dv, KD, size_t(N), KD, st);
  cuda::matmul_backward(a.dh, g.wqkv, a.dqkv, y.h1, w.wqkv, N, D, O, st);
  cuda::rmsnorm_backward(a.dx, g.ln1, a.dh, x, w.ln1, y.rstd1, N, D, scratch, st);
  cuda::add_bf16(a.dx, a.dx, a.dx2, size_t(N) * D, st);
}

LossStats GpuDecoder::run(const TokenBatch& b, float ce_scale, float lb_scale, bool backward) {
  const int N = b.N, L = int(c_.layers), E = int(c_.experts), V = int(c_.vocab_size), D = int(c_.hidden);
  const int H = int(c_.heads), KV = int(c_.kv_heads), hd = int(c_.hd());
  cudaStream_t st = stream_;
  MOP_CHECK(state_ready_, "GpuDecoder: a step before upload_params");
  ensure_acts(N);
  Acts& a = *acts_;

  // Batch to the device. The host keeps cu_seqlens for cuDNN's maximum sequence length.
  for (int i = 0; i < N; ++i)
    MOP_CHECK(b.tokens[i] >= 0 && b.tokens[i] < V, "token {} at position {} is outside the vocabulary of {}",
              b.tokens[i], i, V);
  MOP_CUDA_CHECK(cudaMemcpyAsync(a.tokens, b.tokens, size_t(N) * 4, cudaMemcpyHostToDevice, st));
  MOP_CUDA_CHECK(cudaMemcpyAsync(a.positions, b.positions, size_t(N) * 4, cudaMemcpyHostToDevice, st));
  MOP_CUDA_CHECK(cudaMemcpyAsync(a.cu, b.cu_seqlens, size_t(b.n_docs + 1) * 4, cudaMemcpyHostToDevice, st));
  if (b.targets) MOP_CUDA_CHECK(cudaMemcpyAsync(a.targets, b.targets, size_t(N) * 4, cudaMemcpyHostToDevice, st));
  a.cu_host = b.cu_seqlens, a.n_docs = b.n_docs, a.max_doc = 0;
  for (int d = 0; d < b.n_docs; ++d) a.max_doc = std::max(a.max_doc, b.cu_seqlens[d + 1] - b.cu_seqlens[d]);
  const int Q = H * hd, KD = KV * hd;
  ensure_workspace(cuda::attention_workspace_bytes(a.n_docs, a.max_doc, N, H, KV, hd, Q, KD));

  mark("host");
  dw_overwrite_ = backward && expert_grads_stale_;
  acquire_outer();
  if (opt_.zero >= 1) mark("zero_wait");
  cuda::embedding_forward(a.xs[0], a.tokens, w_.embed, N, D, V, st);
  for (int l = 0; l < L; ++l) {
    if (opt_.zero >= 1) mark("forward");
    acquire_layer(l, /*backward=*/false);
    if (opt_.zero >= 1) mark("zero_wait");
    layer_forward(l, /*recompute=*/false);
    release_layer(l, /*backward=*/false);
  }
  mark("forward");
  global_lb_finish();
  wait_gathered(head_unit_);  // its post-update gather ran behind the layers' on the comm stream
  const bool has_targets = b.targets != nullptr;
  if (!backward) {
    head<float>(nullptr, has_targets, 0.f);
  } else if (opt_.bf16_grads) {
    // The head unit's gradient is fp32 (gpu_decoder_zero.cpp); tied, the head's is the embedding's.
    const Unit* hu = head_unit_ >= 0 ? &units_[size_t(head_unit_)] : nullptr;
    float* head32 = nullptr;
    if (hu && hu->g_head32 && !c_.tie_embeddings)
      for (const ParamSpec& p : hu->spec.sub.params)
        if (p.role == ParamRole::head) head32 = head32_.as<float>() + hu->gbegin + size_t(p.offset);
    if (head32)
      head(head32, has_targets, ce_scale);
    else
      head(g16_.head, has_targets, ce_scale);
    backward_pass(g16_, lb_scale);
  } else {
    head(g32_.head, has_targets, ce_scale);
    backward_pass(g32_, lb_scale);
  }
  if (!backward) mark("head");
  if (backward) expert_grads_stale_ = dw_overwrite_ = false;  // written by this backward
  if (backward) ++micro_;

  // Statistics back to the host: two asynchronous copies into page-locked memory, then the
  // micro-batch's one synchronisation (a copy into pageable memory would wait for the stream
  // each time).
  LossStats stats;
  stats.ep_load = std::exchange(ep_load_, EpLoad{});  // this micro-batch's forward's
  stats.counts.assign(size_t(L) * E, 0);
  if (has_targets)
    MOP_CUDA_CHECK(cudaMemcpyAsync(a.loss_host.data(), a.ce_loss, size_t(N) * 4, cudaMemcpyDeviceToHost, st));
  MOP_CUDA_CHECK(cudaMemcpyAsync(a.stats_host.data(), a.stats, a.stats_host.size() * 4, cudaMemcpyDeviceToHost, st));
  wait_comm();
  MOP_CUDA_CHECK(cudaStreamSynchronize(st));
  for (int i = 0; has_targets && i < N; ++i) {
    stats.ce_sum += double(a.loss_host.data()[i]);
    stats.ce_tokens += b.targets[i] >= 0;
  }
  const bool global_lb = comm_.world_host && comm_.world_host->size() > 1;
  for (int l = 0; l < L; ++l) {
    if (!c_.is_moe_layer(l)) continue;
    const int32_t* row = a.stats_host.data() + size_t(l) * a.stats_stride;
    float lb = 0.f;
    std::memcpy(&lb, row + E, sizeof lb);
    stats.lb_sum += global_lb ? lb_global_[size_t(l)] : double(lb);
    std::copy(row, row + E, stats.counts.begin() + ptrdiff_t(l) * E);
  }
  return stats;
}

}  // namespace mop
