// Device code of the bank admission (csrc/bank.cu, which documents it): constants and
// kernels, without ATen, so that the kernels can also be built for a host-thread emulator.
// Expects <cstdint>, hga::kChunk and the CUDA built-ins (or stand-ins) before it.

#pragma once

#include "copy_vecs.cuh"

namespace hga {
namespace {

constexpr int kBankMaxSlots = 32768;  // keep equal to vllm_hga/config.py BANK_MAX_CHUNKS
constexpr int kAdmitThreads = 1024;
constexpr int kFillUnroll = 8;
// A column whose block missed is stored as -kPending - row until the fill/encode kernel
// resolves it (bank rows are -(slot * H2M + r) - 1 > -kPending, pool rows >= 0).
constexpr int64_t kPending = int64_t(1) << 62;

// meta (int64, bank.py DeviceBank.meta): step counter, chunks admitted by the last step
// (the fill list's length), totals of hits / misses / admitted chunks, the last step's
// hits / misses.
enum Meta {
  kStep = 0,
  kFills = 1,
  kHits = 2,
  kMisses = 3,
  kAdmitted = 4,
  kLastHits = 5,
  kLastMisses = 6,
  kMetaLen = 8
};
enum SlotClass : uint8_t { kEmpty = 0, kKept = 1, kTouched = 2 };

// ----------------------------------------------------------------------------- mark
__global__ void __launch_bounds__(256)
    bank_mark_kernel(const int64_t* __restrict__ rows, const uint4* __restrict__ token_ok,
                     int64_t n, int64_t gt, int64_t own_lo, int64_t own_hi, int64_t h2m, int64_t nb,
                     const int64_t* __restrict__ slot_of_block, int64_t* __restrict__ last_use,
                     uint32_t* __restrict__ miss_bits, uint32_t* __restrict__ miss_summary,
                     const int64_t* __restrict__ meta, int64_t* __restrict__ enc) {
  const int64_t step = meta[kStep] + 1;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int64_t row = rows[i];
    const int64_t g = i % gt;
    int64_t out = row;
    if ((g < own_lo || g >= own_hi) && row >= 0) {
      const uint4 m = token_ok[i];
      const int64_t blk = row / h2m;
      if ((m.x | m.y | m.z | m.w) != 0u && blk < nb) {
        const int64_t s = slot_of_block[blk];
        if (s >= 0) {  // hit: the slot stays this block's for the whole step
          if (last_use[s] != step) last_use[s] = step;
          out = -(s * h2m + (row - blk * h2m)) - 1;
        } else {
          const int64_t w = blk >> 5;
          const uint32_t bit = 1u << (blk & 31);
          if (!(miss_bits[w] & bit)) {
            // the thread that makes the word nonzero sets its summary bit
            if (atomicOr(&miss_bits[w], bit) == 0u) atomicOr(&miss_summary[w >> 5], 1u << (w & 31));
          }
          out = -kPending - row;
        }
      }
    }
    enc[i] = out;
  }
}

// ----------------------------------------------------------------------------- admit
struct ScanBuf {
  int warp[32];
  int total;
};

// Exclusive prefix sum of v over the CTA (all threads call it); total = sum over the CTA.
// Ends with a barrier, so shared memory written before it is visible after it.
__device__ int block_excl_scan(int v, int& total, ScanBuf& buf) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  int x = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, x, o);
    if (lane >= o) x += y;
  }
  if (lane == 31) buf.warp[warp] = x;
  __syncthreads();
  if (warp == 0) {
    const int w = lane < nwarps ? buf.warp[lane] : 0;
    int incl = w;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int y = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += y;
    }
    buf.warp[lane] = incl - w;
    if (lane == 31) buf.total = incl;
  }
  __syncthreads();
  const int res = buf.warp[warp] + x - v;
  total = buf.total;
  __syncthreads();
  return res;
}

__global__ void __launch_bounds__(kAdmitThreads)
    bank_admit_kernel(int cap, int64_t n_summary, int64_t* __restrict__ slot_of_block,
                      int64_t* __restrict__ block_of_slot, int64_t* __restrict__ last_use,
                      int32_t* __restrict__ order, uint32_t* __restrict__ miss_bits,
                      uint32_t* __restrict__ miss_summary, int64_t* __restrict__ meta,
                      int64_t* __restrict__ fill_blocks, int64_t* __restrict__ fill_slots,
                      double* __restrict__ sink_hits, double* __restrict__ sink_misses,
                      double* __restrict__ sink_bytes, int64_t chunk_bytes) {
  __shared__ uint8_t cls[kBankMaxSlots];
  __shared__ int32_t words[kAdmitThreads];
  __shared__ ScanBuf buf;
  const int tid = threadIdx.x, nt = blockDim.x;
  const int64_t step_old = meta[kStep], step = step_old + 1;

  // 1. slot classes: the mark kernel gave this step's hits last_use == step
  for (int s = tid; s < cap; s += nt) {
    const int64_t lu = last_use[s];
    cls[s] = lu < 0 ? kEmpty : (lu == step ? kTouched : kKept);
  }
  __syncthreads();
  // each thread owns slots [lo, hi) and positions [lo, hi) of the previous order
  const int per = (cap + nt - 1) / nt;
  const int lo = min(cap, tid * per), hi = min(cap, lo + per);
  const int32_t* order_in = order + (step_old & 1) * int64_t(cap);
  int32_t* order_out = order + (step & 1) * int64_t(cap);
  int nf = 0, nk = 0;
  for (int s = lo; s < hi; ++s) nf += cls[s] == kEmpty;
  for (int p = lo; p < hi; ++p) nk += cls[order_in[p]] == kKept;
  int n_front, n_kept;
  const int f_off = block_excl_scan(nf, n_front, buf);
  const int k_off = block_excl_scan(nk, n_kept, buf);
  const int avail = n_front + n_kept;  // slots not hit this step
  const int n_hit = cap - avail;

  // 2. misses in block order: nonzero words from the summary, then their bits
  int64_t n_miss = 0;
  for (int64_t s0 = 0; s0 < n_summary; s0 += nt) {
    const int64_t si = s0 + tid;
    uint32_t sw = 0u;
    if (si < n_summary) {
      sw = miss_summary[si];
      if (sw) miss_summary[si] = 0u;
    }
    int n_words;
    const int w_off = block_excl_scan(__popc(sw), n_words, buf);
    for (int r0 = 0; r0 < n_words; r0 += nt) {
      int j = w_off;
      for (uint32_t m = sw; m; m &= m - 1, ++j)
        if (j >= r0 && j < r0 + nt) words[j - r0] = int32_t(si * 32 + __ffs(m) - 1);
      __syncthreads();
      const int32_t w = tid < n_words - r0 ? words[tid] : -1;
      uint32_t mw = 0u;
      if (w >= 0) {
        mw = miss_bits[w];
        miss_bits[w] = 0u;
      }
      int n_bits;
      int64_t rank = n_miss + block_excl_scan(__popc(mw), n_bits, buf);  // barrier: words free
      for (uint32_t m = mw; m; m &= m - 1, ++rank)
        if (rank < avail) fill_blocks[rank] = int64_t(w) * 32 + __ffs(m) - 1;
      n_miss += n_bits;
    }
  }
  const int n_admit = int(n_miss < avail ? n_miss : avail);

  // 3. victims = the first n_admit of [empty by index] ++ [kept in previous order]; the
  //    rest of that sequence starts the new order
  {
    int q = f_off;
    for (int s = lo; s < hi; ++s) {
      if (cls[s] != kEmpty) continue;
      if (q < n_admit)
        fill_slots[q] = s;
      else
        order_out[q - n_admit] = s;
      ++q;
    }
    q = n_front + k_off;
    for (int p = lo; p < hi; ++p) {
      const int s = order_in[p];
      if (cls[s] != kKept) continue;
      if (q < n_admit)
        fill_slots[q] = s;
      else
        order_out[q - n_admit] = s;
      ++q;
    }
  }
  for (int k = n_admit + tid; k < cap; k += nt) {
    fill_slots[k] = -1;
    fill_blocks[k] = -1;
  }
  __syncthreads();

  // 4. the victims drop their old blocks and take the admitted ones
  for (int k = tid; k < n_admit; k += nt) {
    const int64_t s = fill_slots[k];
    const int64_t old = block_of_slot[s];
    if (old >= 0) slot_of_block[old] = -1;
    block_of_slot[s] = fill_blocks[k];
    last_use[s] = step;
    cls[s] = kTouched;
  }
  __syncthreads();
  for (int k = tid; k < n_admit; k += nt) slot_of_block[fill_blocks[k]] = fill_slots[k];

  // 5. every slot touched this step (hits and admitted) ends the new order, by index
  int nt_own = 0;
  for (int s = lo; s < hi; ++s) nt_own += cls[s] == kTouched;
  int n_touched;
  int q = block_excl_scan(nt_own, n_touched, buf) + cap - n_touched;
  for (int s = lo; s < hi; ++s)
    if (cls[s] == kTouched) order_out[q++] = s;

  if (tid == 0) {
    meta[kStep] = step;
    meta[kFills] = n_admit;
    meta[kHits] += n_hit;
    meta[kMisses] += n_miss;
    meta[kAdmitted] += n_admit;
    meta[kLastHits] = n_hit;
    meta[kLastMisses] = n_miss;
    if (sink_hits != nullptr) {
      *sink_hits += double(n_hit);
      *sink_misses += double(n_miss);
      *sink_bytes += double(n_admit) * double(chunk_bytes);
    }
  }
}

// ----------------------------------------------------------------------------- fill + encode
__global__ void __launch_bounds__(256)
    bank_fill_encode_kernel(const uint4* __restrict__ pool, uint4* __restrict__ bank, int64_t vecs,
                            int ysplit, int fill_ctas, const int64_t* __restrict__ fill_blocks,
                            const int64_t* __restrict__ fill_slots,
                            const int64_t* __restrict__ meta,
                            const int64_t* __restrict__ slot_of_block, int64_t h2m,
                            int64_t* __restrict__ enc, int64_t n) {
  if (int(blockIdx.x) < fill_ctas) {
    const int64_t items = meta[kFills] * ysplit;  // (chunk, slice) pairs
    const int64_t step_v = int64_t(ysplit) * blockDim.x * kFillUnroll;
    for (int64_t it = blockIdx.x; it < items; it += fill_ctas) {
      const int64_t k = it / ysplit;
      const int part = int(it % ysplit);
      const uint4* s = pool + fill_blocks[k] * vecs;
      uint4* d = bank + fill_slots[k] * vecs;
      for (int64_t v0 = int64_t(part) * blockDim.x * kFillUnroll; v0 < vecs; v0 += step_v)
        copy_vecs_unrolled<kFillUnroll>(s, d, v0, vecs, int(blockDim.x), int(threadIdx.x));
    }
    return;
  }
  const int64_t stride = int64_t(gridDim.x - fill_ctas) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x - fill_ctas) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int64_t e = enc[i];
    if (e > -kPending) continue;
    const int64_t row = -kPending - e;
    const int64_t blk = row / h2m;
    const int64_t s = slot_of_block[blk];
    enc[i] = s >= 0 ? -(s * h2m + (row - blk * h2m)) - 1 : row;
  }
}

// ----------------------------------------------------------------------------- invalidate
template <typename I>
__global__ void __launch_bounds__(256)
    bank_invalidate_kernel(const I* __restrict__ slots, int64_t n, int64_t nb,
                           int64_t* __restrict__ slot_of_block, int64_t* __restrict__ block_of_slot,
                           int64_t* __restrict__ last_use) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int64_t t = int64_t(slots[i]);
    if (t < 0) continue;
    const int64_t blk = t / kChunk;
    if (blk >= nb) continue;
    const int64_t s = slot_of_block[blk];
    if (s < 0) continue;  // threads of one block race here; all write the same values
    slot_of_block[blk] = -1;
    block_of_slot[s] = -1;
    last_use[s] = -1;  // empty: evicted first
  }
}

}  // namespace
}  // namespace hga
