"""Metrics faults: a snapshot that cannot be written or read never stops serving or
/metrics, and an unusable metrics directory is refused at start-up."""

from __future__ import annotations

import json
import logging
import os
import subprocess

import pytest

from devkit.bad_input import row
from vllm_hga import metrics
from vllm_hga.config import HGAConfigError
from vllm_hga.metrics import SERIES, WorkerMetrics, read_snapshots


@pytest.fixture
def warnings_of_hga(caplog):
    """The records of the "vllm.hga" logger, each once (vLLM's logging config may stop
    it propagating to the root logger that caplog listens on, so listen on it too)."""
    pytest.importorskip("vllm")
    log = logging.getLogger("vllm.hga")
    log.addHandler(caplog.handler)
    yield lambda: list({id(r): r.getMessage() for r in caplog.records}.values())
    log.removeHandler(caplog.handler)


def test_failed_snapshot_write_is_logged_once(tmp_path, monkeypatch, warnings_of_hga):
    monkeypatch.setenv(metrics.ENV_DIR, str(tmp_path))
    # the snapshot's temporary name is taken by a directory: every write fails (even as root)
    (tmp_path / f"worker-{os.getpid()}.tmp").mkdir()
    m = WorkerMetrics()
    for _ in range(3):
        m._last_snapshot = 0.0  # let every step try to write
        m.end_step()  # does not raise
    assert m.totals()["steps"] == 3
    failures = [m for m in warnings_of_hga() if "cannot write the metrics" in m]
    assert len(failures) == 1 and "serving goes on" in failures[0]
    assert row("metrics-write-fails").answer.startswith("logged once")


@pytest.fixture
def live_pids():
    """Pids of running processes (snapshots of dead workers are skipped, not parsed)."""
    procs = [subprocess.Popen(["sleep", "60"]) for _ in range(4)]
    yield [os.getpid()] + [p.pid for p in procs]
    for p in procs:
        p.kill()
        p.wait()


def test_malformed_snapshot_is_skipped(tmp_path, warnings_of_hga, live_pids):
    good = {k: 1.0 for k in SERIES}
    texts = [json.dumps(good), '{"steps": "many"}', "[1, 2]", '{"steps": 1', '{"steps": NaN}']
    for pid, text in zip(live_pids, texts):  # the last three: wrong type, half written, NaN
        (tmp_path / f"worker-{pid}.json").write_text(text)
    for _ in range(2):  # one warning per file, not per scrape
        assert read_snapshots(str(tmp_path)) == good
    skipped = [m for m in warnings_of_hga() if "malformed" in m]
    assert len(skipped) == 4 and all(f"worker-{live_pids[0]}" not in m for m in skipped)


def test_snapshots_of_dead_workers_are_not_counted(tmp_path):
    """A server killed with SIGKILL leaves its workers' files; the restarted server on
    the same directory counts only its own."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    one = {k: 1.0 for k in SERIES}
    (tmp_path / f"worker-{dead.pid}.json").write_text(json.dumps(one))
    (tmp_path / f"worker-{os.getpid()}.json").write_text(json.dumps(one))
    assert read_snapshots(str(tmp_path)) == one


def test_unusable_metrics_dir_is_refused_at_start_up(tmp_path, monkeypatch):
    a_file = tmp_path / "metrics"
    a_file.write_text("")
    monkeypatch.setenv(metrics.ENV_DIR, str(a_file))
    monkeypatch.setattr(metrics, "_registered", False)
    with pytest.raises(HGAConfigError) as err:
        metrics.setup_in_api_process()
    assert row("metrics-dir").answer in str(err.value) and metrics.ENV_DIR in str(err.value)
    metrics.check_metrics_dir(str(tmp_path))  # a writable directory is fine
