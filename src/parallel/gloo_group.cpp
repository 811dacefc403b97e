#include "parallel/gloo_group.h"

#include <gloo/allgather.h>
#include <gloo/allreduce.h>
#include <gloo/alltoall.h>
#include <gloo/alltoallv.h>
#include <gloo/barrier.h>
#include <gloo/broadcast.h>
#include <gloo/common/error.h>
#include <gloo/common/logging.h>
#include <gloo/rendezvous/context.h>
#include <gloo/rendezvous/file_store.h>
#include <gloo/rendezvous/prefix_store.h>
#include <gloo/transport/tcp/address.h>
#include <gloo/transport/tcp/device.h>
#include <gloo/transport/unbound_buffer.h>
#include <gloo/types.h>

#include <algorithm>
#include <cctype>
#include <charconv>
#include <cstring>
#include <exception>
#include <filesystem>

namespace mop {
namespace {

// Calls fn.template operator()<T>() with the C++ type of `t`.
template <class F> void dispatch(DType t, F&& fn) {
  switch (t) {
    case DType::f32: return fn.template operator()<float>();
    case DType::f64: return fn.template operator()<double>();
    case DType::i32: return fn.template operator()<int32_t>();
    case DType::i64: return fn.template operator()<int64_t>();
    default: MOP_FAIL("gloo group: dtype {} is not supported by collectives", dtype_name(t));
  }
}

template <class T> void sum_fn(void* c, const void* a, const void* b, size_t n) {
  T* out = static_cast<T*>(c);
  const T* x = static_cast<const T*>(a);
  const T* y = static_cast<const T*>(b);
  for (size_t i = 0; i < n; ++i) out[i] = x[i] + y[i];
}

// Gloo wants a non-null pointer even for zero-length buffers.
char g_empty[8];
template <class T> T* nonnull(T* p) { return p ? p : reinterpret_cast<T*>(g_empty); }

// Slot prefix for send/recv; gloo's collectives use 0x01..0x08 (gloo/types.h).
constexpr uint8_t kP2pSlotPrefix = 0x40;

// Gloo's pair errors ("Connection closed by peer <addr>") print the pair's peer address, which
// is either what the peer published at rendezvous (its listening socket) or, on the accepting
// side when the connection arrived before connect() was called, the peer's connecting socket.
// The first kind is recorded from the rendezvous (this store passes everything through and
// keeps what get() returned: connectFullMesh() gets key "<j>", rank j's listening addresses);
// the second is exchanged once connected (GlooGroup::exchange_addresses).
class RecordingStore final : public gloo::rendezvous::Store {
 public:
  explicit RecordingStore(gloo::rendezvous::Store& inner) : inner_(inner) {}
  void set(const std::string& key, const std::vector<char>& data) override {
    inner_.set(key, data);
  }
  std::vector<char> get(const std::string& key) override {
    auto v = inner_.get(key);
    got.emplace_back(key, v);
    return v;
  }
  void wait(const std::vector<std::string>& keys) override { inner_.wait(keys); }
  void wait(const std::vector<std::string>& keys,
            const std::chrono::milliseconds& timeout) override {
    inner_.wait(keys, timeout);
  }
  std::vector<std::pair<std::string, std::vector<char>>> got;

 private:
  gloo::rendezvous::Store& inner_;
};

// (address string, rank) for every address rank j published; every one of them is rank j's, so
// the layout of the list does not matter. Best effort: another key layout yields no names.
std::vector<std::pair<std::string, int>> published_addresses(const RecordingStore& rec, int rank,
                                                             int size) {
  std::vector<std::pair<std::string, int>> out;
  const size_t addr_size = gloo::transport::tcp::Address().bytes().size();
  for (const auto& [key, value] : rec.got) {
    int j = -1;
    auto [end, ec] = std::from_chars(key.data(), key.data() + key.size(), j);
    if (ec != std::errc() || end != key.data() + key.size() || j < 0 || j >= size ||
        j == rank || value.empty() || value.size() % addr_size != 0)
      continue;
    try {
      for (size_t o = 0; o < value.size(); o += addr_size) {
        std::vector<char> bytes(value.begin() + long(o), value.begin() + long(o + addr_size));
        out.emplace_back(gloo::transport::tcp::Address(bytes).str(), j);
      }
    } catch (const std::exception&) {  // not an address list after all
    }
  }
  return out;
}

// Bytes per address string in exchange_addresses() ("[2001:db8::1]:65535" fits easily).
constexpr size_t kAddrLen = 96;

// `needle` occurs in `text` not followed by another digit ("...:412" must not match ":4123").
bool contains_address(const std::string& text, const std::string& needle) {
  for (size_t pos = text.find(needle); pos != std::string::npos;
       pos = text.find(needle, pos + 1)) {
    size_t after = pos + needle.size();
    if (after >= text.size() || !std::isdigit(static_cast<unsigned char>(text[after])))
      return true;
  }
  return false;
}

}  // namespace

GlooGroup::GlooGroup(int rank, int size, const GlooOptions& opt)
    : rank_(rank), size_(size), name_(opt.name.empty() ? opt.prefix : opt.name),
      timeout_(opt.timeout), global_ranks_(opt.global_ranks) {
  MOP_CHECK(size >= 1 && rank >= 0 && rank < size, "gloo group '{}': rank {} / size {} invalid",
            name_, rank, size);
  MOP_CHECK(global_ranks_.empty() || int(global_ranks_.size()) == size,
            "gloo group '{}': {} global ranks given for {} ranks", name_, global_ranks_.size(),
            size);
  MOP_CHECK(opt.timeout.count() > 0, "gloo group '{}': timeout must be positive", name_);
  std::string where;
  if (opt.store) {
    MOP_CHECK(opt.store_dir.empty(), "gloo group '{}': give a store or a store_dir, not both",
              name_);
    store_ = opt.store;
    where = "the shared store";
  } else {
    MOP_CHECK(!opt.store_dir.empty(), "gloo group '{}': no store and store_dir is empty", name_);
    MOP_CHECK(std::filesystem::is_directory(opt.store_dir),
              "gloo group '{}': store_dir '{}' is not a directory", name_, opt.store_dir);
    where = "'" + opt.store_dir + "'";
  }
  try {
    if (!store_) store_ = std::make_shared<gloo::rendezvous::FileStore>(opt.store_dir);
    gloo::transport::tcp::attr attr;
    if (!opt.iface.empty())
      attr.iface = opt.iface;
    else
      attr.hostname = opt.hostname;
    auto dev = gloo::transport::tcp::CreateDevice(attr);
    gloo::rendezvous::PrefixStore prefixed(opt.prefix, *store_);
    auto ctx = std::make_shared<gloo::rendezvous::Context>(rank, size);
    ctx->setTimeout(opt.timeout);
    RecordingStore rec(prefixed);
    ctx->connectFullMesh(rec, dev);
    peer_addrs_ = published_addresses(rec, rank, size);
    ctx_ = std::move(ctx);
    if (size > 1) exchange_addresses();
  } catch (const mop::Error&) {
    throw;
  } catch (const std::exception& e) {
    MOP_FAIL("gloo group '{}' ({} of {}): connecting through {} (prefix '{}') failed "
             "(timeout {} ms): {}",
             name_, rank_label(rank), size, where, opt.prefix, opt.timeout.count(), e.what());
  }
}

GlooGroup::~GlooGroup() = default;

// Each rank sends rank j its own end of their connection (getPair(j)->address() once
// connected), the address j's gloo may print for it: kAddrLen bytes per peer, O(world) per rank.
void GlooGroup::exchange_addresses() {
  auto all_to_all = [&](std::vector<char>& in, std::vector<char>& out) {
    run("connect (address exchange)", [&] {
      gloo::AlltoallOptions o(ctx_);
      o.setInput(in.data(), in.size());
      o.setOutput(out.data(), out.size());
      o.setTag(next_tag());
      o.setTimeout(timeout_);
      gloo::alltoall(o);
    });
  };
  // connectFullMesh can return before the accepting side has handled its connections; a
  // message each way with every peer settles them before the addresses are read.
  std::vector<char> ping(size_t(size_), 1), pong(size_t(size_), 0);
  all_to_all(ping, pong);
  std::vector<char> mine(size_t(size_) * kAddrLen, 0), theirs(size_t(size_) * kAddrLen, 0);
  for (int j = 0; j < size_; ++j) {
    if (j == rank_) continue;
    std::string a = ctx_->getPair(j)->address().str();
    std::memcpy(mine.data() + size_t(j) * kAddrLen, a.data(), std::min(a.size(), kAddrLen - 1));
  }
  all_to_all(mine, theirs);
  for (int j = 0; j < size_; ++j) {
    const char* p = theirs.data() + size_t(j) * kAddrLen;
    std::string a(p, strnlen(p, kAddrLen));
    if (j != rank_ && !a.empty()) peer_addrs_.emplace_back(std::move(a), j);
  }
}

std::string GlooGroup::rank_label(int r) const {
  if (global_ranks_.empty() || global_ranks_[size_t(r)] == r) return fmt::format("rank {}", r);
  return fmt::format("rank {} (world rank {})", r, global_ranks_[size_t(r)]);
}

std::string GlooGroup::failure_message(const char* op, const std::string& what) const {
  const bool timed_out =
      what.find("imed out") != std::string::npos || what.find("imeout") != std::string::npos;
  std::vector<int> gone;
  for (const auto& [addr, r] : peer_addrs_)
    if (contains_address(what, addr) && std::find(gone.begin(), gone.end(), r) == gone.end())
      gone.push_back(r);
  std::sort(gone.begin(), gone.end());
  std::string who;
  if (gone.empty()) {
    who = "gloo does not say which peer; a peer rank exited or hung, or the ranks called "
          "different operations";
  } else {
    for (int r : gone) who += (who.empty() ? "lost the connection to peer " : ", ") + rank_label(r);
    who += ": a peer rank exited or hung";
  }
  return fmt::format("gloo group '{}' ({} of {}): {} {} (timeout {} ms): {}. gloo: {}", name_,
                     rank_label(rank_), size_, op, timed_out ? "timed out" : "failed",
                     timeout_.count(), who, what);
}

template <class F> void GlooGroup::run(const char* op, F&& fn) {
  MOP_CHECK(!broken_, "gloo group '{}' ({} of {}): {} called after an earlier failure ({})",
            name_, rank_label(rank_), size_, op, broken_by_);
  try {
    fn();
  } catch (const mop::Error&) {
    throw;
  } catch (const std::exception& e) {
    broken_ = true;
    broken_by_ = failure_message(op, e.what());
    throw Error(broken_by_, __FILE__, __LINE__);
  }
}

// ------------------------------------------------------------------ the operations themselves

void GlooGroup::all_reduce_now(void* data, size_t n, DType t) {
  if (n == 0 || size_ == 1) return;
  run("all_reduce_sum", [&] {
    dispatch(t, [&]<class T>() {
      gloo::AllreduceOptions o(ctx_);
      o.setOutput(static_cast<T*>(data), n);
      o.setReduceFunction(&sum_fn<T>);
      o.setTag(next_tag());
      o.setTimeout(timeout_);
      gloo::allreduce(o);
    });
  });
}

void GlooGroup::all_gather_now(const void* in, size_t n, void* out, DType t) {
  if (n == 0) return;
  if (size_ == 1) {
    std::memmove(out, in, n * dtype_size(t));
    return;
  }
  run("all_gather", [&] {
    dispatch(t, [&]<class T>() {
      gloo::AllgatherOptions o(ctx_);
      o.setInput(const_cast<T*>(static_cast<const T*>(in)), n);
      o.setOutput(static_cast<T*>(out), n * size_t(size_));
      o.setTag(next_tag());
      o.setTimeout(timeout_);
      gloo::allgather(o);
    });
  });
}

// Gloo's only reduce-scatter is the old-style ReduceScatterHalvingDoubling (int counts,
// no timeout); an allreduce of the whole input and a copy of our slice is simple and correct.
void GlooGroup::reduce_scatter_now(const void* in, void* out, size_t n, DType t) {
  if (n == 0) return;
  const size_t es = dtype_size(t);
  std::vector<char> tmp(n * size_t(size_) * es);
  std::memcpy(tmp.data(), in, tmp.size());
  if (size_ > 1) {
    run("reduce_scatter_sum", [&] {
      dispatch(t, [&]<class T>() {
        gloo::AllreduceOptions o(ctx_);
        o.setOutput(reinterpret_cast<T*>(tmp.data()), n * size_t(size_));
        o.setReduceFunction(&sum_fn<T>);
        o.setTag(next_tag());
        o.setTimeout(timeout_);
        gloo::allreduce(o);
      });
    });
  }
  std::memcpy(out, tmp.data() + size_t(rank_) * n * es, n * es);
}

void GlooGroup::all_to_all_v_now(const void* in, const std::vector<size_t>& send_counts,
                                 void* out, const std::vector<size_t>& recv_counts, DType t) {
  if (size_ == 1) {
    MOP_CHECK(send_counts[0] == recv_counts[0],
              "gloo group '{}': all_to_all_v sends {} elements to itself but expects {}", name_,
              send_counts[0], recv_counts[0]);
    if (send_counts[0]) std::memmove(out, in, send_counts[0] * dtype_size(t));
    return;
  }
  run("all_to_all_v", [&] {
    dispatch(t, [&]<class T>() {
      std::vector<int64_t> sc(send_counts.begin(), send_counts.end());
      std::vector<int64_t> rc(recv_counts.begin(), recv_counts.end());
      gloo::AlltoallvOptions o(ctx_);
      o.setInput(nonnull(const_cast<T*>(static_cast<const T*>(in))), sc);
      o.setOutput(nonnull(static_cast<T*>(out)), rc);
      o.setTag(next_tag());
      o.setTimeout(timeout_);
      gloo::alltoallv(o);
    });
  });
}

// ------------------------------------------------- blocking: wait for queued async work first

void GlooGroup::do_all_reduce_sum(void* data, size_t n, DType t) {
  queue_.drain();
  all_reduce_now(data, n, t);
}

void GlooGroup::do_all_gather(const void* in, size_t n, void* out, DType t) {
  queue_.drain();
  all_gather_now(in, n, out, t);
}

void GlooGroup::do_reduce_scatter_sum(const void* in, void* out, size_t n, DType t) {
  queue_.drain();
  reduce_scatter_now(in, out, n, t);
}

void GlooGroup::do_all_to_all_v(const void* in, const std::vector<size_t>& send_counts,
                                void* out, const std::vector<size_t>& recv_counts, DType t) {
  queue_.drain();
  all_to_all_v_now(in, send_counts, out, recv_counts, t);
}

void GlooGroup::do_broadcast(void* data, size_t n, int root, DType t) {
  queue_.drain();
  if (n == 0 || size_ == 1) return;
  run("broadcast", [&] {
    dispatch(t, [&]<class T>() {
      gloo::BroadcastOptions o(ctx_);
      o.setOutput(static_cast<T*>(data), n);
      o.setRoot(root);
      o.setTag(next_tag());
      o.setTimeout(timeout_);
      gloo::broadcast(o);
    });
  });
}

void GlooGroup::barrier() {
  queue_.drain();
  if (size_ == 1) return;
  run("barrier", [&] {
    gloo::BarrierOptions o(ctx_);
    o.setTag(next_tag());
    o.setTimeout(timeout_);
    gloo::barrier(o);
  });
}

// Gloo's tcp send is a rendezvous: waitSend() returns once the peer has posted its recv and
// the bytes are on their way.
void GlooGroup::do_send(const void* data, size_t n, int peer, int tag, DType t) {
  queue_.drain();
  if (n == 0) return;
  run("send", [&] {
    auto buf = ctx_->createUnboundBuffer(const_cast<void*>(data), n * dtype_size(t));
    buf->send(peer, gloo::Slot::build(kP2pSlotPrefix, uint32_t(tag)));
    MOP_CHECK(buf->waitSend(timeout_), "gloo group '{}': send to {} was aborted", name_,
              rank_label(peer));
  });
}

void GlooGroup::do_recv(void* data, size_t n, int peer, int tag, DType t) {
  queue_.drain();
  if (n == 0) return;
  run("recv", [&] {
    auto buf = ctx_->createUnboundBuffer(data, n * dtype_size(t));
    buf->recv(peer, gloo::Slot::build(kP2pSlotPrefix, uint32_t(tag)));
    MOP_CHECK(buf->waitRecv(timeout_), "gloo group '{}': recv from {} was aborted", name_,
              rank_label(peer));
  });
}

// ------------------------------------------------------------ async: FIFO on the worker thread

std::unique_ptr<Work> GlooGroup::do_all_reduce_sum_async(void* data, size_t n, DType t) {
  return queue_.push([=, this] { all_reduce_now(data, n, t); });
}

std::unique_ptr<Work> GlooGroup::do_all_gather_async(const void* in, size_t n, void* out,
                                                     DType t) {
  return queue_.push([=, this] { all_gather_now(in, n, out, t); });
}

std::unique_ptr<Work> GlooGroup::do_reduce_scatter_sum_async(const void* in, void* out, size_t n,
                                                             DType t) {
  return queue_.push([=, this] { reduce_scatter_now(in, out, n, t); });
}

std::unique_ptr<Work> GlooGroup::do_all_to_all_v_async(const void* in,
                                                       const std::vector<size_t>& send_counts,
                                                       void* out,
                                                       const std::vector<size_t>& recv_counts,
                                                       DType t) {
  return queue_.push([=, this] { all_to_all_v_now(in, send_counts, out, recv_counts, t); });
}

}  // namespace mop
