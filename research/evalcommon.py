"""Shared helpers of the quality scripts (research.eval_quality, research.niah,
benchmarks.bench_cpu) and tests/test_quality.py.

The real vLLM engine, the embedded SmolLM2-135M-Instruct checkpoint, real documents
(``devkit.texts``).  vLLM spawns its engine core: call these from inside
``if __name__ == "__main__":`` (or a pytest test).
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

MAX_LEN = 8192
DTYPES = ("float32", "bfloat16")


def model_dir(dtype: str = "float32") -> str:
    from devkit.model import embedded_model_dir

    return str(embedded_model_dir(dtype=dtype))


def dense_backend() -> str:
    """vLLM's own dense attention on this machine: FlashAttention 3 on a GPU, else CPU_ATTN.

    Asks vLLM's platform (NVML), not torch.cuda: CUDA initialised in this process would
    stop vLLM from forking its engine core."""
    from vllm.platforms import current_platform

    return "FLASH_ATTN" if current_platform.is_cuda() else "CPU_ATTN"


def make_llm(
    backend: str,
    hga: dict | None = None,
    dtype: str = "float32",
    max_model_len: int = MAX_LEN,
    **kw,
):
    """One engine: backend dense_backend() (vLLM's own dense attention) or "HGA"."""
    from vllm import LLM

    extra = {"hga": dict(hga or {})} if backend == "HGA" else {}
    kw.setdefault("kv_cache_memory_bytes", 1 << 30)
    return LLM(
        model=model_dir(dtype),
        attention_backend=backend,
        max_model_len=max_model_len,
        enforce_eager=True,
        additional_config=extra,
        seed=0,
        **kw,
    )


def close(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def tokenizer(dtype: str = "float32"):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir(dtype))


def doc_tokens(tok, name: str, n: int) -> list[int]:
    """The first n tokens of document `name` (no BOS: the tokenizer adds none)."""
    from devkit.texts import load_text

    ids = tok.encode(load_text(name))
    if len(ids) < n:
        raise ValueError(f"{name} has only {len(ids)} tokens, {n} wanted")
    return ids[:n]


def prompt_nlls(llm, prompts: list[list[int]]) -> list[list[float]]:
    """Teacher-forced NLL (nats) of tokens 1.. of each prompt, from vLLM prompt logprobs."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    sp = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp, use_tqdm=False)
    result = []
    for p, out in zip(prompts, outs):
        lps = out.prompt_logprobs[1:]
        result.append([-lp[t].logprob for t, lp in zip(p[1:], lps)])
    return result


def hga_cfg(hga: dict):
    """The HGAConfig of a config entry ("oracle" is not a config key: see sim_mode)."""
    from vllm_hga.config import HGAConfig

    return HGAConfig.from_mapping({k: v for k, v in hga.items() if k not in SIM_KEYS})


# config-entry keys that only the replay reads: "oracle" (analysis.Oracle) and "router"
# (a research router, analysis.research_router: {"kind": ..., other parameters}),
# "router_layers" (the router in these layers only, the config's own routing elsewhere)
SIM_KEYS = ("oracle", "router", "router_layers")


def sim_mode(hga: dict):
    """analysis mode of a config entry: HGA routing; with ``"oracle": "group"`` (or
    "token") exact top-k over the true attention at that config's budget; with
    ``"router": {...}`` a research router (``analysis.research_router``), in the layers of
    ``"router_layers"`` only when given.  Replay only."""
    from research.analysis import Oracle, PerLayer, research_router

    cfg = hga_cfg(hga)
    if hga.get("oracle"):
        return Oracle(cfg, hga["oracle"])
    if hga.get("router"):
        mode = (cfg, research_router(**hga["router"]))
        if hga.get("router_layers") is not None:  # the router in these layers only
            return PerLayer(cfg, {i: mode for i in hga["router_layers"]})
        return mode
    return cfg


def config_key(backend: str, hga: dict | None, dtype: str) -> str:
    """Cache key of an engine/simulator run.  HGA keys hash the *resolved* config (every
    field), so a change of the defaults never reuses results of the old defaults."""
    h = None
    if backend == "HGA":
        from vllm_hga.config import HGAConfig

        extra = {k: v for k, v in (hga or {}).items() if k in SIM_KEYS}
        cfg = HGAConfig.from_mapping({k: v for k, v in (hga or {}).items() if k not in SIM_KEYS})
        h = {**{k: v for k, v in cfg.as_dict().items() if k != "preset"}, **extra}
        if cfg.group_score != "mean_std":
            h.pop("score_alpha")  # only mean_std reads it
    blob = json.dumps({"b": backend, "h": h, "d": dtype}, sort_keys=True, default=list)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


class NLLCache:
    """Per-token NLLs on disk, keyed by (backend, hga config, dtype, document, length),
    so that the dense baseline is computed once and re-runs skip finished cells.
    Delete the folder (default ~/.cache/vllm-hga/eval) to recompute."""

    def __init__(self, root: str | Path | None = None):
        if root is None:
            env = os.environ.get("VLLM_HGA_CACHE")
            root = Path(env).expanduser() if env else Path.home() / ".cache" / "vllm-hga"
            root = root / "eval"
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str, doc: str, n: int) -> Path:
        return self.root / f"{key}_{doc}_{n}.json"

    def get(self, key: str, doc: str, n: int) -> list[float] | None:
        try:
            return json.loads(self._path(key, doc, n).read_text())["nll"]
        except (OSError, ValueError, KeyError):
            return None

    def put(self, key: str, doc: str, n: int, nll: list[float], meta: dict[str, Any]) -> None:
        tmp = self._path(key, doc, n).with_suffix(".tmp")
        tmp.write_text(json.dumps({"meta": meta, "nll": nll}))
        os.replace(tmp, self._path(key, doc, n))


class Clock:
    def __init__(self):
        self.t0 = time.time()

    def __call__(self) -> float:
        return round(time.time() - self.t0, 1)


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    def fmt(x):
        if isinstance(x, float):
            return f"{x:.4f}" if abs(x) < 100 else f"{x:.1f}"
        return str(x)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)
