"""Sparse prefill through FlashAttention 3 (issue 14, item 3): one varlen row per (query
tile, KV head), its page table the tile's window and routed groups, against dense FA3 over
the whole prompt, same run.

A tile is the queries of one chunk in this step.  Tile-level routing gives each (tile, KV
head) one list of routed 16-token groups, shared by the tile's queries and the KV head's
query heads (FA3's GQA group: the row's q is [tokens, rep heads, D], nheads_k 1).  A group
is 16 consecutive K rows of the pool [blocks, H_kv, 2, 64, D], so the pool viewed as pages of
16 tokens is a paged K cache whose page ids name the groups; V is the same view shifted by a
chunk's 4 K pages (``page_views``).  Pages of a row: sink chunks, routed groups, local
chunks, then the own chunk's groups up to the tile's last query.  With the own chunk last,
FA3's causal mask (aligned to the bottom right: query i of n sees keys < used - n + i + 1)
is exactly "earlier pages whole, own chunk up to the query" (``tile_rows``).

``paged_varlen_reference`` is that FA3 call in torch (float32), so the page tables are
tested on CPU against a dense masked attention (tests/test_fa3_prefill_pages.py); on the
GPU the bench checks FA3 against it and times both FA3 variants:

    PYTHONPATH=/tmp/gpu-site:. python -m benchmarks.bench_fa3_prefill \
        --contexts 8192 32768 131072 --groups 44 88 --json fa3_prefill.json

Routing is not timed (the tile-level routing kernel is not written); the lists here are
random distinct groups from each tile's routable chunks, which costs FA3 the same as real
lists of that length.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

import torch

from benchmarks.profile_decode import step_ms
from vllm_hga.config import CHUNK_SIZE, GROUP_SIZE, HGAConfig

GROUPS = CHUNK_SIZE // GROUP_SIZE


def page_views(pool: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V page views [pages, 16, 1, D] of a pool [blocks, H_kv, 2, 64, D]: K page
    ((block * H_kv + h) * 2) * 4 + g is group g of KV head h's keys; the same id in the V
    view is its values (4 pages later in memory).  Both drop the flat pool's last 4 pages,
    since FA3 wants equal page counts (they are the last block's V, never a K page)."""
    D = pool.shape[-1]
    flat, shift = pool.reshape(-1), GROUPS * GROUP_SIZE * D
    k = flat[: flat.numel() - shift].view(-1, GROUP_SIZE, 1, D)
    v = flat[shift:].view(-1, GROUP_SIZE, 1, D)
    return k, v


@dataclass
class TileRows:
    """The varlen rows of one request's prefill step, (tile, KV head) major."""

    block_table: torch.Tensor  # int32 [rows, max_pages], padding 0 (never read)
    seqused_k: torch.Tensor  # int32 [rows]
    cu_seqlens_q: torch.Tensor  # int32 [rows + 1] (tokens of each row)
    tiles: list[tuple[int, int]]  # per tile: (first query position, query count)
    max_seqlen_q: int
    max_seqlen_k: int


def tile_rows(
    block_row: torch.Tensor,
    q_start: int,
    q_end: int,
    routed: list[torch.Tensor],
    num_kv_heads: int,
    cfg: HGAConfig,
) -> TileRows:
    """Rows for the queries at positions [q_start, q_end) of one request.

    block_row [chunks] int: the request's pool block of each chunk.  routed[t] [H_kv, G]
    long: the routed group ids (chunk * 4 + group, -1 padding) of the t-th tile of the step
    and each KV head, from chunks in [F, c - L) of the tile's chunk c.
    """
    F, L, H = cfg.sink_chunks, cfg.local_chunks, num_kv_heads
    tiles = []
    p = q_start
    while p < q_end:
        c = p // CHUNK_SIZE
        n = min(q_end, (c + 1) * CHUNK_SIZE) - p
        tiles.append((p, n))
        p += n
    if len(routed) != len(tiles):
        raise ValueError(f"{len(tiles)} tiles in [{q_start}, {q_end}), {len(routed)} lists")
    blocks = block_row.tolist()
    lists, used, counts = [], [], []
    for (p0, n), groups in zip(tiles, routed):
        c = p0 // CHUNK_SIZE
        last = p0 + n - 1 - c * CHUNK_SIZE  # the tile's last query, inside its chunk
        whole = list(range(min(F, c))) + list(range(max(F, c - L), c))
        for h in range(H):
            ids = [ch * GROUPS + g for ch in whole[: min(F, c)] for g in range(GROUPS)]
            ids += [int(x) for x in groups[h].tolist() if x >= 0]
            ids += [ch * GROUPS + g for ch in whole[min(F, c) :] for g in range(GROUPS)]
            ids += [c * GROUPS + g for g in range(last // GROUP_SIZE + 1)]
            pages = [((blocks[i // GROUPS] * H + h) * 2) * GROUPS + i % GROUPS for i in ids]
            lists.append(pages)
            used.append(GROUP_SIZE * (len(pages) - 1) + last % GROUP_SIZE + 1)
            counts.append(n)
    width = max(len(x) for x in lists)
    bt = torch.zeros(len(lists), width, dtype=torch.int32)
    for i, x in enumerate(lists):
        bt[i, : len(x)] = torch.tensor(x, dtype=torch.int32)
    counts = torch.tensor(counts, dtype=torch.int32)
    cu = torch.zeros(len(lists) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(counts, 0)
    return TileRows(
        bt,
        torch.tensor(used, dtype=torch.int32),
        cu,
        tiles,
        int(counts.max()),
        width * GROUP_SIZE,
    )


def pack_queries(q: torch.Tensor, rows: TileRows, q_start: int, num_kv_heads: int):
    """q [tokens of the step, Hq, D] -> [packed rows, rep, D] in TileRows' order."""
    T, Hq, D = q.shape
    rep = Hq // num_kv_heads
    qh = q.view(T, num_kv_heads, rep, D)
    out = []
    for p0, n in rows.tiles:
        a = p0 - q_start
        out.append(qh[a : a + n].permute(1, 0, 2, 3).reshape(num_kv_heads * n, rep, D))
    return torch.cat(out)


def unpack_output(o: torch.Tensor, rows: TileRows, q_start: int, num_kv_heads: int):
    """FA3's [packed rows, rep, D] back to [tokens of the step, Hq, D]."""
    rep, D = o.shape[1], o.shape[2]
    parts, i = [], 0
    for _, n in rows.tiles:
        blk = o[i : i + num_kv_heads * n].view(num_kv_heads, n, rep, D)
        parts.append(blk.permute(1, 0, 2, 3).reshape(n, num_kv_heads * rep, D))
        i += num_kv_heads * n
    return torch.cat(parts)


def paged_varlen_reference(q, k_pages, v_pages, rows: TileRows, scale: float) -> torch.Tensor:
    """What flash_attn_varlen_func(q, k_pages, v_pages, ..., causal=True, block_table=...,
    seqused_k=...) computes, in float32: row r's queries attend the first seqused_k[r]
    tokens of its pages, query i of n keys < seqused_k - n + i + 1."""
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    cu = rows.cu_seqlens_q.tolist()
    for r in range(len(cu) - 1):
        a, b = cu[r], cu[r + 1]
        n, used = b - a, int(rows.seqused_k[r])
        pages = rows.block_table[r, : -(-used // GROUP_SIZE)].long().to(k_pages.device)
        k = k_pages[pages].reshape(-1, k_pages.shape[-1])[:used].float()
        v = v_pages[pages].reshape(-1, v_pages.shape[-1])[:used].float()
        s = torch.einsum("ihd,kd->hik", q[a:b].float(), k) * scale
        i = torch.arange(n, device=q.device).unsqueeze(1)
        j = torch.arange(used, device=q.device).unsqueeze(0)
        s = s.masked_fill(j >= used - n + i + 1, float("-inf"))
        out[a:b] = torch.einsum("hik,kd->ihd", torch.softmax(s, -1), v)
    return out


def random_routed(
    tiles, groups: int, num_kv_heads: int, cfg: HGAConfig, seed: int
) -> list[torch.Tensor]:
    """Distinct random groups from each tile's routable chunks [F, c - L)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for p0, _ in tiles:
        c = p0 // CHUNK_SIZE
        lo, hi = cfg.sink_chunks * GROUPS, max(cfg.sink_chunks, c - cfg.local_chunks) * GROUPS
        lists = torch.full((num_kv_heads, groups), -1, dtype=torch.long)
        for h in range(num_kv_heads):
            k = min(groups, hi - lo)
            if k > 0:
                lists[h, :k] = lo + torch.randperm(hi - lo, generator=g)[:k]
        out.append(lists)
    return out


# ----------------------------------------------------------------------------- GPU bench
HQ, HKV, D = 32, 4, 128  # Qwen3-30B-A3B attention


def measure(S: int, groups: int, fa3, iters: int, check_tiles: int) -> dict:
    cfg = HGAConfig()
    nb = -(-S // CHUNK_SIZE)
    gen = torch.Generator(device="cuda").manual_seed(S + groups)
    pool = torch.randn(nb + 1, HKV, 2, CHUNK_SIZE, D, generator=gen, device="cuda")
    pool = pool.to(torch.bfloat16)
    block_row = 1 + torch.randperm(nb)  # block 0 unused: a wrong table reads it
    q = torch.randn(S, HQ, D, generator=gen, device="cuda").to(torch.bfloat16)
    scale = D**-0.5
    tiles = [(c * CHUNK_SIZE, min(CHUNK_SIZE, S - c * CHUNK_SIZE)) for c in range(nb)]
    rows = tile_rows(block_row, 0, S, random_routed(tiles, groups, HKV, cfg, S), HKV, cfg)
    k_pages, v_pages = page_views(pool)
    bt, used, cu = (x.cuda() for x in (rows.block_table, rows.seqused_k, rows.cu_seqlens_q))
    qp = pack_queries(q, rows, 0, HKV)

    def run_sparse(q_packed):
        return fa3(
            q_packed,
            k_pages,
            v_pages,
            rows.max_seqlen_q,
            cu,
            rows.max_seqlen_k,
            seqused_k=used,
            softmax_scale=scale,
            causal=True,
            block_table=bt,
            fa_version=3,
        )

    def sparse():
        return run_sparse(qp)

    def sparse_with_packing():  # the layout change a layer would pay around the call
        return unpack_output(run_sparse(pack_queries(q, rows, 0, HKV)), rows, 0, HKV)

    k_dense = pool[:, :, 0].permute(0, 2, 1, 3)  # [blocks, 64, H_kv, D], strided
    v_dense = pool[:, :, 1].permute(0, 2, 1, 3)
    bt_d = block_row.to(torch.int32).view(1, -1).cuda()
    cu_d = torch.tensor([0, S], dtype=torch.int32, device="cuda")
    used_d = torch.tensor([S], dtype=torch.int32, device="cuda")

    def dense():
        return fa3(
            q,
            k_dense,
            v_dense,
            S,
            cu_d,
            nb * CHUNK_SIZE,
            seqused_k=used_d,
            softmax_scale=scale,
            causal=True,
            block_table=bt_d,
            fa_version=3,
        )

    row = {
        "context": S,
        "groups_per_kv_head": groups,
        "rows": len(rows.seqused_k),
        "mean_keys_per_row": round(float(rows.seqused_k.float().mean()), 1),
        "density_vs_dense": round(_attended(rows) * (HQ // HKV) / (HQ * S * (S + 1) / 2), 4),
    }
    for name, fn in (
        ("sparse", sparse),
        ("sparse_with_packing", sparse_with_packing),
        ("dense", dense),
    ):
        try:
            row[f"{name}_ms"] = round(step_ms(fn, iters), 3)
        except Exception as e:  # a layout FA3 refuses: recorded, the others still run
            row[f"{name}_error"] = f"{type(e).__name__}: {e}"[:300]
    if "sparse_ms" in row and check_tiles:
        # FA3 against the torch reference on the first and last rows
        got = sparse().float()
        pick = list(range(min(check_tiles, len(rows.seqused_k))))
        pick += list(range(max(len(rows.seqused_k) - check_tiles, len(pick)), len(rows.seqused_k)))
        cu_l = rows.cu_seqlens_q.tolist()
        sub = _subset(rows, pick)
        q_sub = torch.cat([qp[cu_l[r] : cu_l[r + 1]] for r in pick])
        ref = paged_varlen_reference(q_sub, k_pages, v_pages, sub, scale)
        g_sub = torch.cat([got[cu_l[r] : cu_l[r + 1]] for r in pick])
        row["max_abs_diff_vs_reference"] = float((g_sub - ref).abs().max())
    if "sparse_ms" in row and "dense_ms" in row:
        row["sparse_vs_dense"] = round(row["sparse_ms"] / row["dense_ms"], 3)
    return row


def _attended(rows: TileRows) -> float:
    """Keys attended, summed over the rows' queries (one head): query i of n sees
    used - n + i + 1 keys."""
    n = (rows.cu_seqlens_q[1:] - rows.cu_seqlens_q[:-1]).double()
    return float((n * (rows.seqused_k.double() - n) + n * (n + 1) / 2).sum())


def _subset(rows: TileRows, pick: list[int]) -> TileRows:
    counts = rows.cu_seqlens_q[1:] - rows.cu_seqlens_q[:-1]
    c = counts[pick]
    cu = torch.zeros(len(pick) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(c, 0)
    return TileRows(
        rows.block_table[pick],
        rows.seqused_k[pick],
        cu,
        rows.tiles,
        int(c.max()),
        rows.max_seqlen_k,
    )


def main() -> None:
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--groups", type=int, nargs="+", default=[44, 88])
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--check-tiles", type=int, default=4)
    ap.add_argument("--json")
    args = ap.parse_args()
    out = []
    for S in args.contexts:
        for G in args.groups:
            row = measure(S, G, flash_attn_varlen_func, args.iters, args.check_tiles)
            out.append(row)
            print("RESULT", json.dumps(row), flush=True)
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
