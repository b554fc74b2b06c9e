// Decode routing: per query head, top-K_c pool chunks by q . chunk summary, then top-G
// groups inside them by q . group summary; emits HGALayer.decode_groups' fixed-width
// list (sinks, local window, own chunk, routed groups ascending) directly.
//
// Two launches.  route_chunks: block (split, kv head, request) scores a slice of the
// pool chunks for all query heads of the KV head (each summary is read once), keeps the
// slice's top-K_c per head.  route_groups: one warp per (request, query head) merges the
// slices' candidates, scores the kept chunks' groups and writes the list.  With
// group_score "sketch" the chunk scoring is route_chunks_sketch (sketch.cu), which hands
// route_groups the candidates' group scores (cand_group) instead of summary rows.
// Ties go to the lower index everywhere (as torch's stable sort in routing.py).

#include "hga_common.cuh"

#include <climits>

namespace hga {
namespace {

constexpr int kRouteWarps = 8;
constexpr int kMaxTopkChunks = 64;

// Dot product of a float4-sliced summary row with q: lane (sub, l8) holds float4s
// (i * 8 + l8) for i < D/32, so 8 lanes cover one D-vector and a warp covers 4 rows.
template <int D>
__device__ __forceinline__ float slice_dot(const float4 (&s)[D / 32], const float* q, int l8) {
  float acc = 0.f;
#pragma unroll
  for (int i = 0; i < D / 32; ++i) {
    const float4 qq = *reinterpret_cast<const float4*>(q + (i * 8 + l8) * 4);
    acc += s[i].x * qq.x + s[i].y * qq.y + s[i].z * qq.z + s[i].w * qq.w;
  }
  acc += __shfl_xor_sync(0xffffffffu, acc, 1);
  acc += __shfl_xor_sync(0xffffffffu, acc, 2);
  acc += __shfl_xor_sync(0xffffffffu, acc, 4);
  return acc;  // every lane of the 8 holds the full dot
}

// group_score "mean_std": alpha * sqrt(max(0, sum_d q_d^2 var_d)) of a variance row held
// as slice_dot's slices; every lane of the 8 gets it.
template <int D>
__device__ __forceinline__ float slice_spread(const float4 (&s)[D / 32], const float* q, int l8,
                                              float alpha) {
  float acc = 0.f;
#pragma unroll
  for (int i = 0; i < D / 32; ++i) {
    const float4 qq = *reinterpret_cast<const float4*>(q + (i * 8 + l8) * 4);
    acc +=
        s[i].x * qq.x * qq.x + s[i].y * qq.y * qq.y + s[i].z * qq.z * qq.z + s[i].w * qq.w * qq.w;
  }
  acc += __shfl_xor_sync(0xffffffffu, acc, 1);
  acc += __shfl_xor_sync(0xffffffffu, acc, 2);
  acc += __shfl_xor_sync(0xffffffffu, acc, 4);
  return alpha * sqrtf(fmaxf(acc, 0.f));
}

template <int D>
__device__ __forceinline__ void load_slices(float4 (&s)[D / 32], const float* row, int l8) {
#pragma unroll
  for (int i = 0; i < D / 32; ++i) s[i] = *reinterpret_cast<const float4*>(row + (i * 8 + l8) * 4);
}

template <typename T, int D>
__global__ void __launch_bounds__(kRouteWarps * 32)
    route_chunks_kernel(const T* __restrict__ q, int64_t q_sr, int64_t q_sh,
                        const int64_t* __restrict__ pos, const int* __restrict__ bt, int64_t bt_sr,
                        const float* __restrict__ summ, int64_t s_sb, int64_t s_sh, int64_t s_sr,
                        int Hq, int rep, int F, int L, int max_group, int spread, float alpha,
                        int Kc, int S, int split_len, float* __restrict__ cand_s,
                        int* __restrict__ cand_i) {
  extern __shared__ float smem[];
  float* q_s = smem;           // [rep][D]
  float* sc = smem + rep * D;  // [rep][split_len]
  const int s = blockIdx.x, kvh = blockIdx.y, r = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t p = pos[r];
  const int64_t c = p < 0 ? -1 : p / kChunk;  // p < 0: a padded row of a CUDA-graph batch
  const int64_t lo = F + int64_t(s) * split_len;
  const int64_t hi = c - L < lo + split_len ? c - L : lo + split_len;  // pool is [F, c - L)
  const int len = hi > lo ? int(hi - lo) : 0;
  if (len == 0) {
    // A slice past this row's pool (the grid is sized for the longest row, or for
    // max_model_len in a CUDA graph) or a padded row: no candidates, nothing read.
    for (int i = threadIdx.x; i < rep * Kc; i += blockDim.x) {
      const int64_t at = ((int64_t(r) * Hq + kvh * rep + i / Kc) * S + s) * Kc + i % Kc;
      cand_s[at] = -INFINITY;
      cand_i[at] = -1;
    }
    return;  // uniform across the block: no __syncthreads is skipped by part of it
  }

  for (int i = threadIdx.x; i < rep * D; i += blockDim.x)
    q_s[i] = to_float(q[r * q_sr + (kvh * rep + i / D) * q_sh + i % D]);
  __syncthreads();

  // Scores of this slice's pool chunks, all heads of the KV head.  U chunk rows per lane
  // group are loaded before any is used, so a warp keeps U * 2 KiB in flight.
  constexpr int U = D >= 256 ? 2 : 4;
  const int sub = lane / 8, l8 = lane % 8;
  for (int base = warp * 4; base < len; base += kRouteWarps * 4 * U) {
    const float* page[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = base + u * kRouteWarps * 4 + sub;
      page[u] = j < len ? summ + int64_t(bt[r * bt_sr + lo + j]) * s_sb + kvh * s_sh : nullptr;
    }
    // chunk score: q . chunk summary (row 0), or max_group: the best q . group summary;
    // with spread (group_score "mean_std", which implies max_group) row 0 holds the
    // chunk's key variance and comes last: every group of the chunk gets the same
    // alpha * sqrt(q^2 . var), so the best group score is max(q . group) + that.
    const int n_rows = max_group ? kGroups + (spread ? 1 : 0) : 1;
    for (int rr = 0; rr < n_rows; ++rr) {
      const int row = max_group ? (rr < kGroups ? 1 + rr : 0) : 0;
      float4 sv[U][D / 32];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (page[u]) {
          load_slices<D>(sv[u], page[u] + row * s_sr, l8);
        } else {
#pragma unroll
          for (int i = 0; i < D / 32; ++i) sv[u][i] = make_float4(0.f, 0.f, 0.f, 0.f);
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int j = base + u * kRouteWarps * 4 + sub;
        // L == 0: the preceding chunk is in the pool and always kept (routing.py).
        const bool forced = L == 0 && lo + j == c - 1;
        // heads unrolled by 8: their dot products and shuffle chains are independent
        for (int h0 = 0; h0 < rep; h0 += 8) {
#pragma unroll
          for (int hh = 0; hh < 8; ++hh) {
            const int h = h0 + hh;
            if (h < rep) {  // uniform across the warp
              float* dst = sc + h * split_len + j;
              if (rr == kGroups) {  // the variance row
                const float sp = slice_spread<D>(sv[u], q_s + h * D, l8, alpha);
                if (page[u] && l8 == 0) *dst = forced ? INFINITY : *dst + sp;
              } else {
                const float v = slice_dot<D>(sv[u], q_s + h * D, l8);
                if (page[u] && l8 == 0) *dst = forced ? INFINITY : rr == 0 ? v : fmaxf(*dst, v);
              }
            }
          }
        }
      }
    }
  }
  __syncthreads();

  // Top-K_c of the slice per head: K_c rounds of warp argmax; taken entries become NaN.
  for (int h = warp; h < rep; h += kRouteWarps) {
    float* row = sc + h * split_len;
    const int64_t out = ((int64_t(r) * Hq + kvh * rep + h) * S + s) * Kc;
    for (int k = 0; k < Kc; ++k) {
      float best;
      int bj;
      warp_take_best(row, len, lane, best, bj);
      const bool found = bj != INT_MAX;
      if (lane == 0) {
        cand_s[out + k] = found ? best : -INFINITY;
        cand_i[out + k] = found ? int(lo + bj) : -1;
      }
    }
  }
}

__device__ __forceinline__ void store_ok(uint8_t* dst, int64_t gid, bool ok, int64_t pos) {
  // token t of group gid is visible when the group is and its position is <= pos
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    uint32_t v = 0;
#pragma unroll
    for (int b = 0; b < 4; ++b) v |= uint32_t(ok && gid * kGroup + i * 4 + b <= pos) << (8 * b);
    w[i] = v;
  }
  *reinterpret_cast<uint4*>(dst) = make_uint4(w[0], w[1], w[2], w[3]);
}

template <typename T, int D>
__global__ void __launch_bounds__(32)
    route_groups_kernel(const T* __restrict__ q, int64_t q_sr, int64_t q_sh,
                        const int64_t* __restrict__ pos, const int* __restrict__ bt, int64_t bt_sr,
                        const float* __restrict__ summ, int64_t s_sb, int64_t s_sh, int64_t s_sr,
                        const float* __restrict__ cand_s, const int* __restrict__ cand_i,
                        const float* __restrict__ cand_g, int n_cand, int Kc, int Hq, int Hkv,
                        int n_chunks, int F, int sinks, int local, int G, int Gt, int spread,
                        float alpha, int64_t* __restrict__ rows, uint8_t* __restrict__ token_ok,
                        int64_t* __restrict__ gid_out) {
  extern __shared__ float smem[];
  float* cs = smem;                                          // [n_cand] candidate scores
  int* ci = reinterpret_cast<int*>(cs + n_cand);             // [n_cand] candidate chunks
  int* kept = ci + n_cand;                                   // [Kc]
  float* gs = reinterpret_cast<float*>(kept + Kc);           // [4 Kc] group scores
  int* gids = reinterpret_cast<int*>(gs + 4 * Kc);           // [4 Kc]
  int* sel = gids + 4 * Kc;                                  // [4 Kc] selected flags
  int* kept_blk = sel + 4 * Kc;                              // [Kc] block ids of kept chunks
  float* kept_sp = reinterpret_cast<float*>(kept_blk + Kc);  // [Kc] spread terms (mean_std)
  int* kept_e = reinterpret_cast<int*>(kept_sp + Kc);  // [Kc] candidate entry of each kept chunk

  const int item = blockIdx.x;  // r * Hq + h
  const int r = item / Hq, h = item % Hq;
  const int kvh = h / (Hq / Hkv);
  const int lane = threadIdx.x;
  const int64_t p = pos[r], c = p / kChunk;
  const int* btr = bt + r * bt_sr;
  const int nfix = (sinks + local + 1) * kGroups;
  const int64_t out = int64_t(item) * Gt;
  if (p < 0) {  // a padded row of a CUDA-graph batch: an empty list (attention gives 0)
    for (int i = lane; i < Gt; i += 32) {
      rows[out + i] = (int64_t(btr[0]) * Hkv + kvh) * 2 * kGroups;  // vLLM's null block
      gid_out[out + i] = 0;
      store_ok(token_ok + (out + i) * kGroup, 0, false, p);
    }
    return;
  }

  for (int e = lane; e < n_cand; e += 32) {
    cs[e] = cand_s[int64_t(item) * n_cand + e];
    ci[e] = cand_i[int64_t(item) * n_cand + e];
  }
  __syncwarp();

  // 1. merge the slices' candidates into the top-K_c chunks
  int nk = 0;
  for (int k = 0; k < Kc; ++k) {
    float best = -INFINITY;
    int bj = INT_MAX, be = -1;
    for (int e = lane; e < n_cand; e += 32) {
      const int j = ci[e];
      if (j >= 0 && better(cs[e], j, best, bj)) {
        best = cs[e];
        bj = j;
        be = e;
      }
    }
    warp_argmax(best, bj, be);
    if (bj == INT_MAX) break;
    if (lane == 0) {
      kept[nk] = bj;
      kept_e[nk] = be;
      cs[be] = NAN;
    }
    ++nk;
    __syncwarp();
  }
  __syncwarp();

  // 2. group scores inside the kept chunks (8 lanes per group row, 16 rows in flight)
  for (int k = lane; k < nk; k += 32) kept_blk[k] = btr[kept[k]];
  __syncwarp();
  const int sub = lane / 8, l8 = lane % 8;
  float4 qv[D / 32];
#pragma unroll
  for (int i = 0; i < D / 32; ++i) {
    const T* qp = q + r * q_sr + h * q_sh + (i * 8 + l8) * 4;
    qv[i] = make_float4(to_float(qp[0]), to_float(qp[1]), to_float(qp[2]), to_float(qp[3]));
  }
  const int ng = nk * kGroups;
  constexpr int U = D >= 256 ? 2 : 4;
  if (cand_g) {  // group_score "sketch": route_chunks_sketch kept the candidates' group scores
    for (int e = lane; e < ng; e += 32) {
      gs[e] = cand_g[(int64_t(item) * n_cand + kept_e[e / kGroups]) * kGroups + e % kGroups];
      gids[e] = kept[e / kGroups] * kGroups + e % kGroups;
    }
  } else if (spread) {  // alpha * sqrt(q^2 . var) per kept chunk (row 0 holds its key variance)
    float4 qsq[D / 32];
#pragma unroll
    for (int i = 0; i < D / 32; ++i)
      qsq[i] =
          make_float4(qv[i].x * qv[i].x, qv[i].y * qv[i].y, qv[i].z * qv[i].z, qv[i].w * qv[i].w);
    for (int k0 = 0; k0 < nk; k0 += 4 * U) {
      float4 sv[U][D / 32];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int k = k0 + 4 * u + sub;
        if (k < nk) {
          load_slices<D>(sv[u], summ + int64_t(kept_blk[k]) * s_sb + kvh * s_sh, l8);
        } else {
#pragma unroll
          for (int i = 0; i < D / 32; ++i) sv[u][i] = make_float4(0.f, 0.f, 0.f, 0.f);
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int k = k0 + 4 * u + sub;
        float acc = 0.f;
#pragma unroll
        for (int i = 0; i < D / 32; ++i)
          acc += sv[u][i].x * qsq[i].x + sv[u][i].y * qsq[i].y + sv[u][i].z * qsq[i].z +
                 sv[u][i].w * qsq[i].w;
        acc += __shfl_xor_sync(0xffffffffu, acc, 1);
        acc += __shfl_xor_sync(0xffffffffu, acc, 2);
        acc += __shfl_xor_sync(0xffffffffu, acc, 4);
        if (k < nk && l8 == 0) kept_sp[k] = alpha * sqrtf(fmaxf(acc, 0.f));
      }
    }
    __syncwarp();
  }
  for (int e0 = 0; e0 < (cand_g ? 0 : ng); e0 += 4 * U) {
    float4 sv[U][D / 32];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int e = e0 + 4 * u + sub;
      if (e < ng) {
        load_slices<D>(
            sv[u],
            summ + int64_t(kept_blk[e / kGroups]) * s_sb + kvh * s_sh + (1 + e % kGroups) * s_sr,
            l8);
      } else {
#pragma unroll
        for (int i = 0; i < D / 32; ++i) sv[u][i] = make_float4(0.f, 0.f, 0.f, 0.f);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int e = e0 + 4 * u + sub;
      float acc = 0.f;
#pragma unroll
      for (int i = 0; i < D / 32; ++i)
        acc += sv[u][i].x * qv[i].x + sv[u][i].y * qv[i].y + sv[u][i].z * qv[i].z +
               sv[u][i].w * qv[i].w;
      acc += __shfl_xor_sync(0xffffffffu, acc, 1);
      acc += __shfl_xor_sync(0xffffffffu, acc, 2);
      acc += __shfl_xor_sync(0xffffffffu, acc, 4);
      if (e < ng && l8 == 0) {
        gs[e] = spread ? acc + kept_sp[e / kGroups] : acc;
        gids[e] = kept[e / kGroups] * kGroups + e % kGroups;
      }
    }
  }
  __syncwarp();

  // 3. top-G groups (ties to the lower group id): a group is kept when fewer than G
  // others beat it.  Score keys (NaN lowest) and distinct group ids make this a total
  // order, so exactly min(G, ng) are kept; the ng compares per entry are independent,
  // unlike a warp reduction per kept group.
  const int ns = min(G, ng);
  for (int e = lane; e < ng; e += 32) {
    const unsigned key = order_key(gs[e]);
    int beaten_by = 0;
    if (ns < ng)
      for (int e2 = 0; e2 < ng; ++e2) {
        const unsigned k2 = order_key(gs[e2]);
        beaten_by += k2 > key || (k2 == key && gids[e2] < gids[e]);
      }
    sel[e] = beaten_by < ns;
  }
  __syncwarp();

  // 4. the list: fixed chunks, then routed groups ascending, then invalid padding
  for (int e = lane; e < ng; e += 32) {
    if (!sel[e]) continue;
    int rank = 0;
    for (int e2 = 0; e2 < ng; ++e2) rank += sel[e2] && gids[e2] < gids[e];
    const int64_t g = gids[e], blk = btr[g / kGroups];
    const int64_t col = out + nfix + rank;
    rows[col] = ((blk * Hkv + kvh) * 2) * kGroups + g % kGroups;
    gid_out[col] = g;
    store_ok(token_ok + col * kGroup, g, true, p);
  }
  for (int i = nfix + ns + lane; i < Gt; i += 32) {
    rows[out + i] = (int64_t(btr[0]) * Hkv + kvh) * 2 * kGroups;
    gid_out[out + i] = 0;
    store_ok(token_ok + (out + i) * kGroup, 0, false, p);
  }
  for (int f = lane; f < nfix; f += 32) {
    const int slot = f / kGroups, m = f % kGroups;
    int64_t j;
    bool ok;
    if (slot < sinks) {
      j = slot;
      ok = j < c;
    } else if (slot < sinks + local) {
      j = c - local + (slot - sinks);
      ok = j >= F && j >= 0;
    } else {
      j = c;
      ok = true;
    }
    const int64_t jc = j > 0 ? j : 0;
    const int64_t blk = btr[jc < n_chunks - 1 ? jc : n_chunks - 1];
    rows[out + f] = ((blk * Hkv + kvh) * 2) * kGroups + m;
    gid_out[out + f] = jc * kGroups + m;
    store_ok(token_ok + (out + f) * kGroup, jc * kGroups + m, ok, p);
  }
}

// Decode routing from every pool chunk's scores (score_chunks_sketch): block (request,
// query head) finds the K_c-th best chunk score by a 4-pass radix select over order keys,
// keeps the chunks above it and the lowest-index ties, then picks and writes the groups as
// route_groups does.  Every step is a block-wide pass, none a serial round per kept entry.
constexpr int kSelectThreads = 256;

// Histogram of the digit at `shift` of the keys matching prefix under mask (warp-aggregated:
// near-equal scores share their high digits, so most keys hit a few bins).
__device__ __forceinline__ void digit_histogram(const unsigned* keys, int n, unsigned prefix,
                                                unsigned mask, int shift, int* hist) {
  for (int j0 = 0; j0 < n; j0 += kSelectThreads) {
    const int j = j0 + threadIdx.x;
    const unsigned key = j < n ? keys[j] : 0u;
    const int digit = j < n && (key & mask) == prefix ? int((key >> shift) & 255u) : -1;
    const unsigned peers = __match_any_sync(0xffffffffu, digit);
    if (digit >= 0 && (threadIdx.x % 32) == __ffs(peers) - 1)
      atomicAdd(&hist[digit], __popc(peers));
  }
}

// Block-wide exclusive prefix sum of v (kSelectThreads threads); total to every thread.
__device__ __forceinline__ int block_exclusive_sum(int v, int* warp_sums, int& total) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int incl = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int t = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += t;
  }
  if (lane == 31) warp_sums[warp] = incl;
  __syncthreads();
  int base = 0;
  total = 0;
#pragma unroll
  for (int w = 0; w < kSelectThreads / 32; ++w) {
    base += w < warp ? warp_sums[w] : 0;
    total += warp_sums[w];
  }
  __syncthreads();  // warp_sums may be reused
  return base + incl - v;
}

__global__ void __launch_bounds__(kSelectThreads)
    route_select_kernel(const int64_t* __restrict__ pos, const int* __restrict__ bt, int64_t bt_sr,
                        const float* __restrict__ sc, const float* __restrict__ gsc, int P, int Kc,
                        int Hq, int Hkv, int n_chunks, int F, int L, int sinks, int local, int G,
                        int Gt, int64_t* __restrict__ rows, uint8_t* __restrict__ token_ok,
                        int64_t* __restrict__ gid_out) {
  extern __shared__ unsigned keys[];  // [P] order keys of the row's chunk scores
  __shared__ int hist[256];
  __shared__ int kept[kMaxTopkChunks];
  __shared__ float gs[kGroups * kMaxTopkChunks];
  __shared__ int gids[kGroups * kMaxTopkChunks];
  __shared__ int sel[kGroups * kMaxTopkChunks];
  __shared__ int warp_sums[kSelectThreads / 32];
  __shared__ unsigned s_prefix;
  __shared__ int s_need, s_nk;

  const int item = blockIdx.x;  // r * Hq + h
  const int r = item / Hq, h = item % Hq;
  const int kvh = h / (Hq / Hkv);
  const int tid = threadIdx.x, T = kSelectThreads;
  const int64_t p = pos[r];
  const int* btr = bt + r * bt_sr;
  const int nfix = (sinks + local + 1) * kGroups;
  const int64_t out = int64_t(item) * Gt;
  if (p < 0) {  // a padded row of a CUDA-graph batch: an empty list (attention gives 0)
    for (int i = tid; i < Gt; i += T) {
      rows[out + i] = (int64_t(btr[0]) * Hkv + kvh) * 2 * kGroups;  // vLLM's null block
      gid_out[out + i] = 0;
      store_ok(token_ok + (out + i) * kGroup, 0, false, p);
    }
    return;
  }
  const int64_t c = p / kChunk;
  const int n = int(c - L - F < 0 ? 0 : (c - L - F < P ? c - L - F : P));
  const float* sc_r = sc + int64_t(item) * P;
  for (int j = tid; j < n; j += T) keys[j] = order_key(sc_r[j]);
  if (tid == 0) s_nk = 0;
  __syncthreads();

  if (n <= Kc || Kc == 0) {  // the whole pool is kept (or nothing is routed)
    const int keep = n < Kc ? n : Kc;
    for (int j = tid; j < keep; j += T) kept[j] = j;
    if (tid == 0) s_nk = keep;
  } else {
    // 1. the K_c-th largest key, one 8-bit digit per pass; need = how many of its ties to keep
    unsigned prefix = 0u, mask = 0u;
    int need = Kc;
    for (int shift = 24; shift >= 0; shift -= 8) {
      hist[tid] = 0;  // T == 256 bins
      __syncthreads();
      digit_histogram(keys, n, prefix, mask, shift, hist);
      __syncthreads();
      if (tid < 32) {  // lane l holds bins 255 - 8l ... 248 - 8l, scanned from the top
        int cnt[8], sum = 0;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          cnt[i] = hist[255 - 8 * tid - i];
          sum += cnt[i];
        }
        int incl = sum;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
          const int t = __shfl_up_sync(0xffffffffu, incl, o);
          if (tid >= o) incl += t;
        }
        int acc = incl - sum;
        if (acc < need && need <= incl) {
#pragma unroll
          for (int i = 0; i < 8; ++i) {
            if (acc + cnt[i] >= need) {
              s_prefix = prefix | (unsigned(255 - 8 * tid - i) << shift);
              s_need = need - acc;
              break;
            }
            acc += cnt[i];
          }
        }
      }
      __syncthreads();
      prefix = s_prefix;
      need = s_need;
      mask |= 255u << shift;
    }
    // 2. keep keys above it, and its first `need` ties in index order (thread t scans a
    // contiguous range, so a block prefix sum orders the ties)
    const int per = (n + T - 1) / T;
    const int a = tid * per < n ? tid * per : n, b = a + per < n ? a + per : n;
    int ties = 0;
    for (int j = a; j < b; ++j) ties += keys[j] == prefix;
    int total;
    int rank = block_exclusive_sum(ties, warp_sums, total);
    for (int j = a; j < b; ++j) {
      const unsigned key = keys[j];
      bool keep = key > prefix;
      if (key == prefix) keep = rank++ < need;
      if (keep) kept[atomicAdd(&s_nk, 1)] = j;
    }
  }
  __syncthreads();

  // 3. the kept chunks' group scores; top-G by rank (ties to the lower group id)
  const int nk = s_nk, ng = nk * kGroups;
  for (int e = tid; e < ng; e += T) {
    const int j = kept[e / kGroups];
    gs[e] = gsc[(int64_t(item) * P + j) * kGroups + e % kGroups];
    gids[e] = (F + j) * kGroups + e % kGroups;
  }
  __syncthreads();
  const int ns = min(G, ng);
  for (int e = tid; e < ng; e += T) {
    const unsigned key = order_key(gs[e]);
    int beaten_by = 0;
    if (ns < ng)
      for (int e2 = 0; e2 < ng; ++e2) {
        const unsigned k2 = order_key(gs[e2]);
        beaten_by += k2 > key || (k2 == key && gids[e2] < gids[e]);
      }
    sel[e] = beaten_by < ns;
  }
  __syncthreads();

  // 4. the list (route_groups' step 4): fixed chunks, routed groups ascending, padding
  for (int e = tid; e < ng; e += T) {
    if (!sel[e]) continue;
    int at = 0;
    for (int e2 = 0; e2 < ng; ++e2) at += sel[e2] && gids[e2] < gids[e];
    const int64_t g = gids[e], blk = btr[g / kGroups];
    const int64_t col = out + nfix + at;
    rows[col] = ((blk * Hkv + kvh) * 2) * kGroups + g % kGroups;
    gid_out[col] = g;
    store_ok(token_ok + col * kGroup, g, true, p);
  }
  for (int i = nfix + ns + tid; i < Gt; i += T) {
    rows[out + i] = (int64_t(btr[0]) * Hkv + kvh) * 2 * kGroups;
    gid_out[out + i] = 0;
    store_ok(token_ok + (out + i) * kGroup, 0, false, p);
  }
  for (int f = tid; f < nfix; f += T) {
    const int slot = f / kGroups, m = f % kGroups;
    int64_t j;
    bool ok;
    if (slot < sinks) {
      j = slot;
      ok = j < c;
    } else if (slot < sinks + local) {
      j = c - local + (slot - sinks);
      ok = j >= F && j >= 0;
    } else {
      j = c;
      ok = true;
    }
    const int64_t jc = j > 0 ? j : 0;
    const int64_t blk = btr[jc < n_chunks - 1 ? jc : n_chunks - 1];
    rows[out + f] = ((blk * Hkv + kvh) * 2) * kGroups + m;
    gid_out[out + f] = jc * kGroups + m;
    store_ok(token_ok + (out + f) * kGroup, jc * kGroups + m, ok, p);
  }
}

struct RouteArgs {
  int R, Hq, Hkv, D;
  int64_t q_sr, q_sh, bt_sr, s_sb, s_sh, s_sr;
};

RouteArgs check_route_inputs(const at::Tensor& q, const at::Tensor& pos, const at::Tensor& bt,
                             const at::Tensor& summ) {
  check_cuda(q, "q");
  HGA_CHECK(q.dim() == 3 && q.stride(2) == 1, "q must be [R, Hq, D] with a contiguous last dim");
  HGA_CHECK(summ.dim() == 4 && summ.size(2) == 1 + kGroups && summ.size(3) == q.size(2) &&
                summ.stride(3) == 1 && summ.scalar_type() == at::kFloat,
            "summ must be float32 [blocks, H_kv, 5, D]");
  HGA_CHECK(pos.scalar_type() == at::kLong && pos.is_contiguous() && pos.numel() == q.size(0),
            "pos must be int64 [R]");
  HGA_CHECK(
      bt.scalar_type() == at::kInt && bt.dim() == 2 && bt.stride(1) == 1 && bt.size(0) == q.size(0),
      "block_table must be int32 [R, max_blocks] (one row per decode query)");
  const int Hq = q.size(1), Hkv = summ.size(1);
  HGA_CHECK(Hq % Hkv == 0, "query heads must be a multiple of KV heads");
  HGA_CHECK(reinterpret_cast<uintptr_t>(summ.data_ptr()) % 16 == 0 && summ.stride(0) % 4 == 0 &&
                summ.stride(1) % 4 == 0 && summ.stride(2) % 4 == 0,
            "summ rows must be 16-byte aligned");
  return {int(q.size(0)),
          Hq,
          Hkv,
          int(q.size(2)),
          q.stride(0),
          q.stride(1),
          bt.stride(0),
          summ.stride(0),
          summ.stride(1),
          summ.stride(2)};
}

void route_chunks(at::Tensor q, at::Tensor pos, at::Tensor bt, at::Tensor summ, int64_t sink_chunks,
                  int64_t local_chunks, int64_t max_group, int64_t spread, double alpha,
                  int64_t split_len, at::Tensor cand_score, at::Tensor cand_idx) {
  const RouteArgs a = check_route_inputs(q, pos, bt, summ);
  HGA_CHECK(cand_score.dim() == 4 && cand_score.size(0) == a.R && cand_score.size(1) == a.Hq &&
                cand_score.is_contiguous() && cand_idx.is_contiguous() &&
                cand_idx.sizes() == cand_score.sizes() && cand_score.scalar_type() == at::kFloat &&
                cand_idx.scalar_type() == at::kInt,
            "cand_score/cand_idx must be float32/int32 [R, Hq, splits, K_c]");
  const int S = cand_score.size(2), Kc = cand_score.size(3);
  HGA_CHECK(!spread || max_group, "the spread term (group_score mean_std) needs max_group");
  if (a.R == 0 || S == 0 || Kc == 0) return;
  HGA_CHECK(Kc <= kMaxTopkChunks, "topk_chunks above ", kMaxTopkChunks, " not compiled");
  const int rep = a.Hq / a.Hkv;
  const size_t smem = size_t(rep) * (a.D + split_len) * sizeof(float);
  const c10::cuda::CUDAGuard guard(q.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(S, a.Hkv, a.R);
  HGA_DISPATCH_FLOAT(q.scalar_type(), "route_chunks", [&] {
    HGA_DISPATCH_HEAD(a.D, "route_chunks", [&] {
      auto kernel = route_chunks_kernel<scalar_t, kD>;
      if (smem > 48 * 1024)
        C10_CUDA_CHECK(
            cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
      kernel<<<grid, kRouteWarps * 32, smem, stream>>>(
          reinterpret_cast<const scalar_t*>(q.data_ptr()), a.q_sr, a.q_sh, pos.data_ptr<int64_t>(),
          bt.data_ptr<int>(), a.bt_sr, summ.data_ptr<float>(), a.s_sb, a.s_sh, a.s_sr, a.Hq, rep,
          int(sink_chunks), int(local_chunks), int(max_group != 0), int(spread != 0), float(alpha),
          Kc, S, int(split_len), cand_score.data_ptr<float>(), cand_idx.data_ptr<int>());
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void route_groups(at::Tensor q, at::Tensor pos, at::Tensor bt, at::Tensor summ,
                  at::Tensor cand_score, at::Tensor cand_idx, int64_t n_chunks, int64_t sink_chunks,
                  int64_t local_chunks, int64_t sinks, int64_t local, int64_t spread, double alpha,
                  at::Tensor rows, at::Tensor token_ok, at::Tensor gid,
                  const std::optional<at::Tensor>& cand_group) {
  const RouteArgs a = check_route_inputs(q, pos, bt, summ);
  const int S = cand_score.size(2), Kc = cand_score.size(3);
  const float* cand_g = nullptr;
  if (cand_group.has_value()) {  // group scores of the candidates (route_chunks_sketch)
    const at::Tensor& g = *cand_group;
    HGA_CHECK(g.is_cuda() && g.scalar_type() == at::kFloat && g.is_contiguous() && g.dim() == 5 &&
                  g.size(0) == a.R && g.size(1) == a.Hq && g.size(2) == S && g.size(3) == Kc &&
                  g.size(4) == kGroups,
              "cand_group must be float32 [R, Hq, splits, K_c, 4] like cand_score");
    HGA_CHECK(!spread, "cand_group replaces the summary group scores; no spread term with it");
    if (S * Kc) cand_g = g.data_ptr<float>();
  }
  HGA_CHECK(Kc <= kMaxTopkChunks, "topk_chunks above ", kMaxTopkChunks, " not compiled");
  HGA_CHECK(rows.dim() == 3 && rows.size(0) == a.R && rows.size(1) == a.Hq &&
                rows.is_contiguous() && rows.scalar_type() == at::kLong &&
                gid.sizes() == rows.sizes() && gid.is_contiguous() &&
                gid.scalar_type() == at::kLong,
            "rows/gid must be int64 [R, Hq, Gt]");
  const int Gt = rows.size(2);
  HGA_CHECK(token_ok.dim() == 4 && token_ok.size(3) == kGroup &&
                token_ok.numel() == rows.numel() * kGroup && token_ok.is_contiguous() &&
                token_ok.element_size() == 1,
            "token_ok must be bool [R, Hq, Gt, 16]");
  const int nfix = (sinks + local + 1) * kGroups;
  HGA_CHECK(Gt >= nfix && n_chunks >= 1 && bt.size(1) >= n_chunks, "bad list width or n_chunks");
  if (a.R == 0) return;
  const int n_cand = S * Kc;
  const size_t smem = size_t(2 * n_cand + 4 * Kc + 3 * 4 * Kc) * 4;
  const c10::cuda::CUDAGuard guard(q.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  HGA_DISPATCH_FLOAT(q.scalar_type(), "route_groups", [&] {
    HGA_DISPATCH_HEAD(a.D, "route_groups", [&] {
      auto kernel = route_groups_kernel<scalar_t, kD>;
      if (smem > 48 * 1024)
        C10_CUDA_CHECK(
            cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
      kernel<<<a.R * a.Hq, 32, smem, stream>>>(
          reinterpret_cast<const scalar_t*>(q.data_ptr()), a.q_sr, a.q_sh, pos.data_ptr<int64_t>(),
          bt.data_ptr<int>(), a.bt_sr, summ.data_ptr<float>(), a.s_sb, a.s_sh, a.s_sr,
          n_cand ? cand_score.data_ptr<float>() : nullptr,
          n_cand ? cand_idx.data_ptr<int>() : nullptr, cand_g, n_cand, Kc, a.Hq, a.Hkv,
          int(n_chunks), int(sink_chunks), int(sinks), int(local), Gt - nfix, Gt, int(spread != 0),
          float(alpha), rows.data_ptr<int64_t>(), reinterpret_cast<uint8_t*>(token_ok.data_ptr()),
          gid.data_ptr<int64_t>());
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void route_select(at::Tensor pos, at::Tensor bt, at::Tensor scores, at::Tensor group_scores,
                  int64_t num_kv_heads, int64_t n_chunks, int64_t sink_chunks, int64_t local_chunks,
                  int64_t sinks, int64_t local, int64_t topk_chunks, at::Tensor rows,
                  at::Tensor token_ok, at::Tensor gid) {
  check_cuda(scores, "scores");
  HGA_CHECK(scores.dim() == 3 && scores.is_contiguous() && scores.scalar_type() == at::kFloat,
            "scores must be float32 [R, Hq, P]");
  const int R = scores.size(0), Hq = scores.size(1), P = scores.size(2);
  const int Hkv = int(num_kv_heads);
  HGA_CHECK(Hkv >= 1 && Hq % Hkv == 0, "query heads must be a multiple of KV heads");
  HGA_CHECK(group_scores.dim() == 4 && group_scores.size(0) == R && group_scores.size(1) == Hq &&
                group_scores.size(2) == P && group_scores.size(3) == kGroups &&
                group_scores.is_contiguous() && group_scores.scalar_type() == at::kFloat,
            "group_scores must be float32 [R, Hq, P, 4]");
  HGA_CHECK(pos.scalar_type() == at::kLong && pos.is_contiguous() && pos.numel() == R,
            "pos must be int64 [R]");
  HGA_CHECK(bt.scalar_type() == at::kInt && bt.dim() == 2 && bt.stride(1) == 1 && bt.size(0) == R,
            "block_table must be int32 [R, max_blocks] (one row per decode query)");
  HGA_CHECK(topk_chunks >= 0 && topk_chunks <= kMaxTopkChunks, "topk_chunks above ", kMaxTopkChunks,
            " not compiled");
  HGA_CHECK(rows.dim() == 3 && rows.size(0) == R && rows.size(1) == Hq && rows.is_contiguous() &&
                rows.scalar_type() == at::kLong && gid.sizes() == rows.sizes() &&
                gid.is_contiguous() && gid.scalar_type() == at::kLong,
            "rows/gid must be int64 [R, Hq, Gt]");
  const int Gt = rows.size(2);
  HGA_CHECK(token_ok.dim() == 4 && token_ok.size(3) == kGroup &&
                token_ok.numel() == rows.numel() * kGroup && token_ok.is_contiguous() &&
                token_ok.element_size() == 1,
            "token_ok must be bool [R, Hq, Gt, 16]");
  const int nfix = (sinks + local + 1) * kGroups;
  HGA_CHECK(Gt >= nfix && n_chunks >= 1 && bt.size(1) >= n_chunks, "bad list width or n_chunks");
  HGA_CHECK(bt.size(1) >= sink_chunks + P, "block_table narrower than the pool");
  if (R == 0) return;
  const size_t smem = size_t(P) * sizeof(unsigned);
  HGA_CHECK(smem <= 160 * 1024, "route_select: a pool of ", P,
            " chunks does not fit shared memory");
  const c10::cuda::CUDAGuard guard(scores.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (smem > 40 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(route_select_kernel,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  route_select_kernel<<<R * Hq, kSelectThreads, smem, stream>>>(
      pos.data_ptr<int64_t>(), bt.data_ptr<int>(), bt.stride(0), scores.data_ptr<float>(),
      group_scores.data_ptr<float>(), P, int(topk_chunks), Hq, Hkv, int(n_chunks), int(sink_chunks),
      int(local_chunks), int(sinks), int(local), Gt - nfix, Gt, rows.data_ptr<int64_t>(),
      reinterpret_cast<uint8_t*>(token_ok.data_ptr()), gid.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace hga

TORCH_LIBRARY_IMPL(vllm_hga, CUDA, m) {
  m.impl("route_chunks", &hga::route_chunks);
  m.impl("route_groups", &hga::route_groups);
  m.impl("route_select", &hga::route_select);
}
