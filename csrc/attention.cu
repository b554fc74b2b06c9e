// Host side of the sparse decode attention op (kernels in attention.cuh, instantiated per
// dtype in attention_<dtype>.cu).

#include "attention.cuh"

namespace hga {

template <typename T>
void launch_attend(const T*, int64_t, int64_t, const T*, const int64_t*, const uint8_t*, int, int,
                   int, int, int, int, int, float, int, float*, float*, cudaStream_t);

namespace {

void attend_groups(at::Tensor q, at::Tensor kv_rows, at::Tensor rows, at::Tensor token_ok,
                   int64_t num_kv_heads, int64_t v_offset, int64_t n_shared, double scale,
                   int64_t splits, at::Tensor part_o, at::Tensor part_ml, at::Tensor out) {
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
  const int S = int(splits);
  HGA_CHECK(S >= 1 && part_o.is_contiguous() && part_o.numel() >= int64_t(R) * Hq * S * D &&
                part_ml.is_contiguous() && part_ml.numel() >= int64_t(R) * Hq * S * 2 &&
                part_o.scalar_type() == at::kFloat && part_ml.scalar_type() == at::kFloat,
            "part_o/part_ml workspaces too small");
  HGA_CHECK(out.dim() == 3 && out.size(0) == R && out.size(1) == Hq && out.size(2) == D &&
                out.stride(2) == 1,
            "out must be [R, Hq, D] with a contiguous last dim");
  const int es = q.element_size();
  HGA_CHECK((q.stride(0) * es) % 16 == 0 && (q.stride(1) * es) % 16 == 0 &&
                reinterpret_cast<uintptr_t>(q.data_ptr()) % 16 == 0 &&
                reinterpret_cast<uintptr_t>(kv_rows.data_ptr()) % 16 == 0,
            "q and kv_rows must be 16-byte aligned");
  if (R == 0 || Gt == 0) return;
  const c10::cuda::CUDAGuard guard(q.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const float qscale = float(scale) * kLog2e;
  HGA_DISPATCH_FLOAT(q.scalar_type(), "attend_groups", [&] {
    launch_attend<scalar_t>(reinterpret_cast<const scalar_t*>(q.data_ptr()), q.stride(0),
                            q.stride(1), reinterpret_cast<const scalar_t*>(kv_rows.data_ptr()),
                            rows.data_ptr<int64_t>(),
                            reinterpret_cast<const uint8_t*>(token_ok.data_ptr()), R, Hq,
                            int(num_kv_heads), D, Gt, int(n_shared), int(v_offset), qscale, S,
                            part_o.data_ptr<float>(), part_ml.data_ptr<float>(), stream);
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
