#if __has_include(<gloo/rendezvous/store.h>)
#include "parallel/tcp_store.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>

#include "core/error.h"

namespace mop {
namespace {

using Clock = std::chrono::steady_clock;

constexpr uint8_t kSet = 1, kGet = 2, kWait = 3;
constexpr uint8_t kOk = 0, kMissing = 1;
constexpr uint64_t kMaxKey = 1ull << 20, kMaxValue = 1ull << 31, kMaxKeys = 1ull << 20;
// Extra time the client waits for a reply beyond the server-side timeout.
constexpr std::chrono::milliseconds kReplyGrace{5000};

bool send_all(int fd, const void* data, size_t n) {
  auto* p = static_cast<const char*>(data);
  while (n > 0) {
    ssize_t k = ::send(fd, p, n, MSG_NOSIGNAL);
    if (k < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    p += k;
    n -= static_cast<size_t>(k);
  }
  return true;
}

// Reads exactly n bytes. Without a deadline blocks (until data, EOF or shutdown()).
// Returns false on EOF, error or deadline.
bool recv_all(int fd, void* data, size_t n, const Clock::time_point* deadline = nullptr) {
  auto* p = static_cast<char*>(data);
  while (n > 0) {
    if (deadline) {
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(*deadline - Clock::now());
      if (left.count() <= 0) return false;
      pollfd pfd{fd, POLLIN, 0};
      int r = ::poll(&pfd, 1, static_cast<int>(std::min<int64_t>(left.count() + 1, 1 << 30)));
      if (r < 0 && errno == EINTR) continue;
      if (r < 0) return false;
      if (r == 0) continue;  // loop re-checks the deadline
    }
    ssize_t k = ::recv(fd, p, n, 0);
    if (k < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    if (k == 0) return false;
    p += k;
    n -= static_cast<size_t>(k);
  }
  return true;
}

void put_u8(std::string& b, uint8_t v) { b.push_back(static_cast<char>(v)); }
void put_u64(std::string& b, uint64_t v) { b.append(reinterpret_cast<const char*>(&v), 8); }
void put_str(std::string& b, const char* p, size_t n) {
  put_u64(b, n);
  b.append(p, n);
}
void put_str(std::string& b, const std::string& s) { put_str(b, s.data(), s.size()); }

bool get_u8(int fd, uint8_t& v, const Clock::time_point* d = nullptr) {
  return recv_all(fd, &v, 1, d);
}
bool get_u64(int fd, uint64_t& v, const Clock::time_point* d = nullptr) {
  return recv_all(fd, &v, 8, d);
}
template <class S>
bool get_str(int fd, S& s, uint64_t max, const Clock::time_point* d = nullptr) {
  uint64_t n;
  if (!get_u64(fd, n, d) || n > max) return false;
  s.resize(n);
  return n == 0 || recv_all(fd, s.data(), n, d);
}

std::string join_keys(const std::vector<std::string>& keys) {
  std::string s;
  for (size_t i = 0; i < keys.size(); ++i) {
    if (i) s += ", ";
    s += "'" + keys[i] + "'";
  }
  return s;
}

}  // namespace

// ---------------------------------------------------------------------------------- server

class TcpStore::Server {
 public:
  explicit Server(int port) {
    fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    MOP_CHECK(fd_ >= 0, "TcpStore server: socket() failed: {}", std::strerror(errno));
    int one = 1;
    ::setsockopt(fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_ANY);
    a.sin_port = htons(static_cast<uint16_t>(port));
    if (::bind(fd_, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 || ::listen(fd_, 512) != 0) {
      int e = errno;
      ::close(fd_);
      MOP_FAIL("TcpStore server: cannot listen on 0.0.0.0:{}: {}", port, std::strerror(e));
    }
    socklen_t len = sizeof a;
    ::getsockname(fd_, reinterpret_cast<sockaddr*>(&a), &len);
    port_ = ntohs(a.sin_port);
    accept_thread_ = std::thread([this] { accept_loop(); });
  }

  ~Server() {
    {
      std::lock_guard lk(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    accept_thread_.join();  // polls stop_ every 100 ms
    {
      std::lock_guard lk(conns_mu_);
      for (int fd : conn_fds_) ::shutdown(fd, SHUT_RDWR);  // unblocks the connection threads
    }
    for (auto& t : conn_threads_) t.join();
    for (int fd : conn_fds_) ::close(fd);
    ::close(fd_);
  }

  int port() const { return port_; }

 private:
  void accept_loop() {
    while (!stop_.load()) {
      pollfd pfd{fd_, POLLIN, 0};
      int r = ::poll(&pfd, 1, 100);
      if (r <= 0) continue;  // timeout or EINTR: re-check stop_
      int c = ::accept4(fd_, nullptr, nullptr, SOCK_CLOEXEC);
      if (c < 0) continue;
      int one = 1;
      ::setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
      std::lock_guard lk(conns_mu_);
      conn_fds_.push_back(c);
      conn_threads_.emplace_back([this, c] { serve(c); });
    }
  }

  // One client connection. Exits on EOF, a malformed request, or shutdown() by the destructor.
  void serve(int fd) {
    for (;;) {
      uint8_t op;
      if (!get_u8(fd, op)) return;
      std::string reply;
      if (op == kSet) {
        std::string key;
        std::vector<char> value;
        if (!get_str(fd, key, kMaxKey) || !get_str(fd, value, kMaxValue)) return;
        {
          std::lock_guard lk(mu_);
          kv_[key] = std::move(value);
        }
        cv_.notify_all();
        put_u8(reply, kOk);
      } else if (op == kGet) {
        std::string key;
        uint64_t ms;
        if (!get_str(fd, key, kMaxKey) || !get_u64(fd, ms)) return;
        std::unique_lock lk(mu_);
        auto deadline = Clock::now() + std::chrono::milliseconds(ms);
        cv_.wait_until(lk, deadline, [&] { return stop_.load() || kv_.count(key) > 0; });
        auto it = kv_.find(key);
        if (it == kv_.end()) {
          put_u8(reply, kMissing);
        } else {
          put_u8(reply, kOk);
          put_str(reply, it->second.data(), it->second.size());
        }
      } else if (op == kWait) {
        uint64_t n, ms;
        if (!get_u64(fd, n) || n > kMaxKeys) return;
        std::vector<std::string> keys(n);
        for (auto& k : keys)
          if (!get_str(fd, k, kMaxKey)) return;
        if (!get_u64(fd, ms)) return;
        std::unique_lock lk(mu_);
        auto all = [&] {
          for (auto& k : keys)
            if (!kv_.count(k)) return false;
          return true;
        };
        auto deadline = Clock::now() + std::chrono::milliseconds(ms);
        cv_.wait_until(lk, deadline, [&] { return stop_.load() || all(); });
        if (all()) {
          put_u8(reply, kOk);
        } else {
          put_u8(reply, kMissing);
          std::vector<const std::string*> missing;
          for (auto& k : keys)
            if (!kv_.count(k)) missing.push_back(&k);
          put_u64(reply, missing.size());
          for (auto* k : missing) put_str(reply, *k);
        }
      } else {
        return;  // unknown op: drop the connection
      }
      if (!send_all(fd, reply.data(), reply.size())) return;
    }
  }

  int fd_ = -1;
  int port_ = 0;
  std::atomic<bool> stop_{false};
  std::thread accept_thread_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::map<std::string, std::vector<char>> kv_;
  std::mutex conns_mu_;
  std::vector<int> conn_fds_;
  std::vector<std::thread> conn_threads_;
};

// ---------------------------------------------------------------------------------- client

TcpStore::TcpStore(const std::string& host, int port, bool is_server,
                   std::chrono::milliseconds timeout)
    : host_(host), port_(port), timeout_(timeout) {
  MOP_CHECK(timeout.count() > 0, "TcpStore {}:{}: timeout must be positive", host, port);
  MOP_CHECK(port >= 0 && port < 65536 && (port > 0 || is_server),
            "TcpStore {}:{}: invalid port", host, port);
  if (is_server) {
    server_ = std::make_unique<Server>(port);
    port_ = server_->port();
  }
  connect_client();  // on failure server_ is destroyed by the unique_ptr
}

TcpStore::~TcpStore() {
  if (fd_ >= 0) {
    ::shutdown(fd_, SHUT_RDWR);
    ::close(fd_);
  }
  server_.reset();
}

// An I/O failure leaves the stream out of step: shut the socket so later calls fail cleanly.
bool TcpStore::io_ok(bool ok) {
  if (!ok && fd_ >= 0) ::shutdown(fd_, SHUT_RDWR);
  return ok;
}

std::string TcpStore::where() const { return fmt::format("TcpStore {}:{}", host_, port_); }

void TcpStore::connect_client() {
  auto deadline = Clock::now() + timeout_;
  std::string last_error = "no attempt";
  std::string port_str = std::to_string(port_);
  for (;;) {
    addrinfo hints{};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    addrinfo* res = nullptr;
    int gai = ::getaddrinfo(host_.c_str(), port_str.c_str(), &hints, &res);
    if (gai != 0) {
      last_error = fmt::format("getaddrinfo: {}", gai_strerror(gai));
    } else {
      for (addrinfo* ai = res; ai; ai = ai->ai_next) {
        int s = ::socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK,
                         ai->ai_protocol);
        if (s < 0) {
          last_error = fmt::format("socket: {}", std::strerror(errno));
          continue;
        }
        int r = ::connect(s, ai->ai_addr, ai->ai_addrlen);
        int err = r == 0 ? 0 : errno;
        if (r != 0 && (err == EINPROGRESS || err == EINTR)) {
          auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline -
                                                                            Clock::now());
          pollfd pfd{s, POLLOUT, 0};
          int pr;
          do {
            pr = ::poll(&pfd, 1, static_cast<int>(std::clamp<int64_t>(left.count(), 1, 1000)));
          } while (pr < 0 && errno == EINTR);
          if (pr == 1) {
            socklen_t len = sizeof err;
            ::getsockopt(s, SOL_SOCKET, SO_ERROR, &err, &len);
          } else {
            err = ETIMEDOUT;
          }
        }
        if (err == 0) {
          int flags = ::fcntl(s, F_GETFL);
          ::fcntl(s, F_SETFL, flags & ~O_NONBLOCK);
          int one = 1;
          ::setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
          ::freeaddrinfo(res);
          fd_ = s;
          return;
        }
        last_error = std::strerror(err);
        ::close(s);
      }
      ::freeaddrinfo(res);
    }
    auto now = Clock::now();
    if (now >= deadline) break;
    std::this_thread::sleep_for(
        std::min<Clock::duration>(std::chrono::milliseconds(50), deadline - now));
  }
  MOP_FAIL("{}: could not connect within {} ms (last error: {}); is rank 0 (the store server) "
           "running and reachable?",
           where(), timeout_.count(), last_error);
}

void TcpStore::set(const std::string& key, const std::vector<char>& data) {
  std::string req;
  put_u8(req, kSet);
  put_str(req, key);
  put_str(req, data.data(), data.size());
  std::lock_guard lk(client_mu_);
  auto deadline = Clock::now() + timeout_ + kReplyGrace;
  uint8_t st;
  MOP_CHECK(io_ok(send_all(fd_, req.data(), req.size()) && get_u8(fd_, st, &deadline)) &&
                st == kOk,
            "{}: set('{}') failed: lost the connection to the store server", where(), key);
}

std::vector<char> TcpStore::get(const std::string& key) {
  std::string req;
  put_u8(req, kGet);
  put_str(req, key);
  put_u64(req, static_cast<uint64_t>(timeout_.count()));
  std::lock_guard lk(client_mu_);
  auto deadline = Clock::now() + timeout_ + kReplyGrace;
  uint8_t st;
  MOP_CHECK(io_ok(send_all(fd_, req.data(), req.size()) && get_u8(fd_, st, &deadline)),
            "{}: get('{}') failed: lost the connection to the store server", where(), key);
  MOP_CHECK(st == kOk, "{}: get('{}') timed out after {} ms (the key was never set)", where(),
            key, timeout_.count());
  std::vector<char> value;
  MOP_CHECK(io_ok(get_str(fd_, value, kMaxValue, &deadline)),
            "{}: get('{}') failed: lost the connection to the store server", where(), key);
  return value;
}

void TcpStore::wait(const std::vector<std::string>& keys) { wait(keys, timeout_); }

void TcpStore::wait(const std::vector<std::string>& keys,
                    const std::chrono::milliseconds& timeout) {
  std::string req;
  put_u8(req, kWait);
  put_u64(req, keys.size());
  for (auto& k : keys) put_str(req, k);
  uint64_t ms = timeout.count() > 0 ? static_cast<uint64_t>(timeout.count()) : 0;
  put_u64(req, ms);
  std::lock_guard lk(client_mu_);
  auto deadline = Clock::now() + std::chrono::milliseconds(ms) + kReplyGrace;
  uint8_t st;
  MOP_CHECK(io_ok(send_all(fd_, req.data(), req.size()) && get_u8(fd_, st, &deadline)),
            "{}: wait({}) failed: lost the connection to the store server", where(),
            join_keys(keys));
  if (st == kOk) return;
  uint64_t n = 0;
  std::vector<std::string> missing;
  if (io_ok(get_u64(fd_, n, &deadline) && n <= kMaxKeys)) {
    missing.resize(n);
    for (auto& k : missing)
      if (!io_ok(get_str(fd_, k, kMaxKey, &deadline))) break;
  }
  MOP_FAIL("{}: wait({}) timed out after {} ms; missing: {}", where(), join_keys(keys), ms,
           join_keys(missing));
}

std::shared_ptr<gloo::rendezvous::Store> make_tcp_store(const std::string& host, int port,
                                                        bool is_server,
                                                        std::chrono::milliseconds timeout) {
  return std::make_shared<TcpStore>(host, port, is_server, timeout);
}

}  // namespace mop
#endif  // __has_include(<gloo/rendezvous/store.h>)
