// Tensor: a non-owning view (pointer, dtype, device, shape). Row-major and contiguous:
// for shape (A, B, C) element (a, b, c) lives at ((a * B) + b) * C + c.
// Ownership lives in Buffer (alloc.h); views are cheap to copy and never free.
#pragma once
#include <array>
#include <cstdint>
#include <initializer_list>
#include <string>

#include "core/dtype.h"
#include "core/error.h"

namespace mop {

enum class Device : uint8_t { cpu, cuda };

inline const char* device_name(Device d) { return d == Device::cpu ? "cpu" : "cuda"; }

struct Tensor {
  static constexpr int kMaxDims = 4;
  void* data = nullptr;
  DType dtype = DType::f32;
  Device device = Device::cpu;
  int ndim = 0;
  std::array<int64_t, kMaxDims> shape{};

  Tensor() = default;
  Tensor(void* p, DType t, Device d, std::initializer_list<int64_t> dims) : data(p), dtype(t), device(d) {
    MOP_ASSERT(dims.size() <= kMaxDims);
    for (int64_t s : dims) shape[ndim++] = s;
  }

  int64_t numel() const {
    int64_t n = 1;
    for (int i = 0; i < ndim; ++i) n *= shape[i];
    return n;
  }
  size_t nbytes() const { return size_t(numel()) * dtype_size(dtype); }
  int64_t dim(int i) const { return shape[i < 0 ? ndim + i : i]; }

  template <class T> T* ptr() const {
    MOP_CHECK(dtype == dtype_of<T>(), "tensor dtype {} accessed as {}", dtype_name(dtype),
              dtype_name(dtype_of<T>()));
    return static_cast<T*>(data);
  }
  std::string shape_str() const {
    std::string s = "(";
    for (int i = 0; i < ndim; ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + ")";
  }
};

}  // namespace mop
