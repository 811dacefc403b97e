// The MoE decoder on one GPU: the same layers as model/decoder.h with the CUDA ops, bf16
// activations and compute weights, fp32 master weights and Adam moments.
//
// Parameter state, per parameter: the fp32 master weight as two 16-bit halves (ops/cuda/split_f32.cuh:
// the upper half is the bf16 compute copy, so no separate copy exists), fp32 m and v, and the
// gradient in fp32 or bf16 (options). 14 bytes per parameter with bf16 gradients, 16 with fp32.
//
// Activation buffers depend only on the micro-batch token count N (dropless routing keeps the
// expert-sorted buffer at N * top_k rows), so they are allocated once per N and reused. What the
// forward keeps for backward is GpuRecompute's choice; every layer's routing (probabilities,
// selection, expert offsets, host copy of the offsets) is always kept: it is small, and backward's
// recomputed forward then needs no host synchronisation.
// One host synchronisation per MoE layer in the forward: the expert offsets for the grouped GEMM's sizes.
//
// Across ranks (set_comm), the parameters are the units of parallel/zero.h (embed, each layer's
// dense part, each layer's local experts, head), each laid out padded to its group's size in the
// "device space" and sharded as GpuDecoderOptions::zero says (gpu_decoder_zero.cpp):
//   zero 0  everything replicated; each unit's gradient all-reduced as soon as its backward ends
//   zero 1  the low halves of the master weights and m, v: this rank's chunk of each unit only;
//           gradients reduce-scattered in place as soon as a unit's backward ends, AdamW on the
//           chunk, the chunk's bf16 weights all-gathered in place (on the communication stream;
//           the next forward waits for a unit's gather just before the unit)
//   zero 2  as 1, and with one micro-batch a step the gradients of the layer units live in two
//           rotating slots: a layer's slot is reduce-scattered into the gradient shard while the
//           layers below compute, then reused two layers down
//   zero 3  as 2, and the bf16 weights of the layer units too: rank-local chunks, gathered into
//           two rotating slots one layer ahead (forward and backward); embed and head stay whole.
// Collectives of the dense and expert-replica groups run on comm_stream(), ordered against the
// compute stream by events; the expert exchange runs on the compute stream (it is on the path).
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "core/alloc.h"
#include "model/batch.h"
#include "model/config.h"
#include "model/decoder.h"
#include "model/params.h"
#include "ops/cuda/adamw.h"
#include "ops/cuda/pinned.h"
#include "parallel/expert_balance.h"
#include "parallel/process_group.h"
#include "parallel/sharded_state.h"

namespace mop {

class ProcessGroup;
class DeviceGroup;
class DeviceWork;
class PhaseTimer;

// A multi-GPU run's groups (set by the trainer; parallel/world.h, parallel/cuda/device_group.h).
// world and edp run on the decoder's comm_stream(), ep on its stream(). A null member: that axis
// has one rank.
struct GpuComm {
  ProcessGroup* world_host = nullptr;  // Gloo, all ranks: load-balancing statistics, gradient norm
  ProcessGroup* ep_host = nullptr;     // Gloo, the expert-parallel group: per-expert row counts
  DeviceGroup* world = nullptr;        // dense units: gradients, ZeRO shards
  DeviceGroup* ep = nullptr;           // token rows to and from the experts' owners
  DeviceGroup* edp = nullptr;          // expert units (ranks holding the same experts)
  DeviceGroup* ep_side = nullptr;      // the ep ranks on side_stream(): balanced layers' lent weights and gradients
};

// What the forward keeps for backward (train.checkpointing):
//  none:      every layer's activations (fastest; moe-7b at 8K tokens: about 1.1 GB a layer);
//  full:      each layer's input only; backward reruns the layer's forward into one shared set of
//             buffers before its backward (about 1/3 more layer FLOPs);
//  selective: each layer's input, its attention (q, k, v before QK-norm/RoPE, output, log-sum-exp)
//             and its FFN GEMM outputs; backward reruns only the memory-bound parts (norms,
//             QK-norm/RoPE, expert permutation, SwiGLU) and the small output projection (moe-7b at
//             8K tokens: 0.55 GB a layer, about 0.5 ms of rerun).
// The recomputed values are the forward's bits (deterministic kernels in the same order), so the
// gradients equal those of none bit for bit.
enum class GpuRecompute : uint8_t { none, full, selective };

struct GpuDecoderOptions {
  GpuRecompute recompute = GpuRecompute::none;
  // bf16 gradient storage (the LM head's stays fp32): every weight-gradient kernel forms its sum in
  // fp32 and rounds it once into the bf16 gradient. With one micro-batch per step each gradient is
  // rounded exactly once (as PyTorch's bf16 autograd gradients are); with several, once per micro-batch.
  bool bf16_grads = false;
  int zero = 0;  // ZeRO stage across the ranks of set_comm (above)
  bool timing = false;  // train.timing: CUDA events between the step's phases (take_phase_ms)
  // Expert parallelism (parallel.ep_overlap): each MoE layer's expert weight gradients run on a
  // second stream beside its return exchange and the rest of the layer's backward, up to the next
  // MoE layer's expert backward. The GEMMs and their order are the same: the bits are too. Off by
  // default: 1.3% slower on two H200s (bench/results/2026-11-29-h200x2-b.md).
  bool ep_overlap = false;
  // Expert parallelism (parallel.ep_balance): each MoE layer moves blocks of pairs off the most
  // loaded ranks to their sources, which compute them as guests with the experts' weights lent on
  // side_stream() (parallel/expert_balance.h, gpu_decoder_comm.cpp). Same math; the sums of a
  // moved block's outputs and weight gradient take another order.
  bool ep_balance = false;
  ExpertBalanceOptions balance{};
};

class GpuDecoder final : public ShardedState {
 public:
  GpuDecoder(const ModelConfig& c, const ParamTable& t, GpuDecoderOptions o = {});
  ~GpuDecoder();
  // Multi-GPU (the table then holds this rank's experts only); before upload_params, which
  // allocates the state for the groups' sizes.
  void set_comm(const GpuComm& comm);
  // All parameters from fp32 host arrays laid out by the table (through a bounded device chunk).
  void upload_params(const float* host_params);
  // Only the non-trained buffers (the sigmoid router's bias), which the host owns.
  void upload_buffers(const float* host_params);
  // Collective over the groups at zero >= 1 (the master weights are gathered).
  void download_params(float* host_params) const;
  void upload_moments(const float* m, const float* v);  // full arrays; each rank keeps its part
  void download_moments(float* m, float* v) const;      // zero 0 only
  void download_grads(float* host) const;               // as fp32 (tests; one rank)
  void zero_grads();
  // Same objective and statistics as Decoder<float>::forward_backward.
  LossStats forward_backward(const TokenBatch& b, float ce_scale, float lb_scale);
  LossStats forward_loss(const TokenBatch& b);
  // One AdamW step over all trainable parameters (clip with the global norm); the bf16 compute
  // copy follows. Counts the step. Returns the gradient norm before clipping.
  double optimizer_step(double lr, double beta1, double beta2, double eps, double weight_decay, double clip);
  int64_t steps_taken() const override { return steps_; }
  void set_steps_taken(int64_t s) override { steps_ = s; }
  // Host wait for everything enqueued: the pending collectives first (their timeout and abort: a
  // dead peer is an error naming it, not a hang), then the compute stream.
  void synchronize();
  cudaStream_t stream() const { return stream_; }
  cudaStream_t comm_stream() const { return comm_stream_; }
  cudaStream_t side_stream() const { return side_stream_; }  // options().ep_balance only
  const GpuDecoderOptions& options() const { return opt_; }

  // The step's last micro-batch: its backward starts each unit's gradient reduction (dense over
  // all ranks, experts over their replicas) as soon as the unit's backward ends. reduce_grads
  // starts those not started yet (a step whose micro-batches were not marked); optimizer_step
  // waits for them, and its norm counts every gradient element once over all ranks.
  void set_last_micro_batch(bool last) { last_micro_ = last; }
  void reduce_grads();

  // Timing the step without communication (mop bench --skip-steps), for expert parallelism too:
  // record_routing(true) keeps each MoE layer's top-k of every micro-batch of the following steps
  // (the last one's stays); skip_comm() then swaps every device group for a SkipGroup of the same
  // ranks and streams and replays the recorded top-k in place of the router's (and the expert
  // exchange's gathered counts), so a skipped step runs the same expert work on every rank as the
  // recorded one, with no communication on its critical path. After synchronize(); one way: the
  // values are wrong from then on (nothing is moved), so the run ends after.
  void record_routing(bool on) { route_mode_ = on ? RouteLog::record : RouteLog::off; }
  void skip_comm();
  bool comm_skipped() const { return !skip_groups_.empty(); }

  // With options().timing: milliseconds per phase of the compute stream since the last call (host,
  // zero_grads, forward, moe_sync, ep_exchange, zero_wait, head, recompute, backward, reduce_wait,
  // grad_norm, update; model/cuda/phase_timer.h). After synchronize(). Empty without timing.
  std::vector<std::pair<std::string, double>> take_phase_ms();

  // This rank's shards as a sharded checkpoint's files hold them (parallel/zero.h's units and
  // chunks, fp32 master weights and moments): the same files as the CPU backend's ZeroParams of
  // the same layout. load: checks the layout and names the file on a mismatch.
  std::string layout_signature() const;
  void save_shard(const std::string& path) const override;
  void load_shard(const std::string& path) override;

 private:
  struct Acts;
  struct Unit;
  void allocate_state();
  void ensure_acts(int N);
  void ensure_workspace(size_t bytes);
  LossStats run(const TokenBatch& b, float ce_scale, float lb_scale, bool backward);
  void layer_forward(int l, bool recompute);
  template <class T>
  void head(T* head_grad, bool has_targets, float ce_scale);
  template <class G>
  void backward_pass(const ModelView<G>& g, float lb_scale);
  template <class G>
  void layer_backward(int l, const LayerView<G>& g, float lb_scale);
  // Expert parallelism and global load-balancing statistics (gpu_decoder_comm.cpp).
  bool expert_parallel() const;
  void global_lb_copy(int l);    // after the layer's routing: queues the statistics' host copies
  void global_lb_start(int l);   // after the layer's host sync: their all-reduce, asynchronous
  void global_lb_finish();       // after the forward: the global statistics, counts back to the device
  void route_log(int l);          // after the layer's router: record or replay its top-k (route_mode_)
  void experts_forward_ep(int l);  // y.h2 -> a.dtmp through the experts' owners
  template <class G>
  void experts_backward_ep(int l, const LayerView<G>& g);  // a.dx -> a.dh (expert part), a.dw
  void lend_experts(int l);   // balanced layer: the lent experts' weights to their guests (side stream)
  template <class G>
  void return_guest_grads(int l, const LayerView<G>& g);  // guests' weight gradients to the owners, added there
  void join_side();           // compute stream after the side stream's last gradient addition
  // ZeRO units and their collectives (gpu_decoder_zero.cpp).
  void build_units();
  void acquire_layer(int l, bool backward);  // before the layer's forward / recompute / backward
  void release_layer(int l, bool backward);  // after them: starts the gradient reduction, frees slots
  void acquire_outer();                      // before a micro-batch: the embedding complete
  void gather_layer_slot(int k);             // stage 3: layer k's weights into its slot (if not there)
  void wait_gathered(int unit);
  void head_grads_done();                    // after the head's backward (bf16: final norm cast)
  void embed_grads_done();
  void reduce_unit(Unit& u);                 // starts u's reduction (once per step)
  void gather_unit(Unit& u, int slot);       // stage 3: all-gather u's weights into slot
  void wait_reductions();                    // compute stream after every reduction
  void gather_after_step();                  // zero >= 1: the updated chunks back to whole units
  double grad_norm2_shards();                // zero >= 1: this rank's reduced chunks, squared
  void adam_units(const cuda::AdamWArgs& args, double weight_decay);  // zero >= 1
  void mark(const char* phase);              // timing: the compute stream's position ends `phase`
  void zero_grad_spans(bool experts);        // memset the units' whole gradients: expert units, or the rest
  void zero_stale_grads();                   // expert_grads_stale_: zero them now
  void wait_comm();                          // host: the pending collectives (timeout, not hang)
  void wait_comm_stream();                   // host: everything on both streams' collectives
  void join_wgrad();                         // compute stream after the pending expert weight gradients
  double grad_norm2();
  void build_adam_runs();
  template <class T>
  void bind_unit(ModelView<T>& v, const Unit& u, T* base);  // u's parameters in v, laid out from base
  __nv_bfloat16* chunk_hi(const Unit& u);          // the bf16 weights of this rank's chunk
  void* unit_grad(const Unit& u, DType* t) const;  // the unit's whole gradient (null: in a slot)
  const void* update_grad(const Unit& u, DType* t) const;  // what AdamW and the norm read
  void buffers_from_master();
  void upload_split(const float* host, size_t n, __nv_bfloat16* hi, uint16_t* lo);
  void download_merged(float* host, size_t n, const __nv_bfloat16* hi, const uint16_t* lo) const;

  ModelConfig c_;
  const ParamTable& table_;
  ParamTable dtable_;  // table_ with device-space offsets (units padded to their group's size)
  GpuDecoderOptions opt_;
  cudaStream_t stream_ = nullptr, comm_stream_ = nullptr;
  size_t n_ = 0;                              // device-space elements (table total when unsharded)
  size_t ns_ = 0;                             // shard-space elements (zero >= 1: this rank's chunks)
  Buffer hi_, lo_, grads_, m_, v_, buffers_;  // bf16, uint16, fp32|bf16, fp32, fp32, fp32 (buffers only)
  Buffer head32_;                             // the head unit's fp32 gradient when the others are bf16
  Buffer fn16_;                               // (D) bf16 final-norm gradient, cast into head32_
  Buffer norm2_;                              // (units) fp64 squared gradient norms
  ModelView<__nv_bfloat16> w_;
  ModelView<float> g32_;
  ModelView<__nv_bfloat16> g16_;
  std::vector<const float*> router_bias_;                  // (L) fp32, into buffers_ (null: no bias)
  std::vector<std::pair<int64_t, int64_t>> buffer_spans_;  // (table offset, numel) of each buffer
  std::vector<cuda::AdamWSplitTensor> adam_runs_;          // contiguous trainable runs of equal decay
  std::vector<bool> adam_decay_, adam_g32_;                // per run: weight decay, fp32 gradient
  std::vector<Unit> units_;
  std::vector<int> layer_unit_, expert_unit_;              // (L) index into units_, -1: none
  int embed_unit_ = -1, head_unit_ = -1;
  Buffer hi_shard_, g_shard_;  // zero 3: the layer units' bf16 chunks; zero >= 2: reduced gradient chunks
  Buffer w_slots_, g_slots_;   // (2, largest layer) bf16 gathered weights (zero 3), gradients (zero >= 2)
  size_t slot_elems_ = 0;
  int w_slot_layer_[2] = {-1, -1};
  cudaEvent_t w_slot_free_[2] = {}, g_slot_free_[2] = {}, w_slot_ready_[2] = {};
  cudaEvent_t comm_done_ = nullptr, compute_mark_ = nullptr;
  // options().ep_overlap: the expert weight gradients' stream; wgrad_in_ (compute stream) their
  // inputs ready, wgrad_done_ (wgrad stream) the last layer's done; pending until a join.
  cudaStream_t wgrad_stream_ = nullptr;
  cudaEvent_t wgrad_in_ = nullptr, wgrad_done_ = nullptr;
  bool wgrad_pending_ = false;
  int wgrad_sms_ = 0;  // SMs their persistent kernels may use: the rest stay free for communication
  // options().ep_balance: the side stream's loans and returns. side_in_ (compute) the layer's
  // weights readable, side_lent_ (side) its guests' weights in, wgrad_all_ (the weight-gradient
  // stream) the layer's weight gradients done, side_added_ (side) the returned ones added.
  cudaStream_t side_stream_ = nullptr;
  cudaEvent_t side_in_ = nullptr, side_lent_ = nullptr, wgrad_all_ = nullptr, side_added_ = nullptr;
  cudaEvent_t guest_dw_free_[2] = {};  // (side) a rotating guest gradient buffer sent
  bool side_pending_ = false;           // side_added_ not yet joined by the compute stream
  int guest_dw_turn_ = 0;
  EpLoad ep_load_;  // the micro-batch's expert loads so far, into run()'s statistics
  bool last_micro_ = true, state_ready_ = false;
  // bf16 gradients: zero_grads leaves the expert units' whole gradients (most of the model) to the
  // next backward, whose grouped products overwrite them instead of adding to zeros (dw_overwrite_
  // during that backward); anything reading gradients before it zeroes them (zero_stale_grads).
  bool expert_grads_stale_ = false, dw_overwrite_ = false;
  std::unique_ptr<DeviceWork> comm_pending_;               // the last expert exchange (compute stream)
  std::unique_ptr<DeviceWork> comm_last_;                  // the last reduction or slot gather (comm stream)
  std::unique_ptr<DeviceWork> gather_last_;                // the last post-update gather (comm stream)
  std::unique_ptr<DeviceWork> side_last_;                  // the last loan or return (side stream)
  std::unique_ptr<Acts> acts_;
  std::unique_ptr<PhaseTimer> timer_;  // options().timing only
  int acts_N_ = -1;
  int64_t steps_ = 0;
  int micro_ = 0;  // micro-batches since zero_grads (the step's)
  enum class RouteLog : uint8_t { off, record, replay } route_mode_ = RouteLog::off;
  std::vector<Buffer> route_log_;  // (micro-batch, layer): (N, K) int32 ids, then (N, K) f32 weights
  std::vector<std::vector<int64_t>> plan_log_;  // (micro-batch, layer): the exchange's gathered counts
  std::vector<std::unique_ptr<DeviceGroup>> skip_groups_;  // skip_comm(): the groups comm_ now names

  GpuComm comm_;
  std::vector<double> lb_global_;                // (L) load-balancing loss over all ranks' tokens
  std::vector<float> lb_grad_factor_;            // (L) (N / N_total)^2: see global_lb_finish
  std::vector<std::vector<double>> lb_sums_;     // (L, 2E + 1) probability sums, counts, tokens: all-reduced
  std::vector<std::unique_ptr<Work>> lb_work_;   // (L) their all-reduces in flight
  PinnedHost<float> lb_mean_pin_;                // (E) this rank's mean probabilities, host copy
  PinnedHost<int32_t> counts_pin_;               // (L, E) counts: local, then global for the upload
};

}  // namespace mop
