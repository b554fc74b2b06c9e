"""Needle in a haystack: dense vs HGA in the real vLLM engine, on real-text haystacks.

A haystack is the beginning of a real document (``devkit.texts``); one needle sentence
is inserted at a line boundary at the requested depth (share of the haystack's tokens
before it), the question follows the haystack, and the whole is sent as one chat turn
(the model's chat template).  Greedy decoding, 32 new tokens; a trial passes when the
expected answer appears in the output (case-insensitive).

    python -m research.niah                                  # dense + HGA default
    python -m research.niah --config maxg='{"chunk_score": "max_group"}' --skip-dense
    python -m research.niah --lengths 8000 --depths 0.3 --kinds password   # one trial
    python -m research.niah --backend sim --device cuda      # replay (float32), any torch device

``--backend sim`` replays the float32 checkpoint under transformers with our routing code
(``research.analysis``): dense = greedy decoding with exact attention; HGA = the exact
greedy continuation under the replayed rule (full forwards, teacher-forcing a guess and
fixing its first wrong token until none is left); ``"oracle": "group"`` in a config gives
the oracle at that config's budget.

Context length = tokens of the whole chat prompt (template + haystack + needle +
question), at most ``--lengths``.  The default dtype is the checkpoint's bfloat16 (what
``vllm serve`` runs); ``--dtype float32`` for the exact-arithmetic copy.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from research import evalcommon as ec

# kind: (needle sentence, question, expected answer)
NEEDLES = {
    "password": (
        "The secret password for the archive is 'violet-harbor-42'.",
        "What is the secret password for the archive?",
        "violet-harbor-42",
    ),
    "number": (
        "The access code for the north gate is 7391.",
        "What is the access code for the north gate?",
        "7391",
    ),
    "city": (
        "Ms. Okonkwo's sister lives in the city of Valparaiso.",
        "In which city does Ms. Okonkwo's sister live?",
        "Valparaiso",
    ),
    "pin": ("The PIN for the blue safe is 5824.", "What is the PIN for the blue safe?", "5824"),
    "year": (
        "The old mill by the river was built in 1873.",
        "In what year was the old mill by the river built?",
        "1873",
    ),
    "animal": (
        "The favourite animal of Queen Marguerite is the red panda.",
        "What is the favourite animal of Queen Marguerite?",
        "red panda",
    ),
    "name": (
        "The lighthouse keeper on Skerry Island is named Tobias Wrenfield.",
        "What is the name of the lighthouse keeper on Skerry Island?",
        "Wrenfield",
    ),
}
GPL_FILES = ["/usr/share/common-licenses/GPL-3", "/usr/share/common-licenses/GPL-2"]
HAYSTACKS = ["gpl", "devils_dictionary"]
# Needles the dense model mostly answers (measured: docs/QUALITY.md); city/name/animal are
# kept for reference: SmolLM2-135M answers them too rarely even with dense attention.
KINDS = ["password", "number", "pin", "year"]
DEPTHS = [0.05, 0.25, 0.5, 0.75, 0.95]
LENGTHS = [2048, 4096, 8000]
NEW_TOKENS = 32


def _chat_ids(tok, content: str) -> list[int]:
    ids = tok.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True
    )
    if not isinstance(ids, list):  # a BatchEncoding in some transformers versions
        ids = ids["input_ids"]
    return list(ids)


def hay_text(name: str) -> str:
    """A haystack: a devkit.texts document, or "gpl" (the GNU GPL v3 then v2, as every
    Debian/Ubuntu system ships them in /usr/share/common-licenses, package base-files)."""
    if name == "gpl":
        return "\n\n".join(Path(f).read_text() for f in GPL_FILES)
    from devkit.texts import load_text

    return load_text(name)


def build_prompt(tok, hay: str, n_tokens: int, depth: float, kind: str) -> dict:
    """A chat prompt of at most n_tokens tokens with the needle at `depth` of the haystack."""
    needle, question, answer = NEEDLES[kind]
    overhead = len(_chat_ids(tok, f"\n{needle}\n\n\n{question}"))
    n_hay = n_tokens - overhead - 8
    lines = tok.decode(tok.encode(hay_text(hay))[:n_hay]).split("\n")
    # the line boundary whose token offset is closest to depth * (haystack tokens)
    offsets, acc = [], 0
    for line in lines:
        offsets.append(acc)
        acc += len(tok.encode(line + "\n"))
    offsets.append(acc)
    cut = min(range(len(lines) + 1), key=lambda i: abs(offsets[i] - depth * acc))
    while True:  # drop trailing lines if re-tokenization at the seams made it too long
        doc = "\n".join(lines[:cut] + ["", needle, ""] + lines[cut:])  # its own paragraph
        ids = _chat_ids(tok, f"{doc}\n\n{question}")
        if len(ids) <= n_tokens or len(lines) <= cut:
            break
        lines = lines[:-1]
    return {
        "hay": hay,
        "kind": kind,
        "depth": depth,
        "target_len": n_tokens,
        "prompt_ids": ids,
        "answer": answer,
        "needle_at": round(offsets[cut] / max(1, acc), 3),
    }


def run(backend: str, hga: dict | None, trials: list[dict], dtype: str) -> list[dict]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    llm = ec.make_llm(backend, hga, dtype=dtype)
    clock = ec.Clock()
    try:
        outs = llm.generate(
            [TokensPrompt(prompt_token_ids=t["prompt_ids"]) for t in trials],
            SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0),
            use_tqdm=False,
        )
    finally:
        ec.close(llm)
    res = []
    for t, o in zip(trials, outs):
        text = o.outputs[0].text
        res.append(
            {k: v for k, v in t.items() if k != "prompt_ids"}
            | {
                "len": len(t["prompt_ids"]),
                "output": text,
                "pass": t["answer"].lower() in text.lower(),
            }
        )
    print(f"  {backend} {json.dumps(hga)}: {len(trials)} trials in {clock()} s", flush=True)
    return res


def run_sim(analyzer, hga: dict | None, trials: list[dict]) -> list[dict]:
    """Replay counterpart of ``run``: greedy continuations of NEW_TOKENS tokens."""
    clock = ec.Clock()
    res = []
    for t in trials:
        ids = t["prompt_ids"]
        if hga is None:
            cont = analyzer.greedy(ids, NEW_TOKENS)
            t["dense_cont"] = cont  # the first guess of every HGA replay of this trial
        else:
            cont = exact_greedy(analyzer, ids, t["dense_cont"], ec.sim_mode(hga))
        eos = analyzer.tokenizer.eos_token_id
        text = analyzer.tokenizer.decode([c for c in cont if c != eos])
        res.append(
            {k: v for k, v in t.items() if k not in ("prompt_ids", "dense_cont")}
            | {"len": len(ids), "output": text, "pass": t["answer"].lower() in text.lower()}
        )
    print(f"  sim {json.dumps(hga)}: {len(trials)} trials in {clock()} s", flush=True)
    return res


def exact_greedy(analyzer, ids: list[int], guess: list[int], mode) -> list[int]:
    """Greedy continuation of ids under `mode`, from full forwards only: teacher-force the
    guess, keep it up to its first token that differs from the prediction, put the
    prediction there, repeat.  Each forward verifies at least one more token."""
    eos = analyzer.tokenizer.eos_token_id
    cont, ok = list(guess[:NEW_TOKENS]), 0
    while ok < len(cont):
        analyzer.nll(ids + cont, mode)
        pred = analyzer.last_argmax[len(ids) - 1 :].tolist()[: len(cont)]
        bad = next((i for i in range(ok, len(cont)) if pred[i] != cont[i]), None)
        if bad is None:
            break
        cont[bad] = pred[bad]
        ok = bad + 1
        if cont[bad] == eos:
            return cont[:ok]
    return cont


def table(results: dict[str, list[dict]], lengths, depths) -> str:
    header = ["config", "ctx"] + [f"{int(100 * d)}%" for d in depths] + ["all"]
    rows = []
    for name, res in results.items():
        for L in lengths:
            cells = []
            for d in depths:
                rs = [r for r in res if r["target_len"] == L and r["depth"] == d]
                cells.append(f"{sum(r['pass'] for r in rs)}/{len(rs)}")
            rs = [r for r in res if r["target_len"] == L]
            rows.append([name, L] + cells + [f"{sum(r['pass'] for r in rs)}/{len(rs)}"])
    return ec.md_table(header, rows)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--backend", choices=["vllm", "sim"], default="vllm")
    ap.add_argument("--device", default="cpu", help="--backend sim: torch device")
    ap.add_argument("--dtype", choices=ec.DTYPES, default="bfloat16")
    ap.add_argument("--hays", nargs="+", default=HAYSTACKS)
    ap.add_argument("--kinds", nargs="+", default=KINDS, choices=list(NEEDLES))
    ap.add_argument("--depths", type=float, nargs="+", default=DEPTHS)
    ap.add_argument("--lengths", type=int, nargs="+", default=LENGTHS)
    ap.add_argument(
        "--config",
        action="append",
        default=[],
        help="NAME=JSON of hga keys (repeatable); default: default={}",
    )
    ap.add_argument("--skip-dense", action="store_true")
    ap.add_argument("--dense-only", action="store_true")
    ap.add_argument("--json", help="write every trial (prompt, output, pass) here")
    args = ap.parse_args()
    if args.backend == "vllm" and args.device != "cpu":
        ap.error("--device is for --backend sim (the engine picks its own device)")
    if args.backend == "sim":
        if args.skip_dense:
            ap.error("--backend sim needs the dense run (its output seeds the replay)")
        args.dtype = "float32"

    tok = ec.tokenizer(args.dtype)
    trials = [
        build_prompt(tok, h, L, d, k)
        for h in args.hays
        for L in args.lengths
        for d in args.depths
        for k in args.kinds
    ]
    configs = {}
    for item in args.config or ["default="]:
        name, _, blob = item.partition("=")
        configs[name] = json.loads(blob) if blob else {}
    results = {}

    def dump() -> None:  # after every config, so that a run cut short keeps what it did
        if args.json:
            Path(args.json).write_text(
                json.dumps({"dtype": args.dtype, "configs": configs, "results": results}, indent=1)
            )

    if args.backend == "sim":
        from research.analysis import Analyzer

        an = Analyzer(device=args.device)
        results["dense"] = run_sim(an, None, trials)
        dump()
        for name, hga in ({} if args.dense_only else configs).items():
            results[name] = run_sim(an, hga, trials)
            dump()
    else:
        if not args.skip_dense:
            results["dense"] = run(ec.dense_backend(), None, trials, args.dtype)
            dump()
        for name, hga in ({} if args.dense_only else configs).items():
            results[name] = run("HGA", hga, trials, args.dtype)
            dump()
    print(
        f"haystacks {', '.join(args.hays)}; needles {', '.join(args.kinds)}; "
        f"dtype {args.dtype}; backend {args.backend}; pass = answer in greedy output"
    )
    print(table(results, args.lengths, args.depths))
    for name, res in results.items():
        for r in res:
            if not r["pass"]:
                print(
                    f"  miss {name}: {r['hay']} {r['target_len']} depth {r['depth']} "
                    f"{r['kind']}: {r['output'][:80]!r}"
                )


if __name__ == "__main__":
    main()
