"""HGA vs dense attention on real long documents: per-token NLL (nats), the gap, density.

Real vLLM engine (``--backend vllm``, the default): dense = vLLM's own attention
(``CPU_ATTN`` on CPU, ``FLASH_ATTN`` on a GPU: ``evalcommon.dense_backend``), HGA = our
backend, on the same checkpoint, the same token ids, teacher forced (prompt log-probs).
``--backend sim`` replays the same routing code on the same checkpoint under Hugging Face
transformers (``research.analysis``); it is for budget sweeps and agrees with the engine
(docs/QUALITY.md shows both on the default).

Context windows: each document is run once at ``--length`` tokens; the NLL of a shorter
context W is that of its first W positions.  This is exact, not an approximation: dense
and HGA attention are causal and HGA routes every query on its own (a token's output does
not depend on later tokens or on how the prompt is split; tests/test_layer.py and
tests/test_engine.py hold the backend to that).

Density (the paper's definition): real keys attended (sinks, local window, routed
groups, own chunk causal), summed over queries, heads and layers, over the dense causal
pairs sum_p (p+1).  Computed analytically and exactly from the config and the positions
(``research.analysis.density``; tests/test_quality.py checks it against the masks of
``devkit.reference``).  "active" = positions whose routing pool is non-empty, p >=
(F+L+1)*64: the only positions where HGA can differ from dense.

    python -m research.eval_quality                              # default config, 5 docs, 8K
    python -m research.eval_quality --config maxg='{"chunk_score": "max_group"}'
    python -m research.eval_quality --backend sim --sweep --plot docs/quality_sweep.png

A config whose JSON holds ``"oracle": "group"`` is, in the simulator only, the oracle at
that config's budget: the same sinks, local window and own chunk, and the same number of
routed groups per query and head, chosen by their true (dense) attention mass.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from research import evalcommon as ec

DOCS = ["devils_dictionary", "jargon_file", "gnu_coding_standards", "argparse_py", "pydecimal_py"]
WINDOWS = [2048, 4096, 8000]

# The paper's routing, every key spelled out (the package defaults differ: README).
PAPER = {
    "sink_chunks": 2,
    "local_chunks": 8,
    "topk_chunks": 20,
    "topk_groups": 32,
    "groups_per_query": 16,
    "chunk_score": "summary",
    "group_score": "mean",
}
# The shipped default's routing rule (F=1, L=2, max_group chunks, mean_std groups).
STD3 = {"chunk_score": "max_group", "group_score": "mean_std", "score_alpha": 3.0}


def _p(**kw):
    d = dict(PAPER, **kw)
    if "topk_groups" in kw:
        d.pop("groups_per_query")  # G = K_g // 2
    return d


def _n(g: int, **kw):
    """Default rule (F1, L2, std3) with G groups per query; K_c covers K_g = 2G groups."""
    return dict(
        {"sink_chunks": 1, "local_chunks": 2, "topk_chunks": g // 2, "topk_groups": 2 * g},
        **STD3,
        **kw,
    )


# Budget sweep: (label, config).  K_g = topk_groups; G = groups_per_query (K_g // 2).
SWEEP = {
    "paper F2 L8 Kc20 Kg32": _p(),
    "paper G8 (Kg16)": _p(topk_groups=16),
    "paper G32 (Kg64)": _p(topk_groups=64),
    "paper G64 (Kg128 Kc32)": _p(topk_groups=128, topk_chunks=32),
    "default G20": _n(20),
    "default F1 L2 G44": _n(44),
    "default G76": _n(76),
    "oracle paper G8": dict(_p(topk_groups=16), oracle="group"),
    "oracle paper G16": dict(_p(), oracle="group"),
    "oracle paper G32": dict(_p(topk_groups=64), oracle="group"),
    "oracle paper G64": dict(_p(topk_groups=128, topk_chunks=32), oracle="group"),
    "oracle default G44": dict(_n(44), oracle="group"),
    "paper Kc8": _p(topk_chunks=8),
    "paper Kc40": _p(topk_chunks=40),
    "paper L2": _p(local_chunks=2),
    "paper L16": _p(local_chunks=16),
    "paper F1": _p(sink_chunks=1),
    "paper F4": _p(sink_chunks=4),
}


def parse_configs(items: list[str]) -> dict[str, dict]:
    out = {}
    for item in items:
        name, _, blob = item.partition("=")
        out[name] = json.loads(blob) if blob else {}
    return out


def sim_suffix(backend: str, device: str) -> str:
    """Cache-key suffix: engine and replay NLLs (CPU or another device) are kept apart."""
    if backend == "vllm":
        return ""
    return "_sim" if device == "cpu" else f"_sim_{device}"


class Runner:
    """NLLs of (config, doc) through the engine or the simulator, cached on disk."""

    def __init__(
        self, backend: str, dtype: str, length: int, cache: ec.NLLCache, device: str = "cpu"
    ):
        self.backend, self.dtype, self.length, self.cache = backend, dtype, length, cache
        self.device = device
        self.tok = ec.tokenizer(dtype)
        self._sim = None

    def tokens(self, doc: str) -> list[int]:
        return ec.doc_tokens(self.tok, doc, self.length)

    def nlls(self, hga: dict | None, docs: list[str]) -> dict[str, list[float]]:
        backend = "HGA" if hga is not None else ec.dense_backend()
        key = ec.config_key(backend, hga, self.dtype) + sim_suffix(self.backend, self.device)
        got = {d: self.cache.get(key, d, self.length) for d in docs}
        todo = [d for d in docs if got[d] is None]
        # the engine batches every document into one run; the simulator goes one
        # document at a time, caching each as it finishes
        batches = [todo] if self.backend == "vllm" else [[d] for d in todo]
        for batch in (b for b in batches if b):
            clock = ec.Clock()
            fresh = (
                self._engine_nlls(backend, hga, batch)
                if self.backend == "vllm"
                else self._sim_nlls(hga, batch)
            )
            print(f"  {backend} {json.dumps(hga)}: {', '.join(batch)} in {clock()} s", flush=True)
            for d, nll in fresh.items():
                self.cache.put(
                    key,
                    d,
                    self.length,
                    nll,
                    {
                        "backend": backend,
                        "hga": hga,
                        "dtype": self.dtype,
                        "runner": self.backend,
                        "doc": d,
                        "seconds": clock(),
                    },
                )
                got[d] = nll
        return got

    def _engine_nlls(self, backend, hga, docs):
        if hga and any(hga.get(k) for k in ec.SIM_KEYS):
            raise SystemExit(
                "the oracle and research routers exist in the simulator only (--backend sim)"
            )
        llm = ec.make_llm(backend, hga, dtype=self.dtype)
        try:
            res = ec.prompt_nlls(llm, [self.tokens(d) for d in docs])
        finally:
            ec.close(llm)
        return dict(zip(docs, res))

    def _sim_nlls(self, hga, docs):
        if self.dtype != "float32":
            raise SystemExit("--backend sim runs in float32 only")
        if self._sim is None:
            from research.analysis import Analyzer

            self._sim = Analyzer(device=self.device)
        mode = "dense" if hga is None else ec.sim_mode(hga)
        return {d: self._sim.nll(self.tokens(d), mode)[0].tolist() for d in docs}


def evaluate(runner: Runner, configs: dict[str, dict], docs: list[str], windows: list[int]) -> dict:
    from research.analysis import density, first_routed_position

    dense = runner.nlls(None, docs)
    rows = []
    for name, hga in configs.items():
        cfg = ec.hga_cfg(hga)
        sparse = runner.nlls(hga, docs)
        start = first_routed_position(cfg)
        for W in windows:
            # NLL entries i predict token i+1 from positions 0..i: query position i.
            tot = {"n": 0, "d": 0.0, "h": 0.0, "na": 0, "da": 0.0, "ha": 0.0}
            per_doc = {}
            for d in docs:
                dn, hn = dense[d][: W - 1], sparse[d][: W - 1]
                act = slice(start, W - 1)
                g = sum(hn) / len(hn) - sum(dn) / len(dn)
                na = max(0, W - 1 - start)
                ga = (sum(hn[act]) - sum(dn[act])) / na if na else 0.0
                per_doc[d] = {
                    "dense": sum(dn) / len(dn),
                    "hga": sum(hn) / len(hn),
                    "gap": g,
                    "gap_active": ga,
                }
                tot["n"] += len(dn)
                tot["d"] += sum(dn)
                tot["h"] += sum(hn)
                tot["na"] += na
                tot["da"] += sum(dn[act])
                tot["ha"] += sum(hn[act])
            gaps = [v["gap"] for v in per_doc.values()]
            sd = (
                math.sqrt(
                    sum((x - sum(gaps) / len(gaps)) ** 2 for x in gaps) / max(1, len(gaps) - 1)
                )
                if len(gaps) > 1
                else 0.0
            )
            rows.append(
                {
                    "config": name,
                    "hga": hga,
                    "window": W,
                    "docs": len(docs),
                    "tokens": tot["n"],
                    "nll_dense": tot["d"] / tot["n"],
                    "nll_hga": tot["h"] / tot["n"],
                    "gap": (tot["h"] - tot["d"]) / tot["n"],
                    "gap_doc_sd": sd,
                    "active_tokens": tot["na"],
                    "gap_active": (tot["ha"] - tot["da"]) / tot["na"] if tot["na"] else 0.0,
                    "density": density(W, cfg, n_layers=30),
                    "density_active": (
                        density(W, cfg, n_layers=30, positions=range(start, W))
                        if start < W
                        else 1.0
                    ),
                    "per_doc": per_doc,
                }
            )
    return {
        "backend": runner.backend,
        "dtype": runner.dtype,
        "length": runner.length,
        "docs": docs,
        "windows": windows,
        "rows": rows,
    }


def report(res: dict) -> str:
    header = [
        "config",
        "ctx",
        "dense nll",
        "HGA nll",
        "gap",
        "gap (active)",
        "density",
        "density (active)",
    ]
    rows = [
        [
            r["config"],
            r["window"],
            r["nll_dense"],
            r["nll_hga"],
            r["gap"],
            r["gap_active"],
            f"{100 * r['density']:.1f}%",
            f"{100 * r['density_active']:.1f}%",
        ]
        for r in res["rows"]
    ]
    head = (
        f"backend={res['backend']} dtype={res['dtype']} docs={', '.join(res['docs'])} "
        f"(first {res['length']} tokens each; shorter contexts are prefixes)"
    )
    per = ["", "per document (largest context):"]
    W = max(res["windows"])
    for r in res["rows"]:
        if r["window"] != W:
            continue
        per.append(
            f"  {r['config']}: "
            + ", ".join(f"{d} {v['gap']:+.4f}" for d, v in r["per_doc"].items())
        )
    return head + "\n" + ec.md_table(header, rows) + "\n" + "\n".join(per)


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for W in res["windows"]:
        rs = [r for r in res["rows"] if r["window"] == W]
        for kind, marker in (("hga", "o"), ("oracle", "x")):
            sel = [r for r in rs if bool(r["hga"].get("oracle")) == (kind == "oracle")]
            if not sel:
                continue
            sel.sort(key=lambda r: r["density"])
            lab = f"{W} tokens" + (", oracle" if kind == "oracle" else "")
            pts = ax.scatter(
                [100 * r["density"] for r in sel], [r["gap"] for r in sel], marker=marker, label=lab
            )
            if kind == "oracle":  # the oracle curve: same window, growing G
                ax.plot(
                    [100 * r["density"] for r in sel if "paper" in r["config"]],
                    [r["gap"] for r in sel if "paper" in r["config"]],
                    color=pts.get_facecolor()[0] if len(pts.get_facecolor()) else None,
                    lw=0.8,
                )
            if W == max(res["windows"]):
                for r in sel:
                    ax.annotate(
                        r["config"].replace("oracle ", "o:").split(" (")[0],
                        (100 * r["density"], r["gap"]),
                        fontsize=5.5,
                        xytext=(3, 2),
                        textcoords="offset points",
                    )
    ax.axhline(0.02, color="grey", ls="--", lw=0.8)
    ax.set_xlabel("density (% of dense causal pairs, all layers)")
    ax.set_ylabel("NLL gap vs dense (nats/token)")
    ax.set_title(
        f"HGA budget sweep, SmolLM2-135M, {len(res['docs'])} docs "
        f"({'offline replay' if res['backend'] == 'sim' else 'vLLM engine'}, "
        f"{res['dtype']})",
        fontsize=9,
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--backend", choices=["vllm", "sim"], default="vllm")
    ap.add_argument("--dtype", choices=ec.DTYPES, default="float32")
    ap.add_argument("--docs", nargs="+", default=DOCS)
    ap.add_argument("--length", type=int, default=8000)
    ap.add_argument("--windows", type=int, nargs="+", default=WINDOWS)
    ap.add_argument(
        "--config",
        action="append",
        default=[],
        help="NAME=JSON of hga keys (repeatable); default: default={}",
    )
    ap.add_argument("--sweep", action="store_true", help="add the budget sweep configs")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--plot", help="write a nats-vs-density PNG here")
    ap.add_argument(
        "--device",
        default="cpu",
        help="--backend sim only: run the replay on this torch device (e.g. cuda)",
    )
    ap.add_argument("--cache", help="NLL cache folder (default ~/.cache/vllm-hga/eval)")
    ap.add_argument(
        "--cached-only",
        action="store_true",
        help="report only configs whose NLLs are all in the cache (no runs)",
    )
    ap.add_argument(
        "--from-json",
        metavar="FILE",
        help="no runs: print (and --plot) the results a --json run wrote",
    )
    args = ap.parse_args()
    if args.backend == "vllm" and args.device != "cpu":
        ap.error("--device is for --backend sim (the engine picks its own device)")
    if args.from_json:  # e.g. results brought back from a GPU replay
        res = json.loads(Path(args.from_json).read_text())
        print(report(res))
        if args.plot:
            plot(res, args.plot)
        return

    configs = (
        parse_configs(args.config) if args.config else {} if args.sweep else {"default": {}}
    )  # the sweep holds the default
    if args.sweep:
        configs.update({k: v for k, v in SWEEP.items() if k not in configs})
    windows = sorted(w for w in args.windows if w <= args.length)
    runner = Runner(args.backend, args.dtype, args.length, ec.NLLCache(args.cache), args.device)
    if args.cached_only:
        suffix = sim_suffix(args.backend, args.device)
        have = lambda h: all(  # noqa: E731
            runner.cache.get(ec.config_key("HGA", h, args.dtype) + suffix, d, args.length)
            is not None
            for d in args.docs
        )
        skipped = [n for n, h in configs.items() if not have(h)]
        configs = {n: h for n, h in configs.items() if have(h)}
        if skipped:
            print(f"not in the cache, left out: {', '.join(skipped)}")
    res = evaluate(runner, configs, args.docs, windows)
    print(report(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    if args.plot:
        plot(res, args.plot)


if __name__ == "__main__":
    main()
