// Block-sparse tensor-core prefill attention (HGA), over a request's device scratch.
//
// Block (query block, query head): the up to 64 queries of one chunk c (so they share the
// sinks, the local window and the own chunk) of one head, 16 query rows per warp.  The
// block's key set is the window groups (sinks [0, min(F, c)), local [max(F, c - L), c),
// own chunk c, causal per query) followed by the union of the 16-token groups its queries
// routed to (ascending; per query a membership test against its own ascending list).
// K/V of 4 groups at a time are staged in shared memory (V transposed) and every warp
// runs S = Q K^T and O += P V on mma.sync m16n8k16 tensor cores (half/bf16 in, fp32
// accumulate), with an fp32 online softmax in base 2.  A warp skips a group none of its
// queries sees.  Keys at positions >= seq_len (never written: NaN in the tests) are staged
// as zeros, so masked slots never reach a sum.
//
// Inputs are the routing kernels' lists (route_groups: token_ok / gid [R, Hq, Gt], routed
// groups at columns nfix.. in ascending group id, then invalid padding) for queries at
// positions p0 .. p0+R-1, and the scratch kv [n_chunks, Hkv, 2, 64, D] with chunk j of the
// request at index j (identity block table).

#include "hga_common.cuh"

#include <climits>

namespace hga {
namespace {

constexpr int kPfWarps = 4;
constexpr int kPfRows = 16 * kPfWarps;  // = kChunk: one chunk of queries per block
constexpr int kTileGroups = 4;          // groups staged per shared-memory round
constexpr int kTileKeys = kTileGroups * kGroup;
constexpr int kMaxRouted = 64;  // routed columns per query (groups_per_query)
static_assert(kPfRows == kChunk, "one block of queries is one chunk");

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x (low half) = lo
  return *reinterpret_cast<uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// D (16x8, fp32) += A (16x16, row) * B (16x8, col); fragments as in the PTX ISA:
// a0: (g, 2t..2t+1) a1: (g+8, 2t..) a2: (g, 8+2t..) a3: (g+8, 8+2t..);
// b0: (k 2t..2t+1, n g) b1: (k 8+2t.., n g); c0,c1: (g, 2t..2t+1) c2,c3: (g+8, 2t..2t+1)
// with g = lane / 4, t = lane % 4.
template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

template <typename T>
__device__ __forceinline__ uint32_t ld32(const T* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}

template <typename T, int D>
__global__ void __launch_bounds__(kPfWarps * 32)
    prefill_attend_kernel(const T* __restrict__ q, int64_t q_sr, int64_t q_sh,
                          const T* __restrict__ kv, const int64_t* __restrict__ gid,
                          const uint8_t* __restrict__ token_ok, int Gt, int nfix, int Hq, int Hkv,
                          int64_t p0, int R, int64_t seq_len, int F, int L, float qscale,
                          int bitmap_words, T* __restrict__ out, int64_t o_sr, int64_t o_sh) {
  constexpr int KS = D + 8;          // K tile row stride (elements): conflict-free fragments
  constexpr int VS = kTileKeys + 8;  // V^T tile row stride
  constexpr int VPR = D / 8;         // 16-byte vectors per K/V row
  const int Gr = Gt - nfix;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* Ks = reinterpret_cast<T*>(smem_raw);            // [kTileKeys][KS]
  T* Vt = Ks + kTileKeys * KS;                       // [D][VS]
  int* lists = reinterpret_cast<int*>(Vt + D * VS);  // [kPfRows][Gr] routed group ids
  int* uni = lists + kPfRows * Gr;                   // [<= kPfRows * Gr] their union
  uint32_t* bitmap = reinterpret_cast<uint32_t*>(uni + kPfRows * Gr);  // [bitmap_words]
  __shared__ int s_nuni;

  const int h = blockIdx.y, kvh = h / (Hq / Hkv);
  const int64_t c = p0 / kChunk + blockIdx.x;  // this block's chunk
  const int64_t first = max(p0, c * kChunk);
  const int64_t last = min(p0 + R, (c + 1) * kChunk);
  const int row0 = int(first - p0), nrows = int(last - first);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g8 = lane >> 2, t4 = lane & 3;

  // 1. per-query routed lists and their union (bitmap over group ids, then compacted)
  const int nw = min(bitmap_words, int((c * kGroups + 31) / 32));  // pool groups < 4c
  for (int i = threadIdx.x; i < nw; i += blockDim.x) bitmap[i] = 0u;
  __syncthreads();
  for (int e = threadIdx.x; e < kPfRows * Gr; e += blockDim.x) {
    const int i = e / Gr, k = e % Gr;
    int g = INT_MAX;
    if (i < nrows) {
      const int64_t col = (int64_t(row0 + i) * Hq + h) * Gt + nfix + k;
      if (token_ok[col * kGroup]) {  // a routed group is visible whole or not at all
        g = int(gid[col]);
        atomicOr(&bitmap[g >> 5], 1u << (g & 31));
      }
    }
    lists[e] = g;
  }
  __syncthreads();
  if (warp == 0) {
    int total = 0;
    for (int base = 0; base < nw; base += 32) {
      const int w_idx = base + lane;
      uint32_t w = w_idx < nw ? bitmap[w_idx] : 0u;
      const int cnt = __popc(w);
      int incl = cnt;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const int v = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += v;
      }
      int off = total + incl - cnt;
      while (w) {
        const int b = __ffs(w) - 1;
        w &= w - 1;
        uni[off++] = w_idx * 32 + b;
      }
      total += __shfl_sync(0xffffffffu, incl, 31);
    }
    if (lane == 0) s_nuni = total;
  }
  __syncthreads();
  const int n_uni = s_nuni;

  // 2. the window: whole chunks every query of the block sees (own chunk causal)
  const int64_t nsink = min(int64_t(F), c);
  const int64_t lo_local = max(int64_t(F), c - L);
  const int64_t nlocal = c > lo_local ? c - lo_local : 0;
  const int n_win = int(nsink + nlocal + 1) * kGroups;
  const int n_tot = n_win + n_uni;
  auto group_at = [&](int i) -> int64_t {
    if (i >= n_win) return uni[i - n_win];
    const int64_t k = i / kGroups;
    const int64_t j = k < nsink ? k : k < nsink + nlocal ? lo_local + (k - nsink) : c;
    return j * kGroups + i % kGroups;
  };

  // 3. this warp's 16 query rows: a = row g8, b = row g8 + 8
  const int ra = warp * 16 + g8, rb = ra + 8;
  const bool va = ra < nrows, vb = rb < nrows;
  const int64_t pa = va ? first + ra : -1, pb = vb ? first + rb : -1;
  uint32_t qf[D / 16][4];
  {
    const T* qa = q + int64_t(row0 + ra) * q_sr + int64_t(h) * q_sh;
    const T* qb = q + int64_t(row0 + rb) * q_sr + int64_t(h) * q_sh;
#pragma unroll
    for (int s = 0; s < D / 16; ++s) {
      qf[s][0] = va ? ld32(qa + 16 * s + 2 * t4) : 0u;
      qf[s][1] = vb ? ld32(qb + 16 * s + 2 * t4) : 0u;
      qf[s][2] = va ? ld32(qa + 16 * s + 8 + 2 * t4) : 0u;
      qf[s][3] = vb ? ld32(qb + 16 * s + 8 + 2 * t4) : 0u;
    }
  }
  const int* la = lists + ra * Gr;
  const int* lb = lists + rb * Gr;
  int cur_a = 0, cur_b = 0;
  float o[D / 8][4];
#pragma unroll
  for (int j = 0; j < D / 8; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
  float m_a = -INFINITY, m_b = -INFINITY, l_a = 0.f, l_b = 0.f;

  for (int t0 = 0; t0 < n_tot; t0 += kTileGroups) {
    const int nt = min(kTileGroups, n_tot - t0);
    __syncthreads();  // the previous tile is consumed
    for (int e = threadIdx.x; e < nt * kGroup * VPR; e += blockDim.x) {
      const int key = e / VPR, v8 = e % VPR;
      const int u = key / kGroup, t = key % kGroup;
      const int64_t g = group_at(t0 + u);
      uint4 kk = make_uint4(0u, 0u, 0u, 0u), vv = kk;
      if (g * kGroup + t < seq_len) {
        const T* kp =
            kv +
            (((g / kGroups) * Hkv + kvh) * 2 * kChunk + (g % kGroups) * kGroup + t) * int64_t(D) +
            v8 * 8;
        kk = *reinterpret_cast<const uint4*>(kp);
        vv = *reinterpret_cast<const uint4*>(kp + kChunk * D);
      }
      *reinterpret_cast<uint4*>(Ks + key * KS + v8 * 8) = kk;
      const T* ve = reinterpret_cast<const T*>(&vv);
#pragma unroll
      for (int i = 0; i < 8; ++i) Vt[(v8 * 8 + i) * VS + key] = ve[i];
    }
    __syncthreads();

    for (int u = 0; u < nt; ++u) {
      const int ti = t0 + u;
      const int64_t g = group_at(ti);
      const int64_t kbase = g * kGroup;
      const bool window = ti < n_win;
      bool ma = false, mb = false;
      if (!window) {  // membership: each query's list is ascending, as the union is
        ma = cur_a < Gr && la[cur_a] == g;
        mb = cur_b < Gr && lb[cur_b] == g;
        cur_a += ma;
        cur_b += mb;
      }
      const bool any = window ? (pa >= kbase || pb >= kbase) : (ma || mb);
      if (!__any_sync(0xffffffffu, any)) continue;

      float sc[2][4];
#pragma unroll
      for (int n = 0; n < 2; ++n) sc[n][0] = sc[n][1] = sc[n][2] = sc[n][3] = 0.f;
      const T* kt = Ks + (u * kGroup + g8) * KS + 2 * t4;
#pragma unroll
      for (int s = 0; s < D / 16; ++s) {
#pragma unroll
        for (int n = 0; n < 2; ++n)
          mma16816<T>(sc[n], qf[s], ld32(kt + n * 8 * KS + 16 * s),
                      ld32(kt + n * 8 * KS + 16 * s + 8));
      }
      float mxa = -INFINITY, mxb = -INFINITY;
#pragma unroll
      for (int n = 0; n < 2; ++n) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int64_t kp = kbase + n * 8 + 2 * t4 + e;
          const bool oka = window ? kp <= pa : ma;
          const bool okb = window ? kp <= pb : mb;
          sc[n][e] = oka ? sc[n][e] * qscale : -INFINITY;
          sc[n][2 + e] = okb ? sc[n][2 + e] * qscale : -INFINITY;
          mxa = fmaxf(mxa, sc[n][e]);
          mxb = fmaxf(mxb, sc[n][2 + e]);
        }
      }
#pragma unroll
      for (int o2 = 1; o2 <= 2; o2 <<= 1) {
        mxa = fmaxf(mxa, __shfl_xor_sync(0xffffffffu, mxa, o2));
        mxb = fmaxf(mxb, __shfl_xor_sync(0xffffffffu, mxb, o2));
      }
      const float mna = fmaxf(m_a, mxa), mnb = fmaxf(m_b, mxb);
      const float ua = mna == -INFINITY ? 0.f : mna, ub = mnb == -INFINITY ? 0.f : mnb;
      const float aa = exp2f(m_a - ua), ab = exp2f(m_b - ub);
      m_a = mna;
      m_b = mnb;
      float p[2][4], sa = 0.f, sb = 0.f;
#pragma unroll
      for (int n = 0; n < 2; ++n) {
        p[n][0] = exp2f(sc[n][0] - ua);
        p[n][1] = exp2f(sc[n][1] - ua);
        p[n][2] = exp2f(sc[n][2] - ub);
        p[n][3] = exp2f(sc[n][3] - ub);
        sa += p[n][0] + p[n][1];
        sb += p[n][2] + p[n][3];
      }
      l_a = l_a * aa + sa;
      l_b = l_b * ab + sb;
      const uint32_t pf[4] = {pack2<T>(p[0][0], p[0][1]), pack2<T>(p[0][2], p[0][3]),
                              pack2<T>(p[1][0], p[1][1]), pack2<T>(p[1][2], p[1][3])};
      const T* vt = Vt + g8 * VS + u * kGroup + 2 * t4;
#pragma unroll
      for (int j = 0; j < D / 8; ++j) {
        o[j][0] *= aa;
        o[j][1] *= aa;
        o[j][2] *= ab;
        o[j][3] *= ab;
        mma16816<T>(o[j], pf, ld32(vt + j * 8 * VS), ld32(vt + j * 8 * VS + 8));
      }
    }
  }

  // 4. normalise (row sums are spread over the 4 lanes of a quad) and store
#pragma unroll
  for (int o2 = 1; o2 <= 2; o2 <<= 1) {
    l_a += __shfl_xor_sync(0xffffffffu, l_a, o2);
    l_b += __shfl_xor_sync(0xffffffffu, l_b, o2);
  }
  const float ia = l_a > 0.f ? 1.f / l_a : 0.f, ib = l_b > 0.f ? 1.f / l_b : 0.f;
  T* oa = out + int64_t(row0 + ra) * o_sr + int64_t(h) * o_sh + 2 * t4;
  T* ob = out + int64_t(row0 + rb) * o_sr + int64_t(h) * o_sh + 2 * t4;
#pragma unroll
  for (int j = 0; j < D / 8; ++j) {
    if (va) *reinterpret_cast<uint32_t*>(oa + 8 * j) = pack2<T>(o[j][0] * ia, o[j][1] * ia);
    if (vb) *reinterpret_cast<uint32_t*>(ob + 8 * j) = pack2<T>(o[j][2] * ib, o[j][3] * ib);
  }
}

#define HGA_DISPATCH_HALF(dtype, NAME, ...)                                      \
  [&] {                                                                          \
    switch (dtype) {                                                             \
      case at::kHalf: {                                                          \
        using scalar_t = __half;                                                 \
        return __VA_ARGS__();                                                    \
      }                                                                          \
      case at::kBFloat16: {                                                      \
        using scalar_t = __nv_bfloat16;                                          \
        return __VA_ARGS__();                                                    \
      }                                                                          \
      default:                                                                   \
        TORCH_CHECK(false, "vllm_hga: ", NAME, ": half/bf16 only, got ", dtype); \
    }                                                                            \
  }()

void prefill_attend(at::Tensor q, int64_t p0, at::Tensor kv, at::Tensor gid, at::Tensor token_ok,
                    int64_t nfix, int64_t seq_len, int64_t sink_chunks, int64_t local_chunks,
                    double scale, at::Tensor out) {
  check_cuda(q, "q");
  check_cuda(kv, "kv");
  HGA_CHECK(q.dim() == 3 && q.stride(2) == 1, "q must be [R, Hq, D] with a contiguous last dim");
  const int R = q.size(0), Hq = q.size(1), D = q.size(2);
  HGA_CHECK(kv.dim() == 5 && kv.size(2) == 2 && kv.size(3) == kChunk && kv.size(4) == D &&
                kv.is_contiguous() && kv.scalar_type() == q.scalar_type(),
            "kv must be contiguous [chunks, H_kv, 2, 64, D] in q's dtype");
  const int Hkv = kv.size(1);
  HGA_CHECK(Hq % Hkv == 0, "query heads must be a multiple of KV heads");
  HGA_CHECK(gid.dim() == 3 && gid.size(0) == R && gid.size(1) == Hq && gid.is_contiguous() &&
                gid.scalar_type() == at::kLong,
            "gid must be int64 [R, Hq, Gt]");
  const int Gt = gid.size(2);
  HGA_CHECK(token_ok.numel() == gid.numel() * kGroup && token_ok.is_contiguous() &&
                token_ok.element_size() == 1,
            "token_ok must be contiguous bool [R, Hq, Gt, 16]");
  HGA_CHECK(nfix >= kGroups && nfix <= Gt && Gt - nfix <= kMaxRouted, "routed columns (", Gt - nfix,
            ") above ", kMaxRouted, " not compiled");
  HGA_CHECK(out.dim() == 3 && out.size(0) == R && out.size(1) == Hq && out.size(2) == D &&
                out.stride(2) == 1 && out.scalar_type() == q.scalar_type() &&
                out.stride(0) % 2 == 0 && out.stride(1) % 2 == 0 &&
                reinterpret_cast<uintptr_t>(out.data_ptr()) % 4 == 0,
            "out must be [R, Hq, D] in q's dtype, last dim contiguous, 4-byte aligned pairs");
  HGA_CHECK(q.stride(0) % 2 == 0 && q.stride(1) % 2 == 0 &&
                reinterpret_cast<uintptr_t>(q.data_ptr()) % 4 == 0 &&
                reinterpret_cast<uintptr_t>(kv.data_ptr()) % 16 == 0,
            "q must be 4-byte aligned pairs, kv 16-byte aligned");
  HGA_CHECK(p0 >= 0 && seq_len >= p0 + R && (seq_len + kChunk - 1) / kChunk <= kv.size(0),
            "positions beyond the scratch");
  if (R == 0) return;
  const int Gr = Gt - int(nfix);
  const int bitmap_words = int((kv.size(0) * kGroups + 31) / 32);
  const int64_t n_blocks = (p0 + R - 1) / kChunk - p0 / kChunk + 1;
  const size_t es = q.element_size();
  const size_t smem = size_t(kTileKeys) * (D + 8) * es + size_t(D) * (kTileKeys + 8) * es +
                      size_t(2 * kPfRows * Gr + bitmap_words) * 4;
  const c10::cuda::CUDAGuard guard(q.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(unsigned(n_blocks), Hq);
  const float qscale = float(scale) * kLog2e;
  HGA_DISPATCH_HALF(q.scalar_type(), "prefill_attend", [&] {
    HGA_DISPATCH_HEAD(D, "prefill_attend", [&] {
      auto kernel = prefill_attend_kernel<scalar_t, kD>;
      if (smem > 48 * 1024)
        C10_CUDA_CHECK(
            cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
      kernel<<<grid, kPfWarps * 32, smem, stream>>>(
          reinterpret_cast<const scalar_t*>(q.data_ptr()), q.stride(0), q.stride(1),
          reinterpret_cast<const scalar_t*>(kv.data_ptr()), gid.data_ptr<int64_t>(),
          reinterpret_cast<const uint8_t*>(token_ok.data_ptr()), Gt, int(nfix), Hq, Hkv, p0, R,
          seq_len, int(sink_chunks), int(local_chunks), qscale, bitmap_words,
          reinterpret_cast<scalar_t*>(out.data_ptr()), out.stride(0), out.stride(1));
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace hga

TORCH_LIBRARY_IMPL(vllm_hga, CUDA, m) { m.impl("prefill_attend", &hga::prefill_attend); }
