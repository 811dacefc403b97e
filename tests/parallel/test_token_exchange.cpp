// The token-once exchange plan (parallel/token_exchange.h): a worked example by hand, the
// all-gathered plan over real Gloo groups equal to the pure one, and bad counts refused.
#include <gtest/gtest.h>

#include <chrono>
#include <vector>

#include "parallel/launch.h"
#include "parallel/token_exchange.h"
#include "parallel/world.h"
#include "rank_threads.h"

namespace mop {
namespace {

// 2 ranks, 4 experts (rank 0 owns 0-1, rank 1 owns 2-3); per rank: pairs per expert, tokens per rank.
const std::vector<int64_t> kCounts = {3, 1, 0, 2, /*tokens*/ 3, 2,  //
                                      1, 0, 4, 1, /*tokens*/ 2, 3};

TEST(TokenExchangePlan, WorkedExample) {
  // Owner 0: expert 0 rows 0-2 from rank 0, row 3 from rank 1; expert 1 row 4 from rank 0.
  // Owner 1: expert 2 rows 0-3 from rank 1; expert 3 rows 4-5 from rank 0, row 6 from rank 1.
  const TokenExchangePlan p0 = make_token_exchange_plan(2, 0, 4, kCounts.data());
  const TokenExchangePlan p1 = make_token_exchange_plan(2, 1, 4, kCounts.data());
  EXPECT_EQ(p0.local_experts, 2);
  EXPECT_EQ(p0.send_tokens, (std::vector<size_t>{3, 2}));
  EXPECT_EQ(p0.recv_tokens, (std::vector<size_t>{3, 2}));
  EXPECT_EQ(p1.send_tokens, (std::vector<size_t>{2, 3}));
  EXPECT_EQ(p1.recv_tokens, (std::vector<size_t>{2, 3}));
  EXPECT_EQ(p0.local_offsets, (std::vector<int32_t>{0, 4, 5}));
  EXPECT_EQ(p1.local_offsets, (std::vector<int32_t>{0, 4, 7}));
  EXPECT_EQ(p0.dest_base, (std::vector<int32_t>{0, 4, 0, 4}));
  EXPECT_EQ(p1.dest_base, (std::vector<int32_t>{3, 5, 0, 6}));
  EXPECT_EQ(p0.tokens_out(), 5);
  EXPECT_EQ(p1.tokens_in(), 5);
  EXPECT_EQ(p0.pairs_in(), 5);
  EXPECT_EQ(p1.pairs_in(), 7);
}

TEST(TokenExchangePlan, BadCountsAreRefused) {
  std::vector<int64_t> bad = kCounts;
  bad[7] = -1;
  EXPECT_THROW(make_token_exchange_plan(2, 0, 4, bad.data()), Error);
  EXPECT_THROW(make_token_exchange_plan(3, 0, 4, kCounts.data()), Error);  // 4 experts over 3 ranks
  EXPECT_THROW(make_token_exchange_plan(2, 2, 4, kCounts.data()), Error);  // no rank 2
}

TEST(TokenExchangePlan, GatheredOverGlooEqualsPure) {
  const int W = 2, E = 4, port = free_tcp_port();
  test::run_rank_threads(W, [&](int rank) {
    Groups g = make_groups(test::local_rank_info(rank, W, port), /*ep=*/2, std::chrono::seconds(20));
    const int64_t* mine = kCounts.data() + size_t(rank) * (E + W);
    std::vector<int32_t> off(E + 1, 0), tokens(W);
    for (int e = 0; e < E; ++e) off[size_t(e) + 1] = off[size_t(e)] + int32_t(mine[e]);
    for (int q = 0; q < W; ++q) tokens[size_t(q)] = int32_t(mine[E + q]);
    const TokenExchangePlan got = plan_token_exchange(*g.ep, off.data(), E, tokens.data());
    const TokenExchangePlan want = make_token_exchange_plan(W, rank, E, kCounts.data());
    EXPECT_EQ(got.send_tokens, want.send_tokens);
    EXPECT_EQ(got.recv_tokens, want.recv_tokens);
    EXPECT_EQ(got.local_offsets, want.local_offsets);
    EXPECT_EQ(got.dest_base, want.dest_base);
  });
}

}  // namespace
}  // namespace mop
