#include "parallel/cuda/staged_group.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>
#include <thread>

#include "ops/cuda/check.cuh"
#include "parallel/cuda/event_work.h"

namespace mop {

namespace {

// Pure data movement: elements carried losslessly in 32- or 64-bit integers, which the host
// groups support (1- and 2-byte types widened to int32).
template <class F> void as_words(DType t, F&& fn) {
  if (dtype_size(t) == 8) fn.template operator()<int64_t>();
  else fn.template operator()<int32_t>();
}
template <class W> std::vector<W> widen(const std::vector<char>& b, DType t) {
  const size_t es = dtype_size(t), n = b.size() / es;
  std::vector<W> w(n, 0);
  if (es == sizeof(W)) std::memcpy(w.data(), b.data(), b.size());
  else
    for (size_t i = 0; i < n; ++i) {
      uint32_t x = 0;
      std::memcpy(&x, b.data() + i * es, es);
      w[i] = W(x);
    }
  return w;
}
template <class W> std::vector<char> narrow(const std::vector<W>& w, DType t) {
  const size_t es = dtype_size(t);
  std::vector<char> b(w.size() * es);
  if (es == sizeof(W)) std::memcpy(b.data(), w.data(), b.size());
  else
    for (size_t i = 0; i < w.size(); ++i) {
      const uint32_t x = uint32_t(w[i]);
      std::memcpy(b.data() + i * es, &x, es);
    }
  return b;
}

// Sums: the host type a dtype is reduced in, and the conversions (2-byte floats through fp32).
template <class F> void as_sum_type(DType t, F&& fn) {
  switch (t) {
    case DType::f64: return fn.template operator()<double>();
    case DType::i32: return fn.template operator()<int32_t>();
    case DType::i64: return fn.template operator()<int64_t>();
    case DType::f32: case DType::bf16: case DType::f16: return fn.template operator()<float>();
    default: MOP_FAIL("staged group: sums of dtype {} are not supported", dtype_name(t));
  }
}
template <class S> std::vector<S> to_sum(const std::vector<char>& b, DType t) {
  const size_t es = dtype_size(t), n = b.size() / es;
  std::vector<S> s(n);
  if (t == DType::bf16 || t == DType::f16) {
    for (size_t i = 0; i < n; ++i) {
      uint16_t x;
      std::memcpy(&x, b.data() + i * 2, 2);
      if (t == DType::bf16) {
        __nv_bfloat16_raw r;
        r.x = x;
        s[i] = S(__bfloat162float(__nv_bfloat16(r)));
      } else {
        __half_raw r;
        r.x = x;
        s[i] = S(__half2float(__half(r)));
      }
    }
  } else {
    std::memcpy(s.data(), b.data(), b.size());
  }
  return s;
}
template <class S> std::vector<char> from_sum(const std::vector<S>& s, DType t) {
  const size_t es = dtype_size(t);
  std::vector<char> b(s.size() * es);
  if (t == DType::bf16 || t == DType::f16) {
    for (size_t i = 0; i < s.size(); ++i) {
      uint16_t x;
      if (t == DType::bf16) x = __nv_bfloat16_raw(__float2bfloat16_rn(float(s[i]))).x;
      else x = __half_raw(__float2half_rn(float(s[i]))).x;
      std::memcpy(b.data() + i * 2, &x, 2);
    }
  } else {
    std::memcpy(b.data(), s.data(), b.size());
  }
  return b;
}

}  // namespace

// What the work returned to the caller, the worker and the stream's host function share. The
// in-flight list keeps it alive until its `done` event has completed, after which neither the
// worker nor the host function touches it.
struct StagedGroup::Op {
  StagedGroup* group = nullptr;
  const char* what = "";
  uint32_t seq = 0;
  PinnedHost<char> in, out;
  HostPart part;
  cudaEvent_t done = nullptr;  // on the stream after the result's copy back
  std::exception_ptr error;    // written by the worker before it stores the counter
  ~Op() {
    if (done) cudaEventDestroy(done);
  }
};

namespace {

class StagedWork final : public DeviceWork {
 public:
  explicit StagedWork(std::shared_ptr<StagedGroup::Op> op) : op_(std::move(op)) {}
  void wait() override {
    MOP_CUDA_CHECK(cudaEventSynchronize(op_->done));  // bounded: the worker always stores the counter
    if (op_->error) std::rethrow_exception(op_->error);
  }
  bool done() override { return cudaEventQuery(op_->done) == cudaSuccess; }
  cudaEvent_t event() const override { return op_->done; }

 private:
  std::shared_ptr<StagedGroup::Op> op_;
};

std::chrono::microseconds lag_from_env() {
  const char* s = std::getenv("MOP_STAGED_LAG_US");
  if (!s || !*s) return std::chrono::microseconds(0);
  char* end = nullptr;
  const long v = std::strtol(s, &end, 10);
  MOP_CHECK(end && *end == 0 && v >= 0, "MOP_STAGED_LAG_US must be a number of microseconds >= 0, got '{}'", s);
  return std::chrono::microseconds(v);
}

}  // namespace

StagedGroup::StagedGroup(std::unique_ptr<ProcessGroup> host, int device, cudaStream_t stream, std::string name,
                         std::chrono::milliseconds timeout)
    : host_(std::move(host)), device_(device), stream_(stream), name_(std::move(name)), timeout_(timeout),
      lag_(lag_from_env()), done_([&] {
        DeviceScope g(device);
        return HostCounter();
      }()) {
  MOP_CHECK(host_ && host_->size() > 1, "staged group '{}': needs a host group of 2 or more ranks", name_);
}

StagedGroup::~StagedGroup() {
  if (!in_flight_.empty()) cudaEventSynchronize(in_flight_.back()->done);
}

void StagedGroup::mark_ready(void* p) {  // CUDA's host-function thread: no CUDA calls here
  Op& op = *static_cast<Op*>(p);
  StagedGroup& g = *op.group;
  {
    std::lock_guard lk(g.mu_);
    g.ready_ = op.seq;
  }
  g.ready_cv_.notify_all();
}

void StagedGroup::run_on_worker(Op& op) {  // the worker thread: no CUDA calls here either
  try {
    {
      std::unique_lock lk(mu_);
      if (error_) std::rethrow_exception(error_);
      const bool reached = ready_cv_.wait_for(lk, timeout_, [&] { return int32_t(ready_ - op.seq) >= 0; });
      MOP_CHECK(reached, "staged group '{}' rank {}: {} was not reached on the stream within {} ms", name_, rank(),
                op.what, timeout_.count());
    }
    if (lag_.count() > 0) std::this_thread::sleep_for(lag_);
    op.part(*host_, op.in.data(), op.out.data());
  } catch (...) {
    op.error = std::current_exception();
    std::lock_guard lk(mu_);
    if (!error_) error_ = op.error;
  }
  done_.store(op.seq);
}

PinnedHost<char> StagedGroup::take_buffer(size_t bytes) {
  if (bytes == 0) return {};
  size_t best = pool_.size();
  for (size_t i = 0; i < pool_.size(); ++i)
    if (pool_[i].size() >= bytes && (best == pool_.size() || pool_[i].size() < pool_[best].size())) best = i;
  if (best == pool_.size()) return PinnedHost<char>(bytes);
  PinnedHost<char> b = std::move(pool_[best]);
  pool_.erase(pool_.begin() + std::ptrdiff_t(best));
  return b;
}

void StagedGroup::recycle() {
  while (!in_flight_.empty() && cudaEventQuery(in_flight_.front()->done) == cudaSuccess) {
    Op& op = *in_flight_.front();
    if (op.in.size()) pool_.push_back(std::move(op.in));
    if (op.out.size()) pool_.push_back(std::move(op.out));
    in_flight_.pop_front();
  }
}

std::unique_ptr<DeviceWork> StagedGroup::stage(const char* what, const void* in, size_t in_bytes, void* out,
                                               size_t out_bytes, HostPart part) {
  DeviceScope g(device_);
  {
    std::lock_guard lk(mu_);
    if (error_) std::rethrow_exception(error_);
  }
  recycle();
  auto op = std::make_shared<Op>();
  op->group = this;
  op->what = what;
  op->seq = ++enqueued_;
  op->in = take_buffer(in_bytes);
  op->out = take_buffer(out_bytes);
  op->part = std::move(part);
  MOP_CUDA_CHECK(cudaEventCreateWithFlags(&op->done, cudaEventDisableTiming));
  if (in_bytes) MOP_CUDA_CHECK(cudaMemcpyAsync(op->in.data(), in, in_bytes, cudaMemcpyDeviceToHost, stream_));
  MOP_CUDA_CHECK(cudaLaunchHostFunc(stream_, &StagedGroup::mark_ready, op.get()));
  done_.stream_wait(op->seq, stream_);
  if (out_bytes) MOP_CUDA_CHECK(cudaMemcpyAsync(out, op->out.data(), out_bytes, cudaMemcpyHostToDevice, stream_));
  MOP_CUDA_CHECK(cudaEventRecord(op->done, stream_));
  in_flight_.push_back(op);
  Op* raw = op.get();  // alive in in_flight_ until `done`, which follows the worker's last touch
  worker_.post([this, raw] { run_on_worker(*raw); });
  return std::make_unique<StagedWork>(std::move(op));
}

void StagedGroup::barrier() {
  stage("barrier", nullptr, 0, nullptr, 0, [](ProcessGroup& h, const char*, char*) { h.barrier(); })->wait();
}

std::unique_ptr<DeviceWork> StagedGroup::enqueue_all_reduce_sum(void* data, size_t n, DType t) {
  const size_t bytes = n * dtype_size(t);
  return stage("all_reduce", data, bytes, data, bytes, [=](ProcessGroup& h, const char* in, char* out) {
    as_sum_type(t, [&]<class S>() {
      std::vector<S> s = to_sum<S>(std::vector<char>(in, in + bytes), t);
      h.all_reduce_sum(s.data(), s.size());
      const std::vector<char> b = from_sum(s, t);
      std::memcpy(out, b.data(), bytes);
    });
  });
}

std::unique_ptr<DeviceWork> StagedGroup::enqueue_all_gather(const void* in, size_t n, void* out, DType t) {
  const size_t bytes = n * dtype_size(t), P = size_t(size());
  return stage("all_gather", in, bytes, out, bytes * P, [=](ProcessGroup& h, const char* hin, char* hout) {
    as_words(t, [&]<class W>() {
      std::vector<W> w = widen<W>(std::vector<char>(hin, hin + bytes), t), all(n * P);
      h.all_gather(w.data(), n, all.data());
      const std::vector<char> b = narrow(all, t);
      std::memcpy(hout, b.data(), b.size());
    });
  });
}

std::unique_ptr<DeviceWork> StagedGroup::enqueue_reduce_scatter_sum(const void* in, void* out, size_t n, DType t) {
  const size_t bytes = n * dtype_size(t), P = size_t(size());
  return stage("reduce_scatter", in, bytes * P, out, bytes, [=](ProcessGroup& h, const char* hin, char* hout) {
    as_sum_type(t, [&]<class S>() {
      std::vector<S> s = to_sum<S>(std::vector<char>(hin, hin + bytes * P), t), mine(n);
      h.reduce_scatter_sum(s.data(), mine.data(), n);
      const std::vector<char> b = from_sum(mine, t);
      std::memcpy(hout, b.data(), bytes);
    });
  });
}

std::unique_ptr<DeviceWork> StagedGroup::enqueue_all_to_all_v(const void* in, const std::vector<size_t>& send_counts,
                                                            void* out, const std::vector<size_t>& recv_counts,
                                                            DType t) {
  size_t ns = 0, nr = 0;
  for (size_t c : send_counts) ns += c;
  for (size_t c : recv_counts) nr += c;
  const size_t es = dtype_size(t);
  return stage("all_to_all_v", in, ns * es, out, nr * es,
               [=](ProcessGroup& h, const char* hin, char* hout) {
                 as_words(t, [&]<class W>() {
                   std::vector<W> w = widen<W>(std::vector<char>(hin, hin + ns * es), t), r(nr);
                   h.all_to_all_v(w.data(), send_counts, r.data(), recv_counts);
                   const std::vector<char> b = narrow(r, t);
                   std::memcpy(hout, b.data(), b.size());
                 });
               });
}

void StagedGroup::do_broadcast(void* data, size_t n, int root, DType t) {
  const size_t bytes = n * dtype_size(t);
  stage("broadcast", data, bytes, data, bytes, [=](ProcessGroup& h, const char* in, char* out) {
    as_words(t, [&]<class W>() {
      std::vector<W> w = widen<W>(std::vector<char>(in, in + bytes), t);
      h.broadcast(w.data(), n, root);
      const std::vector<char> b = narrow(w, t);
      std::memcpy(out, b.data(), bytes);
    });
  })->wait();
}

void StagedGroup::do_send(const void* data, size_t n, int peer, int tag, DType t) {
  const size_t bytes = n * dtype_size(t);
  stage("send", data, bytes, nullptr, 0, [=](ProcessGroup& h, const char* in, char*) {
    as_words(t, [&]<class W>() {
      std::vector<W> w = widen<W>(std::vector<char>(in, in + bytes), t);
      h.send(w.data(), n, peer, tag);
    });
  })->wait();
}

void StagedGroup::do_recv(void* data, size_t n, int peer, int tag, DType t) {
  const size_t bytes = n * dtype_size(t);
  stage("recv", nullptr, 0, data, bytes, [=](ProcessGroup& h, const char*, char* out) {
    as_words(t, [&]<class W>() {
      std::vector<W> w(n);
      h.recv(w.data(), n, peer, tag);
      const std::vector<char> b = narrow(w, t);
      std::memcpy(out, b.data(), bytes);
    });
  })->wait();
}

}  // namespace mop
