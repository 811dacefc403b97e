// Runs one function per rank on W threads and reports every rank's exception as a failure.
#pragma once
#include <gtest/gtest.h>

#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "parallel/launch.h"

namespace mop::test {

// Rank `rank` of `world` with a TCP rendezvous on this host at `port`.
inline RankInfo local_rank_info(int rank, int world, int port) {
  RankInfo r;
  r.rank = rank;
  r.world = world;
  r.local_rank = rank;
  r.launcher = "test";
  r.master_addr = "127.0.0.1";
  r.master_port = port;
  return r;
}

inline void run_rank_threads(int W, const std::function<void(int rank)>& fn) {
  std::mutex mu;
  std::vector<std::string> errors;
  std::vector<std::thread> threads;
  for (int r = 0; r < W; ++r) {
    threads.emplace_back([&, r] {
      try {
        fn(r);
      } catch (const std::exception& e) {
        std::lock_guard<std::mutex> lock(mu);
        errors.push_back("rank " + std::to_string(r) + ": " + e.what());
      }
    });
  }
  for (auto& t : threads) t.join();
  for (auto& e : errors) ADD_FAILURE() << e;
}

}  // namespace mop::test
