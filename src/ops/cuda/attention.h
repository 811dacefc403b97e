// Causal attention over packed documents on the GPU, through cuDNN's fused SDPA (flash attention)
// graphs. Same math as mop::cpu::attention_forward/backward (ops/cpu/attention.h): query i attends
// to key j iff both lie in the same document [cu_seqlens[b], cu_seqlens[b+1]) and j <= i; GQA with
// query head h reading kv head h / (H / KVH); lse_NH = natural-log log-sum-exp of the scaled scores.
//
// Layout (token-major): q row n holds H heads of hd contiguous elements, and q_row_stride elements
// separate consecutive tokens (>= H * hd), so q/k/v may be views into one fused QKV GEMM output
// (k and v share kv_row_stride >= KVH * hd). out, dout, dq are contiguous (N, H, hd); dk, dv are
// contiguous (N, KVH, hd); lse_NH is (N, H) fp32.
// Requirements: hd a multiple of 8 and at most 256 (64 and 128 are tested), row strides multiples
// of 8, pointers 16-byte aligned, H % KVH == 0, every document no longer than max_doc_len,
// cu_seqlens_host equal to cu_seqlens_device (the host copy is validated and never sent to the
// device; the device copy feeds the ragged offsets).
//
// Two cuDNN layouts are used:
//  - equal-length documents (n_docs * max_doc_len == N, max_doc_len > 1): the batched BSHD layout,
//    batch = n_docs, sequence = max_doc_len, no padding mask (fastest: 16K causal, hd 128 on an
//    H200 with cuDNN 9.14 ran at about 640 TFLOP/s forward, 540-590 backward);
//  - otherwise the packed THD ("ragged") layout: per-document lengths and ragged offsets
//    (element offsets = cu_seqlens[b] * row stride, built on the device into the workspace by a
//    small kernel), with the batch and the maximum length rounded up to powers of two (missing
//    documents get length 0) so that a training run builds only a handful of cuDNN graphs.
//    The THD backward first copies strided q/k/v to contiguous rows in the workspace (cuDNN's
//    THD backward got strided inputs with contiguous gradients wrong).
// Each distinct graph is built once per process and device (first call: 0.1-2 s; the device's
// cudnnHandle_t is created then) and cached; later calls only launch on the given stream. The
// ops serialise on one mutex (the handle is shared), enqueueing work without host syncs.
//
// Determinism: the forward is deterministic. cuDNN's default Hopper backward accumulates dQ with
// fp32 atomics, so dq may differ in the last bits between runs; set deterministic_backward to
// use cuDNN's deterministic backward (about 15% slower, and its workspace grows by about
// batch * H * S_max^2 * 2 bytes, S_max the padded maximum document length: 8 GiB at 16 x 16K^2).
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace mop::cuda {

// out_NHd, lse_NH written. workspace: at least attention_workspace_bytes(...) bytes, used on the
// stream (no host synchronisation).
void attention_forward(__nv_bfloat16* out_NHd, float* lse_NH, const __nv_bfloat16* q, const __nv_bfloat16* k,
                       const __nv_bfloat16* v, const int32_t* cu_seqlens_device, const int32_t* cu_seqlens_host,
                       int n_docs, int max_doc_len, int N, int H, int KVH, int hd, float scale, int q_row_stride,
                       int kv_row_stride, void* workspace, size_t workspace_bytes, cudaStream_t stream);

// dq (N, H, hd), dk and dv (N, KVH, hd) written (contiguous). out and lse_NH are the forward's.
void attention_backward(__nv_bfloat16* dq, __nv_bfloat16* dk, __nv_bfloat16* dv, const __nv_bfloat16* dout,
                        const __nv_bfloat16* out, const float* lse_NH, const __nv_bfloat16* q,
                        const __nv_bfloat16* k, const __nv_bfloat16* v, const int32_t* cu_seqlens_device,
                        const int32_t* cu_seqlens_host, int n_docs, int max_doc_len, int N, int H, int KVH, int hd,
                        float scale, int q_row_stride, int kv_row_stride, void* workspace, size_t workspace_bytes,
                        cudaStream_t stream);

// Workspace for both directions of this shape (the larger of the two). Builds and caches the cuDNN
// graphs, so it needs a GPU; the result depends on the options below.
size_t attention_workspace_bytes(int n_docs, int max_doc_len, int N, int H, int KVH, int hd, int q_row_stride,
                                 int kv_row_stride);

// Process-wide switches (part of the graph cache key; set them before the calls they affect).
struct AttentionOptions {
  bool deterministic_backward = false;  // cuDNN's deterministic backward (quadratic workspace)
  bool force_ragged = false;            // THD layout even for equal-length documents (tests, benchmarks)
};
void set_attention_options(const AttentionOptions& options);
AttentionOptions attention_options();

}  // namespace mop::cuda
