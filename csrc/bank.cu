// Device bank admission and invalidation (vllm_hga/bank.py) on the GPU.
//
// bank_admit: three launches per layer and decode step, fixed shapes, no host sync, the
// step counter on the device (so the whole admission can be captured in a CUDA graph):
//   1. bank_mark_kernel (grid): every list column that is valid (some token_ok) and not in
//      the open own chunk [own_lo, own_hi) names a block.  Resident block (hit): its slot's
//      last_use = step + 1 and the column is encoded as a bank row at once (a hit is never
//      evicted in its step).  Other block (miss): its bit is set in miss_bits (one bit per
//      pool block; miss_summary has one bit per nonzero word of miss_bits) and the column
//      is written as "pending" (-kPending - row).
//   2. bank_admit_kernel (one CTA): classifies the slots (empty / kept / hit), lists the
//      misses in block order from the two bitmaps (and clears them), pairs the first
//      min(misses, slots not hit) of them with the least-recently-used slots not hit this
//      step, updates slot_of_block / block_of_slot / last_use, the LRU order and the
//      counters, and writes the fill list (fill_blocks / fill_slots, padded with -1).
//   3. bank_fill_encode_kernel (grid): CTAs [0, fill_ctas) copy the admitted chunks pool ->
//      bank (the pool may be pinned host memory read over UVA); the others resolve the
//      pending columns through the updated slot_of_block.
//
// LRU order without a sort: order[2][cap] (int32, double-buffered by step parity) holds the
// slots sorted by (last_use, slot) as of the end of the last admission.  The torch path's
// stable sort of last_use after the hit refresh is exactly
//   [empty slots by index] ++ [kept slots (not empty, not hit) in the previous order] ++
//   [hit slots by index]
// because only admission raises last_use (to the current step, shared by all it touches)
// and only invalidation lowers it (to -1 = empty).  So the victims are the first slots of
// the first two groups, and the new order is the rest of those groups followed by all
// touched slots (hits and admitted) by index.  Each group is one block-wide prefix scan.
//
// Capacity: one byte per slot of shared memory for the slot classes, kBankMaxSlots
// (vllm_hga/config.py BANK_MAX_CHUNKS) at most.

#include "hga_common.cuh"
#include "bank_kernels.cuh"

namespace hga {
namespace {

// ----------------------------------------------------------------------------- host side
void check_table(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t numel) {
  HGA_CHECK(t.is_cuda() && t.scalar_type() == dtype && t.is_contiguous() && t.numel() == numel,
            name, " must be a contiguous CUDA ", dtype, " tensor of ", numel, " elements (got ",
            t.scalar_type(), " ", t.sizes(), ")");
}

struct Tables {
  int64_t nb, cap;
};

Tables check_tables(const at::Tensor& slot_of_block, const at::Tensor& block_of_slot,
                    const at::Tensor& last_use) {
  HGA_CHECK(slot_of_block.dim() == 1 && block_of_slot.dim() == 1, "bank tables must be 1-D");
  const Tables t{slot_of_block.numel() - 1, block_of_slot.numel() - 1};
  HGA_CHECK(t.nb >= 0 && t.cap >= 0, "bank tables need their spare entry");
  check_table(slot_of_block, "slot_of_block", at::kLong, t.nb + 1);
  check_table(block_of_slot, "block_of_slot", at::kLong, t.cap + 1);
  check_table(last_use, "last_use", at::kLong, t.cap + 1);
  return t;
}

void bank_admit(at::Tensor pool, at::Tensor bank, at::Tensor rows, at::Tensor token_ok,
                int64_t own_lo, int64_t own_hi, at::Tensor slot_of_block, at::Tensor block_of_slot,
                at::Tensor last_use, at::Tensor order, at::Tensor miss_bits,
                at::Tensor miss_summary, at::Tensor meta, at::Tensor fill_blocks,
                at::Tensor fill_slots, at::Tensor enc, at::TensorList sinks, int64_t chunk_bytes,
                bool fill) {
  check_cuda(pool, "pool");
  check_cuda(bank, "bank");
  const Tables t = check_tables(slot_of_block, block_of_slot, last_use);
  HGA_CHECK(t.cap >= 1 && t.cap <= kBankMaxSlots, "bank of ", t.cap,
            " slots: the admission "
            "kernel handles 1..",
            kBankMaxSlots, " (shared memory holds one byte per slot)");
  HGA_CHECK(pool.dim() == 5 && pool.size(0) == t.nb && pool.size(2) == 2 && pool.size(3) == kChunk,
            "pool must be [num_blocks, H, 2, 64, D] with num_blocks = len(slot_of_block) - 1");
  const int64_t h2m = pool.size(1) * 2 * kGroups;
  const int64_t n_words = (t.nb + 31) / 32, n_summary = (n_words + 31) / 32;
  check_table(order, "order", at::kInt, 2 * t.cap);
  check_table(miss_bits, "miss_bits", at::kInt, n_words);
  check_table(miss_summary, "miss_summary", at::kInt, n_summary);
  check_table(meta, "meta", at::kLong, kMetaLen);
  check_table(fill_blocks, "fill_blocks", at::kLong, t.cap);
  check_table(fill_slots, "fill_slots", at::kLong, t.cap);
  HGA_CHECK(
      rows.is_cuda() && rows.scalar_type() == at::kLong && rows.is_contiguous() && rows.dim() >= 1,
      "rows must be a contiguous int64 CUDA tensor");
  const int64_t n = rows.numel();
  HGA_CHECK(token_ok.is_cuda() && token_ok.scalar_type() == at::kBool && token_ok.is_contiguous() &&
                token_ok.numel() == n * kGroup &&
                reinterpret_cast<uintptr_t>(token_ok.data_ptr()) % 16 == 0,
            "token_ok must be contiguous bool [*rows.shape, 16], 16-byte aligned");
  HGA_CHECK(
      enc.is_cuda() && enc.scalar_type() == at::kLong && enc.is_contiguous() && enc.numel() == n,
      "enc must be a contiguous int64 CUDA tensor shaped like rows");
  HGA_CHECK(sinks.empty() || sinks.size() == 3, "sinks: none or (hits, misses, bytes)");
  for (const auto& s : sinks)
    HGA_CHECK(s.is_cuda() && s.scalar_type() == at::kDouble && s.numel() == 1,
              "metric sinks must be float64 CUDA scalars");
  int64_t vecs = 0;
  if (fill) {
    HGA_CHECK(pool.is_contiguous() && bank.is_contiguous() && bank.dim() == 5 &&
                  pool.scalar_type() == bank.scalar_type() && bank.size(0) >= t.cap &&
                  pool.sizes().slice(1) == bank.sizes().slice(1),
              "pool/bank must be contiguous [*, H, 2, 64, D] of one dtype and block shape");
    const int64_t bytes = t.nb > 0 ? int64_t(pool.nbytes()) / t.nb : 0;
    HGA_CHECK(bytes % 16 == 0 && reinterpret_cast<uintptr_t>(pool.data_ptr()) % 16 == 0 &&
                  reinterpret_cast<uintptr_t>(bank.data_ptr()) % 16 == 0,
              "blocks must be multiples of 16 bytes, 16-byte aligned");
    vecs = bytes / 16;
  }
  const c10::cuda::CUDAGuard guard(meta.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto* sob = slot_of_block.data_ptr<int64_t>();
  auto* bits = reinterpret_cast<uint32_t*>(miss_bits.data_ptr<int32_t>());
  auto* summary = reinterpret_cast<uint32_t*>(miss_summary.data_ptr<int32_t>());
  const int sms = num_sms();
  if (n > 0) {
    const int ctas = int(std::min<int64_t>((n + 255) / 256, 4 * sms));
    bank_mark_kernel<<<ctas, 256, 0, stream>>>(
        rows.data_ptr<int64_t>(), reinterpret_cast<const uint4*>(token_ok.data_ptr()), n,
        rows.size(-1), own_lo, own_hi, h2m, t.nb, sob, last_use.data_ptr<int64_t>(), bits, summary,
        meta.data_ptr<int64_t>(), enc.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  bank_admit_kernel<<<1, kAdmitThreads, 0, stream>>>(
      int(t.cap), n_summary, sob, block_of_slot.data_ptr<int64_t>(), last_use.data_ptr<int64_t>(),
      order.data_ptr<int32_t>(), bits, summary, meta.data_ptr<int64_t>(),
      fill_blocks.data_ptr<int64_t>(), fill_slots.data_ptr<int64_t>(),
      sinks.empty() ? nullptr : sinks[0].data_ptr<double>(),
      sinks.empty() ? nullptr : sinks[1].data_ptr<double>(),
      sinks.empty() ? nullptr : sinks[2].data_ptr<double>(), chunk_bytes);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int per_y = 256 * kFillUnroll;
  const int ysplit = fill ? int(std::min<int64_t>((vecs + per_y - 1) / per_y, 16)) : 1;
  const int fill_ctas =
      fill && vecs > 0 ? int(std::min<int64_t>(t.cap * ysplit, 2 * int64_t(sms))) : 0;
  const int enc_ctas = n > 0 ? int(std::min<int64_t>((n + 255) / 256, 2 * sms)) : 0;
  if (fill_ctas + enc_ctas > 0) {
    bank_fill_encode_kernel<<<fill_ctas + enc_ctas, 256, 0, stream>>>(
        fill ? reinterpret_cast<const uint4*>(pool.data_ptr()) : nullptr,
        fill ? reinterpret_cast<uint4*>(bank.data_ptr()) : nullptr, vecs, ysplit, fill_ctas,
        fill_blocks.data_ptr<int64_t>(), fill_slots.data_ptr<int64_t>(), meta.data_ptr<int64_t>(),
        sob, h2m, enc.data_ptr<int64_t>(), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

void bank_invalidate(at::Tensor slots, at::Tensor slot_of_block, at::Tensor block_of_slot,
                     at::Tensor last_use) {
  const Tables t = check_tables(slot_of_block, block_of_slot, last_use);
  HGA_CHECK(slots.is_cuda() && slots.is_contiguous() &&
                (slots.scalar_type() == at::kLong || slots.scalar_type() == at::kInt),
            "slots must be a contiguous int32/int64 CUDA tensor");
  const int64_t n = slots.numel();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(slot_of_block.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int ctas = int(std::min<int64_t>((n + 255) / 256, 2 * num_sms()));
  auto* sob = slot_of_block.data_ptr<int64_t>();
  auto* bos = block_of_slot.data_ptr<int64_t>();
  auto* lu = last_use.data_ptr<int64_t>();
  if (slots.scalar_type() == at::kLong)
    bank_invalidate_kernel<<<ctas, 256, 0, stream>>>(slots.data_ptr<int64_t>(), n, t.nb, sob, bos,
                                                     lu);
  else
    bank_invalidate_kernel<<<ctas, 256, 0, stream>>>(slots.data_ptr<int32_t>(), n, t.nb, sob, bos,
                                                     lu);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace hga

TORCH_LIBRARY_IMPL(vllm_hga, CUDA, m) {
  m.impl("bank_admit", &hga::bank_admit);
  m.impl("bank_invalidate", &hga::bank_invalidate);
}
