// Memory accounting. Every allocation belongs to a category; the tracker keeps the
// current and peak bytes of each so the run summary and an out-of-memory error can
// print the breakdown. A Buffer owns its bytes (RAII); Tensors are views into it.
#pragma once
#include <array>
#include <cstddef>
#include <cstdint>
#include <string>

#include "core/tensor.h"

namespace mop {

enum class Mem : uint8_t { params, grads, optimizer, activations, checkpoints, comm, workspace, count };
constexpr int kMemCategories = int(Mem::count);
const char* mem_name(Mem m);

class MemoryTracker {
 public:
  // limit_bytes == 0: no limit beyond what the system allocator refuses.
  void set_limit(size_t limit_bytes) { limit_ = limit_bytes; }
  size_t limit() const { return limit_; }
  // Throws OutOfMemory (with the breakdown) when the request would pass the limit.
  void on_alloc(Device dev, Mem cat, size_t bytes);
  void on_free(Mem cat, size_t bytes);
  size_t current(Mem cat) const { return current_[int(cat)]; }
  size_t peak(Mem cat) const { return peak_[int(cat)]; }
  size_t current_total() const { return total_; }
  size_t peak_total() const { return peak_total_; }
  void reset_peaks();
  // "params 1.20 GiB (peak 1.20), grads ..., total 3.4 GiB (peak 3.9)"
  std::string breakdown() const;
  [[noreturn]] void fail(Device dev, Mem cat, size_t bytes, const std::string& why) const;

 private:
  std::array<size_t, kMemCategories> current_{}, peak_{};
  size_t total_ = 0, peak_total_ = 0, limit_ = 0;
};

MemoryTracker& memory_tracker(Device dev);

// The CUDA backend installs these (cudaMalloc / cudaFree); the core never includes CUDA.
struct DeviceAllocHooks {
  void* (*alloc)(size_t bytes) = nullptr;  // returns nullptr when the device is out of memory
  void (*free)(void* p) = nullptr;
};
DeviceAllocHooks& device_alloc_hooks();

// Owning, aligned, zero-initialised block of memory on one device.
class Buffer {
 public:
  Buffer() = default;
  Buffer(Device dev, Mem cat, size_t bytes);
  ~Buffer() { release(); }
  Buffer(Buffer&& o) noexcept { *this = std::move(o); }
  Buffer& operator=(Buffer&& o) noexcept;
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

  void* data() const { return data_; }
  size_t bytes() const { return bytes_; }
  Device device() const { return dev_; }
  template <class T> T* as() const { return static_cast<T*>(data_); }
  Tensor view(DType t, std::initializer_list<int64_t> dims) const;
  void release();

 private:
  void* data_ = nullptr;
  size_t bytes_ = 0;
  Device dev_ = Device::cpu;
  Mem cat_ = Mem::workspace;
};

// Typed convenience: a Buffer of n elements of T.
template <class T> Buffer make_buffer(Mem cat, size_t n, Device dev = Device::cpu) {
  return Buffer(dev, cat, n * sizeof(T));
}

}  // namespace mop

namespace mop {

// Typed, accounted host array (activations, workspaces of the CPU backend).
template <class T> class HostArray {
 public:
  HostArray() = default;
  explicit HostArray(size_t n, Mem cat = Mem::activations) : buf_(Device::cpu, cat, n * sizeof(T)), n_(n) {}
  T* data() const { return buf_.as<T>(); }
  size_t size() const { return n_; }
  T& operator[](size_t i) const { return data()[i]; }
  bool empty() const { return n_ == 0; }

 private:
  Buffer buf_;
  size_t n_ = 0;
};

}  // namespace mop
