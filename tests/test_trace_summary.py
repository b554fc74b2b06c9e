"""benchmarks/trace_summary.py on hand-made Chrome traces (no GPU): busy time is the union
of kernel intervals, idle the rest of their span, per step."""

import gzip
import json

import pytest

from benchmarks import trace_summary


def kernel(name, ts, dur, cat="kernel"):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}


EVENTS = [
    kernel("a", 0, 10),
    kernel("b", 5, 10),  # overlaps a: busy 0..15
    {"ph": "X", "cat": "cpu_op", "name": "aten::add", "ts": 0, "dur": 100},  # not GPU
    kernel("a", 40, 20),  # idle 15..40
    kernel("copy", 70, 10, cat="gpu_memcpy"),  # idle 60..70
]


def test_busy_idle_and_top_per_step():
    s = trace_summary.summarize(trace_summary.kernel_intervals(EVENTS), steps=2)
    assert s["span_us_per_step"] == 40.0  # 0..80 over 2 steps
    assert s["busy_us_per_step"] == 22.5  # 15 + 20 + 10
    assert s["idle_us_per_step"] == 17.5
    assert s["kernels_per_step"] == 2.0
    assert s["top"][0] == ("a", 15.0)


def test_reads_gzip_and_plain_traces(tmp_path):
    plain, packed = tmp_path / "w.pt.trace.json", tmp_path / "x.pt.trace.json.gz"
    plain.write_text(json.dumps({"traceEvents": EVENTS}))
    with gzip.open(packed, "wt") as f:
        json.dump(EVENTS, f)
    assert trace_summary.traces(str(tmp_path)) == [str(plain), str(packed)]
    for p in (plain, packed):
        assert len(trace_summary.kernel_intervals(trace_summary.load_events(str(p)))) == 4


def test_a_trace_without_kernels_is_refused():
    with pytest.raises(ValueError, match="no GPU kernels"):
        trace_summary.summarize([], steps=1)
