// Gather of pool rows (e.g. selected 16-token groups) into a device buffer, two ways:
//   gather_rows:    zero-copy kernel, SMs load straight from pinned host memory (UVA);
//                   indices stay on the device, so no host round trip.
//   gather_rows_ce: the copy engines, one batched cudaMemcpyBatchAsync call; indices
//                   must be on the host (a device->host sync if routing produced them).
// Runs of consecutive source rows are merged into one copy on the copy-engine path.

#include "hga_common.cuh"
#include "copy_vecs.cuh"

#include <vector>

namespace hga {
namespace {

constexpr int kGatherUnroll = 8;  // 16-byte loads in flight per lane before the stores

__global__ void __launch_bounds__(256)
    gather_rows_kernel(const uint4* __restrict__ src, const int64_t* __restrict__ idx,
                       uint4* __restrict__ dst, int64_t n, int vecs) {
  const int lane = threadIdx.x % 32;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x / 32);
  for (int64_t row = blockIdx.x * int64_t(blockDim.x / 32) + threadIdx.x / 32; row < n;
       row += warps) {
    const uint4* s = src + idx[row] * vecs;
    uint4* d = dst + row * vecs;
    for (int v0 = 0; v0 < vecs; v0 += 32 * kGatherUnroll)
      copy_vecs_unrolled<kGatherUnroll>(s, d, v0, vecs, 32, lane);
  }
}

// Device bank fill (bank.py): block i of the grid copies pool[blocks[i]] (one whole block:
// all KV heads, K and V) into bank[slots[i]]; entries with slots[i] < 0 are padding of a
// fixed-shape list and exit at once.  Source may be pinned host memory (UVA).
__global__ void __launch_bounds__(256)
    bank_fill_kernel(const uint4* __restrict__ pool, uint4* __restrict__ bank,
                     const int64_t* __restrict__ blocks, const int64_t* __restrict__ slots,
                     int64_t vecs) {
  const int64_t slot = slots[blockIdx.x];
  if (slot < 0) return;
  const uint4* s = pool + blocks[blockIdx.x] * vecs;
  uint4* d = bank + slot * vecs;
  for (int64_t v0 = int64_t(blockIdx.y) * blockDim.x * kGatherUnroll; v0 < vecs;
       v0 += int64_t(gridDim.y) * blockDim.x * kGatherUnroll)
    copy_vecs_unrolled<kGatherUnroll>(s, d, v0, vecs, int(blockDim.x), int(threadIdx.x));
}

int64_t row_bytes(const at::Tensor& src, const at::Tensor& dst) {
  HGA_CHECK(src.is_contiguous() && dst.is_contiguous() && src.dim() >= 1 && dst.dim() >= 1 &&
                src.scalar_type() == dst.scalar_type(),
            "src/dst must be contiguous tensors of one dtype");
  const int64_t bytes = src.numel() == 0 ? 0 : src.nbytes() / src.size(0);
  HGA_CHECK(dst.numel() == 0 || dst.nbytes() / dst.size(0) == bytes, "src/dst rows differ in size");
  return bytes;
}

void gather_rows(at::Tensor src, at::Tensor idx, at::Tensor dst) {
  check_cuda(src, "src");
  check_cuda(dst, "dst");
  HGA_CHECK(idx.is_cuda() && idx.scalar_type() == at::kLong && idx.is_contiguous() &&
                idx.numel() == dst.size(0),
            "idx must be int64 on the device, one per dst row");
  const int64_t bytes = row_bytes(src, dst);
  HGA_CHECK(bytes % 16 == 0 && reinterpret_cast<uintptr_t>(src.data_ptr()) % 16 == 0 &&
                reinterpret_cast<uintptr_t>(dst.data_ptr()) % 16 == 0,
            "rows must be multiples of 16 bytes, 16-byte aligned");
  const int64_t n = idx.numel();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(dst.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t blocks = std::min<int64_t>((n + 7) / 8, 16 * num_sms());
  gather_rows_kernel<<<int(blocks), 256, 0, stream>>>(
      reinterpret_cast<const uint4*>(src.data_ptr()), idx.data_ptr<int64_t>(),
      reinterpret_cast<uint4*>(dst.data_ptr()), n, int(bytes / 16));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void bank_fill(at::Tensor pool, at::Tensor bank, at::Tensor blocks, at::Tensor slots) {
  check_cuda(pool, "pool");
  check_cuda(bank, "bank");
  HGA_CHECK(pool.is_contiguous() && bank.is_contiguous() && pool.dim() == 5 && bank.dim() == 5 &&
                pool.scalar_type() == bank.scalar_type() &&
                pool.sizes().slice(1) == bank.sizes().slice(1),
            "pool/bank must be contiguous [*, H, 2, 64, D] of one dtype and block shape");
  HGA_CHECK(blocks.is_cuda() && slots.is_cuda() && blocks.scalar_type() == at::kLong &&
                slots.scalar_type() == at::kLong && blocks.is_contiguous() &&
                slots.is_contiguous() && blocks.numel() == slots.numel(),
            "blocks/slots must be int64 device tensors of equal length");
  const int64_t bytes = pool.numel() == 0 ? 0 : pool.nbytes() / pool.size(0);
  HGA_CHECK(bytes % 16 == 0 && reinterpret_cast<uintptr_t>(pool.data_ptr()) % 16 == 0 &&
                reinterpret_cast<uintptr_t>(bank.data_ptr()) % 16 == 0,
            "blocks must be multiples of 16 bytes, 16-byte aligned");
  const int64_t n = blocks.numel();
  if (n == 0 || bytes == 0) return;
  const c10::cuda::CUDAGuard guard(bank.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t vecs = bytes / 16;
  const int per_y = 256 * kGatherUnroll;
  const dim3 grid(unsigned(n), unsigned(std::min<int64_t>((vecs + per_y - 1) / per_y, 16)));
  bank_fill_kernel<<<grid, 256, 0, stream>>>(
      reinterpret_cast<const uint4*>(pool.data_ptr()), reinterpret_cast<uint4*>(bank.data_ptr()),
      blocks.data_ptr<int64_t>(), slots.data_ptr<int64_t>(), vecs);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void gather_rows_ce(at::Tensor src, at::Tensor idx_cpu, at::Tensor dst) {
  check_cuda(src, "src");
  check_cuda(dst, "dst");
  HGA_CHECK(idx_cpu.device().is_cpu() && idx_cpu.scalar_type() == at::kLong &&
                idx_cpu.is_contiguous() && idx_cpu.numel() == dst.size(0),
            "idx_cpu must be int64 on the host, one per dst row");
  const int64_t bytes = row_bytes(src, dst);
  const int64_t n = idx_cpu.numel();
  if (n == 0) return;
  const int64_t* idx = idx_cpu.data_ptr<int64_t>();
  const char* s = static_cast<const char*>(src.data_ptr());
  char* d = static_cast<char*>(dst.data_ptr());
  std::vector<void*> dsts;
  std::vector<const void*> srcs;
  std::vector<size_t> sizes;
  for (int64_t i = 0; i < n; ++i) {
    HGA_CHECK(idx[i] >= 0 && idx[i] < src.size(0), "gather index out of range");
    if (!sizes.empty() && idx[i] == idx[i - 1] + 1) {  // extends the previous run
      sizes.back() += bytes;
      continue;
    }
    dsts.push_back(d + i * bytes);
    srcs.push_back(s + idx[i] * bytes);
    sizes.push_back(bytes);
  }
  const c10::cuda::CUDAGuard guard(dst.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  cudaMemcpyAttributes attr{};
  attr.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
  attr.flags = cudaMemcpyFlagPreferOverlapWithCompute;
  size_t attr_idx = 0;
  cudaError_t err = cudaMemcpyBatchAsync(dsts.data(), srcs.data(), sizes.data(), sizes.size(),
                                         &attr, &attr_idx, 1, stream);
  if (err != cudaSuccess) {  // older driver: one copy per run
    (void)cudaGetLastError();
    for (size_t i = 0; i < sizes.size(); ++i)
      C10_CUDA_CHECK(cudaMemcpyAsync(dsts[i], srcs[i], sizes[i], cudaMemcpyDefault, stream));
  }
}

}  // namespace
}  // namespace hga

TORCH_LIBRARY_IMPL(vllm_hga, CUDA, m) {
  m.impl("gather_rows", &hga::gather_rows);
  m.impl("gather_rows_ce", &hga::gather_rows_ce);
  m.impl("bank_fill", &hga::bank_fill);
}
