#include "optim/optimizer.h"

#include <cmath>

namespace mop {

AdamW::AdamW(const ParamTable& t, OptimizerSettings s)
    : table_(t), s_(s), m_(size_t(t.total), Mem::optimizer), v_(size_t(t.total), Mem::optimizer) {}

double AdamW::grad_norm(const float* grads) const {
  double ss = 0;
  for (const auto& p : table_.params)
    if (p.trainable) ss += cpu::sum_squares(grads + p.offset, size_t(p.numel));
  return std::sqrt(ss);
}

double AdamW::step(float* params, const float* grads, double lr) {
  const double norm = grad_norm(grads);
  double scale = 1.0;
  if (s_.clip > 0 && norm > s_.clip) scale = s_.clip / (norm + 1e-6);
  ++step_;
  cpu::AdamWStep a;
  a.lr = float(lr);
  a.beta1 = float(s_.beta1);
  a.beta2 = float(s_.beta2);
  a.eps = float(s_.eps);
  a.step = int(step_);
  a.grad_scale = float(scale);
  for (const auto& p : table_.params) {
    if (!p.trainable) continue;
    a.weight_decay = p.decay ? float(s_.weight_decay) : 0.f;
    cpu::adamw_step(params + p.offset, grads + p.offset, m_.data() + p.offset, v_.data() + p.offset, size_t(p.numel),
                    a);
  }
  return norm;
}

}  // namespace mop
