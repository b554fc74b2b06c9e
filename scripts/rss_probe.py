"""Worker memory per round of the soak's request mix, in-process (no HTTP): issue 18.

Builds ``vllm.LLM`` (embedded SmolLM2, ``--max-model-len 512``, eager, the soak's NVMe
tier unless ``--no-disk``) with HGA or vLLM's dense CPU attention, then drives its engine
like the soak's 16 clients: at most 16 requests in flight, prompts of 2 to 60 words with 1
to 4 new tokens, a few near ``max_model_len``, ``n`` of 2 or 3 sampled, requests aborted
after two outputs (hang-ups).  After each round (engine idle) it reads, in the worker
process: ``/proc/self/status`` RssAnon, glibc's ``mallinfo2`` (bytes in use vs held), and
optionally the same after ``malloc_trim(0)``.  Prints one JSON line per round.

    VLLM_HGA_VENV=/work/main/.venv PYTHONPATH=. /work/main/.venv/bin/python \
        -m scripts.rss_probe --backend HGA --rounds 8 --requests 200
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import sys
import tempfile
import time

os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # callables to the worker


def worker_memory(worker=None, trim: bool = False) -> dict:
    """Runs in the worker (collective_rpc): RssAnon and malloc's view, MiB."""
    fields = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in fields.split()]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2

    def read() -> dict:
        with open("/proc/self/status") as f:
            st = {
                k: int(v.split()[0])
                for k, _, v in (ln.partition(":") for ln in f)
                if k in ("RssAnon", "VmRSS")
            }
        mi = libc.mallinfo2()
        mib = 1 << 20
        return {
            "rss_anon": round(st["RssAnon"] / 1024, 1),
            "malloc_in_use": round(mi.uordblks / mib, 1),  # arenas' chunks in use
            "malloc_free": round(mi.fordblks / mib, 1),  # held by malloc, free
            "mmapped": round(mi.hblkhd / mib, 1),  # mmapped chunks (all in use)
            "mmapped_n": mi.hblks,
        }

    out = read()
    if trim:
        libc.malloc_trim(0)
        out["after_trim"] = read()
    return out


def run_python(worker=None, code: str = "") -> object:
    """Runs `code` in the worker; returns its variable `result`."""
    scope = {"worker": worker}
    exec(code, scope)
    return scope.get("result")


def build(args):
    from vllm import LLM

    from devkit.model import embedded_model_dir

    extra = {}
    if args.backend == "HGA":
        hga = dict(json.loads(args.hga))
        if not args.no_disk:
            hga.update(disk_dir=tempfile.mkdtemp(prefix="rssprobe-"), disk_kv_bytes="1GiB")
        extra = {"hga": hga}
    return LLM(
        model=str(embedded_model_dir()),
        attention_backend=args.backend,
        max_model_len=args.max_len,
        enforce_eager=True,
        additional_config=extra,
        seed=0,
        kv_cache_memory_bytes=args.kv_bytes,
    )


class Mix:
    def __init__(self, tok, max_len: int, seed: int) -> None:
        from devkit.texts import load_text

        self.rng = random.Random(seed)
        self.words = load_text("devils_dictionary").split()
        self.long_ids = tok.encode(" ".join(self.words[:3000]))
        self.tok, self.max_len = tok, max_len

    def request(self, i: int, near_max: bool):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        r = self.rng
        if near_max:
            keep = self.max_len - 8 - r.randint(0, 24)
            return (
                TokensPrompt(prompt_token_ids=self.long_ids[:keep]),
                SamplingParams(max_tokens=8, temperature=0),
                False,
            )
        n = r.randint(2, 60)
        start = r.randrange(len(self.words) - n)
        text = " ".join(self.words[start : start + n])
        kind = r.choices(["greedy", "sampled", "hang_up"], [80, 5, 5])[0]
        if r.random() < 0.3:  # a chat request
            text = self.tok.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
        ids = self.tok.encode(text)
        if kind == "sampled":
            sp = SamplingParams(
                max_tokens=r.randint(1, 4), n=r.randint(2, 3), temperature=0.8, seed=i
            )
        elif kind == "hang_up":
            sp = SamplingParams(max_tokens=16, temperature=0, output_kind=1)  # DELTA
        else:
            sp = SamplingParams(max_tokens=r.randint(1, 4), temperature=0)
        return TokensPrompt(prompt_token_ids=ids), sp, kind == "hang_up"


def drive(llm, mix: Mix, n: int, near_max: int, concurrency: int, base: int) -> None:
    eng = llm.llm_engine
    long_at = {(i + 1) * n // (near_max + 1) for i in range(near_max)}
    todo = list(range(n))
    live: dict[str, int] = {}  # request id -> outputs seen (hang-ups only count)
    hang: set[str] = set()
    while todo or live:
        while todo and len(live) < concurrency:
            i = todo.pop(0)
            prompt, sp, hang_up = mix.request(base + i, i in long_at)
            rid = f"r{base + i}"
            eng.add_request(rid, prompt, sp)
            live[rid] = 0
            if hang_up:
                hang.add(rid)
        for out in eng.step():
            rid = out.request_id
            if rid not in live:
                continue
            live[rid] += 1
            if out.finished:
                live.pop(rid)
                hang.discard(rid)
            elif rid in hang and live[rid] >= 2:
                eng.abort_request([rid])
                live.pop(rid)
                hang.discard(rid)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", default="HGA", help="HGA or CPU_ATTN")
    ap.add_argument("--hga", default="{}", help="HGA config JSON (added to the disk tier)")
    ap.add_argument("--no-disk", action="store_true", help="host-RAM pool instead of the NVMe tier")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--near-max", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--kv-bytes", type=int, default=1 << 30)
    ap.add_argument("--trim", action="store_true", help="also measure after malloc_trim(0)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--exec", default="", help="python run in the worker after each round")
    args = ap.parse_args(argv)

    llm = build(args)
    mix = Mix(llm.get_tokenizer(), args.max_len, args.seed)
    t0 = time.time()
    drive(llm, mix, 32, 1, args.concurrency, 10**7)  # warm-up
    first = llm.collective_rpc(worker_memory, kwargs={"trim": args.trim})[0]
    print(json.dumps({"round": 0, "s": round(time.time() - t0), **first}), flush=True)
    for k in range(1, args.rounds + 1):
        drive(llm, mix, args.requests, args.near_max, args.concurrency, k * 100_000)
        mem = llm.collective_rpc(worker_memory, kwargs={"trim": args.trim})[0]
        extra = {}
        if args.exec:
            extra["exec"] = llm.collective_rpc(run_python, kwargs={"code": args.exec})[0]
        print(json.dumps({"round": k, "s": round(time.time() - t0), **mem, **extra}), flush=True)
    llm.llm_engine.engine_core.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
