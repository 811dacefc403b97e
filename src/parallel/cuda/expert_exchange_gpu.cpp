#include "parallel/cuda/expert_exchange_gpu.h"

#include <cuda_runtime.h>

#include <algorithm>

#include "ops/cuda/check.cuh"
#include "ops/cuda/moe_permute.h"

namespace mop {

std::shared_ptr<GpuExpertPlan> plan_expert_exchange_gpu(ProcessGroup& host_ep, const int32_t* offsets_E1, int E,
                                                        cudaStream_t stream) {
  auto p = std::make_shared<GpuExpertPlan>();
  p->plan = plan_expert_exchange(host_ep, offsets_E1, E);
  const size_t R = p->plan.order.size();
  p->order = Buffer(Device::cuda, Mem::comm, std::max<size_t>(R, 1) * sizeof(int32_t));
  if (R > 0)
    MOP_CUDA_CHECK(cudaMemcpyAsync(p->order.data(), p->plan.order.data(), R * sizeof(int32_t),
                                   cudaMemcpyHostToDevice, stream));
  const size_t El1 = p->plan.local_offsets.size();
  p->local_offsets = Buffer(Device::cuda, Mem::comm, El1 * sizeof(int32_t));
  MOP_CUDA_CHECK(cudaMemcpyAsync(p->local_offsets.data(), p->plan.local_offsets.data(), El1 * sizeof(int32_t),
                                 cudaMemcpyHostToDevice, stream));
  // The host vector may change or die before the copy runs otherwise (pageable memory copies
  // are staged, but keep the rule simple).
  MOP_CUDA_CHECK(cudaStreamSynchronize(stream));
  return p;
}

std::unique_ptr<DeviceWork> expert_dispatch_gpu(DeviceGroup& ep, const GpuExpertPlan& p, const __nv_bfloat16* rows_MD,
                         __nv_bfloat16* rows_RD, __nv_bfloat16* scratch_RD, int D) {
  auto work = ep.all_to_all_v_async(rows_MD, row_elements(p.plan.send_rows, D), scratch_RD,
                                    row_elements(p.plan.recv_rows, D), DType::bf16);  // stream-ordered; no host wait
  const int R = int(p.plan.order.size());
  if (R > 0)
    cuda::moe_permute(rows_RD, scratch_RD, p.order.as<int32_t>(), R, 1, D, ep.stream());  // out[order[i]] = in[i]
  return work;
}

std::unique_ptr<DeviceWork> expert_return_gpu(DeviceGroup& ep, const GpuExpertPlan& p, const __nv_bfloat16* rows_RD, __nv_bfloat16* rows_MD,
                       __nv_bfloat16* scratch_RD, int D) {
  const int R = int(p.plan.order.size());
  if (R > 0)  // out[i] = in[order[i]]: back to source-major
    cuda::moe_permute_backward(scratch_RD, rows_RD, p.order.as<int32_t>(), R, 1, D, ep.stream());
  return ep.all_to_all_v_async(scratch_RD, row_elements(p.plan.recv_rows, D), rows_MD, row_elements(p.plan.send_rows, D),
                               DType::bf16);
}

}  // namespace mop
