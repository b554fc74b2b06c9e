// Shared helpers for HGA's CUDA kernels: dtype dispatch, vector loads, warp reductions.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <climits>
#include <cstdint>

namespace hga {

constexpr int kChunk = 64;  // tokens per chunk (one vLLM block)
constexpr int kGroup = 16;  // tokens per group
constexpr int kGroups = 4;  // groups per chunk (M)
constexpr float kLog2e = 1.4426950408889634f;

#define HGA_CHECK(cond, ...) TORCH_CHECK(cond, "vllm_hga: ", __VA_ARGS__)

// Runs the body with scalar_t bound to the kernel type of a float/half/bf16 tensor.
#define HGA_DISPATCH_FLOAT(dtype, NAME, ...)                                   \
  [&] {                                                                        \
    switch (dtype) {                                                           \
      case at::kFloat: {                                                       \
        using scalar_t = float;                                                \
        return __VA_ARGS__();                                                  \
      }                                                                        \
      case at::kHalf: {                                                        \
        using scalar_t = __half;                                               \
        return __VA_ARGS__();                                                  \
      }                                                                        \
      case at::kBFloat16: {                                                    \
        using scalar_t = __nv_bfloat16;                                        \
        return __VA_ARGS__();                                                  \
      }                                                                        \
      default:                                                                 \
        TORCH_CHECK(false, "vllm_hga: ", NAME, ": unsupported dtype ", dtype); \
    }                                                                          \
  }()

// Head sizes with compiled kernels (dims per lane = D / 32).
#define HGA_DISPATCH_HEAD(D, NAME, ...)                                                          \
  [&] {                                                                                          \
    switch (D) {                                                                                 \
      case 64: {                                                                                 \
        constexpr int kD = 64;                                                                   \
        return __VA_ARGS__();                                                                    \
      }                                                                                          \
      case 128: {                                                                                \
        constexpr int kD = 128;                                                                  \
        return __VA_ARGS__();                                                                    \
      }                                                                                          \
      case 256: {                                                                                \
        constexpr int kD = 256;                                                                  \
        return __VA_ARGS__();                                                                    \
      }                                                                                          \
      default:                                                                                   \
        TORCH_CHECK(false, "vllm_hga: ", NAME, ": head size ", D, " not compiled (64/128/256)"); \
    }                                                                                            \
  }()

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// N consecutive elements of T held as raw 32-bit words, so K/V tiles stay packed in
// registers (bf16: 2 per word) and are widened to float only when used.
template <typename T, int N>
struct Packed {
  static constexpr int kWords = N * int(sizeof(T)) / 4;
  static_assert(kWords >= 1 && (kWords == 1 || kWords % 2 == 0), "unsupported vector width");
  uint32_t w[kWords];

  // One (or two) vector loads of N*sizeof(T) bytes; p must be aligned to that size (or 16).
  __device__ __forceinline__ void load(const T* p) {
    if constexpr (kWords == 1) {
      w[0] = *reinterpret_cast<const uint32_t*>(p);
    } else if constexpr (kWords == 2) {
      uint2 v = *reinterpret_cast<const uint2*>(p);
      w[0] = v.x;
      w[1] = v.y;
    } else {
#pragma unroll
      for (int i = 0; i < kWords / 4; ++i) {
        uint4 v = reinterpret_cast<const uint4*>(p)[i];
        w[4 * i] = v.x;
        w[4 * i + 1] = v.y;
        w[4 * i + 2] = v.z;
        w[4 * i + 3] = v.w;
      }
    }
  }
  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < kWords; ++i) w[i] = 0u;
  }
  __device__ __forceinline__ void to_float(float (&out)[N]) const {
    const T* e = reinterpret_cast<const T*>(w);
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = hga::to_float(e[i]);
  }
};

__device__ __forceinline__ float warp_sum(float v, int from_mask = 16) {
#pragma unroll
  for (int o = 16; o >= 1; o >>= 1)
    if (o <= from_mask) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Lexicographic "better" for top-k: higher score, ties to the lower index.
__device__ __forceinline__ bool better(float s, int i, float best, int best_i) {
  return s > best || (s == best && i < best_i);
}

// Scores as unsigned keys whose order is `better`'s score order: NaN lowest (it never wins),
// -0 as +0 (they tie in float compares).
__device__ __forceinline__ unsigned order_key(float s) {
  if (s != s) return 0u;
  const unsigned u = s == 0.f ? 0u : __float_as_uint(s);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Warp-wide argmax of (score, index) pairs, ties to the lower index; every lane gets it.
// Two warp reductions (redux.sync) instead of five shuffle rounds: top-k loops run this
// once per kept entry, so its latency is the routing kernels' critical path.
__device__ __forceinline__ void warp_argmax(float& best, int& best_i, int& aux) {
  const unsigned key = order_key(best);
  const unsigned top = __reduce_max_sync(0xffffffffu, key);
  const int idx = __reduce_min_sync(0xffffffffu, key == top ? best_i : INT_MAX);
  const unsigned won = __ballot_sync(0xffffffffu, key == top && best_i == idx);
  const int src = __ffs(won) - 1;
  best = __shfl_sync(0xffffffffu, best, src);
  aux = __shfl_sync(0xffffffffu, aux, src);
  best_i = idx;
}

// One round of a slice's warp top-k: the best entry of row[0, len) (every lane gets it;
// index INT_MAX when none is left), then marks it taken (NaN never wins `better`).
__device__ __forceinline__ void warp_take_best(float* row, int len, int lane, float& best,
                                               int& bj) {
  best = -INFINITY;
  bj = INT_MAX;
  int unused = 0;
  for (int j = lane; j < len; j += 32) {
    const float v = row[j];
    if (better(v, j, best, bj)) {
      best = v;
      bj = j;
    }
  }
  warp_argmax(best, bj, unused);
  if (bj != INT_MAX && lane == bj % 32) row[bj] = NAN;
  __syncwarp();
}

inline int num_sms() {
  static int n = [] {
    int dev = 0, v = 0;
    C10_CUDA_CHECK(cudaGetDevice(&dev));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev));
    return v;
  }();
  return n;
}

inline void check_cuda(const at::Tensor& t, const char* name) {
  HGA_CHECK(t.is_cuda(), name, " must be a CUDA tensor (a UVA view of pinned memory is fine)");
}

}  // namespace hga
