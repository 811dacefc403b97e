// TcpStore: the rank-0 server and clients as threads of one process on 127.0.0.1.
#if __has_include(<gloo/rendezvous/store.h>)
#include <gloo/allreduce.h>
#include <gloo/rendezvous/context.h>
#include <gloo/rendezvous/prefix_store.h>
#include <gloo/transport/tcp/device.h>
#include <gtest/gtest.h>

#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include "core/error.h"
#include "parallel/launch.h"
#include "parallel/tcp_store.h"

namespace mop {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

std::vector<char> bytes(const std::string& s) { return {s.begin(), s.end()}; }

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

TEST(TcpStore, SetGetRoundTripAcrossClients) {
  TcpStore server("127.0.0.1", 0, true, 5s);
  ASSERT_GT(server.port(), 0);
  std::vector<std::unique_ptr<TcpStore>> clients;
  for (int i = 0; i < 3; ++i)
    clients.push_back(std::make_unique<TcpStore>("127.0.0.1", server.port(), false, 5s));
  std::vector<std::thread> threads;
  for (int i = 0; i < 3; ++i)
    threads.emplace_back([&, i] { clients[i]->set(fmt::format("k{}", i), bytes(fmt::format("v{}", i))); });
  for (auto& t : threads) t.join();
  server.set("k3", bytes("v3"));
  for (int i = 0; i < 4; ++i) {
    for (auto* s : {static_cast<TcpStore*>(&server), clients[0].get(), clients[2].get()})
      EXPECT_EQ(s->get(fmt::format("k{}", i)), bytes(fmt::format("v{}", i)));
  }
  clients[1]->set("k0", bytes("overwritten"));
  EXPECT_EQ(server.get("k0"), bytes("overwritten"));
  EXPECT_EQ(clients[0]->get("k0"), bytes("overwritten"));
}

TEST(TcpStore, GetBlocksUntilAnotherThreadSets) {
  TcpStore server("127.0.0.1", 0, true, 5s);
  TcpStore client("127.0.0.1", server.port(), false, 5s);
  auto t0 = Clock::now();
  std::thread setter([&] {
    std::this_thread::sleep_for(300ms);
    server.set("late", bytes("here"));
  });
  EXPECT_EQ(client.get("late"), bytes("here"));
  double dt = seconds_since(t0);
  setter.join();
  EXPECT_GE(dt, 0.25);
  EXPECT_LT(dt, 3.0);
}

TEST(TcpStore, WaitOnSeveralKeys) {
  TcpStore server("127.0.0.1", 0, true, 5s);
  std::vector<std::unique_ptr<TcpStore>> clients;
  for (int i = 0; i < 3; ++i)
    clients.push_back(std::make_unique<TcpStore>("127.0.0.1", server.port(), false, 5s));
  std::vector<std::thread> setters;
  for (int i = 0; i < 3; ++i)
    setters.emplace_back([&, i] {
      std::this_thread::sleep_for(std::chrono::milliseconds(100 * (i + 1)));
      clients[i]->set(fmt::format("w{}", i), bytes("x"));
    });
  auto t0 = Clock::now();
  server.wait({"w0", "w1", "w2"}, 5000ms);
  double dt = seconds_since(t0);
  for (auto& t : setters) t.join();
  EXPECT_GE(dt, 0.25);
  EXPECT_LT(dt, 3.0);
  clients[0]->wait({"w0", "w1", "w2"});  // already there: returns at once
}

TEST(TcpStore, WaitTimesOutNamingMissingKeys) {
  TcpStore server("127.0.0.1", 0, true, 5s);
  server.set("present", bytes("1"));
  auto t0 = Clock::now();
  try {
    server.wait({"present", "absent"}, 1000ms);
    FAIL() << "wait did not throw";
  } catch (const Error& e) {
    std::string what = e.what();
    EXPECT_NE(what.find("timed out"), std::string::npos) << what;
    EXPECT_NE(what.find("missing: 'absent'"), std::string::npos) << what;
  }
  double dt = seconds_since(t0);
  EXPECT_GE(dt, 0.9);
  EXPECT_LT(dt, 2.5);
  // The connection stays usable after a timeout.
  EXPECT_EQ(server.get("present"), bytes("1"));
}

TEST(TcpStore, MissingKeyGetTimesOut) {
  TcpStore server("127.0.0.1", 0, true, 1s);
  TcpStore client("127.0.0.1", server.port(), false, 1s);
  auto t0 = Clock::now();
  try {
    client.get("never");
    FAIL() << "get did not throw";
  } catch (const Error& e) {
    std::string what = e.what();
    EXPECT_NE(what.find("'never'"), std::string::npos) << what;
    EXPECT_NE(what.find("timed out after 1000 ms"), std::string::npos) << what;
  }
  double dt = seconds_since(t0);
  EXPECT_GE(dt, 0.9);
  EXPECT_LT(dt, 2.5);
}

TEST(TcpStore, ConnectTimesOutWithoutServer) {
  int port = free_tcp_port();
  auto t0 = Clock::now();
  try {
    TcpStore client("127.0.0.1", port, false, 1s);
    FAIL() << "connect did not throw";
  } catch (const Error& e) {
    std::string what = e.what();
    EXPECT_NE(what.find("127.0.0.1:" + std::to_string(port)), std::string::npos) << what;
    EXPECT_NE(what.find("1000 ms"), std::string::npos) << what;
  }
  double dt = seconds_since(t0);
  EXPECT_GE(dt, 0.9);
  EXPECT_LT(dt, 2.5);
}

TEST(TcpStore, ClientConnectsToServerStartedLater) {
  int port = free_tcp_port();
  std::unique_ptr<TcpStore> server;
  std::thread starter([&] {
    std::this_thread::sleep_for(300ms);
    server = std::make_unique<TcpStore>("127.0.0.1", port, true, 5s);
  });
  TcpStore client("127.0.0.1", port, false, 5s);  // retries until the server listens
  starter.join();
  client.set("a", bytes("b"));
  EXPECT_EQ(server->get("a"), bytes("b"));
}

TEST(TcpStore, BinaryValuesWithZeros) {
  TcpStore server("127.0.0.1", 0, true, 5s);
  TcpStore client("127.0.0.1", server.port(), false, 5s);
  std::vector<char> v;
  for (int i = 0; i < 4096; ++i) v.push_back(static_cast<char>(i % 256));
  v.insert(v.end(), 100, '\0');
  client.set(std::string("bin\0key", 7), v);
  EXPECT_EQ(server.get(std::string("bin\0key", 7)), v);
  client.set("empty", {});
  EXPECT_TRUE(server.get("empty").empty());
  std::vector<char> big(8 << 20, '\0');
  big[12345] = 7;
  server.set("big", big);
  EXPECT_EQ(client.get("big"), big);
}

TEST(TcpStore, DestroyWhileClientBlocked) {
  // The server side stops (and joins its threads) even while a client waits on it.
  auto server = std::make_unique<TcpStore>("127.0.0.1", 0, true, 5s);
  TcpStore client("127.0.0.1", server->port(), false, 5s);
  std::thread waiter([&] { EXPECT_THROW(client.get("never"), Error); });
  std::this_thread::sleep_for(200ms);
  auto t0 = Clock::now();
  server.reset();
  waiter.join();
  EXPECT_LT(seconds_since(t0), 2.0);
  EXPECT_THROW(client.set("x", bytes("y")), Error);  // the connection is gone
}

void sum_floats(void* c, const void* a, const void* b, size_t n) {
  auto* o = static_cast<float*>(c);
  auto* x = static_cast<const float*>(a);
  auto* y = static_cast<const float*>(b);
  for (size_t i = 0; i < n; ++i) o[i] = x[i] + y[i];
}

TEST(TcpStore, GlooContextAllreduce) {
  constexpr int kSize = 2;
  auto store0 = make_tcp_store("127.0.0.1", 0, true, 10s);
  int port = static_cast<TcpStore*>(store0.get())->port();
  std::vector<std::vector<float>> data(kSize);
  std::vector<std::string> errors(kSize);
  std::vector<std::shared_ptr<gloo::rendezvous::Store>> stores(kSize);
  stores[0] = store0;
  std::vector<std::thread> ranks;
  for (int r = 0; r < kSize; ++r)
    ranks.emplace_back([&, r] {
      try {
        if (!stores[r]) stores[r] = make_tcp_store("127.0.0.1", port, false, 10s);
        gloo::rendezvous::PrefixStore prefixed("test", *stores[r]);
        gloo::transport::tcp::attr attr;
        attr.hostname = "127.0.0.1";
        auto dev = gloo::transport::tcp::CreateDevice(attr);
        auto ctx = std::make_shared<gloo::rendezvous::Context>(r, kSize);
        ctx->setTimeout(10s);
        ctx->connectFullMesh(prefixed, dev);
        data[r] = {1.0f + r, 10.0f * (r + 1), -1.0f};
        gloo::AllreduceOptions o(ctx);
        o.setOutput(data[r].data(), data[r].size());
        o.setReduceFunction(&sum_floats);
        o.setTag(0);
        o.setTimeout(10s);
        gloo::allreduce(o);
      } catch (const std::exception& e) {
        errors[r] = e.what();
      }
    });
  for (auto& t : ranks) t.join();
  for (int r = 0; r < kSize; ++r) {
    ASSERT_EQ(errors[r], "") << "rank " << r;
    EXPECT_EQ(data[r], (std::vector<float>{3.0f, 30.0f, -2.0f})) << "rank " << r;
  }
}

}  // namespace
}  // namespace mop
#endif  // __has_include(<gloo/rendezvous/store.h>)
