// Where this process sits in a multi-process run, and the single-node launcher.
//
// A rank learns (rank, world size, local rank, rendezvous address) from whichever launcher
// started it: `mop launch`, torchrun-style variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
// MASTER_PORT), Open MPI's mpirun (OMPI_COMM_WORLD_RANK, OMPI_COMM_WORLD_SIZE,
// OMPI_COMM_WORLD_LOCAL_RANK) or Slurm's srun (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID). With
// none of them it is rank 0 of 1.
#pragma once
#include <functional>
#include <string>
#include <vector>

namespace mop {

struct RankInfo {
  int rank = 0;
  int world = 1;
  int local_rank = 0;
  std::string launcher = "none";    // mop | torchrun | mpirun | srun | none
  std::string master_addr;          // rendezvous host (MASTER_ADDR; empty when not given)
  int master_port = 0;              // rendezvous port (MASTER_PORT; 0 when not given)
};

// getenv is a parameter so tests can supply an environment.
using EnvLookup = std::function<const char*(const char*)>;
RankInfo detect_rank(const EnvLookup& env);
RankInfo detect_rank();  // from this process's environment

struct LaunchOptions {
  int nproc = 1;
  std::string program;              // path of the mop binary to start
  std::vector<std::string> args;    // its arguments (the subcommand and its flags)
  std::string master_addr = "127.0.0.1";
  int master_port = 0;              // 0: pick a free port
  double kill_grace_s = 10;         // after one rank fails, SIGTERM the others, then SIGKILL after this
};

// Starts nproc copies of the program with RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE /
// MASTER_ADDR / MASTER_PORT set and waits. When a rank exits non-zero or is killed, the others
// are terminated; the error names the first rank that failed. Returns 0 when all succeed.
// `on_message` receives the launcher's own lines ("rank 1 exited with code 2; stopping the others").
int launch_local(const LaunchOptions& opt, const std::function<void(const std::string&)>& on_message);

int free_tcp_port();

}  // namespace mop
