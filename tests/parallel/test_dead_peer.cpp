// A peer process that dies: the survivor's next collective fails fast with an error naming the
// dead rank. The peer is a fork()ed child (a real process exit closes its sockets).
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <string>
#include <thread>

#include "parallel/gloo_group.h"
#include "parallel/launch.h"
#include "parallel/rank_threads.h"
#include "parallel/tcp_store.h"
#include "parallel/world.h"

namespace mop {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

// Owns the child: whatever happens in the test, it is killed and reaped.
struct Child {
  pid_t pid = -1;
  ~Child() {
    if (pid > 0) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, nullptr, 0);
    }
  }
  // Exit code, or -1 if it has not exited within `limit` (then it is killed).
  int reap(std::chrono::milliseconds limit) {
    auto deadline = Clock::now() + limit;
    for (;;) {
      int status = 0;
      pid_t got = ::waitpid(pid, &status, WNOHANG);
      if (got == pid) {
        pid = -1;
        return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
      }
      if (Clock::now() > deadline) return -1;
      std::this_thread::sleep_for(10ms);
    }
  }
};

// Runs body in a child process that can never return into the test runner: exit code 1 after
// body, 3 if it threw. alarm() kills it if it hangs.
template <class F> pid_t fork_rank(F&& body) {
  pid_t pid = ::fork();
  if (pid == 0) {
    ::alarm(30);
    try {
      body();
    } catch (...) {
      ::_exit(3);
    }
    ::_exit(1);  // "crashes" right after its part
  }
  return pid;
}

// Rank 0's second all-reduce after rank 1 has exited; returns its error message.
std::string survivor_error(ProcessGroup& g, double* seconds) {
  int64_t x = 0;
  g.all_reduce_sum(&x, 1);  // matches the child's only collective
  EXPECT_EQ(x, 1);
  auto t0 = Clock::now();
  std::string msg;
  try {
    std::vector<float> v(1000, 1.f);
    // A few rounds: the first may still race the child's exit.
    for (int i = 0; i < 3 && msg.empty(); ++i) {
      g.all_reduce_sum(v.data(), v.size());
      std::this_thread::sleep_for(200ms);
    }
  } catch (const Error& e) {
    msg = e.what();
  }
  *seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  return msg;
}

TEST(DeadPeer, GlooGroupNamesTheRankThatExited) {
  const int port = free_tcp_port();
  GlooOptions o;
  o.prefix = "dead";
  o.timeout = 5s;
  Child child;
  child.pid = fork_rank([&] {
    o.store = make_tcp_store("127.0.0.1", port, false, 10s);
    GlooGroup g(1, 2, o);
    int64_t x = 1;
    g.all_reduce_sum(&x, 1);
  });
  ASSERT_GT(child.pid, 0) << "fork failed";
  o.store = make_tcp_store("127.0.0.1", port, true, 10s);
  GlooGroup g(0, 2, o);
  double secs = 0;
  std::string msg = survivor_error(g, &secs);
  EXPECT_EQ(child.reap(10s), 1) << "the child did not finish its all-reduce and exit";
  ASSERT_FALSE(msg.empty()) << "all_reduce with a dead peer did not throw";
  EXPECT_NE(msg.find("'dead'"), std::string::npos) << msg;
  EXPECT_NE(msg.find("all_reduce_sum"), std::string::npos) << msg;
  EXPECT_NE(msg.find("peer rank 1"), std::string::npos) << msg;
  EXPECT_NE(msg.find("a peer rank exited or hung"), std::string::npos) << msg;
  EXPECT_LT(secs, 4.0) << msg;  // well inside the 5 s timeout: the closed socket is seen at once
}

// Through make_groups: the message gives the group and the world rank of the dead peer.
TEST(DeadPeer, MakeGroupsEpGroupNamesTheWorldRank) {
  const int port = free_tcp_port();
  auto info = [&](int rank) {
    RankInfo r;
    r.rank = rank;
    r.world = 2;
    r.master_addr = "127.0.0.1";
    r.master_port = port;
    return r;
  };
  Child child;
  child.pid = fork_rank([&] {
    Groups g = make_groups(info(1), 2, 5s);
    int64_t x = 1;
    g.ep->all_reduce_sum(&x, 1);
  });
  ASSERT_GT(child.pid, 0) << "fork failed";
  Groups g = make_groups(info(0), 2, 5s);
  double secs = 0;
  std::string msg = survivor_error(*g.ep, &secs);
  EXPECT_EQ(child.reap(10s), 1);
  ASSERT_FALSE(msg.empty()) << "all_reduce with a dead peer did not throw";
  EXPECT_NE(msg.find("'ep0'"), std::string::npos) << msg;
  EXPECT_NE(msg.find("peer rank 1"), std::string::npos) << msg;
  EXPECT_LT(secs, 4.0) << msg;
}

// Four ranks as threads; rank 3 closes its group (its sockets) and the others' next receive
// from it names it, with its world rank: the address mapping holds beyond two ranks.
TEST(DeadPeer, EveryRankNamesTheOneThatLeft) {
  auto server = std::make_shared<TcpStore>("127.0.0.1", 0, true, 10s);
  test::run_rank_threads(4, [&](int r) {
    GlooOptions o;
    o.store = r == 0 ? server : make_tcp_store("127.0.0.1", server->port(), false, 10s);
    o.prefix = "left";
    o.timeout = 5s;
    o.global_ranks = {10, 11, 12, 13};
    auto g = std::make_unique<GlooGroup>(r, 4, o);
    g->barrier();
    if (r == 3) {
      g.reset();  // closes every connection of rank 3
      return;
    }
    float x = 0;
    std::string msg;
    auto t0 = Clock::now();
    try {
      g->recv(&x, 1, 3, 0);
    } catch (const Error& e) {
      msg = e.what();
    }
    double secs = std::chrono::duration<double>(Clock::now() - t0).count();
    EXPECT_NE(msg.find("lost the connection to peer rank 3 (world rank 13)"), std::string::npos)
        << "rank " << r << ": " << msg;
    EXPECT_NE(msg.find("(rank " + std::to_string(r) + " (world rank 1" + std::to_string(r) + ")"),
              std::string::npos)
        << msg;
    EXPECT_LT(secs, 4.0) << msg;
  });
}

}  // namespace
}  // namespace mop
