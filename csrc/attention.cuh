// Sparse decode attention kernels over 16-token groups (flash-decoding style, split-K).
//
// Block (split, kv head [x head block], request) owns the query heads of one KV head and a
// contiguous range of list columns; each warp takes columns in turn and keeps an online
// softmax (fp32, base 2) per head.  Columns < n_shared are the same group for every head
// of the KV head (sinks, local window, own chunk): its K/V is loaded once and used by all
// heads.  Later columns are per-head routed groups.  Fully masked groups are never read,
// masked tokens never touch the sums (their K/V may be uninitialised memory).
// Partial (max, sum, unnormalised output) per split go to a workspace; combine_kernel
// merges the splits and writes the output in its dtype.
//
// Lane l owns dims [l*D/32, (l+1)*D/32) of every token: loads are one row per warp
// instruction, fully coalesced, straight from device memory or pinned host memory (UVA).

#pragma once

#include "hga_common.cuh"

namespace hga {

constexpr int kAttnWarps = 4;

template <typename T, int D>
using RowSlice = Packed<T, D / 32>;

__device__ __forceinline__ uint32_t load_mask(const uint8_t* p) {
  const uint4 w = *reinterpret_cast<const uint4*>(p);
  const uint32_t words[4] = {w.x, w.y, w.z, w.w};
  uint32_t bits = 0;
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int b = 0; b < 4; ++b)
      bits |= uint32_t(((words[i] >> (8 * b)) & 0xffu) != 0) << (4 * i + b);
  return bits;
}

// row >= 0: row of kv (the pool); row < 0: row -row-1 of the device bank (bank.py), which
// has the pool's block layout (V row v_off rows after the K row in both).
template <typename T, int D>
__device__ __forceinline__ void load_group(const T* __restrict__ kv, const T* __restrict__ bank,
                                           int64_t row, int v_off, int lane,
                                           RowSlice<T, D> (&k)[kGroup],
                                           RowSlice<T, D> (&v)[kGroup]) {
  const T* base = row < 0 ? bank : kv;
  row = row < 0 ? -row - 1 : row;
  const T* kp = base + row * (kGroup * D) + lane * (D / 32);
  const T* vp = kp + int64_t(v_off) * (kGroup * D);
#pragma unroll
  for (int t = 0; t < kGroup; ++t) k[t].load(kp + t * D);
#pragma unroll
  for (int t = 0; t < kGroup; ++t) v[t].load(vp + t * D);
}

// Online-softmax update of one head with one group (16 tokens).  q is pre-scaled by
// scale*log2(e).  The 16 partial dot products are reduced with a reduce-scatter (15
// shuffles instead of 16 x 5): afterwards lanes 2t and 2t+1 hold token t's logit.
template <typename T, int D>
__device__ __forceinline__ void head_update(const float (&q)[D / 32],
                                            const RowSlice<T, D> (&k)[kGroup],
                                            const RowSlice<T, D> (&v)[kGroup], uint32_t mask,
                                            float& m, float& l, float (&acc)[D / 32], int lane) {
  constexpr int DPL = D / 32;
  float part[kGroup];
#pragma unroll
  for (int t = 0; t < kGroup; ++t) {
    float kf[DPL];
    k[t].to_float(kf);
    float s = 0.f;
#pragma unroll
    for (int d = 0; d < DPL; ++d) s += q[d] * kf[d];
    part[t] = s;
  }
#pragma unroll
  for (int half = kGroup / 2, o = 16; half >= 1; half >>= 1, o >>= 1) {
    const bool up = lane & o;
#pragma unroll
    for (int i = 0; i < half; ++i) {
      const float send = up ? part[i] : part[i + half];
      const float keep = up ? part[i + half] : part[i];
      part[i] = keep + __shfl_xor_sync(0xffffffffu, send, o);
    }
  }
  const float x = part[0] + __shfl_xor_sync(0xffffffffu, part[0], 1);
  const bool valid = (mask >> (lane >> 1)) & 1u;
  const float s = valid ? x : -INFINITY;
  float mx = s;
#pragma unroll
  for (int o = 2; o <= 16; o <<= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  const float m_new = fmaxf(m, mx);
  const float m_use = m_new == -INFINITY ? 0.f : m_new;
  const float p = valid ? exp2f(s - m_use) : 0.f;
  float sum = p;
#pragma unroll
  for (int o = 2; o <= 16; o <<= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  const float alpha = exp2f(m - m_use);
  l = l * alpha + sum;
  m = m_new;
#pragma unroll
  for (int d = 0; d < DPL; ++d) acc[d] *= alpha;
#pragma unroll
  for (int t = 0; t < kGroup; ++t) {
    const float pt = __shfl_sync(0xffffffffu, p, 2 * t);
    // Masked rows may be uninitialised (NaN) memory: zero their bits, since 0 * NaN = NaN.
    // Integer masking rather than a branch: 16 branches here exhaust ptxas' predicates.
    const uint32_t keep = 0u - ((mask >> t) & 1u);
    RowSlice<T, D> vt = v[t];
#pragma unroll
    for (int w = 0; w < RowSlice<T, D>::kWords; ++w) vt.w[w] &= keep;
    float vf[DPL];
    vt.to_float(vf);
#pragma unroll
    for (int d = 0; d < DPL; ++d) acc[d] += pt * vf[d];
  }
}

template <typename T, int D, int HB>
__global__ void __launch_bounds__(kAttnWarps * 32)
    attend_groups_kernel(const T* __restrict__ q, int64_t q_sr, int64_t q_sh,
                         const T* __restrict__ kv, const T* __restrict__ bank,
                         const int64_t* __restrict__ rows, const uint8_t* __restrict__ token_ok,
                         int Gt, int n_shared, int v_off, int Hq, int rep, int n_hb, float qscale,
                         int col_begin, int col_end, int cols_per_split, int split_begin, int S,
                         float* __restrict__ part_o, float* __restrict__ part_ml) {
  constexpr int DPL = D / 32;
  const int s = blockIdx.x, r = blockIdx.z;
  const int kvh = blockIdx.y / n_hb, hb = blockIdx.y % n_hb;
  const int h0 = kvh * rep + hb * HB;
  const int nh = min(HB, rep - hb * HB);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  float qf[HB][DPL], m[HB], l[HB], acc[HB][DPL];
#pragma unroll
  for (int h = 0; h < HB; ++h) {
    RowSlice<T, D> qs;
    if (h < nh)
      qs.load(q + r * q_sr + (h0 + h) * q_sh + lane * DPL);
    else
      qs.zero();
    qs.to_float(qf[h]);
#pragma unroll
    for (int d = 0; d < DPL; ++d) {
      qf[h][d] *= qscale;
      acc[h][d] = 0.f;
    }
    m[h] = -INFINITY;
    l[h] = 0.f;
  }

  const int64_t head0 = (int64_t(r) * Hq + h0) * Gt;  // list index of (r, h0, column 0)
  const int c0 = col_begin + s * cols_per_split, c1 = min(col_end, c0 + cols_per_split);
  for (int col = c0 + warp; col < c1; col += kAttnWarps) {
    if (col < n_shared) {
      const uint32_t mask = load_mask(token_ok + (head0 + col) * kGroup);
      if (!mask) continue;
      RowSlice<T, D> kr[kGroup], vr[kGroup];
      load_group<T, D>(kv, bank, rows[head0 + col], v_off, lane, kr, vr);
#pragma unroll
      for (int h = 0; h < HB; ++h)
        if (h < nh) head_update<T, D>(qf[h], kr, vr, mask, m[h], l[h], acc[h], lane);
    } else {
#pragma unroll
      for (int h = 0; h < HB; ++h) {
        if (h >= nh) continue;
        const int64_t idx = head0 + int64_t(h) * Gt + col;
        const uint32_t mask = load_mask(token_ok + idx * kGroup);
        if (!mask) continue;
        RowSlice<T, D> kr[kGroup], vr[kGroup];
        load_group<T, D>(kv, bank, rows[idx], v_off, lane, kr, vr);
        head_update<T, D>(qf[h], kr, vr, mask, m[h], l[h], acc[h], lane);
      }
    }
  }

  // Merge the warps' softmax states, write this split's partial result.
  __shared__ float s_m[kAttnWarps][HB], s_l[kAttnWarps][HB];
  __shared__ float s_acc[kAttnWarps][HB][D];
#pragma unroll
  for (int h = 0; h < HB; ++h) {
    if (lane == 0) {
      s_m[warp][h] = m[h];
      s_l[warp][h] = l[h];
    }
#pragma unroll
    for (int d = 0; d < DPL; ++d) s_acc[warp][h][lane * DPL + d] = acc[h][d];
  }
  __syncthreads();
  for (int i = threadIdx.x; i < nh * D; i += blockDim.x) {
    const int h = i / D, d = i % D;
    float M = -INFINITY;
#pragma unroll
    for (int w = 0; w < kAttnWarps; ++w) M = fmaxf(M, s_m[w][h]);
    float o = 0.f, L = 0.f;
    if (M != -INFINITY) {
#pragma unroll
      for (int w = 0; w < kAttnWarps; ++w) {
        const float wgt = exp2f(s_m[w][h] - M);
        o += wgt * s_acc[w][h][d];
        L += wgt * s_l[w][h];
      }
    }
    const int64_t idx = (int64_t(r) * Hq + h0 + h) * S + split_begin + s;
    part_o[idx * D + d] = o;
    if (d == 0) {
      part_ml[idx * 2] = M;
      part_ml[idx * 2 + 1] = L;
    }
  }
}

// Device-memory variant: one warp per query head, a block holds (up to 8) heads of one KV
// head so the shared columns they all read come from L1/L2 rather than HBM.  A warp first
// fetches its split's row ids and masks lane-parallel (no dependent-load chain per group),
// then streams its groups with the next group's K/V loads in flight while the current one
// is computed (two register buffers where they fit).
template <typename T, int D>
__device__ __forceinline__ void fetch_next(uint32_t& bits, int64_t my_row, uint32_t my_mask,
                                           const T* __restrict__ kv, const T* __restrict__ bank,
                                           int v_off, int lane, RowSlice<T, D> (&k)[kGroup],
                                           RowSlice<T, D> (&v)[kGroup], uint32_t& mask) {
  const int src = __ffs(bits) - 1;
  bits &= bits - 1;
  const int64_t row = __shfl_sync(0xffffffffu, my_row, src);
  mask = __shfl_sync(0xffffffffu, my_mask, src);
  load_group<T, D>(kv, bank, row, v_off, lane, k, v);
}

template <typename T, int D>
__global__ void __launch_bounds__(256)
    attend_heads_kernel(const T* __restrict__ q, int64_t q_sr, int64_t q_sh,
                        const T* __restrict__ kv, const T* __restrict__ bank,
                        const int64_t* __restrict__ rows, const uint8_t* __restrict__ token_ok,
                        int Gt, int v_off, int Hq, int rep, int n_hb, float qscale, int col_begin,
                        int col_end, int cols_per_split, int split_begin, int S,
                        float* __restrict__ part_o, float* __restrict__ part_ml) {
  constexpr int DPL = D / 32;
  const int s = blockIdx.x, r = blockIdx.z;
  const int kvh = blockIdx.y / n_hb, hb = blockIdx.y % n_hb;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int head_in_kv = hb * 8 + warp;
  if (head_in_kv >= rep) return;  // no block-level sync below
  const int h = kvh * rep + head_in_kv;
  const int c0 = col_begin + s * cols_per_split;
  const int ncol = min(col_end - c0, cols_per_split);  // <= 32
  const int64_t base = (int64_t(r) * Hq + h) * Gt + c0;
  int64_t my_row = 0;
  uint32_t my_mask = 0;
  if (lane < ncol) {
    my_row = rows[base + lane];
    my_mask = load_mask(token_ok + (base + lane) * kGroup);
  }
  uint32_t bits = __ballot_sync(0xffffffffu, my_mask != 0u);

  float qf[DPL], acc[DPL], m = -INFINITY, l = 0.f;
  {
    RowSlice<T, D> qs;
    qs.load(q + r * q_sr + h * q_sh + lane * DPL);
    qs.to_float(qf);
#pragma unroll
    for (int d = 0; d < DPL; ++d) {
      qf[d] *= qscale;
      acc[d] = 0.f;
    }
  }
  RowSlice<T, D> ka[kGroup], va[kGroup];
  uint32_t ma;
  constexpr bool kDouble = RowSlice<T, D>::kWords <= 2;  // 2 buffers fit in registers
  if constexpr (kDouble) {
    RowSlice<T, D> kb[kGroup], vb[kGroup];
    uint32_t mb;
    if (bits) {
      fetch_next<T, D>(bits, my_row, my_mask, kv, bank, v_off, lane, ka, va, ma);
      while (true) {
        const bool more_b = bits != 0u;
        if (more_b) fetch_next<T, D>(bits, my_row, my_mask, kv, bank, v_off, lane, kb, vb, mb);
        head_update<T, D>(qf, ka, va, ma, m, l, acc, lane);
        if (!more_b) break;
        const bool more_a = bits != 0u;
        if (more_a) fetch_next<T, D>(bits, my_row, my_mask, kv, bank, v_off, lane, ka, va, ma);
        head_update<T, D>(qf, kb, vb, mb, m, l, acc, lane);
        if (!more_a) break;
      }
    }
  } else {
    while (bits) {
      fetch_next<T, D>(bits, my_row, my_mask, kv, bank, v_off, lane, ka, va, ma);
      head_update<T, D>(qf, ka, va, ma, m, l, acc, lane);
    }
  }
  const int64_t idx = (int64_t(r) * Hq + h) * S + split_begin + s;
#pragma unroll
  for (int d = 0; d < DPL; ++d) part_o[idx * D + lane * DPL + d] = acc[d];
  if (lane == 0) {
    part_ml[idx * 2] = m;
    part_ml[idx * 2 + 1] = l;
  }
}

template <typename OutT>
__global__ void combine_kernel(const float* __restrict__ part_o, const float* __restrict__ part_ml,
                               int S, int D, int Hq, OutT* __restrict__ out, int64_t o_sr,
                               int64_t o_sh) {
  const int item = blockIdx.x, d = threadIdx.x;
  if (d >= D) return;
  const float* ml = part_ml + int64_t(item) * S * 2;
  float M = -INFINITY;
  for (int s = 0; s < S; ++s) M = fmaxf(M, ml[2 * s]);
  float o = 0.f, L = 0.f;
  if (M != -INFINITY) {
    for (int s = 0; s < S; ++s) {
      const float w = exp2f(ml[2 * s] - M);
      o += w * part_o[(int64_t(item) * S + s) * D + d];
      L += w * ml[2 * s + 1];
    }
  }
  const int r = item / Hq, h = item % Hq;
  out[r * o_sr + h * o_sh + d] = from_float<OutT>(L > 0.f ? o / L : 0.f);
}

#ifdef HGA_ATTEND_DEFINE_LAUNCHER  // only in attention_<dtype>.cu: one instantiation each
// Columns [col_begin, col_end) in `splits` splits written to partial slots split_begin..
// of S_total, by attend_heads_kernel (heads) or attend_groups_kernel.
template <typename T>
void launch_attend(const T* q, int64_t q_sr, int64_t q_sh, const T* kv, const T* bank,
                   const int64_t* rows, const uint8_t* token_ok, int R, int Hq, int Hkv, int D,
                   int Gt, int n_shared, int v_off, float qscale, bool heads_kernel, int col_begin,
                   int col_end, int splits, int split_begin, int S_total, float* part_o,
                   float* part_ml, cudaStream_t stream) {
  const int rep = Hq / Hkv;
  const int cps = (col_end - col_begin + splits - 1) / splits;
  if (heads_kernel) {
    const int n_hb = (rep + 7) / 8;
    const dim3 grid(splits, Hkv * n_hb, R);
    const int threads = 32 * (rep < 8 ? rep : 8);
    HGA_DISPATCH_HEAD(D, "attend_groups", [&] {
      attend_heads_kernel<T, kD><<<grid, threads, 0, stream>>>(
          q, q_sr, q_sh, kv, bank, rows, token_ok, Gt, v_off, Hq, rep, n_hb, qscale, col_begin,
          col_end, cps, split_begin, S_total, part_o, part_ml);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const int HB = rep <= 1 ? 1 : rep <= 2 ? 2 : rep <= 4 ? 4 : 8;
  const int n_hb = (rep + HB - 1) / HB;
  const dim3 grid(splits, Hkv * n_hb, R);
  HGA_DISPATCH_HEAD(D, "attend_groups", [&] {
    auto launch = [&](auto hb_const) {
      constexpr int kHB = decltype(hb_const)::value;
      attend_groups_kernel<T, kD, kHB><<<grid, kAttnWarps * 32, 0, stream>>>(
          q, q_sr, q_sh, kv, bank, rows, token_ok, Gt, n_shared, v_off, Hq, rep, n_hb, qscale,
          col_begin, col_end, cps, split_begin, S_total, part_o, part_ml);
    };
    switch (HB) {
      case 1:
        launch(std::integral_constant<int, 1>{});
        break;
      case 2:
        launch(std::integral_constant<int, 2>{});
        break;
      case 4:
        launch(std::integral_constant<int, 4>{});
        break;
      default:
        launch(std::integral_constant<int, 8>{});
        break;
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#define HGA_INSTANTIATE_ATTEND(T)                                                                \
  template void launch_attend<T>(const T*, int64_t, int64_t, const T*, const T*, const int64_t*, \
                                 const uint8_t*, int, int, int, int, int, int, int, float, bool, \
                                 int, int, int, int, int, float*, float*, cudaStream_t);
#endif  // HGA_ATTEND_DEFINE_LAUNCHER

}  // namespace hga
