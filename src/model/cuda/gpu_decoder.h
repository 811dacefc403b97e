// The MoE decoder on one GPU: the same layers as model/decoder.h with the CUDA ops, bf16
// activations and compute weights, fp32 gradients, master weights and Adam moments.
// Activation buffers depend only on the micro-batch token count N (dropless routing keeps the
// expert-sorted buffer at N * top_k rows), so they are allocated once per N and reused.
// One host synchronisation per MoE layer: the expert offsets for the grouped GEMM's sizes.
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

namespace mop {

class GpuDecoder {
 public:
  GpuDecoder(const ModelConfig& c, const ParamTable& t);
  ~GpuDecoder();
  // Uploads fp32 master weights (host, laid out by the table) and makes the bf16 copy.
  void upload_params(const float* host_params);
  void download_params(float* host_params) const;
  void zero_grads();
  // Same objective and statistics as Decoder<float>::forward_backward.
  LossStats forward_backward(const TokenBatch& b, float ce_scale, float lb_scale);
  LossStats forward_loss(const TokenBatch& b);
  // One AdamW step over all trainable parameters (clip with the global norm); refreshes the bf16
  // copy. Returns the gradient norm before clipping.
  double optimizer_step(double lr, double beta1, double beta2, double eps, double weight_decay, double clip,
                        int64_t step);
  float* grads() const { return grads_.as<float>(); }
  float* master() const { return master_.as<float>(); }
  float* moment1() const { return m_.as<float>(); }
  float* moment2() const { return v_.as<float>(); }
  cudaStream_t stream() const { return stream_; }

 private:
  struct Acts;
  void ensure_acts(int N);
  LossStats run(const TokenBatch& b, float ce_scale, float lb_scale, bool backward);

  ModelConfig c_;
  const ParamTable& table_;
  cudaStream_t stream_ = nullptr;
  Buffer master_, weights_, grads_, m_, v_;  // fp32, bf16, fp32, fp32, fp32 (total elements each)
  ModelView<__nv_bfloat16> w_;
  ModelView<float> g_;
  std::unique_ptr<Acts> acts_;
  int acts_N_ = -1;
};

}  // namespace mop
