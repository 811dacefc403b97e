// Token embedding lookup and its deterministic backward; mirrors mop::cpu::embedding_*.
// Token ids are validated on the host elsewhere; here an id outside [0, V) is never used to
// address wte/dwte: forward writes a zero row for it, backward skips it.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace mop::cuda {

// out[n, :] = wte[tokens[n], :].
void embedding_forward(__nv_bfloat16* out_ND, const int32_t* tokens_N, const __nv_bfloat16* wte_VD, int N, int D,
                       int V, cudaStream_t stream);

// Bytes of device workspace embedding_backward needs for N tokens (any V, D).
// Asks cub for its temporary storage size, so it needs a CUDA device.
size_t embedding_backward_workspace(int N);

// dwte[tokens[n], :] += dout[n, :] in fp32, deterministic and in the same order as the CPU op:
// (token, position) pairs are stably radix-sorted in the workspace, then each run of equal
// tokens is summed in position order starting from the existing dwte row. No atomics.
// workspace must hold embedding_backward_workspace(N) bytes (256-byte aligned, as cudaMalloc gives).
void embedding_backward(float* dwte_VD, const __nv_bfloat16* dout_ND, const int32_t* tokens_N, int N, int D, int V,
                        void* workspace, size_t workspace_bytes, cudaStream_t stream);
// Same with a bf16 dwte: each touched row is summed in fp32 from its stored value and rounded once.
void embedding_backward(__nv_bfloat16* dwte_VD, const __nv_bfloat16* dout_ND, const int32_t* tokens_N, int N, int D,
                        int V, void* workspace, size_t workspace_bytes, cudaStream_t stream);

}  // namespace mop::cuda
