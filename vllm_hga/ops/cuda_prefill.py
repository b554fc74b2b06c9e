"""HGA prefill on the GPU without a per-chunk Python loop (HGALayer.attend_prefix's job).

For one prefill request (queries at positions q_start .. q_start+n-1, keys 0 .. S-1):

1. one gather copies the request's blocks [0, ceil(S/64)) of full K/V from the pool (pinned
   host memory through UVA, or device memory) into a device scratch laid out like the pool,
   and their summary pages into a scratch of pages; the scratch is allocated once per engine
   (tiers.py, sized for max_model_len) and reused by every layer and request;
2. every query is a routing "row" with its own position over an identity block table, so
   the decode kernels route it (cuda_ops.decode_groups: chunk top-K_c, group top-G, the
   fixed-width list of sinks + local + own chunk + routed groups) exactly as they route a
   decode query; attention over the scratch follows those lists (below);
3. queries go in slices of at most ``max_rows`` rows, which bounds the grids
   (blockIdx.z <= 65535) and the per-slice lists ([rows, Hq, Gt] ids + masks).

Attention, two implementations (``impl``):

* ``"rows"``: cuda_ops.attend_groups, every query a decode row (CUDA cores, each query
  head reads its own copy of its groups);
* ``"tc"``: csrc/prefill.cu, block-sparse on tensor cores: a block takes the 64 queries of
  one chunk and one head, stages the window chunks they share plus the union of the groups
  they routed to through shared memory, and masks per query (half/bf16; up to 64 routed
  groups per query; else "rows").  Slices then end on chunk boundaries.

The result is per-query HGA (DESIGN.md §1) and equals the decode path's for the same query.
"""

from __future__ import annotations

import torch

from ..config import CHUNK_SIZE, GROUP_SIZE, HGAConfig
from . import cuda_ops

GROUPS = CHUNK_SIZE // GROUP_SIZE
MAX_ROWS = 4096  # queries per routing/attention launch (<= 65535 grid rows)
MAX_ROUTED_TC = 64  # csrc/prefill.cu kMaxRouted
# "auto": "tc" for requests of up to TC_MAX_TOKENS tokens, "rows" above, where the
# one-layer prefill table of docs/BENCHMARKS.md §3 puts the crossover.
DEFAULT_IMPL = "auto"
TC_MAX_TOKENS = 65536


def tc_available() -> bool:
    return cuda_ops.available() and hasattr(torch.ops.vllm_hga, "prefill_attend")


class Scratch:
    """Device copies of one request's K/V blocks and summary pages, shared by all layers
    (owned by tiers.EngineTiers)."""

    def __init__(self, max_chunks: int, Hkv: int, D: int, dtype: torch.dtype, device: torch.device):
        self.kv = torch.empty(max_chunks, Hkv, 2, CHUNK_SIZE, D, dtype=dtype, device=device)
        self.summ = torch.empty(max_chunks, Hkv, 1 + GROUPS, D, dtype=torch.float32, device=device)
        # identity block table: routing row i reads scratch block j for chunk j
        self.ident = torch.arange(max_chunks, dtype=torch.int32, device=device).unsqueeze(0)

    @property
    def max_chunks(self) -> int:
        return self.kv.shape[0]

    def nbytes(self) -> int:
        return self.kv.nbytes + self.summ.nbytes + self.ident.nbytes


def gather_request(
    pool: torch.Tensor, summ: torch.Tensor, blocks: torch.Tensor, sc: Scratch
) -> None:
    """sc.kv[:n] = pool[blocks], sc.summ[:n] = summ[blocks] (blocks: int [n] on the device)."""
    n = blocks.numel()
    nb = pool.shape[0]
    blocks = blocks.to(torch.long)
    cuda_ops.gather_rows(pool.view(nb, -1), blocks, sc.kv[:n].view(n, -1))
    torch.index_select(summ, 0, blocks, out=sc.summ[:n])


def slices(q_start: int, n: int, step: int, aligned: bool):
    """[a, b) query slices of at most step rows; aligned: b (but the last) on a chunk start."""
    a = 0
    while a < n:
        b = min(n, a + step)
        if aligned and b < n:
            b = max(a + 1, (q_start + b) // CHUNK_SIZE * CHUNK_SIZE - q_start)
        yield a, b
        a = b


def prefill(
    q: torch.Tensor,
    q_start: int,
    pool: torch.Tensor,
    summ: torch.Tensor,
    block_row: torch.Tensor,
    cfg: HGAConfig,
    sinks: int,
    local: int,
    groups: int,
    scale: float,
    out: torch.Tensor,
    sc: Scratch,
    max_rows: int = MAX_ROWS,
    kernel: str = "auto",
    count=None,
    impl: str = "auto",
) -> None:
    """HGA attention of one request's queries q [n, Hq, D] at positions q_start.. into out.

    pool [nb, Hkv, 2, 64, D] and summ [nb, Hkv, 1+M, D] float32 as HGALayer.forward's;
    block_row [>= ceil(S/64)] the request's block-table row; sinks/local/groups as
    HGALayer's; out [n, Hq, D] (any float dtype, last dim contiguous); sc the engine's
    scratch (EngineTiers.prefill_scratch), at least ceil(S/64) chunks.  count(keys, pos,
    kv_bytes), if given, receives the metrics of each slice (device tensors, no sync).
    impl: "rows", "tc" or "auto" (DEFAULT_IMPL; "auto" picks by length, TC_MAX_TOKENS);
    kernel: attend_groups' kernel for "rows".
    """
    n = q.shape[0]
    if n == 0:
        return
    S = q_start + n
    n_chunks = -(-S // CHUNK_SIZE)
    if sc.max_chunks < n_chunks:
        raise ValueError(
            f"prefill of {S} tokens needs {n_chunks} scratch chunks, the engine's "
            f"scratch has {sc.max_chunks} (sized from max_model_len)"
        )
    gather_request(pool, summ, block_row[:n_chunks], sc)
    kv = sc.kv[:n_chunks]
    n_shared = (sinks + local + 1) * GROUPS
    impl = DEFAULT_IMPL if impl == "auto" else impl
    if impl == "auto":
        impl = "tc" if S <= TC_MAX_TOKENS else "rows"
    routed = min(groups, min(cfg.topk_chunks, n_chunks) * GROUPS)  # decode_groups' width
    tc = (
        impl == "tc"
        and tc_available()
        and q.dtype in (torch.float16, torch.bfloat16)
        and routed <= MAX_ROUTED_TC
    )
    step = max(CHUNK_SIZE if tc else 1, min(max_rows, 65535))
    for a, b in slices(q_start, n, step, tc):
        pos = torch.arange(q_start + a, q_start + b, device=q.device)
        nc = (q_start + b - 1) // CHUNK_SIZE + 1  # 1 + the slice's largest own chunk
        bt = sc.ident[:, :nc].expand(b - a, nc)
        qs = q[a:b]
        rows, ok, gid = cuda_ops.KERNELS.decode_groups(
            qs, pos, bt, nc, sc.summ, cfg, sinks, local, groups, sliced=True
        )
        if tc:
            o = out[a:b] if out.dtype == q.dtype else torch.empty_like(qs)
            torch.ops.vllm_hga.prefill_attend(
                qs,
                q_start + a,
                kv,
                gid,
                ok,
                n_shared,
                S,
                cfg.sink_chunks,
                cfg.local_chunks,
                float(scale),
                o,
            )
            if out.dtype != q.dtype:
                out[a:b].copy_(o)
        else:
            cuda_ops.KERNELS.attend_groups(qs, kv, rows, ok, scale, n_shared, out[a:b], kernel)
        if count is not None:
            count(ok.sum(), pos, 0)
    if count is not None:  # the request's K/V crossed from the pool once
        count(0, pos[:0], n_chunks * kv[0].numel() * kv.element_size())
