// The cluster group of cooperative_groups on the emulator (emulator.h): grids of 1-D clusters along x
#pragma once

#include "emulator.h"

namespace cooperative_groups {

struct cluster_group {
  unsigned block_rank() const { return ::hbemu::block().rank; }
  unsigned num_blocks() const { return static_cast<unsigned>(::hbemu::block().cluster->blocks); }
  void sync() const {
    ::hbemu::cluster_arrive();
    ::hbemu::cluster_wait();
  }
  template <typename T>
  T* map_shared_rank(T* address, unsigned rank) const {
    return ::hbemu::map_shared_rank(address, rank);
  }
};

inline cluster_group this_cluster() { return {}; }

}  // namespace cooperative_groups
