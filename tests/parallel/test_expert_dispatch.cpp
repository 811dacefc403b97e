// Expert-parallel dispatch and return over real Gloo groups (ranks are threads): every row reaches
// the rank owning its expert, in expert-major order, and comes back to where it started, with
// very uneven and empty counts (dropless: nothing is lost whatever the imbalance).
#include <gtest/gtest.h>

#include <chrono>
#include <vector>

#include "parallel/expert_dispatch.h"
#include "parallel/launch.h"
#include "parallel/world.h"
#include "rank_threads.h"

namespace mop {
namespace {

RankInfo rank_info(int rank, int world, int port) { return test::local_rank_info(rank, world, port); }

// Rows routed by `rank` to each of E experts: skewed, with empty experts and an empty rank.
int rows_for(int rank, int e) {
  if (rank == 2) return 0;                  // a rank that routes nothing
  if (e == 5) return 0;                     // an expert nobody picks
  if (e == 1) return 37 + rank;             // a hot expert
  return (rank + e) % 3;
}

float value(int rank, int e, int i, int d) { return float(rank * 100000 + e * 1000 + i * 10 + d); }

TEST(ExpertDispatch, UnevenAndEmptyCountsRoundTrip) {
  const int W = 4, E = 8, D = 3;
  for (int ep : {2, 4}) {
    const int port = free_tcp_port();
    test::run_rank_threads(W, [&](int rank) {
      Groups g = make_groups(rank_info(rank, W, port), ep, std::chrono::seconds(20));
      std::vector<int32_t> off(E + 1, 0);
      for (int e = 0; e < E; ++e) off[e + 1] = off[e] + rows_for(rank, e);
      const int M = off[E];
      std::vector<float> x(size_t(M) * D);
      for (int e = 0; e < E; ++e)
        for (int i = 0; i < rows_for(rank, e); ++i)
          for (int d = 0; d < D; ++d) x[size_t(off[e] + i) * D + d] = value(rank, e, i, d);

      ExpertPlan p = plan_expert_exchange(*g.ep, off.data(), E);
      const int El = E / ep, q = g.ep->rank();
      ASSERT_EQ(p.local_experts, El);
      std::vector<float> xl(size_t(p.rows_in()) * D);
      expert_dispatch(*g.ep, p, x.data(), xl.data(), D);
      // Expert-major: local expert j's rows from source 0, then source 1, ... of this ep group.
      size_t row = 0;
      for (int j = 0; j < El; ++j) {
        const int e = q * El + j;
        ASSERT_EQ(p.local_offsets[j], int32_t(row)) << "expert " << e;
        for (int s = 0; s < ep; ++s) {
          const int src = g.world->rank() - q + s;  // world rank of ep-group member s
          for (int i = 0; i < rows_for(src, e); ++i, ++row)
            for (int d = 0; d < D; ++d) ASSERT_EQ(xl[row * D + d], value(src, e, i, d)) << "row " << row;
        }
      }
      ASSERT_EQ(row, size_t(p.rows_in()));
      // The owner transforms its rows (as the experts would); return brings them home.
      for (int j = 0; j < El; ++j)
        for (int32_t r = p.local_offsets[j]; r < p.local_offsets[j + 1]; ++r)
          for (int d = 0; d < D; ++d) xl[size_t(r) * D + d] += 0.5f;
      std::vector<float> y(size_t(M) * D, -1.f);
      expert_return(*g.ep, p, xl.data(), y.data(), D);
      for (size_t i = 0; i < y.size(); ++i) ASSERT_EQ(y[i], x[i] + 0.5f) << "element " << i;
    });
  }
}

}  // namespace
}  // namespace mop
