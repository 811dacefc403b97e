// The process groups of one run: world, expert-parallel (ep) and expert-data-parallel (edp).
//
// Layout (row-major over a (world/ep, ep) grid of world ranks):
//   ep group g   = world ranks {g*ep, g*ep+1, ..., g*ep+ep-1}   (contiguous: one node's GPUs
//                  when ep <= GPUs per node, so the all-to-all stays on NVLink)
//   edp group j  = world ranks {j, j+ep, j+2*ep, ...}           (the ranks holding the same
//                  experts; expert gradients are reduced over it)
// so world rank w is rank w % ep of ep group w / ep and rank w / ep of edp group w % ep.
// Experts are partitioned over the ep group; the data-parallel group (dense parameters, the
// load-balancing statistics) is the world. ep must divide the world size.
//
// Rendezvous (every rank calls make_groups with the same ep):
//   * MASTER_ADDR / MASTER_PORT (RankInfo.master_addr non-empty and master_port > 0): a TcpStore;
//     rank 0 serves it on MASTER_PORT (`mop launch` and torchrun set both).
//   * else MOP_STORE_DIR: a gloo FileStore in that directory (shared by all ranks; must be
//     fresh for every run, its keys are files).
//   * a world of 1 needs neither: every group is a SoloGroup (no store, no sockets).
// Every group of size 1 is a SoloGroup (ep = 1, or edp when ep = world).
// The hosts' listening address: GLOO_SOCKET_IFNAME (an interface name) if set, else 127.0.0.1
// when the rendezvous is local (loopback MASTER_ADDR or a FileStore), else this host's name.
#pragma once
#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "parallel/launch.h"
#include "parallel/process_group.h"

namespace mop {

// Where world rank `rank` sits in the layout above; pure, so plans and tests need no sockets.
struct GroupLayout {
  int ep_group = 0;              // index g of this rank's ep group
  int edp_group = 0;             // index j of this rank's edp group (= rank within its ep group)
  std::vector<int> ep_ranks;     // world ranks of the ep group, in group-rank order
  std::vector<int> edp_ranks;    // world ranks of the edp group, in group-rank order
};
GroupLayout group_layout(int rank, int world, int ep);

struct Groups {
  // Declared first so it is destroyed last: the rendezvous (its store and the listening options,
  // kept for twin()). Rank 0's TcpStore is the rendezvous server. Null for a world of 1.
  std::shared_ptr<void> store;
  GroupLayout layout;  // this rank's place in the (world/ep, ep) grid
  int rank = 0;        // this rank in the world
  std::unique_ptr<ProcessGroup> world;  // data parallel: all ranks
  std::unique_ptr<ProcessGroup> ep;     // experts partitioned over it
  std::unique_ptr<ProcessGroup> edp;    // replicas of this rank's experts

  int world_size() const { return world->size(); }
  int world_rank() const { return world->rank(); }
  int ep_size() const { return ep->size(); }
  int ep_rank() const { return ep->rank(); }
  int edp_size() const { return edp->size(); }
  int edp_rank() const { return edp->rank(); }

  // Another host group over the ranks of `of` (world, ep or edp above), with its own connections
  // under the prefix "<of's name>.<tag>": for a user on another thread, since a group serves one
  // thread at a time (process_group.h). Collective over those ranks, which must ask for the same
  // twins in the same order. A group of size 1 gets a SoloGroup.
  std::unique_ptr<ProcessGroup> twin(const ProcessGroup& of, const std::string& tag) const;
};

// Connects this rank's three groups (blocking until every rank has). `timeout` bounds the
// rendezvous and every later operation on the groups. Ends with a world barrier, so every
// rank has finished its rendezvous before any returns. The store stays open (Groups::store) for twin().
Groups make_groups(const RankInfo& r, int ep, std::chrono::milliseconds timeout);

}  // namespace mop
