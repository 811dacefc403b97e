// Expert-parallel dispatch and return on the GPU: the CPU path's plan (parallel/expert_dispatch.h,
// counts exchanged over the host group: the offsets are on the host already, one sync per MoE
// layer), the token rows moved with one all-to-all-v of the device group each way, and the
// regrouping between source-major (as received) and expert-major (as the grouped GEMM wants) done
// by the permutation kernels with the plan's order.
//
// The device group's stream must be the compute stream the rows are produced and consumed on (the
// exchange is on the critical path). The returned work is the exchange's: a caller that is about
// to wait on the host for the stream waits on it first, so that a peer that died is a timeout
// with the group's error, not a hang in cudaStreamSynchronize.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <memory>

#include "core/alloc.h"
#include "parallel/cuda/device_group.h"
#include "parallel/expert_dispatch.h"

namespace mop {

struct GpuExpertPlan {
  ExpertPlan plan;       // host
  Buffer order;          // (R) int32 on the device: plan.order
  Buffer local_offsets;  // (El + 1) int32 on the device: plan.local_offsets (the grouped GEMM's)
};

// host_ep: the same ranks as the device group, on host memory. offsets_E1: host copy of this rank's
// expert-sorted row offsets over all E experts.
std::shared_ptr<GpuExpertPlan> plan_expert_exchange_gpu(ProcessGroup& host_ep, const int32_t* offsets_E1, int E,
                                                        cudaStream_t stream);
// rows_MD (this rank's routed rows, expert-sorted) -> rows_RD (local experts' rows, expert-major).
// scratch_RD: R x D bf16 the exchange lands in.
std::unique_ptr<DeviceWork> expert_dispatch_gpu(DeviceGroup& ep, const GpuExpertPlan& p, const __nv_bfloat16* rows_MD,
                         __nv_bfloat16* rows_RD, __nv_bfloat16* scratch_RD, int D);
// The reverse: rows_RD (expert-major) -> rows_MD, back where they came from. scratch_RD as above.
std::unique_ptr<DeviceWork> expert_return_gpu(DeviceGroup& ep, const GpuExpertPlan& p, const __nv_bfloat16* rows_RD, __nv_bfloat16* rows_MD,
                       __nv_bfloat16* scratch_RD, int D);

}  // namespace mop
