// AdamW on the GPU: the CPU op's formula (ops/cpu/adamw.h), fp32 master weights and moments.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace mop::cuda {

// Step scalars. The bias corrections 1 - beta^t are computed on the host, as the CPU op does:
// float(1.0 - std::pow(double(beta), step)).
struct AdamWArgs {
  float lr, beta1, beta2, eps, weight_decay;
  float bias_correction1, bias_correction2;
  float grad_scale;  // multiplies g first (gradient clipping, loss-scale undo)
};

// p *= float(1 - lr*wd); g *= grad_scale; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
// p -= lr * (m / bc1) / (sqrt(v / bc2) + eps). Every operation rounded as the CPU op rounds it (no
// FMA contraction), so results match cpu::adamw_step bit for bit. p_bf16 (nullable) also receives
// the updated weights rounded to bf16 (the compute copy).
void adamw_step(float* p, const float* g, float* m, float* v, __nv_bfloat16* p_bf16, size_t n, const AdamWArgs& a,
                cudaStream_t stream);

// One tensor of a multi-tensor step; weight_decay replaces AdamWArgs::weight_decay.
struct AdamWTensor {
  float* p;
  const float* g;
  float* m;
  float* v;
  __nv_bfloat16* p_bf16;  // nullable
  size_t n;
  float weight_decay;
};
// The same update over count tensors (a host array) with one kernel launch per 48 tensors: the
// tensor table travels in the kernel's parameters, so nothing is copied or synchronised.
void adamw_step_multi(const AdamWTensor* tensors_host, int count, const AdamWArgs& a, cudaStream_t stream);

// The same update on split master weights (ops/cuda/split_f32.cuh): p is the pair (hi, lo), merged
// exactly to fp32, updated, and split again, so p is bit-identical to adamw_step's and hi is the
// bf16 compute copy. The gradient is fp32 or bf16 (one type per call). 26 bytes of memory traffic
// per parameter with bf16 gradients (adamw_step with its bf16 copy: 30).
struct AdamWSplitTensor {
  __nv_bfloat16* hi;
  uint16_t* lo;
  const void* g;  // const float* or const __nv_bfloat16*, per grads_bf16
  float* m;
  float* v;
  size_t n;
  float weight_decay;
};
void adamw_step_split_multi(const AdamWSplitTensor* tensors_host, int count, bool grads_bf16, const AdamWArgs& a,
                            cudaStream_t stream);

// out_1[0] (device) = sum of g[i]^2 in fp64. Deterministic: a grid and an order that depend only on
// n and g's alignment, fp64 per-block partials in scratch, then one block adds them in a fixed order. scratch must hold
// sum_squares_scratch_floats(n) floats and be 8-byte aligned.
size_t sum_squares_scratch_floats(size_t n);
void sum_squares(double* out_1, const float* g, size_t n, float* scratch, cudaStream_t stream);
void sum_squares(double* out_1, const __nv_bfloat16* g, size_t n, float* scratch, cudaStream_t stream);

}  // namespace mop::cuda
