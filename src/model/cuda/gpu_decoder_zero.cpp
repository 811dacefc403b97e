// GpuDecoder's ZeRO units (gpu_decoder.h): the device layout of the units, the hooks the step
// calls around each layer (gathers into slots, reductions as soon as a unit's backward ends), the
// gradient norm over the shards, the all-gather after the update, and the shard files.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>

#include "checkpoint/safetensors.h"
#include "model/cuda/gpu_acts.h"
#include "model/cuda/gpu_decoder.h"
#include "ops/cuda/adamw.h"
#include "ops/cuda/cast.h"
#include "ops/cuda/check.cuh"
#include "parallel/cuda/device_group.h"
#include "parallel/process_group.h"

namespace mop {

using bf16 = __nv_bfloat16;

namespace {

constexpr size_t kAlign = 64;  // elements: every unit starts 128-byte aligned in every buffer
size_t align_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

}  // namespace

template <class T> void GpuDecoder::bind_unit(ModelView<T>& v, const Unit& u, T* base) {
  const ModelView<T> uv = make_view<T>(u.spec.sub, c_, base);
  if (u.spec.layer >= 0) return merge_layer_view(v.layers[size_t(u.spec.layer)], uv.layers[size_t(u.spec.layer)]);
  if (uv.embed) v.embed = uv.embed;
  if (uv.final_norm) v.final_norm = uv.final_norm;
  if (uv.head) v.head = uv.head;
}
template void GpuDecoder::bind_unit(ModelView<bf16>&, const Unit&, bf16*);
template void GpuDecoder::bind_unit(ModelView<float>&, const Unit&, float*);

void GpuDecoder::build_units() {
  const size_t L = size_t(c_.layers);
  units_.clear();
  layer_unit_.assign(L, -1), expert_unit_.assign(L, -1);
  size_t w = 0, g = 0, h = 0, s = 0, t = 0;
  for (ZeroUnitSpec& spec : zero_units(table_)) {
    Unit u;
    u.spec = std::move(spec);
    DeviceGroup* grp = u.spec.experts ? comm_.edp : comm_.world;
    u.group = grp && grp->size() > 1 ? grp : nullptr;
    u.P = u.group ? u.group->size() : 1;
    u.r = u.group ? u.group->rank() : 0;
    u.chunk = (u.spec.numel + u.P - 1) / u.P;
    u.shard_begin = std::min(u.spec.numel, int64_t(u.r) * u.chunk);
    u.shard_n = std::min(u.spec.numel, u.shard_begin + u.chunk) - u.shard_begin;
    const size_t padded = size_t(u.padded());
    const bool layer = u.spec.layer >= 0;
    u.w_slot = opt_.zero == 3 && u.sharded() && layer;
    u.g_slot = opt_.zero >= 2 && opt_.bf16_grads && u.sharded() && layer;
    if (!u.w_slot) u.wbegin = w, w = align_up(w + padded);
    if (!u.g_slot) {
      // bf16 gradients: the head unit's stays fp32 (head() accumulates it over chunks of rows).
      u.g_head32 = opt_.bf16_grads && u.spec.name == "head";
      if (u.g_head32) u.gbegin = h, h = align_up(h + padded);
      else u.gbegin = g, g = align_up(g + padded);
    }
    if (opt_.zero >= 1) u.sbegin = s, s = align_up(s + size_t(u.chunk));
    if (u.w_slot || u.g_slot) u.tbegin = t, t = align_up(t + size_t(u.chunk));
    if (opt_.zero >= 1 && u.wbegin != Unit::none && u.sharded())
      MOP_CUDA_CHECK(cudaEventCreateWithFlags(&u.ready, cudaEventDisableTiming));
    const int i = int(units_.size());
    if (!layer) (u.spec.name == "embed" ? embed_unit_ : head_unit_) = i;
    else (u.spec.experts ? expert_unit_ : layer_unit_)[size_t(u.spec.layer)] = i;
    units_.push_back(std::move(u));
  }
  // Slots hold one layer's slotted units: the dense part first, then the experts.
  slot_elems_ = 0;
  for (size_t l = 0; l < L; ++l) {
    size_t off = 0;
    for (int i : {layer_unit_[l], expert_unit_[l]}) {
      if (i < 0) continue;
      Unit& u = units_[size_t(i)];
      if (!u.w_slot && !u.g_slot) continue;
      u.slot_off = off;
      off = align_up(off + size_t(u.padded()));
    }
    slot_elems_ = std::max(slot_elems_, off);
  }
  n_ = std::max({w, g, h, s, t, size_t(1)});
  ns_ = s;
}

bf16* GpuDecoder::chunk_hi(const Unit& u) {
  if (u.w_slot) return hi_shard_.as<bf16>() + u.tbegin;
  return hi_.as<bf16>() + u.wbegin + (opt_.zero >= 1 ? size_t(u.shard_begin) : 0);
}

void* GpuDecoder::unit_grad(const Unit& u, DType* t) const {
  *t = u.g_head32 || !opt_.bf16_grads ? DType::f32 : DType::bf16;
  if (u.gbegin == Unit::none) return nullptr;  // in a slot
  if (u.g_head32) return head32_.as<float>() + u.gbegin;
  return static_cast<char*>(grads_.data()) + u.gbegin * dtype_size(*t);
}

// The gradient range the update and the norm read: the whole unit (zero 0) or this rank's
// reduced chunk (in place in the whole gradient, or in g_shard_ for slotted gradients).
const void* GpuDecoder::update_grad(const Unit& u, DType* t) const {
  if (u.g_slot) {
    *t = DType::bf16;
    return g_shard_.as<bf16>() + u.tbegin;
  }
  const char* g = static_cast<const char*>(unit_grad(u, t));
  return g + (opt_.zero >= 1 ? size_t(u.shard_begin) * dtype_size(*t) : 0);
}

// AdamW over maximal runs of the update range's trainable parameters with equal decay.
void GpuDecoder::build_adam_runs() {
  adam_runs_.clear(), adam_decay_.clear(), adam_g32_.clear();
  for (const Unit& u : units_) {
    const bool z = opt_.zero >= 1;
    const int64_t lo = z ? u.shard_begin : 0, hi = z ? u.shard_begin + u.shard_n : u.spec.numel;
    DType gt{};
    const char* g = static_cast<const char*>(update_grad(u, &gt));
    bf16* h = chunk_hi(u);
    uint16_t* l = lo_.as<uint16_t>() + (z ? u.sbegin : u.wbegin);
    float* m = m_.as<float>() + (z ? u.sbegin : u.wbegin);
    float* v = v_.as<float>() + (z ? u.sbegin : u.wbegin);
    int64_t run_end = -1;
    const size_t first = adam_runs_.size();
    for (const ParamSpec& p : u.spec.sub.params) {
      const int64_t a = std::max(lo, p.offset), b = std::min(hi, p.offset + p.numel);
      if (!p.trainable || a >= b) continue;
      const size_t o = size_t(a - lo);
      if (adam_runs_.size() > first && run_end == a && adam_decay_.back() == p.decay) {
        adam_runs_.back().n += size_t(b - a);
      } else {
        cuda::AdamWSplitTensor r{};
        r.hi = h + o, r.lo = l + o, r.g = g + o * dtype_size(gt), r.m = m + o, r.v = v + o;
        r.n = size_t(b - a);
        adam_runs_.push_back(r);
        adam_decay_.push_back(p.decay);
        adam_g32_.push_back(gt == DType::f32);
      }
      run_end = b;
    }
  }
}

// ------------------------------------------------------------------ hooks around the layers

// The compute stream waits for unit i's post-update all-gather, if one is pending (i < 0: none).
void GpuDecoder::wait_gathered(int i) {
  if (i < 0 || !units_[size_t(i)].gathering) return;
  MOP_CUDA_CHECK(cudaStreamWaitEvent(stream_, units_[size_t(i)].ready, 0));
  units_[size_t(i)].gathering = false;
}

void GpuDecoder::acquire_outer() { wait_gathered(embed_unit_); }  // the head waits for its own, at head()

void GpuDecoder::gather_unit(Unit& u, int slot) {
  // The comm stream waits for the slot's last reader (its free event), then gathers into it.
  bf16* dst = w_slots_.as<bf16>() + size_t(slot) * slot_elems_ + u.slot_off;
  comm_last_ = u.group->all_gather_async(hi_shard_.as<bf16>() + u.tbegin, size_t(u.chunk), dst, DType::bf16);
  bind_unit(w_, u, dst);
}

// Stage 3: layer k's slotted weights into slot k & 1 on the comm stream, after the slot's last
// reader (its free event), unless the slot holds them already.
void GpuDecoder::gather_layer_slot(int k) {
  if (k < 0 || k >= int(c_.layers)) return;
  const int ks = k & 1;
  if (w_slot_layer_[ks] == k) return;
  MOP_CUDA_CHECK(cudaStreamWaitEvent(comm_stream_, w_slot_free_[ks], 0));
  for (int i : {layer_unit_[size_t(k)], expert_unit_[size_t(k)]})
    if (i >= 0 && units_[size_t(i)].w_slot) gather_unit(units_[size_t(i)], ks);
  MOP_CUDA_CHECK(cudaEventRecord(w_slot_ready_[ks], comm_stream_));
  w_slot_layer_[ks] = k;
}

void GpuDecoder::acquire_layer(int l, bool backward) {
  const int s = l & 1;
  wait_gathered(layer_unit_[size_t(l)]);
  wait_gathered(expert_unit_[size_t(l)]);
  if (opt_.zero == 3 && w_slots_.data()) {
    // This layer (gathered already, or now), then the next one in the walk into the other slot.
    gather_layer_slot(l);
    gather_layer_slot(backward ? l - 1 : l + 1);
    // The views point at the slot of l (gather_unit may have bound the next layer's meanwhile).
    for (int i : {layer_unit_[size_t(l)], expert_unit_[size_t(l)]})
      if (i >= 0 && units_[size_t(i)].w_slot)
        bind_unit(w_, units_[size_t(i)], w_slots_.as<bf16>() + size_t(s) * slot_elems_ + units_[size_t(i)].slot_off);
    MOP_CUDA_CHECK(cudaStreamWaitEvent(stream_, w_slot_ready_[s], 0));
  }
  if (backward && g_slots_.data()) {
    bool any = false;
    bf16* base = g_slots_.as<bf16>() + size_t(s) * slot_elems_;
    for (int i : {layer_unit_[size_t(l)], expert_unit_[size_t(l)]}) {
      if (i < 0 || !units_[size_t(i)].g_slot) continue;
      any = true;
      bind_unit(g16_, units_[size_t(i)], base + units_[size_t(i)].slot_off);
    }
    if (any) {  // the slot's last reduction has read it; the layer's backward accumulates into zeros
      MOP_CUDA_CHECK(cudaStreamWaitEvent(stream_, g_slot_free_[s], 0));
      MOP_CUDA_CHECK(cudaMemsetAsync(base, 0, slot_elems_ * 2, stream_));
    }
  }
}

void GpuDecoder::release_layer(int l, bool backward) {
  const int s = l & 1;
  if (opt_.zero == 3 && w_slots_.data()) MOP_CUDA_CHECK(cudaEventRecord(w_slot_free_[s], stream_));
  if (!backward) return;
  for (int i : {layer_unit_[size_t(l)], expert_unit_[size_t(l)]}) {
    if (i < 0) continue;
    Unit& u = units_[size_t(i)];
    MOP_CHECK(!u.g_slot || last_micro_, "GpuDecoder: slotted gradients (zero {}) need one micro-batch a step", opt_.zero);
    if (last_micro_) reduce_unit(u);
  }
  if (g_slots_.data()) MOP_CUDA_CHECK(cudaEventRecord(g_slot_free_[s], comm_stream_));
}

void GpuDecoder::head_grads_done() {
  if (head_unit_ < 0) return;
  Unit& u = units_[size_t(head_unit_)];
  if (u.g_head32) {  // the final norm's bf16 gradient joins the fp32 head unit (exact)
    int64_t off = -1;
    for (const ParamSpec& p : u.spec.sub.params)
      if (p.role == ParamRole::norm) off = p.offset;
    MOP_CHECK(off >= 0, "GpuDecoder: head unit without a final norm");
    cuda::cast_bf16_to_f32(head32_.as<float>() + u.gbegin + size_t(off), fn16_.as<bf16>(), size_t(c_.hidden),
                           stream_);
  }
  if (last_micro_) reduce_unit(u);
}

void GpuDecoder::embed_grads_done() {
  if (embed_unit_ >= 0 && last_micro_) reduce_unit(units_[size_t(embed_unit_)]);
}

// Starts the unit's gradient reduction on the comm stream, after what the compute stream has
// enqueued so far (the unit's backward).
void GpuDecoder::reduce_unit(Unit& u) {
  if (u.reduced) return;
  u.reduced = true;
  if (!u.sharded()) return;
  MOP_CUDA_CHECK(cudaEventRecord(compute_mark_, stream_));
  MOP_CUDA_CHECK(cudaStreamWaitEvent(comm_stream_, compute_mark_, 0));
  // An expert unit's weight gradients may still be on their own stream (ep_overlap): the last
  // recorded are this unit's layer's.
  if (u.spec.experts && wgrad_pending_) MOP_CUDA_CHECK(cudaStreamWaitEvent(comm_stream_, wgrad_done_, 0));
  // And a balanced layer's lent experts take their guests' gradients on the side stream.
  if (u.spec.experts && side_pending_) MOP_CUDA_CHECK(cudaStreamWaitEvent(comm_stream_, side_added_, 0));
  DType t{};
  if (u.g_slot) {
    const bf16* slot = g_slots_.as<bf16>() + size_t(u.spec.layer & 1) * slot_elems_ + u.slot_off;
    comm_last_ = u.group->reduce_scatter_sum_async(slot, g_shard_.as<bf16>() + u.tbegin, size_t(u.chunk), DType::bf16);
    return;
  }
  char* g = static_cast<char*>(unit_grad(u, &t));
  if (opt_.zero == 0) {
    comm_last_ = u.group->all_reduce_sum_async(g, size_t(u.spec.numel), t);
  } else {  // in place: this rank's chunk lands at its own offset
    comm_last_ = u.group->reduce_scatter_sum_async(g, g + size_t(u.shard_begin) * dtype_size(t), size_t(u.chunk), t);
  }
}

void GpuDecoder::reduce_grads() {
  MOP_CHECK(state_ready_, "GpuDecoder::reduce_grads before upload_params");
  zero_stale_grads();  // a step without a backward
  for (Unit& u : units_) {
    MOP_CHECK(!u.g_slot || u.reduced, "GpuDecoder: unit {} has slotted gradients but no backward this step", u.spec.name);
    reduce_unit(u);
  }
}

void GpuDecoder::wait_reductions() {
  MOP_CUDA_CHECK(cudaEventRecord(comm_done_, comm_stream_));
  MOP_CUDA_CHECK(cudaStreamWaitEvent(stream_, comm_done_, 0));
}

// zero >= 1: the updated chunks of the whole-weight units back to every rank of their group (in
// place), each waited for just before its unit is used next; slotted units are gathered on use.
// In the order the next forward needs them: the embedding, then (stage 3) the first two layers'
// slots, then the rest, the head last (the comm stream runs them in this order).
void GpuDecoder::gather_after_step() {
  w_slot_layer_[0] = w_slot_layer_[1] = -1;  // the slots hold the old weights
  if (opt_.zero == 0) return;
  MOP_CUDA_CHECK(cudaEventRecord(compute_mark_, stream_));
  MOP_CUDA_CHECK(cudaStreamWaitEvent(comm_stream_, compute_mark_, 0));
  auto gather_whole = [&](Unit& u) {
    if (u.wbegin == Unit::none || !u.sharded()) return;
    bf16* whole = hi_.as<bf16>() + u.wbegin;
    gather_last_ = u.group->all_gather_async(whole + u.shard_begin, size_t(u.chunk), whole, DType::bf16);
    MOP_CUDA_CHECK(cudaEventRecord(u.ready, comm_stream_));
    u.gathering = true;
  };
  if (embed_unit_ >= 0) gather_whole(units_[size_t(embed_unit_)]);
  if (opt_.zero == 3 && w_slots_.data()) gather_layer_slot(0), gather_layer_slot(1);
  for (size_t i = 0; i < units_.size(); ++i)
    if (int(i) != embed_unit_ && int(i) != head_unit_) gather_whole(units_[i]);
  if (head_unit_ >= 0) gather_whole(units_[size_t(head_unit_)]);
}

// Squared gradient norm over all ranks, every element once.
double GpuDecoder::grad_norm2() {
  double* parts = norm2_.as<double>();
  MOP_CUDA_CHECK(cudaMemsetAsync(parts, 0, norm2_.bytes(), stream_));
  for (size_t i = 0; i < units_.size(); ++i) {
    const Unit& u = units_[i];
    const size_t n = opt_.zero >= 1 ? size_t(u.shard_n) : size_t(u.spec.numel);
    if (n == 0) continue;
    DType t{};
    const void* g = update_grad(u, &t);
    if (t == DType::bf16) cuda::sum_squares(parts + i, static_cast<const bf16*>(g), n, acts_->scratch, stream_);
    else cuda::sum_squares(parts + i, static_cast<const float*>(g), n, acts_->scratch, stream_);
  }
  std::vector<double> host(units_.size());
  MOP_CUDA_CHECK(cudaMemcpyAsync(host.data(), parts, host.size() * sizeof(double), cudaMemcpyDeviceToHost, stream_));
  synchronize();
  double dense = 0, expert = 0;
  for (size_t i = 0; i < units_.size(); ++i) (units_[i].spec.experts ? expert : dense) += host[i];
  if (opt_.zero >= 1) {  // chunks: every element on exactly one rank
    double total = dense + expert;
    if (comm_.world_host && comm_.world_host->size() > 1) comm_.world_host->all_reduce_sum(&total, 1);
    return total;
  }
  // Replicated dense gradients count once; the experts of an expert-parallel group differ.
  if (comm_.ep_host && comm_.ep_host->size() > 1) comm_.ep_host->all_reduce_sum(&expert, 1);
  return dense + expert;
}

// --------------------------------------------------------------------------- host waits

// Before any host wait on the compute stream: it may be waiting for a collective whose peer died,
// and only the works' waits time out (and abort the communicator).
void GpuDecoder::wait_comm() {
  if (side_last_) side_last_->wait(), side_last_.reset();
  if (comm_pending_) comm_pending_->wait(), comm_pending_.reset();
  if (comm_last_) comm_last_->wait(), comm_last_.reset();
  if (gather_last_) gather_last_->wait(), gather_last_.reset();
}
void GpuDecoder::wait_comm_stream() {
  wait_comm();
  MOP_CUDA_CHECK(cudaStreamSynchronize(comm_stream_));
}
// The end of a step: the compute stream depends on the exchanges and reductions, not on the
// post-update gathers, which overlap the next forward (its units wait for them on the device; its
// first host wait, wait_comm, also waits for them on the host).
void GpuDecoder::synchronize() {
  if (side_last_) side_last_->wait(), side_last_.reset();
  if (comm_pending_) comm_pending_->wait(), comm_pending_.reset();
  if (comm_last_) comm_last_->wait(), comm_last_.reset();
  MOP_CUDA_CHECK(cudaStreamSynchronize(stream_));
}

// ---------------------------------------------------------------------------- shard files

std::string GpuDecoder::layout_signature() const {
  std::string s = fmt::format("zero{}", opt_.zero);
  for (const Unit& u : units_) s += fmt::format(" {}:{}/{}", u.spec.name, u.spec.numel, u.P);
  return s;
}

void GpuDecoder::save_shard(const std::string& path) const {
  MOP_CHECK(state_ready_, "GpuDecoder::save_shard before upload_params");
  GpuDecoder& self = const_cast<GpuDecoder&>(*this);
  self.synchronize();
  self.wait_comm_stream();
  ckpt::SafetensorsWriter w;
  w.set_metadata("layout", layout_signature());
  std::vector<std::vector<float>> keep;  // the writer reads them at write()
  keep.reserve(3 * units_.size());       // no reallocation: p, m, v below are references into it
  for (const Unit& u : units_) {
    const size_t n = size_t(u.shard_n), at = opt_.zero >= 1 ? u.sbegin : u.wbegin + size_t(u.shard_begin);
    std::vector<float>& p = keep.emplace_back(n);
    std::vector<float>& m = keep.emplace_back(n);
    std::vector<float>& v = keep.emplace_back(n);
    download_merged(p.data(), n, self.chunk_hi(u) + (opt_.zero >= 1 ? 0 : size_t(u.shard_begin)),
                    lo_.as<uint16_t>() + at);
    if (n) {
      MOP_CUDA_CHECK(cudaMemcpy(m.data(), m_.as<float>() + at, n * 4, cudaMemcpyDeviceToHost));
      MOP_CUDA_CHECK(cudaMemcpy(v.data(), v_.as<float>() + at, n * 4, cudaMemcpyDeviceToHost));
    }
    // The buffers (router bias) as the host last set them, not their stale master copies.
    size_t in_buffers = 0;
    for (const auto& [off, len] : buffer_spans_) {
      const int64_t a = std::max(u.shard_begin, off - u.spec.begin);
      const int64_t b = std::min(u.shard_begin + u.shard_n, off + len - u.spec.begin);
      if (a < b)
        MOP_CUDA_CHECK(cudaMemcpy(p.data() + (a - u.shard_begin),
                                  buffers_.as<float>() + in_buffers + (a - (off - u.spec.begin)),
                                  size_t(b - a) * 4, cudaMemcpyDeviceToHost));
      in_buffers += size_t(len);
    }
    const std::vector<int64_t> shape{int64_t(n)};
    w.add(u.spec.name + ".param", DType::f32, shape, p.data());
    w.add(u.spec.name + ".exp_avg", DType::f32, shape, m.data());
    w.add(u.spec.name + ".exp_avg_sq", DType::f32, shape, v.data());
  }
  w.write(path);
}

void GpuDecoder::load_shard(const std::string& path) {
  MOP_CHECK(state_ready_, "GpuDecoder::load_shard before upload_params");
  synchronize();
  wait_comm_stream();
  ckpt::SafetensorsFile f(path);
  check_shard_layout(f, path, layout_signature());
  for (Unit& u : units_) {
    const std::vector<int64_t> shape{u.shard_n};
    std::vector<float> p(size_t(u.chunk), 0.f), m(size_t(u.chunk), 0.f), v(size_t(u.chunk), 0.f);
    f.read_into(u.spec.name + ".param", DType::f32, shape, p.data());
    f.read_into(u.spec.name + ".exp_avg", DType::f32, shape, m.data());
    f.read_into(u.spec.name + ".exp_avg_sq", DType::f32, shape, v.data());
    if (opt_.zero >= 1) {
      upload_split(p.data(), size_t(u.shard_n), chunk_hi(u), lo_.as<uint16_t>() + u.sbegin);
      MOP_CUDA_CHECK(cudaMemcpy(m_.as<float>() + u.sbegin, m.data(), size_t(u.shard_n) * 4, cudaMemcpyHostToDevice));
      MOP_CUDA_CHECK(cudaMemcpy(v_.as<float>() + u.sbegin, v.data(), size_t(u.shard_n) * 4, cudaMemcpyHostToDevice));
      if (u.wbegin != Unit::none && u.sharded()) {  // the whole bf16 weights from every rank's chunk
        bf16* whole = hi_.as<bf16>() + u.wbegin;
        u.group->all_gather(whole + u.shard_begin, size_t(u.chunk), whole, DType::bf16);
      }
      continue;
    }
    // zero 0: every rank holds the whole unit, reassembled from the chunks of its group.
    const size_t n = size_t(u.spec.numel);
    std::vector<float> all_p(size_t(u.padded())), all_m(all_p.size()), all_v(all_p.size());
    if (u.sharded()) {
      Buffer mine(Device::cuda, Mem::workspace, size_t(u.chunk) * 4), all(Device::cuda, Mem::workspace, all_p.size() * 4);
      for (auto [src, dst] : {std::pair{&p, &all_p}, std::pair{&m, &all_m}, std::pair{&v, &all_v}}) {
        MOP_CUDA_CHECK(cudaMemcpy(mine.data(), src->data(), mine.bytes(), cudaMemcpyHostToDevice));
        u.group->all_gather(mine.data(), size_t(u.chunk), all.data(), DType::f32);
        MOP_CUDA_CHECK(cudaMemcpy(dst->data(), all.data(), all.bytes(), cudaMemcpyDeviceToHost));
      }
    } else {
      all_p = p, all_m = m, all_v = v;
    }
    upload_split(all_p.data(), n, hi_.as<bf16>() + u.wbegin, lo_.as<uint16_t>() + u.wbegin);
    MOP_CUDA_CHECK(cudaMemcpy(m_.as<float>() + u.wbegin, all_m.data(), n * 4, cudaMemcpyHostToDevice));
    MOP_CUDA_CHECK(cudaMemcpy(v_.as<float>() + u.wbegin, all_v.data(), n * 4, cudaMemcpyHostToDevice));
  }
  for (Unit& u : units_) u.gathering = false;
  w_slot_layer_[0] = w_slot_layer_[1] = -1;
  buffers_from_master();
}

}  // namespace mop
