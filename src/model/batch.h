#pragma once
#include <cstdint>

namespace mop {

// One micro-batch as the model sees it: N tokens packed into one stream, documents delimited by
// cu_seqlens (cu_seqlens[0] = 0, cu_seqlens[n_docs] = N). positions restart at 0 in each document.
// targets[i] < 0 marks a position without a loss (padding, or ignore in Hugging Face's -100).
struct TokenBatch {
  int N = 0;
  const int32_t* tokens = nullptr;     // (N)
  const int32_t* targets = nullptr;    // (N), may be null for inference
  const int32_t* positions = nullptr;  // (N)
  const int32_t* cu_seqlens = nullptr; // (n_docs + 1)
  int n_docs = 0;
};

}  // namespace mop
