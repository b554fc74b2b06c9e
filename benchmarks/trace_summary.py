"""Where a profiled engine step goes on the GPU: busy vs idle time and the top kernels.

Reads the torch-profiler Chrome traces vLLM's worker writes (``gpu_e2e --profile-dir``;
``*.json`` or ``*.json.gz``) and, over the span of the GPU kernels, reports the union of
their busy intervals, the idle rest, and device time by kernel name, all per step:

    python -m benchmarks.trace_summary DIR --steps 8

An idle share that matches a step's unexplained time says the GPU waits on the host (the
step is CPU or sync bound); busy time in kernels other than the profiled layer's says
where else the step goes.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os


def load_events(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def kernel_intervals(events: list[dict]) -> list[tuple[float, float, str]]:
    """(start µs, end µs, name) of every GPU kernel and memcpy/memset in the trace."""
    out = []
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"):
            out.append((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)), e["name"]))
    return sorted(out)


def host_events(events: list[dict]) -> list[tuple[str, str, float]]:
    """(category, name, duration µs) of the host-side ops and annotations in the trace:
    what the CPU did around the kernels (aten ops launched eagerly, vLLM's annotations)."""
    out = []
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in ("cpu_op", "user_annotation", "cuda_runtime"):
            out.append((e["cat"], e["name"], float(e.get("dur", 0))))
    return out


def host_summary(host: list[tuple[str, str, float]], steps: int, top: int = 25) -> dict:
    """Per step and category: the most expensive names, with their call counts."""
    time_of, calls_of = collections.Counter(), collections.Counter()
    for cat, name, dur in host:
        time_of[cat, name] += dur
        calls_of[cat, name] += 1
    result = collections.defaultdict(list)
    for (cat, name), t in time_of.most_common():
        if len(result[cat]) < top:
            result[cat].append(
                (name[:90], round(t / steps, 1), round(calls_of[cat, name] / steps, 1))
            )
    return dict(sorted(result.items()))


def busy_time(intervals: list[tuple[float, float, str]]) -> float:
    """Length of the union of the intervals (overlapping kernels count once)."""
    total, end = 0.0, float("-inf")
    for a, b, _ in intervals:
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def summarize(intervals: list[tuple[float, float, str]], steps: int, top: int = 15) -> dict:
    if not intervals:
        raise ValueError("no GPU kernels in the trace (was the CUDA activity recorded?)")
    span = intervals[-1][1] - intervals[0][0]
    busy = busy_time(intervals)
    by_name = collections.Counter()
    for a, b, name in intervals:
        by_name[name] += b - a
    return {
        "steps": steps,
        "span_us_per_step": round(span / steps, 1),
        "busy_us_per_step": round(busy / steps, 1),
        "idle_us_per_step": round((span - busy) / steps, 1),
        "kernels_per_step": round(len(intervals) / steps, 1),
        "top": [(name[:90], round(t / steps, 1)) for name, t in by_name.most_common(top)],
    }


def traces(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    found = glob.glob(os.path.join(path, "**", "*.json*"), recursive=True)
    return sorted(p for p in found if p.endswith((".json", ".json.gz")))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("path", help="a trace file or a directory of them")
    ap.add_argument("--steps", type=int, required=True, help="engine steps the trace covers")
    ap.add_argument("--json", help="write the summaries here")
    args = ap.parse_args()
    results = {}
    for p in traces(args.path):
        events = load_events(p)
        intervals = kernel_intervals(events)
        if not intervals:  # the front end's CPU-only trace
            continue
        results[p] = summarize(intervals, args.steps)
        s = results[p]
        s["host"] = host_summary(host_events(events), args.steps)
        print(
            f"{p}: per step span {s['span_us_per_step']} µs, busy {s['busy_us_per_step']}, "
            f"idle {s['idle_us_per_step']}, {s['kernels_per_step']} kernels"
        )
        for name, t in s["top"]:
            print(f"  {t:>9.1f} µs  {name}")
        for cat, rows in s["host"].items():
            print(f"  host {cat} (µs per step, calls per step):")
            for name, t, n in rows[:12]:
                print(f"  {t:>9.1f} µs {n:>7.1f}x  {name}")
    if not results:
        raise SystemExit(f"no trace with GPU kernels under {args.path}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
