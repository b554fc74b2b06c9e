"""Time one layer's HGA decode step on the GPU, for several configurations in the same run:

* routing + bank + attention (HGALayer.decode), device bank off and on;
* the full decode step of HGALayer.forward (write_kv + summaries + routing + attention),
  eager as the engine runs it (variable layout), eager in the fixed layout, and replayed
  from a CUDA graph of the fixed layout (what vLLM's full decode graphs run; plan.py);
* the default step with sketch routing on CUDA cores instead of tensor cores;
* dense SDPA at the same context.

Qwen3-30B-A3B attention shape (32 query / 4 KV heads, D=128, bf16), pool in pinned host
memory (UVA) as in serving.  CUDA-event time per step after warm-up (wall time per step
for the eager rows includes their launch overhead), then a torch.profiler table of the
slowest configuration's kernels and CPU ops.

    python -m benchmarks.profile_decode --contexts 8192 32768 --batch 1 --json out.json
"""

from __future__ import annotations

import argparse
import json

import torch

CONFIGS = {
    "paper": dict(
        sink_chunks=2,
        local_chunks=8,
        topk_chunks=20,
        topk_groups=32,
        chunk_score="summary",
        group_score="mean",
    ),
    "default": {"bank_chunks": 0},  # the bank (on by default on CUDA) is timed separately
}


def step_ms(fn, iters: int = 20) -> float:
    for _ in range(3):
        fn()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    a.record()
    for _ in range(iters):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / iters


def forward_steps(cfg, S: int, batch: int, max_model_len: int) -> dict:
    """{mode: fn} running one layer's whole decode step (HGALayer.forward) for `batch`
    rows whose query sits at position S (no chunk closes: the common step): "eager" with
    the variable plan, "eager_fixed" with the fixed plan, "graph" replaying a CUDA graph
    of the fixed plan.  The block table is max_model_len wide, as vLLM's."""
    from devkit.paged_batch import PagedBatch
    from vllm_hga.attention import HGALayer
    from vllm_hga.plan import DecodeBuffers, HGAMetadata

    b = PagedBatch([S + 1] * batch, 32, 4, 128, uva=True, cfg=cfg, seed=S)
    W = -(-max_model_len // 64)
    bt = torch.zeros(batch, max(W, b.bt.shape[1]), dtype=torch.int32, device="cuda")
    bt[:, : b.bt.shape[1]] = b.bt
    layer = HGALayer(cfg, b.layer.rope, 32, 4, 128, 128**-0.5, max_model_len, device="cuda")
    if cfg.bank_size("cuda") > 0:  # the same query every step: the bank hits after step one
        from vllm_hga.bank import DeviceBank

        layer.bank = DeviceBank(cfg.bank_size("cuda"), 4, 128, b.dtype, "cuda")
    slots = bt[:, S // 64].long() * 64 + S % 64  # the query's own token: rewritten each step
    k = torch.randn(batch, 4, 128, device="cuda").to(b.dtype)
    v = torch.randn_like(k)
    out = torch.empty(batch, 32, 128, device="cuda", dtype=b.dtype)
    qsl, seq = list(range(batch + 1)), [S + 1] * batch
    seq_dev = torch.tensor(seq, dtype=torch.int32, device="cuda")
    buffers = DecodeBuffers.allocate(batch, max_model_len, "cuda")

    def step(fixed: bool):
        md = HGAMetadata.plan(
            qsl, seq, bt, slots, batch, buffers=buffers if fixed else None, seq_lens_dev=seq_dev
        )  # build(): once per step for all layers
        return lambda: layer.forward(b.q, k, v, b.pool, b.summ, md, out)  # noqa: E731

    fns = {"eager": step(False), "eager_fixed": step(True)}
    fns["eager_fixed"]()  # warm-up: caches, first-call driver queries
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fns["eager_fixed"]()
    fns["graph"] = graph.replay
    return fns


def main() -> None:
    from devkit.paged_batch import PagedBatch
    from vllm_hga.bank import DeviceBank
    from vllm_hga.config import HGAConfig
    from vllm_hga.metrics import WorkerMetrics
    from vllm_hga.ops import cuda_ops

    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument(
        "--bank-chunks",
        type=int,
        default=0,
        help="device bank chunks per layer (0: the whole context, as bank_chunks auto gives "
        "one request on a large card)",
    )
    ap.add_argument(
        "--max-model-len",
        type=int,
        default=131072,
        help="routing width of the fixed (graph) layout, as the engine's",
    )
    ap.add_argument("--json")
    args = ap.parse_args()
    rows, slowest, kernel_fns = [], None, {}
    for S in args.contexts:
        bank_chunks = args.bank_chunks or -(-S // 64) + 8
        bank = {"bank_chunks": bank_chunks}
        # (name, config, cuda_ops switches: read at launch and at graph capture)
        step_configs = [(name, keys, {}) for name, keys in CONFIGS.items()]
        step_configs += [
            ("default+bank", bank, {}),
            ("default+bank/cuda_cores", bank, {"SKETCH_TENSOR_CORES": False}),
            # the sliced top-k that prefill rows use, for decode rows (two-pass off)
            ("default+bank/sliced", bank, {"SELECT_SCRATCH_BYTES": 0}),
        ]
        switch_names = ("SKETCH_TENSOR_CORES", "SELECT_SCRATCH_BYTES")
        defaults = {k: getattr(cuda_ops, k) for k in switch_names}
        for name, keys, switches in step_configs:
            for k, v in {**defaults, **switches}.items():
                setattr(cuda_ops, k, v)
            fns = forward_steps(
                HGAConfig.from_mapping(keys), S, args.batch, max(args.max_model_len, S + 64)
            )
            if name == "default+bank":
                kernel_fns[S] = fns["eager_fixed"]
            for mode, fn in fns.items():
                row = {
                    "context": S,
                    "batch": args.batch,
                    "config": name,
                    "step": mode,
                    "max_model_len": args.max_model_len,
                    "layer_step_ms": round(step_ms(fn), 4),
                }
                rows.append(row)
                print("RESULT", json.dumps(row), flush=True)
        for k, v in defaults.items():
            setattr(cuda_ops, k, v)
        for name, keys in CONFIGS.items():
            for bank_on in (False, True):
                cfg = HGAConfig.from_mapping(keys)
                b = PagedBatch([S] * args.batch, 32, 4, 128, uva=True, cfg=cfg, seed=S)
                layer = b.layer
                layer.metrics = WorkerMetrics()
                if bank_on:
                    layer.bank = DeviceBank(bank_chunks, 4, 128, b.dtype, "cuda")
                    layer.bank.bind(b.pool)
                fn = lambda: layer.decode(b.q, b.pool, b.summ, b.md)  # noqa: E731
                ms = step_ms(fn)
                row = {
                    "context": S,
                    "batch": args.batch,
                    "config": name,
                    "bank": bank_on,
                    "layer_step_ms": round(ms, 4),
                }
                rows.append(row)
                print("RESULT", json.dumps(row), flush=True)
                if slowest is None or ms > slowest[0]:
                    slowest = (ms, fn, row)
        q = torch.randn(args.batch, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(args.batch, 4, S, 128, device="cuda", dtype=torch.bfloat16)
        ms = step_ms(
            lambda: torch.nn.functional.scaled_dot_product_attention(q, k, k, enable_gqa=True)
        )
        row = {
            "context": S,
            "batch": args.batch,
            "config": "dense_sdpa_device_kv",
            "layer_step_ms": round(ms, 4),
        }
        rows.append(row)
        print("RESULT", json.dumps(row), flush=True)
    ms, fn, row = slowest
    print("profile of", row)
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    ) as prof:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25))
    for S, fn in kernel_fns.items():  # where the default step's device time goes
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                fn()
            torch.cuda.synchronize()
        print(f"kernels of the default step with the bank, context {S} (10 steps)")
        print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=15))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
