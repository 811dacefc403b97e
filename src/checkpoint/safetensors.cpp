#include "checkpoint/safetensors.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <nlohmann/json.hpp>
#include <utility>

#include "core/error.h"

namespace mop::ckpt {

namespace {

using Json = nlohmann::json;
using OrderedJson = nlohmann::ordered_json;

constexpr DType kAllDTypes[] = {DType::f32, DType::f64, DType::bf16, DType::f16,
                                DType::i32, DType::i64, DType::u16, DType::u8};

bool parse_dtype(std::string_view s, DType* out) {
  for (DType t : kAllDTypes) {
    if (dtype_name(t) == s) {
      *out = t;
      return true;
    }
  }
  return false;
}

std::string known_dtypes() {
  std::string s;
  for (DType t : kAllDTypes) {
    if (!s.empty()) s += ", ";
    s += dtype_name(t);
  }
  return s;
}

// numel(shape) * dtype_size; false on overflow. Dimensions must be non-negative.
bool shape_nbytes(const std::vector<int64_t>& shape, DType dtype, uint64_t* out) {
  uint64_t n = dtype_size(dtype);
  for (int64_t d : shape) {
    if (__builtin_mul_overflow(n, uint64_t(d), &n)) return false;
  }
  if (n > uint64_t(std::numeric_limits<size_t>::max())) return false;
  *out = n;
  return true;
}

// A short rendering of a JSON value for error messages.
std::string brief(const Json& v) {
  std::string s = v.dump(-1, ' ', false, Json::error_handler_t::replace);
  if (s.size() > 60) s = s.substr(0, 57) + "...";
  return s;
}

size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> prev(b.size() + 1), cur(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) prev[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    cur[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      size_t sub = prev[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1);
      cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, sub});
    }
    std::swap(prev, cur);
  }
  return prev[b.size()];
}

float f16_to_f32(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    float f = std::ldexp(float(mant), -24);  // zero or subnormal, exact
    return sign ? -f : f;
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);  // inf / nan
  } else {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

void write_all(int fd, const void* data, size_t n, const std::string& path) {
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    size_t chunk = std::min<size_t>(n, size_t(1) << 30);
    ssize_t w = ::write(fd, p, chunk);
    if (w < 0) {
      if (errno == EINTR) continue;
      MOP_FAIL("{}: write failed: {}", path, std::strerror(errno));
    }
    if (w == 0) MOP_FAIL("{}: write failed: wrote 0 bytes (device full?)", path);
    p += w;
    n -= size_t(w);
  }
}

}  // namespace

std::string shape_to_string(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

// ---- writer ------------------------------------------------------------------------------

void SafetensorsWriter::add(std::string name, DType dtype, std::vector<int64_t> shape, const void* data) {
  MOP_CHECK(!name.empty(), "safetensors: tensor name must not be empty");
  MOP_CHECK(name != "__metadata__", "safetensors: '__metadata__' is reserved and cannot name a tensor");
  MOP_CHECK(!names_.count(name), "safetensors: tensor '{}' added twice", name);
  for (int64_t d : shape)
    MOP_CHECK(d >= 0, "safetensors: tensor '{}': negative dimension {} in shape {}", name, d,
              shape_to_string(shape));
  uint64_t nbytes = 0;
  MOP_CHECK(shape_nbytes(shape, dtype, &nbytes), "safetensors: tensor '{}': shape {} {} overflows", name,
            shape_to_string(shape), dtype_name(dtype));
  MOP_CHECK(data != nullptr || nbytes == 0, "safetensors: tensor '{}' ({} bytes) has a null data pointer",
            name, nbytes);
  names_.insert(name);
  tensors_.push_back(Pending{std::move(name), dtype, std::move(shape), data, size_t(nbytes)});
}

void SafetensorsWriter::set_metadata(std::string key, std::string value) {
  metadata_[std::move(key)] = std::move(value);
}

std::string SafetensorsWriter::header() const {
  OrderedJson h = OrderedJson::object();
  if (!metadata_.empty()) {
    OrderedJson m = OrderedJson::object();
    for (const auto& [k, v] : metadata_) m[k] = v;
    h["__metadata__"] = std::move(m);
  }
  uint64_t offset = 0;
  for (const Pending& t : tensors_) {
    OrderedJson e = OrderedJson::object();
    e["dtype"] = std::string(dtype_name(t.dtype));
    e["shape"] = t.shape;
    e["data_offsets"] = {offset, offset + t.nbytes};
    h[t.name] = std::move(e);
    offset += t.nbytes;
  }
  std::string s;
  try {
    s = h.dump();
  } catch (const nlohmann::json::exception& e) {
    MOP_FAIL("safetensors: cannot encode the header (tensor names and metadata must be UTF-8): {}",
             e.what());
  }
  size_t padded = (8 + s.size() + 7) / 8 * 8 - 8;
  s.resize(padded, ' ');
  return s;
}

size_t SafetensorsWriter::file_size() const {
  size_t n = 8 + header().size();
  for (const Pending& t : tensors_) n += t.nbytes;
  return n;
}

void SafetensorsWriter::write(const std::string& path) const {
  std::string h = header();
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  MOP_CHECK(fd >= 0, "{}: cannot open for writing: {}", path, std::strerror(errno));
  try {
    unsigned char len[8];
    uint64_t n = h.size();
    for (int i = 0; i < 8; ++i) len[i] = uint8_t(n >> (8 * i));
    write_all(fd, len, 8, path);
    write_all(fd, h.data(), h.size(), path);
    for (const Pending& t : tensors_)
      if (t.nbytes) write_all(fd, t.data, t.nbytes, path);
  } catch (...) {
    struct stat st;
    bool regular = ::fstat(fd, &st) == 0 && S_ISREG(st.st_mode);
    ::close(fd);
    if (regular) ::unlink(path.c_str());
    throw;
  }
  if (::close(fd) != 0) {
    int err = errno;
    struct stat st;
    if (::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode)) ::unlink(path.c_str());
    MOP_FAIL("{}: close after writing failed: {}", path, std::strerror(err));
  }
}

// ---- reader ------------------------------------------------------------------------------

SafetensorsFile::SafetensorsFile(std::string path) : path_(std::move(path)) {
  const std::string& p = path_;
  int fd = ::open(p.c_str(), O_RDONLY | O_CLOEXEC);
  MOP_CHECK(fd >= 0, "{}: cannot open: {}", p, std::strerror(errno));
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    int err = errno;
    ::close(fd);
    MOP_FAIL("{}: cannot stat: {}", p, std::strerror(err));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    MOP_FAIL("{}: not a regular file", p);
  }
  const uint64_t file_size = uint64_t(st.st_size);
  if (file_size < 8) {
    ::close(fd);
    MOP_FAIL("{}: file is {} bytes, shorter than the 8-byte header length", p, file_size);
  }
  void* m = ::mmap(nullptr, size_t(file_size), PROT_READ, MAP_PRIVATE, fd, 0);
  int map_err = errno;
  ::close(fd);
  MOP_CHECK(m != MAP_FAILED, "{}: cannot map {} bytes: {}", p, file_size, std::strerror(map_err));
  map_ = m;
  map_size_ = size_t(file_size);

  try {
    const unsigned char* bytes = static_cast<const unsigned char*>(map_);
    uint64_t n = 0;
    for (int i = 0; i < 8; ++i) n |= uint64_t(bytes[i]) << (8 * i);
    MOP_CHECK(n <= file_size - 8,
              "{}: header length is {} bytes but the file has only {} bytes ({} after the 8-byte length)", p,
              n, file_size, file_size - 8);
    const char* hbeg = reinterpret_cast<const char*>(bytes + 8);
    const uint64_t data_size = file_size - 8 - n;
    const unsigned char* data = bytes + 8 + n;

    Json h;
    try {
      h = Json::parse(hbeg, hbeg + n);
    } catch (const Json::exception& e) {
      MOP_FAIL("{}: header ({} bytes) is not valid JSON: {}", p, n, e.what());
    }
    MOP_CHECK(h.is_object(), "{}: header must be a JSON object, got {} {}", p, h.type_name(), brief(h));

    struct Span {
      uint64_t begin, end;
      const std::string* name;
    };
    std::vector<Span> spans;

    for (auto it = h.begin(); it != h.end(); ++it) {
      const std::string& name = it.key();
      const Json& v = it.value();
      if (name == "__metadata__") {
        MOP_CHECK(v.is_object(), "{}: \"__metadata__\" must be an object of strings, got {} {}", p,
                  v.type_name(), brief(v));
        for (auto mt = v.begin(); mt != v.end(); ++mt) {
          MOP_CHECK(mt.value().is_string(), "{}: \"__metadata__\" entry '{}' must be a string, got {} {}", p,
                    mt.key(), mt.value().type_name(), brief(mt.value()));
          metadata_[mt.key()] = mt.value().get<std::string>();
        }
        continue;
      }
      MOP_CHECK(v.is_object(), "{}: tensor '{}': entry must be a JSON object, got {} {}", p, name,
                v.type_name(), brief(v));
      for (const char* key : {"dtype", "shape", "data_offsets"})
        MOP_CHECK(v.contains(key), "{}: tensor '{}': missing \"{}\"", p, name, key);

      const Json& jd = v["dtype"];
      MOP_CHECK(jd.is_string(), "{}: tensor '{}': \"dtype\" must be a string, got {} {}", p, name,
                jd.type_name(), brief(jd));
      DType dtype;
      MOP_CHECK(parse_dtype(jd.get_ref<const std::string&>(), &dtype),
                "{}: tensor '{}': unknown dtype \"{}\" (supported: {})", p, name,
                jd.get_ref<const std::string&>(), known_dtypes());

      const Json& js = v["shape"];
      MOP_CHECK(js.is_array(), "{}: tensor '{}': \"shape\" must be an array of integers, got {} {}", p, name,
                js.type_name(), brief(js));
      std::vector<int64_t> shape;
      for (const Json& d : js) {
        if (d.is_number_unsigned()) {
          uint64_t u = d.get<uint64_t>();
          MOP_CHECK(u <= uint64_t(std::numeric_limits<int64_t>::max()),
                    "{}: tensor '{}': dimension {} in \"shape\" is too large", p, name, u);
          shape.push_back(int64_t(u));
        } else if (d.is_number_integer()) {
          shape.push_back(d.get<int64_t>());
        } else {
          MOP_FAIL("{}: tensor '{}': \"shape\" must be an array of integers, got {}", p, name, brief(js));
        }
      }
      for (int64_t d : shape)
        MOP_CHECK(d >= 0, "{}: tensor '{}': negative dimension {} in shape {}", p, name, d,
                  shape_to_string(shape));

      const Json& jo = v["data_offsets"];
      MOP_CHECK(jo.is_array() && jo.size() == 2,
                "{}: tensor '{}': \"data_offsets\" must be an array of two integers [begin, end], got {}", p,
                name, brief(jo));
      uint64_t off[2];
      for (int i = 0; i < 2; ++i) {
        const Json& o = jo[size_t(i)];
        if (o.is_number_unsigned()) {
          off[i] = o.get<uint64_t>();
        } else if (o.is_number_integer()) {
          MOP_FAIL("{}: tensor '{}': negative data_offsets {}", p, name, brief(jo));
        } else {
          MOP_FAIL("{}: tensor '{}': \"data_offsets\" must be an array of two integers [begin, end], got {}",
                   p, name, brief(jo));
        }
      }
      const uint64_t begin = off[0], end = off[1];
      MOP_CHECK(end >= begin, "{}: tensor '{}': data_offsets [{}, {}] end before they begin", p, name, begin,
                end);
      uint64_t need = 0;
      MOP_CHECK(shape_nbytes(shape, dtype, &need), "{}: tensor '{}': shape {} {} overflows the byte count", p,
                name, shape_to_string(shape), dtype_name(dtype));
      MOP_CHECK(need == end - begin,
                "{}: tensor '{}': shape {} {} needs {} bytes but data_offsets span {} ([{}, {}])", p, name,
                shape_to_string(shape), dtype_name(dtype), need, end - begin, begin, end);
      MOP_CHECK(end <= data_size,
                "{}: tensor '{}': data_offsets [{}, {}] ends at byte {} but the data section has {} bytes", p,
                name, begin, end, end, data_size);

      auto [eit, inserted] =
          entries_.emplace(name, Entry{dtype, std::move(shape), data + begin, size_t(end - begin)});
      MOP_ASSERT(inserted);
      if (end > begin) spans.push_back(Span{begin, end, &eit->first});
    }

    std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) {
      return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
    });
    for (size_t i = 1; i < spans.size(); ++i) {
      const Span& a = spans[i - 1];
      const Span& b = spans[i];
      MOP_CHECK(b.begin >= a.end, "{}: tensors '{}' (data_offsets [{}, {}]) and '{}' (data_offsets [{}, {}]) overlap",
                p, *a.name, a.begin, a.end, *b.name, b.begin, b.end);
    }
  } catch (...) {
    unmap();
    throw;
  }
}

SafetensorsFile::~SafetensorsFile() { unmap(); }

void SafetensorsFile::unmap() noexcept {
  if (map_) ::munmap(map_, map_size_);
  map_ = nullptr;
  map_size_ = 0;
}

SafetensorsFile::SafetensorsFile(SafetensorsFile&& o) noexcept
    : path_(std::move(o.path_)),
      map_(std::exchange(o.map_, nullptr)),
      map_size_(std::exchange(o.map_size_, 0)),
      entries_(std::move(o.entries_)),
      metadata_(std::move(o.metadata_)) {
  o.entries_.clear();
  o.metadata_.clear();
}

SafetensorsFile& SafetensorsFile::operator=(SafetensorsFile&& o) noexcept {
  if (this != &o) {
    unmap();
    path_ = std::move(o.path_);
    map_ = std::exchange(o.map_, nullptr);
    map_size_ = std::exchange(o.map_size_, 0);
    entries_ = std::move(o.entries_);
    metadata_ = std::move(o.metadata_);
    o.entries_.clear();
    o.metadata_.clear();
  }
  return *this;
}

std::vector<std::string> SafetensorsFile::names() const {
  std::vector<std::string> out;
  out.reserve(entries_.size());
  for (const auto& kv : entries_) out.push_back(kv.first);
  return out;
}

const SafetensorsFile::Entry& SafetensorsFile::get(const std::string& name) const {
  auto it = entries_.find(name);
  if (it != entries_.end()) return it->second;
  if (entries_.empty()) MOP_FAIL("{}: no tensor named '{}' (the file has no tensors)", path_, name);
  const std::string* best = nullptr;
  size_t best_d = 0;
  for (const auto& kv : entries_) {
    size_t d = edit_distance(name, kv.first);
    if (!best || d < best_d) {
      best = &kv.first;
      best_d = d;
    }
  }
  MOP_FAIL("{}: no tensor named '{}'; did you mean '{}'? ({} tensors in the file)", path_, name, *best,
           entries_.size());
}

void SafetensorsFile::read_into(const std::string& name, DType expected, const std::vector<int64_t>& expected_shape,
                                void* dst) const {
  const Entry& e = get(name);
  MOP_CHECK(e.dtype == expected && e.shape == expected_shape,
            "{}: tensor '{}' is {} {} but {} {} was expected", path_, name, dtype_name(e.dtype),
            shape_to_string(e.shape), dtype_name(expected), shape_to_string(expected_shape));
  if (e.nbytes) std::memcpy(dst, e.data, e.nbytes);
}

void SafetensorsFile::read_as_f32(const std::string& name, const std::vector<int64_t>& expected_shape,
                                  float* dst) const {
  const Entry& e = get(name);
  MOP_CHECK(e.dtype == DType::f32 || e.dtype == DType::bf16 || e.dtype == DType::f16 || e.dtype == DType::f64,
            "{}: tensor '{}' is {} {}; read_as_f32 converts only F32, F64, BF16 and F16", path_, name,
            dtype_name(e.dtype), shape_to_string(e.shape));
  MOP_CHECK(e.shape == expected_shape, "{}: tensor '{}' is {} {} but shape {} was expected (read as F32)", path_,
            name, dtype_name(e.dtype), shape_to_string(e.shape), shape_to_string(expected_shape));
  const unsigned char* src = static_cast<const unsigned char*>(e.data);
  const size_t n = e.nbytes / dtype_size(e.dtype);
  switch (e.dtype) {
    case DType::f32:
      if (e.nbytes) std::memcpy(dst, src, e.nbytes);
      break;
    case DType::f64:
      for (size_t i = 0; i < n; ++i) {
        double d;
        std::memcpy(&d, src + 8 * i, 8);
        dst[i] = float(d);
      }
      break;
    case DType::bf16:
      for (size_t i = 0; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, src + 2 * i, 2);
        dst[i] = bf16_to_f32(h);
      }
      break;
    case DType::f16:
      for (size_t i = 0; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, src + 2 * i, 2);
        dst[i] = f16_to_f32(h);
      }
      break;
    default:
      MOP_ASSERT(false);
  }
}

}  // namespace mop::ckpt
