"""CPU engine speed of dense vs HGA (mean_std and the default sketch scores), same run.

Real vLLM engine, the embedded model in bf16, one prompt of the first 4,096 tokens of
Bierce's Devil's Dictionary, prefix caching off, batch 1:
prefill = time of a 1-token generation; decode tok/s = 64 / (t(65 tokens) - t(1 token)).

    python -m benchmarks.bench_cpu [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from research import evalcommon as ec

RUNS = [
    ("dense", "CPU_ATTN", None),
    ("mean_std", "HGA", {"group_score": "mean_std"}),
    ("sketch (default)", "HGA", {}),
]


def timed(llm, prompt, n: int) -> float:
    from vllm import SamplingParams

    t = time.time()
    llm.generate(
        [prompt], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), use_tqdm=False
    )
    return time.time() - t


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--json")
    args = ap.parse_args()
    from vllm.inputs import TokensPrompt

    prompt = TokensPrompt(
        prompt_token_ids=ec.doc_tokens(ec.tokenizer("bfloat16"), "devils_dictionary", args.tokens)
    )
    res = {}
    for name, backend, hga in RUNS:
        llm = ec.make_llm(backend, hga, dtype="bfloat16", enable_prefix_caching=False)
        try:
            timed(llm, prompt, 1)  # warm-up
            t1, t65 = timed(llm, prompt, 1), timed(llm, prompt, 65)
        finally:
            ec.close(llm)
        res[name] = {"prefill_s": round(t1, 2), "decode_tok_s": round(64 / (t65 - t1), 2)}
        print(name, res[name], flush=True)
    print(
        ec.md_table(
            ["attention", "prefill (s)", "decode (tok/s)", "vs dense"],
            [
                [
                    n,
                    r["prefill_s"],
                    r["decode_tok_s"],
                    f"{r['decode_tok_s'] / res['dense']['decode_tok_s']:.2f}x",
                ]
                for n, r in res.items()
            ],
        )
    )
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
