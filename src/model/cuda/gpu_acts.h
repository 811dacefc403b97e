// Internal to gpu_decoder*.cpp: GpuDecoder's activation and workspace buffers for one token count N.
// Row-major; N tokens, M = N * top_k expert-sorted rows, D hidden, O = (H + 2 KVH) hd.
#pragma once
#include <cuda_bf16.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "core/alloc.h"
#include "model/cuda/gpu_decoder.h"
#include "ops/cuda/pinned.h"
#include "parallel/cuda/expert_exchange_gpu.h"
#include "parallel/zero.h"

namespace mop {

class DeviceGroup;

// One ZeRO unit on the device (gpu_decoder.h, gpu_decoder_zero.cpp). Its elements: the table's
// [spec.begin, spec.begin + spec.numel), this rank's chunk [shard_begin, shard_begin + shard_n) of
// them (the last rank's chunk short; padded to `chunk` in every buffer).
struct GpuDecoder::Unit {
  static constexpr size_t none = ~size_t(0);
  ZeroUnitSpec spec;             // name, layer, experts, range, sub-table (offsets from the unit start)
  DeviceGroup* group = nullptr;  // the ranks it is reduced and sharded over; null: this rank alone
  int P = 1, r = 0;
  int64_t chunk = 0, shard_begin = 0, shard_n = 0;
  size_t wbegin = none;    // whole bf16 weights in hi_ (padded); zero 0: also lo_, m_, v_
  size_t gbegin = none;    // whole gradient in grads_, or in head32_ (fp32) when g_head32
  bool g_head32 = false;
  size_t sbegin = 0;       // zero >= 1: the chunk in lo_, m_, v_
  size_t tbegin = none;    // slotted units: the chunk in hi_shard_ (zero 3) and g_shard_ (zero >= 2)
  size_t slot_off = 0;     // slotted units: offset in a layer slot
  bool w_slot = false;     // zero 3, P > 1, a layer unit: weights gathered into a slot when used
  bool g_slot = false;     // zero >= 2, P > 1, a layer unit, bf16 gradients: gradient in a slot
  bool reduced = false;    // this step's gradient reduction has been started
  bool gathering = false;  // zero >= 1, whole weights: the post-step all-gather is pending
  cudaEvent_t ready = nullptr;  // recorded after that all-gather (comm stream)
  int64_t padded() const { return chunk * P; }
  bool sharded() const { return P > 1; }
};

struct GpuDecoder::Acts {
  // One layer's buffers: pointers into either this layer's own allocations or the shared working
  // set, as the recompute mode decides (gpu_decoder.cpp, ensure_acts).
  struct Layer {
    // Cheap to recompute (own buffers only without recompute): norms, QK-norm/RoPE, permuted rows,
    // SwiGLU outputs.
    __nv_bfloat16 *h1 = nullptr, *x2 = nullptr, *h2 = nullptr;  // (N, D)
    float *rstd1 = nullptr, *rstd2 = nullptr;                   // (N)
    __nv_bfloat16 *q = nullptr, *k = nullptr;                   // after QK-norm and RoPE: (N, H hd), (N, KVH hd)
    float *rstd_q = nullptr, *rstd_k = nullptr;                 // (N, H), (N, KVH)
    __nv_bfloat16 *xp = nullptr, *a = nullptr, *sa = nullptr;   // (M, D), (M, F) or (N, Fd), (N, Fs)
    // The rest (own buffers without recompute and with selective recompute): attention inputs and
    // output, and the FFN GEMM outputs.
    __nv_bfloat16 *q_raw = nullptr, *k_raw = nullptr, *v = nullptr;  // (N, H hd), (N, KVH hd), (N, KVH hd)
    __nv_bfloat16* att = nullptr;                                    // (N, H hd)
    float* lse = nullptr;                                            // (N, H)
    __nv_bfloat16 *gu = nullptr, *yp = nullptr, *sgu = nullptr;      // (M, 2F) or (N, 2Fd), (M, D), (N, 2Fs)
    // Routing (always this layer's own).
    float *probs = nullptr, *w = nullptr;                                           // (N, E), (N, K)
    int32_t *idx = nullptr, *row = nullptr, *offsets = nullptr, *counts = nullptr;  // (N, K), (N K), (E + 1), (E)
    float* lb = nullptr;  // (1) load-balancing loss; counts and lb live in the `stats` block
    std::vector<int32_t> offsets_host;                                              // (E + 1)
  };

  int N = 0;
  std::vector<Buffer> owned;  // every device allocation below
  template <class T>
  T* alloc(size_t n, Mem cat) {
    owned.emplace_back(Device::cuda, cat, std::max<size_t>(n, 1) * sizeof(T));
    return owned.back().as<T>();
  }

  int32_t *tokens = nullptr, *targets = nullptr, *positions = nullptr, *cu = nullptr;  // (N), (N), (N), (N + 1)
  // The current micro-batch's documents (host): cuDNN takes the maximum length from the host.
  const int32_t* cu_host = nullptr;
  int n_docs = 0, max_doc = 0;

  std::vector<__nv_bfloat16*> xs;  // (L + 1) x (N, D) residual stream: every layer's input
  std::vector<Layer> layers;
  __nv_bfloat16* qkv = nullptr;  // (N, O) fused projection, copied out at once
  float* logits = nullptr;       // (N, E) router logits, read once by the router
  __nv_bfloat16* hf = nullptr;   // (N, D) final norm
  float* rstdf = nullptr;        // (N)
  // Backward temporaries, shared by all layers (dtmp also takes forward outputs).
  __nv_bfloat16 *dx = nullptr, *dx2 = nullptr, *dh = nullptr, *dtmp = nullptr;  // (N, D)
  __nv_bfloat16 *datt = nullptr, *dq = nullptr, *dk = nullptr, *dv = nullptr,
                *dkr = nullptr;                                                 // (N, H hd) / (N, KVH hd)
  __nv_bfloat16* dqkv = nullptr;                                                // (N, O)
  __nv_bfloat16 *dyp = nullptr, *da = nullptr, *dgu = nullptr, *dxp = nullptr;  // dxp aliases dyp (dead by then)
  __nv_bfloat16 *dlogits_bf = nullptr, *logits_chunk = nullptr;                 // (N, E), (R, V)
  float *dw = nullptr, *dprobs = nullptr, *dlogits = nullptr, *ce_loss = nullptr, *ce_lse = nullptr, *scratch = nullptr;
  int head_rows = 0;  // R: rows of logits alive at once
  // The micro-batch's statistics, read back in one copy each: per layer l, its expert counts at
  // stats + l * stats_stride and its load-balancing loss (a float) right after them.
  int32_t* stats = nullptr;  // (L, stats_stride)
  size_t stats_stride = 0;
  PinnedHost<int32_t> stats_host;  // (L, stats_stride)
  PinnedHost<float> loss_host;     // (N) per-token losses
  Buffer workspace;   // cuDNN, CUB; grown when an attention shape needs more
  size_t workspace_bytes = 0;

  // Expert parallelism (gpu_decoder_comm.cpp): the MoE layers keep no (M, .) expert-sorted rows on
  // the source rank; each layer's owner side keeps its pairs instead. R pairs and Rt received tokens
  // vary with the routing: grow-only buffers, replaced only while the stream is past a host sync.
  // Kept per layer as the other MoE rows are (GpuRecompute): without recompute the pairs' rows xl
  // and SwiGLU outputs a; with selective recompute the received token rows xr instead (Rt < R: a
  // token brings all its pairs on this rank), expanded again into the shared xl in backward.
  // A balanced layer's guest pairs (this rank's own pairs of lent experts, TokenExchangePlan) are Rg
  // more rows after the R local ones in every pair buffer (R + Rg rows in all); their weights and
  // row map are the layer's own.
  struct EpLayer {
    GpuTokenExchange x;
    Buffer xr, xl, gu, a, yl;  // (Rt, D), (R, D), (R, 2F), (R, F), (R, D); xl, gu, yl expert-major pairs
    size_t r_cap = 0, rt_cap = 0;
    Buffer guest_w;            // (G, 2F, D) then (G, D, F) bf16: the lent experts' weights (room for max_guests)
    Buffer gslot;              // (N, K) int32: each pair's guest row, or -1 (moe_ep_guest_rows)
  };
  std::vector<EpLayer> ep;                 // (L)
  __nv_bfloat16* ep_send = nullptr;        // (S, D), S <= N min(ep, K): token rows to / from the owners
  int32_t* ep_send_pos = nullptr;          // (S, K) the sent tokens' pair fields
  float* ep_send_gate = nullptr;           // (S, K) their gates; in backward, their gate gradients
  Buffer ep_recv, ep_dgate;                // (Rt, D), (Rt, K): received rows, owner-side gate gradients
  Buffer ep_xl, ep_a;                      // (R, D), (R, F): the recomputed pairs' rows and SwiGLU outputs
  Buffer ep_tmp, ep_da, ep_dgu;            // (R, D), (R, F), (R, 2F), shared by the layers
  Buffer ep_dxl;                           // (R, D) the pairs' input gradients (GpuDecoderOptions::ep_overlap)
  size_t ep_rt_cap = 0, ep_r_cap = 0;
  // Balanced layers (side stream unless noted): the weights this rank lends, packed per borrower
  // ((n, 2F, D) then (n, D, F) bf16); the guests' weight gradients in two rotating buffers, written
  // by the weight-gradient stream ((G, 2F, D) then (G, D, F), the gradients' type); the gradients
  // of the experts this rank lent, as they come back; the guest pairs' gate gradients (N, K),
  // compute stream.
  Buffer lend_send, guest_dw[2], lent_dw, guest_dgate;
  size_t lend_cap = 0, guest_dw_cap = 0, lent_dw_cap = 0;
};

}  // namespace mop
