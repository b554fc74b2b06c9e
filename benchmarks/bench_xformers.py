#!/usr/bin/env python3
"""xformers' fused attention for HGA's exact-attention stage (issue 5), same run as ours.

HGA's decode attention reads, per request and query head, a list of 16-token groups that
lie anywhere in the pool.  xformers can read such a layout with its paged masks: every
(request, query head) becomes one lane with one query, the pool viewed as pages of 16
tokens, and the lane's group list as its block table (K and V are two views of the same
storage, V shifted by the 4 K rows of a block's head).  A second variant gathers the
groups into a contiguous buffer first (our zero-copy gather kernel) and runs xformers'
padded-keys mask over it.

Both run on the same group lists as `cuda_ops.attend_groups` (the default kernel), with
whole groups (valid columns moved to the front of each lane, so `kv_seqlen` is exact),
and the outputs are compared.  Every xformers operator that accepts the inputs is timed;
the ones that refuse say why.  Timing and pools as benchmarks.bench_kernels.

Needs an xformers wheel for the machine's torch (0.0.35 needs torch >= 2.10), e.g.
    pip install --no-deps --target /tmp/xf xformers-0.0.35-*.whl; PYTHONPATH=/tmp/xf:.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from benchmarks.bench_kernels import (
    DEV,
    DT,
    HKV,
    HQ,
    D,
    M,
    Pools,
    ceilings,
    fmt,
    print_table,
    timeit,
)
from vllm_hga.attention import HGALayer
from vllm_hga.config import CHUNK_SIZE, GROUP_SIZE, HGAConfig
from vllm_hga.ops import cuda_ops
from vllm_hga.rope import RopeSpec


def xformers_ops():
    """(name, operator class) of every xformers forward op worth trying here."""
    from xformers.ops import fmha

    class SplitK16(fmha.triton_splitk.FwOp):  # key block = one 16-token page
        BLOCK_N = 16
        NAME = "triton_splitK_page16"

    ops = [("triton_splitk", fmha.triton_splitk.FwOp), ("triton_splitk_n16", SplitK16)]
    for mod in ("flash3", "flash", "cutlass"):
        if hasattr(fmha, mod):
            ops.append((mod, getattr(fmha, mod).FwOp))
    return ops


NO_CPP = "xFormers wasn't build with CUDA support"  # its reason when _C.so did not load


def xf_attention(fmha, Inputs, op, direct: bool, q, k, v, bias, scale):
    """xformers' forward with operator `op`.  direct: call the operator itself, past the
    dispatcher's check that xformers' C++/CUDA library loaded.  The wheel's _C.so is built
    against CUDA 12 torch and does not load beside CUDA 13 torch; the Triton operators
    never use it."""
    if not direct:
        return fmha.memory_efficient_attention_forward(q, k, v, bias, scale=scale, op=op)
    inp = Inputs(query=q, key=k, value=v, attn_bias=bias, scale=scale)
    inp.validate_inputs()
    shape = inp.normalize_bmhk()
    return op.apply(inp, needs_gradient=False)[0].reshape(shape)


def lane_lists(rows: torch.Tensor, ok: torch.Tensor):
    """Per (request, head) lane: group rows with valid columns first, and their count."""
    col_ok = ok.any(-1).flatten(0, 1)  # [lanes, Gt]
    order = torch.sort((~col_ok).to(torch.int8), dim=1, stable=True).indices
    lane_rows = rows.flatten(0, 1).gather(1, order)
    n_valid = col_ok.sum(1)
    return lane_rows, n_valid, col_ok.gather(1, order)


def run_point(pools: Pools, ctx: int, B: int, cfg: HGAConfig, reps: int, ops) -> dict:
    from xformers.ops import fmha
    from xformers.ops.fmha import attn_bias as xb
    from xformers.ops.fmha.common import Inputs

    g = torch.Generator(device=DEV).manual_seed(ctx + B)
    n = -(-ctx // CHUNK_SIZE)
    bt = torch.randint(1, pools.n_blocks, (B, n), generator=g, device=DEV, dtype=torch.int32)
    pos = torch.full((B,), ctx - 1, device=DEV, dtype=torch.long)
    q = torch.randn(B, HQ, D, generator=g, device=DEV).to(DT)
    layer = HGALayer(
        cfg, RopeSpec.default(D, 1e6), HQ, HKV, D, D**-0.5, ctx + CHUNK_SIZE, device=DEV
    )
    rows, ok, _ = cuda_ops.decode_groups(
        q, pos, bt, n, pools.summ, cfg, layer.sinks, layer.local, layer.groups
    )
    lane_rows, n_valid, lane_ok = lane_lists(rows, ok)
    lanes, Gt = lane_rows.shape
    full_ok = lane_ok.unsqueeze(-1).expand(-1, -1, GROUP_SIZE).reshape(B, HQ, Gt, GROUP_SIZE)
    rows_b = lane_rows.view(B, HQ, Gt)
    scale = D**-0.5
    keys = int(n_valid.sum()) * GROUP_SIZE
    rec = {
        "ctx": ctx,
        "batch": B,
        "lanes": lanes,
        "groups_per_lane": Gt,
        "MB": keys * D * 2 * 2 / 1e6,
    }
    kv_lens = n_valid.mul(GROUP_SIZE).tolist()
    qx = q.reshape(1, lanes, 1, 1, D)

    for where, pool in (("dev", pools.dev), ("uva", pools.uva)):
        ours = torch.empty(B, HQ, D, device=DEV, dtype=DT)
        rec[f"ours_{where}_us"] = (
            timeit(
                lambda p=pool, o=ours: cuda_ops.attend_groups(
                    q, p, rows_b, full_ok, scale, 0, o, "heads"
                ),
                reps,
            )
            * 1e6
        )
        ref = ours.float().clone()
        flat = pool.view(-1)  # [nb * Hkv * 2 * M * 16 * D]; row r = 16 tokens
        n_tok = flat.numel() // D - M * GROUP_SIZE  # K rows and V rows both stay in range
        kx = flat[: n_tok * D].view(1, n_tok, 1, 1, D)
        vx = flat[M * GROUP_SIZE * D : M * GROUP_SIZE * D + n_tok * D].view(1, n_tok, 1, 1, D)
        paged = xb.PagedBlockDiagonalPaddedKeysMask.from_seqlens(
            [1] * lanes, kv_lens, lane_rows.to(torch.int32), GROUP_SIZE, device=DEV
        )
        # gathered: lane i's groups contiguous at [i * Gt * 16, ...)
        sel = torch.cat([lane_rows.flatten(), lane_rows.flatten() + M])
        kv_rows = pool.view(-1, GROUP_SIZE, D)
        buf = torch.empty(sel.numel(), GROUP_SIZE, D, device=DEV, dtype=DT)
        half = lanes * Gt * GROUP_SIZE
        kg, vg = (
            buf.view(-1, D)[:half].view(1, half, 1, 1, D),
            buf.view(-1, D)[half:].view(1, half, 1, 1, D),
        )
        padded = xb.BlockDiagonalPaddedKeysMask.from_seqlens(
            [1] * lanes, Gt * GROUP_SIZE, kv_lens, device=DEV
        )
        rec[f"gather_{where}_us"] = (
            timeit(lambda r=kv_rows, s=sel, b=buf: cuda_ops.gather_rows(r, s, b), reps) * 1e6
        )
        for name, op in ops:
            for variant, (k_, v_, bias) in (
                ("paged", (kx, vx, paged)),
                ("gathered", (kg, vg, padded)),
            ):
                key = f"xf_{variant}_{name}_{where}"
                reasons = op.not_supported_reasons(
                    Inputs(query=qx, key=k_, value=v_, attn_bias=bias, scale=scale)
                )
                direct = reasons == [NO_CPP] and name.startswith("triton")
                if reasons and not direct:
                    rec[key + "_error"] = "; ".join(reasons)
                    continue
                try:
                    if variant == "gathered":
                        cuda_ops.gather_rows(kv_rows, sel, buf)
                    out = xf_attention(fmha, Inputs, op, direct, qx, k_, v_, bias, scale)
                    err = ((out.reshape(B, HQ, D).float() - ref).norm() / ref.norm()).item()
                    t = timeit(
                        lambda k_=k_, v_=v_, b_=bias, o_=op, d_=direct: xf_attention(
                            fmha, Inputs, o_, d_, qx, k_, v_, b_, scale
                        ),
                        reps,
                    )
                    rec[key + "_us"], rec[key + "_rel_err"] = t * 1e6, err
                    if direct:
                        rec[key + "_note"] = NO_CPP + ": Triton op called directly"
                except Exception as exc:  # noqa: BLE001 - an op refusing is a result
                    rec[key + "_error"] = f"{type(exc).__name__}: {str(exc)[:2000]}"
        for name, _ in ops:  # total time of the gathered variant: gather + attention
            t = rec.get(f"xf_gathered_{name}_{where}_us")
            if t is not None:
                rec[f"xf_gathered_{name}_{where}_total_us"] = t + rec[f"gather_{where}_us"]
    return rec


def best(rec: dict, where: str) -> tuple[str, float | None]:
    cands = {
        k[3:].rsplit(f"_{where}", 1)[0]: v
        for k, v in rec.items()
        if k.startswith("xf_")
        and (k.endswith(f"_{where}_us") and "gathered" not in k or k.endswith(f"_{where}_total_us"))
    }
    if not cands:
        return "-", None
    name = min(cands, key=cands.get)
    return name, cands[name]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", default="8192,32768,131072")
    ap.add_argument("--batches", default="1,4,16,64")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--pool-blocks", type=int, default=65536)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import xformers

    assert cuda_ops.available(), f"vllm_hga._C missing: {cuda_ops.IMPORT_ERROR}"
    ops = xformers_ops()
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "xformers": xformers.__version__,
        "cfg": HGAConfig.from_mapping({}).as_dict(),
        "ceilings": ceilings(args.reps),
        "points": [],
    }
    pools = Pools(args.pool_blocks)
    for ctx in [int(x) for x in args.contexts.split(",")]:
        for B in [int(x) for x in args.batches.split(",")]:
            rec = run_point(pools, ctx, B, HGAConfig.from_mapping({}), args.reps, ops)
            for where in ("dev", "uva"):
                rec[f"best_xf_{where}"], rec[f"best_xf_{where}_us"] = best(rec, where)
                if rec[f"best_xf_{where}_us"]:
                    rec[f"ours_vs_xf_{where}"] = (
                        rec[f"best_xf_{where}_us"] / rec[f"ours_{where}_us"]
                    )
            result["points"].append(rec)
            print(
                json.dumps(
                    {k: (round(v, 4) if isinstance(v, float) else v) for k, v in rec.items()}
                ),
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"\nxformers {result['xformers']}, {result['device']}, torch {result['torch']}\n")
    cols = [
        ("ctx", "ctx", 0),
        ("B", "batch", 0),
        ("MB", "MB", 1),
        ("ours dev us", "ours_dev_us", 1),
        ("best xformers dev", "best_xf_dev", 0),
        ("its us", "best_xf_dev_us", 1),
        ("xf/ours dev", "ours_vs_xf_dev", 2),
        ("ours uva us", "ours_uva_us", 1),
        ("best xformers uva", "best_xf_uva", 0),
        ("its us", "best_xf_uva_us", 1),
        ("xf/ours uva", "ours_vs_xf_uva", 2),
    ]
    print_table(cols, result["points"])
    errors = {k: v for r in result["points"][:1] for k, v in r.items() if k.endswith("_error")}
    print("\nOperators that refused (first point):")
    for k, v in errors.items():
        print(f"- {k}: {v}")
    errs = [v for r in result["points"] for k, v in r.items() if k.endswith("_rel_err")]
    print(f"\nmax relative difference xformers vs ours: {fmt(max(errs, default=None), 5)}")


if __name__ == "__main__":
    main()
