// group_score "sketch": the 2-bit key pages of closing chunks and the decode chunk routing
// that reads them.
//
// sketch_pages writes, per chunk and KV head, the page torch_ops.pack_sketch builds: row 0
// the float16 grid (lo[D] then step[D]), rows 1..4 the 2-bit codes of each group's 16 keys,
// token-major, 16 channels per 32-bit word.  The codes are a definition (reference.py
// sketch_grid / sketch_codes), so the arithmetic is IEEE round-to-nearest in inline PTX:
// the extension is built with --use_fast_math, which would otherwise approximate the
// division and flush subnormals.
//
// route_chunks_sketch is route_chunks (routing.cu) for sketch pages: block (split, KV head,
// request), one warp per pool chunk scores the chunk's 64 keys k_hat = lo + step * code for
// all query heads of the KV head, a group score is the logsumexp of its 16 key scores
// (scaled by 1/sqrt(D), routing._sketch_scores) and the chunk score the best group score
// (chunk_score "max_group", which config requires with sketch).  Each candidate also keeps
// its 4 group scores (cand_group), so route_groups does not decode the pages again.  The
// key scores run on tensor cores (sketch_chunk_scores_tc) or, with tensor_cores=0, on
// CUDA cores (sketch_chunk_scores); both are kept so benchmarks can compare them.

#include "hga_common.cuh"

#include <climits>

namespace hga {
namespace {

constexpr int kSketchWarps = 8;
constexpr int kMaxTopk = 64;  // routing.cu kMaxTopkChunks
constexpr float kF16Max = 65504.f;
constexpr float kLevels = 3.f;  // 2-bit codes 0..3

__device__ __forceinline__ float ieee_sub(float a, float b) {
  float r;
  asm("sub.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ float ieee_div(float a, float b) {
  float r;
  asm("div.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ float ieee_min(float a, float b) {
  float r;
  asm("min.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ float ieee_max(float a, float b) {
  float r;
  asm("max.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
// round half to even (torch.round)
__device__ __forceinline__ float ieee_rint(float a) {
  float r;
  asm("cvt.rni.f32.f32 %0, %1;" : "=f"(r) : "f"(a));
  return r;
}
// float32 -> float16 bits, round to nearest even, subnormals kept
__device__ __forceinline__ unsigned short ieee_half_bits(float a) {
  unsigned short r;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(a));
  return r;
}
__device__ __forceinline__ float half_bits_to_float(unsigned short h) {
  float r;
  asm("cvt.f32.f16 %0, %1;" : "=f"(r) : "h"(h));
  return r;
}

// Thread d of block (i, h) handles channel d of chunk blocks_in[i], KV head h: the grid
// from the chunk's min/max, then each key's code, ORed with the 15 other channels of its
// 16-lane word by shuffles; entries < 0 are skipped (a CUDA-graph step's padding).
template <typename T>
__global__ void sketch_pages_kernel(const T* __restrict__ k, int64_t k_sb, int64_t k_st,
                                    int64_t k_sh, const int64_t* __restrict__ blocks_in,
                                    float* __restrict__ out, int64_t o_sb, int64_t o_sh,
                                    int64_t o_sr, const int64_t* __restrict__ blocks_out, int D) {
  const int d = threadIdx.x;
  const int i = blockIdx.x, h = blockIdx.y;
  if (blocks_in[i] < 0 || blocks_out[i] < 0) return;  // uniform: whole block leaves
  const T* base = k + blocks_in[i] * k_sb + h * k_sh + d;
  float* page = out + blocks_out[i] * o_sb + h * o_sh;
  float mn = kF16Max, mx = -kF16Max;
#pragma unroll 8
  for (int t = 0; t < kChunk; ++t) {
    const float x = ieee_min(ieee_max(to_float(base[t * k_st]), -kF16Max), kF16Max);
    mn = ieee_min(mn, x);
    mx = ieee_max(mx, x);
  }
  const unsigned short lo_h = ieee_half_bits(mn);
  const float lo = half_bits_to_float(lo_h);
  const unsigned short step_h = ieee_half_bits(ieee_div(ieee_sub(mx, lo), kLevels));
  const float step = half_bits_to_float(step_h);
  const float div = ieee_max(step, 1.17549435e-38f);  // torch.finfo(float32).tiny
  unsigned short* grid = reinterpret_cast<unsigned short*>(page);
  grid[d] = lo_h;
  grid[D + d] = step_h;
  const int words = D / 16;  // words per key in a code row
#pragma unroll 4
  for (int t = 0; t < kChunk; ++t) {
    const float x = ieee_min(ieee_max(to_float(base[t * k_st]), -kF16Max), kF16Max);
    const float c = ieee_min(ieee_max(ieee_rint(ieee_div(ieee_sub(x, lo), div)), 0.f), kLevels);
    uint32_t w = uint32_t(c) << (2 * (d % 16));
    w |= __shfl_xor_sync(0xffffffffu, w, 1);
    w |= __shfl_xor_sync(0xffffffffu, w, 2);
    w |= __shfl_xor_sync(0xffffffffu, w, 4);
    w |= __shfl_xor_sync(0xffffffffu, w, 8);
    if (d % 16 == 0) {
      uint32_t* row = reinterpret_cast<uint32_t*>(page + (1 + t / kGroup) * o_sr);
      row[(t % kGroup) * words + d / 16] = w;
    }
  }
}

void sketch_pages(at::Tensor k, at::Tensor blocks_in, at::Tensor out, at::Tensor blocks_out) {
  check_cuda(k, "k");
  HGA_CHECK(k.dim() == 4 && k.size(1) == kChunk && k.stride(3) == 1,
            "k must be [blocks, 64, H, D] with a contiguous last dim (any other strides)");
  const int H = k.size(2), D = k.size(3);
  HGA_CHECK(D == 64 || D == 128 || D == 256, "sketch pages: head size ", D,
            " not compiled (64/128/256)");
  HGA_CHECK(out.dim() == 4 && out.size(1) == H && out.size(2) == 1 + kGroups && out.size(3) == D &&
                out.stride(3) == 1 && out.scalar_type() == at::kFloat,
            "out must be float32 [blocks, H, 5, D] with a contiguous last dim");
  HGA_CHECK(reinterpret_cast<uintptr_t>(out.data_ptr()) % 4 == 0, "out must be 4-byte aligned");
  const int n = blocks_in.numel();
  HGA_CHECK(blocks_out.numel() == n && blocks_in.scalar_type() == at::kLong &&
                blocks_out.scalar_type() == at::kLong && blocks_in.is_contiguous() &&
                blocks_out.is_contiguous(),
            "blocks_in/blocks_out must be int64 of equal length");
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(n, H);
  HGA_DISPATCH_FLOAT(k.scalar_type(), "sketch_pages", [&] {
    sketch_pages_kernel<scalar_t><<<grid, D, 0, stream>>>(
        reinterpret_cast<const scalar_t*>(k.data_ptr()), k.stride(0), k.stride(1), k.stride(2),
        blocks_in.data_ptr<int64_t>(), out.data_ptr<float>(), out.stride(0), out.stride(1),
        out.stride(2), blocks_out.data_ptr<int64_t>(), D);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Scores of one sketch chunk for heads h0..h0+7 of the KV head: lane l holds keys l
// (group l / 16) and l + 32 (group 2 + l / 16); returns per head the group scores of the
// lane's two keys' groups in (ga, gb), every lane of the 16 holding its group's value.
template <int D>
__device__ __forceinline__ void sketch_chunk_scores(const uint32_t (&wa)[D / 16],
                                                    const uint32_t (&wb)[D / 16], const float* lo_s,
                                                    const float* step_s, const float* q_s, int h0,
                                                    int nh, float (&ga)[8], float (&gb)[8]) {
  float acc_a[8], acc_b[8];
#pragma unroll
  for (int hh = 0; hh < 8; ++hh) acc_a[hh] = acc_b[hh] = 0.f;
#pragma unroll
  for (int w = 0; w < D / 16; ++w) {  // fully unrolled: wa/wb stay in registers
#pragma unroll
    for (int b = 0; b < 16; ++b) {
      const int d = w * 16 + b;
      const float lo = lo_s[d], st = step_s[d];
      const float ka = fmaf(st, float((wa[w] >> (2 * b)) & 3u), lo);
      const float kb = fmaf(st, float((wb[w] >> (2 * b)) & 3u), lo);
#pragma unroll
      for (int hh = 0; hh < 8; ++hh) {
        if (hh < nh) {
          const float qv = q_s[(h0 + hh) * D + d];
          acc_a[hh] = fmaf(qv, ka, acc_a[hh]);
          acc_b[hh] = fmaf(qv, kb, acc_b[hh]);
        }
      }
    }
  }
  // logsumexp over the 16 lanes of each half-warp (one group's keys)
#pragma unroll
  for (int hh = 0; hh < 8; ++hh) {
    float ma = acc_a[hh], mb = acc_b[hh];
#pragma unroll
    for (int o = 8; o >= 1; o >>= 1) {
      ma = fmaxf(ma, __shfl_xor_sync(0xffffffffu, ma, o));
      mb = fmaxf(mb, __shfl_xor_sync(0xffffffffu, mb, o));
    }
    float sa = __expf(acc_a[hh] - ma), sb = __expf(acc_b[hh] - mb);
#pragma unroll
    for (int o = 8; o >= 1; o >>= 1) {
      sa += __shfl_xor_sync(0xffffffffu, sa, o);
      sb += __shfl_xor_sync(0xffffffffu, sb, o);
    }
    ga[hh] = ma + __logf(sa);
    gb[hh] = mb + __logf(sb);
  }
}

// One warp's scores of one sketch chunk on CUDA cores, written to sc / gsc (slot j).
template <int D>
__device__ __forceinline__ void sketch_chunk_scores_cuda_cores(
    const float* page, int64_t s_sr, const float* lo_s, const float* step_s, const float* q_s,
    int rep, int lane, bool forced, int64_t split_len, int64_t j, float* sc, float* gsc) {
  const int ia = lane % kGroup;  // key index inside its group
  uint32_t wa[D / 16], wb[D / 16];
  const uint4* ra =
      reinterpret_cast<const uint4*>(page + (1 + lane / kGroup) * s_sr) + ia * (D / 64);
  const uint4* rb =
      reinterpret_cast<const uint4*>(page + (3 + lane / kGroup) * s_sr) + ia * (D / 64);
#pragma unroll
  for (int v = 0; v < D / 64; ++v) {
    const uint4 a = ra[v], b = rb[v];
    wa[4 * v] = a.x;
    wa[4 * v + 1] = a.y;
    wa[4 * v + 2] = a.z;
    wa[4 * v + 3] = a.w;
    wb[4 * v] = b.x;
    wb[4 * v + 1] = b.y;
    wb[4 * v + 2] = b.z;
    wb[4 * v + 3] = b.w;
  }
  __syncwarp();
  for (int h0 = 0; h0 < rep; h0 += 8) {
    float ga[8], gb[8];
    sketch_chunk_scores<D>(wa, wb, lo_s, step_s, q_s, h0, rep - h0, ga, gb);
#pragma unroll
    for (int hh = 0; hh < 8; ++hh) {
      const int h = h0 + hh;
      if (h >= rep) break;  // uniform across the warp
      // lanes 0 and 16 hold groups (0, 2) and (1, 3)
      const float other_a = __shfl_xor_sync(0xffffffffu, ga[hh], 16);
      const float other_b = __shfl_xor_sync(0xffffffffu, gb[hh], 16);
      if (lane == 0) {
        float* g = gsc + (h * split_len + j) * kGroups;
        g[0] = ga[hh];
        g[1] = other_a;
        g[2] = gb[hh];
        g[3] = other_b;
        const float best = fmaxf(fmaxf(ga[hh], other_a), fmaxf(gb[hh], other_b));
        sc[h * split_len + j] = forced ? INFINITY : best;
      }
    }
  }
}

// The same scores on tensor cores.  A chunk's key scores for 8 query heads are one
// [64 keys x D] x [D x 8 heads] product: q . k_hat = q . lo + sum_d (q_d step_d) code_d, the
// codes (0..3) exact in bf16 as the A operand, B = q * step split into bf16 hi + lo parts
// (two mma.sync m16n8k16 per k-step, ~16 significant bits: float32 routing up to near-ties)
// and q . lo in float32.  Within a k-step the dims are permuted (both operands alike) so
// that one shift and mask of a code word give a lane its A elements:
//   k = 2c, 2c+1, 2c+8, 2c+9  <->  dims 16w + c, +8, +4, +12   (c = lane % 4).
// Fragment layout (PTX m16n8k16): A rows are keys g = lane / 4 and g + 8 of a group, B
// column and C columns are heads; C row g holds heads 2c, 2c+1.
__device__ __forceinline__ void mma_bf16_16816(float (&acc)[4], const uint32_t (&a)[4], uint32_t b0,
                                               uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two 2-bit codes at bits 0-1 and 16-17 of x as exact bf16x2 values (128 + code - 128).
__device__ __forceinline__ uint32_t codes_bf16x2(uint32_t x) {
  const uint32_t v = (x & 0x00030003u) | 0x43004300u;
  __nv_bfloat162 h = *reinterpret_cast<const __nv_bfloat162*>(&v);
  h = __hsub2(h, __floats2bfloat162_rn(128.f, 128.f));
  return *reinterpret_cast<const uint32_t*>(&h);
}

// (a, b) as bf16x2 hi and lo parts: a = hi.x + lo.x up to ~2^-17 relative.
__device__ __forceinline__ void split_bf16x2(float a, float b, uint32_t& hi, uint32_t& lo) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  const float2 hf = __bfloat1622float2(h);
  const __nv_bfloat162 l = __floats2bfloat162_rn(a - hf.x, b - hf.y);
  hi = *reinterpret_cast<const uint32_t*>(&h);
  lo = *reinterpret_cast<const uint32_t*>(&l);
}

// Group scores of one sketch chunk for heads h0..h0+7 (q_s rows of stride D + 4, zero
// past the KV head's heads): gm[m][e] is head h0 + 2c + e's score of group m, valid in
// every lane (lanes of equal c agree).
template <int D>
__device__ __forceinline__ void sketch_chunk_scores_tc(const float* page, int64_t s_sr,
                                                       const float* lo_s, const float* step_s,
                                                       const float* q_s, int h0, int lane,
                                                       float (&gm)[kGroups][2]) {
  constexpr int kW = D / 16;  // code words per key
  const int g = lane / 4, c = lane % 4;
  const float* qrow = q_s + (h0 + g) * (D + 4);
  uint32_t bh[kW][2], bl[kW][2];
  float qlo = 0.f;
#pragma unroll
  for (int w = 0; w < kW; ++w) {
    const int d = 16 * w + c;
    float x[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int di = d + (i == 1 ? 8 : i == 2 ? 4 : i == 3 ? 12 : 0);
      x[i] = qrow[di] * step_s[di];
      qlo = fmaf(qrow[di], lo_s[di], qlo);
    }
    split_bf16x2(x[0], x[1], bh[w][0], bl[w][0]);
    split_bf16x2(x[2], x[3], bh[w][1], bl[w][1]);
  }
  qlo += __shfl_xor_sync(0xffffffffu, qlo, 1);
  qlo += __shfl_xor_sync(0xffffffffu, qlo, 2);  // head h0 + g's q . lo in lanes 4g..4g+3
  const float qlo_a = __shfl_sync(0xffffffffu, qlo, 8 * c);
  const float qlo_b = __shfl_sync(0xffffffffu, qlo, 8 * c + 4);
#pragma unroll
  for (int m = 0; m < kGroups; ++m) {
    uint32_t wk[2][kW];  // code words of keys g and g + 8 of group m
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const uint4* src =
          reinterpret_cast<const uint4*>(page + (1 + m) * s_sr) + (g + 8 * half) * (kW / 4);
#pragma unroll
      for (int v = 0; v < kW / 4; ++v) {
        const uint4 u = src[v];
        wk[half][4 * v] = u.x;
        wk[half][4 * v + 1] = u.y;
        wk[half][4 * v + 2] = u.z;
        wk[half][4 * v + 3] = u.w;
      }
    }
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int w = 0; w < kW; ++w) {
      const uint32_t xa = wk[0][w] >> (2 * c), xb = wk[1][w] >> (2 * c);
      const uint32_t a[4] = {codes_bf16x2(xa), codes_bf16x2(xb), codes_bf16x2(xa >> 8),
                             codes_bf16x2(xb >> 8)};
      mma_bf16_16816(acc, a, bh[w][0], bh[w][1]);
      mma_bf16_16816(acc, a, bl[w][0], bl[w][1]);
    }
    // logsumexp over the group's 16 keys: rows g and g + 8 of the 8 lanes of equal c
    float mx0 = fmaxf(acc[0], acc[2]), mx1 = fmaxf(acc[1], acc[3]);
#pragma unroll
    for (int o = 4; o <= 16; o <<= 1) {
      mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, o));
      mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, o));
    }
    float s0 = __expf(acc[0] - mx0) + __expf(acc[2] - mx0);
    float s1 = __expf(acc[1] - mx1) + __expf(acc[3] - mx1);
#pragma unroll
    for (int o = 4; o <= 16; o <<= 1) {
      s0 += __shfl_xor_sync(0xffffffffu, s0, o);
      s1 += __shfl_xor_sync(0xffffffffu, s1, o);
    }
    gm[m][0] = mx0 + __logf(s0) + qlo_a;
    gm[m][1] = mx1 + __logf(s1) + qlo_b;
  }
}

// One warp scores one sketch chunk (page) for the rep query heads of its KV head and writes
// the chunk score to sc[h * stride + j] and the 4 group scores to gsc[(h * stride + j) * 4 + m]
// (forced: the chunk score is +inf, the chunk is always kept).  lo_s is the warp's 2D floats
// of shared memory for the page's grid (lo then step).
template <int D, bool kTensorCores>
__device__ __forceinline__ void score_sketch_chunk(const float* page, int64_t s_sr, float* lo_s,
                                                   const float* q_s, int rep, int lane, bool forced,
                                                   int64_t stride, int64_t j, float* sc,
                                                   float* gsc) {
  float* step_s = lo_s + D;
  // grid row: 2D float16 (lo then step), D / 4 16-byte vectors
  const uint4* g16 = reinterpret_cast<const uint4*>(page);
  for (int v = lane; v < D / 4; v += 32) {
    const uint4 u = g16[v];
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      lo_s[8 * v + 2 * i] = half_bits_to_float(static_cast<unsigned short>(w[i] & 0xffffu));
      lo_s[8 * v + 2 * i + 1] = half_bits_to_float(static_cast<unsigned short>(w[i] >> 16));
    }
  }
  __syncwarp();
  if constexpr (kTensorCores) {
    for (int h0 = 0; h0 < rep; h0 += 8) {
      float gm[kGroups][2];
      sketch_chunk_scores_tc<D>(page, s_sr, lo_s, step_s, q_s, h0, lane, gm);
      if (lane < 4) {  // lane c writes heads h0 + 2c and h0 + 2c + 1
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int h = h0 + 2 * lane + e;
          if (h < rep) {
            float* gdst = gsc + (h * stride + j) * kGroups;
            float best = gm[0][e];
#pragma unroll
            for (int m = 0; m < kGroups; ++m) {
              gdst[m] = gm[m][e];
              best = fmaxf(best, gm[m][e]);
            }
            sc[h * stride + j] = forced ? INFINITY : best;
          }
        }
      }
    }
  } else {
    sketch_chunk_scores_cuda_cores<D>(page, s_sr, lo_s, step_s, q_s, rep, lane, forced, stride, j,
                                      sc, gsc);
  }
  __syncwarp();  // lo_s is rewritten for the warp's next chunk
}

template <typename T, int D, bool kTensorCores>
__global__ void __launch_bounds__(kSketchWarps * 32)
    route_chunks_sketch_kernel(const T* __restrict__ q, int64_t q_sr, int64_t q_sh,
                               const int64_t* __restrict__ pos, const int* __restrict__ bt,
                               int64_t bt_sr, const float* __restrict__ pages, int64_t s_sb,
                               int64_t s_sh, int64_t s_sr, int Hq, int rep, int F, int L, int Kc,
                               int S, int split_len, float scale, float* __restrict__ cand_s,
                               int* __restrict__ cand_i, float* __restrict__ cand_g) {
  // q_s: [rep][D] pre-scaled by 1/sqrt(D); tensor cores: [rep rounded up to 8][D + 4],
  // zero past rep and D (the padding keeps the lanes' B loads off each other's banks)
  constexpr int QS = kTensorCores ? D + 4 : D;
  const int q_rows = kTensorCores ? (rep + 7) / 8 * 8 : rep;
  extern __shared__ float smem[];
  float* q_s = smem;
  float* grid_s = q_s + q_rows * QS;          // [warps][2][D] the chunk's lo, step
  float* sc = grid_s + kSketchWarps * 2 * D;  // [rep][split_len] chunk scores
  float* gsc = sc + rep * split_len;          // [rep][split_len][4] group scores
  const int s = blockIdx.x, kvh = blockIdx.y, r = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t p = pos[r];
  const int64_t c = p < 0 ? -1 : p / kChunk;  // p < 0: a padded row of a CUDA-graph batch
  const int64_t lo = F + int64_t(s) * split_len;
  const int64_t hi = c - L < lo + split_len ? c - L : lo + split_len;  // pool is [F, c - L)
  const int len = hi > lo ? int(hi - lo) : 0;
  if (len == 0) {  // nothing of this row's pool in the slice (uniform across the block)
    for (int i = threadIdx.x; i < rep * Kc; i += blockDim.x) {
      const int64_t at = ((int64_t(r) * Hq + kvh * rep + i / Kc) * S + s) * Kc + i % Kc;
      cand_s[at] = -INFINITY;
      cand_i[at] = -1;
#pragma unroll
      for (int m = 0; m < kGroups; ++m) cand_g[at * kGroups + m] = -INFINITY;
    }
    return;
  }
  for (int i = threadIdx.x; i < q_rows * QS; i += blockDim.x) {
    const int h = i / QS, d = i % QS;
    q_s[i] = h < rep && d < D ? to_float(q[r * q_sr + (kvh * rep + h) * q_sh + d]) * scale : 0.f;
  }
  __syncthreads();

  float* lo_s = grid_s + warp * 2 * D;
  for (int j = warp; j < len; j += kSketchWarps) {
    const float* page = pages + int64_t(bt[r * bt_sr + lo + j]) * s_sb + kvh * s_sh;
    // L == 0: the preceding chunk is in the pool and always kept (routing.py)
    const bool forced = L == 0 && lo + j == c - 1;
    score_sketch_chunk<D, kTensorCores>(page, s_sr, lo_s, q_s, rep, lane, forced, split_len, j, sc,
                                        gsc);
  }
  __syncthreads();

  // Top-K_c of the slice per head: K_c rounds of warp argmax; taken entries become NaN.
  for (int h = warp; h < rep; h += kSketchWarps) {
    float* row = sc + h * split_len;
    const int64_t out = ((int64_t(r) * Hq + kvh * rep + h) * S + s) * Kc;
    for (int kk = 0; kk < Kc; ++kk) {
      float best;
      int bj;
      warp_take_best(row, len, lane, best, bj);
      const bool found = bj != INT_MAX;
      if (lane < kGroups)
        cand_g[(out + kk) * kGroups + lane] =
            found ? gsc[(int64_t(h) * split_len + bj) * kGroups + lane] : -INFINITY;
      if (lane == 0) {
        cand_s[out + kk] = found ? best : -INFINITY;
        cand_i[out + kk] = found ? int(lo + bj) : -1;
      }
    }
  }
}

// route_chunks_sketch without the slice top-k, for decode rows (few queries): block (slice
// of 8 * per_warp pool chunks, KV head, request), one warp per chunk in flight, writes every
// pool chunk's scores, sc [R, Hq, P] and gsc [R, Hq, P, 4] at pool index j = chunk - F, so
// that all chunks of a row are scored at once across the GPU; route_select then picks.
template <typename T, int D, bool kTensorCores>
__global__ void __launch_bounds__(kSketchWarps * 32)
    score_chunks_sketch_kernel(const T* __restrict__ q, int64_t q_sr, int64_t q_sh,
                               const int64_t* __restrict__ pos, const int* __restrict__ bt,
                               int64_t bt_sr, const float* __restrict__ pages, int64_t s_sb,
                               int64_t s_sh, int64_t s_sr, int Hq, int rep, int F, int L, int P,
                               int per_warp, float scale, float* __restrict__ sc,
                               float* __restrict__ gsc) {
  constexpr int QS = kTensorCores ? D + 4 : D;  // q_s as in route_chunks_sketch_kernel
  const int q_rows = kTensorCores ? (rep + 7) / 8 * 8 : rep;
  extern __shared__ float smem[];
  float* q_s = smem;
  float* grid_s = q_s + q_rows * QS;  // [warps][2][D]
  const int kvh = blockIdx.y, r = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t p = pos[r];
  const int64_t c = p < 0 ? -1 : p / kChunk;
  const int64_t n = c - L - F < P ? c - L - F : P;  // the row's pool: chunks [F, c - L)
  const int64_t j0 = int64_t(blockIdx.x) * kSketchWarps * per_warp;
  if (j0 >= n) return;  // uniform across the block
  // the warp's block ids first, so the page loads below do not wait on them one by one
  int blk = 0;
  if (lane < per_warp) {
    const int64_t j = j0 + int64_t(lane) * kSketchWarps + warp;
    if (j < n) blk = bt[r * bt_sr + F + j];
  }
  for (int i = threadIdx.x; i < q_rows * QS; i += blockDim.x) {
    const int h = i / QS, d = i % QS;
    q_s[i] = h < rep && d < D ? to_float(q[r * q_sr + (kvh * rep + h) * q_sh + d]) * scale : 0.f;
  }
  __syncthreads();
  const int64_t stride = P;
  float* sc_r = sc + (int64_t(r) * Hq + kvh * rep) * stride;
  float* gsc_r = gsc + (int64_t(r) * Hq + kvh * rep) * stride * kGroups;
  for (int i = 0; i < per_warp; ++i) {
    const int64_t j = j0 + int64_t(i) * kSketchWarps + warp;
    const int b = __shfl_sync(0xffffffffu, blk, i);
    if (j >= n) break;  // uniform across the warp
    const float* page = pages + int64_t(b) * s_sb + kvh * s_sh;
    const bool forced = L == 0 && F + j == c - 1;
    score_sketch_chunk<D, kTensorCores>(page, s_sr, grid_s + warp * 2 * D, q_s, rep, lane, forced,
                                        stride, j, sc_r, gsc_r);
  }
}

void score_chunks_sketch(at::Tensor q, at::Tensor pos, at::Tensor bt, at::Tensor pages,
                         int64_t sink_chunks, int64_t local_chunks, at::Tensor scores,
                         at::Tensor group_scores, int64_t per_warp, int64_t tensor_cores) {
  check_cuda(q, "q");
  HGA_CHECK(q.dim() == 3 && q.stride(2) == 1, "q must be [R, Hq, D] with a contiguous last dim");
  HGA_CHECK(pages.dim() == 4 && pages.size(2) == 1 + kGroups && pages.size(3) == q.size(2) &&
                pages.stride(3) == 1 && pages.scalar_type() == at::kFloat,
            "pages must be float32 sketch pages [blocks, H_kv, 5, D]");
  HGA_CHECK(reinterpret_cast<uintptr_t>(pages.data_ptr()) % 16 == 0 && pages.stride(0) % 4 == 0 &&
                pages.stride(1) % 4 == 0 && pages.stride(2) % 4 == 0,
            "sketch page rows must be 16-byte aligned");
  HGA_CHECK(pos.scalar_type() == at::kLong && pos.is_contiguous() && pos.numel() == q.size(0),
            "pos must be int64 [R]");
  HGA_CHECK(
      bt.scalar_type() == at::kInt && bt.dim() == 2 && bt.stride(1) == 1 && bt.size(0) == q.size(0),
      "block_table must be int32 [R, max_blocks] (one row per decode query)");
  const int R = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = pages.size(1);
  HGA_CHECK(Hq % Hkv == 0, "query heads must be a multiple of KV heads");
  HGA_CHECK(scores.dim() == 3 && scores.size(0) == R && scores.size(1) == Hq &&
                scores.is_contiguous() && scores.scalar_type() == at::kFloat,
            "scores must be float32 [R, Hq, P]");
  const int P = scores.size(2);
  HGA_CHECK(group_scores.dim() == 4 && group_scores.size(0) == R && group_scores.size(1) == Hq &&
                group_scores.size(2) == P && group_scores.size(3) == kGroups &&
                group_scores.is_contiguous() && group_scores.scalar_type() == at::kFloat,
            "group_scores must be float32 [R, Hq, P, 4]");
  HGA_CHECK(per_warp >= 1 && per_warp <= 32, "per_warp must be in [1, 32]");
  HGA_CHECK(bt.size(1) >= sink_chunks + P, "block_table narrower than the pool");
  if (R == 0 || P == 0) return;
  const int rep = Hq / Hkv;
  const bool tc = tensor_cores != 0;
  const size_t q_floats = tc ? size_t((rep + 7) / 8 * 8) * (D + 4) : size_t(rep) * D;
  const size_t smem = (q_floats + size_t(kSketchWarps) * 2 * D) * sizeof(float);
  const c10::cuda::CUDAGuard guard(q.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int per_block = kSketchWarps * int(per_warp);
  const dim3 grid((P + per_block - 1) / per_block, Hkv, R);
  const float scale = 1.f / sqrtf(float(D));
  HGA_DISPATCH_FLOAT(q.scalar_type(), "score_chunks_sketch", [&] {
    HGA_DISPATCH_HEAD(D, "score_chunks_sketch", [&] {
      auto kernel = tc ? score_chunks_sketch_kernel<scalar_t, kD, true>
                       : score_chunks_sketch_kernel<scalar_t, kD, false>;
      if (smem > 48 * 1024)
        C10_CUDA_CHECK(
            cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
      kernel<<<grid, kSketchWarps * 32, smem, stream>>>(
          reinterpret_cast<const scalar_t*>(q.data_ptr()), q.stride(0), q.stride(1),
          pos.data_ptr<int64_t>(), bt.data_ptr<int>(), bt.stride(0), pages.data_ptr<float>(),
          pages.stride(0), pages.stride(1), pages.stride(2), Hq, rep, int(sink_chunks),
          int(local_chunks), P, int(per_warp), scale, scores.data_ptr<float>(),
          group_scores.data_ptr<float>());
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void route_chunks_sketch(at::Tensor q, at::Tensor pos, at::Tensor bt, at::Tensor pages,
                         int64_t sink_chunks, int64_t local_chunks, int64_t split_len,
                         at::Tensor cand_score, at::Tensor cand_idx, at::Tensor cand_group,
                         int64_t tensor_cores) {
  check_cuda(q, "q");
  HGA_CHECK(q.dim() == 3 && q.stride(2) == 1, "q must be [R, Hq, D] with a contiguous last dim");
  HGA_CHECK(pages.dim() == 4 && pages.size(2) == 1 + kGroups && pages.size(3) == q.size(2) &&
                pages.stride(3) == 1 && pages.scalar_type() == at::kFloat,
            "pages must be float32 sketch pages [blocks, H_kv, 5, D]");
  HGA_CHECK(reinterpret_cast<uintptr_t>(pages.data_ptr()) % 16 == 0 && pages.stride(0) % 4 == 0 &&
                pages.stride(1) % 4 == 0 && pages.stride(2) % 4 == 0,
            "sketch page rows must be 16-byte aligned");
  HGA_CHECK(pos.scalar_type() == at::kLong && pos.is_contiguous() && pos.numel() == q.size(0),
            "pos must be int64 [R]");
  HGA_CHECK(
      bt.scalar_type() == at::kInt && bt.dim() == 2 && bt.stride(1) == 1 && bt.size(0) == q.size(0),
      "block_table must be int32 [R, max_blocks] (one row per decode query)");
  const int R = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = pages.size(1);
  HGA_CHECK(Hq % Hkv == 0, "query heads must be a multiple of KV heads");
  HGA_CHECK(cand_score.dim() == 4 && cand_score.size(0) == R && cand_score.size(1) == Hq &&
                cand_score.is_contiguous() && cand_idx.is_contiguous() &&
                cand_idx.sizes() == cand_score.sizes() && cand_score.scalar_type() == at::kFloat &&
                cand_idx.scalar_type() == at::kInt,
            "cand_score/cand_idx must be float32/int32 [R, Hq, splits, K_c]");
  const int S = cand_score.size(2), Kc = cand_score.size(3);
  HGA_CHECK(cand_group.dim() == 5 && cand_group.size(0) == R && cand_group.size(1) == Hq &&
                cand_group.size(2) == S && cand_group.size(3) == Kc &&
                cand_group.size(4) == kGroups && cand_group.is_contiguous() &&
                cand_group.scalar_type() == at::kFloat,
            "cand_group must be float32 [R, Hq, splits, K_c, 4]");
  if (R == 0 || S == 0 || Kc == 0) return;
  HGA_CHECK(Kc <= kMaxTopk, "topk_chunks above ", kMaxTopk, " not compiled");
  HGA_CHECK(split_len >= 1, "split_len must be positive");
  const int rep = Hq / Hkv;
  const bool tc = tensor_cores != 0;
  const size_t q_floats = tc ? size_t((rep + 7) / 8 * 8) * (D + 4) : size_t(rep) * D;
  const size_t smem =
      (q_floats + size_t(rep) * (1 + kGroups) * split_len + size_t(kSketchWarps) * 2 * D) *
      sizeof(float);
  const c10::cuda::CUDAGuard guard(q.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(S, Hkv, R);
  const float scale = 1.f / sqrtf(float(D));
  HGA_DISPATCH_FLOAT(q.scalar_type(), "route_chunks_sketch", [&] {
    HGA_DISPATCH_HEAD(D, "route_chunks_sketch", [&] {
      auto kernel = tc ? route_chunks_sketch_kernel<scalar_t, kD, true>
                       : route_chunks_sketch_kernel<scalar_t, kD, false>;
      if (smem > 48 * 1024)
        C10_CUDA_CHECK(
            cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
      kernel<<<grid, kSketchWarps * 32, smem, stream>>>(
          reinterpret_cast<const scalar_t*>(q.data_ptr()), q.stride(0), q.stride(1),
          pos.data_ptr<int64_t>(), bt.data_ptr<int>(), bt.stride(0), pages.data_ptr<float>(),
          pages.stride(0), pages.stride(1), pages.stride(2), Hq, rep, int(sink_chunks),
          int(local_chunks), Kc, S, int(split_len), scale, cand_score.data_ptr<float>(),
          cand_idx.data_ptr<int>(), cand_group.data_ptr<float>());
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace hga

TORCH_LIBRARY_IMPL(vllm_hga, CUDA, m) {
  m.impl("sketch_pages", &hga::sketch_pages);
  m.impl("route_chunks_sketch", &hga::route_chunks_sketch);
  m.impl("score_chunks_sketch", &hga::score_chunks_sketch);
}
