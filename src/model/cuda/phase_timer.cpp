#include "model/cuda/phase_timer.h"

#include "ops/cuda/check.cuh"

namespace mop {

PhaseTimer::~PhaseTimer() {
  for (cudaEvent_t e : ev_) cudaEventDestroy(e);
  if (prev_) cudaEventDestroy(prev_);
}

void PhaseTimer::mark(const char* phase, cudaStream_t s) {
  if (n_ == ev_.size()) {
    cudaEvent_t e = nullptr;
    MOP_CUDA_CHECK(cudaEventCreate(&e));
    ev_.push_back(e);
    phase_.push_back(nullptr);
  }
  MOP_CUDA_CHECK(cudaEventRecord(ev_[n_], s));
  phase_[n_++] = phase;
}

std::vector<std::pair<std::string, double>> PhaseTimer::take() {
  std::vector<std::pair<std::string, double>> out;
  auto add = [&](const char* phase, double ms) {
    for (auto& [name, t] : out)
      if (name == phase) return void(t += ms);
    out.emplace_back(phase, ms);
  };
  for (size_t i = 0; i < n_; ++i) {
    cudaEvent_t from = i > 0 ? ev_[i - 1] : prev_;
    if (!from) {
      add(phase_[i], 0.0);
      continue;
    }
    float ms = 0;
    MOP_CUDA_CHECK(cudaEventElapsedTime(&ms, from, ev_[i]));
    add(phase_[i], double(ms));
  }
  if (n_ > 0) {
    if (!prev_) MOP_CUDA_CHECK(cudaEventCreate(&prev_));
    std::swap(prev_, ev_[n_ - 1]);
  }
  n_ = 0;
  return out;
}

}  // namespace mop
