#include <cuda_runtime.h>

#include "core/alloc.h"
#include "cuda_check.h"

using namespace mop;

TEST(CudaRuntime, AllocationsAreAccountedPerCategory) {
  MOP_REQUIRE_GPU();
  cuda::install_alloc_hooks();
  MemoryTracker& tr = memory_tracker(Device::cuda);
  const size_t base = tr.current(Mem::activations);
  {
    Buffer b(Device::cuda, Mem::activations, 1 << 20);
    EXPECT_NE(b.data(), nullptr);
    EXPECT_EQ(tr.current(Mem::activations), base + (1 << 20));
    std::vector<float> host(256, 3.f), back(256, 0.f);
    ASSERT_EQ(cudaMemcpy(b.data(), host.data(), 1024, cudaMemcpyHostToDevice), cudaSuccess);
    ASSERT_EQ(cudaMemcpy(back.data(), b.data(), 1024, cudaMemcpyDeviceToHost), cudaSuccess);
    EXPECT_EQ(back, host);
  }
  EXPECT_EQ(tr.current(Mem::activations), base);
}

TEST(CudaRuntime, OutOfMemoryIsReportedNotCrashed) {
  MOP_REQUIRE_GPU();
  cuda::install_alloc_hooks();
  try {
    Buffer huge(Device::cuda, Mem::workspace, size_t(1) << 50);  // 1 PiB
    FAIL() << "expected OutOfMemory";
  } catch (const OutOfMemory& e) {
    EXPECT_NE(std::string(e.what()).find("out of cuda memory"), std::string::npos) << e.what();
  }
}

TEST(CudaRuntime, DescribesTheDevice) {
  MOP_REQUIRE_GPU();
  EXPECT_NE(std::string(cuda::device_description()).find("sm_"), std::string::npos);
}
