// Shared by the CUDA tests: skip (not fail) when this machine has no usable GPU.
#pragma once
#include <gtest/gtest.h>

#include "ops/cuda/runtime.h"

#define MOP_REQUIRE_GPU()                                                   \
  do {                                                                      \
    if (::mop::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device"; \
  } while (0)
