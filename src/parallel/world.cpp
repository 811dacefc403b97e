#include "parallel/world.h"

#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <string>

#include "core/error.h"
#include "parallel/solo_group.h"
#ifdef MOP_HAVE_GLOO
#include <gloo/rendezvous/file_store.h>

#include "parallel/gloo_group.h"
#include "parallel/tcp_store.h"
#endif

namespace mop {

GroupLayout group_layout(int rank, int world, int ep) {
  MOP_CHECK(world >= 1 && rank >= 0 && rank < world, "rank {} is outside world size {}", rank,
            world);
  MOP_CHECK(ep >= 1 && world % ep == 0,
            "ep={} does not divide world={} (expert-parallel groups are blocks of ep ranks)", ep,
            world);
  GroupLayout l;
  l.ep_group = rank / ep;
  l.edp_group = rank % ep;
  for (int i = 0; i < ep; ++i) l.ep_ranks.push_back(l.ep_group * ep + i);
  for (int w = l.edp_group; w < world; w += ep) l.edp_ranks.push_back(w);
  return l;
}

#ifdef MOP_HAVE_GLOO
namespace {

bool is_loopback(const std::string& host) {
  return host.rfind("127.", 0) == 0 || host == "localhost" || host == "::1";
}

struct Rendezvous {
  std::shared_ptr<gloo::rendezvous::Store> store;
  GlooOptions base;  // hostname / iface / timeout shared by the groups
};

Rendezvous open_rendezvous(const RankInfo& r, std::chrono::milliseconds timeout) {
  Rendezvous rv;
  rv.base.timeout = timeout;
  const char* dir = std::getenv("MOP_STORE_DIR");
  bool local;
  if (!r.master_addr.empty() && r.master_port > 0) {
    rv.store = make_tcp_store(r.master_addr, r.master_port, r.rank == 0, timeout);
    local = is_loopback(r.master_addr);
  } else if (dir && *dir) {
    MOP_CHECK(std::filesystem::is_directory(dir), "MOP_STORE_DIR={} is not a directory", dir);
    rv.store = std::make_shared<gloo::rendezvous::FileStore>(dir);
    local = true;
  } else {
    MOP_FAIL("rank {} of {} (launcher {}): no rendezvous for the process groups: set "
             "MASTER_ADDR and MASTER_PORT (rank 0 serves the store there; `mop launch` sets "
             "both) or MOP_STORE_DIR (a fresh directory all ranks can see)",
             r.rank, r.world, r.launcher);
  }
  if (const char* iface = std::getenv("GLOO_SOCKET_IFNAME"); iface && *iface) {
    rv.base.iface = iface;
  } else if (!local) {
    char host[256] = {};
    MOP_CHECK(::gethostname(host, sizeof host - 1) == 0, "gethostname failed");
    rv.base.hostname = host;
  }
  return rv;
}

std::unique_ptr<ProcessGroup> make_group(const Rendezvous& rv, const std::string& name,
                                         const std::vector<int>& ranks, int world_rank) {
  int me = -1;
  for (size_t i = 0; i < ranks.size(); ++i)
    if (ranks[i] == world_rank) me = int(i);
  MOP_ASSERT(me >= 0);
  if (ranks.size() == 1) return std::make_unique<SoloGroup>(name);
  GlooOptions o = rv.base;
  o.store = rv.store;
  o.prefix = name;
  o.name = name;
  o.global_ranks = ranks;
  return std::make_unique<GlooGroup>(me, int(ranks.size()), o);
}

}  // namespace
#endif  // MOP_HAVE_GLOO

Groups make_groups(const RankInfo& r, int ep, std::chrono::milliseconds timeout) {
  const GroupLayout l = group_layout(r.rank, r.world, ep);
  MOP_CHECK(timeout.count() > 0, "make_groups: timeout must be positive, got {} ms",
            timeout.count());
  Groups g;
  g.layout = l;
  g.rank = r.rank;
  if (r.world == 1) {
    g.world = std::make_unique<SoloGroup>("world");
    g.ep = std::make_unique<SoloGroup>("ep0");
    g.edp = std::make_unique<SoloGroup>("edp0");
    return g;
  }
#ifdef MOP_HAVE_GLOO
  auto kept = std::make_shared<Rendezvous>(open_rendezvous(r, timeout));
  const Rendezvous& rv = *kept;
  g.store = kept;
  std::vector<int> all(size_t(r.world));
  for (int i = 0; i < r.world; ++i) all[size_t(i)] = i;
  // Same order on every rank; each rendezvous waits only on its own members, who reach it
  // after the same earlier steps, so no cycle of waits.
  g.world = make_group(rv, "world", all, r.rank);
  g.ep = make_group(rv, "ep" + std::to_string(l.ep_group), l.ep_ranks, r.rank);
  g.edp = make_group(rv, "edp" + std::to_string(l.edp_group), l.edp_ranks, r.rank);
  g.world->barrier();
  return g;
#else
  (void)l;
  MOP_FAIL("rank {} of {}: this build has no Gloo, so it cannot run more than one rank", r.rank,
           r.world);
#endif
}

std::unique_ptr<ProcessGroup> Groups::twin(const ProcessGroup& of, const std::string& tag) const {
  const std::string name = of.name() + "." + tag;
  if (of.size() == 1) return std::make_unique<SoloGroup>(name);
#ifdef MOP_HAVE_GLOO
  MOP_CHECK(store, "Groups::twin: no rendezvous (a world of 1 has only groups of size 1)");
  std::vector<int> ranks;
  if (&of == world.get()) {
    for (int i = 0; i < of.size(); ++i) ranks.push_back(i);
  } else if (&of == ep.get()) {
    ranks = layout.ep_ranks;
  } else {
    MOP_CHECK(&of == edp.get(), "Groups::twin: '{}' is not one of this rank's groups", of.name());
    ranks = layout.edp_ranks;
  }
  return make_group(*std::static_pointer_cast<Rendezvous>(store), name, ranks, rank);
#else
  MOP_FAIL("Groups::twin: this build has no Gloo");
#endif
}

}  // namespace mop
