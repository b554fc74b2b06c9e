// csrc/bank_kernels.cuh on host threads, for tests/test_bank_emulated.py: CUDA built-ins
// are stand-ins (a CTA of the admit kernel is blockDim std::threads with std::barrier for
// __syncthreads and per-warp barriers for shuffles; grid kernels without barriers run their
// threads one after another), so the kernels' logic is checked on machines without a GPU.
// The launch geometry mirrors csrc/bank.cu's host code (with `sms` streaming multiprocessors).
#include <torch/extension.h>
#include <atomic>
#include <barrier>
#include <cstdint>
#include <thread>
#include <vector>
#include <algorithm>

struct uint4 { unsigned x, y, z, w; };
struct dim3 { unsigned x = 1, y = 1, z = 1; };
thread_local dim3 threadIdx, blockIdx;
dim3 blockDim, gridDim;
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __restrict__
#define __shared__ static
static std::barrier<>* g_bar = nullptr;
inline void __syncthreads() { if (g_bar) g_bar->arrive_and_wait(); }
struct WarpSync { std::barrier<> bar{32}; long long vals[32]; };
static WarpSync* g_warps = nullptr;
template <class T> T __shfl_up_sync(unsigned, T v, int o) {
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  WarpSync& ws = g_warps[w];
  ws.vals[lane] = (long long)v;
  ws.bar.arrive_and_wait();
  T r = lane >= o ? (T)ws.vals[lane - o] : v;
  ws.bar.arrive_and_wait();
  return r;
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(unsigned x) { return __builtin_ffs((int)x); }
inline unsigned atomicOr(unsigned* p, unsigned v) { return std::atomic_ref<unsigned>(*p).fetch_or(v); }
inline int min(int a, int b) { return a < b ? a : b; }
namespace hga { constexpr int kChunk = 64; constexpr int kGroups = 4; }
#include "bank_kernels.cuh"  // csrc/ is on the include path

using namespace hga;

template <class F> void run_seq(int grid, int block, F f) {
  gridDim = dim3{(unsigned)grid, 1, 1}; blockDim = dim3{(unsigned)block, 1, 1};
  g_bar = nullptr;
  for (int b = 0; b < grid; ++b) for (int t = 0; t < block; ++t) {
    blockIdx = dim3{(unsigned)b, 0, 0}; threadIdx = dim3{(unsigned)t, 0, 0}; f();
  }
}

void emu_admit(at::Tensor pool, at::Tensor bank, at::Tensor rows, at::Tensor token_ok,
               int64_t own_lo, int64_t own_hi, at::Tensor slot_of_block, at::Tensor block_of_slot,
               at::Tensor last_use, at::Tensor order, at::Tensor miss_bits, at::Tensor miss_summary,
               at::Tensor meta, at::Tensor fill_blocks, at::Tensor fill_slots, at::Tensor enc,
               std::vector<at::Tensor> sinks, int64_t chunk_bytes, bool fill,
               int64_t admit_threads, int64_t sms) {
  const int64_t nb = slot_of_block.numel() - 1, cap = block_of_slot.numel() - 1;
  const int64_t h2m = pool.size(1) * 2 * kGroups;
  const int64_t n_words = (nb + 31) / 32, n_summary = (n_words + 31) / 32;
  TORCH_CHECK(miss_bits.numel() == n_words && miss_summary.numel() == n_summary);
  TORCH_CHECK(order.numel() == 2 * cap && cap <= kBankMaxSlots);
  const int64_t n = rows.numel();
  auto* sob = slot_of_block.data_ptr<int64_t>();
  auto* bits = reinterpret_cast<uint32_t*>(miss_bits.data_ptr<int32_t>());
  auto* summary = reinterpret_cast<uint32_t*>(miss_summary.data_ptr<int32_t>());
  if (n > 0) {
    const int ctas = (int)std::min<int64_t>((n + 255) / 256, 4 * sms);
    run_seq(ctas, 256, [&] {
      bank_mark_kernel(rows.data_ptr<int64_t>(), reinterpret_cast<const uint4*>(token_ok.data_ptr()), n,
                       rows.size(-1), own_lo, own_hi, h2m, nb, sob, last_use.data_ptr<int64_t>(), bits,
                       summary, meta.data_ptr<int64_t>(), enc.data_ptr<int64_t>());
    });
  }
  {
    const int nt = (int)admit_threads;
    gridDim = dim3{1, 1, 1}; blockDim = dim3{(unsigned)nt, 1, 1};
    std::barrier<> bar(nt);
    std::vector<WarpSync> warps(nt / 32);
    g_bar = &bar; g_warps = warps.data();
    std::vector<std::thread> th;
    for (int t = 0; t < nt; ++t) th.emplace_back([&, t] {
      blockIdx = dim3{0, 0, 0}; threadIdx = dim3{(unsigned)t, 0, 0};
      bank_admit_kernel((int)cap, n_summary, sob, block_of_slot.data_ptr<int64_t>(),
                        last_use.data_ptr<int64_t>(), order.data_ptr<int32_t>(), bits, summary,
                        meta.data_ptr<int64_t>(), fill_blocks.data_ptr<int64_t>(), fill_slots.data_ptr<int64_t>(),
                        sinks.empty() ? nullptr : sinks[0].data_ptr<double>(),
                        sinks.empty() ? nullptr : sinks[1].data_ptr<double>(),
                        sinks.empty() ? nullptr : sinks[2].data_ptr<double>(), chunk_bytes);
    });
    for (auto& x : th) x.join();
    g_bar = nullptr; g_warps = nullptr;
  }
  const int64_t vecs = fill ? (int64_t)pool.nbytes() / nb / 16 : 0;
  const int per_y = 256 * kFillUnroll;
  const int ysplit = fill ? (int)std::min<int64_t>((vecs + per_y - 1) / per_y, 16) : 1;
  const int fill_ctas = fill && vecs > 0 ? (int)std::min<int64_t>(cap * ysplit, 2 * sms) : 0;
  const int enc_ctas = n > 0 ? (int)std::min<int64_t>((n + 255) / 256, 2 * sms) : 0;
  if (fill_ctas + enc_ctas > 0)
    run_seq(fill_ctas + enc_ctas, 256, [&] {
      bank_fill_encode_kernel(fill ? reinterpret_cast<const uint4*>(pool.data_ptr()) : nullptr,
                              fill ? reinterpret_cast<uint4*>(bank.data_ptr()) : nullptr, vecs, ysplit,
                              fill_ctas, fill_blocks.data_ptr<int64_t>(), fill_slots.data_ptr<int64_t>(),
                              meta.data_ptr<int64_t>(), sob, h2m, enc.data_ptr<int64_t>(), n);
    });
}

void emu_invalidate(at::Tensor slots, at::Tensor slot_of_block, at::Tensor block_of_slot,
                    at::Tensor last_use, int64_t sms) {
  const int64_t n = slots.numel(), nb = slot_of_block.numel() - 1;
  if (!n) return;
  const int ctas = (int)std::min<int64_t>((n + 255) / 256, 2 * sms);
  auto* sob = slot_of_block.data_ptr<int64_t>();
  auto* bos = block_of_slot.data_ptr<int64_t>();
  auto* lu = last_use.data_ptr<int64_t>();
  if (slots.scalar_type() == at::kLong)
    run_seq(ctas, 256, [&] { bank_invalidate_kernel(slots.data_ptr<int64_t>(), n, nb, sob, bos, lu); });
  else
    run_seq(ctas, 256, [&] { bank_invalidate_kernel(slots.data_ptr<int32_t>(), n, nb, sob, bos, lu); });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("admit", &emu_admit);
  m.def("invalidate", &emu_invalidate);
}
