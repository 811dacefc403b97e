#include "parallel/cuda/staged_group.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstring>

#include "ops/cuda/check.cuh"
#include "parallel/cuda/event_work.h"

namespace mop {

namespace {

std::vector<char> to_host(const void* dev, size_t bytes, cudaStream_t s) {
  std::vector<char> h(bytes);
  if (bytes) MOP_CUDA_CHECK(cudaMemcpyAsync(h.data(), dev, bytes, cudaMemcpyDeviceToHost, s));
  MOP_CUDA_CHECK(cudaStreamSynchronize(s));  // also orders after everything enqueued before
  return h;
}
void to_device(void* dev, const void* host, size_t bytes, cudaStream_t s) {
  if (bytes) MOP_CUDA_CHECK(cudaMemcpyAsync(dev, host, bytes, cudaMemcpyHostToDevice, s));
  MOP_CUDA_CHECK(cudaStreamSynchronize(s));  // the host buffer dies after this
}

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

StagedGroup::StagedGroup(ProcessGroup& host, int device, cudaStream_t stream, std::string name)
    : host_(host), device_(device), stream_(stream), name_(std::move(name)) {}

std::unique_ptr<DeviceWork> StagedGroup::done_work() { return std::make_unique<EventWork>(stream_); }

void StagedGroup::barrier() {
  DeviceScope g(device_);
  MOP_CUDA_CHECK(cudaStreamSynchronize(stream_));
  host_.barrier();
}

std::unique_ptr<DeviceWork> StagedGroup::enqueue_all_reduce_sum(void* data, size_t n, DType t) {
  DeviceScope g(device_);
  const size_t bytes = n * dtype_size(t);
  std::vector<char> b = to_host(data, bytes, stream_);
  as_sum_type(t, [&]<class S>() {
    std::vector<S> s = to_sum<S>(b, t);
    host_.all_reduce_sum(s.data(), s.size());
    b = from_sum(s, t);
  });
  to_device(data, b.data(), bytes, stream_);
  return done_work();
}

std::unique_ptr<DeviceWork> StagedGroup::enqueue_all_gather(const void* in, size_t n, void* out, DType t) {
  DeviceScope g(device_);
  std::vector<char> b = to_host(in, n * dtype_size(t), stream_);
  as_words(t, [&]<class W>() {
    std::vector<W> w = widen<W>(b, t), all(n * size_t(size()));
    host_.all_gather(w.data(), n, all.data());
    b = narrow(all, t);
  });
  to_device(out, b.data(), b.size(), stream_);
  return done_work();
}

std::unique_ptr<DeviceWork> StagedGroup::enqueue_reduce_scatter_sum(const void* in, void* out, size_t n, DType t) {
  DeviceScope g(device_);
  std::vector<char> b = to_host(in, n * size_t(size()) * dtype_size(t), stream_);
  as_sum_type(t, [&]<class S>() {
    std::vector<S> s = to_sum<S>(b, t), mine(n);
    host_.reduce_scatter_sum(s.data(), mine.data(), n);
    b = from_sum(mine, t);
  });
  to_device(out, b.data(), b.size(), stream_);
  return done_work();
}

std::unique_ptr<DeviceWork> StagedGroup::enqueue_all_to_all_v(const void* in, const std::vector<size_t>& send_counts,
                                                            void* out, const std::vector<size_t>& recv_counts,
                                                            DType t) {
  DeviceScope g(device_);
  size_t ns = 0, nr = 0;
  for (size_t c : send_counts) ns += c;
  for (size_t c : recv_counts) nr += c;
  std::vector<char> b = to_host(in, ns * dtype_size(t), stream_);
  as_words(t, [&]<class W>() {
    std::vector<W> w = widen<W>(b, t), r(nr);
    host_.all_to_all_v(w.data(), send_counts, r.data(), recv_counts);
    b = narrow(r, t);
  });
  to_device(out, b.data(), b.size(), stream_);
  return done_work();
}

void StagedGroup::do_broadcast(void* data, size_t n, int root, DType t) {
  DeviceScope g(device_);
  std::vector<char> b = to_host(data, n * dtype_size(t), stream_);
  as_words(t, [&]<class W>() {
    std::vector<W> w = widen<W>(b, t);
    host_.broadcast(w.data(), n, root);
    b = narrow(w, t);
  });
  to_device(data, b.data(), b.size(), stream_);
}

void StagedGroup::do_send(const void* data, size_t n, int peer, int tag, DType t) {
  DeviceScope g(device_);
  std::vector<char> b = to_host(data, n * dtype_size(t), stream_);
  as_words(t, [&]<class W>() {
    std::vector<W> w = widen<W>(b, t);
    host_.send(w.data(), n, peer, tag);
  });
}

void StagedGroup::do_recv(void* data, size_t n, int peer, int tag, DType t) {
  DeviceScope g(device_);
  std::vector<char> b;
  as_words(t, [&]<class W>() {
    std::vector<W> w(n);
    host_.recv(w.data(), n, peer, tag);
    b = narrow(w, t);
  });
  to_device(data, b.data(), b.size(), stream_);
}

}  // namespace mop
