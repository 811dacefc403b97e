// make_groups: world / ep / edp groups over one rendezvous store; ranks are threads.
#include <gtest/gtest.h>
#include <stdlib.h>

#include <filesystem>
#include <numeric>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "parallel/launch.h"
#include "parallel/rank_threads.h"
#include "parallel/solo_group.h"
#include "parallel/world.h"

namespace mop {
namespace {

using namespace std::chrono_literals;

TEST(GroupLayout, BlocksAndStrides) {
  GroupLayout l = group_layout(5, 8, 4);
  EXPECT_EQ(l.ep_group, 1);
  EXPECT_EQ(l.ep_ranks, (std::vector<int>{4, 5, 6, 7}));
  EXPECT_EQ(l.edp_group, 1);
  EXPECT_EQ(l.edp_ranks, (std::vector<int>{1, 5}));
  l = group_layout(6, 8, 1);
  EXPECT_EQ(l.ep_ranks, (std::vector<int>{6}));
  EXPECT_EQ(l.edp_ranks.size(), 8u);
  l = group_layout(6, 8, 8);
  EXPECT_EQ(l.ep_ranks.size(), 8u);
  EXPECT_EQ(l.edp_ranks, (std::vector<int>{6}));
}

TEST(GroupLayout, EpMustDivideWorld) {
  try {
    group_layout(0, 4, 3);
    FAIL() << "ep=3 of world=4 accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("ep=3 does not divide world=4"), std::string::npos)
        << e.what();
  }
  EXPECT_THROW(group_layout(0, 4, 0), Error);
}

RankInfo rank_info(int rank, int world, int port) { return test::local_rank_info(rank, world, port); }

int sum_of(const std::vector<int>& v) { return std::accumulate(v.begin(), v.end(), 0); }

// Each rank contributes its world rank: a group's all-reduce must sum exactly its members, and
// its all-gather must list them in group-rank order.
void check_group(ProcessGroup& g, const std::vector<int>& members, int world_rank) {
  ASSERT_EQ(g.size(), int(members.size())) << g.name();
  ASSERT_EQ(members[size_t(g.rank())], world_rank) << g.name();
  int64_t x = world_rank;
  g.all_reduce_sum(&x, 1);
  EXPECT_EQ(x, sum_of(members)) << "group " << g.name() << " on world rank " << world_rank;
  std::vector<int32_t> all(members.size(), -1);
  int32_t me = world_rank;
  g.all_gather(&me, 1, all.data());
  EXPECT_EQ(std::vector<int>(all.begin(), all.end()), members) << g.name();
}

class MakeGroups : public ::testing::TestWithParam<int> {};

TEST_P(MakeGroups, World4OverTcpStore) {
  const int W = 4, ep = GetParam();
  const int port = free_tcp_port();
  test::run_rank_threads(W, [&](int r) {
    Groups g = make_groups(rank_info(r, W, port), ep, 20s);
    const GroupLayout l = group_layout(r, W, ep);
    EXPECT_NE(g.store, nullptr);
    EXPECT_EQ(g.world_size(), W);
    EXPECT_EQ(g.world_rank(), r);
    EXPECT_EQ(g.ep_size(), ep);
    EXPECT_EQ(g.ep_rank(), r % ep);
    EXPECT_EQ(g.edp_size(), W / ep);
    EXPECT_EQ(g.edp_rank(), r / ep);
    EXPECT_EQ(g.ep->name(), "ep" + std::to_string(r / ep));
    EXPECT_EQ(g.edp->name(), "edp" + std::to_string(r % ep));
    // Groups of one rank are SoloGroups (no sockets).
    EXPECT_EQ(dynamic_cast<SoloGroup*>(g.ep.get()) != nullptr, ep == 1);
    EXPECT_EQ(dynamic_cast<SoloGroup*>(g.edp.get()) != nullptr, ep == W);
    std::vector<int> all{0, 1, 2, 3};
    check_group(*g.world, all, r);
    check_group(*g.ep, l.ep_ranks, r);
    check_group(*g.edp, l.edp_ranks, r);
    // The ep groups run independently: interleave them with the edp groups.
    check_group(*g.edp, l.edp_ranks, r);
    check_group(*g.ep, l.ep_ranks, r);
    // Twins: the same members, their own connections, usable from another thread while this one
    // runs the originals.
    std::unique_ptr<ProcessGroup> tw = g.twin(*g.world, "t"), te = g.twin(*g.ep, "t"), td = g.twin(*g.edp, "t");
    EXPECT_EQ(tw->name(), "world.t");
    EXPECT_EQ(te->name(), g.ep->name() + ".t");
    std::thread other([&] {
      check_group(*tw, all, r);
      check_group(*te, l.ep_ranks, r);
      check_group(*td, l.edp_ranks, r);
    });
    check_group(*g.world, all, r);
    check_group(*g.ep, l.ep_ranks, r);
    other.join();
  });
}

INSTANTIATE_TEST_SUITE_P(Ep, MakeGroups, ::testing::Values(1, 2, 4),
                         [](const auto& info) { return "ep" + std::to_string(info.param); });

// Sets (or unsets, for nullptr) an environment variable for the scope.
struct ScopedEnv {
  std::string name;
  std::string old;
  bool had;
  ScopedEnv(const char* n, const char* v) : name(n) {
    const char* o = std::getenv(n);
    had = o != nullptr;
    if (had) old = o;
    if (v)
      ::setenv(n, v, 1);
    else
      ::unsetenv(n);
  }
  ~ScopedEnv() {
    if (had)
      ::setenv(name.c_str(), old.c_str(), 1);
    else
      ::unsetenv(name.c_str());
  }
};

TEST(MakeGroupsFileStore, World2FromMopStoreDir) {
  std::string tmpl = (std::filesystem::temp_directory_path() / "mop_world_XXXXXX").string();
  ASSERT_NE(mkdtemp(tmpl.data()), nullptr);
  ScopedEnv env("MOP_STORE_DIR", tmpl.c_str());
  test::run_rank_threads(2, [&](int r) {
    Groups g = make_groups(rank_info(r, 2, 0), 2, 20s);  // no MASTER_PORT: the FileStore
    check_group(*g.world, {0, 1}, r);
    check_group(*g.ep, {0, 1}, r);
    EXPECT_EQ(g.edp_size(), 1);
  });
  std::error_code ec;
  std::filesystem::remove_all(tmpl, ec);
}

TEST(MakeGroupsSolo, World1NeedsNoStore) {
  ScopedEnv env("MOP_STORE_DIR", nullptr);
  RankInfo r;  // rank 0 of 1, no MASTER_ADDR
  Groups g = make_groups(r, 1, 1s);
  EXPECT_EQ(g.store, nullptr);
  for (ProcessGroup* p : {g.world.get(), g.ep.get(), g.edp.get()}) {
    ASSERT_NE(dynamic_cast<SoloGroup*>(p), nullptr) << p->name();
    EXPECT_EQ(p->size(), 1);
    EXPECT_EQ(p->rank(), 0);
  }
  float v[3] = {1, 2, 3}, out[3] = {};
  g.world->all_reduce_sum(v, 3);
  EXPECT_EQ(v[2], 3.f);
  g.ep->all_gather(v, 3, out);
  EXPECT_EQ(out[1], 2.f);
  int64_t a2a_in[2] = {7, 8}, a2a_out[2] = {};
  g.ep->all_to_all_v(a2a_in, {2}, a2a_out, {2});
  EXPECT_EQ(a2a_out[1], 8);
  EXPECT_THROW(g.ep->all_to_all_v(a2a_in, {2}, a2a_out, {1}), Error);
  EXPECT_THROW(g.world->send(v, 3, 0, 0), Error);  // no peer
  auto w = g.edp->all_gather_async(v, 3, out);
  EXPECT_TRUE(w->done());
  w->wait();
  g.world->barrier();
}

TEST(MakeGroupsErrors, BadEpIsRejectedBeforeAnyRendezvous) {
  try {
    make_groups(rank_info(1, 4, 1), 3, 1s);  // port 1: any connection attempt would fail
    FAIL() << "ep=3 of world=4 accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("ep=3 does not divide world=4"), std::string::npos)
        << e.what();
  }
}

TEST(MakeGroupsErrors, NoRendezvousSaysWhatToSet) {
  ScopedEnv env("MOP_STORE_DIR", nullptr);
  try {
    make_groups(rank_info(0, 2, 0), 1, 1s);
    FAIL() << "a world of 2 without a rendezvous was accepted";
  } catch (const Error& e) {
    std::string m = e.what();
    EXPECT_NE(m.find("MASTER_ADDR"), std::string::npos) << m;
    EXPECT_NE(m.find("MASTER_PORT"), std::string::npos) << m;
    EXPECT_NE(m.find("MOP_STORE_DIR"), std::string::npos) << m;
  }
}

}  // namespace
}  // namespace mop
