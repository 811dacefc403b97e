// TcpStore: a gloo rendezvous store over TCP, for ranks without a shared file system
// (the MASTER_ADDR:MASTER_PORT rendezvous of torchrun).
//
// Rank 0 constructs it with is_server = true: it starts a key-value server on 0.0.0.0:port
// (port 0: an ephemeral port, see port()) and then, like every other rank, connects to it as a
// client. Clients retry the connection until `timeout` and then throw mop::Error naming
// host:port and the timeout.
//
// get() and wait() block (server side) until the keys exist; after the timeout (the store's
// timeout, or the one given to wait) they throw mop::Error naming the key(s) and the timeout.
// Values are arbitrary bytes. The server stops when the server-side store is destroyed, so the
// rank-0 store must outlive every other rank's use of it (keep it alive as long as the group).
//
// Protocol (all integers little-endian/host order, u64 lengths):
//   request : u8 op, then  SET: str key, str value      -> u8 status
//                          GET: str key, u64 timeout_ms -> u8 status [, str value]
//                          WAIT: u64 n, n x str key, u64 timeout_ms -> u8 status
//   status 0 = ok, 1 = timed out (missing).
#pragma once
#include <gloo/rendezvous/store.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace mop {

class TcpStore final : public gloo::rendezvous::Store {
 public:
  TcpStore(const std::string& host, int port, bool is_server,
           std::chrono::milliseconds timeout = std::chrono::seconds(60));
  ~TcpStore() override;
  TcpStore(const TcpStore&) = delete;
  TcpStore& operator=(const TcpStore&) = delete;

  void set(const std::string& key, const std::vector<char>& data) override;
  std::vector<char> get(const std::string& key) override;
  void wait(const std::vector<std::string>& keys) override;
  void wait(const std::vector<std::string>& keys,
            const std::chrono::milliseconds& timeout) override;

  // The port the store talks to (the bound port on the server when constructed with port 0).
  int port() const { return port_; }
  const std::string& host() const { return host_; }

 private:
  class Server;
  void connect_client();
  std::string where() const;
  bool io_ok(bool ok);

  std::string host_;
  int port_;
  std::chrono::milliseconds timeout_;
  std::unique_ptr<Server> server_;
  std::mutex client_mu_;  // one request at a time on the client socket
  int fd_ = -1;
};

std::shared_ptr<gloo::rendezvous::Store> make_tcp_store(
    const std::string& host, int port, bool is_server,
    std::chrono::milliseconds timeout = std::chrono::seconds(60));

}  // namespace mop
