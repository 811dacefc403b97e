#pragma once
#include <cstddef>

namespace mop::cpu {

struct AdamWStep {
  float lr = 0, beta1 = 0.9f, beta2 = 0.95f, eps = 1e-8f, weight_decay = 0;
  int step = 1;             // 1-based, for the bias corrections
  float grad_scale = 1.0f;  // multiplies g first (gradient clipping, loss-scale undo)
};

// PyTorch AdamW order: p *= 1 - lr*wd; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
// p -= lr * (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps). All fp32.
void adamw_step(float* p, const float* g, float* m, float* v, size_t n, const AdamWStep& s);

// sum of g^2 over n elements, accumulated in double in a fixed order.
double sum_squares(const float* g, size_t n);

}  // namespace mop::cpu
