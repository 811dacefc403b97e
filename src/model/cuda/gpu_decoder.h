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
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "core/alloc.h"
#include "model/batch.h"
#include "model/config.h"
#include "model/decoder.h"
#include "model/params.h"
#include "ops/cuda/adamw.h"

namespace mop {

class ProcessGroup;
class NcclGroup;
struct GpuExpertPlan;

// A multi-GPU run's groups (set by the trainer; parallel/world.h, parallel/cuda/nccl_group.h). The
// NCCL groups run on the decoder's stream. A null member: that axis has one rank.
struct GpuComm {
  ProcessGroup* world_host = nullptr;  // Gloo, all ranks: the load-balancing statistics
  ProcessGroup* ep_host = nullptr;     // Gloo, the expert-parallel group: per-expert row counts
  NcclGroup* world = nullptr;          // dense gradients
  NcclGroup* ep = nullptr;             // token rows to and from the experts' owners
  NcclGroup* edp = nullptr;            // expert gradients (ranks holding the same experts)
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
};

class GpuDecoder {
 public:
  GpuDecoder(const ModelConfig& c, const ParamTable& t, GpuDecoderOptions o = {});
  ~GpuDecoder();
  // All parameters from fp32 host arrays laid out by the table (through a bounded device chunk).
  void upload_params(const float* host_params);
  // Only the non-trained buffers (the sigmoid router's bias), which the host owns.
  void upload_buffers(const float* host_params);
  void download_params(float* host_params) const;
  void upload_moments(const float* m, const float* v);
  void download_moments(float* m, float* v) const;
  void download_grads(float* host) const;  // as fp32 (tests)
  void zero_grads();
  // Same objective and statistics as Decoder<float>::forward_backward.
  LossStats forward_backward(const TokenBatch& b, float ce_scale, float lb_scale);
  LossStats forward_loss(const TokenBatch& b);
  // One AdamW step over all trainable parameters (clip with the global norm); the bf16 compute
  // copy follows. Counts the step. Returns the gradient norm before clipping.
  double optimizer_step(double lr, double beta1, double beta2, double eps, double weight_decay, double clip);
  int64_t steps_taken() const { return steps_; }
  void set_steps_taken(int64_t s) { steps_ = s; }
  cudaStream_t stream() const { return stream_; }
  const GpuDecoderOptions& options() const { return opt_; }

  // Multi-GPU (the table then holds this rank's experts only). reduce_grads sums the gradients
  // of the step over the ranks (dense over all, experts over their replicas) before
  // optimizer_step, whose norm then counts every gradient element once over all ranks.
  void set_comm(const GpuComm& comm);
  void reduce_grads();

 private:
  struct Acts;
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
  void global_lb_stats(int l);                    // after the layer's routing, before backward
  void experts_forward_ep(int l);                 // y.xp -> y.yp through the experts' owners
  template <class G>
  void experts_backward_ep(int l, const LayerView<G>& g);  // a.dyp -> a.dxp
  struct GradRun {
    size_t begin, n;  // elements of the flat gradient array
    bool expert;
  };
  std::vector<GradRun> grad_runs() const;

  ModelConfig c_;
  const ParamTable& table_;
  GpuDecoderOptions opt_;
  cudaStream_t stream_ = nullptr;
  size_t n_ = 0;                              // parameters (table total)
  Buffer hi_, lo_, grads_, m_, v_, buffers_;  // bf16, uint16, fp32|bf16, fp32, fp32, fp32 (buffers only)
  Buffer head32_;                             // fp32 LM-head gradient when the others are bf16
  size_t n16_ = 0, head_off_ = 0;             // bf16 gradient elements; the head's table offset
  Buffer norm2_;                              // (2) fp64 squared gradient norms (bf16 part, fp32 head)
  ModelView<__nv_bfloat16> w_;
  ModelView<float> g32_;
  ModelView<__nv_bfloat16> g16_;
  std::vector<const float*> router_bias_;                  // (L) fp32, into buffers_ (null: no bias)
  std::vector<std::pair<int64_t, int64_t>> buffer_spans_;  // (table offset, numel) of each buffer
  std::vector<cuda::AdamWSplitTensor> adam_runs_;          // contiguous trainable runs of equal decay
  std::vector<bool> adam_decay_, adam_g32_;                // per run: weight decay, fp32 gradient
  std::unique_ptr<Acts> acts_;
  int acts_N_ = -1;
  int64_t steps_ = 0;

  GpuComm comm_;
  struct EpLayer {  // expert-parallel state of one MoE layer: kept from forward to backward
    std::shared_ptr<GpuExpertPlan> plan;
    Buffer xl, gu, a;  // (R, D), (R, 2F), (R, F): the local experts' rows, expert-major
    size_t cap = 0;    // rows the buffers hold
  };
  std::vector<EpLayer> ep_layers_;
  Buffer ep_scratch_, ep_tmp_, ep_da_, ep_dgu_;  // (R, D), (R, D), (R, F), (R, 2F), shared by the layers
  size_t ep_cap_ = 0;
  std::vector<double> lb_global_;                // (L) load-balancing loss over all ranks' tokens
  std::vector<float> lb_grad_factor_;            // (L) (N / N_total)^2: see global_lb_stats
  std::vector<std::vector<int32_t>> counts_host_;  // (L, E) global counts, host side of the upload
};

}  // namespace mop
