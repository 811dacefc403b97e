#include "optim/optimizer.h"

#include <cmath>

namespace mop {

cpu::AdamWStep adamw_args(const OptimizerSettings& s, double lr, int64_t step, double grad_scale) {
  cpu::AdamWStep a;
  a.lr = float(lr);
  a.beta1 = float(s.beta1);
  a.beta2 = float(s.beta2);
  a.eps = float(s.eps);
  a.step = int(step);
  a.grad_scale = float(grad_scale);
  return a;
}

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
  ++step_;
  cpu::AdamWStep a = adamw_args(s_, lr, step_, clip_scale(norm, s_.clip));
  for (const auto& p : table_.params) {
    if (!p.trainable) continue;
    a.weight_decay = p.decay ? float(s_.weight_decay) : 0.f;
    cpu::adamw_step(params + p.offset, grads + p.offset, m_.data() + p.offset, v_.data() + p.offset, size_t(p.numel),
                    a);
  }
  return norm;
}

}  // namespace mop
