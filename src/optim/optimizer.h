// AdamW over the flat parameter array: fp32 master weights, fp32 moments, per-parameter weight
// decay from the ParamTable; global-norm clipping. Buffers (trainable = false) are left alone.
#pragma once
#include <cstdint>

#include "core/alloc.h"
#include "model/params.h"
#include "ops/cpu/adamw.h"

namespace mop {

struct OptimizerSettings {
  double beta1 = 0.9, beta2 = 0.95, eps = 1e-8, weight_decay = 0.0, clip = 0.0;
};

// The factor global-norm clipping multiplies the gradients by (1 when clip is 0 or not reached).
inline double clip_scale(double norm, double clip) { return clip > 0 && norm > clip ? clip / (norm + 1e-6) : 1.0; }
// One update's scalar arguments; weight_decay is set per parameter by the caller.
cpu::AdamWStep adamw_args(const OptimizerSettings& s, double lr, int64_t step, double grad_scale);

class AdamW {
 public:
  AdamW(const ParamTable& t, OptimizerSettings s);
  // One update with learning rate lr. Returns the global gradient norm before clipping.
  double step(float* params, const float* grads, double lr);
  double grad_norm(const float* grads) const;
  int64_t steps_taken() const { return step_; }
  void set_steps_taken(int64_t s) { step_ = s; }
  float* m() const { return m_.data(); }  // (total) first moments, laid out like the parameters
  float* v() const { return v_.data(); }  // (total) second moments

 private:
  const ParamTable& table_;
  OptimizerSettings s_;
  HostArray<float> m_, v_;
  int64_t step_ = 0;
};

}  // namespace mop
