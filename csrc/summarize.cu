// KV write into the pool and chunk/group summaries of closed chunks.
//
// Both read and write the pool in place (device memory or a UVA view of pinned host
// memory), so a closing chunk's keys are never gathered into a temporary.

#include "hga_common.cuh"

namespace hga {
namespace {

// One thread moves 16 bytes of one (token, head, K|V) row into pool[block, head, kv, off],
// and into the device bank's copy of the block when it holds one (bank != nullptr:
// slot_of_block[block] >= 0), so that a resident block always equals its pool block.
template <typename T>
__global__ void write_kv_kernel(T* __restrict__ pool, const T* __restrict__ key,
                                const T* __restrict__ value, const int64_t* __restrict__ slots,
                                int64_t k_st, int64_t k_sh, int64_t v_st, int64_t v_sh, int T_,
                                int H, int D, T* __restrict__ bank,
                                const int64_t* __restrict__ slot_of_block) {
  constexpr int kVec = 16 / sizeof(T);
  const int vecs = D / kVec;
  const int64_t total = int64_t(T_) * H * 2 * vecs;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int v = int(i % vecs);
    const int64_t row = i / vecs;  // (t * H + h) * 2 + kv
    const int kv = int(row & 1);
    const int h = int((row >> 1) % H);
    const int t = int((row >> 1) / H);
    const int64_t slot = slots[t];
    if (slot < 0) continue;  // padding token
    const int64_t block = slot / kChunk, off = slot % kChunk;
    const T* src = kv ? value + t * v_st + h * v_sh : key + t * k_st + h * k_sh;
    const int64_t in_block = ((h * 2 + kv) * kChunk + off) * D;
    const uint4 x = reinterpret_cast<const uint4*>(src)[v];
    reinterpret_cast<uint4*>(pool + block * H * 2 * kChunk * D + in_block)[v] = x;
    if (bank != nullptr) {
      const int64_t s = slot_of_block[block];
      if (s >= 0) reinterpret_cast<uint4*>(bank + s * H * 2 * kChunk * D + in_block)[v] = x;
    }
  }
}

// Thread d of block (i, h) sums dimension d of the 64 keys of chunk blocks_in[i], head h,
// after rotating low-frequency RoPE pairs to the chunk (group) middle; writes the means
// to out[blocks_out[i], h, 0 (chunk) | 1+g (group g), d]; entries < 0 are skipped.  With
// `variance`, row 0 is instead the mean over the chunk of (k - its group's mean)^2 of the
// raw post-RoPE keys (reference.group_key_variance), for group_score "mean_std".
template <typename T>
__global__ void summarize_kernel(const T* __restrict__ k, int64_t k_sb, int64_t k_st, int64_t k_sh,
                                 const int64_t* __restrict__ blocks_in, float* __restrict__ out,
                                 int64_t o_sb, int64_t o_sh, int64_t o_sr,
                                 const int64_t* __restrict__ blocks_out,
                                 const float* __restrict__ cos_t, const float* __restrict__ sin_t,
                                 const int* __restrict__ dim_map, int D, int P, int variance) {
  const int d = threadIdx.x;
  const int i = blockIdx.x, h = blockIdx.y;
  // a negative block id is "no chunk closes" (the fixed-width list of a CUDA-graph step)
  if (d >= D || blocks_in[i] < 0 || blocks_out[i] < 0) return;
  const T* base = k + blocks_in[i] * k_sb + h * k_sh;
  float* dst = out + blocks_out[i] * o_sb + h * o_sh + d;
  const int partner = dim_map[d];   // other component of d's RoPE pair, -1 if none
  const int code = dim_map[D + d];  // pair * 2 + (d is the pair's second component)
  const int pair = code >> 1;
  const bool second = code & 1;
  float chunk_sum = 0.f, group_sum = 0.f, raw_sum = 0.f, sq_sum = 0.f;
#pragma unroll 4
  for (int t = 0; t < kChunk; ++t) {
    const float x = to_float(base[t * k_st + d]);
    float cv = x, gv = x;
    if (partner >= 0) {
      const float y = to_float(base[t * k_st + partner]);
      const float cc = cos_t[t * P + pair], sc = sin_t[t * P + pair];
      const float cg = cos_t[(kChunk + t) * P + pair], sg = sin_t[(kChunk + t) * P + pair];
      // first: a*cos - b*sin with (a, b) = (x, y); second: a*sin + b*cos with (a, b) = (y, x)
      cv = second ? y * sc + x * cc : x * cc - y * sc;
      gv = second ? y * sg + x * cg : x * cg - y * sg;
    }
    chunk_sum += cv;
    group_sum += gv;
    raw_sum += x;
    if ((t & (kGroup - 1)) == kGroup - 1) {
      dst[(1 + t / kGroup) * o_sr] = group_sum * (1.f / kGroup);
      group_sum = 0.f;
      if (variance) {  // second pass over the group (L1-resident): sum of squared deviations
        const float mean = raw_sum * (1.f / kGroup);
        for (int u = t + 1 - kGroup; u <= t; ++u) {
          const float e = to_float(base[u * k_st + d]) - mean;
          sq_sum += e * e;
        }
        raw_sum = 0.f;
      }
    }
  }
  // row 0: the chunk summary, or (group_score "mean_std") the within-group key variance
  dst[0] = variance ? sq_sum * (1.f / kChunk) : chunk_sum * (1.f / kChunk);
}

void write_kv(at::Tensor pool, at::Tensor key, at::Tensor value, at::Tensor slots,
              const std::optional<at::Tensor>& bank,
              const std::optional<at::Tensor>& slot_of_block) {
  check_cuda(pool, "pool");
  HGA_CHECK(pool.dim() == 5 && pool.size(2) == 2 && pool.size(3) == kChunk && pool.is_contiguous(),
            "pool must be contiguous [blocks, H, 2, 64, D]");
  const int H = pool.size(1), D = pool.size(4);
  HGA_CHECK(key.dim() == 3 && key.size(1) == H && key.size(2) == D && value.sizes() == key.sizes(),
            "key/value must be [T, H, D] matching the pool");
  HGA_CHECK(key.scalar_type() == pool.scalar_type() && value.scalar_type() == pool.scalar_type(),
            "key/value dtype must match the pool");
  HGA_CHECK(key.stride(2) == 1 && value.stride(2) == 1, "key/value need a contiguous last dim");
  HGA_CHECK(
      slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.numel() >= key.size(0),
      "slots must be int64 [>= T]");
  HGA_CHECK(bank.has_value() == slot_of_block.has_value(),
            "write_kv: the bank and its slot_of_block come together");
  if (bank.has_value()) {
    HGA_CHECK(bank->is_cuda() && bank->is_contiguous() &&
                  bank->scalar_type() == pool.scalar_type() && bank->dim() == 5 &&
                  bank->sizes().slice(1) == pool.sizes().slice(1),
              "write_kv: the bank must be contiguous [slots, H, 2, 64, D] of the pool's dtype");
    HGA_CHECK(slot_of_block->is_cuda() && slot_of_block->scalar_type() == at::kLong &&
                  slot_of_block->is_contiguous() && slot_of_block->numel() == pool.size(0) + 1,
              "write_kv: slot_of_block must be contiguous int64 [num_blocks + 1]");
  }
  const int T_ = key.size(0);
  if (T_ == 0) return;
  const int es = pool.element_size();
  HGA_CHECK((D * es) % 16 == 0 && (key.stride(0) * es) % 16 == 0 &&
                (key.stride(1) * es) % 16 == 0 && (value.stride(0) * es) % 16 == 0 &&
                (value.stride(1) * es) % 16 == 0 &&
                reinterpret_cast<uintptr_t>(key.data_ptr()) % 16 == 0 &&
                reinterpret_cast<uintptr_t>(value.data_ptr()) % 16 == 0,
            "write_kv needs 16-byte aligned rows");
  const c10::cuda::CUDAGuard guard(key.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t work = int64_t(T_) * H * 2 * (D * es / 16);
  const int threads = 256;
  const int blocks = int(std::min<int64_t>((work + threads - 1) / threads, 8 * num_sms()));
  HGA_DISPATCH_FLOAT(pool.scalar_type(), "write_kv", [&] {
    write_kv_kernel<scalar_t><<<blocks, threads, 0, stream>>>(
        reinterpret_cast<scalar_t*>(pool.data_ptr()),
        reinterpret_cast<const scalar_t*>(key.data_ptr()),
        reinterpret_cast<const scalar_t*>(value.data_ptr()), slots.data_ptr<int64_t>(),
        key.stride(0), key.stride(1), value.stride(0), value.stride(1), T_, H, D,
        bank.has_value() ? reinterpret_cast<scalar_t*>(bank->data_ptr()) : nullptr,
        slot_of_block.has_value() ? slot_of_block->data_ptr<int64_t>() : nullptr);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void summarize(at::Tensor k, at::Tensor blocks_in, at::Tensor out, at::Tensor blocks_out,
               at::Tensor cos, at::Tensor sin, at::Tensor dim_map, int64_t variance) {
  check_cuda(k, "k");
  HGA_CHECK(k.dim() == 4 && k.size(1) == kChunk && k.stride(3) == 1,
            "k must be [blocks, 64, H, D] with a contiguous last dim (any other strides)");
  const int H = k.size(2), D = k.size(3);
  HGA_CHECK(out.dim() == 4 && out.size(1) == H && out.size(2) == 1 + kGroups && out.size(3) == D &&
                out.stride(3) == 1 && out.scalar_type() == at::kFloat,
            "out must be float32 [blocks, H, 5, D] with a contiguous last dim");
  const int n = blocks_in.numel();
  HGA_CHECK(blocks_out.numel() == n && blocks_in.scalar_type() == at::kLong &&
                blocks_out.scalar_type() == at::kLong && blocks_in.is_contiguous() &&
                blocks_out.is_contiguous(),
            "blocks_in/blocks_out must be int64 of equal length");
  const int P = cos.size(-1);
  HGA_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.scalar_type() == at::kFloat &&
                cos.numel() == 2 * kChunk * P && sin.sizes() == cos.sizes(),
            "cos/sin must be float32 [2, 64, P]");
  HGA_CHECK(
      dim_map.is_contiguous() && dim_map.scalar_type() == at::kInt && dim_map.numel() == 2 * D,
      "dim_map must be int32 [2, D]");
  HGA_CHECK(D <= 1024, "head size too large");
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(n, H);
  const int threads = (D + 31) / 32 * 32;
  HGA_DISPATCH_FLOAT(k.scalar_type(), "summarize", [&] {
    summarize_kernel<scalar_t><<<grid, threads, 0, stream>>>(
        reinterpret_cast<const scalar_t*>(k.data_ptr()), k.stride(0), k.stride(1), k.stride(2),
        blocks_in.data_ptr<int64_t>(), out.data_ptr<float>(), out.stride(0), out.stride(1),
        out.stride(2), blocks_out.data_ptr<int64_t>(), cos.data_ptr<float>(), sin.data_ptr<float>(),
        dim_map.data_ptr<int>(), D, P, int(variance != 0));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace hga

TORCH_LIBRARY_IMPL(vllm_hga, CUDA, m) {
  m.impl("write_kv", &hga::write_kv);
  m.impl("summarize", &hga::summarize);
}
