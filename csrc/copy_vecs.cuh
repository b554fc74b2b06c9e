// One unrolled step of a 16-byte-vector copy, shared by the gather and bank-fill kernels
// (csrc/gather.cu, csrc/bank_kernels.cuh).  ATen-free so the bank emulator can build it.
//
// Why unrolled: from pinned host memory (UVA) each load is a PCIe round trip; issuing all
// kUnroll loads before any store keeps kUnroll transfers per lane in flight.

#pragma once

namespace hga {

// Copies s[v] -> d[v] for v = v0 + u * width + lane, u < kUnroll, v < vecs.
template <int kUnroll, typename I>
__device__ __forceinline__ void copy_vecs_unrolled(const uint4* __restrict__ s,
                                                   uint4* __restrict__ d, I v0, I vecs, int width,
                                                   int lane) {
  uint4 buf[kUnroll];
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const I v = v0 + I(u) * width + lane;
    if (v < vecs) buf[u] = s[v];
  }
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const I v = v0 + I(u) * width + lane;
    if (v < vecs) d[v] = buf[u];
  }
}

}  // namespace hga
