"""The soak's CI variant against the real server (scripts/soak.py --short): load, bad
input, clients that hang up, then kill -9 and a restart on the same disk_dir."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from devkit.bad_input import rows

pytestmark = pytest.mark.serve

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    from test_serve import free_port

    from devkit.model import embedded_model_dir

    embedded_model_dir()  # converted before the clock starts
    work = tmp_path_factory.mktemp("soak")
    out = work / "soak.json"
    cmd = [sys.executable, "-m", "scripts.soak", "--short", "--json", str(out)]
    cmd += ["--workdir", str(work), "--port", str(free_port())]
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}
    t0 = time.time()
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    seconds = time.time() - t0
    assert out.exists(), done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads(out.read_text())
    data["seconds"], data["stdout"] = seconds, done.stdout
    return data


def test_soak_kill_and_restart(report):
    r = report
    print(r["stdout"])
    assert r["requests"] >= 200 and r["by_kind"].get("near_max_len", 0) >= 2
    assert r["server_errors_5xx"] == 0
    assert r["unexpected"] == []  # every answer as it must be, bad input included
    # each HTTP row of the bad-input table was sent and got its status and message
    assert r["bad_input_4xx"] >= len(rows("http"))
    assert r["rss_growth"] <= 0.05
    for key in ("vllm_hga_disk_pool_bytes", "vllm_hga_host_pool_bytes", "vllm_hga_bank_bytes"):
        assert r["end"][key] == r["start"][key], key
    assert r["start"]["vllm_hga_disk_pool_bytes"] > 0  # the NVMe tier holds the K/V
    assert r["blocks_free_at_end"]
    assert r["greedy_same_after_load"] and r["greedy_same_after_restart"]
    restart = r["restart"]
    # vLLM's engine processes outlive a SIGKILLed API server (reported, then killed by the
    # soak as a supervisor would); what HGA owns must not block or leak either way
    assert restart["files_in_disk_dir_after_kill"] == []  # no stale files after kill -9
    assert restart["files_in_disk_dir_while_serving"] == []
    assert restart["pool_after_restart"] == r["start"]["vllm_hga_disk_pool_bytes"]
    assert r["tracebacks_during_load"] == 0  # bad input gets an answer, not a stack trace
    assert r["passed"]
    print(f"the soak's CI variant took {r['seconds']:.0f} s")  # a budget, not a test


def test_vllm_bench_serve_cli_starts():
    """The soak's bench step runs `vllm bench serve` through devkit.vllm_cli: vllm-cpu's
    CLI main (console script and `python -m vllm.entrypoints.cli.main` alike) looks up a
    distribution named "vllm" and fails before any subcommand starts."""
    cmd = [sys.executable, "-m", "devkit.vllm_cli", "bench", "serve", "--help=all"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "--random-input-len" in done.stdout and "--max-concurrency" in done.stdout
