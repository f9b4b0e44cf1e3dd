// cooperative_groups on the emulator (emulator.h): grids of 1-D clusters along x, and cooperative grids
#pragma once

#include "emulator.h"

namespace cooperative_groups {

// (In a cooperative launch the emulator's group of blocks is the grid, not a cluster: refused there.)
struct cluster_group {
  unsigned block_rank() const { return ::hbemu::in_cluster().rank; }
  unsigned num_blocks() const { return static_cast<unsigned>(::hbemu::in_cluster().cluster->blocks); }
  void sync() const {
    ::hbemu::in_cluster();
    ::hbemu::cluster_arrive();
    ::hbemu::cluster_wait();
  }
  template <typename T>
  T* map_shared_rank(T* address, unsigned rank) const {
    ::hbemu::in_cluster();
    return ::hbemu::map_shared_rank(address, rank);
  }
};

inline cluster_group this_cluster() { return {}; }

// The grid of a cooperative launch (all its blocks run at once on the emulator)
struct grid_group {
  void sync() const { ::hbemu::grid_sync(); }
};

inline grid_group this_grid() { return {}; }

}  // namespace cooperative_groups
