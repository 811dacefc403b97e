#include "parallel/zero.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "checkpoint/safetensors.h"
#include "core/error.h"
#include "ops/cpu/adamw.h"

namespace mop {

struct ZeroParams::Unit {
  std::string name;
  int layer = -1;                // -1: embed or head
  bool experts = false;
  int64_t begin = 0, numel = 0;  // range of the rank's table
  ProcessGroup* group = nullptr;
  int64_t chunk = 0;             // ceil(numel / group size)
  int64_t shard_begin = 0, shard_n = 0;  // this rank's chunk, unit coordinates (shard_n < chunk on the last rank)
  ParamTable sub;                // the unit's parameters, offsets from the unit start
  // Full (padded to chunk * P) parameters and gradients: always for the parameters below stage 3,
  // while acquired at stage 3; the gradients from the first backward to the reduction (stage 2, 3).
  HostArray<float> w_full, g_full;
  HostArray<float> w_shard;      // stage 3: this rank's parameters (the fp32 master)
  HostArray<float> g_shard;      // stage >= 1: the reduced gradient chunk
  HostArray<float> m, v;         // stage 0: numel; else chunk
  int holds = 0;                 // acquisitions not yet released (stage 3)
  bool reduced = false;          // gradients of this step reduced (or being reduced)
  std::unique_ptr<Work> gather;  // stage 3: w_full's all-gather in flight (a prefetch)
  std::unique_ptr<Work> reducing;  // the gradient reduction in flight
  int64_t padded() const { return chunk * group->size(); }
};

namespace {

// Calls fn(param, lo, hi) for each parameter of `sub` overlapping [lo, hi), with the overlap.
template <class F> void for_overlaps(const ParamTable& sub, int64_t lo, int64_t hi, F&& fn) {
  for (const ParamSpec& p : sub.params) {
    const int64_t a = std::max(lo, p.offset), b = std::min(hi, p.offset + p.numel);
    if (a < b) fn(p, a, b);
  }
}

ModelView<float> unit_view(const ParamTable& sub, const ModelConfig& c, float* base) {
  return make_view<float>(sub, c, base);
}

}  // namespace

void check_shard_layout(const ckpt::SafetensorsFile& f, const std::string& path, const std::string& want) {
  const auto it = f.metadata().find("layout");
  MOP_CHECK(it != f.metadata().end() && it->second == want,
            "{}: saved with layout '{}', this run's layout is '{}' (another layout resumes by reading the "
            "checkpoint whole, not shard by shard)",
            path, it == f.metadata().end() ? "?" : it->second, want);
}

std::vector<ZeroUnitSpec> zero_units(const ParamTable& table) {
  // Each unit must be one contiguous range (params.cpp orders a layer's dense parameters before
  // its routed experts for this).
  std::vector<ZeroUnitSpec> units;
  for (const ParamSpec& p : table.params) {
    const bool is_expert = p.role == ParamRole::expert_gate_up || p.role == ParamRole::expert_down;
    std::string name = p.layer >= 0 ? fmt::format("layers.{}{}", p.layer, is_expert ? ".experts" : "")
                                    : (p.role == ParamRole::embedding ? "embed" : "head");
    if (units.empty() || units.back().name != name) {
      for (const ZeroUnitSpec& u : units)
        MOP_CHECK(u.name != name, "zero: parameters of unit '{}' are not contiguous in the table ({})", name, p.name);
      ZeroUnitSpec u;
      u.name = std::move(name);
      u.layer = p.layer;
      u.experts = is_expert;
      u.begin = p.offset;
      u.sub.experts = table.experts;
      units.push_back(std::move(u));
    }
    ZeroUnitSpec& u = units.back();
    MOP_CHECK(p.offset == u.begin + u.numel, "zero: unit '{}' has a gap before {}", u.name, p.name);
    ParamSpec q = p;
    q.offset = u.numel;
    u.sub.params.push_back(std::move(q));
    u.numel += p.numel;
    u.sub.total = u.numel;
  }
  return units;
}

ZeroParams::ZeroParams(const ParamTable& table, const ModelConfig& c, int stage, ProcessGroup& dense,
                       ProcessGroup& experts, OptimizerSettings opt)
    : table_(table), c_(c), stage_(stage), opt_(opt), world_(&dense) {
  MOP_CHECK(stage >= 0 && stage <= 3, "parallel.zero = {}: must be 0, 1, 2 or 3", stage);
  for (ZeroUnitSpec& spec : zero_units(table)) {
    Unit u;
    u.name = std::move(spec.name);
    u.layer = spec.layer;
    u.experts = spec.experts;
    u.begin = spec.begin;
    u.numel = spec.numel;
    u.sub = std::move(spec.sub);
    u.group = u.experts ? &experts : &dense;
    units_.push_back(std::move(u));
  }
  for (Unit& u : units_) {
    const int P = u.group->size(), r = u.group->rank();
    u.chunk = (u.numel + P - 1) / P;
    u.shard_begin = std::min(u.numel, int64_t(r) * u.chunk);
    u.shard_n = std::min(u.numel, u.shard_begin + u.chunk) - u.shard_begin;
    const size_t state = stage == 0 ? size_t(u.numel) : size_t(u.chunk);
    u.m = HostArray<float>(state, Mem::optimizer);
    u.v = HostArray<float>(state, Mem::optimizer);
    if (stage < 3) u.w_full = HostArray<float>(size_t(u.padded()), Mem::params);
    else u.w_shard = HostArray<float>(size_t(u.chunk), Mem::params);
    if (stage >= 1) u.g_shard = HostArray<float>(size_t(u.chunk), Mem::grads);
    if (stage <= 1) u.g_full = HostArray<float>(size_t(u.padded()), Mem::grads);
  }
}

ZeroParams::~ZeroParams() = default;

ZeroParams::Unit* ZeroParams::find(int layer, bool experts) {
  for (Unit& u : units_)
    if (u.layer == layer && u.experts == experts) return &u;
  return nullptr;
}

void ZeroParams::load_full(const float* params) {
  for (Unit& u : units_) {
    const float* src = params + u.begin;
    if (stage_ < 3) std::memcpy(u.w_full.data(), src, sizeof(float) * size_t(u.numel));
    else std::memcpy(u.w_shard.data(), src + u.shard_begin, sizeof(float) * size_t(u.shard_n));
  }
}

void ZeroParams::gather_full(float* params) {
  finish_reductions();
  for (Unit& u : units_) {
    if (stage_ < 3) {
      std::memcpy(params + u.begin, u.w_full.data(), sizeof(float) * size_t(u.numel));
      continue;
    }
    HostArray<float> full(size_t(u.padded()), Mem::workspace);
    u.group->all_gather(u.w_shard.data(), size_t(u.chunk), full.data());
    std::memcpy(params + u.begin, full.data(), sizeof(float) * size_t(u.numel));
  }
}

void ZeroParams::set_full_moments(const float* m, const float* v) {
  for (Unit& u : units_) {
    const int64_t lo = stage_ == 0 ? 0 : u.shard_begin, n = stage_ == 0 ? u.numel : u.shard_n;
    std::memcpy(u.m.data(), m + u.begin + lo, sizeof(float) * size_t(n));
    std::memcpy(u.v.data(), v + u.begin + lo, sizeof(float) * size_t(n));
  }
}

void ZeroParams::get_full_moments(float* m, float* v) const {
  MOP_CHECK(stage_ == 0, "zero: full moments exist at stage 0 only (stage {})", stage_);
  for (const Unit& u : units_) {
    std::memcpy(m + u.begin, u.m.data(), sizeof(float) * size_t(u.numel));
    std::memcpy(v + u.begin, u.v.data(), sizeof(float) * size_t(u.numel));
  }
}

void ZeroParams::finish_reductions() {
  for (Unit& u : units_) {
    if (!u.reducing) continue;
    u.reducing->wait();
    u.reducing.reset();
    if (stage_ >= 2) u.g_full = HostArray<float>();  // stages 2 and 3 keep only the reduced chunk
  }
}

void ZeroParams::begin_step() {
  finish_reductions();
  for (Unit& u : units_) {
    u.reduced = false;
    if (stage_ <= 1) std::fill(u.g_full.data(), u.g_full.data() + u.g_full.size(), 0.f);
    else u.g_full = HostArray<float>();
  }
}

void ZeroParams::start_gather(Unit& u) {
  u.w_full = HostArray<float>(size_t(u.padded()), Mem::params);
  u.gather = u.group->all_gather_async(u.w_shard.data(), size_t(u.chunk), u.w_full.data());
}

void ZeroParams::prefetch(int l) {
  if (stage_ != 3 || l < 0 || l >= int(c_.layers)) return;
  for (bool experts : {false, true})
    if (Unit* u = find(l, experts); u && u->w_full.empty()) start_gather(*u);
}

void ZeroParams::acquire(Unit& u, bool backward) {
  if (stage_ == 3) {
    if (u.w_full.empty()) start_gather(u);  // not prefetched
    if (u.gather) {
      u.gather->wait();
      u.gather.reset();
    }
    ++u.holds;
  }
  if (backward && u.g_full.empty()) {
    MOP_CHECK(!u.reduced, "zero: unit '{}' needs gradients after they were reduced this step", u.name);
    u.g_full = HostArray<float>(size_t(u.padded()), Mem::grads);  // zeroed
  }
}

void ZeroParams::release(Unit& u, bool backward) {
  if (backward && reduce_on_release_) reduce(u);
  if (stage_ == 3 && --u.holds == 0) u.w_full = HostArray<float>();
}

// Started here, finished by finish_reductions (before the optimizer step): the reduction of a
// layer's gradients runs on the group's worker while the next layer down computes its backward.
void ZeroParams::reduce(Unit& u) {
  if (u.reduced) return;
  u.reduced = true;
  if (stage_ == 0)
    u.reducing = u.group->all_reduce_sum_async(u.g_full.data(), size_t(u.numel));
  else
    u.reducing = u.group->reduce_scatter_sum_async(u.g_full.data(), u.g_shard.data(), size_t(u.chunk));
}

void ZeroParams::acquire_outer(bool backward, ModelView<float>& w, ModelView<float>& g) {
  for (Unit& u : units_) {
    if (u.layer >= 0) continue;
    acquire(u, backward);
    const ModelView<float> wv = unit_view(u.sub, c_, u.w_full.data());
    if (wv.embed) w.embed = wv.embed;
    if (wv.final_norm) w.final_norm = wv.final_norm;
    if (wv.head && !c_.tie_embeddings) w.head = wv.head;
    if (backward) {
      const ModelView<float> gv = unit_view(u.sub, c_, u.g_full.data());
      if (gv.embed) g.embed = gv.embed;
      if (gv.final_norm) g.final_norm = gv.final_norm;
      if (gv.head && !c_.tie_embeddings) g.head = gv.head;
    }
  }
  if (c_.tie_embeddings) {
    w.head = w.embed;
    if (backward) g.head = g.embed;
  }
}

void ZeroParams::release_outer(bool backward) {
  for (Unit& u : units_)
    if (u.layer < 0) release(u, backward);
}

void ZeroParams::acquire_layer(int l, bool backward, LayerView<float>& w, LayerView<float>& g) {
  w = LayerView<float>{};
  if (backward) g = LayerView<float>{};
  for (bool experts : {false, true}) {
    Unit* u = find(l, experts);
    if (!u) continue;
    acquire(*u, backward);
    merge_layer_view(w, unit_view(u->sub, c_, u->w_full.data()).layers[size_t(l)]);
    if (backward) merge_layer_view(g, unit_view(u->sub, c_, u->g_full.data()).layers[size_t(l)]);
  }
  // The decoder walks the layers up in forward and down in backward: gather the next one while
  // this one computes.
  prefetch(backward ? l - 1 : l + 1);
}

void ZeroParams::release_layer(int l, bool backward) {
  for (bool experts : {false, true})
    if (Unit* u = find(l, experts)) release(*u, backward);
}

double ZeroParams::step(double lr) {
  finish_reductions();
  for (Unit& u : units_)
    MOP_CHECK(u.reduced, "zero: optimizer step before the gradients of unit '{}' were reduced", u.name);
  // Each element is counted once: every rank sums its own chunk (the reduced gradient; at
  // stage 0 the chunk's slice of the identical all-reduced gradient).
  double ss = 0;
  for (Unit& u : units_) {
    const float* g = stage_ == 0 ? u.g_full.data() + u.shard_begin : u.g_shard.data();
    for_overlaps(u.sub, u.shard_begin, u.shard_begin + u.shard_n, [&](const ParamSpec& p, int64_t a, int64_t b) {
      if (p.trainable) ss += cpu::sum_squares(g + (a - u.shard_begin), size_t(b - a));
    });
  }
  world_->all_reduce_sum(&ss, 1);
  const double norm = std::sqrt(ss);
  ++steps_;
  cpu::AdamWStep a = adamw_args(opt_, lr, steps_, clip_scale(norm, opt_.clip));
  for (Unit& u : units_) {
    // Stage 0 updates the whole unit (identically on every rank); the others their chunk.
    const int64_t lo = stage_ == 0 ? 0 : u.shard_begin, hi = stage_ == 0 ? u.numel : u.shard_begin + u.shard_n;
    float* w = stage_ == 3 ? u.w_shard.data() : u.w_full.data() + lo;
    const float* g = stage_ == 0 ? u.g_full.data() : u.g_shard.data();
    for_overlaps(u.sub, lo, hi, [&](const ParamSpec& p, int64_t x, int64_t y) {
      if (!p.trainable) return;
      a.weight_decay = p.decay ? float(opt_.weight_decay) : 0.f;
      const size_t o = size_t(x - lo);
      cpu::adamw_step(w + o, g + o, u.m.data() + o, u.v.data() + o, size_t(y - x), a);
    });
    if (stage_ == 1 || stage_ == 2) {  // every rank needs the whole updated unit again
      HostArray<float> mine(size_t(u.chunk), Mem::comm);
      std::memcpy(mine.data(), u.w_full.data() + u.shard_begin, sizeof(float) * size_t(u.shard_n));
      u.group->all_gather(mine.data(), size_t(u.chunk), u.w_full.data());
    }
  }
  return norm;
}

void ZeroParams::update_buffer(const ParamSpec& p, const std::function<void(int64_t, float&)>& fn) {
  for (Unit& u : units_) {
    if (p.offset < u.begin || p.offset >= u.begin + u.numel) continue;
    const int64_t off = p.offset - u.begin;
    // Replicated parameters: every rank updates all elements. Stage 3: only the chunk held here.
    const int64_t lo = stage_ == 3 ? std::max(off, u.shard_begin) : off;
    const int64_t hi = stage_ == 3 ? std::min(off + p.numel, u.shard_begin + u.shard_n) : off + p.numel;
    for (int64_t i = lo; i < hi; ++i)  // i: unit coordinates
      fn(i - off, stage_ == 3 ? u.w_shard[size_t(i - u.shard_begin)] : u.w_full[size_t(i)]);
    return;
  }
  MOP_FAIL("zero: parameter {} is not in this rank's table", p.name);
}

std::string ZeroParams::layout_signature() const {
  std::string s = fmt::format("zero{}", stage_);
  for (const Unit& u : units_) s += fmt::format(" {}:{}/{}", u.name, u.numel, u.group->size());
  return s;
}

void ZeroParams::save_shard(const std::string& path) const {
  ckpt::SafetensorsWriter w;
  w.set_metadata("layout", layout_signature());
  std::vector<HostArray<float>> keep;
  for (const Unit& u : units_) {
    const std::vector<int64_t> shape{u.shard_n};
    const float* param = stage_ == 3 ? u.w_shard.data() : u.w_full.data() + u.shard_begin;
    const size_t o = stage_ == 0 ? size_t(u.shard_begin) : 0;
    w.add(u.name + ".param", DType::f32, shape, param);
    w.add(u.name + ".exp_avg", DType::f32, shape, u.m.data() + o);
    w.add(u.name + ".exp_avg_sq", DType::f32, shape, u.v.data() + o);
  }
  w.write(path);
}

void ZeroParams::load_shard(const std::string& path) {
  ckpt::SafetensorsFile f(path);
  check_shard_layout(f, path, layout_signature());
  for (Unit& u : units_) {
    const std::vector<int64_t> shape{u.shard_n};
    HostArray<float> p(size_t(u.chunk), Mem::workspace), m(size_t(u.chunk), Mem::workspace),
        v(size_t(u.chunk), Mem::workspace);
    f.read_into(u.name + ".param", DType::f32, shape, p.data());
    f.read_into(u.name + ".exp_avg", DType::f32, shape, m.data());
    f.read_into(u.name + ".exp_avg_sq", DType::f32, shape, v.data());
    if (stage_ == 3) std::memcpy(u.w_shard.data(), p.data(), sizeof(float) * size_t(u.chunk));
    else u.group->all_gather(p.data(), size_t(u.chunk), u.w_full.data());
    if (stage_ == 0) {  // replicated moments: reassemble the whole unit from the chunks
      HostArray<float> full(size_t(u.padded()), Mem::workspace);
      u.group->all_gather(m.data(), size_t(u.chunk), full.data());
      std::memcpy(u.m.data(), full.data(), sizeof(float) * size_t(u.numel));
      u.group->all_gather(v.data(), size_t(u.chunk), full.data());
      std::memcpy(u.v.data(), full.data(), sizeof(float) * size_t(u.numel));
    } else {
      std::memcpy(u.m.data(), m.data(), sizeof(float) * size_t(u.chunk));
      std::memcpy(u.v.data(), v.data(), sizeof(float) * size_t(u.chunk));
    }
  }
}

}  // namespace mop
