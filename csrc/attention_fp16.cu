// Instantiation of the decode attention kernels for __half (one file per dtype so the
// build compiles them in parallel).
#define HGA_ATTEND_DEFINE_LAUNCHER
#include "attention.cuh"

namespace hga {
HGA_INSTANTIATE_ATTEND(__half)
}  // namespace hga
