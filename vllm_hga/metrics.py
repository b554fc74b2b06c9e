"""HGA's own counters: what attention read, how dense it was, how full the tiers are.

Workers (where attention runs) accumulate counters on the device without synchronising
and, at most once a second, write a snapshot file into ``$HGA_METRICS_DIR`` (created by
the API-server process at start-up, inherited by every process it spawns).  The API
server registers a Prometheus collector that reads those snapshots on each scrape, so
``/metrics`` shows ``vllm_hga_*`` series next to vLLM's own.  Workers also log a line.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path

import torch

from .config import HGAConfigError, require_writable_dir

ENV_DIR = "HGA_METRICS_DIR"
SNAPSHOT_EVERY_S = 1.0
LOG_EVERY_S = 30.0

# name -> (help, prometheus type)
SERIES = {
    "steps": ("model steps with HGA attention", "counter"),
    "query_tokens": ("query tokens attended (summed over layers)", "counter"),
    "keys_attended": ("real keys attended, summed over queries, heads and layers", "counter"),
    "dense_pairs": ("keys dense causal attention would attend, same sum", "counter"),
    "kv_bytes_read": ("bytes of K/V attention read from the K/V tiers", "counter"),
    "summary_bytes_written": ("bytes of chunk/group summaries written", "counter"),
    "host_pool_bytes": ("bytes allocated for full K/V in host RAM", "gauge"),
    "disk_pool_bytes": ("bytes allocated for full K/V in files (NVMe tier)", "gauge"),
    "bank_hits": (
        "chunks a decode step needed that were in the device bank (per layer)",
        "counter",
    ),
    "bank_misses": ("chunks a decode step needed that were not in the device bank", "counter"),
    "bank_bytes_fetched": (
        "bytes of K/V copied from the host pool into the device bank",
        "counter",
    ),
    "bank_bytes": ("bytes allocated for the device bank (all layers)", "gauge"),
}


class WorkerMetrics:
    """Per-engine accumulators (owned by tiers.EngineTiers).

    ``add`` takes device tensors or ints; no host sync."""

    def __init__(self) -> None:
        self._device: dict[str, torch.Tensor] = {}
        self._host: dict[str, float] = {k: 0.0 for k in SERIES}
        self._last_snapshot = 0.0
        self._last_log = time.monotonic()
        self._logged: dict[str, float] = dict(self._host)
        self._write_failed = False  # a failed snapshot write is logged once

    def add(self, name: str, value) -> None:
        if isinstance(value, torch.Tensor):
            self.accumulator(name, value.device).add_(value.to(torch.float64))
        else:
            self._host[name] += float(value)

    def accumulator(self, name: str, device: torch.device) -> torch.Tensor:
        """The float64 0-dim device total of `name` (kernels may add into it in place)."""
        acc = self._device.get(name)
        if acc is None or acc.device != torch.empty(0, device=device).device:
            acc = self._device[name] = torch.zeros((), dtype=torch.float64, device=device)
        return acc

    def set(self, name: str, value: float) -> None:
        self._host[name] = float(value)

    def totals(self) -> dict[str, float]:
        """Current totals (synchronises the device: call off the hot path)."""
        out = dict(self._host)
        for name, acc in self._device.items():
            out[name] += float(acc.item())
        return out

    def end_step(self) -> None:
        """Once per model step: maybe write a snapshot / a log line (rate limited)."""
        self._host["steps"] += 1
        now = time.monotonic()
        if now - self._last_snapshot < SNAPSHOT_EVERY_S:
            return
        self._last_snapshot = now
        totals = self.totals()
        try:
            write_snapshot(totals)
        except OSError as e:  # a full or vanished metrics directory must not stop serving
            self._log_write_failure(e)
        if now - self._last_log >= LOG_EVERY_S:
            self._log(totals, now)

    def _log_write_failure(self, error: OSError) -> None:
        if self._write_failed:
            return
        self._write_failed = True
        from vllm.logger import init_logger

        init_logger("vllm.hga").warning(
            "HGA: cannot write the metrics snapshot into %s=%s (%s); serving goes on, "
            "/metrics keeps the last snapshot (logged once)",
            ENV_DIR,
            os.environ.get(ENV_DIR),
            error.strerror or error,
        )

    def _log(self, totals: dict[str, float], now: float) -> None:
        from vllm.logger import init_logger

        d = {k: totals[k] - self._logged.get(k, 0.0) for k in totals}
        steps = max(d["steps"], 1.0)
        init_logger("vllm.hga").info(
            "HGA: density %.2f%%, %.1f KiB K/V read per step, host pool %.2f GiB, "
            "disk pool %.2f GiB, device bank %.2f GiB (hit rate %.1f%%, %.1f KiB fetched per "
            "step)",
            100 * density(d),
            d["kv_bytes_read"] / steps / 1024,
            totals["host_pool_bytes"] / 2**30,
            totals["disk_pool_bytes"] / 2**30,
            totals["bank_bytes"] / 2**30,
            100 * bank_hit_rate(d),
            d["bank_bytes_fetched"] / steps / 1024,
        )
        self._logged, self._last_log = totals, now


def density(totals: dict[str, float]) -> float:
    return totals["keys_attended"] / totals["dense_pairs"] if totals["dense_pairs"] else 0.0


def bank_hit_rate(totals: dict[str, float]) -> float:
    seen = totals["bank_hits"] + totals["bank_misses"]
    return totals["bank_hits"] / seen if seen else 0.0


def write_snapshot(totals: dict[str, float]) -> None:
    directory = os.environ.get(ENV_DIR)
    if not directory or not os.path.isdir(directory):
        return
    path = Path(directory) / f"worker-{os.getpid()}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(totals))
    os.replace(tmp, path)


def read_snapshots(directory: str) -> dict[str, float]:
    """Sum of all workers' latest snapshots: one file per worker process, so with tensor
    or pipeline parallelism every rank's counters add up (each rank counts its own KV
    heads and layers; ``steps`` counts rank-steps).  A malformed one is skipped with a
    warning; so is the file of a worker that no longer runs (a server killed with SIGKILL
    and restarted on the same directory must not count its dead workers' pools)."""
    total = {k: 0.0 for k in SERIES}
    for path in Path(directory).glob("worker-*.json"):
        if not _writer_alive(path):
            continue
        try:
            text = path.read_text()
        except OSError:  # a worker replaced or removed it meanwhile
            continue
        values = parse_snapshot(text)
        if values is None:
            _warn_malformed(path)
            continue
        for k in total:
            total[k] += values.get(k, 0.0)
    return total


def _writer_alive(path: Path) -> bool:
    """Whether the worker process that writes `path` (worker-<pid>.json) still exists."""
    pid = path.stem.removeprefix("worker-")
    if not pid.isdigit():
        return True  # not ours to judge: parsed (and warned about) like any snapshot
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        pass
    return True


def parse_snapshot(text: str) -> dict[str, float] | None:
    """A snapshot's series, or None unless it is a JSON object of finite numbers."""
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    values = {k: data[k] for k in SERIES if k in data}
    ok = all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        for v in values.values()
    )
    return {k: float(v) for k, v in values.items()} if ok else None


_warned_paths: set[str] = set()


def _warn_malformed(path: Path) -> None:
    if str(path) in _warned_paths:  # a scrape every few seconds: say it once per file
        return
    _warned_paths.add(str(path))
    from vllm.logger import init_logger

    init_logger("vllm.hga").warning(
        "HGA: skipping malformed metrics snapshot %s (not a JSON object of numbers)", path
    )


class _Collector:
    def __init__(self, directory: str) -> None:
        self.directory = directory

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        totals = read_snapshots(self.directory)
        for name, (doc, kind) in SERIES.items():
            family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            yield family(f"vllm_hga_{name}", doc, value=totals[name])
        yield GaugeMetricFamily(
            "vllm_hga_density", "keys_attended / dense_pairs", value=density(totals)
        )
        yield GaugeMetricFamily(
            "vllm_hga_bank_hit_rate",
            "bank_hits / (bank_hits + bank_misses), since start",
            value=bank_hit_rate(totals),
        )


_registered = False
RAY_CARRY = "VLLM_RAY_EXTRA_ENV_VARS_TO_COPY"  # vLLM's list of extra variables Ray workers get


def carry_to_ray_workers(name: str) -> None:
    """Ray workers get the driver's environment only for the variables vLLM copies; add
    ours, so ranks under ``--distributed-executor-backend ray`` write snapshots too."""
    names = [n for n in os.environ.get(RAY_CARRY, "").split(",") if n.strip()]
    if name not in names:
        os.environ[RAY_CARRY] = ",".join([*names, name])


def check_metrics_dir(directory: str) -> None:
    """$HGA_METRICS_DIR, when the user sets it, must be a writable directory: refused at
    start-up, not found out by the first snapshot write."""
    fix = f"Create it or make it writable, or unset {ENV_DIR} (HGA then makes a private one)."
    require_writable_dir(directory, f"{ENV_DIR}=", fix, "is not a directory")


def setup_in_api_process() -> None:
    """Called once at start-up in the process that serves /metrics (before spawning)."""
    global _registered
    if _registered:
        return
    if os.environ.get(ENV_DIR):
        check_metrics_dir(os.environ[ENV_DIR])
    else:
        try:
            os.environ[ENV_DIR] = tempfile.mkdtemp(prefix="vllm-hga-metrics-")
        except OSError as e:
            raise HGAConfigError(
                f"hga: cannot make a metrics directory in {tempfile.gettempdir()} "
                f"({e.strerror}); set {ENV_DIR} to a writable directory"
            ) from None
    carry_to_ray_workers(ENV_DIR)
    try:
        from prometheus_client import REGISTRY

        REGISTRY.register(_Collector(os.environ[ENV_DIR]))
    except Exception:  # prometheus_client missing: metrics stay in logs and snapshots
        pass
    _registered = True
