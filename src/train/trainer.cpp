#include "train/trainer.h"

#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "core/strings.h"
#include "core/timer.h"
#include "data/tokenizer.h"
#include "optim/schedule.h"
#include "parallel/sharded_checkpoint.h"
#ifdef MOP_HAVE_NCCL
#include "parallel/cuda/nccl_group.h"
#endif
#include "parallel/world.h"
#include "parallel/zero.h"
#ifdef MOP_HAVE_CUDA
#include <cuda_runtime.h>

#include "model/cuda/gpu_decoder.h"
#include "parallel/cuda/device_group.h"
#include "parallel/cuda/skip_group.h"
#include "parallel/cuda/staged_group.h"
#include "ops/cuda/attention.h"
#include "ops/cuda/check.cuh"
#include "ops/cuda/runtime.h"
#include "train/cuda/step_trace.h"
#else
namespace mop {
class GpuDecoder {};  // never constructed without the CUDA backend; complete for unique_ptr
}  // namespace mop
#endif

namespace fs = std::filesystem;

namespace mop {

namespace {
// A byte-level model can emit any bytes: keep valid UTF-8 and newlines, escape the rest as \xNN
// so the sample never garbles a terminal or a log.
std::string printable(const std::string& s) {
  std::string out;
  for (size_t i = 0; i < s.size();) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    size_t len = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xe ? 3 : (c >> 3) == 0x1e ? 4 : 0;
    bool ok = len > 0 && i + len <= s.size() && (c >= 0x20 || c == '\n') && c != 0x7f;
    for (size_t k = 1; ok && k < len; ++k) ok = (static_cast<unsigned char>(s[i + k]) >> 6) == 0x2;
    if (ok) {
      out.append(s, i, len);
      i += len;
    } else {
      out += fmt::format("\\x{:02x}", c);
      i += 1;
    }
  }
  return out;
}
// Ranks sharing this node's cores: the launcher says (mop launch and torchrun, mpirun); else
// assume all ranks are here.
int local_world_size(const RankInfo& r) {
  for (const char* k : {"LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_NTASKS_PER_NODE"})
    if (const char* v = std::getenv(k)) {
      const int n = std::atoi(v);
      if (n > 0) return n;
    }
  return r.world;
}
}  // namespace

int configure_threads(int64_t requested, int local_ranks) {
  // Default: all cores up to 8, shared by the ranks on this node. The reference's GEMMs are small
  // and OpenMP's spinning threads contend with OpenBLAS's own pool: 16 threads ran the tiny
  // preset 3x slower than 2.
  int n = requested > 0 ? int(requested) : std::max(1, std::min(8, omp_get_num_procs() / std::max(1, local_ranks)));
  omp_set_num_threads(n);
  openblas_set_num_threads(n);
  return n;
}

std::string resolve_device(const std::string& requested, std::string* note) {
  int gpus = 0;
#ifdef MOP_HAVE_CUDA
  gpus = cuda::device_count();
#endif
  if (requested == "cuda") {
#ifndef MOP_HAVE_CUDA
    MOP_FAIL("device = cuda: this build has no CUDA backend (nvcc, cuDNN or the fetched headers were missing)");
#endif
    MOP_CHECK(gpus > 0, "device = cuda but no CUDA device is visible");
    return "cuda";
  }
  if (requested == "auto" && gpus > 0) return "cuda";
  return "cpu";
}

Trainer::Trainer(Config cfg, TrainOptions opt) : cfg_(std::move(cfg)), opt_(std::move(opt)) {
  std::string note;
  const std::string device = resolve_device(cfg_.device, &note);
  if (!note.empty()) log("note: " + note);
  MOP_CHECK(device == "cuda" || cfg_.train.checkpointing != "selective",
            "train.checkpointing = 'selective' is implemented on the GPU only (use full on the CPU)");
  MOP_CHECK(device == "cuda" || cfg_.train.trace.empty(),
            "train.trace records GPU activity: it needs device = cuda (device resolved to {})", device);
  rank_ = detect_rank();
  threads_ = configure_threads(cfg_.train.threads, local_world_size(rank_));
  if (cfg_.run.memory_limit_gib > 0)
    memory_tracker(Device::cpu).set_limit(size_t(cfg_.run.memory_limit_gib * double(1ull << 30)));

  const bool parallel = rank_.world > 1 || cfg_.parallel.zero > 0 || cfg_.parallel.ep > 1;
  const bool sharded_cpu = parallel && device == "cpu";  // a GPU layout keeps its state in the GpuDecoder
  if (parallel) setup_parallel(device);  // this rank's table: its experts only
  else table_ = build_param_table(cfg_.model, cfg_.train.decay_embeddings);
  params_ = HostArray<float>(size_t(table_.total), Mem::params);
  // Host gradients only for the single-rank CPU model; a GPU run keeps its gradients on the
  // device, a sharded run in its ZeRO units.
  if (device == "cpu" && !parallel) grads_ = HostArray<float>(size_t(table_.total), Mem::grads);
  OptimizerSettings os{cfg_.train.beta1, cfg_.train.beta2, cfg_.train.eps, cfg_.train.weight_decay, cfg_.train.clip};
  // A GPU run keeps its moments on the device: host moments exist only to load or save a checkpoint
  // (moe-7b: 45 GB of host memory otherwise).
  if (!sharded_cpu && (device == "cpu" || !opt_.resume.empty())) adamw_ = std::make_unique<AdamW>(table_, os);
  state_.rng_state = hash_seed(cfg_.train.seed, "sampling");

  data_ = make_run_data(cfg_);
  // Where the weights come from. Resuming a sharded checkpoint of this very layout reads this
  // rank's shard file only; any other checkpoint (single-rank, or another layout) is read whole
  // and each rank keeps its tensors and the moments of its part.
  std::string resume_dir;
  bool own_shards = false;
  if (!opt_.resume.empty()) {
    resume_dir = resolve_checkpoint(opt_.resume);
    own_shards = parallel && is_sharded_checkpoint(resume_dir) && sharded_checkpoint_layout(resume_dir) == shard_layout();
  }
  const bool whole = !resume_dir.empty() && !own_shards && (parallel || is_sharded_checkpoint(resume_dir));
  HostArray<float> resume_m, resume_v;
  int64_t resume_steps = 0;
  if (whole) {
    resume_m = HostArray<float>(size_t(table_.total), Mem::optimizer);
    resume_v = HostArray<float>(size_t(table_.total), Mem::optimizer);
    read_checkpoint_for_table(resume_dir, cfg_.model, cfg_.train.decay_embeddings, table_, params_.data(),
                              resume_m.data(), resume_v.data(), &state_, &resume_steps);
    if (is_sharded_checkpoint(resume_dir)) {
      const ShardLayout from = sharded_checkpoint_layout(resume_dir), to = shard_layout();
      log(fmt::format("resharding: checkpoint of world {} zero {} ep {} -> world {} zero {} ep {}", from.world,
                      from.zero, from.ep, to.world, to.zero, to.ep));
    }
  } else if (!resume_dir.empty() && !own_shards) {  // one rank, a single-rank checkpoint
    load_checkpoint(resume_dir, table_, params_.data(), adamw_.get(), &state_);
  } else if (resume_dir.empty() && !opt_.init_from.empty()) {
    const std::string dir = resolve_checkpoint(opt_.init_from);
    read_checkpoint_for_table(dir, cfg_.model, cfg_.train.decay_embeddings, table_, params_.data(), nullptr, nullptr,
                              nullptr, nullptr);
    log(fmt::format("initialised weights from {}", dir));
  } else if (resume_dir.empty()) {
    init_params(table_, params_.data(), cfg_.train.seed);  // seeded per tensor name: the same on any layout
  }
  auto resumed = [&] {
    if (resume_dir.empty()) return;
    data_.train->set_cursor(state_.cursor);
    log(fmt::format("resumed from {} at step {}", resume_dir, state_.step));
  };

  if (sharded_cpu) {
    zero_ = std::make_unique<ZeroParams>(table_, cfg_.model, int(cfg_.parallel.zero), *groups_->world,
                                         *groups_->edp, os);
    zero_->load_full(params_.data());
    if (whole) {
      zero_->set_full_moments(resume_m.data(), resume_v.data());
      zero_->set_steps_taken(resume_steps);
    }
    params_ = HostArray<float>();  // the ZeRO units hold the weights now
    if (own_shards) load_sharded_checkpoint(resume_dir, shard_layout(), *zero_, *groups_->world, &state_);
    resumed();
    model_ = std::make_unique<Decoder<float>>(cfg_.model, table_);
    model_->bind(zero_.get());
    model_->set_moe_comm(MoeComm{groups_->ep.get(), groups_->world.get(),
                                 cfg_.parallel.ep_balance ? &balance_ : nullptr});
    return;
  }
  if (own_shards) {  // a multi-GPU run of the same layout: the GPU decoder reads its own shard file below
    adamw_.reset();
  } else if (whole) {
    std::memcpy(adamw_->m(), resume_m.data(), sizeof(float) * size_t(table_.total));
    std::memcpy(adamw_->v(), resume_v.data(), sizeof(float) * size_t(table_.total));
    adamw_->set_steps_taken(resume_steps);
  }
  if (!own_shards) resumed();
  model_ = std::make_unique<Decoder<float>>(cfg_.model, table_);
  model_->bind(params_.data(), grads_.empty() ? nullptr : grads_.data());
#ifdef MOP_HAVE_CUDA
  if (device == "cuda") {
    cuda::AttentionOptions ao = cuda::attention_options();
    ao.deterministic_backward = cfg_.train.deterministic;
    cuda::set_attention_options(ao);
    GpuDecoderOptions go;
    const std::string& ck = cfg_.train.checkpointing;
    go.recompute = ck == "full" ? GpuRecompute::full : ck == "selective" ? GpuRecompute::selective : GpuRecompute::none;
    // bf16 gradients when a step has one micro-batch: each gradient is then rounded to bf16 exactly
    // once, as PyTorch's bf16 autograd gradients are; accumulating several micro-batches keeps fp32.
    go.bf16_grads = cfg_.train.grad_accum == 1;
    go.zero = int(cfg_.parallel.zero);
    go.timing = cfg_.train.timing;
    go.ep_overlap = cfg_.parallel.ep_overlap;
    go.ep_balance = cfg_.parallel.ep_balance;
    go.balance.min_rows = cfg_.parallel.ep_balance_min_rows;
    go.balance.max_guests = int(cfg_.parallel.ep_balance_max_guests);
    if (parallel) {  // one GPU per local rank (NCCL), or ranks sharing GPUs (collectives staged through the host)
      const int gpus = cuda::device_count();
      const bool may_share = cfg_.parallel.gpu_comm != "nccl";  // host or skip: no NCCL communicator
      MOP_CHECK(may_share || rank_.local_rank < gpus,
                "rank {} has local rank {} but {} GPU(s) are visible: NCCL needs one GPU per rank on each node "
                "(parallel.gpu_comm = host lets ranks share a GPU, slowly)",
                rank_.rank, rank_.local_rank, gpus);
      MOP_CUDA_CHECK(cudaSetDevice(rank_.local_rank % gpus));
    }
    gpu_ = std::make_unique<GpuDecoder>(cfg_.model, table_, go);
    if (parallel) setup_gpu_comm();  // before upload: the state's layout follows the groups
    gpu_->upload_params(params_.data());
    if (own_shards) {
      load_sharded_checkpoint(resume_dir, shard_layout(), *gpu_, *groups_->world, &state_);
      gpu_->download_params(params_.data());  // the host's copy: the router bias lives there
      resumed();
    } else if (adamw_) {  // resumed: the checkpoint's moments move to the device
      gpu_->upload_moments(adamw_->m(), adamw_->v());
      gpu_->set_steps_taken(adamw_->steps_taken());
      adamw_.reset();
    }
  }
#else
  (void)device;
#endif
}

#ifdef MOP_HAVE_CUDA
struct Trainer::GpuGroups {
  std::unique_ptr<DeviceGroup> world, ep, edp, ep_side;
};
#else
struct Trainer::GpuGroups {};
#endif

Trainer::~Trainer() = default;

void Trainer::setup_gpu_comm() {
#ifdef MOP_HAVE_CUDA
  gpu_groups_ = std::make_unique<GpuGroups>();
  int device = 0;
  MOP_CUDA_CHECK(cudaGetDevice(&device));
  const bool staged = cfg_.parallel.gpu_comm == "host", skip = cfg_.parallel.gpu_comm == "skip";
  if (staged) log("parallel.gpu_comm = host: device collectives are staged through host memory and Gloo (slow)");
  if (skip) log("parallel.gpu_comm = skip: device collectives do nothing (timing only; the results are wrong)");
  // Every rank creates the same groups in the same order; each is collective over its host group.
  // The dense and expert-replica groups run on the decoder's comm stream, the expert exchange on
  // its compute stream.
  auto make = [&](ProcessGroup& host, const char* name, cudaStream_t stream) -> std::unique_ptr<DeviceGroup> {
    if (host.size() == 1) return nullptr;
    if (staged)  // on its own host group: its worker thread runs the collectives
      return std::make_unique<StagedGroup>(groups_->twin(host, fmt::format("staged_{}", name)), device, stream, name,
                                           std::chrono::milliseconds(int64_t(cfg_.parallel.timeout_s * 1000)));
    if (skip) return std::make_unique<SkipGroup>(host.rank(), host.size(), device, stream, name);
#ifdef MOP_HAVE_NCCL
    NcclOptions o;
    o.timeout = std::chrono::milliseconds(int64_t(cfg_.parallel.timeout_s * 1000));
    o.name = fmt::format("nccl {}", name);
    return make_nccl_group(host, device, stream, o);
#else
    MOP_FAIL("this build has no NCCL");
#endif
  };
  gpu_groups_->world = make(*groups_->world, "world", gpu_->comm_stream());
  gpu_groups_->ep = make(*groups_->ep, "ep", gpu_->stream());
  gpu_groups_->edp = make(*groups_->edp, "edp", gpu_->comm_stream());
  // parallel.ep_balance: the ep ranks again, on the side stream that lends the experts' weights
  // beside the exchange (its own communicator, so the two run concurrently).
  if (cfg_.parallel.ep_balance) gpu_groups_->ep_side = make(*groups_->ep, "ep_side", gpu_->side_stream());
  gpu_->set_comm(GpuComm{groups_->world.get(), groups_->ep.get(), gpu_groups_->world.get(), gpu_groups_->ep.get(),
                         gpu_groups_->edp.get(), gpu_groups_->ep_side.get()});
#endif
}

ShardLayout Trainer::shard_layout() const {
  return ShardLayout{rank_.world, int(cfg_.parallel.zero), int(cfg_.parallel.ep)};
}

void Trainer::setup_parallel(const std::string& device) {
  const ParallelConfig& pc = cfg_.parallel;
  const int world = rank_.world, ep = int(pc.ep), zero = int(pc.zero);
#ifndef MOP_HAVE_NCCL
  MOP_CHECK(device == "cpu" || pc.gpu_comm == "host",
            "a multi-GPU layout needs NCCL, which this build does not have (parallel.gpu_comm = host stages "
            "through Gloo)");
#endif
  MOP_CHECK(pc.world == 0 || pc.world == world, "parallel.world = {} but the launcher started {} ranks", pc.world,
            world);
  MOP_CHECK(world % ep == 0, "parallel.ep = {} does not divide the world size {} (world = ep x expert replicas)", ep,
            world);
  MOP_CHECK(cfg_.train.batch % world == 0,
            "train.batch = {} sequences per micro-batch (the global batch) cannot be split evenly over {} "
            "data-parallel ranks",
            cfg_.train.batch, world);
  balance_.min_rows = pc.ep_balance_min_rows;
  balance_.max_guests = int(pc.ep_balance_max_guests);
  groups_ = std::make_unique<Groups>(
      make_groups(rank_, ep, std::chrono::milliseconds(int64_t(pc.timeout_s * 1000))));
  const int El = int(cfg_.model.experts) / ep;
  table_ = build_param_table(cfg_.model, cfg_.train.decay_embeddings, ExpertRange{groups_->ep->rank() * El, El});
  cfg_.parallel.world = world;  // the run's config records the layout it ran with
  log(fmt::format("layout: world {} (data parallel {}), zero {}, ep {} x {} expert replicas, experts {}..{} on rank "
                  "0's expert group, {} sequences per rank per micro-batch{}",
                  world, world, zero, ep, world / ep, 0, El - 1, cfg_.train.batch / world,
                  pc.ep_balance && ep > 1
                      ? fmt::format(", least-loaded balancing (blocks of {}+ pairs, {} guest experts a layer)",
                                    pc.ep_balance_min_rows, pc.ep_balance_max_guests)
                      : std::string()));
}

void Trainer::sum_over_ranks(double* v, size_t n) {
  if (groups_ && groups_->world->size() > 1) groups_->world->all_reduce_sum(v, n);
}
void Trainer::sum_over_ranks(int64_t* v, size_t n) {
  if (groups_ && groups_->world->size() > 1) groups_->world->all_reduce_sum(v, n);
}

void Trainer::next_part(data::Loader& loader, data::Batch& b) {
  const int rows = int(cfg_.train.batch);
  if (!groups_) return loader.next_batch(rows, b);
  const int per = rows / rank_.world;
  loader.next_batch(rows, b, rank_.rank * per, per);
}

std::string Trainer::save_checkpoint_now(const std::string& run_dir) {
  const TrainConfig& tc = cfg_.train;
  if (zero_)
    return save_sharded_run_checkpoint(run_dir, tc.keep_checkpoints, cfg_, shard_layout(), *zero_, *groups_->world,
                                       state_);
#ifdef MOP_HAVE_CUDA
  if (gpu_ && groups_)  // each rank writes its shards straight from the device
    return save_sharded_run_checkpoint(run_dir, tc.keep_checkpoints, cfg_, shard_layout(), *gpu_, *groups_->world,
                                       state_);
#endif
  sync_from_gpu(/*moments=*/true);
  std::string dir = save_run_checkpoint(run_dir, tc.keep_checkpoints, cfg_, table_, params_.data(), *adamw_, state_);
  if (gpu_) adamw_.reset();  // a GPU run's host moments live only while a checkpoint is written
  return dir;
}

void Trainer::sync_from_gpu(bool moments) {
#ifdef MOP_HAVE_CUDA
  if (!gpu_) return;
  gpu_->download_params(params_.data());
  if (!moments) return;
  if (!adamw_) {
    const TrainConfig& t = cfg_.train;
    adamw_ = std::make_unique<AdamW>(table_, OptimizerSettings{t.beta1, t.beta2, t.eps, t.weight_decay, t.clip});
  }
  gpu_->download_moments(adamw_->m(), adamw_->v());
  adamw_->set_steps_taken(gpu_->steps_taken());
#else
  (void)moments;
#endif
}

LossStats Trainer::micro_step(const data::Batch& mb, float ce_scale, float lb_scale, Recompute rc) {
#ifdef MOP_HAVE_CUDA
  if (gpu_) return gpu_->forward_backward(token_batch(mb), ce_scale, lb_scale);
#endif
  return model_->forward_backward(token_batch(mb), ce_scale, lb_scale, rc);
}

double Trainer::optimizer_step(double lr) {
#ifdef MOP_HAVE_CUDA
  if (gpu_) {
    const TrainConfig& t = cfg_.train;
    return gpu_->optimizer_step(lr, t.beta1, t.beta2, t.eps, t.weight_decay, t.clip);
  }
#endif
  if (zero_) return zero_->step(lr);
  return adamw_->step(params_.data(), grads_.data(), lr);
}

void Trainer::log(const std::string& line) const {
  if (opt_.quiet || rank_.rank != 0) return;
  fmt::print("{}\n", line);
  std::fflush(stdout);
}

double Trainer::evaluate() {
  if (!data_.val) return -1;
  data_.val->set_cursor({});
  data::Batch b;
  double sum = 0;
  int64_t tokens = 0;
  for (int64_t i = 0; i < cfg_.train.eval_batches; ++i) {
    next_part(*data_.val, b);
#ifdef MOP_HAVE_CUDA
    LossStats st = gpu_ ? gpu_->forward_loss(token_batch(b)) : model_->forward_loss(token_batch(b));
#else
    LossStats st = model_->forward_loss(token_batch(b));
#endif
    sum += st.ce_sum;
    tokens += st.ce_tokens;
  }
  sum_over_ranks(&sum, 1);
  sum_over_ranks(&tokens, 1);
  return tokens ? sum / double(tokens) : -1;
}

std::string Trainer::generate(const std::string& prompt, int n_tokens, double temperature, Rng& rng) {
  data::ByteTokenizer tok;
  std::vector<int32_t> ids{data::kBos};
  for (int32_t t : tok.encode(prompt)) ids.push_back(t);
  const int V = int(cfg_.model.vocab_size), T = int(cfg_.train.seq_len);
  std::vector<float> logits(static_cast<size_t>(V));
  std::vector<int32_t> pos, cu(2);
  for (int i = 0; i < n_tokens; ++i) {
    const int start = std::max(0, int(ids.size()) - T);
    const int N = int(ids.size()) - start;
    pos.resize(size_t(N));
    for (int p = 0; p < N; ++p) pos[size_t(p)] = p;
    cu[0] = 0, cu[1] = N;
    TokenBatch b{N, ids.data() + start, nullptr, pos.data(), cu.data(), 1};
    model_->logits_at(b, N - 1, logits.data());
    int32_t next = 0;
    // Only bytes and EOS are sensible continuations.
    const int usable = std::min(V, int(data::kEos) + 1);
    if (temperature <= 0) {
      next = int32_t(std::max_element(logits.begin(), logits.begin() + usable) - logits.begin());
    } else {
      double mx = *std::max_element(logits.begin(), logits.begin() + usable), z = 0;
      std::vector<double> p(static_cast<size_t>(usable));
      for (int v = 0; v < usable; ++v) z += p[size_t(v)] = v == data::kBos ? 0 : std::exp((logits[size_t(v)] - mx) / temperature);
      double r = rng.uniform() * z;
      for (next = 0; next < usable - 1 && (r -= p[size_t(next)]) > 0; ++next) {
      }
    }
    if (next == data::kEos) break;
    ids.push_back(next);
  }
  std::vector<int32_t> out(ids.begin() + 1, ids.end());
  return tok.decode(out);
}

void Trainer::update_router_bias(const LossStats& st) {
  // Aux-loss-free balancing (DeepSeek-V3): nudge each expert's selection bias towards the
  // mean load. Not a gradient step; the bias is a buffer saved with the weights.
  if (cfg_.model.router != "sigmoid") return;
  const int64_t E = cfg_.model.experts;
  // The counts are global (summed over the data-parallel ranks), so every rank makes the same
  // change. The bias is a buffer the host owns (the GPU never changes it): nothing to download.
  for (const auto& p : table_.params) {
    if (p.role != ParamRole::router_bias) continue;
    const int64_t* cnt = st.counts.data() + size_t(p.layer) * E;
    double mean = 0;
    for (int64_t e = 0; e < E; ++e) mean += double(cnt[e]);
    mean /= double(E);
    auto nudge = [&](int64_t e, float& b) {
      const double d = mean - double(cnt[e]);
      b += float(cfg_.model.bias_update_rate * double((d > 0) - (d < 0)));
    };
    if (zero_) {
      zero_->update_buffer(p, nudge);
    } else {
      for (int64_t e = 0; e < E; ++e) nudge(e, params_[size_t(p.offset + e)]);
    }
  }
#ifdef MOP_HAVE_CUDA
  if (gpu_) gpu_->upload_buffers(params_.data());
#endif
}

TrainResult Trainer::run() {
  const TrainConfig& tc = cfg_.train;
  const std::string run_dir = cfg_.run_dir();
  MetricsLog metrics;
  if (!opt_.bench && rank_.rank == 0) {
    fs::create_directories(run_dir);
    std::ofstream f(fs::path(run_dir) / "config.toml");
    f << cfg_.to_toml();
    metrics.open((fs::path(run_dir) / "metrics.jsonl").string(), !opt_.resume.empty());
  }

  const ModelCounts counts = model_counts(cfg_.model);
  const double flops_per_token = model_flops_per_token(cfg_.model, tc.seq_len);
  const double peak = peak_flops(tc.peak_tflops, gpu_ != nullptr, threads_);
  const Device mem_dev = gpu_ ? Device::cuda : Device::cpu;
  log(fmt::format("model {}: {} params ({} active matmul), {} layers, hidden {}, {} experts top-{}",
                  cfg_.model.preset, human_count(double(counts.total)), human_count(double(counts.active_matmul)),
                  cfg_.model.layers, cfg_.model.hidden, cfg_.model.experts, cfg_.model.top_k));
  log(fmt::format("data {}", data_.description));
  if (data_.unigram_entropy >= 0) log(fmt::format("unigram entropy of the training tokens: {:.4f} nats", data_.unigram_entropy));
  std::string dev = fmt::format("cpu ({} threads)", threads_);
#ifdef MOP_HAVE_CUDA
  if (gpu_) dev = fmt::format("cuda: {}", cuda::device_description());
#endif
  log(fmt::format("device {}, {} steps x {} micro-batches x {} x {} tokens, run dir {}", dev, tc.steps, tc.grad_accum,
                  tc.batch, tc.seq_len, run_dir));

  TrainResult res;
  res.unigram_entropy = data_.unigram_entropy;
  res.flops_per_token = flops_per_token;
  res.peak_flops = peak;
  res.device = gpu_ ? "cuda" : "cpu";
  res.world = rank_.world, res.rank = rank_.rank;
  const Recompute rc = tc.checkpointing == "full" ? Recompute::full : Recompute::none;
  const int64_t moe_layers = std::max<int64_t>(1, cfg_.model.moe_layers());
  const float lb_scale = float(cfg_.model.lb_coef / double(moe_layers * tc.grad_accum));
  std::vector<data::Batch> micro(size_t(tc.grad_accum));
  Timer wall;
  double train_time = 0;
#ifdef MOP_HAVE_CUDA
  // train.trace: one step's timeline, on rank 0 or, with "{rank}" in the path, on every rank.
  const bool trace_here = !tc.trace.empty() && (rank_.rank == 0 || tc.trace.find("{rank}") != std::string::npos);
  const int64_t trace_at = trace_here ? tc.traced_step() : -1;
  StepTrace trace;
  if (trace_here && trace_at <= state_.step)
    log(fmt::format("note: train.trace_step {} is before the resumed step {}: no trace", trace_at, state_.step + 1));
#endif

  MOP_CHECK(opt_.skip_comm_steps == 0 || (opt_.bench && gpu_ && tc.steps > 0),
            "steps with the communication skipped are for GPU benchmarks after at least one real step");
  std::vector<int64_t> recorded_counts;  // the last real step's expert counts, which skipped steps replay
  while (state_.step < tc.steps + opt_.skip_comm_steps) {
    const bool skipping = state_.step >= tc.steps;
#ifdef MOP_HAVE_CUDA
    if (opt_.skip_comm_steps > 0 && state_.step + 1 == tc.steps) gpu_->record_routing(true);
    if (skipping && !gpu_->comm_skipped()) {
      gpu_->skip_comm();
      log(fmt::format("{} more steps with every device collective skipped and the last step's routing replayed "
                      "(timing only)", opt_.skip_comm_steps));
    }
    const bool tracing = gpu_ && state_.step + 1 == trace_at;
    if (tracing) {
      gpu_->synchronize();  // the previous step's work stays out of the recording
      trace.start();
    }
#endif
    Timer step_timer;
    const double lr = lr_at(state_.step, tc.steps, tc.warmup, tc.lr, tc.min_lr_ratio, tc.schedule);
#ifdef MOP_HAVE_CUDA
    if (gpu_) gpu_->zero_grads();
#endif
    // The host gradients exist only for the CPU model (zeroing 4 bytes per parameter on the host
    // every step was 83% of the GPU step on moe-1b: 354 ms -> 61 ms without it).
    if (zero_) zero_->begin_step();
    else if (!gpu_) std::fill(grads_.data(), grads_.data() + grads_.size(), 0.f);
    // All micro-batches first: the loss is the mean over every target token of the step, on
    // all ranks.
    int64_t step_targets = 0;
    for (auto& mb : micro) {
      next_part(*data_.train, mb);
      for (int32_t t : mb.targets) step_targets += t >= 0;
    }
    sum_over_ranks(&step_targets, 1);
    LossStats st;
    const float ce_scale = 1.f / float(std::max<int64_t>(1, step_targets));
    for (size_t i = 0; i < micro.size(); ++i) {
      if (zero_) zero_->set_reduce_on_release(i + 1 == micro.size());  // reduce once per step
#ifdef MOP_HAVE_CUDA
      if (gpu_) gpu_->set_last_micro_batch(i + 1 == micro.size());
#endif
      st.add(micro_step(micro[i], ce_scale, lb_scale, rc));
    }
    // The load-balancing loss and expert counts are already global (MoeComm::dp).
    sum_over_ranks(&st.ce_sum, 1);
    sum_over_ranks(&st.ce_tokens, 1);
    const double gnorm = optimizer_step(lr);
    update_router_bias(st);
    ++state_.step;
    state_.cursor = data_.train->cursor();
    const int64_t step_tokens = tc.grad_accum * tc.batch * tc.seq_len;  // global
    state_.tokens_seen += step_tokens;
#ifdef MOP_HAVE_CUDA
    if (gpu_) gpu_->synchronize();  // the step's time includes its GPU work
#endif
    const double dt = step_timer.seconds();
#ifdef MOP_HAVE_CUDA
    if (tracing) {
      std::string path = tc.trace;
      if (const size_t at = path.find("{rank}"); at != std::string::npos) path.replace(at, 6, std::to_string(rank_.rank));
      const size_t n = trace.stop_and_write(path, fmt::format("rank {}", rank_.rank));
      log(fmt::format("trace: step {}, {} events -> {} (open in ui.perfetto.dev)", state_.step, n, path));
    }
#endif
    if (skipping) {
#ifdef MOP_HAVE_CUDA
      res.skip_step_seconds.push_back(dt);
      res.skip_phase_ms.push_back(gpu_->take_phase_ms());
#endif
      res.skip_routing_matches = res.skip_routing_matches && st.counts == recorded_counts;
      log(fmt::format("step {} (communication skipped) | {:.1f} ms, routing {}", state_.step, dt * 1e3,
                      st.counts == recorded_counts ? "as recorded" : "DIFFERS from the recorded step"));
      continue;
    }
    if (state_.step == tc.steps) recorded_counts = st.counts;
    res.step_seconds.push_back(dt);
    res.tokens_per_step = step_tokens;
    train_time += dt;

    StepMetrics m;
    m.step = state_.step;
    m.steps = tc.steps;
    m.loss = st.ce_sum / double(std::max<int64_t>(1, st.ce_tokens));
    m.aux_loss = st.lb_sum / double(moe_layers * tc.grad_accum);
    m.lr = lr;
    m.grad_norm = gnorm;
    m.tokens_per_s = double(step_tokens) / dt / double(rank_.world);  // per rank, like the MFU
    m.tflops = flops_per_token * m.tokens_per_s / 1e12;
    m.mfu = flops_per_token * m.tokens_per_s / peak;
    m.mem_gib = double(memory_tracker(mem_dev).peak_total()) / double(1ull << 30);
    m.tokens = state_.tokens_seen;
    m.elapsed_s = state_.elapsed_s + train_time;
    m.eta_s = train_time / double(res.losses.size() + 1) * double(tc.steps - state_.step);
#ifdef MOP_HAVE_CUDA
    if (gpu_) m.phase_ms = gpu_->take_phase_ms();
#endif
    if (st.ep_load.mean > 0) {
      m.ep_load = st.ep_load.max / st.ep_load.mean, m.ep_load_unbalanced = st.ep_load.max_unbalanced / st.ep_load.mean;
      m.ep_guest_pairs = st.ep_load.guest_pairs;
      res.ep_load.push_back(m.ep_load), res.ep_load_unbalanced.push_back(m.ep_load_unbalanced);
      res.ep_guest_pairs.push_back(m.ep_guest_pairs);
    }
    if (!m.phase_ms.empty()) res.phase_ms.push_back(m.phase_ms);
    if (!std::isfinite(m.loss)) MOP_FAIL("loss is {} at step {}: training diverged", m.loss, state_.step);
    res.losses.push_back(m.loss);

    const bool last = state_.step == tc.steps;
    if (tc.eval_every > 0 && (state_.step % tc.eval_every == 0 || last) && data_.val) {
      m.eval_loss = evaluate();
#ifdef MOP_HAVE_CUDA
      if (gpu_) gpu_->take_phase_ms();  // the evaluation's marks are no step's phases
#endif
      res.final_eval_loss = *m.eval_loss;
    }
    metrics.write(m);
    if (state_.step % tc.log_every == 0 || state_.step == 1 || last || m.eval_loss) log(progress_line(m));
    if (!opt_.bench && ((tc.save_every > 0 && state_.step % tc.save_every == 0) || last)) {
      state_.elapsed_s += train_time;
      train_time = 0;
      res.last_checkpoint = save_checkpoint_now(run_dir);
    }
  }
  if (!opt_.bench && res.last_checkpoint.empty() && tc.steps > 0 && state_.step == tc.steps)
    res.last_checkpoint = resolve_checkpoint(run_dir);
  // train.steps = 0 writes the initial weights: one starting point for runs that must share it
  // (parity between layouts, ablations).
  if (!opt_.bench && tc.steps == 0 && state_.step == 0) {
    res.last_checkpoint = save_checkpoint_now(run_dir);
    log("checkpoint: " + res.last_checkpoint);
  }

  if (!opt_.bench) sync_from_gpu(/*moments=*/false);  // sampling runs on the CPU model over the final weights
  bool can_sample = !(gpu_ && groups_ && cfg_.parallel.ep > 1);  // no rank holds every expert
  if (zero_ && !opt_.bench && tc.sample_tokens > 0) {
    // Every rank gathers the weights and samples the same text (rank 0 prints it); with expert
    // parallelism no rank holds every expert, so there is no sample.
    can_sample = cfg_.parallel.ep == 1;
    if (can_sample) {
      params_ = HostArray<float>(size_t(table_.total), Mem::params);
      zero_->gather_full(params_.data());
      model_->bind(params_.data(), nullptr);
      model_->set_moe_comm(MoeComm{});
    } else {
      log(fmt::format("sample: skipped (experts are split over {} ranks)", cfg_.parallel.ep));
    }
  }
  if (!opt_.bench && can_sample && tc.sample_tokens > 0 && cfg_.model.vocab_size >= data::kByteVocab) {
    Rng rng(state_.rng_state);
    res.sample = generate("Once upon a time", int(tc.sample_tokens), tc.sample_temperature, rng);
    log("sample: " + printable(res.sample));
  }
  if (!res.losses.empty()) {
    std::string summary = fmt::format("done: {} steps in {}, final loss {:.4f}", res.losses.size(),
                                      human_seconds(wall.seconds()), res.losses.back());
    if (res.final_eval_loss >= 0) summary += fmt::format(", eval loss {:.4f}", res.final_eval_loss);
    if (data_.unigram_entropy >= 0)
      summary += fmt::format(" (unigram entropy {:.4f} nats)", data_.unigram_entropy);
    summary += fmt::format(", peak {} memory: {}", device_name(mem_dev), memory_tracker(mem_dev).breakdown());
    log(summary);
    if (!res.last_checkpoint.empty()) log("checkpoint: " + res.last_checkpoint);
  }
  return res;
}

}  // namespace mop
