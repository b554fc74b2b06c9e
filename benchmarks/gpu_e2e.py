"""End-to-end vLLM on a GPU: dense FLASH_ATTN vs HGA, same model shape, same run.

Qwen3-30B-A3B architecture (48 layers, 32 query / 4 KV heads, head_dim 128, 128 experts),
dummy weights with online fp8 (as in the dense baseline notes), random token prompts.
One generation per (context, batch), stepped by hand (``measure``): prefill_s = until every
request has its first token; decode tok/s = tokens made while the whole batch decodes.

    python -m benchmarks.gpu_e2e --out results.json --contexts 8192 32768
    python -m benchmarks.gpu_e2e --out r.json --backends HGA HGA+bank \
        --variant 'HGA+bank={"bank_chunks": 512}'     # HGA variants: name=JSON of hga keys
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "moe_intermediate_size": 768,
    "num_hidden_layers": 48,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "vocab_size": 151936,
    "max_position_embeddings": 262144,
    "rope_theta": 10000000.0,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "attention_bias": False,
}


def model_dir() -> str:
    d = tempfile.mkdtemp(prefix="qwen3-30b-a3b-shape-")
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(QWEN3_30B_A3B, f)
    return d


def measure(
    llm, ctx: int, batch: int, new: int, vocab: int = 150000, profile_steps: int = 0
) -> dict:
    """One generation of `batch` random prompts of `ctx` tokens, `new` tokens each, stepped
    by hand so that one prefill gives both numbers: prefill_s = from submission until every
    request has its first token; decode_tok_s = tokens made while the whole batch decodes
    (from the last first token until the first request finishes) per second.

    profile_steps > 0: the first that many decode steps run under vLLM's profiler (the
    LLM needs a profiler_config) and the decode timing starts after them."""
    import random

    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    rng = random.Random(ctx + batch)
    engine = llm.llm_engine
    sp = SamplingParams(max_tokens=new + 1, min_tokens=new + 1, temperature=0.0, ignore_eos=True)
    made = {}  # request id -> tokens so far
    for i in range(batch):
        rid, ids = f"m{ctx}-{batch}-{i}", [rng.randrange(1000, vocab) for _ in range(ctx)]
        engine.add_request(rid, TokensPrompt(prompt_token_ids=ids), sp)
        made[rid] = 0
    t0 = time.perf_counter()
    t_all_first = t_first_done = None
    tokens_at_all_first = 0
    while engine.has_unfinished_requests():
        outs = engine.step()
        now = time.perf_counter()
        for o in outs:
            made[o.request_id] = len(o.outputs[0].token_ids)
        if t_all_first is None and min(made.values()) >= 1:
            if profile_steps:
                llm.start_profile()
                for _ in range(profile_steps):
                    for o in engine.step():
                        made[o.request_id] = len(o.outputs[0].token_ids)
                llm.stop_profile()  # writes the traces
                now = time.perf_counter()
            t_all_first, tokens_at_all_first = now, sum(made.values())
        if t_first_done is None and any(o.finished for o in outs):
            t_first_done, tokens_at_first_done = now, sum(made.values())
    if t_first_done is None or t_first_done <= t_all_first:
        raise RuntimeError(
            f"batch {batch} at {ctx}: a request finished before the last one started "
            f"decoding; raise --new"
        )
    decoded = tokens_at_first_done - tokens_at_all_first
    return {
        "context": ctx,
        "batch": batch,
        "prefill_s": round(t_all_first - t0, 3),
        "decode_tok_s": round(decoded / (t_first_done - t_all_first), 2),
        "decode_tokens": decoded,
    }


def load_rows(path: str) -> list[dict]:
    """Rows already in `path` (an earlier invocation, e.g. the FLASH_ATTN run), or none."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f)


def ratio_table(rows: list[dict], hga: str = "HGA", dense: str = "FLASH_ATTN") -> str:
    """Text table: per (context, batch), dense and HGA decode tok/s, their ratio, TTFTs."""
    by = {(r["backend"], r["context"], r["batch"]): r for r in rows}
    keys = sorted({(r["context"], r["batch"]) for r in rows})
    lines = [
        f"{'context':>8} {'batch':>5} {dense + ' tok/s':>16} {hga + ' tok/s':>10} "
        f"{'ratio':>6} {dense + ' TTFT s':>17} {hga + ' TTFT s':>11}"
    ]
    for ctx, batch in keys:
        d, h = by.get((dense, ctx, batch)), by.get((hga, ctx, batch))

        def cell(r, k):
            return f"{r[k]:.2f}" if r else "-"

        ratio = f"{h['decode_tok_s'] / d['decode_tok_s']:.2f}" if d and h else "-"
        lines.append(
            f"{ctx:>8} {batch:>5} {cell(d, 'decode_tok_s'):>16} "
            f"{cell(h, 'decode_tok_s'):>10} {ratio:>6} {cell(d, 'prefill_s'):>17} "
            f"{cell(h, 'prefill_s'):>11}"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> bool:
    """PNG of decode tok/s vs context, one line per (backend, batch); False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no plot written to {path}")
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for backend, batch in sorted({(r["backend"], r["batch"]) for r in rows}):
        pts = sorted(
            (r["context"], r["decode_tok_s"])
            for r in rows
            if r["backend"] == backend and r["batch"] == batch
        )
        ax.plot(
            [p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{backend} batch {batch}"
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("decode tok/s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--backends", nargs="+", default=["FLASH_ATTN", "HGA"])
    ap.add_argument("--contexts", nargs="+", type=int, default=[8192, 32768])
    ap.add_argument("--batches", nargs="+", type=int, default=[1])
    ap.add_argument(
        "--points",
        nargs="+",
        default=None,
        metavar="CONTEXT:BATCH",
        help="measure these (context, batch) pairs instead of every --contexts x --batches",
    )
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--plot", help="PNG path: decode tok/s vs context, every backend in --out")
    ap.add_argument("--host-kv", default="16GiB")
    ap.add_argument("--hga", default="{}", help="JSON of extra hga keys for every HGA variant")
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        help="NAME=JSON: an HGA variant (hga keys) run as backend NAME",
    )
    ap.add_argument(
        "--profile-dir",
        help="absolute path: trace the first --profile-steps decode steps of every point "
        "with vLLM's torch profiler (then python -m benchmarks.trace_summary DIR)",
    )
    ap.add_argument("--profile-steps", type=int, default=8)
    ap.add_argument(
        "--capture-sizes",
        nargs="+",
        type=int,
        default=[1, 2, 4, 8, 16],
        help="CUDA graph batch sizes (fewer = faster start-up, both backends)",
    )
    args = ap.parse_args()
    points = (
        [tuple(int(x) for x in p.split(":")) for p in args.points]
        if args.points
        else [(c, b) for c in args.contexts for b in args.batches]
    )
    from vllm import LLM

    model = model_dir()
    results = load_rows(args.out)  # append: each backend may run in its own process
    variants = {"HGA": {}}
    for v in args.variant:
        name, _, cfg = v.partition("=")
        variants[name] = json.loads(cfg)
    for name in args.backends:
        backend = "HGA" if name in variants else name
        extra = (
            {"hga": {"host_kv_bytes": args.host_kv, **json.loads(args.hga), **variants[name]}}
            if backend == "HGA"
            else {}
        )
        profiler = {}
        if args.profile_dir:
            profiler = {
                "profiler_config": {
                    "profiler": "torch",
                    "torch_profiler_dir": os.path.join(args.profile_dir, name),
                    "torch_profiler_with_stack": False,
                    "torch_profiler_use_gzip": False,
                }
            }
        t = time.perf_counter()
        llm = LLM(
            model=model,
            load_format="dummy",
            quantization="fp8",
            skip_tokenizer_init=True,
            attention_backend=backend,
            max_model_len=max(c for c, _ in points) + args.new + 64,
            max_num_seqs=max(max(b for _, b in points), 16),
            gpu_memory_utilization=0.85,
            max_num_batched_tokens=16384,
            enable_prefix_caching=False,
            additional_config=extra,
            compilation_config={"cudagraph_capture_sizes": args.capture_sizes},
            **profiler,
        )
        startup = time.perf_counter() - t
        for ctx, batch in points:
            row = {
                "backend": name,
                "hga": extra.get("hga"),
                "startup_s": round(startup, 1),
                **measure(
                    llm, ctx, batch, args.new, profile_steps=args.profile_steps * bool(profiler)
                ),
            }
            results.append(row)
            print("RESULT", json.dumps(row), flush=True)
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)
        llm.llm_engine.engine_core.shutdown()
        del llm
    print(ratio_table(results))
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
