// GpuDecoder across ranks: expert-parallel MoE layers (rows to the experts' owners and back over
// NCCL), the load-balancing statistics of the whole micro-batch, and the gradient reduction and
// global norm of the step. Same math as the CPU path (model/ffn_block.cpp, parallel/zero.cpp).
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>

#include "model/cuda/gpu_acts.h"
#include "model/cuda/gpu_decoder.h"
#include "ops/cuda/check.cuh"
#include "ops/cuda/grouped_matmul.h"
#include "ops/cuda/swiglu.h"
#include "parallel/process_group.h"
#include "parallel/cuda/device_group.h"
#include "parallel/cuda/expert_exchange_gpu.h"

namespace mop {

using bf16 = __nv_bfloat16;

bool GpuDecoder::expert_parallel() const { return comm_.ep && comm_.ep->size() > 1; }

void GpuDecoder::set_comm(const GpuComm& comm) {
  MOP_CHECK(!state_ready_, "GpuDecoder::set_comm after upload_params: the state's layout depends on the groups");
  MOP_CHECK(!comm.world || comm.world->stream() == comm_stream_, "GpuDecoder: the world group must run on comm_stream()");
  MOP_CHECK(!comm.edp || comm.edp->stream() == comm_stream_, "GpuDecoder: the edp group must run on comm_stream()");
  MOP_CHECK(!comm.ep || comm.ep->stream() == stream_, "GpuDecoder: the ep group must run on stream()");
  comm_ = comm;
  MOP_CHECK(!expert_parallel() || opt_.recompute != GpuRecompute::full,
            "train.checkpointing = full with parallel.ep > 1 on the GPU would repeat the expert exchange in "
            "backward; use selective (it keeps the experts' rows) or none");
  MOP_CHECK(!expert_parallel() || comm_.ep_host, "GpuDecoder: expert parallelism needs the host ep group");
  const size_t L = size_t(c_.layers);
  ep_layers_.resize(L);
  lb_global_.assign(L, 0.0);
  lb_grad_factor_.assign(L, 1.f);
  counts_host_.assign(L, std::vector<int32_t>(size_t(c_.experts), 0));
}

void GpuDecoder::global_lb_stats(int l) {
  Acts& a = *acts_;
  auto& y = a.layers[size_t(l)];
  const int N = a.N, E = int(c_.experts), K = int(c_.top_k);
  cudaStream_t st = stream_;
  // moe_lb_loss left the column means of the probabilities in a.dprobs.
  std::vector<float> mean(static_cast<size_t>(E), 0.f);
  std::vector<int32_t>& cnt = counts_host_[size_t(l)];
  MOP_CUDA_CHECK(cudaMemcpyAsync(mean.data(), a.dprobs, size_t(E) * 4, cudaMemcpyDeviceToHost, st));
  MOP_CUDA_CHECK(cudaMemcpyAsync(cnt.data(), y.counts, size_t(E) * 4, cudaMemcpyDeviceToHost, st));
  wait_comm();
  MOP_CUDA_CHECK(cudaStreamSynchronize(st));
  std::vector<double> v(size_t(2 * E + 1), 0.0);  // (probability sums, counts, tokens)
  for (int e = 0; e < E; ++e) {
    v[size_t(e)] = N > 0 ? double(mean[size_t(e)]) * N : 0.0;
    v[size_t(E + e)] = double(cnt[size_t(e)]);
  }
  v[size_t(2 * E)] = double(N);
  comm_.world_host->all_reduce_sum(v.data(), v.size());
  const double Nt = v[size_t(2 * E)];
  double loss = 0;
  for (int e = 0; e < E; ++e) {
    cnt[size_t(e)] = int32_t(v[size_t(E + e)]);
    if (Nt > 0) loss += v[size_t(E + e)] / (Nt * K) * (v[size_t(e)] / Nt);
  }
  lb_global_[size_t(l)] = E * loss;
  // Backward's kernel computes dloss * E * (counts / (N K)) / N with this rank's N; the global
  // gradient is dloss * E * (counts / (Nt K)) / Nt, so dloss is scaled by (N / Nt)^2.
  lb_grad_factor_[size_t(l)] = Nt > 0 ? float((double(N) / Nt) * (double(N) / Nt)) : 0.f;
  // The global counts replace the local ones on the device (backward reads them); cnt lives on
  // until the next step, after this copy has run.
  MOP_CUDA_CHECK(cudaMemcpyAsync(y.counts, cnt.data(), size_t(E) * 4, cudaMemcpyHostToDevice, st));
}

void GpuDecoder::experts_forward_ep(int l) {
  Acts& a = *acts_;
  auto& y = a.layers[size_t(l)];
  const LayerView<bf16>& w = w_.layers[size_t(l)];
  const int E = int(c_.experts), F = int(c_.expert_ffn), D = int(c_.hidden);
  cudaStream_t st = stream_;
  EpLayer& el = ep_layers_[size_t(l)];
  wait_comm();
  el.plan = plan_expert_exchange_gpu(*comm_.ep_host, y.offsets_host.data(), E, st);  // synchronises
  const GpuExpertPlan& p = *el.plan;
  const size_t R = size_t(p.plan.rows_in());
  const int El = p.plan.local_experts;
  // Received rows vary with the routing: grow-only buffers with some slack (the stream is idle
  // here: the plan synchronised it).
  auto grow = [](size_t r) { return r + r / 4 + 64; };
  if (R > el.cap) {
    el.cap = grow(R);
    el.xl = Buffer(), el.gu = Buffer(), el.a = Buffer();
    el.xl = Buffer(Device::cuda, Mem::activations, el.cap * size_t(D) * 2);
    el.gu = Buffer(Device::cuda, Mem::activations, el.cap * size_t(2 * F) * 2);
    el.a = Buffer(Device::cuda, Mem::activations, el.cap * size_t(F) * 2);
  }
  if (R > ep_cap_) {
    ep_cap_ = grow(R);
    ep_scratch_ = Buffer(), ep_tmp_ = Buffer(), ep_da_ = Buffer(), ep_dgu_ = Buffer();
    ep_scratch_ = Buffer(Device::cuda, Mem::comm, ep_cap_ * size_t(D) * 2);
    ep_tmp_ = Buffer(Device::cuda, Mem::workspace, ep_cap_ * size_t(D) * 2);
    ep_da_ = Buffer(Device::cuda, Mem::workspace, ep_cap_ * size_t(F) * 2);
    ep_dgu_ = Buffer(Device::cuda, Mem::workspace, ep_cap_ * size_t(2 * F) * 2);
  }
  const int32_t* off_d = p.local_offsets.as<int32_t>();
  const int32_t* off_h = p.plan.local_offsets.data();
  comm_pending_ = expert_dispatch_gpu(*comm_.ep, p, y.xp, el.xl.as<bf16>(), ep_scratch_.as<bf16>(), D);
  if (R > 0) {
    cuda::grouped_matmul_forward(el.gu.as<bf16>(), el.xl.as<bf16>(), w.w_gu, off_d, off_h, El, D, 2 * F, st);
    cuda::swiglu_forward(el.a.as<bf16>(), el.gu.as<bf16>(), int(R), F, st);
    cuda::grouped_matmul_forward(ep_tmp_.as<bf16>(), el.a.as<bf16>(), w.w_down, off_d, off_h, El, F, D, st);
  }
  comm_pending_ = expert_return_gpu(*comm_.ep, p, ep_tmp_.as<bf16>(), y.yp, ep_scratch_.as<bf16>(), D);
}

template <class G>
void GpuDecoder::experts_backward_ep(int l, const LayerView<G>& g) {
  Acts& a = *acts_;
  const LayerView<bf16>& w = w_.layers[size_t(l)];
  const int F = int(c_.expert_ffn), D = int(c_.hidden);
  cudaStream_t st = stream_;
  EpLayer& el = ep_layers_[size_t(l)];
  MOP_CHECK(el.plan, "GpuDecoder: expert-parallel backward of layer {} without its forward", l);
  const GpuExpertPlan& p = *el.plan;
  const size_t R = size_t(p.plan.rows_in());
  const int El = p.plan.local_experts;
  const int32_t* off_d = p.local_offsets.as<int32_t>();
  const int32_t* off_h = p.plan.local_offsets.data();
  bf16* dyl = ep_tmp_.as<bf16>();  // then dxl: the first GEMM has read dyl by then
  comm_pending_ = expert_dispatch_gpu(*comm_.ep, p, a.dyp, dyl, ep_scratch_.as<bf16>(), D);
  if (R > 0) {
    cuda::grouped_matmul_backward(ep_da_.as<bf16>(), g.w_down, dyl, el.a.as<bf16>(), w.w_down, off_d, off_h, El, F, D,
                                  st);
    cuda::swiglu_backward(ep_dgu_.as<bf16>(), ep_da_.as<bf16>(), el.gu.as<bf16>(), int(R), F, st);
    cuda::grouped_matmul_backward(dyl, g.w_gu, ep_dgu_.as<bf16>(), el.xl.as<bf16>(), w.w_gu, off_d, off_h, El, D,
                                  2 * F, st);
  }
  comm_pending_ = expert_return_gpu(*comm_.ep, p, dyl, a.dxp, ep_scratch_.as<bf16>(), D);
}

template void GpuDecoder::experts_backward_ep(int, const LayerView<float>&);
template void GpuDecoder::experts_backward_ep(int, const LayerView<bf16>&);

}  // namespace mop
