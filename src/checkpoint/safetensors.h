// Reader and writer of the Hugging Face safetensors format (no dependency beyond
// nlohmann-json for the header).
//
// Layout: an 8-byte little-endian uint64 N, then N bytes of UTF-8 JSON mapping each tensor
// name to {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]} (offsets relative
// to the data section, which starts at byte 8 + N), optionally with "__metadata__":
// {string: string}; then the data section. Tensors are row-major and little-endian.
//
// The writer pads the header with spaces so that 8 + N is a multiple of 8 and lays the
// tensors out in the order they were added, contiguous, without gaps.
// The reader memory-maps the file and validates the whole header before anything is used.
#pragma once
#include <cstddef>
#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "core/dtype.h"

namespace mop::ckpt {

// "[2, 3]"; "[]" for a scalar.
std::string shape_to_string(const std::vector<int64_t>& shape);

class SafetensorsWriter {
 public:
  // Records the tensor; `data` is only remembered, not copied: it must stay valid until
  // write(). It may be null when the tensor has no elements. Throws mop::Error on a
  // duplicate or reserved name ("__metadata__"), an empty name, or a negative dimension.
  void add(std::string name, DType dtype, std::vector<int64_t> shape, const void* data);
  // Adds (or replaces) one "__metadata__" entry.
  void set_metadata(std::string key, std::string value);
  // Streams header and data to `path` (created or truncated). Does not fsync and is not
  // atomic by itself: write into an AtomicDir for that. Every write and the close are
  // checked; a failure (disk full, ...) throws mop::Error naming the path, and a partly
  // written regular file is removed.
  void write(const std::string& path) const;

  // The JSON header exactly as write() puts it in the file, padding included.
  std::string header() const;
  // Total size of the file write() produces.
  size_t file_size() const;
  size_t num_tensors() const { return tensors_.size(); }

 private:
  struct Pending {
    std::string name;
    DType dtype;
    std::vector<int64_t> shape;
    const void* data;
    size_t nbytes;
  };
  std::vector<Pending> tensors_;
  std::set<std::string> names_;
  std::map<std::string, std::string> metadata_;
};

class SafetensorsFile {
 public:
  struct Entry {
    DType dtype;
    std::vector<int64_t> shape;
    const void* data;  // into the mapping; aligned only as far as the file's offsets are
    size_t nbytes;
  };

  // Opens, maps read-only and validates. Every failure is a mop::Error whose message
  // starts with the path.
  explicit SafetensorsFile(std::string path);
  ~SafetensorsFile();
  SafetensorsFile(SafetensorsFile&& other) noexcept;
  SafetensorsFile& operator=(SafetensorsFile&& other) noexcept;
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  bool contains(const std::string& name) const { return entries_.count(name) != 0; }
  std::vector<std::string> names() const;  // sorted
  size_t size() const { return entries_.size(); }
  // Missing name: mop::Error naming the file and the name, suggesting the closest name.
  const Entry& get(const std::string& name) const;
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  // Checks that the tensor has exactly this dtype and shape (the error shows both), then
  // copies its bytes to dst.
  void read_into(const std::string& name, DType expected, const std::vector<int64_t>& expected_shape,
                 void* dst) const;
  // Like read_into for a float destination, converting F32/BF16/F16/F64 to F32.
  void read_as_f32(const std::string& name, const std::vector<int64_t>& expected_shape, float* dst) const;

 private:
  void unmap() noexcept;

  std::string path_;
  void* map_ = nullptr;
  size_t map_size_ = 0;
  std::map<std::string, Entry> entries_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace mop::ckpt
