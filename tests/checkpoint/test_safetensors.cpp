#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/stat.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "checkpoint/safetensors.h"
#include "core/error.h"

using namespace mop;
using namespace mop::ckpt;

namespace {

class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/mop_st_XXXXXX";
    char* p = ::mkdtemp(tmpl);
    if (!p) throw std::runtime_error("mkdtemp failed");
    path_ = p;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  std::string file(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

std::string read_bytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), std::streamsize(bytes.size()));
}

std::string le64(uint64_t n) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[size_t(i)] = char(uint8_t(n >> (8 * i)));
  return s;
}

// A file with the given header (padded like the writer does) and `data_bytes` zero bytes.
std::string make_file(const TempDir& dir, const std::string& header, size_t data_bytes,
                      const std::string& name = "bad.safetensors") {
  std::string h = header;
  while ((8 + h.size()) % 8) h += ' ';
  std::string path = dir.file(name);
  write_bytes(path, le64(h.size()) + h + std::string(data_bytes, '\0'));
  return path;
}

// Opens `path` expecting a mop::Error; returns its message.
std::string open_error(const std::string& path) {
  try {
    SafetensorsFile f(path);
  } catch (const Error& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected mop::Error opening " << path;
  return {};
}

#define EXPECT_HAS(msg, sub) EXPECT_NE((msg).find(sub), std::string::npos) << "message: " << (msg) << "\nwanted: " << (sub)

void expect_starts_with_path(const std::string& msg, const std::string& path) {
  EXPECT_EQ(msg.rfind(path + ":", 0), 0u) << "message should start with the path: " << msg;
}

}  // namespace

TEST(Safetensors, RoundTripSeveralDtypesAndShapes) {
  TempDir dir;
  std::vector<float> w = {1.f, -2.f, 3.5f, 0.25f, -0.f, 1e-20f};
  std::vector<uint16_t> b = {f32_to_bf16(1.f), f32_to_bf16(-3.f), f32_to_bf16(0.5f), 0x7f80};
  int64_t step = -1234567890123;
  std::vector<uint8_t> bytes = {1, 2, 255};

  SafetensorsWriter wr;
  wr.add("w", DType::f32, {2, 3}, w.data());
  wr.add("b16", DType::bf16, {4}, b.data());
  wr.add("step", DType::i64, {}, &step);
  wr.add("empty", DType::u8, {0, 5}, nullptr);
  wr.add("bytes", DType::u8, {3}, bytes.data());
  wr.set_metadata("format", "pt");
  wr.set_metadata("step", "100");
  std::string path = dir.file("m.safetensors");
  wr.write(path);
  EXPECT_EQ(read_bytes(path).size(), wr.file_size());

  SafetensorsFile f(path);
  EXPECT_EQ(f.path(), path);
  EXPECT_EQ(f.names(), (std::vector<std::string>{"b16", "bytes", "empty", "step", "w"}));
  EXPECT_TRUE(f.contains("w"));
  EXPECT_FALSE(f.contains("x"));
  EXPECT_EQ(f.metadata(), (std::map<std::string, std::string>{{"format", "pt"}, {"step", "100"}}));

  const auto& ew = f.get("w");
  EXPECT_EQ(ew.dtype, DType::f32);
  EXPECT_EQ(ew.shape, (std::vector<int64_t>{2, 3}));
  ASSERT_EQ(ew.nbytes, 24u);
  EXPECT_EQ(std::memcmp(ew.data, w.data(), 24), 0);

  const auto& eb = f.get("b16");
  EXPECT_EQ(eb.dtype, DType::bf16);
  ASSERT_EQ(eb.nbytes, 8u);
  EXPECT_EQ(std::memcmp(eb.data, b.data(), 8), 0);

  const auto& es = f.get("step");
  EXPECT_EQ(es.dtype, DType::i64);
  EXPECT_TRUE(es.shape.empty());
  ASSERT_EQ(es.nbytes, 8u);
  int64_t step_back = 0;
  f.read_into("step", DType::i64, {}, &step_back);
  EXPECT_EQ(step_back, step);

  const auto& ee = f.get("empty");
  EXPECT_EQ(ee.dtype, DType::u8);
  EXPECT_EQ(ee.shape, (std::vector<int64_t>{0, 5}));
  EXPECT_EQ(ee.nbytes, 0u);
  f.read_into("empty", DType::u8, {0, 5}, nullptr);

  std::vector<uint8_t> bytes_back(3);
  f.read_into("bytes", DType::u8, {3}, bytes_back.data());
  EXPECT_EQ(bytes_back, bytes);

  std::vector<float> w_back(6);
  f.read_into("w", DType::f32, {2, 3}, w_back.data());
  EXPECT_EQ(std::memcmp(w_back.data(), w.data(), 24), 0);

  std::vector<float> b_f32(4);
  f.read_as_f32("b16", {4}, b_f32.data());
  EXPECT_EQ(b_f32[0], 1.f);
  EXPECT_EQ(b_f32[1], -3.f);
  EXPECT_EQ(b_f32[2], 0.5f);
  EXPECT_TRUE(std::isinf(b_f32[3]));

  // Moving keeps the mapping alive and valid.
  SafetensorsFile g(std::move(f));
  EXPECT_EQ(std::memcmp(g.get("w").data, w.data(), 24), 0);
  SafetensorsFile h(path);
  h = std::move(g);
  EXPECT_EQ(h.get("bytes").nbytes, 3u);
}

TEST(Safetensors, HeaderIsAlignedJsonWithExactEntries) {
  TempDir dir;
  std::vector<float> w(6, 1.f);
  std::vector<uint16_t> b(4, 0);
  int64_t step = 7;
  SafetensorsWriter wr;
  wr.add("w", DType::f32, {2, 3}, w.data());
  wr.add("b16", DType::bf16, {4}, b.data());
  wr.add("step", DType::i64, {}, &step);
  wr.add("empty", DType::u8, {0}, nullptr);
  wr.set_metadata("format", "pt");
  std::string path = dir.file("h.safetensors");
  wr.write(path);

  std::string bytes = read_bytes(path);
  ASSERT_GE(bytes.size(), 8u);
  uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= uint64_t(uint8_t(bytes[size_t(i)])) << (8 * i);
  EXPECT_EQ((8 + n) % 8, 0u);
  ASSERT_EQ(bytes.size(), 8 + n + 24 + 8 + 8);
  std::string header = bytes.substr(8, n);
  size_t last = header.find_last_not_of(' ');
  EXPECT_EQ(header[last], '}');
  EXPECT_LT(header.size() - last - 1, 8u);  // at most 7 spaces of padding

  nlohmann::json h = nlohmann::json::parse(header);
  nlohmann::json expected = {
      {"__metadata__", {{"format", "pt"}}},
      {"w", {{"dtype", "F32"}, {"shape", {2, 3}}, {"data_offsets", {0, 24}}}},
      {"b16", {{"dtype", "BF16"}, {"shape", {4}}, {"data_offsets", {24, 32}}}},
      {"step", {{"dtype", "I64"}, {"shape", nlohmann::json::array()}, {"data_offsets", {32, 40}}}},
      {"empty", {{"dtype", "U8"}, {"shape", {0}}, {"data_offsets", {40, 40}}}},
  };
  EXPECT_EQ(h, expected) << h.dump();
  EXPECT_EQ(header, wr.header());

  // Data follows the header in the order added.
  float w0;
  std::memcpy(&w0, bytes.data() + 8 + n, 4);
  EXPECT_EQ(w0, 1.f);
  int64_t s;
  std::memcpy(&s, bytes.data() + 8 + n + 32, 8);
  EXPECT_EQ(s, 7);

  // Alignment holds whatever the header length.
  for (int len = 1; len <= 9; ++len) {
    SafetensorsWriter wr2;
    wr2.add(std::string(size_t(len), 'x'), DType::u8, {1}, &len);
    EXPECT_EQ((8 + wr2.header().size()) % 8, 0u) << len;
  }
}

TEST(Safetensors, ReadsAHandWrittenPythonStyleFile) {
  TempDir dir;
  // As Python's safetensors writes it: length, JSON, space padding to 8, little-endian data.
  std::string header = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  std::string padded = header;
  while ((8 + padded.size()) % 8) padded += ' ';
  std::string file = le64(padded.size()) + padded;
  for (float v : {1.5f, -2.0f}) {
    uint32_t u;
    std::memcpy(&u, &v, 4);
    for (int i = 0; i < 4; ++i) file += char(uint8_t(u >> (8 * i)));
  }
  std::string path = dir.file("py.safetensors");
  write_bytes(path, file);

  SafetensorsFile f(path);
  EXPECT_EQ(f.names(), std::vector<std::string>{"a"});
  EXPECT_TRUE(f.metadata().empty());
  float out[2] = {0, 0};
  f.read_into("a", DType::f32, {2}, out);
  EXPECT_EQ(out[0], 1.5f);
  EXPECT_EQ(out[1], -2.0f);

  // Also without padding, with __metadata__ and an unaligned data section.
  std::string h2 = R"({"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  std::string file2 = le64(h2.size()) + h2 + file.substr(8 + padded.size());
  std::string path2 = dir.file("py2.safetensors");
  write_bytes(path2, file2);
  SafetensorsFile f2(path2);
  EXPECT_EQ(f2.metadata().at("format"), "pt");
  f2.read_as_f32("a", {2}, out);
  EXPECT_EQ(out[0], 1.5f);
  EXPECT_EQ(out[1], -2.0f);
}

TEST(Safetensors, EmptyFileSetIsValid) {
  TempDir dir;
  SafetensorsWriter wr;
  std::string path = dir.file("empty.safetensors");
  wr.write(path);
  EXPECT_EQ(read_bytes(path).size(), 16u);  // 8 + "{}" padded to 8
  SafetensorsFile f(path);
  EXPECT_TRUE(f.names().empty());
  EXPECT_EQ(f.size(), 0u);
  try {
    f.get("x");
    FAIL() << "expected mop::Error";
  } catch (const Error& e) {
    std::string m = e.what();
    expect_starts_with_path(m, path);
    EXPECT_HAS(m, "'x'");
    EXPECT_HAS(m, "no tensors");
  }
}

TEST(Safetensors, CorruptFilesNameThePathAndTheNumbers) {
  TempDir dir;

  {  // shorter than 8 bytes
    std::string path = dir.file("short.safetensors");
    write_bytes(path, std::string("\x05\x00\x00", 3));
    std::string m = open_error(path);
    expect_starts_with_path(m, path);
    EXPECT_HAS(m, "3 bytes");
    EXPECT_HAS(m, "8-byte");
  }
  {  // header length larger than the file
    std::string path = dir.file("len.safetensors");
    write_bytes(path, le64(1000) + std::string(12, ' '));
    std::string m = open_error(path);
    expect_starts_with_path(m, path);
    EXPECT_HAS(m, "1000");
    EXPECT_HAS(m, "20 bytes");
  }
  {  // a header length that would overflow 8 + N
    std::string path = dir.file("huge.safetensors");
    write_bytes(path, le64(~uint64_t(0)) + "{}      ");
    std::string m = open_error(path);
    expect_starts_with_path(m, path);
    EXPECT_HAS(m, "18446744073709551615");
    EXPECT_HAS(m, "16 bytes");
  }

  struct Case {
    const char* what;
    std::string header;
    size_t data;
    std::vector<std::string> wanted;
  };
  std::vector<Case> cases = {
      {"invalid json", R"({"a": {"dtype": "F32",)", 0, {"not valid JSON", "parse error"}},
      {"not an object", R"([1, 2, 3])", 0, {"JSON object", "array"}},
      {"entry not an object", R"({"a": 5})", 0, {"'a'", "JSON object", "number"}},
      {"missing dtype", R"({"a": {"shape": [1], "data_offsets": [0, 4]}})", 4, {"'a'", "missing \"dtype\""}},
      {"missing shape", R"({"a": {"dtype": "F32", "data_offsets": [0, 4]}})", 4, {"'a'", "missing \"shape\""}},
      {"missing offsets", R"({"a": {"dtype": "F32", "shape": [1]}})", 4, {"'a'", "missing \"data_offsets\""}},
      {"dtype not a string", R"({"a": {"dtype": 7, "shape": [1], "data_offsets": [0, 4]}})", 4,
       {"'a'", "\"dtype\" must be a string", "7"}},
      {"shape not an array", R"({"a": {"dtype": "F32", "shape": "2x3", "data_offsets": [0, 4]}})", 4,
       {"'a'", "\"shape\" must be an array of integers", "2x3"}},
      {"shape with a float", R"({"a": {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]}})", 4,
       {"'a'", "\"shape\" must be an array of integers", "1.5"}},
      {"offsets of one number", R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4]}})", 4,
       {"'a'", "\"data_offsets\" must be an array of two integers", "[4]"}},
      {"offsets of strings", R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": ["0", "4"]}})", 4,
       {"'a'", "\"data_offsets\" must be an array of two integers"}},
      {"negative offsets", R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}})", 4,
       {"'a'", "negative data_offsets", "-4"}},
      {"unknown dtype", R"({"a": {"dtype": "F8_E4M3", "shape": [1], "data_offsets": [0, 1]}})", 1,
       {"'a'", "unknown dtype \"F8_E4M3\"", "BF16"}},
      {"negative dim", R"({"x": {"dtype": "F32", "shape": [2, -3], "data_offsets": [0, 24]}})", 24,
       {"'x'", "negative dimension -3", "[2, -3]"}},
      {"end before begin", R"({"x": {"dtype": "F32", "shape": [1], "data_offsets": [8, 4]}})", 8,
       {"'x'", "[8, 4]", "end before they begin"}},
      {"size mismatch", R"({"x": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}})", 24,
       {"tensor 'x': shape [2, 3] F32 needs 24 bytes but data_offsets span 20"}},
      {"shape overflow", R"({"x": {"dtype": "F32", "shape": [4294967296, 4294967296], "data_offsets": [0, 4]}})",
       4, {"'x'", "overflows"}},
      {"beyond the data", R"({"x": {"dtype": "F32", "shape": [250], "data_offsets": [0, 1000]}})", 800,
       {"tensor 'x'", "ends at byte 1000 but the data section has 800 bytes"}},
      {"overlap", R"({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                     "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}})",
       24, {"'a'", "'b'", "[0, 16]", "[8, 24]", "overlap"}},
      {"metadata not an object", R"({"__metadata__": [1]})", 0, {"__metadata__", "object"}},
      {"metadata value not a string", R"({"__metadata__": {"step": 100}})", 0, {"__metadata__", "'step'", "100"}},
  };
  int i = 0;
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    std::string path = make_file(dir, c.header, c.data, "case" + std::to_string(i++) + ".safetensors");
    std::string m = open_error(path);
    expect_starts_with_path(m, path);
    for (const std::string& w : c.wanted) EXPECT_HAS(m, w);
  }
}

TEST(Safetensors, ZeroSizeTensorsAndGapsAreNotOverlaps) {
  TempDir dir;
  std::string path = make_file(dir,
                               R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                   "z": {"dtype": "F32", "shape": [0], "data_offsets": [4, 4]},
                                   "b": {"dtype": "U8", "shape": [2], "data_offsets": [10, 12]}})",
                               12);
  SafetensorsFile f(path);
  EXPECT_EQ(f.names(), (std::vector<std::string>{"a", "b", "z"}));
  EXPECT_EQ(f.get("z").nbytes, 0u);
}

TEST(Safetensors, MissingNameSuggestsTheClosest) {
  TempDir dir;
  float x[4] = {};
  SafetensorsWriter wr;
  wr.add("layers.0.attn.wq", DType::f32, {4}, x);
  wr.add("layers.0.mlp.w1", DType::f32, {4}, x);
  wr.add("embed", DType::f32, {4}, x);
  std::string path = dir.file("s.safetensors");
  wr.write(path);
  SafetensorsFile f(path);
  try {
    f.get("layer.0.attn.wq");
    FAIL() << "expected mop::Error";
  } catch (const Error& e) {
    std::string m = e.what();
    expect_starts_with_path(m, path);
    EXPECT_HAS(m, "'layer.0.attn.wq'");
    EXPECT_HAS(m, "did you mean 'layers.0.attn.wq'");
  }
  try {
    f.get("embd");
    FAIL() << "expected mop::Error";
  } catch (const Error& e) {
    EXPECT_HAS(std::string(e.what()), "did you mean 'embed'");
  }
  // read_into goes through the same lookup.
  EXPECT_THROW(f.read_into("layers.0.mlp.w2", DType::f32, {4}, x), Error);
}

TEST(Safetensors, ReadIntoChecksDtypeAndShape) {
  TempDir dir;
  std::vector<float> w(6, 2.f);
  SafetensorsWriter wr;
  wr.add("w", DType::f32, {2, 3}, w.data());
  std::string path = dir.file("r.safetensors");
  wr.write(path);
  SafetensorsFile f(path);
  std::vector<float> dst(6, 0.f);

  auto message = [&](DType t, std::vector<int64_t> shape) {
    try {
      f.read_into("w", t, shape, dst.data());
    } catch (const Error& e) {
      return std::string(e.what());
    }
    ADD_FAILURE() << "expected mop::Error";
    return std::string();
  };
  std::string m = message(DType::bf16, {3, 2});
  expect_starts_with_path(m, path);
  EXPECT_HAS(m, "'w'");
  EXPECT_HAS(m, "F32 [2, 3]");
  EXPECT_HAS(m, "BF16 [3, 2]");
  m = message(DType::f32, {6});
  EXPECT_HAS(m, "F32 [2, 3]");
  EXPECT_HAS(m, "F32 [6]");
  m = message(DType::i32, {2, 3});
  EXPECT_HAS(m, "F32 [2, 3]");
  EXPECT_HAS(m, "I32 [2, 3]");
  for (float v : dst) EXPECT_EQ(v, 0.f);  // nothing copied on error

  try {
    f.read_as_f32("w", {3, 2}, dst.data());
    FAIL() << "expected mop::Error";
  } catch (const Error& e) {
    std::string m2 = e.what();
    EXPECT_HAS(m2, "[2, 3]");
    EXPECT_HAS(m2, "[3, 2]");
  }
}

TEST(Safetensors, ReadAsF32Converts) {
  TempDir dir;
  std::vector<uint16_t> h = {0x3C00, 0xC000, 0x7BFF, 0x0001, 0x7C00, 0x8000, 0x3555};
  std::vector<double> d = {1.0, -0.1, 1e30};
  std::vector<uint16_t> b = {f32_to_bf16(3.f), f32_to_bf16(-0.5f)};
  std::vector<float> f32 = {7.f, 8.f};
  std::vector<int64_t> ints = {1, 2};
  SafetensorsWriter wr;
  wr.add("h", DType::f16, {7}, h.data());
  wr.add("d", DType::f64, {3}, d.data());
  wr.add("b", DType::bf16, {2}, b.data());
  wr.add("f", DType::f32, {2}, f32.data());
  wr.add("i", DType::i64, {2}, ints.data());
  std::string path = dir.file("c.safetensors");
  wr.write(path);
  SafetensorsFile f(path);

  std::vector<float> out(7);
  f.read_as_f32("h", {7}, out.data());
  EXPECT_EQ(out[0], 1.f);
  EXPECT_EQ(out[1], -2.f);
  EXPECT_EQ(out[2], 65504.f);
  EXPECT_EQ(out[3], std::ldexp(1.f, -24));
  EXPECT_TRUE(std::isinf(out[4]) && out[4] > 0);
  EXPECT_TRUE(out[5] == 0.f && std::signbit(out[5]));
  EXPECT_NEAR(out[6], 1.f / 3.f, 1e-3);

  f.read_as_f32("d", {3}, out.data());
  EXPECT_EQ(out[0], 1.f);
  EXPECT_EQ(out[1], float(-0.1));
  EXPECT_EQ(out[2], float(1e30));
  f.read_as_f32("b", {2}, out.data());
  EXPECT_EQ(out[0], 3.f);
  EXPECT_EQ(out[1], -0.5f);
  f.read_as_f32("f", {2}, out.data());
  EXPECT_EQ(out[0], 7.f);
  EXPECT_EQ(out[1], 8.f);
  try {
    f.read_as_f32("i", {2}, out.data());
    FAIL() << "expected mop::Error";
  } catch (const Error& e) {
    EXPECT_HAS(std::string(e.what()), "I64");
  }
}

TEST(Safetensors, WriterRejectsBadInput) {
  float x[2] = {};
  SafetensorsWriter wr;
  wr.add("a", DType::f32, {2}, x);
  try {
    wr.add("a", DType::f32, {2}, x);
    FAIL() << "expected mop::Error";
  } catch (const Error& e) {
    EXPECT_HAS(std::string(e.what()), "'a' added twice");
  }
  EXPECT_THROW(wr.add("neg", DType::f32, {-1}, x), Error);
  EXPECT_THROW(wr.add("__metadata__", DType::f32, {2}, x), Error);
  EXPECT_THROW(wr.add("", DType::f32, {2}, x), Error);
  EXPECT_THROW(wr.add("null", DType::f32, {2}, nullptr), Error);
  EXPECT_EQ(wr.num_tensors(), 1u);
}

TEST(Safetensors, WriteErrorsNameThePath) {
  float x[2] = {1.f, 2.f};
  SafetensorsWriter wr;
  wr.add("a", DType::f32, {2}, x);
  {
    TempDir dir;
    std::string path = dir.file("no/such/dir/x.safetensors");
    try {
      wr.write(path);
      FAIL() << "expected mop::Error";
    } catch (const Error& e) {
      std::string m = e.what();
      expect_starts_with_path(m, path);
      EXPECT_HAS(m, "No such file or directory");
    }
  }
  struct stat st;
  if (::stat("/dev/full", &st) != 0 || !S_ISCHR(st.st_mode)) GTEST_SKIP() << "no /dev/full";
  try {
    wr.write("/dev/full");
    FAIL() << "expected mop::Error";
  } catch (const Error& e) {
    std::string m = e.what();
    expect_starts_with_path(m, "/dev/full");
    EXPECT_HAS(m, "No space left on device");
  }
  ASSERT_EQ(::stat("/dev/full", &st), 0);  // a device is never unlinked
  EXPECT_TRUE(S_ISCHR(st.st_mode));
}

TEST(Safetensors, OpenErrors) {
  TempDir dir;
  std::string missing = dir.file("missing.safetensors");
  std::string m = open_error(missing);
  expect_starts_with_path(m, missing);
  EXPECT_HAS(m, "No such file or directory");
  std::string d = dir.file("adir");
  std::filesystem::create_directory(d);
  m = open_error(d);
  expect_starts_with_path(m, d);
  EXPECT_HAS(m, "not a regular file");
}
