// Op schemas of the vllm_hga extension (torch.ops.vllm_hga.*) and the Python module stub.
// Kernels register their CUDA implementations in the .cu files; shapes and contracts are
// documented in vllm_hga/ops/cuda_ops.py, which is the only caller.

#include <Python.h>
#include <ATen/ATen.h>
#include <cuda_runtime.h>
#include <torch/library.h>

namespace {

// A CUDA tensor over a pinned host tensor's memory (UVA: the device reads it over PCIe).
// The view keeps the host tensor alive.
at::Tensor uva_view(const at::Tensor& host) {
  TORCH_CHECK(host.device().is_cpu() && host.is_pinned(),
              "vllm_hga: uva_view needs a pinned CPU tensor");
  void* dev_ptr = nullptr;
  TORCH_CHECK(cudaHostGetDevicePointer(&dev_ptr, host.data_ptr(), 0) == cudaSuccess,
              "vllm_hga: cudaHostGetDevicePointer failed (is the memory pinned and mapped?)");
  int device = 0;
  TORCH_CHECK(cudaGetDevice(&device) == cudaSuccess, "vllm_hga: cudaGetDevice failed");
  at::Tensor keep = host;
  return at::from_blob(
      dev_ptr, host.sizes(), host.strides(), [keep](void*) mutable { keep.reset(); },
      host.options().device(at::Device(at::kCUDA, device)));
}

}  // namespace

TORCH_LIBRARY(vllm_hga, m) {
  m.def(
      "write_kv(Tensor(a!) pool, Tensor key, Tensor value, Tensor slots, Tensor(b!)? bank=None,"
      " Tensor? slot_of_block=None) -> ()");
  m.def(
      "summarize(Tensor k, Tensor blocks_in, Tensor(a!) out, Tensor blocks_out, Tensor cos,"
      " Tensor sin, Tensor dim_map, int variance) -> ()");
  m.def(
      "route_chunks(Tensor q, Tensor pos, Tensor block_table, Tensor summ, int sink_chunks,"
      " int local_chunks, int max_group, int spread, float alpha, int split_len,"
      " Tensor(a!) cand_score, Tensor(a!) cand_idx) -> ()");
  m.def(
      "route_groups(Tensor q, Tensor pos, Tensor block_table, Tensor summ, Tensor cand_score,"
      " Tensor cand_idx, int n_chunks, int sink_chunks, int local_chunks, int sinks, int local,"
      " int spread, float alpha, Tensor(a!) rows, Tensor(a!) token_ok, Tensor(a!) gid,"
      " Tensor? cand_group=None) -> ()");
  m.def(
      "score_chunks_sketch(Tensor q, Tensor pos, Tensor block_table, Tensor pages,"
      " int sink_chunks, int local_chunks, Tensor(a!) scores, Tensor(b!) group_scores,"
      " int per_warp, int tensor_cores=1) -> ()");
  m.def(
      "route_select(Tensor pos, Tensor block_table, Tensor scores, Tensor group_scores,"
      " int num_kv_heads, int n_chunks, int sink_chunks, int local_chunks, int sinks, int local,"
      " int topk_chunks, Tensor(a!) rows, Tensor(b!) token_ok, Tensor(c!) gid) -> ()");
  m.def("sketch_pages(Tensor k, Tensor blocks_in, Tensor(a!) out, Tensor blocks_out) -> ()");
  m.def(
      "route_chunks_sketch(Tensor q, Tensor pos, Tensor block_table, Tensor pages,"
      " int sink_chunks, int local_chunks, int split_len, Tensor(a!) cand_score,"
      " Tensor(a!) cand_idx, Tensor(a!) cand_group, int tensor_cores=1) -> ()");
  m.def(
      "attend_groups(Tensor q, Tensor kv_rows, Tensor rows, Tensor token_ok, Tensor? bank_rows,"
      " int num_kv_heads, int v_offset, int n_shared, float scale, int mode, Tensor(a!) out) -> "
      "()");
  m.def("bank_fill(Tensor pool, Tensor(a!) bank, Tensor blocks, Tensor slots) -> ()");
  m.def(
      "bank_admit(Tensor pool, Tensor(a!) bank, Tensor rows, Tensor token_ok, int own_lo,"
      " int own_hi, Tensor(b!) slot_of_block, Tensor(c!) block_of_slot, Tensor(d!) last_use,"
      " Tensor(e!) order, Tensor(f!) miss_bits, Tensor(g!) miss_summary, Tensor(h!) meta,"
      " Tensor(i!) fill_blocks, Tensor(j!) fill_slots, Tensor(k!) enc, Tensor(l!)[] sinks,"
      " int chunk_bytes, bool fill) -> ()");
  m.def(
      "bank_invalidate(Tensor slots, Tensor(a!) slot_of_block, Tensor(b!) block_of_slot,"
      " Tensor(c!) last_use) -> ()");
  m.def(
      "prefill_attend(Tensor q, int p0, Tensor kv, Tensor gid, Tensor token_ok, int nfix,"
      " int seq_len, int sink_chunks, int local_chunks, float scale, Tensor(a!) out) -> ()");
  m.def("gather_rows(Tensor src, Tensor idx, Tensor(a!) dst) -> ()");
  m.def("gather_rows_ce(Tensor src, Tensor idx_cpu, Tensor(a!) dst) -> ()");
  m.def("uva_view(Tensor host) -> Tensor");
}

TORCH_LIBRARY_IMPL(vllm_hga, CPU, m) { m.impl("uva_view", &uva_view); }

// `import vllm_hga._C` loads the library (and with it the registrations above).
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, 0, nullptr};
  return PyModule_Create(&def);
}
