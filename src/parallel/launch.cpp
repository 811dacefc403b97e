#include "parallel/launch.h"

#include <fmt/format.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <thread>

#include "core/error.h"

namespace mop {

namespace {
int to_int(const char* v, const char* name) {
  char* end = nullptr;
  long x = std::strtol(v, &end, 10);
  MOP_CHECK(end && *end == '\0' && end != v && x >= 0, "environment variable {}={} is not a non-negative integer",
            name, v);
  return int(x);
}
}  // namespace

RankInfo detect_rank(const EnvLookup& env) {
  RankInfo r;
  auto get = [&](const char* name) -> const char* { return env(name); };
  struct Scheme {
    const char* launcher;
    const char* rank;
    const char* world;
    const char* local;
  };
  // mop launch and torchrun set the same variables; MOP_LAUNCHER tells them apart for the log.
  const Scheme schemes[] = {{"torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK"},
                            {"mpirun", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"},
                            {"srun", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"}};
  for (const Scheme& s : schemes) {
    const char* rank = get(s.rank);
    const char* world = get(s.world);
    if (!rank || !world) continue;
    r.rank = to_int(rank, s.rank);
    r.world = to_int(world, s.world);
    const char* local = get(s.local);
    r.local_rank = local ? to_int(local, s.local) : r.rank;
    r.launcher = s.launcher;
    if (const char* m = get("MOP_LAUNCHER")) r.launcher = m;
    break;
  }
  MOP_CHECK(r.world >= 1 && r.rank < r.world, "rank {} is outside world size {} (launcher {})", r.rank, r.world,
            r.launcher);
  if (const char* a = get("MASTER_ADDR")) r.master_addr = a;
  if (const char* p = get("MASTER_PORT")) r.master_port = to_int(p, "MASTER_PORT");
  // Slurm and MPI do not define a rendezvous address; a multi-node job exports MASTER_ADDR itself.
  return r;
}

RankInfo detect_rank() {
  return detect_rank([](const char* n) -> const char* { return std::getenv(n); });
}

int free_tcp_port() {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  MOP_CHECK(fd >= 0, "socket(): {}", std::strerror(errno));
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = 0;  // the kernel picks a free port
  socklen_t len = sizeof a;
  const bool ok = ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0 &&
                  ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) == 0;
  ::close(fd);
  MOP_CHECK(ok, "could not find a free TCP port: {}", std::strerror(errno));
  return ntohs(a.sin_port);
}

int launch_local(const LaunchOptions& opt, const std::function<void(const std::string&)>& on_message) {
  MOP_CHECK(opt.nproc >= 1, "--nproc must be at least 1, got {}", opt.nproc);
  MOP_CHECK(!opt.program.empty(), "launch: no program to start");
  const int port = opt.master_port > 0 ? opt.master_port : free_tcp_port();
  std::vector<pid_t> pids(size_t(opt.nproc), -1);
  for (int r = 0; r < opt.nproc; ++r) {
    pid_t pid = ::fork();
    MOP_CHECK(pid >= 0, "fork(): {}", std::strerror(errno));
    if (pid == 0) {
      ::setenv("RANK", std::to_string(r).c_str(), 1);
      ::setenv("LOCAL_RANK", std::to_string(r).c_str(), 1);
      ::setenv("WORLD_SIZE", std::to_string(opt.nproc).c_str(), 1);
      ::setenv("LOCAL_WORLD_SIZE", std::to_string(opt.nproc).c_str(), 1);
      ::setenv("MASTER_ADDR", opt.master_addr.c_str(), 1);
      ::setenv("MASTER_PORT", std::to_string(port).c_str(), 1);
      ::setenv("MOP_LAUNCHER", "mop", 1);
      std::vector<char*> argv;
      argv.push_back(const_cast<char*>(opt.program.c_str()));
      for (const auto& a : opt.args) argv.push_back(const_cast<char*>(a.c_str()));
      argv.push_back(nullptr);
      ::execv(opt.program.c_str(), argv.data());
      std::fprintf(stderr, "error: cannot start %s: %s\n", opt.program.c_str(), std::strerror(errno));
      ::_exit(127);
    }
    pids[size_t(r)] = pid;
  }
  int first_failed = -1, exit_code = 0, alive = opt.nproc;
  auto deadline = std::chrono::steady_clock::time_point::max();
  while (alive > 0) {
    int status = 0;
    pid_t pid = ::waitpid(-1, &status, WNOHANG);
    if (pid == 0) {
      if (first_failed >= 0 && std::chrono::steady_clock::now() > deadline)
        for (pid_t p : pids)
          if (p > 0) ::kill(p, SIGKILL);
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
      continue;
    }
    if (pid < 0) break;
    int r = 0;
    while (r < opt.nproc && pids[size_t(r)] != pid) ++r;
    if (r == opt.nproc) continue;
    pids[size_t(r)] = -1;
    --alive;
    const int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    if (code != 0 && first_failed < 0) {
      first_failed = r;
      exit_code = code;
      on_message(WIFEXITED(status)
                     ? fmt::format("rank {} exited with code {}; stopping the other ranks", r, code)
                     : fmt::format("rank {} was killed by signal {}; stopping the other ranks", r, WTERMSIG(status)));
      for (pid_t p : pids)
        if (p > 0) ::kill(p, SIGTERM);
      deadline = std::chrono::steady_clock::now() +
                 std::chrono::milliseconds(int64_t(opt.kill_grace_s * 1000));
    }
  }
  if (first_failed >= 0) MOP_FAIL("rank {} of {} failed (exit code {})", first_failed, opt.nproc, exit_code);
  return 0;
}

}  // namespace mop
