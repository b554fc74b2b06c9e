"""One layer's HGA decode step with the device bank off / on (fused CUDA admission) / on
with the torch admission, plus the admission alone, on the GPU; prints a markdown table.

Qwen3-30B-A3B attention shape (32 query / 4 KV heads, D=128, bf16), pool in pinned host
memory (UVA) as in serving, package default routing.  Each step routes a different query
(four variants cycled), so the routed chunks drift as in decoding; the bank is warmed up
first.  Times are CUDA-event times per step over back-to-back eager calls (launch overhead
included).  Hit rate: bank hits / (hits + misses) over the timed steps.

    python -m benchmarks.bench_bank --contexts 8192 32768 --batches 1 16
"""

from __future__ import annotations

import argparse
import json

import torch


def step_ms(fn, iters: int) -> float:
    for i in range(3):
        fn(i)
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    a.record()
    for i in range(iters):
        fn(i)
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / iters


def main() -> None:
    from devkit.paged_batch import PagedBatch
    from vllm_hga.bank import DeviceBank
    from vllm_hga.config import HGAConfig

    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--bank-chunks", type=int, default=512)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = []
    for S in args.contexts:
        for B in args.batches:
            cfg = HGAConfig.from_mapping({})  # a CUDA engine's default
            b = PagedBatch([S] * B, 32, 4, 128, uva=True, cfg=cfg, seed=S + B)
            layer = b.layer
            qs = [b.q.roll(i, 1) for i in range(4)]  # other queries: other routed chunks
            row = {"context": S, "batch": B, "bank_chunks": args.bank_chunks}

            def decode(i, layer=layer, qs=qs, b=b):
                layer.decode(qs[i % 4], b.pool, b.summ, b.md)

            layer.bank = None
            row["no_bank_ms"] = step_ms(decode, args.iters)
            lists = [layer.decode_groups(q, b.summ, b.md)[:2] for q in qs]
            own = ((layer.sinks + layer.local) * 4, (layer.sinks + layer.local + 1) * 4)
            for name, kernels in (("fused", True), ("torch", False)):
                bank = DeviceBank(args.bank_chunks, 4, 128, b.dtype, "cuda")
                bank.kernels = kernels
                bank.bind(b.pool)
                layer.bank = bank
                for i in range(8):  # warm-up: the working set moves in
                    decode(i)
                before = bank.counters.clone()
                row[f"bank_{name}_ms"] = step_ms(decode, args.iters)
                hits, misses, _ = (bank.counters - before).tolist()
                row[f"hit_rate_{name}"] = hits / max(1, hits + misses)

                def admit(i, bank=bank, lists=lists, b=b, own=own):
                    rws, ok = lists[i % 4]
                    bank.admit(b.pool, rws, ok, own)

                row[f"admit_{name}_ms"] = step_ms(admit, args.iters)
            layer.bank = None
            rows.append(row)
            print("RESULT", json.dumps(row), flush=True)
    cols = [
        ("context", "context"),
        ("batch", "batch"),
        ("no_bank_ms", "no bank (ms)"),
        ("bank_fused_ms", "bank, fused admission (ms)"),
        ("bank_torch_ms", "bank, torch admission (ms)"),
        ("admit_fused_ms", "admission alone, fused (ms)"),
        ("admit_torch_ms", "admission alone, torch (ms)"),
        ("hit_rate_fused", "hit rate"),
    ]
    print(
        f"\nOne layer's decode step, bank of {args.bank_chunks} chunks, pool in pinned host "
        f"memory ({torch.cuda.get_device_name()})\n"
    )
    print("| " + " | ".join(c[1] for c in cols) + " |")
    print("|" + "|".join("---:" for _ in cols) + "|")
    for r in rows:
        cells = []
        for key, _ in cols:
            v = r[key]
            cells.append(
                f"{v / 1024:.0f}K"
                if key == "context"
                else f"{100 * v:.1f}%"
                if key.startswith("hit")
                else f"{v:.3f}"
                if isinstance(v, float)
                else str(v)
            )
        print("| " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
