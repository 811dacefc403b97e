// ZeRO for the CPU backend: the parameters, gradients and AdamW state of this rank's table (every
// dense parameter and the routed experts it owns) split into units, each sharded over its group.
//
// Units, in table order: "embed"; per layer "layers.<l>" (attention, norms, router, dense or
// shared FFN) and, for MoE layers, "layers.<l>.experts" (the local experts); "head" (final norm
// and LM head). Dense units are sharded over all ranks (the data-parallel group); expert units
// over the expert-data-parallel group, the ranks holding the same experts. A unit of n elements
// gives each of its P ranks one chunk of ceil(n / P) elements (the last one padded).
//
//   stage 0  everything replicated; gradients all-reduced; every rank runs the same update
//   stage 1  optimizer state sharded; gradients reduce-scattered; the updated chunk all-gathered
//   stage 2  as 1, and the full gradients exist only from a unit's first backward to its reduction
//   stage 3  as 2, and the parameters too: a unit is all-gathered when the decoder acquires it and
//            freed when it is released (embed and head stay gathered for the whole micro-batch)
//
// Gradients accumulate unsharded over the micro-batches of a step and are reduced once, when the
// last micro-batch's backward releases the unit, so accumulation does not multiply communication.
// Communication overlaps compute: acquiring layer l starts the all-gather of the next layer in the
// walk (l + 1 in forward, l - 1 in backward; stage 3), and a unit's gradient reduction runs while
// the layers below compute their backward; the optimizer step waits for them. Each group runs its
// operations in call order on its own worker, the same order on every rank.
// The global gradient norm sums every element once (each rank its own chunk) over all ranks.
#pragma once
#include <functional>
#include <string>
#include <vector>

#include "core/alloc.h"
#include "model/decoder.h"
#include "optim/optimizer.h"
#include "parallel/process_group.h"
#include "parallel/sharded_state.h"

namespace mop {

// The units of a table, in table order (each one contiguous range): what ZeroParams shards and
// what a sharded checkpoint's "<unit>.param" tensors hold.
struct ZeroUnitSpec {
  std::string name;          // embed | layers.<l> | layers.<l>.experts | head
  int layer = -1;
  bool experts = false;
  int64_t begin = 0, numel = 0;
  ParamTable sub;            // the unit's parameters, offsets from the unit start
};
std::vector<ZeroUnitSpec> zero_units(const ParamTable& table);

namespace ckpt {
class SafetensorsFile;
}
// A shard file records its layout ("zero<stage> <unit>:<numel>/<ranks> ...", layout_signature);
// loading it into another layout fails here, naming the file and both layouts.
void check_shard_layout(const ckpt::SafetensorsFile& f, const std::string& path, const std::string& want);

class ZeroParams final : public ParamSource<float>, public ShardedState {
 public:
  // table: this rank's table (all experts, or its expert-parallel block). dense: the group dense
  // units are sharded over; experts: the group expert units are sharded over (their replicas).
  ZeroParams(const ParamTable& table, const ModelConfig& c, int stage, ProcessGroup& dense, ProcessGroup& experts,
             OptimizerSettings opt);
  ~ZeroParams() override;

  int stage() const { return stage_; }
  // Takes this rank's part of a full set of local parameters (laid out by the table).
  void load_full(const float* params);
  // Collective: every local parameter, gathered, laid out by the table.
  void gather_full(float* params);

  // The AdamW moments laid out by the table: each rank keeps its part (set, any stage); all of
  // them (get, stage 0 only: every rank holds everything). A GPU run's state goes through these
  // into the same sharded checkpoint files; a checkpoint of another layout comes in through set.
  void set_full_moments(const float* m, const float* v);
  void get_full_moments(float* m, float* v) const;

  void begin_step();                        // zeroes the gradients
  void set_reduce_on_release(bool on) { reduce_on_release_ = on; }  // true for the step's last micro-batch
  // Global-norm clipping and AdamW on this rank's shards. Returns the norm before clipping.
  double step(double lr);
  int64_t steps_taken() const override { return steps_; }
  void set_steps_taken(int64_t s) override { steps_ = s; }
  // Applies fn(element index, value) to the elements of a non-trainable buffer held here, the same
  // way on every rank that holds them (router balance bias).
  void update_buffer(const ParamSpec& p, const std::function<void(int64_t, float&)>& fn);

  // This rank's shards (parameters, exp_avg, exp_avg_sq) as "<unit>.param" etc.; load checks
  // the unit sizes and names the file on a mismatch. Collective (stages 0-2 re-gather).
  void save_shard(const std::string& path) const override;
  void load_shard(const std::string& path) override;
  // "embed:1234/2 layers.0:..." for the checkpoint index: what a saved shard set must match.
  std::string layout_signature() const;

  void acquire_outer(bool backward, ModelView<float>& w, ModelView<float>& g) override;
  void release_outer(bool backward) override;
  void acquire_layer(int l, bool backward, LayerView<float>& w, LayerView<float>& g) override;
  void release_layer(int l, bool backward) override;

 private:
  struct Unit;
  void acquire(Unit& u, bool backward);
  void release(Unit& u, bool backward);
  void reduce(Unit& u);               // starts the unit's gradient reduction (async)
  void finish_reductions();           // waits for every reduction in flight
  void start_gather(Unit& u);         // stage 3: allocates the full unit, all-gathers it (async)
  void prefetch(int layer);           // stage 3: start_gather for the layer's units not yet present
  Unit* find(int layer, bool experts);

  const ParamTable& table_;
  ModelConfig c_;
  int stage_;
  OptimizerSettings opt_;
  std::vector<Unit> units_;
  int64_t steps_ = 0;
  bool reduce_on_release_ = true;
  ProcessGroup* world_;  // for the gradient norm: the dense group spans every rank
};

}  // namespace mop
