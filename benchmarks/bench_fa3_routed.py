"""Decode attention over HGA's routed groups: our kernel against FlashAttention 3 (vLLM's
`vllm.vllm_flash_attn`, paged varlen with an arbitrary block table), same run, same lists.

Routing gives each (request, query head) a list of 16-token groups (sinks, local window,
own chunk, routed groups).  A group is 16 consecutive K rows of the pool, so the pool viewed
as pages of 16 tokens is a paged K cache whose page ids are exactly the routed rows; V is the
same view offset by the 4 K pages of a chunk.  Three ways to attend:

* ``ours``: attend_groups (csrc), what the engine runs;
* ``fa3_heads``: FA3 with one row per (request, query head) and that head's page list: the
  same keys as ours (outputs compared);
* ``fa3_union``: FA3 with one row per (request, KV head) whose query heads form its GQA
  group and whose pages are the union of their lists: each head attends more keys (a
  quality change, reported as the output difference, not a speed-only swap);
* ``fa3_dense``: FA3 over the whole context (the dense baseline of the same run).

Pages are ordered full groups first and the own chunk's partial group last, so seqused_k
cuts exactly its unwritten tokens.  Times are CUDA-graph replays (device time, no launch
overhead).  Needs the gpu-kit (vLLM 0.32 on the GPU machine):

    PYTHONPATH=/tmp/gpu-site:. python -m benchmarks.bench_fa3_routed --contexts 8192 32768 131072 \
        --batches 1 4 16 --json fa3.json
"""

from __future__ import annotations

import argparse
import json

import torch

from vllm_hga.config import CHUNK_SIZE, GROUP_SIZE

GROUPS = CHUNK_SIZE // GROUP_SIZE

HQ, HKV, D = 32, 4, 128


def graph_ms(fn, iters: int = 50) -> float:
    """Device ms per call of fn replayed from a CUDA graph."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    a.record()
    for _ in range(iters):
        graph.replay()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / iters


def ordered_pages(rows: torch.Tensor, token_ok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per list (leading dims flattened): page ids with full groups first, the partial group
    last, empty groups after; and the number of valid tokens (seqused_k)."""
    rows = rows.reshape(-1, rows.shape[-1])
    n = token_ok.reshape(rows.shape[0], rows.shape[1], GROUP_SIZE).sum(-1)
    key = torch.where(n == GROUP_SIZE, 0, torch.where(n > 0, 1, 2))
    order = torch.sort(key, dim=-1, stable=True).indices
    return rows.gather(1, order).to(torch.int32).contiguous(), n.sum(-1).to(torch.int32)


def union_pages(rows, token_ok) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (request, KV head): the union of its query heads' pages, ordered as above."""
    R, Hq, Gt = rows.shape
    rep = Hq // HKV
    n = token_ok.sum(-1)
    lists, used = [], []
    for r in range(R):
        for kvh in range(HKV):
            rr = rows[r, kvh * rep : (kvh + 1) * rep].reshape(-1)
            nn = n[r, kvh * rep : (kvh + 1) * rep].reshape(-1)
            full = torch.unique(rr[nn == GROUP_SIZE])
            part = torch.unique(rr[(nn > 0) & (nn < GROUP_SIZE)])
            assert part.numel() <= 1, "one partial group (the own chunk's) per list"
            lists.append(torch.cat([full, part]))
            tail = int(nn[(nn > 0) & (nn < GROUP_SIZE)][:1].sum())
            used.append(GROUP_SIZE * full.numel() + tail)
    width = max(x.numel() for x in lists)
    bt = torch.zeros(len(lists), width, dtype=torch.int32, device=rows.device)
    for i, x in enumerate(lists):
        bt[i, : x.numel()] = x.to(torch.int32)
    return bt, torch.tensor(used, dtype=torch.int32, device=rows.device)


def measure(S: int, R: int, flash_attn_varlen_func) -> dict:
    """One (context, batch) row: times of every way, output differences against ours."""
    from devkit.paged_batch import PagedBatch

    b = PagedBatch([S] * R, HQ, HKV, D, seed=S + R)
    pool, layer, scale = b.pool, b.layer, D**-0.5
    rows, token_ok, _ = layer.decode_groups(b.q, b.summ, b.md)
    q = b.q
    # K page p = routed row p; V page p is 4 pages (a chunk's K) later.  FA3 wants K and V
    # of equal page counts, so both views drop the flat pool's last 4 pages (the last
    # block's V, never a K page).
    flat, shift = pool.view(-1), GROUPS * GROUP_SIZE * D
    pages = flat[: flat.numel() - shift].view(-1, GROUP_SIZE, 1, D)
    v_pages = flat[shift:].view(-1, GROUP_SIZE, 1, D)
    ours_out = torch.empty(R, HQ, D, dtype=torch.float32, device="cuda")

    def ours():
        layer.ops.attend_groups(q, pool, rows, token_ok, scale, b.n_shared, out=ours_out)

    def routed_fa3(qx, cu, bt, used):  # one query token a row, its pages in bt
        return flash_attn_varlen_func(
            qx,
            pages,
            v_pages,
            1,
            cu,
            bt.shape[1] * GROUP_SIZE,
            seqused_k=used,
            softmax_scale=scale,
            causal=True,
            block_table=bt,
            fa_version=3,
        )

    bt_h, used_h = ordered_pages(rows, token_ok)
    cu_h = torch.arange(R * HQ + 1, dtype=torch.int32, device="cuda")
    q_h = q.reshape(R * HQ, 1, D)

    def fa3_heads():
        return routed_fa3(q_h, cu_h, bt_h, used_h)

    bt_u, used_u = union_pages(rows, token_ok)
    cu_u = torch.arange(R * HKV + 1, dtype=torch.int32, device="cuda")
    q_u = q.reshape(R * HKV, HQ // HKV, D)

    def fa3_union():
        return routed_fa3(q_u, cu_u, bt_u, used_u)

    k_dense = pool[:, :, 0].permute(0, 2, 1, 3)  # [blocks, 64, H_kv, D], strided
    v_dense = pool[:, :, 1].permute(0, 2, 1, 3)
    bt_d = b.bt[:, : b.n_chunks].contiguous()
    used_d = torch.full((R,), S, dtype=torch.int32, device="cuda")
    cu_d = torch.arange(R + 1, dtype=torch.int32, device="cuda")

    def fa3_dense():
        return flash_attn_varlen_func(
            q,
            k_dense,
            v_dense,
            1,
            cu_d,
            b.n_chunks * CHUNK_SIZE,
            seqused_k=used_d,
            softmax_scale=scale,
            causal=True,
            block_table=bt_d,
            fa_version=3,
        )

    ours()
    ref = ours_out.clone()
    row = {"context": S, "batch": R, "pages_per_head": float(used_h.float().mean() / 16)}
    row["union_pages_per_kv_head"] = float(used_u.float().mean() / 16)
    for name, fn in (("ours", ours), ("fa3_heads", fa3_heads), ("fa3_union", fa3_union)):
        try:
            row[f"{name}_us"] = round(1000 * graph_ms(fn), 2)
            if name != "ours":
                got = fn().float().reshape(R, HQ, D)
                row[f"{name}_max_diff_vs_ours"] = float((got - ref).abs().max())
        except Exception as e:  # a layout FA3 refuses: recorded, the others still run
            row[f"{name}_error"] = f"{type(e).__name__}: {e}"[:300]
    try:
        row["fa3_dense_us"] = round(1000 * graph_ms(fa3_dense), 2)
    except Exception as e:
        row["fa3_dense_error"] = f"{type(e).__name__}: {e}"[:300]
    return row


def main() -> None:
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--json")
    args = ap.parse_args()
    rows_out = []
    for S in args.contexts:
        for R in args.batches:
            row = measure(S, R, flash_attn_varlen_func)
            rows_out.append(row)
            print("RESULT", json.dumps(row), flush=True)
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows_out, f, indent=1)


if __name__ == "__main__":
    main()
