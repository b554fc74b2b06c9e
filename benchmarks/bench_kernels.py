#!/usr/bin/env python3
"""Benchmark HGA's CUDA kernels against ceilings measured in the same run.

Shape: Qwen3-30B-A3B attention (32 query heads, 4 KV heads, head_dim 128, bf16), HGA
budgets F=2, L=8, K_c=20, G=16.  For each context and batch: routing, sparse decode
attention with the pool in device memory and in pinned host memory (UVA zero-copy), the
whole HGA step (routing + attention), the host gather of the step's groups (zero-copy
kernel vs copy engines), and dense attention at the same context (best torch SDPA
backend, and the bandwidth floor of reading all K/V once).

Timing: CUDA graph replay (falls back to eager), CUDA events, L2 flushed before every
repetition, median of --reps.  Writes JSON (--json) and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

from vllm_hga.attention import HGALayer
from vllm_hga.config import CHUNK_SIZE, GROUP_SIZE, HGAConfig
from vllm_hga.ops import cuda_ops, cuda_prefill, torch_ops
from vllm_hga.plan import HGAMetadata
from vllm_hga.rope import RopeSpec

HQ, HKV, D, DT = 32, 4, 128, torch.bfloat16
M = CHUNK_SIZE // GROUP_SIZE
GROUP_KV_BYTES = 2 * GROUP_SIZE * D * 2  # K + V of one 16-token group of one head
DEV = "cuda"

_flush = None


def timeit(fn, reps: int, graph: bool = True, warmup: int = 2) -> float:
    """Median seconds of fn over reps, each after an L2 flush."""
    global _flush
    if _flush is None:
        _flush = torch.empty(256 * 2**20, dtype=torch.uint8, device=DEV)
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    run = fn
    if graph:
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fn()
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn()
            run = g.replay
            run()
        except Exception as exc:  # noqa: BLE001 - eager timing is still valid
            print(f"  (graph capture failed: {type(exc).__name__}: {exc}; timing eagerly)")
            torch.cuda.synchronize()
            run = fn
    times = []
    for _ in range(reps):
        _flush.zero_()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e-3)
    return statistics.median(times)


def ceilings(reps: int) -> dict:
    n = 2 * 2**30
    x = torch.empty(n, dtype=torch.uint8, device=DEV)
    y = torch.empty_like(x)
    host = torch.empty(n, dtype=torch.uint8).pin_memory()
    src = cuda_ops.uva_view(host.view(-1, 4096))
    idx = torch.arange(src.shape[0], device=DEV)
    res = {
        "d2d_GBps": 2 * n / timeit(lambda: y.copy_(x), reps, graph=False) / 1e9,  # read+write
        "h2d_GBps": n / timeit(lambda: y.copy_(host, non_blocking=True), reps, graph=False) / 1e9,
        # zero-copy sequential read of pinned memory by SMs (the UVA kernels' own ceiling)
        "zero_copy_read_GBps": n
        / timeit(lambda: cuda_ops.gather_rows(src, idx, y.view(-1, 4096)), reps)
        / 1e9,
    }
    a = torch.randn(8192, 8192, device=DEV, dtype=DT)
    b = torch.randn(8192, 8192, device=DEV, dtype=DT)
    res["bf16_mm_TFLOPs"] = 2 * 8192**3 / timeit(lambda: a @ b, reps, graph=False) / 1e12
    return res


class Pools:
    """One shared pool of n_blocks (device copy and pinned host copy) and summaries.

    Long contexts alias onto it (random block ids), so reads stay random over GBs
    (far beyond L2) without holding 1M x 64 tokens of K/V.
    """

    def __init__(self, n_blocks: int):
        g = torch.Generator(device=DEV).manual_seed(0)
        shape = (n_blocks, HKV, 2, CHUNK_SIZE, D)
        self.dev = torch.randn(shape, generator=g, device=DEV, dtype=DT)
        self.host = torch.empty(shape, dtype=DT, pin_memory=True)
        self.host.copy_(self.dev)
        self.uva = cuda_ops.uva_view(self.host)
        self.summ = torch.randn(n_blocks, HKV, 1 + M, D, generator=g, device=DEV)
        self.n_blocks = n_blocks


def cuda_default_config() -> HGAConfig:
    """The config a CUDA engine runs by default (the kernels' group score)."""
    return HGAConfig.from_mapping({})


def point(
    pools: Pools,
    ctx: int,
    B: int,
    cfg: HGAConfig,
    ceil: dict,
    reps: int,
    dense_limit: float,
    torch_limit: int,
) -> dict:
    g = torch.Generator(device=DEV).manual_seed(ctx + B)
    n = -(-ctx // CHUNK_SIZE)
    bt = torch.randint(1, pools.n_blocks, (B, n), generator=g, device=DEV, dtype=torch.int32)
    pos = torch.full((B,), ctx - 1, device=DEV, dtype=torch.long)
    q = torch.randn(B, HQ, D, generator=g, device=DEV).to(DT)
    rope = RopeSpec.default(D, 1e6)
    layer = HGALayer(cfg, rope, HQ, HKV, D, D**-0.5, ctx + CHUNK_SIZE, device=DEV)
    S, Lc, G = layer.sinks, layer.local, layer.groups
    nfix = (S + Lc + 1) * M
    scale = D**-0.5
    out = torch.empty(B, HQ, D, device=DEV, dtype=DT)
    rec = {"ctx": ctx, "batch": B}

    def route():
        return cuda_ops.decode_groups(q, pos, bt, n, pools.summ, cfg, S, Lc, G)

    rows, ok, _ = route()
    rep = HQ // HKV
    vis = ok.any(-1)
    groups_read = distinct_groups(rows, vis)
    rec["groups_listed"] = int(vis[:, ::rep, :nfix].sum()) + int(vis[:, :, nfix:].sum())
    attn_bytes = groups_read * GROUP_KV_BYTES
    keys = int(ok.sum())
    n_pool = max(0, n - 1 - cfg.local_chunks - cfg.sink_chunks)
    route_bytes = B * (n_pool * HKV * D * 4 + HQ * cfg.topk_chunks * M * D * 4)
    rec.update(
        groups_read=groups_read,
        attn_MB=attn_bytes / 1e6,
        route_MB=route_bytes / 1e6,
        attn_GFLOP=4 * D * keys / 1e9,
    )

    rec["route_us"] = timeit(route, reps) * 1e6
    for where, pool in (("dev", pools.dev), ("uva", pools.uva)):
        for kernel in ("heads", "shared", "split"):  # "auto": heads on dev, shared on uva
            t = timeit(
                lambda p=pool, k=kernel: cuda_ops.attend_groups(
                    q, p, rows, ok, scale, nfix, out, k
                ),
                reps,
            )
            rec[f"attn_{where}_{kernel}_us"] = t * 1e6
        t = rec[f"attn_{where}_{'heads' if where == 'dev' else 'shared'}_us"] * 1e-6  # auto
        rec[f"attn_{where}_us"] = t * 1e6
        rec[f"attn_{where}_GBps"] = attn_bytes / t / 1e9
        rec[f"step_{where}_us"] = (
            timeit(
                lambda p=pool: cuda_ops.decode(
                    q, pos, bt, n, p, pools.summ, cfg, S, Lc, G, scale, out
                ),
                reps,
            )
            * 1e6
        )
    rec["attn_dev_frac_hbm"] = rec["attn_dev_GBps"] / ceil["d2d_GBps"]
    rec["attn_uva_frac_h2d"] = rec["attn_uva_GBps"] / ceil["h2d_GBps"]
    rec["route_frac_step_dev"] = rec["route_us"] / rec["step_dev_us"]
    rec["route_frac_step_uva"] = rec["route_us"] / rec["step_uva_us"]

    # host gather of the step's groups (K and V rows) into a device buffer
    kv_rows = pools.uva.view(-1, GROUP_SIZE, D)
    shared = rows[:, ::rep, :nfix][vis[:, ::rep, :nfix]]  # once per KV head
    routed = rows[:, :, nfix:][vis[:, :, nfix:]]
    k_rows = torch.cat([shared, routed])
    sel = torch.cat([k_rows, k_rows + M])  # K rows, then their V rows
    buf = torch.empty(sel.numel(), GROUP_SIZE, D, device=DEV, dtype=DT)
    gbytes = buf.numel() * 2
    t = timeit(lambda: cuda_ops.gather_rows(kv_rows, sel, buf), reps)
    rec["gather_zc_us"], rec["gather_zc_frac_h2d"] = t * 1e6, gbytes / t / 1e9 / ceil["h2d_GBps"]
    if B <= 4:  # 4 KiB copies are slow on the copy engines; the size sweep shows the rest
        sel_cpu = sel.cpu()
        t = timeit(lambda: cuda_ops.gather_rows_ce(kv_rows, sel_cpu, buf), reps, graph=False)
        rec["gather_ce_us"] = t * 1e6
        rec["gather_ce_frac_h2d"] = gbytes / t / 1e9 / ceil["h2d_GBps"]
    rec["gather_MB"] = gbytes / 1e6

    # dense attention at the same context
    dense_bytes = 2 * B * HKV * ctx * D * 2
    rec["dense_floor_us"] = dense_bytes / (ceil["d2d_GBps"] * 1e9 / 2) * 1e6  # read once
    if dense_bytes <= dense_limit:
        kv = torch.empty(2, B, HKV, ctx, D, device=DEV, dtype=DT).normal_(generator=g)
        qd = q.view(B, HKV, rep, D)  # GQA decode = rep queries per KV head, no causal mask
        best = math.inf
        for name, backend in _sdpa_backends():
            try:
                with torch.nn.attention.sdpa_kernel([backend]):
                    t = timeit(
                        lambda: torch.nn.functional.scaled_dot_product_attention(
                            qd, kv[0], kv[1], scale=scale
                        ),
                        reps,
                        graph=False,
                    )
                rec[f"dense_{name}_us"] = t * 1e6
                best = min(best, t)
            except RuntimeError:
                pass
        del kv
        rec["dense_sdpa_us"] = best * 1e6 if best < math.inf else None
    if rec.get("dense_sdpa_us"):
        rec["speedup_step_dev_vs_sdpa"] = rec["dense_sdpa_us"] / rec["step_dev_us"]
        rec["speedup_step_uva_vs_sdpa"] = rec["dense_sdpa_us"] / rec["step_uva_us"]
    rec["speedup_step_dev_vs_floor"] = rec["dense_floor_us"] / rec["step_dev_us"]
    rec["speedup_step_uva_vs_floor"] = rec["dense_floor_us"] / rec["step_uva_us"]

    # the torch ops path this replaces (where its [R, n, H, 5, D] page gather fits)
    if B * ctx <= torch_limit:
        md = HGAMetadata.plan(
            list(range(B + 1)), [ctx] * B, bt, torch.full((B,), -1, device=DEV), B
        )  # positions ctx - 1
        t = timeit(
            lambda: torch_ops.attend_groups(
                q, pools.dev, *layer.decode_groups(q, pools.summ, md)[:2], scale
            ),
            max(3, reps // 4),
            graph=False,
        )
        rec["torch_step_dev_us"] = t * 1e6
    torch.cuda.empty_cache()
    return rec


def distinct_groups(rows: torch.Tensor, vis: torch.Tensor) -> int:
    """Groups a step must read: distinct (request, pool row) pairs among visible columns.

    A pool row names one KV head's group, so query heads of one KV head that route to the
    same group share it (the L2 serves the repeats); counting per query head would credit
    the kernel with bytes it never moved from memory.
    """
    req = torch.arange(rows.shape[0], device=rows.device).view(-1, 1, 1).expand_as(rows)
    key = (req * (rows.max() + 1) + rows)[vis]
    return int(torch.unique(key).numel())


def profile_step(pools: Pools, ctx: int, B: int, cfg: HGAConfig) -> str:
    """Per-kernel CUDA times of one HGA decode step (device pool), by torch.profiler."""
    g = torch.Generator(device=DEV).manual_seed(1)
    n = -(-ctx // CHUNK_SIZE)
    bt = torch.randint(1, pools.n_blocks, (B, n), generator=g, device=DEV, dtype=torch.int32)
    pos = torch.full((B,), ctx - 1, device=DEV, dtype=torch.long)
    q = torch.randn(B, HQ, D, generator=g, device=DEV).to(DT)
    layer = HGALayer(cfg, RopeSpec.default(D, 1e6), HQ, HKV, D, D**-0.5, ctx + 64, device=DEV)
    out = torch.empty(B, HQ, D, device=DEV, dtype=DT)

    def step(pool):
        cuda_ops.decode(
            q,
            pos,
            bt,
            n,
            pool,
            pools.summ,
            cfg,
            layer.sinks,
            layer.local,
            layer.groups,
            D**-0.5,
            out,
        )

    for _ in range(3):
        step(pools.dev)
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            step(pools.dev)
            step(pools.uva)
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=12)


def _sdpa_backends():
    from torch.nn.attention import SDPBackend

    return [
        ("flash", SDPBackend.FLASH_ATTENTION),
        ("cudnn", SDPBackend.CUDNN_ATTENTION),
        ("efficient", SDPBackend.EFFICIENT_ATTENTION),
    ]


def small_kernels(pools: Pools, reps: int, ceil: dict) -> list[dict]:
    """summarize_pool and write_kv on device and UVA pools."""
    cfg = cuda_default_config()
    rot = torch_ops.SummaryRotation(RopeSpec.default(D, 1e6), cfg, DEV)
    res = []
    for nblk in (64, 1024):
        blocks = torch.randperm(pools.n_blocks - 1, device=DEV)[:nblk] + 1
        summ = torch.empty(pools.n_blocks, HKV, 1 + M, D, device=DEV)
        nbytes = nblk * HKV * (CHUNK_SIZE * D * 2 + (1 + M) * D * 4)
        for where, pool in (("dev", pools.dev), ("uva", pools.uva)):
            t = timeit(lambda p=pool, b=blocks, s=summ: cuda_ops.summarize_pool(p, b, s, rot), reps)
            ceiling = ceil["d2d_GBps"] if where == "dev" else ceil["h2d_GBps"]
            res.append(
                {
                    "kernel": "summarize_pool",
                    "where": where,
                    "n": nblk,
                    "us": t * 1e6,
                    "MB": nbytes / 1e6,
                    "frac_ceiling": nbytes / t / 1e9 / ceiling,
                }
            )
    # host -> device gather by copy size: 256 MiB of random units from the pinned pool
    flat = pools.host.view(-1)
    src_all = cuda_ops.uva_view(pools.host).view(-1)
    for unit in (4096, 32768, 131072, 1048576):
        elems = unit // 2
        n_units = flat.numel() // elems
        idx = torch.randperm(n_units)[: (256 * 2**20) // unit]
        dst = torch.empty(idx.numel(), elems, device=DEV, dtype=DT)
        src = src_all[: n_units * elems].view(n_units, elems)
        idx_dev = idx.to(DEV)
        for how in ("zero_copy", "copy_engine"):
            if how == "zero_copy":
                t = timeit(lambda s_=src, i=idx_dev, d=dst: cuda_ops.gather_rows(s_, i, d), reps)
            else:
                t = timeit(
                    lambda s_=src, i=idx, d=dst: cuda_ops.gather_rows_ce(s_, i, d),
                    reps,
                    graph=False,
                )
            res.append(
                {
                    "kernel": f"gather_{how}",
                    "where": "uva",
                    "n": unit,
                    "us": t * 1e6,
                    "MB": dst.numel() * 2 / 1e6,
                    "frac_ceiling": dst.numel() * 2 / t / 1e9 / ceil["h2d_GBps"],
                }
            )
        del dst
    for T in (64, 8192):
        key = torch.randn(T, HKV, D, device=DEV).to(DT)
        slots = torch.randperm(pools.n_blocks * CHUNK_SIZE, device=DEV)[:T]
        nbytes = 2 * 2 * T * HKV * D * 2
        for where, pool in (("dev", pools.dev), ("uva", pools.uva)):
            t = timeit(lambda p=pool, k=key, s=slots: cuda_ops.write_kv(p, k, k, s), reps)
            res.append(
                {
                    "kernel": "write_kv",
                    "where": where,
                    "n": T,
                    "us": t * 1e6,
                    "MB": nbytes / 1e6,
                    "frac_ceiling": None,
                }
            )
    return res


def prefill_point(ctx: int, cfg: HGAConfig, reps: int, impls=("rows", "tc")) -> dict:
    """One layer's HGA prefill of a ctx-token prompt (one request, q_start 0): gather into
    the scratch + routing + attention, per attention implementation, with the pool in
    device memory and in pinned host memory; dense causal SDPA of the same length."""
    g = torch.Generator(device=DEV).manual_seed(ctx)
    n = -(-ctx // CHUNK_SIZE)
    nb = n + 1
    shape = (nb, HKV, 2, CHUNK_SIZE, D)
    pool_dev = torch.randn(shape, generator=g, device=DEV, dtype=DT)
    host = torch.empty(shape, dtype=DT, pin_memory=True)
    host.copy_(pool_dev)
    pool_uva = cuda_ops.uva_view(host)
    block_row = (1 + torch.randperm(nb - 1, device=DEV, generator=g)).to(torch.int32)
    rope = RopeSpec.default(D, 1e6)
    rot = torch_ops.SummaryRotation(rope, cfg, DEV)
    summ = torch.zeros(nb, HKV, 1 + M, D, device=DEV)
    cuda_ops.summarize_pool(pool_dev, block_row[: ctx // CHUNK_SIZE].long(), summ, rot)
    q = torch.randn(ctx, HQ, D, generator=g, device=DEV).to(DT)
    out = torch.empty_like(q)
    layer = HGALayer(cfg, rope, HQ, HKV, D, D**-0.5, ctx + CHUNK_SIZE, device=DEV)
    scale = D**-0.5
    rec = {"ctx": ctx, "tc_built": cuda_prefill.tc_available()}

    def note(key, value):  # progress, in case a later measurement kills the process
        rec[key] = value
        print(f"  prefill ctx {ctx}: {key} = {value}", flush=True)

    sc = layer.tiers.prefill_scratch(layer.max_chunks, HKV, D, DT, q.device)

    def run(pool, impl):
        cuda_prefill.prefill(
            q,
            0,
            pool,
            summ,
            block_row,
            cfg,
            layer.sinks,
            layer.local,
            layer.groups,
            scale,
            out,
            sc,
            impl=impl,
        )

    rec["scratch_MB"] = sc.nbytes() / 1e6
    for where, pool in (("dev", pool_dev), ("uva", pool_uva)):
        note(
            f"gather_{where}_ms",
            timeit(
                lambda p=pool: cuda_prefill.gather_request(p, summ, block_row, sc),
                reps,
                graph=False,
            )
            * 1e3,
        )
    keys = torch.zeros((), dtype=torch.float64, device=DEV)

    def route(count=False):
        for a, b in cuda_prefill.slices(0, ctx, cuda_prefill.MAX_ROWS, True):
            pos = torch.arange(a, b, device=DEV)
            nc = (b - 1) // CHUNK_SIZE + 1
            _, ok, _ = cuda_ops.decode_groups(
                q[a:b],
                pos,
                sc.ident[:, :nc].expand(b - a, nc),
                nc,
                sc.summ,
                cfg,
                layer.sinks,
                layer.local,
                layer.groups,
            )
            if count:
                keys.add_(ok.sum())

    route(count=True)
    rec["density"] = float(keys) / (HQ * ctx * (ctx + 1) / 2)
    rec["hga_GFLOP"] = 4 * D * float(keys) / 1e9
    note("route_ms", timeit(route, reps, graph=False) * 1e3)
    results = {}
    for impl in impls:
        for where, pool in (("dev", pool_dev), ("uva", pool_uva)):
            note(
                f"{impl}_{where}_ms",
                timeit(lambda p=pool, i=impl: run(p, i), reps, graph=False) * 1e3,
            )
        run(pool_dev, impl)
        results[impl] = out.float()
        note(f"{impl}_nan", bool(torch.isnan(out).any()))
    if len(results) == 2:  # both implementations attend the same lists: they must agree
        a, b = results.values()
        note("tc_vs_rows_rel", float((b - a).norm() / a.norm()))
    del results
    # dense causal attention of the same length (GQA: 32 query heads over 4 KV heads)
    rec["dense_GFLOP"] = 4 * D * HQ * ctx * (ctx + 1) / 2 / 1e9
    qd = q.transpose(0, 1).unsqueeze(0)  # [1, Hq, T, D]
    kd = torch.randn(1, HKV, ctx, D, generator=g, device=DEV).to(DT)
    vd = torch.randn(1, HKV, ctx, D, generator=g, device=DEV).to(DT)
    best = math.inf
    for name, backend in _sdpa_backends():
        for gqa in (True, False):
            try:
                k_, v_ = (
                    (kd, vd)
                    if gqa
                    else (kd.repeat_interleave(HQ // HKV, 1), vd.repeat_interleave(HQ // HKV, 1))
                )
                with torch.nn.attention.sdpa_kernel([backend]):
                    t = timeit(
                        lambda k_=k_, v_=v_, gqa=gqa: (
                            torch.nn.functional.scaled_dot_product_attention(
                                qd, k_, v_, is_causal=True, scale=scale, enable_gqa=gqa
                            )
                        ),
                        reps,
                        graph=False,
                    )
                note(f"dense_{name}{'' if gqa else '_expanded'}_ms", t * 1e3)
                best = min(best, t)
                break
            except RuntimeError:
                continue
    rec["dense_ms"] = best * 1e3 if best < math.inf else None
    if rec["dense_ms"]:
        for k in ("rows_dev", "rows_uva", "tc_dev", "tc_uva"):
            if f"{k}_ms" in rec:
                rec[f"speedup_{k}_vs_dense"] = rec["dense_ms"] / rec[f"{k}_ms"]
        rec["dense_TFLOPs"] = rec["dense_GFLOP"] / rec["dense_ms"]
    del pool_dev, host, pool_uva, kd, vd
    torch.cuda.empty_cache()
    return rec


def print_prefill(points: list[dict]) -> None:
    print("\n## Prefill attention, one layer, one request (gather + routing + attention)\n")
    cols = [
        ("ctx", "ctx", 0),
        ("density", "density", 4),
        ("gather dev ms", "gather_dev_ms", 2),
        ("gather uva ms", "gather_uva_ms", 2),
        ("route ms", "route_ms", 2),
        ("rows dev ms", "rows_dev_ms", 2),
        ("rows uva ms", "rows_uva_ms", 2),
        ("tc dev ms", "tc_dev_ms", 2),
        ("tc uva ms", "tc_uva_ms", 2),
        ("dense SDPA ms", "dense_ms", 2),
        ("dense TFLOP/s", "dense_TFLOPs", 0),
        ("x tc dev vs dense", "speedup_tc_dev_vs_dense", 2),
        ("x tc uva vs dense", "speedup_tc_uva_vs_dense", 2),
        ("x rows dev vs dense", "speedup_rows_dev_vs_dense", 2),
        ("tc vs rows rel", "tc_vs_rows_rel", 5),
    ]
    print_table(cols, points)


def print_table(cols, rows) -> None:
    """A markdown table: cols = (header, key, decimals), one line per row dict."""
    print("| " + " | ".join(h for h, _, _ in cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(fmt(r.get(k), nd) for _, k, nd in cols) + " |")


def fmt(v, nd=1):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def print_tables(result: dict) -> None:
    c = result["ceilings"]
    print("\n## Ceilings (same run)\n")
    print(
        f"D2D copy {c['d2d_GBps']:.0f} GB/s (read+write) | pinned H2D {c['h2d_GBps']:.1f} GB/s | "
        f"zero-copy read {c['zero_copy_read_GBps']:.1f} GB/s | bf16 matmul "
        f"{c['bf16_mm_TFLOPs']:.0f} TFLOP/s"
    )
    print("\n## Decode attention step (per layer)\n")
    cols = [
        ("ctx", "ctx", 0),
        ("B", "batch", 0),
        ("route us", "route_us", 1),
        ("attn dev us", "attn_dev_us", 1),
        ("heads/shared/split us", "attn_dev_kernels", 0),
        ("attn dev %HBM", "attn_dev_frac_hbm", 2),
        ("step dev us", "step_dev_us", 1),
        ("attn uva us", "attn_uva_us", 1),
        ("attn uva %H2D", "attn_uva_frac_h2d", 2),
        ("step uva us", "step_uva_us", 1),
        ("route/step dev", "route_frac_step_dev", 2),
        ("route/step uva", "route_frac_step_uva", 3),
        ("dense SDPA us", "dense_sdpa_us", 1),
        ("dense floor us", "dense_floor_us", 1),
        ("x dev vs SDPA", "speedup_step_dev_vs_sdpa", 1),
        ("x dev vs floor", "speedup_step_dev_vs_floor", 1),
        ("x uva vs SDPA", "speedup_step_uva_vs_sdpa", 2),
        ("torch step us", "torch_step_dev_us", 0),
    ]
    for r in result["points"]:
        r["attn_dev_kernels"] = "/".join(
            f"{r[f'attn_dev_{k}_us']:.0f}" for k in ("heads", "shared", "split")
        )
    print_table(cols, result["points"])
    print("\n## Host gather of the step's groups (K and V rows, 4 KiB each)\n")
    print("| ctx | B | MB | zero-copy us | zero-copy %H2D | copy-engine us | copy-engine %H2D |")
    print("|---|---|---|---|---|---|---|")
    for r in result["points"]:
        print(
            f"| {r['ctx']} | {r['batch']} | {r['gather_MB']:.1f} | {r['gather_zc_us']:.0f} | "
            f"{r['gather_zc_frac_h2d']:.2f} | {fmt(r.get('gather_ce_us'), 0)} | "
            f"{fmt(r.get('gather_ce_frac_h2d'), 2)} |"
        )
    print("\n## Summaries, KV write, host gather by copy size\n")
    print("| kernel | pool | n | us | MB | fraction of ceiling |")
    print("|---|---|---|---|---|---|")
    for r in result["small"]:
        print(
            f"| {r['kernel']} | {r['where']} | {r['n']} | {r['us']:.1f} | {r['MB']:.2f} | "
            f"{fmt(r['frac_ceiling'], 2)} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", default="8192,32768,131072,524288,1048576")
    ap.add_argument("--batches", default="1,4,16,64")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--pool-blocks", type=int, default=65536, help="shared pool size (blocks)")
    ap.add_argument("--dense-limit-gb", type=float, default=40.0)
    ap.add_argument("--torch-limit", type=int, default=16 * 131072, help="max batch*ctx")
    ap.add_argument("--json", default=None)
    ap.add_argument(
        "--prefill-contexts",
        default="8192,32768,131072",
        help="prefill section contexts ('' to skip)",
    )
    ap.add_argument("--prefill-reps", type=int, default=5)
    ap.add_argument("--prefill-only", action="store_true", help="skip the decode sections")
    ap.add_argument("--prefill-impls", default="rows,tc")
    args = ap.parse_args()
    assert cuda_ops.available(), f"vllm_hga._C missing: {cuda_ops.IMPORT_ERROR}"
    torch.backends.cuda.matmul.allow_tf32 = False
    t0 = time.time()
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "shape": {"Hq": HQ, "Hkv": HKV, "D": D, "dtype": str(DT)},
        "cfg": cuda_default_config().as_dict(),
    }
    result["ceilings"] = ceil = ceilings(args.reps)
    print(json.dumps(ceil), flush=True)
    result["prefill"] = []
    for ctx in [int(x) for x in args.prefill_contexts.split(",") if x]:
        rec = prefill_point(
            ctx, cuda_default_config(), args.prefill_reps, tuple(args.prefill_impls.split(","))
        )
        result["prefill"].append(rec)
        print(
            json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rec.items()}),
            flush=True,
        )
    if args.prefill_only:
        result["seconds"] = time.time() - t0
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
        print_prefill(result["prefill"])
        return
    pools = Pools(args.pool_blocks)
    cfg = cuda_default_config()
    result["points"] = []
    for ctx in [int(x) for x in args.contexts.split(",")]:
        for B in [int(x) for x in args.batches.split(",")]:
            rec = point(
                pools, ctx, B, cfg, ceil, args.reps, args.dense_limit_gb * 1e9, args.torch_limit
            )
            result["points"].append(rec)
            print(
                json.dumps(
                    {k: (round(v, 3) if isinstance(v, float) else v) for k, v in rec.items()}
                ),
                flush=True,
            )
    for ctx, B in ((131072, 16), (8192, 1)):
        print(f"\n## Profile: HGA step at ctx {ctx}, batch {B} (10 steps dev + 10 uva)\n")
        print(profile_step(pools, ctx, B, cfg), flush=True)
    result["small"] = small_kernels(pools, args.reps, ceil)
    result["seconds"] = time.time() - t0
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    print_tables(result)
    print_prefill(result["prefill"])


if __name__ == "__main__":
    main()
