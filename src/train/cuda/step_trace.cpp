#include "train/cuda/step_trace.h"

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <vector>

#include "checkpoint/atomic_dir.h"
#include "core/error.h"

#ifdef MOP_HAVE_CUPTI
#include <cupti.h>
#endif

namespace mop {

#ifdef MOP_HAVE_CUPTI
namespace {

// One timed interval of the recording, copied out of CUPTI's buffers as they complete.
struct Span {
  enum Kind { kernel, memcpy, memset, runtime } kind;
  uint64_t start = 0, end = 0;  // ns, CUPTI's clock (the same for device and host records)
  uint32_t device = 0, stream = 0, correlation = 0;
  uint64_t thread = 0;  // runtime calls: the host thread
  uint64_t bytes = 0;
  int grid[3] = {0, 0, 0}, block[3] = {0, 0, 0};
  std::string name;
};

std::mutex g_mu;
std::vector<Span> g_spans;
size_t g_dropped = 0;
constexpr size_t kBufferBytes = 8u << 20;

#define MOP_CUPTI_CHECK(expr)                                                         \
  do {                                                                                \
    CUptiResult r_ = (expr);                                                          \
    if (r_ != CUPTI_SUCCESS) {                                                        \
      const char* s_ = nullptr;                                                       \
      cuptiGetResultString(r_, &s_);                                                  \
      MOP_FAIL("CUPTI: {} failed: {}", #expr, s_ ? s_ : "unknown error");             \
    }                                                                                 \
  } while (0)

void CUPTIAPI buffer_requested(uint8_t** buffer, size_t* size, size_t* max_records) {
  *size = kBufferBytes;
  *buffer = static_cast<uint8_t*>(std::aligned_alloc(8, kBufferBytes));
  *max_records = 0;
}

const char* memcpy_kind(uint8_t k) {
  switch (k) {
    case CUPTI_ACTIVITY_MEMCPY_KIND_HTOD: return "memcpy HtoD";
    case CUPTI_ACTIVITY_MEMCPY_KIND_DTOH: return "memcpy DtoH";
    case CUPTI_ACTIVITY_MEMCPY_KIND_DTOD: return "memcpy DtoD";
    case CUPTI_ACTIVITY_MEMCPY_KIND_PTOP: return "memcpy PtoP";
    default: return "memcpy";
  }
}

void CUPTIAPI buffer_completed(CUcontext, uint32_t, uint8_t* buffer, size_t, size_t valid) {
  std::vector<Span> got;
  CUpti_Activity* rec = nullptr;
  while (cuptiActivityGetNextRecord(buffer, valid, &rec) == CUPTI_SUCCESS) {
    Span s;
    switch (rec->kind) {
      case CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL:
      case CUPTI_ACTIVITY_KIND_KERNEL: {
        const auto* k = reinterpret_cast<const CUpti_ActivityKernel10*>(rec);
        s.kind = Span::kernel, s.start = k->start, s.end = k->end, s.device = k->deviceId, s.stream = k->streamId;
        s.correlation = k->correlationId, s.name = k->name ? k->name : "kernel";
        s.grid[0] = k->gridX, s.grid[1] = k->gridY, s.grid[2] = k->gridZ;
        s.block[0] = k->blockX, s.block[1] = k->blockY, s.block[2] = k->blockZ;
        break;
      }
      case CUPTI_ACTIVITY_KIND_MEMCPY: {
        const auto* m = reinterpret_cast<const CUpti_ActivityMemcpy6*>(rec);
        s.kind = Span::memcpy, s.start = m->start, s.end = m->end, s.device = m->deviceId, s.stream = m->streamId;
        s.correlation = m->correlationId, s.bytes = m->bytes, s.name = memcpy_kind(m->copyKind);
        break;
      }
      case CUPTI_ACTIVITY_KIND_MEMSET: {
        const auto* m = reinterpret_cast<const CUpti_ActivityMemset4*>(rec);
        s.kind = Span::memset, s.start = m->start, s.end = m->end, s.device = m->deviceId, s.stream = m->streamId;
        s.correlation = m->correlationId, s.bytes = m->bytes, s.name = "memset";
        break;
      }
      case CUPTI_ACTIVITY_KIND_RUNTIME: {
        const auto* a = reinterpret_cast<const CUpti_ActivityAPI*>(rec);
        const char* name = nullptr;
        if (cuptiGetCallbackName(CUPTI_CB_DOMAIN_RUNTIME_API, a->cbid, &name) != CUPTI_SUCCESS || !name)
          name = "cuda runtime call";
        s.kind = Span::runtime, s.start = a->start, s.end = a->end, s.thread = uint64_t(a->threadId);
        s.correlation = a->correlationId, s.name = name;
        break;
      }
      default: continue;
    }
    got.push_back(std::move(s));
  }
  size_t dropped = 0;
  cuptiActivityGetNumDroppedRecords(nullptr, 0, &dropped);
  std::free(buffer);
  std::lock_guard lk(g_mu);
  g_dropped += dropped;
  g_spans.insert(g_spans.end(), std::make_move_iterator(got.begin()), std::make_move_iterator(got.end()));
}

constexpr CUpti_ActivityKind kKinds[] = {CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL, CUPTI_ACTIVITY_KIND_MEMCPY,
                                         CUPTI_ACTIVITY_KIND_MEMSET, CUPTI_ACTIVITY_KIND_RUNTIME};

void disable_all() {
  for (CUpti_ActivityKind k : kKinds) cuptiActivityDisable(k);
}

}  // namespace

bool StepTrace::available() { return true; }

void StepTrace::start() {
  MOP_CHECK(!running_, "StepTrace: start while recording");
  {
    std::lock_guard lk(g_mu);
    g_spans.clear();
    g_dropped = 0;
  }
  static std::once_flag registered;
  std::call_once(registered, [] { MOP_CUPTI_CHECK(cuptiActivityRegisterCallbacks(buffer_requested, buffer_completed)); });
  for (CUpti_ActivityKind k : kKinds) MOP_CUPTI_CHECK(cuptiActivityEnable(k));
  running_ = true;
}

size_t StepTrace::stop_and_write(const std::string& path, const std::string& label) {
  MOP_CHECK(running_, "StepTrace: stop without start");
  disable_all();
  running_ = false;
  MOP_CUPTI_CHECK(cuptiActivityFlushAll(CUPTI_ACTIVITY_FLAG_FLUSH_FORCED));
  std::vector<Span> spans;
  size_t dropped = 0;
  {
    std::lock_guard lk(g_mu);
    spans.swap(g_spans);
    dropped = g_dropped;
  }
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) { return a.start < b.start; });
  const uint64_t t0 = spans.empty() ? 0 : spans.front().start;
  auto us = [&](uint64_t ns) { return double(ns - std::min(ns, t0)) / 1000.0; };
  // Integer process and thread ids (what every trace viewer accepts), named by metadata events:
  // process 0 the host (a thread per host thread), process 1 + d GPU d (a thread per stream).
  nlohmann::json events = nlohmann::json::array();
  std::vector<std::pair<int64_t, int64_t>> named;
  auto name_track = [&](int64_t pid, int64_t tid, const std::string& process, const std::string& thread) {
    if (std::find(named.begin(), named.end(), std::make_pair(pid, tid)) != named.end()) return;
    if (std::none_of(named.begin(), named.end(), [&](const auto& n) { return n.first == pid; }))
      events.push_back({{"ph", "M"}, {"name", "process_name"}, {"pid", pid}, {"args", {{"name", process}}}});
    named.emplace_back(pid, tid);
    events.push_back({{"ph", "M"}, {"name", "thread_name"}, {"pid", pid}, {"tid", tid}, {"args", {{"name", thread}}}});
  };
  for (const Span& s : spans) {
    nlohmann::json e = {{"ph", "X"}, {"name", s.name}, {"ts", us(s.start)}, {"dur", double(s.end - s.start) / 1000.0}};
    nlohmann::json args = {{"correlation", s.correlation}};
    int64_t pid = 0, tid = 0;
    if (s.kind == Span::runtime) {
      tid = int64_t(s.thread & 0x7fffffff), e["cat"] = "runtime";
      name_track(pid, tid, label + " host", fmt::format("thread {}", s.thread));
    } else {
      pid = 1 + int64_t(s.device), tid = int64_t(s.stream);
      e["cat"] = s.kind == Span::kernel ? "kernel" : s.kind == Span::memcpy ? "memcpy" : "memset";
      if (s.kind == Span::kernel) {
        args["grid"] = {s.grid[0], s.grid[1], s.grid[2]};
        args["block"] = {s.block[0], s.block[1], s.block[2]};
      } else {
        args["bytes"] = s.bytes;
      }
      name_track(pid, tid, fmt::format("{} GPU {}", label, s.device), fmt::format("stream {}", s.stream));
    }
    e["pid"] = pid, e["tid"] = tid, e["args"] = std::move(args);
    events.push_back(std::move(e));
  }
  nlohmann::json doc = {{"traceEvents", std::move(events)}, {"displayTimeUnit", "ms"},
                        {"otherData", {{"dropped_records", dropped}, {"source", "mop train.trace (CUPTI activity)"}}}};
  ckpt::write_text_file_atomic(path, doc.dump());
  return spans.size();
}

StepTrace::~StepTrace() {
  if (running_) disable_all();
}

#else  // no CUPTI in this build

bool StepTrace::available() { return false; }
void StepTrace::start() {
  MOP_FAIL("train.trace: this build has no CUPTI (the CUDA toolkit's profiling library was not found at configure time)");
}
size_t StepTrace::stop_and_write(const std::string&, const std::string&) { return 0; }
StepTrace::~StepTrace() = default;

#endif

}  // namespace mop
