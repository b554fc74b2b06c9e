"""The capacity scenario (issue 14): many long requests at once on a card whose KV budget is
small, dense attention against HGA, one `LLM` engine per backend.

Dense attention keeps every request's K/V in the device KV cache, so a budget that holds
3.6 requests of 32K runs three at a time and queues the rest; HGA keeps the full K/V in
pinned host RAM and only summaries in vLLM's device pages, so the same budget holds them
all.  All requests are submitted at once and the engine is stepped by hand (as
``gpu_e2e.measure`` does); per request the time of its first token and of its completion
are recorded.  One backend per process, rows appended to ``--out`` (``gpu_e2e.load_rows``);
several ``--backend`` values run one subprocess each, back to back, then print the table.

GPU (Qwen3-30B-A3B shape, dummy weights, online fp8; ``gpu_memory_utilization`` 0.30 on an
H200 leaves dense ~117,696 tokens):

    python -m benchmarks.gpu_capacity --out cap.json --backend FLASH_ATTN HGA \\
        --requests 16 --context 32768 --new 128 --gpu-memory-utilization 0.30
    python -m benchmarks.gpu_capacity --print cap.json

CPU (the embedded SmolLM2-135M, real weights; the KV budget is ``--kv-cache-bytes``, vLLM's
``kv_cache_memory_bytes``, the same knob as VLLM_CPU_KVCACHE_SPACE):

    python -m benchmarks.gpu_capacity --out cap.json --backend CPU_ATTN HGA \\
        --model "$(python -m devkit.model)" --requests 3 --context 600 --new 8 \\
        --kv-cache-bytes 24MiB

HGA's host pool (``host_kv_bytes``) defaults to ``auto``: exactly what every request of
the run needs at ``max_model_len`` (plus vLLM's null block), computed from the model's
config; 16 x 32K of the Qwen3-30B-A3B shape is 48.3 GiB of pinned host RAM.

Server variant: ``--write-model-dir DIR --tokenizer-from TOK`` only writes the shape's
config with a tokenizer beside it, for ``vllm serve DIR --load-format dummy`` against
``vllm bench serve --dataset-name random`` (both need a tokenizer; docs/BENCHMARKS.md §4.1).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import time

from benchmarks.gpu_e2e import QWEN3_30B_A3B, load_rows, model_dir
from vllm_hga.config import _parse_bytes

CHUNK = 64  # HGA's block size (one chunk)
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "half": 2, "float32": 4, "float": 4}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)


def percentile(xs: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), q in [0, 100]."""
    s = sorted(xs)
    if not s:
        raise ValueError("no values")
    pos = (len(s) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def read_model_config(model: str) -> dict:
    with open(os.path.join(model, "config.json")) as f:
        return json.load(f)


def kv_bytes_per_token(hf: dict, dtype: str) -> int:
    """Full K+V bytes of one token over all layers (what HGA's host pool stores)."""
    head = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    kv_heads = hf.get("num_key_value_heads", hf["num_attention_heads"])
    if dtype == "auto":
        dtype = str(hf.get("torch_dtype") or hf.get("dtype") or "bfloat16")
    return hf["num_hidden_layers"] * kv_heads * 2 * head * DTYPE_BYTES[dtype.replace("torch.", "")]


def auto_host_kv_bytes(hf: dict, dtype: str, requests: int, max_model_len: int) -> int:
    """A host pool that holds every request at max_model_len, plus vLLM's null block."""
    blocks = requests * -(-max_model_len // CHUNK) + 1
    return blocks * CHUNK * kv_bytes_per_token(hf, dtype)


def write_model_dir(path: str, tokenizer_from: str | None = None) -> str:
    """The Qwen3-30B-A3B shape (gpu_e2e's config) in `path`, for `vllm serve PATH
    --load-format dummy`, with the tokenizer files of `tokenizer_from` beside it: the
    server and `vllm bench serve --dataset-name random` need a tokenizer, and the device
    machines reach no model hub (the embedded SmolLM2's has 49,152 ids, all valid ids of
    the 151,936-token shape)."""
    import shutil

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(QWEN3_30B_A3B, f)
    copied = []
    for name in TOKENIZER_FILES if tokenizer_from else ():
        src = os.path.join(tokenizer_from, name)
        if os.path.isfile(src):
            shutil.copy(src, os.path.join(path, name))
            copied.append(name)
    if tokenizer_from and "tokenizer.json" not in copied and "vocab.json" not in copied:
        raise SystemExit(f"{tokenizer_from} has no tokenizer files ({TOKENIZER_FILES})")
    return path


def engine_capacity(llm) -> dict:
    """The KV capacity the engine reported after start-up, read from the front end's copy of
    its config (the engine core sends it back when it is ready): capacity_tokens is vLLM's
    own figure, the "KV cache size: N tokens" of its start-up log (kv_cache_size_tokens =
    max concurrency x max_model_len), block_tokens the raw num_gpu_blocks x block_size
    (null block included).  With HGA also the host plan start-up made
    (vllm_hga.startup.planned_capacity; its log line "host K/V pool ... blocks = N
    tokens"): the block count is the smaller of what that plan and the device budget
    for the summary pages hold."""
    cfg = llm.llm_engine.vllm_config
    cache = cfg.cache_config
    blocks, block = cache.num_gpu_blocks, cache.block_size
    block_tokens = blocks * block if blocks else None
    size = getattr(cache, "kv_cache_size_tokens", None)
    out = {
        "capacity_tokens": size if size is not None else block_tokens,
        "kv_cache_max_concurrency": getattr(cache, "kv_cache_max_concurrency", None),
        "num_gpu_blocks": blocks,
        "block_size": block,
        "block_tokens": block_tokens,
    }
    try:
        from vllm_hga.startup import planned_capacity
    except ImportError:
        return out
    cap = planned_capacity(cfg)
    if cap is not None:
        out["hga_plan"] = {
            "host_blocks": cap.num_blocks,
            "host_tokens": cap.max_tokens,
            "host_pool_bytes": cap.rank_pool_bytes,
            "host_bytes_per_token": cap.host_bytes_per_block // CHUNK,
            "device_bytes_per_token": cap.device_bytes_per_block // CHUNK,
        }
    return out


def run_scenario(llm, requests: int, context: int, new: int, vocab: int, seed: int = 0) -> dict:
    """Submit `requests` random prompts of `context` tokens at once, `new` tokens each, and
    step the engine until all are done.  TTFT is from submission to a request's first
    token; max_concurrent is the most requests that made a token in one step."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    rng = random.Random(seed * 1_000_003 + context * 1009 + requests)
    hi = max(min(vocab, 150000), 1001)
    prompts = [[rng.randrange(1000, hi) for _ in range(context)] for _ in range(requests)]
    sp = SamplingParams(max_tokens=new, min_tokens=new, temperature=0.0, ignore_eos=True)
    engine = llm.llm_engine
    made, first, done = {}, {}, {}
    max_concurrent = steps = 0
    t0 = time.perf_counter()
    for i, ids in enumerate(prompts):
        rid = f"cap{seed}-{i}"
        engine.add_request(rid, TokensPrompt(prompt_token_ids=ids), sp)
        made[rid] = 0
    while engine.has_unfinished_requests():
        outs = engine.step()
        now = time.perf_counter()
        steps += 1
        active = 0
        for o in outs:
            n = len(o.outputs[0].token_ids)
            if n > made[o.request_id]:
                active += 1
                if made[o.request_id] == 0:
                    first[o.request_id] = now
            made[o.request_id] = n
            if o.finished:
                done[o.request_id] = now
        max_concurrent = max(max_concurrent, active)
    wall = max(done.values()) - t0
    ttft = [first[r] - t0 for r in made]
    short = [r for r, n in made.items() if n != new]
    if short:
        raise RuntimeError(f"requests {short} made {[made[r] for r in short]} tokens, not {new}")
    tpot = [(done[r] - first[r]) / (new - 1) for r in made] if new > 1 else []
    return {
        "wall_s": round(wall, 4),
        "output_tok_s": round(requests * new / wall, 3),
        "ttft_p50_s": round(percentile(ttft, 50), 4),
        "ttft_p99_s": round(percentile(ttft, 99), 4),
        "ttft_max_s": round(max(ttft), 4),
        "tpot_mean_s": round(sum(tpot) / len(tpot), 5) if tpot else None,
        "max_concurrent": max_concurrent,
        "steps": steps,
    }


def card_name(device_type: str) -> str:
    if device_type != "cuda":
        return "cpu"
    try:
        from vllm.platforms import current_platform

        return current_platform.get_device_name()
    except Exception:
        import torch

        return torch.cuda.get_device_name(0)


def git_commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def measure_backend(args) -> dict:
    """Start one engine for args.backend, run the scenario once, shut it down."""
    import vllm
    from vllm import LLM
    from vllm.platforms import current_platform

    device_type = str(current_platform.device_type)
    model = args.model or model_dir()
    hf = read_model_config(model)
    max_model_len = args.context + args.new + 64
    hga = None
    if args.backend == "HGA":
        hga = json.loads(args.hga)
        if "host_kv_bytes" not in hga:
            hga["host_kv_bytes"] = (
                auto_host_kv_bytes(hf, args.dtype, args.requests, max_model_len)
                if args.host_kv == "auto"
                else args.host_kv
            )
    quant = args.quantization if args.quantization is not None else (None if args.model else "fp8")
    kw = dict(
        model=model,
        load_format=args.load_format or ("auto" if args.model else "dummy"),
        skip_tokenizer_init=True,
        attention_backend=args.backend,
        dtype=args.dtype,
        max_model_len=max_model_len,
        max_num_seqs=max(args.requests, args.max_num_seqs),
        max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_caching=False,
        additional_config={"hga": hga} if hga is not None else {},
        seed=0,
    )
    if quant:
        kw["quantization"] = quant
    kv_bytes = _parse_bytes(args.kv_cache_bytes or None, "--kv-cache-bytes")
    gmu = None
    if device_type == "cuda":
        if kv_bytes is None:
            gmu = kw["gpu_memory_utilization"] = args.gpu_memory_utilization
        if args.enforce_eager:
            kw["enforce_eager"] = True
        else:
            kw["compilation_config"] = {"cudagraph_capture_sizes": args.capture_sizes}
    else:
        # vLLM's CPU worker has no gpu_memory_utilization budget of its own: without an
        # explicit size it reserves most of the NUMA node's RAM (scripts/serve.sh)
        kv_bytes = kv_bytes or 1 << 30
        kw["enforce_eager"] = True
    if kv_bytes is not None:
        kw["kv_cache_memory_bytes"] = kv_bytes
    t = time.perf_counter()
    llm = LLM(**kw)
    startup = time.perf_counter() - t
    try:
        cap = engine_capacity(llm)
        vocab = int(hf.get("vocab_size", 32000))
        if args.warmup:
            run_scenario(llm, 1, min(args.context, 512), 2, vocab, seed=1)
        result = run_scenario(llm, args.requests, args.context, args.new, vocab)
        card = card_name(device_type)
        if hga is not None:  # rank 0's tier bytes (pool, bank, scratch) and counters
            cap["hga_report"] = llm.collective_rpc("hga_report")[0]
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
    return {
        "backend": args.backend,
        "hga": hga,
        "requests": args.requests,
        "context": args.context,
        "new_tokens": args.new,
        "gpu_memory_utilization": gmu,
        "kv_cache_bytes": kv_bytes,
        "max_model_len": max_model_len,
        "max_num_seqs": kw["max_num_seqs"],
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "model": "Qwen3-30B-A3B shape (dummy)" if not args.model else os.path.basename(model),
        "quantization": quant,
        "startup_s": round(startup, 1),
        **result,
        **cap,
        "card": card,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "vllm": vllm.__version__,
        "commit": git_commit(),
    }


def table(rows: list[dict]) -> str:
    """Every row, with HGA's wall time over the dense row of the same scenario."""
    key = ("requests", "context", "new_tokens", "gpu_memory_utilization", "kv_cache_bytes")
    dense = {
        tuple(r.get(k) for k in key): r for r in rows if r["backend"] != "HGA"
    }  # last one wins

    def f(v, spec):
        return format(v, spec) if isinstance(v, (int, float)) else "-"

    lines = [
        f"{'backend':>10} {'req':>4} {'context':>8} {'new':>5} {'wall s':>9} {'out tok/s':>10} "
        f"{'TTFT p50':>9} {'TTFT p99':>9} {'capacity':>9} {'max conc':>8} {'wall/dense':>10}"
    ]
    for r in rows:
        d = dense.get(tuple(r.get(k) for k in key))
        ratio = r["wall_s"] / d["wall_s"] if r["backend"] == "HGA" and d else None
        lines.append(
            f"{r['backend']:>10} {r['requests']:>4} {r['context']:>8} {r['new_tokens']:>5} "
            f"{f(r['wall_s'], '.2f'):>9} {f(r['output_tok_s'], '.2f'):>10} "
            f"{f(r['ttft_p50_s'], '.2f'):>9} {f(r['ttft_p99_s'], '.2f'):>9} "
            f"{f(r.get('capacity_tokens'), 'd'):>9} {f(r.get('max_concurrent'), 'd'):>8} "
            f"{f(ratio, '.2f'):>10}"
        )
    return "\n".join(lines)


def without_backend(argv: list[str]) -> list[str]:
    """argv with every --backend option (and its values) taken out."""
    out, skipping = [], False
    for a in argv:
        if a == "--backend":
            skipping = True
        elif a.startswith("--backend="):
            skipping = False
        elif skipping and not a.startswith("--"):
            pass
        else:
            skipping = False
            out.append(a)
    return out


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="JSON file the row is appended to")
    ap.add_argument("--print", dest="print_file", metavar="FILE", help="only print FILE's table")
    ap.add_argument(
        "--write-model-dir",
        metavar="DIR",
        help="only write the Qwen3-30B-A3B shape to DIR (for vllm serve --load-format dummy)",
    )
    ap.add_argument(
        "--tokenizer-from", metavar="DIR", help="with --write-model-dir: copy its tokenizer"
    )
    ap.add_argument(
        "--backend",
        nargs="+",
        default=["FLASH_ATTN"],
        help="FLASH_ATTN | CPU_ATTN | HGA; several: one subprocess each, back to back",
    )
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.30)
    ap.add_argument(
        "--kv-cache-bytes",
        help="vLLM's kv_cache_memory_bytes ('24MiB'): the KV budget on CPU (default 1GiB "
        "there); on CUDA it replaces --gpu-memory-utilization",
    )
    ap.add_argument(
        "--host-kv",
        default="auto",
        help="HGA host_kv_bytes ('48GiB'); auto: every request at max_model_len",
    )
    ap.add_argument("--hga", default="{}", help="JSON of extra hga keys")
    ap.add_argument("--model", help="checkpoint folder (default: Qwen3-30B-A3B shape, dummy)")
    ap.add_argument("--load-format", help="default: dummy without --model, else auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--quantization", help="default: fp8 without --model, else none")
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--max-num-batched-tokens", type=int, default=16384)
    ap.add_argument("--enforce-eager", action="store_true", help="CUDA: no graphs (CPU: always)")
    ap.add_argument("--capture-sizes", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    ap.add_argument(
        "--no-warmup",
        dest="warmup",
        action="store_false",
        help="skip the one short request run before the timed scenario",
    )
    return ap


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    if args.print_file:
        print(table(load_rows(args.print_file)))
        return
    if args.write_model_dir:
        print(write_model_dir(args.write_model_dir, args.tokenizer_from))
        return
    if not args.out:
        raise SystemExit("--out FILE is required (or --print FILE)")
    if len(args.backend) > 1:
        for b in args.backend:
            cmd = [sys.executable, "-m", "benchmarks.gpu_capacity", *without_backend(argv)]
            subprocess.run([*cmd, "--backend", b], check=True)
        print(table(load_rows(args.out)))
        return
    args.backend = args.backend[0]
    row = measure_backend(args)
    rows = load_rows(args.out)  # read after the run: another process may have appended
    rows.append(row)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
    print("RESULT", json.dumps(row), flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()
