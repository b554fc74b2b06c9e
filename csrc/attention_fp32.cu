// Instantiation of the decode attention kernels for float (one file per dtype so the
// build compiles them in parallel).
#define HGA_ATTEND_DEFINE_LAUNCHER
#include "attention.cuh"

namespace hga {
HGA_INSTANTIATE_ATTEND(float)
}  // namespace hga
