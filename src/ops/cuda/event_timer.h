// Device-event timing shared by `mop bench ops` and the timing tests in tests/cuda: warm up, then
// time each of `samples` runs between two events and report the median. Header-only plain C++
// (the CUDA runtime API and the engine's error macros), so tests can use it as it is.
//
// Why per-sample events and a median: one event pair around a loop gives a mean that a single
// slow outlier (clock ramp, a cuDNN plan built late) drags; the median of samples does not.
// Why no host sync between samples: all events are recorded first and read once at the end, so
// the CPU keeps queueing and the GPU never waits for the next launch (short kernels would
// otherwise be timed together with the launch gap). The optional L2 flush (a memset of a buffer
// larger than the L2) runs between samples, outside the timed events, so inputs that would fit in
// the cache are read from HBM as they are in a training step.
#pragma once
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstddef>
#include <vector>

#include "ops/cuda/check.cuh"

namespace mop::cuda {

struct TimingOptions {
  int warmup = 3;         // untimed calls first (module load, plan choice, handle creation)
  int samples = 20;       // timed samples; the median is reported
  int inner = 1;          // calls per sample (the sample's time is divided by it)
  void* flush = nullptr;  // device buffer memset before each sample (nullptr: no flush)
  size_t flush_bytes = 0;
};

struct Timing {
  double median_ms = 0, min_ms = 0, max_ms = 0;
  int samples = 0;
};

// Times f() (which enqueues work on `stream`) and returns the per-call statistics in ms.
template <class F>
Timing time_events(F&& f, cudaStream_t stream, const TimingOptions& o = {}) {
  MOP_CHECK(o.samples > 0 && o.inner > 0 && o.warmup >= 0, "bad timing options: samples {} inner {} warmup {}",
            o.samples, o.inner, o.warmup);
  for (int i = 0; i < o.warmup; ++i) f();
  std::vector<cudaEvent_t> ev(size_t(2 * o.samples));
  for (auto& e : ev) MOP_CUDA_CHECK(cudaEventCreate(&e));
  for (int s = 0; s < o.samples; ++s) {
    if (o.flush) MOP_CUDA_CHECK(cudaMemsetAsync(o.flush, s & 0xff, o.flush_bytes, stream));
    MOP_CUDA_CHECK(cudaEventRecord(ev[size_t(2 * s)], stream));
    for (int i = 0; i < o.inner; ++i) f();
    MOP_CUDA_CHECK(cudaEventRecord(ev[size_t(2 * s + 1)], stream));
  }
  MOP_CUDA_CHECK(cudaEventSynchronize(ev.back()));
  MOP_CUDA_CHECK(cudaGetLastError());  // a failed launch inside f() must not pass as a fast one
  std::vector<double> ms(size_t(o.samples));
  for (int s = 0; s < o.samples; ++s) {
    float t = 0;
    MOP_CUDA_CHECK(cudaEventElapsedTime(&t, ev[size_t(2 * s)], ev[size_t(2 * s + 1)]));
    ms[size_t(s)] = double(t) / o.inner;
  }
  for (auto& e : ev) cudaEventDestroy(e);
  std::sort(ms.begin(), ms.end());
  Timing r;
  r.samples = o.samples;
  r.min_ms = ms.front();
  r.max_ms = ms.back();
  const size_t n = ms.size();
  r.median_ms = n % 2 ? ms[n / 2] : 0.5 * (ms[n / 2 - 1] + ms[n / 2]);
  return r;
}

// The tests' short form: median ms per call of f() on the default stream.
template <class F>
double median_ms(F&& f, int warmup = 3, int samples = 20) {
  TimingOptions o;
  o.warmup = warmup;
  o.samples = samples;
  return time_events(f, nullptr, o).median_ms;
}

}  // namespace mop::cuda
