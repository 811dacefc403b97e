#include "core/alloc.h"

#include <cstdlib>
#include <cstring>
#include <new>

namespace mop {

namespace {
constexpr size_t kAlign = 64;  // one cache line, and a full AVX-512 vector
double gib(size_t b) { return double(b) / double(1ull << 30); }
}  // namespace

const char* mem_name(Mem m) {
  static const char* names[] = {"params", "grads", "optimizer", "activations", "checkpoints", "comm", "workspace"};
  return names[int(m)];
}

void MemoryTracker::on_alloc(Device dev, Mem cat, size_t bytes) {
  if (limit_ && total_ + bytes > limit_)
    fail(dev, cat, bytes, fmt::format("limit {:.3f} GiB", gib(limit_)));
  current_[int(cat)] += bytes;
  total_ += bytes;
  if (current_[int(cat)] > peak_[int(cat)]) peak_[int(cat)] = current_[int(cat)];
  if (total_ > peak_total_) peak_total_ = total_;
}

void MemoryTracker::on_free(Mem cat, size_t bytes) {
  current_[int(cat)] -= bytes;
  total_ -= bytes;
}

void MemoryTracker::reset_peaks() {
  peak_ = current_;
  peak_total_ = total_;
}

std::string MemoryTracker::breakdown() const {
  std::string s;
  for (int i = 0; i < kMemCategories; ++i) {
    if (!peak_[i]) continue;
    s += fmt::format("{} {:.3f} GiB (peak {:.3f}), ", mem_name(Mem(i)), gib(current_[i]), gib(peak_[i]));
  }
  s += fmt::format("total {:.3f} GiB (peak {:.3f})", gib(total_), gib(peak_total_));
  return s;
}

void MemoryTracker::fail(Device dev, Mem cat, size_t bytes, const std::string& why) const {
  std::string msg = fmt::format("out of {} memory: {} allocation of {:.3f} GiB failed ({}); in use: {}",
                                device_name(dev), mem_name(cat), gib(bytes), why, breakdown());
  if (limit_ && limit_ > total_)
    msg += fmt::format("; at most {:.3f} GiB more would have fitted", gib(limit_ - total_));
  throw OutOfMemory(msg, __FILE__, __LINE__);
}

MemoryTracker& memory_tracker(Device dev) {
  static MemoryTracker trackers[2];
  return trackers[int(dev)];
}

DeviceAllocHooks& device_alloc_hooks() {
  static DeviceAllocHooks hooks;
  return hooks;
}

Buffer::Buffer(Device dev, Mem cat, size_t bytes) : bytes_(bytes), dev_(dev), cat_(cat) {
  MemoryTracker& tr = memory_tracker(dev);
  tr.on_alloc(dev, cat, bytes);
  if (bytes == 0) return;
  if (dev == Device::cpu) {
    size_t rounded = (bytes + kAlign - 1) / kAlign * kAlign;
    data_ = std::aligned_alloc(kAlign, rounded);
    if (!data_) {
      tr.on_free(cat, bytes);
      tr.fail(dev, cat, bytes, "host allocator refused");
    }
    std::memset(data_, 0, bytes);
  } else {
    DeviceAllocHooks& h = device_alloc_hooks();
    if (!h.alloc) {
      tr.on_free(cat, bytes);
      MOP_FAIL("cuda buffer requested but this build has no CUDA backend");
    }
    data_ = h.alloc(bytes);
    if (!data_) {
      tr.on_free(cat, bytes);
      tr.fail(dev, cat, bytes, "cudaMalloc refused");
    }
  }
}

Buffer& Buffer::operator=(Buffer&& o) noexcept {
  if (this != &o) {
    release();
    data_ = o.data_;
    bytes_ = o.bytes_;
    dev_ = o.dev_;
    cat_ = o.cat_;
    o.data_ = nullptr;
    o.bytes_ = 0;
  }
  return *this;
}

void Buffer::release() {
  if (!data_ && !bytes_) return;
  if (data_) {
    if (dev_ == Device::cpu) std::free(data_);
    else device_alloc_hooks().free(data_);
  }
  memory_tracker(dev_).on_free(cat_, bytes_);
  data_ = nullptr;
  bytes_ = 0;
}

Tensor Buffer::view(DType t, std::initializer_list<int64_t> dims) const {
  Tensor v(data_, t, dev_, dims);
  MOP_CHECK(v.nbytes() <= bytes_, "view {} of {} bytes exceeds buffer of {} bytes", v.shape_str(), v.nbytes(),
            bytes_);
  return v;
}

}  // namespace mop
