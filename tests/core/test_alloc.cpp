#include <gtest/gtest.h>

#include "core/alloc.h"
#include "core/rng.h"

using namespace mop;

TEST(Alloc, TracksCategoriesAndPeaks) {
  MemoryTracker& tr = memory_tracker(Device::cpu);
  size_t base = tr.current(Mem::params);
  {
    Buffer a(Device::cpu, Mem::params, 1000);
    Buffer b(Device::cpu, Mem::grads, 500);
    EXPECT_EQ(tr.current(Mem::params), base + 1000);
    EXPECT_GE(tr.peak(Mem::grads), 500u);
    float* p = a.as<float>();
    for (int i = 0; i < 250; ++i) EXPECT_EQ(p[i], 0.f);
  }
  EXPECT_EQ(tr.current(Mem::params), base);
}

TEST(Alloc, LimitGivesBreakdown) {
  MemoryTracker& tr = memory_tracker(Device::cpu);
  tr.set_limit(tr.current_total() + 4096);
  Buffer keep(Device::cpu, Mem::activations, 1024);
  try {
    Buffer big(Device::cpu, Mem::workspace, 1 << 20);
    FAIL() << "expected OutOfMemory";
  } catch (const OutOfMemory& e) {
    std::string m = e.what();
    EXPECT_NE(m.find("workspace"), std::string::npos) << m;
    EXPECT_NE(m.find("activations"), std::string::npos) << m;
    EXPECT_NE(m.find("would have fitted"), std::string::npos) << m;
  }
  tr.set_limit(0);
}

TEST(Rng, DeterministicAndResumable) {
  Rng a(42), b(42);
  for (int i = 0; i < 10; ++i) EXPECT_EQ(a.next_u64(), b.next_u64());
  Rng c(0);
  c.set_state(a.state());
  EXPECT_EQ(c.normal(), a.normal());
  EXPECT_NE(hash_seed(1, "a"), hash_seed(1, "b"));
}
