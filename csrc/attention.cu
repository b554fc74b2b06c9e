// Host side of the sparse decode attention op (kernels in attention.cuh, instantiated per
// dtype in attention_<dtype>.cu).

#include "attention.cuh"

#include <unordered_map>

namespace hga {

template <typename T>
void launch_attend(const T*, int64_t, int64_t, const T*, const T*, const int64_t*, const uint8_t*,
                   int, int, int, int, int, int, int, float, bool, int, int, int, int, int, float*,
                   float*, cudaStream_t);

// Splits of `cols` columns for one kernel: enough blocks to fill the GPU a few times over.
int heads_splits(int cols, int blocks, int sms) {  // a warp prefetches <= 32 columns
  return std::max((cols + 31) / 32, std::min((4 * sms + blocks - 1) / blocks, (cols + 3) / 4));
}
int shared_splits(int cols, int blocks, int sms) {
  return std::max(1,
                  std::min((2 * sms + blocks - 1) / blocks, (cols + kAttnWarps - 1) / kAttnWarps));
}
int nonempty(int cols, int S) {  // fewer splits if the last ones would be empty
  const int cps = (cols + S - 1) / S;
  return (cols + cps - 1) / cps;
}

namespace {

// Is p pinned host memory (a UVA view)?  Cached per pointer (one pool per layer, fixed for
// the process), so steady-state steps, and CUDA-graph captures after an eager warm-up
// step, make no driver query.
bool is_host_memory(const void* p) {
  static thread_local std::unordered_map<const void*, bool> known;
  const auto it = known.find(p);
  if (it != known.end()) return it->second;
  cudaPointerAttributes attr{};
  C10_CUDA_CHECK(cudaPointerGetAttributes(&attr, p));
  if (known.size() > 4096) known.clear();  // bounded, should pools come and go
  return known[p] = attr.type == cudaMemoryTypeHost;
}

// mode: 0 = pick by where kv_rows lives, 1 = per-head kernel, 2 = shared-column kernel,
// 3 = shared-column kernel on the first n_shared columns, per-head kernel on the rest.
void attend_groups(at::Tensor q, at::Tensor kv_rows, at::Tensor rows, at::Tensor token_ok,
                   const std::optional<at::Tensor>& bank_rows, int64_t num_kv_heads,
                   int64_t v_offset, int64_t n_shared, double scale, int64_t mode, at::Tensor out) {
  check_cuda(q, "q");
  check_cuda(kv_rows, "kv_rows");
  HGA_CHECK(q.dim() == 3 && q.stride(2) == 1, "q must be [R, Hq, D] with a contiguous last dim");
  const int R = q.size(0), Hq = q.size(1), D = q.size(2);
  HGA_CHECK(num_kv_heads >= 1 && Hq % num_kv_heads == 0, "Hq must be a multiple of num_kv_heads");
  HGA_CHECK(kv_rows.dim() == 3 && kv_rows.size(1) == kGroup && kv_rows.size(2) == D &&
                kv_rows.is_contiguous() && kv_rows.scalar_type() == q.scalar_type(),
            "kv_rows must be contiguous [rows, 16, D] in q's dtype (pool.view(-1, 16, D))");
  HGA_CHECK(rows.dim() == 3 && rows.size(0) == R && rows.size(1) == Hq && rows.is_contiguous() &&
                rows.scalar_type() == at::kLong,
            "rows must be int64 [R, Hq, G]");
  const int Gt = rows.size(2);
  HGA_CHECK(token_ok.numel() == rows.numel() * kGroup && token_ok.is_contiguous() &&
                token_ok.element_size() == 1 &&
                reinterpret_cast<uintptr_t>(token_ok.data_ptr()) % 16 == 0,
            "token_ok must be contiguous 16-byte aligned bool [R, Hq, G, 16]");
  HGA_CHECK(n_shared >= 0 && n_shared <= Gt, "n_shared out of range");
  HGA_CHECK(out.dim() == 3 && out.size(0) == R && out.size(1) == Hq && out.size(2) == D &&
                out.stride(2) == 1,
            "out must be [R, Hq, D] with a contiguous last dim");
  const int es = q.element_size();
  HGA_CHECK((q.stride(0) * es) % 16 == 0 && (q.stride(1) * es) % 16 == 0 &&
                reinterpret_cast<uintptr_t>(q.data_ptr()) % 16 == 0 &&
                reinterpret_cast<uintptr_t>(kv_rows.data_ptr()) % 16 == 0,
            "q and kv_rows must be 16-byte aligned");
  const void* bank_ptr = nullptr;  // rows < 0 read the device bank (bank.py)
  if (bank_rows.has_value()) {
    const at::Tensor& b = *bank_rows;
    check_cuda(b, "bank_rows");
    HGA_CHECK(b.dim() == 3 && b.size(1) == kGroup && b.size(2) == D && b.is_contiguous() &&
                  b.scalar_type() == q.scalar_type() &&
                  reinterpret_cast<uintptr_t>(b.data_ptr()) % 16 == 0,
              "bank_rows must be contiguous 16-byte aligned [rows, 16, D] in q's dtype");
    bank_ptr = b.data_ptr();
  }
  if (R == 0 || Gt == 0) return;
  const c10::cuda::CUDAGuard guard(q.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int Hkv = int(num_kv_heads), rep = Hq / Hkv;
  // Host memory: the shared-column kernel (PCIe bytes are what count: shared columns are
  // read once per KV head).  Device memory: the per-head kernel on all columns (latency
  // hiding wins; shared columns re-read by each head mostly hit L1/L2).  mode 3 splits the
  // list: shared columns by the shared-column kernel, routed ones per head (measured
  // slower on an H200: the shared kernel's 8 sequential head updates are latency-bound).
  // mode 1 / 2 force one kernel.
  // With a bank the listed rows are device memory (bank.py keeps every listed chunk it can
  // hold, the open own chunk too), whatever the pool is: the per-head kernel.
  const bool host = mode == 0 && bank_ptr == nullptr && is_host_memory(kv_rows.data_ptr());
  const int sms = num_sms();
  const int hb_heads = Hkv * ((rep + 7) / 8) * R;
  const int HB = rep <= 1 ? 1 : rep <= 2 ? 2 : rep <= 4 ? 4 : 8;
  const int hb_shared = Hkv * ((rep + HB - 1) / HB) * R;
  int S1 = 0, S2 = 0, split_at = 0;  // shared kernel on [0, split_at), heads on the rest
  if (mode == 2 || host) {
    split_at = Gt;
  } else if (mode == 3) {
    split_at = int(n_shared);
  }
  if (split_at > 0) S1 = nonempty(split_at, shared_splits(split_at, hb_shared, sms));
  if (split_at < Gt) S2 = nonempty(Gt - split_at, heads_splits(Gt - split_at, hb_heads, sms));
  const int S = S1 + S2;
  auto fopt = q.options().dtype(at::kFloat);
  at::Tensor part_o = at::empty({int64_t(R) * Hq * S * D}, fopt);
  at::Tensor part_ml = at::empty({int64_t(R) * Hq * S * 2}, fopt);
  const float qscale = float(scale) * kLog2e;
  HGA_DISPATCH_FLOAT(q.scalar_type(), "attend_groups", [&] {
    auto launch = [&](bool heads, int c0, int c1, int splits, int first) {
      launch_attend<scalar_t>(reinterpret_cast<const scalar_t*>(q.data_ptr()), q.stride(0),
                              q.stride(1), reinterpret_cast<const scalar_t*>(kv_rows.data_ptr()),
                              reinterpret_cast<const scalar_t*>(bank_ptr), rows.data_ptr<int64_t>(),
                              reinterpret_cast<const uint8_t*>(token_ok.data_ptr()), R, Hq, Hkv, D,
                              Gt, int(n_shared), int(v_offset), qscale, heads, c0, c1, splits,
                              first, S, part_o.data_ptr<float>(), part_ml.data_ptr<float>(),
                              stream);
    };
    if (S1) launch(false, 0, split_at, S1, 0);
    if (S2) launch(true, split_at, Gt, S2, S1);
  });

  const int threads = (D + 31) / 32 * 32;
  HGA_DISPATCH_FLOAT(out.scalar_type(), "attend_groups(out)", [&] {
    combine_kernel<scalar_t><<<R * Hq, threads, 0, stream>>>(
        part_o.data_ptr<float>(), part_ml.data_ptr<float>(), S, D, Hq,
        reinterpret_cast<scalar_t*>(out.data_ptr()), out.stride(0), out.stride(1));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace hga

TORCH_LIBRARY_IMPL(vllm_hga, CUDA, m) { m.impl("attend_groups", &hga::attend_groups); }
