#pragma once
#include <cstdint>
#include <string>

namespace mop {

// Learning rate at optimizer step `step` (0-based): linear warmup from lr/warmup to lr over
// `warmup` steps, then cosine or linear decay to lr * min_ratio at `total`, or constant.
double lr_at(int64_t step, int64_t total, int64_t warmup, double lr, double min_ratio, const std::string& schedule);

}  // namespace mop
