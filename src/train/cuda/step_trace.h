// A timeline of one training step, recorded with CUPTI's activity API and written in the Chrome
// trace event format (open in https://ui.perfetto.dev or chrome://tracing):
//   device  every kernel, copy and memset, one track per stream, with grid and bytes;
//   host    every CUDA runtime call of the process's threads (launches, copies, synchronisations).
// The phase timer (model/cuda/phase_timer.h) says how long each phase took; the timeline says what
// the GPU did in it and when it waited: the gaps between kernels, and the host call they wait on.
// One recording at a time per process (CUPTI's activity buffers are process-wide).
#pragma once
#include <string>

namespace mop {

class StepTrace {
 public:
  static bool available();  // built with CUPTI
  StepTrace() = default;
  ~StepTrace();  // stops a recording left running (an exception mid-step)
  StepTrace(const StepTrace&) = delete;
  StepTrace& operator=(const StepTrace&) = delete;

  // Records from here on. The caller synchronises the device first, so that earlier work does not
  // spill into the recording.
  void start();
  // After the device is synchronised: stops, and writes the recording to `path` (atomically) with
  // `label` as the trace's process name prefix (e.g. "rank 0"). Returns the number of events.
  size_t stop_and_write(const std::string& path, const std::string& label);

 private:
  bool running_ = false;
};

}  // namespace mop
