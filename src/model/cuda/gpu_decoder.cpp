// GpuDecoder's state: parameters in the split master layout, gradients, moments, the optimizer
// step, host transfers, and the activation buffers per token count. The step itself (forward,
// recompute, backward) is in gpu_decoder_step.cpp.
#include "model/cuda/gpu_decoder.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>

#include "model/cuda/gpu_acts.h"
#include "ops/cuda/adamw.h"
#include "ops/cuda/attention.h"
#include "ops/cuda/cast.h"
#include "ops/cuda/check.cuh"
#include "ops/cuda/embedding.h"
#include "ops/cuda/moe_permute.h"
#include "ops/cuda/rmsnorm.h"
#include "ops/cuda/rope.h"
#include "ops/cuda/runtime.h"
#include "optim/optimizer.h"
#include "parallel/process_group.h"

namespace mop {

using bf16 = __nv_bfloat16;

namespace {
// Host <-> device conversions go through a device fp32 chunk of this many elements (128 MiB), so
// a transfer never needs a full fp32 copy of the model on either side.
constexpr size_t kChunk = size_t(32) << 20;
}  // namespace

GpuDecoder::GpuDecoder(const ModelConfig& c, const ParamTable& t, GpuDecoderOptions o)
    : c_(c), table_(t), opt_(o), n_(size_t(t.total)) {
  MOP_CHECK(cuda::device_count() > 0, "no CUDA device");
  cuda::install_alloc_hooks();
  MOP_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  hi_ = Buffer(Device::cuda, Mem::params, n_ * 2);
  lo_ = Buffer(Device::cuda, Mem::params, n_ * 2);
  // bf16 gradients, except the LM head's: head() accumulates it over chunks of rows, so in bf16 it
  // would be rounded once per chunk. It stays fp32 (moe-7b: 0.6 GiB more) and every gradient is
  // rounded at most once per micro-batch.
  const ParamSpec* headp = nullptr;
  for (const auto& p : t.params)
    if (p.role == ParamRole::head) headp = &p;
  const bool head32 = opt_.bf16_grads && headp && !c.tie_embeddings && headp->offset + headp->numel == t.total;
  n16_ = !opt_.bf16_grads ? 0 : head32 ? size_t(headp->offset) : n_;
  grads_ = Buffer(Device::cuda, Mem::grads, opt_.bf16_grads ? n16_ * 2 : n_ * 4);
  if (head32) {
    head32_ = Buffer(Device::cuda, Mem::grads, size_t(headp->numel) * 4);
    head_off_ = size_t(headp->offset);
  }
  m_ = Buffer(Device::cuda, Mem::optimizer, n_ * 4);
  v_ = Buffer(Device::cuda, Mem::optimizer, n_ * 4);
  norm2_ = Buffer(Device::cuda, Mem::workspace, 2 * sizeof(double));
  MOP_CUDA_CHECK(cudaMemsetAsync(m_.data(), 0, n_ * 4, stream_));
  MOP_CUDA_CHECK(cudaMemsetAsync(v_.data(), 0, n_ * 4, stream_));
  zero_grads();
  w_ = make_view<bf16>(t, c, hi_.as<bf16>());
  if (opt_.bf16_grads)
    g16_ = make_view<bf16>(t, c, grads_.as<bf16>());
  else
    g32_ = make_view<float>(t, c, grads_.as<float>());

  // Non-trained buffers (the router bias) stay fp32 in a compact array: the router reads them as
  // fp32 and only the host changes them.
  int64_t nbuf = 0;
  for (const auto& p : t.params)
    if (!p.trainable) buffer_spans_.emplace_back(p.offset, p.numel), nbuf += p.numel;
  buffers_ = Buffer(Device::cuda, Mem::params, size_t(std::max<int64_t>(nbuf, 1)) * 4);
  router_bias_.assign(size_t(c.layers), nullptr);
  int64_t at = 0;
  for (const auto& p : t.params) {
    if (p.trainable) continue;
    MOP_CHECK(p.role == ParamRole::router_bias, "GpuDecoder: buffer {} is not a router bias", p.name);
    router_bias_[size_t(p.layer)] = buffers_.as<float>() + at;
    at += p.numel;
  }

  // AdamW over maximal runs of adjacent trainable parameters with the same decay: a handful of
  // entries instead of one per expert matrix (the update is element-wise, so the result is the same).
  std::vector<const ParamSpec*> ps;
  for (const auto& p : t.params) ps.push_back(&p);
  std::sort(ps.begin(), ps.end(), [](const ParamSpec* a, const ParamSpec* b) { return a->offset < b->offset; });
  int64_t run_end = -1;
  bool prev_own32 = false;
  for (const ParamSpec* p : ps) {
    if (!p->trainable || p->numel == 0) continue;
    const bool own32 = head32 && p == headp;  // the fp32 head gradient: a run of its own
    const bool extend = !own32 && !prev_own32 && !adam_runs_.empty() && run_end == p->offset &&
                        adam_decay_.back() == p->decay;
    prev_own32 = own32;
    if (extend) {
      adam_runs_.back().n += size_t(p->numel);
    } else {
      cuda::AdamWSplitTensor r{};
      r.hi = hi_.as<bf16>() + p->offset;
      r.lo = lo_.as<uint16_t>() + p->offset;
      r.g = own32 ? head32_.data()
                  : static_cast<const char*>(grads_.data()) + size_t(p->offset) * (opt_.bf16_grads ? 2 : 4);
      r.m = m_.as<float>() + p->offset;
      r.v = v_.as<float>() + p->offset;
      r.n = size_t(p->numel);
      adam_runs_.push_back(r);
      adam_decay_.push_back(p->decay);
      adam_g32_.push_back(own32 || !opt_.bf16_grads);
    }
    run_end = p->offset + p->numel;
  }
  MOP_CUDA_CHECK(cudaStreamSynchronize(stream_));
}

GpuDecoder::~GpuDecoder() {
  acts_.reset();
  if (stream_) cudaStreamDestroy(stream_);
}

void GpuDecoder::upload_params(const float* host) {
  Buffer chunk(Device::cuda, Mem::workspace, std::min(n_, kChunk) * 4);
  for (size_t i = 0; i < n_; i += kChunk) {
    const size_t n = std::min(kChunk, n_ - i);
    MOP_CUDA_CHECK(cudaMemcpyAsync(chunk.data(), host + i, n * 4, cudaMemcpyHostToDevice, stream_));
    cuda::split_master(hi_.as<bf16>() + i, lo_.as<uint16_t>() + i, chunk.as<float>(), n, stream_);
  }
  upload_buffers(host);  // synchronises: the chunk is freed after the last split
}

void GpuDecoder::upload_buffers(const float* host) {
  float* dst = buffers_.as<float>();
  for (const auto& [off, n] : buffer_spans_) {
    MOP_CUDA_CHECK(cudaMemcpyAsync(dst, host + off, size_t(n) * 4, cudaMemcpyHostToDevice, stream_));
    dst += n;
  }
  MOP_CUDA_CHECK(cudaStreamSynchronize(stream_));
}

void GpuDecoder::download_params(float* host) const {
  Buffer chunk(Device::cuda, Mem::workspace, std::min(n_, kChunk) * 4);
  for (size_t i = 0; i < n_; i += kChunk) {
    const size_t n = std::min(kChunk, n_ - i);
    cuda::merge_master(chunk.as<float>(), hi_.as<bf16>() + i, lo_.as<uint16_t>() + i, n, stream_);
    MOP_CUDA_CHECK(cudaMemcpyAsync(host + i, chunk.data(), n * 4, cudaMemcpyDeviceToHost, stream_));
    MOP_CUDA_CHECK(cudaStreamSynchronize(stream_));  // the chunk is reused (and the host copy may be pageable)
  }
  const float* src = buffers_.as<float>();
  for (const auto& [off, n] : buffer_spans_) {
    MOP_CUDA_CHECK(cudaMemcpyAsync(host + off, src, size_t(n) * 4, cudaMemcpyDeviceToHost, stream_));
    src += n;
  }
  MOP_CUDA_CHECK(cudaStreamSynchronize(stream_));
}

void GpuDecoder::upload_moments(const float* m, const float* v) {
  MOP_CUDA_CHECK(cudaMemcpyAsync(m_.data(), m, n_ * 4, cudaMemcpyHostToDevice, stream_));
  MOP_CUDA_CHECK(cudaMemcpyAsync(v_.data(), v, n_ * 4, cudaMemcpyHostToDevice, stream_));
  MOP_CUDA_CHECK(cudaStreamSynchronize(stream_));
}

void GpuDecoder::download_moments(float* m, float* v) const {
  MOP_CUDA_CHECK(cudaMemcpyAsync(m, m_.data(), n_ * 4, cudaMemcpyDeviceToHost, stream_));
  MOP_CUDA_CHECK(cudaMemcpyAsync(v, v_.data(), n_ * 4, cudaMemcpyDeviceToHost, stream_));
  MOP_CUDA_CHECK(cudaStreamSynchronize(stream_));
}

void GpuDecoder::download_grads(float* host) const {
  if (!opt_.bf16_grads) {
    MOP_CUDA_CHECK(cudaMemcpyAsync(host, grads_.data(), n_ * 4, cudaMemcpyDeviceToHost, stream_));
    MOP_CUDA_CHECK(cudaStreamSynchronize(stream_));
    return;
  }
  Buffer chunk(Device::cuda, Mem::workspace, std::min(n16_, kChunk) * 4);
  for (size_t i = 0; i < n16_; i += kChunk) {
    const size_t n = std::min(kChunk, n16_ - i);
    cuda::cast_bf16_to_f32(chunk.as<float>(), grads_.as<bf16>() + i, n, stream_);
    MOP_CUDA_CHECK(cudaMemcpyAsync(host + i, chunk.data(), n * 4, cudaMemcpyDeviceToHost, stream_));
    MOP_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }
  if (head32_.data()) {
    MOP_CUDA_CHECK(cudaMemcpyAsync(host + head_off_, head32_.data(), head32_.bytes(), cudaMemcpyDeviceToHost, stream_));
    MOP_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }
}

void GpuDecoder::zero_grads() {
  MOP_CUDA_CHECK(cudaMemsetAsync(grads_.data(), 0, grads_.bytes(), stream_));
  if (head32_.data()) MOP_CUDA_CHECK(cudaMemsetAsync(head32_.data(), 0, head32_.bytes(), stream_));
}

double GpuDecoder::optimizer_step(double lr, double beta1, double beta2, double eps, double weight_decay, double clip) {
  MOP_CHECK(acts_, "GpuDecoder::optimizer_step before any forward_backward");
  // Buffers (the router bias) have zero gradients, so the norm over the flat array is the norm
  // over trainable parameters.
  double* norm2 = norm2_.as<double>();
  MOP_CUDA_CHECK(cudaMemsetAsync(norm2, 0, 2 * sizeof(double), stream_));
  if (opt_.bf16_grads)
    cuda::sum_squares(norm2, grads_.as<bf16>(), n16_, acts_->scratch, stream_);
  else
    cuda::sum_squares(norm2, grads_.as<float>(), n_, acts_->scratch, stream_);
  if (head32_.data()) cuda::sum_squares(norm2 + 1, head32_.as<float>(), head32_.bytes() / 4, acts_->scratch, stream_);
  double ss[2] = {0, 0};
  MOP_CUDA_CHECK(cudaMemcpyAsync(ss, norm2, sizeof(ss), cudaMemcpyDeviceToHost, stream_));
  MOP_CUDA_CHECK(cudaStreamSynchronize(stream_));
  double norm = std::sqrt(ss[0] + ss[1]);
  if (comm_.ep_host && comm_.ep_host->size() > 1) {
    // Dense gradients are the same on every rank (reduced); expert gradients differ between the
    // ranks of an expert-parallel group, each holding its experts': add theirs once.
    const std::vector<GradRun> runs = grad_runs();
    Buffer parts(Device::cuda, Mem::workspace, runs.size() * sizeof(double));
    for (size_t i = 0; i < runs.size(); ++i) {
      const GradRun& r = runs[i];
      if (opt_.bf16_grads)
        cuda::sum_squares(parts.as<double>() + i, grads_.as<bf16>() + r.begin, r.n, acts_->scratch, stream_);
      else
        cuda::sum_squares(parts.as<double>() + i, grads_.as<float>() + r.begin, r.n, acts_->scratch, stream_);
    }
    std::vector<double> host(runs.size());
    MOP_CUDA_CHECK(cudaMemcpyAsync(host.data(), parts.data(), parts.bytes(), cudaMemcpyDeviceToHost, stream_));
    MOP_CUDA_CHECK(cudaStreamSynchronize(stream_));
    double dense = ss[1], expert = 0;  // ss[1]: the fp32 head
    for (size_t i = 0; i < runs.size(); ++i) (runs[i].expert ? expert : dense) += host[i];
    comm_.ep_host->all_reduce_sum(&expert, 1);
    norm = std::sqrt(dense + expert);
  }
  const double gscale = clip_scale(norm, clip);

  ++steps_;
  cuda::AdamWArgs args{};
  args.lr = float(lr), args.beta1 = float(beta1), args.beta2 = float(beta2), args.eps = float(eps);
  args.weight_decay = float(weight_decay);
  args.bias_correction1 = float(1.0 - std::pow(beta1, double(steps_)));
  args.bias_correction2 = float(1.0 - std::pow(beta2, double(steps_)));
  args.grad_scale = float(gscale);
  std::vector<cuda::AdamWSplitTensor> g16, g32;  // one launch sequence per gradient dtype
  for (size_t i = 0; i < adam_runs_.size(); ++i) {
    adam_runs_[i].weight_decay = adam_decay_[i] ? float(weight_decay) : 0.f;
    (adam_g32_[i] ? g32 : g16).push_back(adam_runs_[i]);
  }
  cuda::adamw_step_split_multi(g16.data(), int(g16.size()), /*grads_bf16=*/true, args, stream_);
  cuda::adamw_step_split_multi(g32.data(), int(g32.size()), /*grads_bf16=*/false, args, stream_);
  return norm;
}

void GpuDecoder::ensure_workspace(size_t bytes) {
  Acts& a = *acts_;
  if (bytes <= a.workspace_bytes) return;
  MOP_CUDA_CHECK(cudaStreamSynchronize(stream_));  // the old workspace may still be in use
  a.workspace = Buffer();
  a.workspace = Buffer(Device::cuda, Mem::workspace, bytes);
  a.workspace_bytes = bytes;
}

void GpuDecoder::ensure_acts(int N) {
  if (acts_ && acts_N_ == N) return;
  acts_.reset();
  auto ap = std::make_unique<Acts>();
  Acts& a = *ap;
  const size_t D = size_t(c_.hidden), H = size_t(c_.heads), KV = size_t(c_.kv_heads), hd = size_t(c_.hd());
  const size_t L = size_t(c_.layers), E = size_t(c_.experts), K = size_t(c_.top_k), F = size_t(c_.expert_ffn);
  const size_t V = size_t(c_.vocab_size), n = size_t(N);
  const size_t Q = H * hd, KD = KV * hd, O = Q + 2 * KD, M = n * K, ND = n * D;
  const size_t Fd = size_t(c_.dense_width()), Fs = size_t(c_.shared_width());
  const Mem A = Mem::activations, W = Mem::workspace;
  a.N = N;
  a.tokens = a.alloc<int32_t>(n, A), a.targets = a.alloc<int32_t>(n, A), a.positions = a.alloc<int32_t>(n, A);
  a.cu = a.alloc<int32_t>(n + 1, A);
  for (size_t l = 0; l <= L; ++l) a.xs.push_back(a.alloc<bf16>(ND, A));

  // The largest FFN buffers any layer needs (expert-sorted rows, dense FFN, shared experts).
  bool any_moe = false, any_dense = false;
  for (size_t l = 0; l < L; ++l) (c_.is_moe_layer(int64_t(l)) ? any_moe : any_dense) = true;
  const size_t gu_max = std::max(any_moe ? M * 2 * F : 0, any_dense ? n * 2 * Fd : 0);
  const size_t a_max = std::max(any_moe ? M * F : 0, any_dense ? n * Fd : 0);
  const bool shared = any_moe && c_.shared_experts > 0;

  // Three groups of per-layer buffers, each either this layer's own (kept for backward) or one
  // set shared by all layers (recomputed in backward): see GpuRecompute.
  const GpuRecompute rc = opt_.recompute;
  const bool keep_cheap = rc == GpuRecompute::none;  // norms, QK-norm/RoPE, permuted rows, SwiGLU outputs
  const bool keep_rest = rc != GpuRecompute::full;   // attention, GEMM outputs
  Acts::Layer one;                                   // the shared set
  auto alloc_cheap = [&](Acts::Layer& y, bool moe, bool dense) {
    y.h1 = a.alloc<bf16>(ND, A), y.x2 = a.alloc<bf16>(ND, A), y.h2 = a.alloc<bf16>(ND, A);
    y.rstd1 = a.alloc<float>(n, A), y.rstd2 = a.alloc<float>(n, A);
    y.q = a.alloc<bf16>(n * Q, A), y.k = a.alloc<bf16>(n * KD, A);
    y.rstd_q = a.alloc<float>(n * H, A), y.rstd_k = a.alloc<float>(n * KV, A);
    if (moe) y.xp = a.alloc<bf16>(M * D, A);
    y.a = a.alloc<bf16>(dense && moe ? a_max : moe ? M * F : n * Fd, A);
    if (moe && shared) y.sa = a.alloc<bf16>(n * Fs, A);
  };
  auto alloc_rest = [&](Acts::Layer& y, bool moe, bool dense) {
    y.q_raw = a.alloc<bf16>(n * Q, A), y.k_raw = a.alloc<bf16>(n * KD, A), y.v = a.alloc<bf16>(n * KD, A);
    y.att = a.alloc<bf16>(n * Q, A), y.lse = a.alloc<float>(n * H, A);
    if (moe) y.yp = a.alloc<bf16>(M * D, A);
    y.gu = a.alloc<bf16>(dense && moe ? gu_max : moe ? M * 2 * F : n * 2 * Fd, A);
    if (moe && shared) y.sgu = a.alloc<bf16>(n * 2 * Fs, A);
  };
  if (!keep_cheap) alloc_cheap(one, any_moe, any_dense);
  if (!keep_rest) alloc_rest(one, any_moe, any_dense);
  a.layers.resize(L);
  for (size_t l = 0; l < L; ++l) {
    Acts::Layer& y = a.layers[l];
    const bool moe = c_.is_moe_layer(int64_t(l));
    if (keep_cheap)
      alloc_cheap(y, moe, !moe);
    else
      y.h1 = one.h1, y.x2 = one.x2, y.h2 = one.h2, y.rstd1 = one.rstd1, y.rstd2 = one.rstd2, y.q = one.q, y.k = one.k,
      y.rstd_q = one.rstd_q, y.rstd_k = one.rstd_k, y.xp = one.xp, y.a = one.a, y.sa = one.sa;
    if (keep_rest)
      alloc_rest(y, moe, !moe);
    else
      y.q_raw = one.q_raw, y.k_raw = one.k_raw, y.v = one.v, y.att = one.att, y.lse = one.lse, y.yp = one.yp,
      y.gu = one.gu, y.sgu = one.sgu;
    if (moe) {
      y.probs = a.alloc<float>(n * E, A), y.w = a.alloc<float>(M, A), y.idx = a.alloc<int32_t>(M, A);
      y.row = a.alloc<int32_t>(M, A), y.offsets = a.alloc<int32_t>(E + 1, A), y.counts = a.alloc<int32_t>(E, A);
      y.lb = a.alloc<float>(1, A);
      y.offsets_host.assign(E + 1, 0);
    }
  }
  a.qkv = a.alloc<bf16>(n * O, A);
  a.logits = a.alloc<float>(n * E, A);
  a.hf = a.alloc<bf16>(ND, A), a.rstdf = a.alloc<float>(n, A);

  a.dx = a.alloc<bf16>(ND, W), a.dx2 = a.alloc<bf16>(ND, W), a.dh = a.alloc<bf16>(ND, W);
  a.dtmp = a.alloc<bf16>(ND, W);
  a.datt = a.alloc<bf16>(n * Q, W), a.dq = a.alloc<bf16>(n * Q, W), a.dk = a.alloc<bf16>(n * KD, W);
  a.dv = a.alloc<bf16>(n * KD, W), a.dkr = a.alloc<bf16>(n * KD, W), a.dqkv = a.alloc<bf16>(n * O, W);
  const size_t gu_all = std::max(gu_max, shared ? n * 2 * Fs : 0), a_all = std::max(a_max, shared ? n * Fs : 0);
  if (any_moe) a.dyp = a.alloc<bf16>(M * D, W), a.dxp = a.dyp;
  a.da = a.alloc<bf16>(a_all, W), a.dgu = a.alloc<bf16>(gu_all, W);
  a.dw = a.alloc<float>(M, W), a.dprobs = a.alloc<float>(n * E, W), a.dlogits = a.alloc<float>(n * E, W);
  a.dlogits_bf = a.alloc<bf16>(n * E, W);
  a.head_rows = std::min(N, 2048);  // R x V bf16 logits alive at once (0.6 GiB at V = 152K)
  a.logits_chunk = a.alloc<bf16>(size_t(a.head_rows) * V, W);
  a.ce_loss = a.alloc<float>(n, W), a.ce_lse = a.alloc<float>(n, W);
  const size_t scratch =
      std::max({cuda::rmsnorm_backward_scratch_floats(N, int(D)),
                cuda::qk_norm_rope_backward_scratch_floats(N, int(H), int(hd)), cuda::sum_squares_scratch_floats(n_)});
  a.scratch = a.alloc<float>(scratch, W);
  acts_ = std::move(ap);
  acts_N_ = N;
  // Attention asks for its own size per shape (run); this covers embedding and routing, and
  // attention at the shapes seen so far.
  ensure_workspace(std::max(
      {cuda::embedding_backward_workspace(N), cuda::moe_route_layout_workspace(N, int(E), int(K)), size_t(256) << 20}));
}

}  // namespace mop
