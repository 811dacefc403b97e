#include "parallel/gloo_group.h"

#include <gloo/allgather.h>
#include <gloo/allreduce.h>
#include <gloo/alltoallv.h>
#include <gloo/barrier.h>
#include <gloo/broadcast.h>
#include <gloo/common/error.h>
#include <gloo/common/logging.h>
#include <gloo/rendezvous/context.h>
#include <gloo/rendezvous/file_store.h>
#include <gloo/rendezvous/prefix_store.h>
#include <gloo/transport/tcp/device.h>

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

}  // namespace

GlooGroup::GlooGroup(int rank, int size, const GlooOptions& opt)
    : rank_(rank), size_(size), name_(opt.name.empty() ? opt.prefix : opt.name),
      timeout_(opt.timeout) {
  MOP_CHECK(size >= 1 && rank >= 0 && rank < size, "gloo group '{}': rank {} / size {} invalid",
            name_, rank, size);
  MOP_CHECK(!opt.store_dir.empty(), "gloo group '{}': store_dir is empty", name_);
  MOP_CHECK(std::filesystem::is_directory(opt.store_dir),
            "gloo group '{}': store_dir '{}' is not a directory", name_, opt.store_dir);
  MOP_CHECK(opt.timeout.count() > 0, "gloo group '{}': timeout must be positive", name_);
  try {
    gloo::transport::tcp::attr attr;
    if (!opt.iface.empty())
      attr.iface = opt.iface;
    else
      attr.hostname = opt.hostname;
    auto dev = gloo::transport::tcp::CreateDevice(attr);
    gloo::rendezvous::FileStore file_store(opt.store_dir);
    gloo::rendezvous::PrefixStore store(opt.prefix, file_store);
    auto ctx = std::make_shared<gloo::rendezvous::Context>(rank, size);
    ctx->setTimeout(opt.timeout);
    ctx->connectFullMesh(store, dev);
    ctx_ = std::move(ctx);
  } catch (const mop::Error&) {
    throw;
  } catch (const std::exception& e) {
    MOP_FAIL("gloo group '{}' (rank {} of {}): connecting through '{}' (prefix '{}') failed "
             "(timeout {} ms): {}",
             name_, rank, size, opt.store_dir, opt.prefix, opt.timeout.count(), e.what());
  }
}

GlooGroup::~GlooGroup() = default;

template <class F> void GlooGroup::run(const char* op, F&& fn) {
  MOP_CHECK(!broken_, "gloo group '{}' (rank {} of {}): {} called after an earlier failure ({})",
            name_, rank_, size_, op, broken_by_);
  try {
    fn();
  } catch (const mop::Error&) {
    throw;
  } catch (const std::exception& e) {
    broken_ = true;
    broken_by_ = op;
    std::string what = e.what();
    bool timed_out = what.find("imed out") != std::string::npos ||
                     what.find("imeout") != std::string::npos;
    MOP_FAIL("gloo group '{}' (rank {} of {}): {} {} (timeout {} ms): {}", name_, rank_, size_,
             op, timed_out ? "timed out" : "failed", timeout_.count(), what);
  }
}

void GlooGroup::do_all_reduce_sum(void* data, size_t n, DType t) {
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

void GlooGroup::do_all_gather(const void* in, size_t n, void* out, DType t) {
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
void GlooGroup::do_reduce_scatter_sum(const void* in, void* out, size_t n, DType t) {
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

void GlooGroup::do_all_to_all_v(const void* in, const std::vector<size_t>& send_counts,
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

void GlooGroup::do_broadcast(void* data, size_t n, int root, DType t) {
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
  if (size_ == 1) return;
  run("barrier", [&] {
    gloo::BarrierOptions o(ctx_);
    o.setTag(next_tag());
    o.setTimeout(timeout_);
    gloo::barrier(o);
  });
}

}  // namespace mop
