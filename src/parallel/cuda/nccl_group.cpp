#include "parallel/cuda/nccl_group.h"

#include <nccl.h>

#include <cstring>
#include <mutex>
#include <thread>

#include "ops/cuda/check.cuh"
#include "parallel/cuda/event_work.h"

namespace mop {

static_assert(sizeof(ncclUniqueId) == sizeof(NcclGroup::UniqueId), "ncclUniqueId size changed");

using Clock = std::chrono::steady_clock;

struct NcclComm {
  ncclComm_t comm = nullptr;
  int rank = 0, size = 0, device = 0;
  cudaStream_t stream = nullptr;
  std::string name;
  std::chrono::milliseconds timeout{0};
  std::mutex mu;  // broken state: a work may be waited on after the group's thread moved on
  bool broken = false;
  std::string broken_by;

  std::string where() const {
    return fmt::format("nccl group '{}' (rank {} of {}, device {})", name, rank, size, device);
  }

  void check_usable(const char* op) {
    std::lock_guard lk(mu);
    MOP_CHECK(!broken, "{}: {} called after an earlier failure ({})", where(), op, broken_by);
  }

  // Aborts the communicator (unblocks every kernel of it) and throws.
  [[noreturn]] void fail(const char* op, const std::string& why) {
    std::string msg = fmt::format("{}: {} {}", where(), op, why);
    {
      std::lock_guard lk(mu);
      if (!broken) {
        broken = true;
        broken_by = msg;
        ncclCommAbort(comm);
        comm = nullptr;
      }
    }
    throw Error(msg, __FILE__, __LINE__);
  }

  std::string nccl_error(ncclResult_t r) const {
    const char* last = comm ? ncclGetLastError(comm) : nullptr;
    return fmt::format("{} ({}){}{}", ncclGetErrorString(r), int(r), last && *last ? ": " : "",
                       last ? last : "");
  }

  // A non-blocking communicator may still be enqueueing (ncclInProgress) after a call returns.
  void settle(const char* op, ncclResult_t r) {
    auto deadline = Clock::now() + timeout;
    while (r == ncclInProgress) {
      if (Clock::now() > deadline)
        fail(op, fmt::format("timed out after {} ms while NCCL was still enqueueing: a peer rank "
                             "exited or hung, or the ranks called different operations",
                             timeout.count()));
      std::this_thread::yield();
      ncclResult_t q = ncclCommGetAsyncError(comm, &r);
      if (q != ncclSuccess) r = q;
    }
    if (r != ncclSuccess) fail(op, "failed: " + nccl_error(r));
  }

  // Host wait for `ev`, watching for NCCL's asynchronous errors and the timeout.
  void wait_event(const char* op, cudaEvent_t ev) {
    auto deadline = Clock::now() + timeout;
    for (int spin = 0;; ++spin) {
      cudaError_t q = cudaEventQuery(ev);
      if (q == cudaSuccess) return;
      if (q != cudaErrorNotReady)
        fail(op, fmt::format("failed on the device: CUDA {} ({})", cudaGetErrorName(q),
                             cudaGetErrorString(q)));
      ncclResult_t async = ncclSuccess;
      {
        std::lock_guard lk(mu);
        MOP_CHECK(!broken, "{}: {} aborted by an earlier failure ({})", where(), op, broken_by);
        ncclCommGetAsyncError(comm, &async);
      }
      if (async != ncclSuccess && async != ncclInProgress)
        fail(op, "failed: " + nccl_error(async) + "; a peer rank exited or hung");
      if (Clock::now() > deadline)
        fail(op, fmt::format("timed out after {} ms: a peer rank exited or hung, or the ranks "
                             "called different operations",
                             timeout.count()));
      // Spin briefly (short collectives), then sleep so a long wait does not burn a core.
      if (spin > 1000) std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }

  ~NcclComm() {
    if (!comm) return;  // aborted
    // Finalize flushes outstanding work; if it does not settle in time, abort instead.
    ncclResult_t r = ncclCommFinalize(comm);
    auto deadline = Clock::now() + timeout;
    while (r == ncclInProgress && Clock::now() < deadline) {
      std::this_thread::yield();
      if (ncclCommGetAsyncError(comm, &r) != ncclSuccess) break;
    }
    if (r == ncclSuccess)
      ncclCommDestroy(comm);
    else
      ncclCommAbort(comm);
  }
};

namespace {

ncclDataType_t nccl_type(DType t, const char* op, const NcclComm& c) {
  switch (t) {
    case DType::f32: return ncclFloat32;
    case DType::f64: return ncclFloat64;
    case DType::bf16: return ncclBfloat16;
    case DType::f16: return ncclFloat16;
    case DType::i32: return ncclInt32;
    case DType::i64: return ncclInt64;
    default:
      MOP_FAIL("{}: {} does not support dtype {} (supported: F32, F64, BF16, F16, I32, I64)",
               c.where(), op, dtype_name(t));
  }
}

const char* at(const void* p, size_t elems, DType t) {
  return static_cast<const char*>(p) + elems * dtype_size(t);
}
char* at(void* p, size_t elems, DType t) { return static_cast<char*>(p) + elems * dtype_size(t); }

}  // namespace

// --------------------------------------------------------------------------------- NcclWork

NcclWork::NcclWork(std::shared_ptr<NcclComm> comm, const char* op)
    : comm_(std::move(comm)), op_(op) {
  DeviceScope g(comm_->device);
  MOP_CUDA_CHECK(cudaEventCreateWithFlags(&event_, cudaEventDisableTiming));
}

NcclWork::~NcclWork() {
  if (event_) cudaEventDestroy(event_);  // legal while pending: freed once it completes
}

void NcclWork::wait() { comm_->wait_event(op_, event_); }

bool NcclWork::done() { return cudaEventQuery(event_) == cudaSuccess; }

// -------------------------------------------------------------------------------- NcclGroup

NcclGroup::UniqueId NcclGroup::new_unique_id() {
  ncclUniqueId id;
  ncclResult_t r = ncclGetUniqueId(&id);
  MOP_CHECK(r == ncclSuccess, "ncclGetUniqueId failed: {}", ncclGetErrorString(r));
  UniqueId out;
  std::memcpy(out.data(), &id, sizeof id);
  return out;
}

NcclGroup::NcclGroup(int rank, int size, const UniqueId& id, int device, cudaStream_t stream,
                     const NcclOptions& opt)
    : comm_(std::make_shared<NcclComm>()) {
  NcclComm& c = *comm_;
  c.rank = rank;
  c.size = size;
  c.device = device;
  c.stream = stream;
  c.name = opt.name;
  c.timeout = opt.timeout;
  MOP_CHECK(size >= 1 && rank >= 0 && rank < size, "{}: rank {} / size {} invalid", c.where(),
            rank, size);
  MOP_CHECK(opt.timeout.count() > 0, "{}: timeout must be positive", c.where());
  DeviceScope g(device);
  ncclUniqueId uid;
  std::memcpy(&uid, id.data(), sizeof uid);
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;  // so that a missing rank is a timeout here, not a hang
  ncclResult_t r = ncclCommInitRankConfig(&c.comm, size, uid, rank, &config);
  if (r != ncclSuccess && r != ncclInProgress) {
    std::string err = c.nccl_error(r);
    if (c.comm) ncclCommAbort(c.comm);
    c.comm = nullptr;
    MOP_FAIL("{}: ncclCommInitRankConfig failed: {}", c.where(), err);
  }
  c.settle("initialisation (did every rank construct it with the same id?)", r);
  MOP_CUDA_CHECK(cudaMalloc(&barrier_word_, sizeof(float)));
  MOP_CUDA_CHECK(cudaMemset(barrier_word_, 0, sizeof(float)));  // 0 + 0: never overflows
}

NcclGroup::~NcclGroup() {
  if (barrier_word_) {
    DeviceScope g(comm_->device);
    cudaStreamSynchronize(comm_->stream);  // a pending op may still use the word
    cudaFree(barrier_word_);
  }
}

int NcclGroup::rank() const { return comm_->rank; }
int NcclGroup::size() const { return comm_->size; }
const std::string& NcclGroup::name() const { return comm_->name; }
int NcclGroup::device() const { return comm_->device; }
cudaStream_t NcclGroup::stream() const { return comm_->stream; }

template <class F> std::unique_ptr<NcclWork> NcclGroup::launch(const char* op, F&& fn) {
  NcclComm& c = *comm_;
  c.check_usable(op);
  DeviceScope g(c.device);
  auto work = std::make_unique<NcclWork>(comm_, op);
  c.settle(op, fn(c));
  MOP_CUDA_CHECK(cudaEventRecord(work->event(), c.stream));
  return work;
}

std::unique_ptr<DeviceWork> NcclGroup::enqueue_all_reduce_sum(void* data, size_t n, DType t) {
  const ncclDataType_t dt = nccl_type(t, "all_reduce_sum", *comm_);
  return launch("all_reduce_sum", [&](NcclComm& c) {
    return n ? ncclAllReduce(data, data, n, dt, ncclSum, c.comm, c.stream) : ncclSuccess;
  });
}

std::unique_ptr<DeviceWork> NcclGroup::enqueue_all_gather(const void* in, size_t n, void* out,
                                                      DType t) {
  const ncclDataType_t dt = nccl_type(t, "all_gather", *comm_);
  return launch("all_gather", [&](NcclComm& c) {
    return n ? ncclAllGather(in, out, n, dt, c.comm, c.stream) : ncclSuccess;
  });
}

std::unique_ptr<DeviceWork> NcclGroup::enqueue_reduce_scatter_sum(const void* in, void* out,
                                                              size_t n, DType t) {
  const ncclDataType_t dt = nccl_type(t, "reduce_scatter_sum", *comm_);
  return launch("reduce_scatter_sum", [&](NcclComm& c) {
    return n ? ncclReduceScatter(in, out, n, dt, ncclSum, c.comm, c.stream) : ncclSuccess;
  });
}

// One NCCL group of sends and receives: NCCL schedules them together, so no ordering of the
// pairs can deadlock. Zero counts are skipped.
std::unique_ptr<DeviceWork> NcclGroup::enqueue_all_to_all_v(const void* in,
                                                        const std::vector<size_t>& send_counts,
                                                        void* out,
                                                        const std::vector<size_t>& recv_counts,
                                                        DType t) {
  MOP_CHECK(int(send_counts.size()) == size() && int(recv_counts.size()) == size(),
            "{}: all_to_all_v needs {} send and recv counts, got {} and {}", comm_->where(),
            size(), send_counts.size(), recv_counts.size());
  const ncclDataType_t dt = nccl_type(t, "all_to_all_v", *comm_);
  return launch("all_to_all_v", [&](NcclComm& c) {
    ncclResult_t r = ncclGroupStart();
    if (r != ncclSuccess) return r;
    size_t so = 0, ro = 0;
    for (int p = 0; p < c.size && (r == ncclSuccess || r == ncclInProgress); ++p) {
      if (send_counts[size_t(p)])
        r = ncclSend(at(in, so, t), send_counts[size_t(p)], dt, p, c.comm, c.stream);
      if (recv_counts[size_t(p)] && (r == ncclSuccess || r == ncclInProgress))
        r = ncclRecv(at(out, ro, t), recv_counts[size_t(p)], dt, p, c.comm, c.stream);
      so += send_counts[size_t(p)];
      ro += recv_counts[size_t(p)];
    }
    ncclResult_t e = ncclGroupEnd();  // always closes the group, even after an error
    return (r == ncclSuccess || r == ncclInProgress) ? e : r;
  });
}

void NcclGroup::do_broadcast(void* data, size_t n, int root, DType t) {
  const ncclDataType_t dt = nccl_type(t, "broadcast", *comm_);
  run_blocking("broadcast", [&](NcclComm& c) {
    return n ? ncclBroadcast(data, data, n, dt, root, c.comm, c.stream) : ncclSuccess;
  });
}

void NcclGroup::do_send(const void* data, size_t n, int peer, int, DType t) {
  const ncclDataType_t dt = nccl_type(t, "send", *comm_);
  run_blocking("send", [&](NcclComm& c) {
    return n ? ncclSend(data, n, dt, peer, c.comm, c.stream) : ncclSuccess;
  });
}

void NcclGroup::do_recv(void* data, size_t n, int peer, int, DType t) {
  const ncclDataType_t dt = nccl_type(t, "recv", *comm_);
  run_blocking("recv", [&](NcclComm& c) {
    return n ? ncclRecv(data, n, dt, peer, c.comm, c.stream) : ncclSuccess;
  });
}

void NcclGroup::barrier() {
  run_blocking("barrier", [&](NcclComm& c) {
    return ncclAllReduce(barrier_word_, barrier_word_, 1, ncclFloat32, ncclSum, c.comm, c.stream);
  });
}

std::unique_ptr<NcclGroup> make_nccl_group(ProcessGroup& host, int device, cudaStream_t stream,
                                           const NcclOptions& opt) {
  static_assert(sizeof(NcclGroup::UniqueId) % sizeof(int64_t) == 0);
  constexpr size_t kWords = sizeof(NcclGroup::UniqueId) / sizeof(int64_t);
  int64_t words[kWords] = {};
  NcclGroup::UniqueId id{};
  if (host.rank() == 0) {
    id = NcclGroup::new_unique_id();
    std::memcpy(words, id.data(), sizeof id);
  }
  host.broadcast(words, kWords, 0);
  std::memcpy(id.data(), words, sizeof id);
  return std::make_unique<NcclGroup>(host.rank(), host.size(), id, device, stream, opt);
}

}  // namespace mop
