// cuda_pipeline.h's cp.async primitives on the emulator (emulator.h): copies land at the wait
#pragma once

#include "emulator.h"

inline void __pipeline_memcpy_async(void* dst_shared, const void* src_global, size_t size_and_align,
                                    size_t zfill = 0) {
  if (zfill != 0) ::hbemu::errors.report("__pipeline_memcpy_async with zero fill: not emulated");
  ::hbemu::copy_async(dst_shared, src_global, size_and_align);
}
inline void __pipeline_commit() { ::hbemu::commit_copies(); }
inline void __pipeline_wait_prior(size_t prior) { ::hbemu::wait_copies(prior); }
