"""benchmarks/gpu_capacity.py, the capacity scenario of issue 14, on CPU.

The helpers are checked without an engine; the engine test runs the script itself, dense
(CPU_ATTN) then HGA, each in its own process as on the GPU, with real engines and the
embedded SmolLM2-135M (nothing of vLLM is mocked).

What is true on CPU, and so asserted: vLLM's CPU KV budget (``kv_cache_memory_bytes``) is
the device budget of both backends.  Dense pages hold full K/V (23,040 B/token for
SmolLM2-135M); HGA's hold summaries (1,800 B/token) and its full K/V goes to a host pool
sized by ``host_kv_bytes`` (the script's ``auto``: every request of the run), so with the
same budget the HGA engine's block count (the smaller of the two) holds all requests while
dense holds fewer than two, and runs them one after another.  The CPU timings say
nothing about the GPU scenario (docs/BENCHMARKS.md §2: HGA decodes slower on CPU).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_capacity as cap
from benchmarks.gpu_e2e import QWEN3_30B_A3B

ROOT = Path(__file__).resolve().parents[1]
REQUESTS, CONTEXT, NEW = 3, 600, 8
KV_BYTES = 24 * 2**20  # dense: 1.33 requests of 672 tokens (CPU_ATTN blocks of 128)


def test_percentile_matches_linear_interpolation():
    xs = [4.0, 1.0, 3.0, 2.0]
    assert cap.percentile(xs, 50) == 2.5
    assert cap.percentile(xs, 0) == 1.0 and cap.percentile(xs, 100) == 4.0
    assert cap.percentile(xs, 99) == pytest.approx(3.97)
    assert cap.percentile([7.0], 99) == 7.0


def test_auto_host_pool():
    qwen = QWEN3_30B_A3B
    assert cap.kv_bytes_per_token(qwen, "auto") == 48 * 4 * 2 * 128 * 2  # bf16: 96 KiB
    # 16 x 32K (+128 new +64): 515 blocks each, plus the null block: 48.3 GiB
    host = cap.auto_host_kv_bytes(qwen, "auto", 16, 32768 + 128 + 64)
    assert host == (16 * 515 + 1) * 64 * 98304
    assert 48 * 2**30 < host < 49 * 2**30


def test_write_model_dir_gives_the_shape_a_tokenizer(tmp_path):
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    (tok / "model.safetensors").write_text("weights are not copied")
    out = tmp_path / "shape"
    cap.main(["--write-model-dir", str(out), "--tokenizer-from", str(tok)])
    assert json.loads((out / "config.json").read_text()) == QWEN3_30B_A3B
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "tokenizer.json"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no tokenizer files"):
        cap.write_model_dir(str(tmp_path / "bad"), str(tmp_path / "empty"))


def test_without_backend_strips_every_form():
    argv = ["--out", "x.json", "--backend", "CPU_ATTN", "HGA", "--new", "8", "--backend=HGA"]
    assert cap.without_backend(argv) == ["--out", "x.json", "--new", "8"]


def test_table_gives_hga_wall_over_dense_of_the_same_scenario(tmp_path, capsys):
    base = dict(requests=16, context=32768, new_tokens=128, gpu_memory_utilization=0.3)
    rows = [
        dict(
            base,
            backend="FLASH_ATTN",
            wall_s=100.0,
            output_tok_s=20.48,
            ttft_p50_s=40.0,
            ttft_p99_s=90.0,
            capacity_tokens=117696,
            max_concurrent=3,
        ),
        dict(
            base,
            backend="HGA",
            wall_s=50.0,
            output_tok_s=40.96,
            ttft_p50_s=20.0,
            ttft_p99_s=30.0,
            capacity_tokens=600000,
            max_concurrent=16,
        ),
        dict(
            base,
            backend="HGA",
            context=131072,
            wall_s=10.0,
            output_tok_s=51.2,
            ttft_p50_s=5.0,
            ttft_p99_s=9.0,
            capacity_tokens=None,
            max_concurrent=4,
        ),
    ]
    out = tmp_path / "rows.json"
    out.write_text(json.dumps(rows))
    cap.main(["--print", str(out)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4
    assert lines[1].split() == "FLASH_ATTN 16 32768 128 100.00 20.48 40.00 90.00 117696 3 -".split()
    assert lines[2].split()[-1] == "0.50"
    assert lines[3].split()[-3:] == ["-", "4", "-"]  # no capacity, no dense row at 128K


@pytest.mark.engine
def test_dense_queues_where_hga_runs_every_request(tmp_path):
    pytest.importorskip("vllm")
    from devkit.model import embedded_model_dir

    out = tmp_path / "cap.json"
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.gpu_capacity",
        "--out",
        str(out),
        "--backend",
        "CPU_ATTN",
        "HGA",
        "--model",
        str(embedded_model_dir()),
        "--requests",
        str(REQUESTS),
        "--context",
        str(CONTEXT),
        "--new",
        str(NEW),
        "--kv-cache-bytes",
        str(KV_BYTES),
    ]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [r["backend"] for r in rows] == ["CPU_ATTN", "HGA"]
    need = REQUESTS * (CONTEXT + NEW)
    for r in rows:
        for key in (
            "backend",
            "hga",
            "requests",
            "context",
            "new_tokens",
            "gpu_memory_utilization",
            "kv_cache_bytes",
            "max_num_seqs",
            "startup_s",
            "wall_s",
            "output_tok_s",
            "ttft_p50_s",
            "ttft_p99_s",
            "tpot_mean_s",
            "capacity_tokens",
            "max_concurrent",
            "card",
            "date",
            "vllm",
        ):
            assert key in r, key
        assert (r["requests"], r["context"], r["new_tokens"]) == (REQUESTS, CONTEXT, NEW)
        assert r["card"] == "cpu" and r["gpu_memory_utilization"] is None
        assert r["kv_cache_bytes"] == KV_BYTES and r["max_num_seqs"] >= REQUESTS
        assert r["wall_s"] > 0 and 0 < r["ttft_p50_s"] <= r["ttft_p99_s"] <= r["wall_s"]
        assert r["output_tok_s"] == pytest.approx(REQUESTS * NEW / r["wall_s"], rel=1e-3)
        assert r["tpot_mean_s"] > 0
    dense, hga = rows
    # dense: the budget holds fewer than all requests, so they queue
    assert dense["hga"] is None and dense["capacity_tokens"] < need
    assert dense["max_concurrent"] < REQUESTS
    # HGA: the same device budget holds summaries only; the host pool holds every request
    assert hga["hga"]["host_kv_bytes"] >= need * hga["hga_plan"]["host_bytes_per_token"]
    assert hga["hga_plan"]["device_bytes_per_token"] * 12 < hga["hga_plan"]["host_bytes_per_token"]
    assert hga["capacity_tokens"] >= need and hga["block_size"] == 64
    assert hga["max_concurrent"] == REQUESTS
    report = hga["hga_report"]  # rank 0's tiers after the run: the pool, no bank on CPU
    assert report["pool"] >= need * hga["hga_plan"]["host_bytes_per_token"]
    assert report["banks"] == 0
    # the printed table ends the run: both rows and HGA's wall-time ratio
    table = run.stdout.strip().splitlines()[-2:]
    assert table[0].split()[0] == "CPU_ATTN" and table[1].split()[0] == "HGA"
    assert float(table[1].split()[-1]) == pytest.approx(hga["wall_s"] / dense["wall_s"], abs=0.01)
