// GpuDecoder's state: parameters in the split master layout, gradients, moments, the optimizer
// step, host transfers, and the activation buffers per token count. The step itself (forward,
// recompute, backward) is in gpu_decoder_step.cpp.
#include "model/cuda/gpu_decoder.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>

#include "model/cuda/gpu_acts.h"
#include "model/cuda/phase_timer.h"
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
#include "parallel/cuda/device_group.h"
#include "parallel/process_group.h"

namespace mop {

using bf16 = __nv_bfloat16;

namespace {
// Host <-> device conversions go through a device fp32 chunk of this many elements (128 MiB), so
// a transfer never needs a full fp32 copy of the model on either side.
constexpr size_t kChunk = size_t(32) << 20;
}  // namespace

GpuDecoder::GpuDecoder(const ModelConfig& c, const ParamTable& t, GpuDecoderOptions o)
    : c_(c), table_(t), opt_(o) {
  MOP_CHECK(cuda::device_count() > 0, "no CUDA device");
  MOP_CHECK(opt_.zero >= 0 && opt_.zero <= 3, "GpuDecoder: ZeRO stage {} is not 0, 1, 2 or 3", opt_.zero);
  cuda::install_alloc_hooks();
  MOP_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  MOP_CUDA_CHECK(cudaStreamCreateWithFlags(&comm_stream_, cudaStreamNonBlocking));
  MOP_CUDA_CHECK(cudaEventCreateWithFlags(&comm_done_, cudaEventDisableTiming));
  MOP_CUDA_CHECK(cudaEventCreateWithFlags(&compute_mark_, cudaEventDisableTiming));
  if (opt_.ep_overlap) {
    MOP_CUDA_CHECK(cudaStreamCreateWithFlags(&wgrad_stream_, cudaStreamNonBlocking));
    MOP_CUDA_CHECK(cudaEventCreateWithFlags(&wgrad_in_, cudaEventDisableTiming));
    MOP_CUDA_CHECK(cudaEventCreateWithFlags(&wgrad_done_, cudaEventDisableTiming));
    // 16 SMs stay free for the exchange's kernels and the compute stream's small kernels beside.
    int dev = 0, sms = 0;
    MOP_CUDA_CHECK(cudaGetDevice(&dev));
    MOP_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    wgrad_sms_ = std::max(1, sms - 16);
  }
  if (opt_.ep_balance) {
    MOP_CHECK(opt_.balance.max_guests >= 1, "GpuDecoder: balanced expert parallelism with {} guest experts a layer",
              opt_.balance.max_guests);
    MOP_CUDA_CHECK(cudaStreamCreateWithFlags(&side_stream_, cudaStreamNonBlocking));
    for (cudaEvent_t* e : {&side_in_, &side_lent_, &wgrad_all_, &side_added_, &guest_dw_free_[0], &guest_dw_free_[1]})
      MOP_CUDA_CHECK(cudaEventCreateWithFlags(e, cudaEventDisableTiming));
  }
  for (int s = 0; s < 2; ++s) {
    MOP_CUDA_CHECK(cudaEventCreateWithFlags(&w_slot_free_[s], cudaEventDisableTiming));
    MOP_CUDA_CHECK(cudaEventCreateWithFlags(&w_slot_ready_[s], cudaEventDisableTiming));
    MOP_CUDA_CHECK(cudaEventCreateWithFlags(&g_slot_free_[s], cudaEventDisableTiming));
  }
  if (opt_.timing) timer_ = std::make_unique<PhaseTimer>();
}

void GpuDecoder::mark(const char* phase) {
  if (timer_) timer_->mark(phase, stream_);
}

std::vector<std::pair<std::string, double>> GpuDecoder::take_phase_ms() {
  return timer_ ? timer_->take() : std::vector<std::pair<std::string, double>>{};
}

// The state for the groups set_comm gave (none: one rank): units laid out in the device space,
// their chunks in the shard space, the views, the AdamW runs.
void GpuDecoder::allocate_state() {
  MOP_CHECK(!state_ready_, "GpuDecoder: state allocated twice");
  build_units();  // offsets, n_, ns_, slot sizes
  const ParamTable& t = table_;
  const bool z = opt_.zero >= 1;
  const size_t es = opt_.bf16_grads ? 2 : 4;
  size_t ngrad = 0, nhead = 0, nw = 0, nt = 0;
  for (const Unit& u : units_) {
    if (u.wbegin != Unit::none) nw = std::max(nw, u.wbegin + size_t(u.padded()));
    if (u.gbegin != Unit::none) (u.g_head32 ? nhead : ngrad) = std::max(u.g_head32 ? nhead : ngrad, u.gbegin + size_t(u.padded()));
    if (u.tbegin != Unit::none) nt = std::max(nt, u.tbegin + size_t(u.chunk));
  }
  auto zeroed = [&](Buffer& b, Mem cat, size_t bytes) {
    b = Buffer(Device::cuda, cat, std::max<size_t>(bytes, 16));
    MOP_CUDA_CHECK(cudaMemsetAsync(b.data(), 0, b.bytes(), stream_));
  };
  const size_t nstate = z ? ns_ : nw;  // lo, m, v: whole units (zero 0) or this rank's chunks
  zeroed(hi_, Mem::params, nw * 2);
  zeroed(lo_, Mem::params, nstate * 2);
  zeroed(m_, Mem::optimizer, nstate * 4);
  zeroed(v_, Mem::optimizer, nstate * 4);
  zeroed(grads_, Mem::grads, ngrad * es);
  if (nhead) zeroed(head32_, Mem::grads, nhead * 4);
  if (opt_.bf16_grads) zeroed(fn16_, Mem::grads, size_t(c_.hidden) * 2);
  if (opt_.zero == 3 && nt) zeroed(hi_shard_, Mem::params, nt * 2);
  if (opt_.zero >= 2 && opt_.bf16_grads && nt) zeroed(g_shard_, Mem::grads, nt * 2);
  if (slot_elems_) {
    if (opt_.zero == 3) zeroed(w_slots_, Mem::params, 2 * slot_elems_ * 2);
    if (opt_.zero >= 2 && opt_.bf16_grads) zeroed(g_slots_, Mem::grads, 2 * slot_elems_ * 2);
  }
  norm2_ = Buffer(Device::cuda, Mem::workspace, units_.size() * sizeof(double));

  // Views: whole units bound once; slotted ones at acquire_layer.
  w_.layers.assign(size_t(c_.layers), {});
  g16_.layers.assign(size_t(c_.layers), {});
  g32_.layers.assign(size_t(c_.layers), {});
  for (Unit& u : units_) {
    if (u.wbegin != Unit::none) bind_unit(w_, u, hi_.as<bf16>() + u.wbegin);
    if (u.gbegin == Unit::none) continue;
    if (u.g_head32) continue;  // head(): fp32 pointer passed directly; final norm through fn16_
    if (opt_.bf16_grads) bind_unit(g16_, u, grads_.as<bf16>() + u.gbegin);
    else bind_unit(g32_, u, grads_.as<float>() + u.gbegin);
  }
  if (opt_.bf16_grads && head_unit_ >= 0 && units_[size_t(head_unit_)].g_head32) {
    g16_.final_norm = fn16_.as<bf16>();
    if (c_.tie_embeddings) g16_.head = g16_.embed;
  }

  // Non-trained buffers (the router bias) stay fp32 in a compact array: the router reads them as
  // fp32 and only the host changes them.
  int64_t nbuf = 0;
  for (const auto& p : t.params)
    if (!p.trainable) buffer_spans_.emplace_back(p.offset, p.numel), nbuf += p.numel;
  buffers_ = Buffer(Device::cuda, Mem::params, size_t(std::max<int64_t>(nbuf, 1)) * 4);
  router_bias_.assign(size_t(c_.layers), nullptr);
  int64_t at = 0;
  for (const auto& p : t.params) {
    if (p.trainable) continue;
    MOP_CHECK(p.role == ParamRole::router_bias, "GpuDecoder: buffer {} is not a router bias", p.name);
    router_bias_[size_t(p.layer)] = buffers_.as<float>() + at;
    at += p.numel;
  }
  build_adam_runs();
  state_ready_ = true;
  MOP_CUDA_CHECK(cudaStreamSynchronize(stream_));
}

GpuDecoder::~GpuDecoder() {
  if (stream_) cudaStreamSynchronize(stream_);
  if (comm_stream_) cudaStreamSynchronize(comm_stream_);
  if (wgrad_stream_) cudaStreamSynchronize(wgrad_stream_);
  if (side_stream_) cudaStreamSynchronize(side_stream_);
  acts_.reset();
  timer_.reset();
  for (Unit& u : units_)
    if (u.ready) cudaEventDestroy(u.ready);
  for (cudaEvent_t e : {comm_done_, compute_mark_, w_slot_free_[0], w_slot_free_[1], w_slot_ready_[0],
                        w_slot_ready_[1], g_slot_free_[0], g_slot_free_[1], wgrad_in_, wgrad_done_, side_in_,
                        side_lent_, wgrad_all_, side_added_, guest_dw_free_[0], guest_dw_free_[1]})
    if (e) cudaEventDestroy(e);
  if (wgrad_stream_) cudaStreamDestroy(wgrad_stream_);
  if (side_stream_) cudaStreamDestroy(side_stream_);
  if (comm_stream_) cudaStreamDestroy(comm_stream_);
  if (stream_) cudaStreamDestroy(stream_);
}

// host[0, n) -> (hi, lo) through the fp32 chunk; lo null: the low halves are not kept.
void GpuDecoder::upload_split(const float* host, size_t n, bf16* hi, uint16_t* lo) {
  if (n == 0) return;
  Buffer chunk(Device::cuda, Mem::workspace, std::min(n, kChunk) * 4);
  Buffer junk;
  if (!lo) junk = Buffer(Device::cuda, Mem::workspace, std::min(n, kChunk) * 2);
  for (size_t i = 0; i < n; i += kChunk) {
    const size_t k = std::min(kChunk, n - i);
    MOP_CUDA_CHECK(cudaMemcpyAsync(chunk.data(), host + i, k * 4, cudaMemcpyHostToDevice, stream_));
    cuda::split_master(hi + i, lo ? lo + i : junk.as<uint16_t>(), chunk.as<float>(), k, stream_);
  }
  MOP_CUDA_CHECK(cudaStreamSynchronize(stream_));  // the chunks are freed here
}

// (hi, lo)[0, n) -> host through the fp32 chunk.
void GpuDecoder::download_merged(float* host, size_t n, const bf16* hi, const uint16_t* lo) const {
  if (n == 0) return;
  Buffer chunk(Device::cuda, Mem::workspace, std::min(n, kChunk) * 4);
  for (size_t i = 0; i < n; i += kChunk) {
    const size_t k = std::min(kChunk, n - i);
    cuda::merge_master(chunk.as<float>(), hi + i, lo + i, k, stream_);
    MOP_CUDA_CHECK(cudaMemcpyAsync(host + i, chunk.data(), k * 4, cudaMemcpyDeviceToHost, stream_));
    MOP_CUDA_CHECK(cudaStreamSynchronize(stream_));  // the chunk is reused (and the host copy may be pageable)
  }
}

void GpuDecoder::upload_params(const float* host) {
  if (!state_ready_) allocate_state();
  wait_comm_stream();
  for (Unit& u : units_) {
    const float* src = host + u.spec.begin;
    if (opt_.zero == 0) {
      upload_split(src, size_t(u.spec.numel), hi_.as<bf16>() + u.wbegin, lo_.as<uint16_t>() + u.wbegin);
      continue;
    }
    if (u.wbegin != Unit::none) upload_split(src, size_t(u.spec.numel), hi_.as<bf16>() + u.wbegin, nullptr);
    upload_split(src + u.shard_begin, size_t(u.shard_n), chunk_hi(u), lo_.as<uint16_t>() + u.sbegin);
    u.gathering = false;
  }
  w_slot_layer_[0] = w_slot_layer_[1] = -1;
  upload_buffers(host);
}

// The buffers' fp32 copy (the host owns them; their master weights in the units are not kept up to
// date: save_shard writes the buffers from here).
void GpuDecoder::upload_buffers(const float* host) {
  float* dst = buffers_.as<float>();
  for (const auto& [off, n] : buffer_spans_) {
    MOP_CUDA_CHECK(cudaMemcpyAsync(dst, host + off, size_t(n) * 4, cudaMemcpyHostToDevice, stream_));
    dst += n;
  }
  MOP_CUDA_CHECK(cudaStreamSynchronize(stream_));
}

// After load_shard: the buffers' fp32 copy from the master weights (gathered where sharded).
void GpuDecoder::buffers_from_master() {
  float* dst = buffers_.as<float>();
  for (const auto& [off, n] : buffer_spans_) {
    for (Unit& u : units_) {
      if (off < u.spec.begin || off + n > u.spec.begin + u.spec.numel) continue;
      Buffer whole(Device::cuda, Mem::workspace, size_t(u.padded()) * 4);
      if (opt_.zero == 0) {
        cuda::merge_master(whole.as<float>(), hi_.as<bf16>() + u.wbegin, lo_.as<uint16_t>() + u.wbegin,
                           size_t(u.spec.numel), stream_);
      } else {
        float* mine = whole.as<float>() + u.shard_begin;
        MOP_CUDA_CHECK(cudaMemsetAsync(whole.data(), 0, whole.bytes(), stream_));
        cuda::merge_master(mine, chunk_hi(u), lo_.as<uint16_t>() + u.sbegin, size_t(u.shard_n), stream_);
        MOP_CUDA_CHECK(cudaStreamSynchronize(stream_));
        if (u.sharded()) u.group->all_gather(mine, size_t(u.chunk), whole.data(), DType::f32);
      }
      MOP_CUDA_CHECK(cudaMemcpyAsync(dst, whole.as<float>() + (off - u.spec.begin), size_t(n) * 4,
                                     cudaMemcpyDeviceToDevice, stream_));
      MOP_CUDA_CHECK(cudaStreamSynchronize(stream_));
    }
    dst += n;
  }
}

void GpuDecoder::download_params(float* host) const {
  MOP_CHECK(state_ready_, "GpuDecoder::download_params before upload_params");
  const_cast<GpuDecoder*>(this)->wait_comm_stream();
  for (const Unit& u : units_) {
    float* dst = host + u.spec.begin;
    if (opt_.zero == 0) {
      download_merged(dst, size_t(u.spec.numel), hi_.as<bf16>() + u.wbegin, lo_.as<uint16_t>() + u.wbegin);
      continue;
    }
    // This rank's chunk in fp32, gathered over the unit's group.
    Buffer mine(Device::cuda, Mem::workspace, size_t(u.chunk) * 4);
    MOP_CUDA_CHECK(cudaMemsetAsync(mine.data(), 0, mine.bytes(), stream_));
    if (u.shard_n)
      cuda::merge_master(mine.as<float>(), const_cast<GpuDecoder*>(this)->chunk_hi(u),
                         lo_.as<uint16_t>() + u.sbegin, size_t(u.shard_n), stream_);
    Buffer whole;
    const float* all = mine.as<float>();
    if (u.sharded()) {
      whole = Buffer(Device::cuda, Mem::workspace, size_t(u.padded()) * 4);
      MOP_CUDA_CHECK(cudaStreamSynchronize(stream_));
      u.group->all_gather(mine.data(), size_t(u.chunk), whole.data(), DType::f32);
      all = whole.as<float>();
    }
    MOP_CUDA_CHECK(cudaMemcpyAsync(dst, all, size_t(u.spec.numel) * 4, cudaMemcpyDeviceToHost, stream_));
    MOP_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }
  const float* src = buffers_.as<float>();
  for (const auto& [off, n] : buffer_spans_) {
    MOP_CUDA_CHECK(cudaMemcpyAsync(host + off, src, size_t(n) * 4, cudaMemcpyDeviceToHost, stream_));
    src += n;
  }
  MOP_CUDA_CHECK(cudaStreamSynchronize(stream_));
}

void GpuDecoder::upload_moments(const float* m, const float* v) {
  MOP_CHECK(state_ready_, "GpuDecoder::upload_moments before upload_params");
  for (const Unit& u : units_) {
    const bool whole = opt_.zero == 0;
    const size_t at = whole ? u.wbegin : u.sbegin, from = size_t(u.spec.begin) + (whole ? 0 : size_t(u.shard_begin));
    const size_t n = whole ? size_t(u.spec.numel) : size_t(u.shard_n);
    MOP_CUDA_CHECK(cudaMemcpyAsync(m_.as<float>() + at, m + from, n * 4, cudaMemcpyHostToDevice, stream_));
    MOP_CUDA_CHECK(cudaMemcpyAsync(v_.as<float>() + at, v + from, n * 4, cudaMemcpyHostToDevice, stream_));
  }
  MOP_CUDA_CHECK(cudaStreamSynchronize(stream_));
}

void GpuDecoder::download_moments(float* m, float* v) const {
  MOP_CHECK(opt_.zero == 0, "GpuDecoder::download_moments: zero {} keeps only this rank's chunks (save_shard)",
            opt_.zero);
  for (const Unit& u : units_) {
    const size_t n = size_t(u.spec.numel);
    MOP_CUDA_CHECK(cudaMemcpyAsync(m + u.spec.begin, m_.as<float>() + u.wbegin, n * 4, cudaMemcpyDeviceToHost, stream_));
    MOP_CUDA_CHECK(cudaMemcpyAsync(v + u.spec.begin, v_.as<float>() + u.wbegin, n * 4, cudaMemcpyDeviceToHost, stream_));
  }
  MOP_CUDA_CHECK(cudaStreamSynchronize(stream_));
}

void GpuDecoder::download_grads(float* host) const {
  MOP_CHECK(opt_.zero == 0, "GpuDecoder::download_grads is for unsharded runs (zero 0)");
  const_cast<GpuDecoder*>(this)->zero_stale_grads();
  for (const Unit& u : units_) {
    DType t{};
    const void* g = const_cast<GpuDecoder*>(this)->unit_grad(u, &t);
    const size_t n = size_t(u.spec.numel);
    if (t == DType::f32) {
      MOP_CUDA_CHECK(cudaMemcpyAsync(host + u.spec.begin, g, n * 4, cudaMemcpyDeviceToHost, stream_));
      MOP_CUDA_CHECK(cudaStreamSynchronize(stream_));
      continue;
    }
    Buffer chunk(Device::cuda, Mem::workspace, std::min(n, kChunk) * 4);
    for (size_t i = 0; i < n; i += kChunk) {
      const size_t k = std::min(kChunk, n - i);
      cuda::cast_bf16_to_f32(chunk.as<float>(), static_cast<const bf16*>(g) + i, k, stream_);
      MOP_CUDA_CHECK(cudaMemcpyAsync(host + u.spec.begin + i, chunk.data(), k * 4, cudaMemcpyDeviceToHost, stream_));
      MOP_CUDA_CHECK(cudaStreamSynchronize(stream_));
    }
  }
}

void GpuDecoder::zero_grads() {
  MOP_CHECK(state_ready_, "GpuDecoder::zero_grads before upload_params");
  micro_ = 0;
  mark("host");
  // No wait: the last step's reductions finished before its update (wait_reductions), which the
  // compute stream ran before this.
  if (opt_.bf16_grads) {
    zero_grad_spans(/*experts=*/false);
    expert_grads_stale_ = true;
  } else {
    MOP_CUDA_CHECK(cudaMemsetAsync(grads_.data(), 0, grads_.bytes(), stream_));
  }
  if (head32_.data()) MOP_CUDA_CHECK(cudaMemsetAsync(head32_.data(), 0, head32_.bytes(), stream_));
  if (fn16_.data()) MOP_CUDA_CHECK(cudaMemsetAsync(fn16_.data(), 0, fn16_.bytes(), stream_));
  for (Unit& u : units_) u.reduced = false;
  mark("zero_grads");
}

// grads_ is laid out unit after unit (gbegin, padded); with bf16 gradients the expert units' spans
// are skipped by zero_grads (the backward overwrites them) or zeroed alone (zero_stale_grads).
void GpuDecoder::zero_grad_spans(bool experts) {
  const size_t es = opt_.bf16_grads ? 2 : 4, total = grads_.bytes() / es;
  std::vector<std::pair<size_t, size_t>> ex;  // the expert units' [begin, end), sorted
  for (const Unit& u : units_)
    if (u.spec.experts && u.gbegin != Unit::none && !u.g_head32) ex.emplace_back(u.gbegin, u.gbegin + size_t(u.padded()));
  std::sort(ex.begin(), ex.end());
  auto zero = [&](size_t b, size_t e) {
    if (e > b) MOP_CUDA_CHECK(cudaMemsetAsync(static_cast<char*>(grads_.data()) + b * es, 0, (e - b) * es, stream_));
  };
  size_t at = 0;
  for (const auto& [b, e] : ex) {
    if (experts) zero(b, e);
    else zero(at, b);
    at = e;
  }
  if (!experts) zero(at, total);
}

void GpuDecoder::zero_stale_grads() {
  if (!expert_grads_stale_) return;
  zero_grad_spans(/*experts=*/true);
  expert_grads_stale_ = false;
}

double GpuDecoder::optimizer_step(double lr, double beta1, double beta2, double eps, double weight_decay, double clip) {
  MOP_CHECK(acts_, "GpuDecoder::optimizer_step before any forward_backward");
  mark("host");
  reduce_grads();     // any reduction the backward did not start
  wait_reductions();  // the compute stream reads the reduced gradients from here on
  mark("reduce_wait");
  const double norm = std::sqrt(grad_norm2());
  mark("grad_norm");
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
  gather_after_step();
  mark("update");
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

  // The largest FFN buffers any layer needs (expert-sorted rows, dense FFN, shared experts). With
  // expert parallelism the MoE layers keep no (M, .) rows here: their pairs live on the owners.
  bool any_moe = false, any_dense = false;
  for (size_t l = 0; l < L; ++l) (c_.is_moe_layer(int64_t(l)) ? any_moe : any_dense) = true;
  const bool rows = !expert_parallel();
  const size_t gu_max = std::max(any_moe && rows ? M * 2 * F : 0, any_dense ? n * 2 * Fd : 0);
  const size_t a_max = std::max(any_moe && rows ? M * F : 0, any_dense ? n * Fd : 0);
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
    if (moe && rows) y.xp = a.alloc<bf16>(M * D, A);
    y.a = a.alloc<bf16>(dense && moe ? a_max : moe ? (rows ? M * F : 0) : n * Fd, A);
    if (moe && shared) y.sa = a.alloc<bf16>(n * Fs, A);
  };
  auto alloc_rest = [&](Acts::Layer& y, bool moe, bool dense) {
    y.q_raw = a.alloc<bf16>(n * Q, A), y.k_raw = a.alloc<bf16>(n * KD, A), y.v = a.alloc<bf16>(n * KD, A);
    y.att = a.alloc<bf16>(n * Q, A), y.lse = a.alloc<float>(n * H, A);
    if (moe && rows) y.yp = a.alloc<bf16>(M * D, A);
    y.gu = a.alloc<bf16>(dense && moe ? gu_max : moe ? (rows ? M * 2 * F : 0) : n * 2 * Fd, A);
    if (moe && shared) y.sgu = a.alloc<bf16>(n * 2 * Fs, A);
  };
  if (!keep_cheap) alloc_cheap(one, any_moe, any_dense);
  if (!keep_rest) alloc_rest(one, any_moe, any_dense);
  a.layers.resize(L);
  // Counts then lb per layer, 256-byte aligned rows; zeros for dense layers.
  a.stats_stride = (E + 1 + 63) / 64 * 64;
  a.stats = a.alloc<int32_t>(L * a.stats_stride, A);
  a.stats_host = PinnedHost<int32_t>(L * a.stats_stride);
  a.loss_host = PinnedHost<float>(n);
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
      y.row = a.alloc<int32_t>(M, A), y.offsets = a.alloc<int32_t>(E + 1, A);
      y.counts = a.stats + l * a.stats_stride, y.lb = reinterpret_cast<float*>(y.counts + E);
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
  if (any_moe && rows) a.dyp = a.alloc<bf16>(M * D, W), a.dxp = a.dyp;
  if (any_moe && !rows) {
    // Each token goes to at most min(ep, K) ranks.
    const size_t S = n * size_t(std::min<int64_t>(comm_.ep->size(), int64_t(K)));
    a.ep.resize(L);
    a.ep_send = a.alloc<bf16>(S * D, Mem::comm);
    a.ep_send_pos = a.alloc<int32_t>(S * K, Mem::comm), a.ep_send_gate = a.alloc<float>(S * K, Mem::comm);
    if (opt_.ep_balance) a.guest_dgate = Buffer(Device::cuda, Mem::comm, std::max<size_t>(M, 1) * sizeof(float));
  }
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
