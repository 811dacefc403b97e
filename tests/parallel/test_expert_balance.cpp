// Least-loaded expert balancing (parallel/expert_balance.h) and the exchange plan it shapes
// (parallel/token_exchange.h): a worked example by hand, the descent's promises on random skewed
// routings of 2 to 8 ranks, every rank's plan consistent with every other's, and bad moves refused.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <numeric>
#include <random>
#include <vector>

#include "core/error.h"
#include "parallel/expert_balance.h"
#include "parallel/launch.h"
#include "parallel/token_exchange.h"
#include "parallel/world.h"
#include "rank_threads.h"

namespace mop {
namespace {

// 2 ranks, 4 experts (rank 0 owns 0-1, rank 1 owns 2-3): rank 0 carries 520 pairs, rank 1 20.
const std::vector<int64_t> kSkewed = {10, 200, 5, 5, /*tokens*/ 150, 8,  //
                                      10, 300, 5, 5, /*tokens*/ 200, 9};

TEST(ExpertBalance, WorkedExample) {
  EXPECT_EQ(expert_loads(2, 4, kSkewed.data(), {}), (std::vector<int64_t>{520, 20}));
  // Rank 1 takes its own 300 pairs of expert 1 (520/20 -> 220/320), then, rank 1 being the most
  // loaded, rank 0 takes its 5 pairs of expert 2 and of expert 3 (225/315, 230/310).
  ExpertBalanceOptions o;
  o.min_rows = 1;
  const std::vector<uint8_t> moved = plan_expert_balance(2, 4, kSkewed.data(), o);
  EXPECT_EQ(moved, (std::vector<uint8_t>{0, 0, 1, 1, /*rank 1*/ 0, 1, 0, 0}));
  EXPECT_EQ(expert_loads(2, 4, kSkewed.data(), moved), (std::vector<int64_t>{230, 310}));
  // Blocks (and gains) under min_rows stay: only the first move.
  o.min_rows = 8;
  EXPECT_EQ(plan_expert_balance(2, 4, kSkewed.data(), o), (std::vector<uint8_t>{0, 0, 0, 0, 0, 1, 0, 0}));
  o.max_guests = 0;
  EXPECT_EQ(plan_expert_balance(2, 4, kSkewed.data(), o), std::vector<uint8_t>(8, 0));

  // The plans: rank 1 computes expert 1 for itself (guest rows 0-299), rank 0 lends it.
  const TokenExchangePlan p0 = make_token_exchange_plan(2, 0, 4, kSkewed.data(), moved);
  const TokenExchangePlan p1 = make_token_exchange_plan(2, 1, 4, kSkewed.data(), moved);
  EXPECT_TRUE(p0.balanced && p1.balanced);
  // Owner 0: expert 0 rows 0-9 from rank 0, 10-19 from rank 1; expert 1 rows 20-219 from rank 0.
  EXPECT_EQ(p0.local_offsets, (std::vector<int32_t>{0, 20, 220}));
  // Owner 1: expert 2 rows 0-4 from rank 1; expert 3 rows 5-9 from rank 1.
  EXPECT_EQ(p1.local_offsets, (std::vector<int32_t>{0, 5, 10}));
  EXPECT_EQ(p0.dest_base, (std::vector<int32_t>{0, 20, -1, -1}));
  EXPECT_EQ(p1.dest_base, (std::vector<int32_t>{10, -1, 0, 5}));
  EXPECT_EQ(p0.guest_experts, (std::vector<int32_t>{2, 3}));
  EXPECT_EQ(p0.guest_offsets, (std::vector<int32_t>{0, 5, 10}));
  EXPECT_EQ(p0.guest_base, (std::vector<int32_t>{-1, -1, 0, 5}));
  EXPECT_EQ(p1.guest_experts, (std::vector<int32_t>{1}));
  EXPECT_EQ(p1.guest_offsets, (std::vector<int32_t>{0, 300}));
  EXPECT_EQ(p0.lent, (std::vector<std::vector<int32_t>>{{}, {1}}));
  EXPECT_EQ(p1.lent, (std::vector<std::vector<int32_t>>{{0, 1}, {}}));
  EXPECT_EQ(p0.borrowed, (std::vector<size_t>{0, 2}));
  EXPECT_EQ(p1.borrowed, (std::vector<size_t>{1, 0}));
  EXPECT_EQ(p0.pairs_in() + p0.guest_pairs(), 230);
  EXPECT_EQ(p1.pairs_in() + p1.guest_pairs(), 310);
  EXPECT_EQ(p0.load_max, 310);
  EXPECT_EQ(p0.load_max_unbalanced, 520);
  EXPECT_EQ(p0.load_total, 540);
  // The token counts are the gathered ones: moves change which pairs travel, not which tokens.
  EXPECT_EQ(p0.send_tokens, (std::vector<size_t>{150, 8}));

  // Nothing moved: the plan of the unbalanced exchange, no guests.
  const TokenExchangePlan plain = make_token_exchange_plan(2, 1, 4, kSkewed.data());
  EXPECT_FALSE(plain.balanced);
  EXPECT_EQ(plain.guest_pairs(), 0);
  EXPECT_EQ(plain.load_max, plain.load_max_unbalanced);
}

// Routings with a few hot experts and some empty ones, as an initialised router gives.
std::vector<int64_t> skewed_counts(int P, int E, uint64_t seed) {
  std::mt19937_64 g(seed);
  std::vector<double> heat(static_cast<size_t>(E));
  for (double& h : heat) {
    const uint64_t u = g() % 10;
    h = u < 3 ? 0.0 : u < 8 ? 1.0 + double(g() % 100) / 50.0 : 6.0 + double(g() % 100) / 10.0;
  }
  std::vector<int64_t> c(size_t(P) * size_t(E + P), 0);
  for (int s = 0; s < P; ++s)
    for (int e = 0; e < E; ++e) c[size_t(s) * size_t(E + P) + size_t(e)] = int64_t(heat[size_t(e)] * double(40 + g() % 200));
  return c;
}

TEST(ExpertBalance, DescentKeepsItsPromises) {
  for (int P : {2, 3, 4, 8})
    for (uint64_t seed = 1; seed <= 25; ++seed) {
      const int E = 8 * P;
      SCOPED_TRACE("P=" + std::to_string(P) + " seed=" + std::to_string(seed));
      const std::vector<int64_t> c = skewed_counts(P, E, seed);
      ExpertBalanceOptions o;
      o.min_rows = int64_t(seed % 3) * 40;
      o.max_guests = 1 + int(seed % 4);
      const std::vector<uint8_t> moved = plan_expert_balance(P, E, c.data(), o);
      EXPECT_EQ(plan_expert_balance(P, E, c.data(), o), moved);  // deterministic
      const std::vector<int64_t> before = expert_loads(P, E, c.data(), {}), after = expert_loads(P, E, c.data(), moved);
      EXPECT_EQ(std::accumulate(after.begin(), after.end(), int64_t(0)),
                std::accumulate(before.begin(), before.end(), int64_t(0)));
      EXPECT_LE(*std::max_element(after.begin(), after.end()), *std::max_element(before.begin(), before.end()));
      const int El = E / P;
      int any = 0;
      for (int s = 0; s < P; ++s) {
        int guests = 0;
        for (int e = 0; e < E; ++e) {
          if (!moved[size_t(s) * E + e]) continue;
          ++guests, ++any;
          EXPECT_NE(e / El, s) << "rank " << s << " moved its own expert " << e;
          EXPECT_GE(c[size_t(s) * (E + P) + e], std::max<int64_t>(o.min_rows, 1)) << "block (" << s << ", " << e << ")";
        }
        EXPECT_LE(guests, o.max_guests) << "rank " << s;
      }
      // No improving move is left: the most loaded rank has no admissible block of min_rows gain.
      const int hot = int(std::max_element(after.begin(), after.end()) - after.begin());
      const int64_t least = std::max<int64_t>(o.min_rows, 1);
      for (int e = hot * El; e < (hot + 1) * El; ++e)
        for (int s = 0; s < P; ++s) {
          int guests = 0;
          for (int f = 0; f < E; ++f) guests += moved[size_t(s) * E + f];
          const int64_t b = c[size_t(s) * (E + P) + e];
          if (s == hot || moved[size_t(s) * E + e] || guests >= o.max_guests || b < least) continue;
          EXPECT_LT(after[size_t(hot)] - std::max(after[size_t(hot)] - b, after[size_t(s)] + b), least)
              << "an improving move of block (" << s << ", " << e << ") was left";
        }
      if (P == 2 && o.min_rows == 0) {
        EXPECT_GT(any, 0);  // these routings are never balanced already
      }
    }
}

TEST(ExpertBalance, EveryRanksPlanAgrees) {
  for (int P : {2, 3, 4})
    for (uint64_t seed = 1; seed <= 10; ++seed) {
      const int E = 4 * P, El = 4;
      SCOPED_TRACE("P=" + std::to_string(P) + " seed=" + std::to_string(seed));
      const std::vector<int64_t> c = skewed_counts(P, E, 100 + seed);
      ExpertBalanceOptions o;
      o.min_rows = 1;
      o.max_guests = 3;
      const std::vector<uint8_t> moved = plan_expert_balance(P, E, c.data(), o);
      const std::vector<int64_t> load = expert_loads(P, E, c.data(), moved);
      std::vector<TokenExchangePlan> p;
      for (int r = 0; r < P; ++r) p.push_back(make_token_exchange_plan(P, r, E, c.data(), moved));
      for (int q = 0; q < P; ++q) {
        EXPECT_EQ(p[size_t(q)].pairs_in() + p[size_t(q)].guest_pairs(), load[size_t(q)]) << "rank " << q;
        // The owner's rows: every unmoved block exactly once, where its source puts it.
        std::vector<int> hit(size_t(p[size_t(q)].pairs_in()), 0);
        for (int s = 0; s < P; ++s)
          for (int e = q * El; e < (q + 1) * El; ++e) {
            const int64_t n = c[size_t(s) * (E + P) + e];
            const int32_t base = p[size_t(s)].dest_base[size_t(e)];
            if (moved[size_t(s) * E + e]) {
              EXPECT_EQ(base, -1);
              continue;
            }
            EXPECT_GE(base, p[size_t(q)].local_offsets[size_t(e - q * El)]);
            EXPECT_LE(base + n, p[size_t(q)].local_offsets[size_t(e - q * El) + 1]);
            for (int64_t i = 0; i < n; ++i) ++hit[size_t(base + i)];
          }
        for (size_t i = 0; i < hit.size(); ++i) ASSERT_EQ(hit[i], 1) << "owner " << q << " row " << i;
        // What q borrows from each owner is what that owner lends to q, in the same order.
        std::vector<int32_t> from_lenders;
        for (int o2 = 0; o2 < P; ++o2) {
          EXPECT_EQ(p[size_t(q)].borrowed[size_t(o2)], p[size_t(o2)].lent[size_t(q)].size());
          for (int32_t j : p[size_t(o2)].lent[size_t(q)]) from_lenders.push_back(o2 * El + j);
        }
        EXPECT_EQ(p[size_t(q)].guest_experts, from_lenders) << "rank " << q;
        for (size_t g = 0; g < p[size_t(q)].guest_experts.size(); ++g) {
          const int e = p[size_t(q)].guest_experts[g];
          EXPECT_EQ(p[size_t(q)].guest_base[size_t(e)], p[size_t(q)].guest_offsets[g]);
          EXPECT_EQ(p[size_t(q)].guest_offsets[g + 1] - p[size_t(q)].guest_offsets[g], c[size_t(q) * (E + P) + e]);
        }
      }
    }
}

TEST(ExpertBalance, BadMovesAreRefused) {
  std::vector<uint8_t> own(8, 0);
  own[0] = 1;  // rank 0's block of its own expert 0
  EXPECT_THROW(make_token_exchange_plan(2, 0, 4, kSkewed.data(), own), Error);
  EXPECT_THROW(make_token_exchange_plan(2, 0, 4, kSkewed.data(), std::vector<uint8_t>(7, 0)), Error);
  EXPECT_THROW(plan_expert_balance(3, 4, kSkewed.data(), ExpertBalanceOptions{}), Error);  // 4 experts over 3 ranks
}

TEST(ExpertBalance, GatheredOverGlooEqualsPure) {
  const int W = 2, E = 4, port = free_tcp_port();
  ExpertBalanceOptions o;
  o.min_rows = 1;
  test::run_rank_threads(W, [&](int rank) {
    Groups g = make_groups(test::local_rank_info(rank, W, port), /*ep=*/2, std::chrono::seconds(20));
    const int64_t* mine = kSkewed.data() + size_t(rank) * (E + W);
    std::vector<int32_t> off(E + 1, 0), tokens(W);
    for (int e = 0; e < E; ++e) off[size_t(e) + 1] = off[size_t(e)] + int32_t(mine[e]);
    for (int q = 0; q < W; ++q) tokens[size_t(q)] = int32_t(mine[E + q]);
    const TokenExchangePlan got = plan_token_exchange(*g.ep, off.data(), E, tokens.data(), &o);
    const TokenExchangePlan want =
        make_token_exchange_plan(W, rank, E, kSkewed.data(), plan_expert_balance(W, E, kSkewed.data(), o));
    EXPECT_EQ(got.dest_base, want.dest_base);
    EXPECT_EQ(got.local_offsets, want.local_offsets);
    EXPECT_EQ(got.guest_experts, want.guest_experts);
    EXPECT_EQ(got.guest_offsets, want.guest_offsets);
    EXPECT_EQ(got.lent, want.lent);
    EXPECT_TRUE(got.balanced);
  });
}

}  // namespace
}  // namespace mop
