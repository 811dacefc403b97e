// Where a GPU step's time goes (train.timing): CUDA events recorded on the compute stream between
// the step's phases. The time from one mark to the next belongs to the later mark's phase: the
// stream's work in between, plus any gap in which the host had queued nothing (its data loading,
// a host synchronisation, the planning after one). A collective enqueued on the compute stream
// (the expert exchange) counts its wait for the slowest peer as its own time.
#pragma once

#include <cuda_runtime.h>

#include <string>
#include <utility>
#include <vector>

namespace mop {

class PhaseTimer {
 public:
  PhaseTimer() = default;
  PhaseTimer(const PhaseTimer&) = delete;
  PhaseTimer& operator=(const PhaseTimer&) = delete;
  ~PhaseTimer();

  // phase: a string literal (kept by pointer).
  void mark(const char* phase, cudaStream_t s);
  // Milliseconds per phase since the last take, phases in order of first appearance; the stream
  // must have passed the last mark (the caller's host wait). The span from the previous take's
  // last mark to this take's first goes to the first mark's phase (the host's time between steps).
  std::vector<std::pair<std::string, double>> take();

 private:
  std::vector<cudaEvent_t> ev_;
  std::vector<const char*> phase_;
  size_t n_ = 0;
  cudaEvent_t prev_ = nullptr;  // the previous take's last mark (null before the first take)
};

}  // namespace mop
