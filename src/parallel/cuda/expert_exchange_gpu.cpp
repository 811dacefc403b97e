#include "parallel/cuda/expert_exchange_gpu.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>

#include "ops/cuda/check.cuh"
#include "ops/cuda/moe_ep.h"

namespace mop {

std::unique_ptr<DeviceWork> token_exchange_count(GpuTokenExchange& x, DeviceGroup& ep, const int32_t* idx_NK,
                                                 const int32_t* offsets_E1, int N, int K, int E) {
  const int P = ep.size();
  const size_t W = size_t(E + P);
  cudaStream_t stream = ep.stream();
  if (x.tokens_host.size() != size_t(P) || x.plan_host.size() != size_t(P) * W) {
    x.tokens_ep = Buffer(Device::cuda, Mem::comm, size_t(P) * sizeof(int32_t));
    x.tokens_host.assign(size_t(P), 0);
    x.plan_rows = Buffer(Device::cuda, Mem::comm, size_t(P + 1) * W * sizeof(int64_t));
    x.plan_host = PinnedHost<int64_t>(size_t(P) * W);
  }
  x.N = N, x.K = K, x.E = E;
  cuda::moe_ep_token_counts(x.tokens_ep.as<int32_t>(), idx_NK, N, K, E, P, stream);
  x.device_plan = ep.moves_data();
  if (!x.device_plan) {
    MOP_CUDA_CHECK(cudaMemcpyAsync(x.tokens_host.data(), x.tokens_ep.data(), size_t(P) * sizeof(int32_t),
                                   cudaMemcpyDeviceToHost, stream));
    return nullptr;
  }
  int64_t* all = x.plan_rows.as<int64_t>();
  int64_t* mine = all + size_t(P) * W;
  cuda::moe_ep_plan_row(mine, offsets_E1, x.tokens_ep.as<int32_t>(), E, P, stream);
  auto work = ep.all_gather_async(mine, W, all, DType::i64);
  MOP_CUDA_CHECK(cudaMemcpyAsync(x.plan_host.data(), all, size_t(P) * W * sizeof(int64_t), cudaMemcpyDeviceToHost,
                                 stream));
  return work;
}

void token_exchange_plan(GpuTokenExchange& x, ProcessGroup& host_ep, const int32_t* offsets_host, cudaStream_t stream,
                         const ExpertBalanceOptions* balance) {
  const int ep = host_ep.size();
  MOP_CHECK(x.tokens_host.size() == size_t(ep), "token_exchange_plan without token_exchange_count");
  if (x.device_plan) {
    const int64_t* counts = x.plan_host.data();
    x.plan = make_token_exchange_plan(ep, host_ep.rank(), x.E, counts,
                                      balance ? plan_expert_balance(ep, x.E, counts, *balance) : std::vector<uint8_t>{});
  } else {
    x.plan = plan_token_exchange(host_ep, offsets_host, x.E, x.tokens_host.data(), balance);
  }
  const TokenExchangePlan& p = x.plan;
  // The index upload, sized once for the most guests a plan may hold. The previous upload of this
  // layer finished long ago (each step ends in a host wait), so its pinned staging may be rewritten.
  const size_t El1 = p.local_offsets.size(), G1 = p.guest_offsets.size();
  const size_t cap = 2 * size_t(x.E) + El1 + size_t(balance ? balance->max_guests : 0) + 1;
  MOP_CHECK(size_t(2 * x.E) + El1 + G1 <= cap, "token_exchange_plan: {} guest experts, at most {} expected", G1 - 1,
            cap - 2 * size_t(x.E) - El1 - 1);
  if (x.index_host.size() != cap) {
    x.index = Buffer(Device::cuda, Mem::comm, cap * sizeof(int32_t));
    x.index_host = PinnedHost<int32_t>(cap);
  }
  int32_t* h = x.index_host.data();
  std::memcpy(h, p.dest_base.data(), size_t(x.E) * sizeof(int32_t));
  std::memcpy(h + x.E, p.local_offsets.data(), El1 * sizeof(int32_t));
  std::memcpy(h + x.E + El1, p.guest_base.data(), size_t(x.E) * sizeof(int32_t));
  std::memcpy(h + 2 * x.E + El1, p.guest_offsets.data(), G1 * sizeof(int32_t));
  MOP_CUDA_CHECK(cudaMemcpyAsync(x.index.data(), h, (2 * size_t(x.E) + El1 + G1) * sizeof(int32_t),
                                 cudaMemcpyHostToDevice, stream));
  // Buffers are replaced only between uses: the stream is past the layer's host sync, and the
  // last reader of the old ones (this layer's previous backward) ended with the last step.
  if (size_t(x.N) > x.n_cap) {
    x.n_cap = size_t(x.N);
    x.slot = Buffer(Device::cuda, Mem::comm, std::max<size_t>(x.n_cap * size_t(ep), 1) * sizeof(int32_t));
  }
  const size_t Rt = size_t(p.tokens_in());
  if (Rt > x.rt_cap || !x.pos.data()) {
    x.rt_cap = grow_rows(Rt);
    x.pos = Buffer(), x.gate = Buffer();
    x.pos = Buffer(Device::cuda, Mem::comm, x.rt_cap * size_t(x.K) * sizeof(int32_t) + 16);
    x.gate = Buffer(Device::cuda, Mem::comm, x.rt_cap * size_t(x.K) * sizeof(float) + 16);
  }
}

std::unique_ptr<DeviceWork> token_exchange_layout(GpuTokenExchange& x, DeviceGroup& ep, const int32_t* idx_NK,
                                                  const float* w_NK, const int32_t* row_NK, const int32_t* offsets_E1,
                                                  int32_t* send_pos_SK, float* send_gate_SK) {
  const TokenExchangePlan& p = x.plan;
  cuda::moe_ep_send_layout(x.slot.as<int32_t>(), send_pos_SK, send_gate_SK, idx_NK, w_NK, row_NK, offsets_E1,
                           x.dest_base(), x.tokens_ep.as<int32_t>(), x.N, x.K, x.E, p.ep, ep.stream());
  token_exchange_rows(ep, p, send_pos_SK, x.pos.data(), x.K, DType::i32, /*to_owners=*/true);
  return token_exchange_rows(ep, p, send_gate_SK, x.gate.data(), x.K, DType::f32, /*to_owners=*/true);
}

std::unique_ptr<DeviceWork> token_exchange_rows(DeviceGroup& ep, const TokenExchangePlan& p, const void* in,
                                                void* out, int width, DType t, bool to_owners) {
  std::vector<size_t> send(to_owners ? p.send_tokens : p.recv_tokens), recv(to_owners ? p.recv_tokens : p.send_tokens);
  for (size_t& v : send) v *= size_t(width);
  for (size_t& v : recv) v *= size_t(width);
  return ep.all_to_all_v_async(in, send, out, recv, t);
}

}  // namespace mop
