"""Large host budgets, as an operator sets them (issue 18): does HGA start with a host K/V
pool of a given share of this machine's available RAM, and how fast does the `LLM(...)`
process exit when the budget cannot be met?

Each case runs in its own Python process (a real vLLM engine, the embedded model on CPU
or the Qwen3-30B-A3B shape of benchmarks.gpu_e2e on a GPU) and reports:

* ``start``: host_kv_bytes = FRACTION x available RAM; served one request? start-up s,
  the capacity line vLLM logged;
* ``refuse``: host_kv_bytes = 2 x total RAM: the refusal message and the seconds from it
  to the process's exit (target: within 10 s).

    python -m benchmarks.host_budget --fraction 0.8 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import psutil

CHILD = r"""
import json, sys, time
spec = json.loads(sys.argv[1])
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
t = time.perf_counter()
try:
    llm = LLM(**spec["llm"], additional_config={"hga": {"host_kv_bytes": spec["bytes"]}})
except Exception as e:  # the refusal: report it, then leave as a user's script would
    lines = [x for x in str(e).splitlines() if "hga" in x.lower()] or str(e).splitlines()
    print("REFUSED", json.dumps({"error": lines[0].strip()[:400],
          "at": time.time()}), flush=True)
    sys.exit(3)
start = time.perf_counter() - t
out = llm.generate([TokensPrompt(prompt_token_ids=[1000 + i for i in range(256)])],
                   SamplingParams(max_tokens=4, temperature=0.0), use_tqdm=False)
print("STARTED", json.dumps({"startup_s": round(start, 1),
      "tokens": len(out[0].outputs[0].token_ids)}), flush=True)
llm.llm_engine.engine_core.shutdown()
"""


def llm_args() -> dict:
    """Engine arguments: the GPU e2e shape with dummy weights where CUDA is, else the
    embedded model on CPU."""
    from vllm.platforms import current_platform

    if current_platform.is_cuda():
        from benchmarks.gpu_e2e import model_dir

        return dict(
            model=model_dir(),
            load_format="dummy",
            quantization="fp8",
            skip_tokenizer_init=True,
            attention_backend="HGA",
            max_model_len=32768,
            gpu_memory_utilization=0.85,
            enforce_eager=True,
        )
    from devkit.model import embedded_model_dir

    return dict(
        model=str(embedded_model_dir()),
        attention_backend="HGA",
        max_model_len=8192,
        enforce_eager=True,
        skip_tokenizer_init=True,
    )


def run_case(name: str, nbytes: int, timeout: int) -> dict:
    spec = {"llm": llm_args(), "bytes": nbytes}
    t0 = time.time()
    p = subprocess.Popen(
        [sys.executable, "-c", CHILD, json.dumps(spec)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    row = {"case": name, "host_kv_bytes": nbytes, "host_kv_gib": round(nbytes / 2**30, 2)}
    log = []
    try:
        for line in p.stdout:
            log.append(line)
            if line.startswith(("STARTED ", "REFUSED ")):
                row.update(json.loads(line.split(" ", 1)[1]))
                row["outcome"] = line.split(" ", 1)[0].lower()
            if "HGA: F=" in line and "capacity_line" not in row:  # the start-up line
                row["capacity_line"] = line.strip()[-300:]
        p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, 9)
        row["outcome"] = row.get("outcome", "") + " (killed at timeout)"
    end = time.time()
    row["rc"] = p.returncode
    row["wall_s"] = round(end - t0, 1)
    if "at" in row:
        row["exit_after_refusal_s"] = round(end - row.pop("at"), 1)
    if row.get("outcome") != "started":  # the cause is above the last line
        row["log_tail"] = [x.rstrip()[-300:] for x in log if "Error" in x or "hga" in x][-12:]
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fraction", type=float, default=0.8, help="of available RAM")
    ap.add_argument("--cases", nargs="+", default=["start", "refuse"])
    ap.add_argument("--timeout", type=int, default=420)
    ap.add_argument("--json")
    args = ap.parse_args()
    vm = psutil.virtual_memory()
    sizes = {"start": int(vm.available * args.fraction), "refuse": 2 * vm.total}
    rows = []
    for case in args.cases:
        rows.append(run_case(case, sizes[case], args.timeout))
        print("RESULT", json.dumps(rows[-1]), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(
                    {"ram_total": vm.total, "ram_available": vm.available, "rows": rows},
                    f,
                    indent=1,
                )


if __name__ == "__main__":
    main()
