// Small pieces the device groups share: a scope that makes a CUDA device current, and a DeviceWork
// that is an event recorded on a stream (for groups whose operations are complete, or nothing, when
// they return: StagedGroup, SkipGroup).
#pragma once
#include <cuda_runtime.h>

#include "ops/cuda/check.cuh"
#include "parallel/cuda/device_group.h"

namespace mop {

// Makes `device` current for the scope and restores the caller's device after.
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    MOP_CUDA_CHECK(cudaGetDevice(&prev_));
    if (prev_ != device) MOP_CUDA_CHECK(cudaSetDevice(device));
  }
  ~DeviceScope() { cudaSetDevice(prev_); }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  int prev_ = 0;
};

class EventWork final : public DeviceWork {
 public:
  explicit EventWork(cudaStream_t s) {
    MOP_CUDA_CHECK(cudaEventCreateWithFlags(&ev_, cudaEventDisableTiming));
    MOP_CUDA_CHECK(cudaEventRecord(ev_, s));
  }
  ~EventWork() override { cudaEventDestroy(ev_); }
  EventWork(const EventWork&) = delete;
  EventWork& operator=(const EventWork&) = delete;
  void wait() override { MOP_CUDA_CHECK(cudaEventSynchronize(ev_)); }
  bool done() override { return cudaEventQuery(ev_) == cudaSuccess; }
  cudaEvent_t event() const override { return ev_; }

 private:
  cudaEvent_t ev_ = nullptr;
};

}  // namespace mop
