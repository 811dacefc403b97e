#include "optim/schedule.h"

#include <algorithm>
#include <cmath>

namespace mop {

double lr_at(int64_t step, int64_t total, int64_t warmup, double lr, double min_ratio, const std::string& schedule) {
  if (step < warmup) return lr * double(step + 1) / double(warmup);
  if (schedule == "constant") return lr;
  const double span = double(std::max<int64_t>(1, total - warmup));
  const double t = std::clamp(double(step - warmup) / span, 0.0, 1.0);
  const double min_lr = lr * min_ratio;
  if (schedule == "linear") return min_lr + (lr - min_lr) * (1.0 - t);
  return min_lr + 0.5 * (lr - min_lr) * (1.0 + std::cos(M_PI * t));
}

}  // namespace mop
