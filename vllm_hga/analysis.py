"""Offline routing analysis on the embedded checkpoint (Hugging Face transformers, CPU).

vLLM hands an attention backend post-RoPE q/k/v and nothing else; so does this module.
It loads the same checkpoint with transformers, swaps every layer's attention for a
function that receives exactly those post-RoPE tensors (``AttentionInterface``), and
replays our own routing code on them:

* ``mode="dense"``   exact causal attention (the baseline), optionally measuring, per
                     layer and head, how much of the true attention mass each routing
                     rule (HGA configs, an oracle at the same budget) would capture;
* ``mode=HGAConfig`` HGA attention: summaries from ``ops.summarize_blocks`` and routing
                     from ``routing.route`` / ``routing.token_mask`` (the production
                     routing, tested equal to ``reference.visible_mask``), exact softmax
                     over the visible keys — the same rule the vLLM backend computes;
* ``mode=Oracle(cfg)`` the same budgets as ``cfg`` per (query, head) — same sinks, local
                     window, own chunk and the same number of routed groups — but the
                     routed groups (or tokens) are the ones with the most true attention
                     mass: the ceiling any summary-based router could reach.

Teacher-forced NLL of every mode comes from the model's own logits, so one can compare
the NLL gap of HGA and of the oracle at equal density.  Everything runs in float32.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from . import routing
from .config import HGAConfig
from .ops import SummaryRotation, summarize_blocks
from .rope import RopeSpec

ATTN_NAME = "hga_analysis"
BLOCK = 256  # queries per block (a multiple of 64)


# ------------------------------------------------------------------ density (exact, analytic)
def routed_groups(c: int, cfg: HGAConfig) -> int:
    """Groups routing opens for a query in chunk c (every pool group is a full group)."""
    pool = max(0, c - cfg.local_chunks - cfg.sink_chunks)
    kept = min(cfg.topk_chunks, pool)
    return min(cfg.groups_per_query, kept * cfg.groups_per_chunk)


def keys_seen(p: int, cfg: HGAConfig) -> int:
    """Real keys one query head at position p attends to: sinks + local + own chunk
    (causal) + routed groups.  Exact: every set is made of whole closed chunks/groups."""
    C = cfg.chunk_size
    c = p // C
    sinks = min(cfg.sink_chunks, c)
    local = c - max(cfg.sink_chunks, c - cfg.local_chunks) if c > cfg.sink_chunks else 0
    return (sinks + local) * C + (p - c * C + 1) + routed_groups(c, cfg) * cfg.group_size


def density(n_tokens: int, cfg: HGAConfig | None, n_layers: int = 1,
            positions: range | None = None) -> float:
    """The paper's density for a prompt of n_tokens: real keys attended, summed over
    queries, heads and layers, over dense causal pairs sum(p+1).  Heads all see the same
    number of keys, so heads cancel; a layer in cfg.dense_layers counts as dense.
    ``positions`` restricts the sum to some query positions (e.g. where routing is on)."""
    pos = positions if positions is not None else range(n_tokens)
    dense = sum(p + 1 for p in pos)
    if cfg is None:
        return 1.0
    sparse = sum(keys_seen(p, cfg) for p in pos)
    n_dense = sum(1 for i in cfg.dense_layers if i < n_layers)
    return (n_dense * dense + (n_layers - n_dense) * sparse) / (n_layers * dense)


def first_routed_position(cfg: HGAConfig) -> int:
    """First query position whose pool is non-empty (chunk > F + L)."""
    return (cfg.sink_chunks + cfg.local_chunks + 1) * cfg.chunk_size


# ------------------------------------------------------------------ modes
@dataclass(frozen=True)
class Oracle:
    """Exact top-k routing over true attention at the budget of ``cfg``.

    kind "group": the same number of routed 16-token groups as HGA, best by true mass;
    kind "token": the same number of routed tokens (groups x 16), best by true logit.
    """
    cfg: HGAConfig
    kind: str = "group"


@dataclass
class LayerStats:
    """Per-layer, per-head sums over queries whose pool is non-empty."""
    n_layers: int
    n_heads: int
    names: list[str]
    count: torch.Tensor = None  # [layers, heads]
    fixed: torch.Tensor = None  # mass in sinks + local + own chunk
    pool: torch.Tensor = None  # mass in the routable pool
    captured: dict[str, torch.Tensor] = field(default_factory=dict)  # total mass in set

    def __post_init__(self):
        z = lambda: torch.zeros(self.n_layers, self.n_heads, dtype=torch.float64)  # noqa: E731
        self.count, self.fixed, self.pool = z(), z(), z()
        self.captured = {n: z() for n in self.names}

    def summary(self) -> dict[str, Any]:
        cnt = self.count.clamp(min=1)
        out: dict[str, Any] = {"queries_x_heads": int(self.count.sum())}
        out["fixed_mass"] = (self.fixed.sum() / self.count.sum()).item()
        out["pool_mass"] = (self.pool.sum() / self.count.sum()).item()
        per = {}
        for n, cap in self.captured.items():
            per[n] = {
                "captured": (cap.sum() / self.count.sum()).item(),
                "pool_recall": ((cap - self.fixed).sum() / self.pool.sum()).item(),
                "per_layer_captured": (cap.sum(1) / cnt.sum(1)).tolist(),
                "per_layer_pool_recall": ((cap - self.fixed).sum(1)
                                          / self.pool.sum(1).clamp(min=1e-12)).tolist(),
                "per_layer_head_pool_recall": ((cap - self.fixed)
                                               / self.pool.clamp(min=1e-12)).tolist(),
            }
        out["rules"] = per
        out["per_layer_pool_mass"] = (self.pool.sum(1) / cnt.sum(1)).tolist()
        out["per_layer_head_pool_mass"] = (self.pool / cnt).tolist()
        return out


class _State:
    mode: Any = "dense"
    measure: dict[str, Any] = {}
    stats: LayerStats | None = None
    rope: RopeSpec | None = None
    capture: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None


_STATE = _State()


def _attention_fn(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                  **kwargs):
    """transformers attention interface: q [1, Hq, T, D], k/v [1, Hkv, T, D] post-RoPE."""
    assert query.shape[0] == 1, "batch 1 only"
    q = query[0].transpose(0, 1).float()  # [T, Hq, D]
    k = key[0].transpose(0, 1).float()
    v = value[0].transpose(0, 1).float()
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    if _STATE.capture is not None:
        _STATE.capture[module.layer_idx] = (q.clone(), k.clone())
    out = layer_attention(q, k, v, scale, module.layer_idx, _STATE.mode, _STATE.measure,
                          _STATE.stats, _STATE.rope)
    return out.unsqueeze(0).to(query.dtype), None


def _cfg_of(mode) -> HGAConfig | None:
    if isinstance(mode, HGAConfig):
        return mode
    if isinstance(mode, Oracle):
        return mode.cfg
    return None


def _summaries(k: torch.Tensor, cfg: HGAConfig, rope: RopeSpec):
    C = cfg.chunk_size
    n = k.shape[0] // C
    H, D = k.shape[1], k.shape[2]
    if n == 0:
        return (torch.zeros(1, 0, H, D), torch.zeros(1, 0, cfg.groups_per_chunk, H, D))
    pages = summarize_blocks(k[: n * C].view(n, C, H, D), SummaryRotation(rope, cfg))
    return pages[:, :, 0].unsqueeze(0), pages[:, :, 1:].transpose(1, 2).unsqueeze(0)


def hga_block_mask(qb, pos, summ, cfg: HGAConfig, n_keys: int):
    """(visible [Tb, Hq, n_keys], fixed-window mask [Tb, Hq, n_keys], routed group count
    [Tb, Hq]) for queries qb at positions pos, exactly as the backend routes them."""
    chunk_sum, group_sum = summ
    fixed, ids, ok = routing.route(qb, pos, chunk_sum, group_sum, cfg)
    vis = routing.token_mask(pos, fixed, ids, ok, n_keys, cfg)
    none = torch.zeros_like(ok)
    win = routing.token_mask(pos, fixed, ids, none, n_keys, cfg)
    return vis, win, ok.sum(-1)


def oracle_block_mask(logits, win, budget, pool_keys, kind: str, gs: int):
    """Oracle visibility [Tb, Hq, S]: the window plus the best `budget` groups (kind
    "group", by true mass) or `budget * gs` tokens (kind "token", by logit) of the pool.

    logits [Tb, Hq, S] (-inf where not causal); pool_keys [Tb, S] bool."""
    Tb, Hq, S = logits.shape
    if budget.max() == 0:
        return win
    neg = torch.finfo(logits.dtype).min
    if kind == "group":
        n_full = (S // gs) * gs
        lg = logits[..., :n_full].masked_fill(~pool_keys[:, None, :n_full], float("-inf"))
        gscore = torch.logsumexp(lg.view(Tb, Hq, -1, gs), dim=-1).nan_to_num(neg)
        order = gscore.argsort(dim=-1, descending=True)
        rank = torch.empty_like(order)
        rank.scatter_(-1, order, torch.arange(order.shape[-1]).expand_as(order))
        chosen = (rank < budget.unsqueeze(-1)) & (gscore > neg)
        tok = chosen.repeat_interleave(gs, dim=-1)
        tok = torch.nn.functional.pad(tok, (0, S - n_full))
    else:
        lg = logits.masked_fill(~pool_keys[:, None, :], float("-inf"))
        kmax = min(int(budget.max()) * gs, S)
        top = torch.topk(lg, kmax, dim=-1).values  # [Tb, Hq, kmax]
        idx = (budget * gs - 1).clamp(min=0, max=kmax - 1).unsqueeze(-1)
        thr = top.gather(-1, idx)
        tok = (lg >= thr) & (budget > 0).unsqueeze(-1) & pool_keys[:, None, :]
    return win | tok


def layer_attention(q, k, v, scale, layer: int, mode, measure: dict, stats: LayerStats | None,
                    rope: RopeSpec) -> torch.Tensor:
    """Attention output [T, Hq, D] of one layer under `mode` (see module docstring)."""
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    rep = Hq // Hkv
    cfg = _cfg_of(mode)
    dense_here = cfg is None or layer in cfg.dense_layers
    if dense_here and stats is None:
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0),
            v.transpose(0, 1).unsqueeze(0), is_causal=True, scale=scale, enable_gqa=True)
        return out[0].transpose(0, 1)
    summ_cache: dict[tuple, Any] = {}

    def summ_for(c: HGAConfig):
        key = (c.rope_threshold,)
        if key not in summ_cache:
            summ_cache[key] = _summaries(k, c, rope)
        return summ_cache[key]

    kx = k.repeat_interleave(rep, dim=1).transpose(0, 1)  # [Hq, S, D]
    vx = v.repeat_interleave(rep, dim=1).transpose(0, 1)
    out = torch.empty_like(q)
    for first in range(0, T, BLOCK):
        last = min(T, first + BLOCK)
        pos = torch.arange(first, last)
        qb = q[first:last]
        S = last
        logits = torch.einsum("thd,hsd->ths", qb, kx[:, :S]) * scale  # [Tb, Hq, S]
        causal = torch.arange(S).unsqueeze(0) <= pos.unsqueeze(1)  # [Tb, S]
        logits = logits.masked_fill(~causal[:, None, :], float("-inf"))
        if dense_here:
            vis = None
        elif isinstance(mode, HGAConfig):
            vis, _, _ = hga_block_mask(qb, pos, summ_for(mode), mode, S)
        else:  # Oracle
            _, win, budget = hga_block_mask(qb, pos, summ_for(mode.cfg), mode.cfg, S)
            pool_keys = causal & ~win[:, 0, :]  # window is the same for every head
            pool_keys &= torch.arange(S).unsqueeze(0) < (pos // 64 * 64).unsqueeze(1)
            vis = oracle_block_mask(logits, win, budget, pool_keys, mode.kind,
                                    mode.cfg.group_size)
        lg = logits if vis is None else logits.masked_fill(~vis, float("-inf"))
        probs = torch.softmax(lg, dim=-1)
        out[first:last] = torch.einsum("ths,hsd->thd", probs, vx[:, :S])
        if stats is not None and dense_here:
            _measure(stats, layer, logits, probs, qb, pos, causal, measure, summ_for, S)
    return out


def _measure(stats: LayerStats, layer, logits, probs, qb, pos, causal, measure, summ_for, S):
    """Accumulate true-mass statistics of the rules in `measure` (name -> cfg | Oracle)."""
    ref_cfg = next(iter(measure.values()))
    ref_cfg = _cfg_of(ref_cfg)
    active = (pos // ref_cfg.chunk_size) > ref_cfg.sink_chunks + ref_cfg.local_chunks
    if not bool(active.any()):
        return
    win_ref = None
    for name, rule in measure.items():
        cfg = _cfg_of(rule)
        vis, win, budget = hga_block_mask(qb, pos, summ_for(cfg), cfg, S)
        if isinstance(rule, Oracle):
            pool_keys = causal & ~win[:, 0, :]
            pool_keys &= torch.arange(S).unsqueeze(0) < (pos // 64 * 64).unsqueeze(1)
            vis = oracle_block_mask(logits, win, budget, pool_keys, rule.kind, cfg.group_size)
        cap = (probs * vis).sum(-1)  # [Tb, Hq]
        stats.captured[name][layer] += cap[active].double().sum(0)
        if win_ref is None:
            win_ref = win
    fixed = (probs * win_ref).sum(-1)
    stats.fixed[layer] += fixed[active].double().sum(0)
    stats.pool[layer] += (1 - fixed[active].double()).sum(0)
    stats.count[layer] += active.sum()


# ------------------------------------------------------------------ the model
class Analyzer:
    """The embedded checkpoint (float32) under transformers, with swappable attention."""

    def __init__(self, model_dir: str | None = None, threads: int | None = None):
        from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer

        from .model import embedded_model_dir

        if threads:
            torch.set_num_threads(threads)
        model_dir = model_dir or str(embedded_model_dir(dtype="float32"))
        AttentionInterface.register(ATTN_NAME, _attention_fn)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, attn_implementation=ATTN_NAME).eval()
        hf = self.model.config
        self.n_layers = hf.num_hidden_layers
        self.n_heads = hf.num_attention_heads
        head_dim = getattr(hf, "head_dim", hf.hidden_size // hf.num_attention_heads)
        theta = (getattr(hf, "rope_parameters", None) or {}).get(
            "rope_theta", getattr(hf, "rope_theta", 10000.0))
        self.rope = RopeSpec.default(head_dim, theta=float(theta))
        _STATE.rope = self.rope

    @torch.inference_mode()
    def nll(self, ids: list[int], mode: Any = "dense",
            measure: dict[str, Any] | None = None) -> tuple[torch.Tensor, dict | None]:
        """Per-token NLL [len(ids)-1] (nats) of ids[1:] under `mode`; with `measure` (only
        for mode="dense"), the LayerStats summary of each rule's captured attention mass."""
        _STATE.mode = mode
        _STATE.measure = measure or {}
        _STATE.stats = (LayerStats(self.n_layers, self.n_heads, list(measure))
                        if measure else None)
        try:
            x = torch.tensor([ids])
            logits = self.model(input_ids=x).logits[0, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="none")
            stats = _STATE.stats.summary() if _STATE.stats is not None else None
        finally:
            _STATE.mode, _STATE.measure, _STATE.stats = "dense", {}, None
        return nll, stats

    @torch.inference_mode()
    def capture(self, ids: list[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Post-RoPE (q [T, Hq, D], k [T, Hkv, D]) of every layer, dense forward."""
        _STATE.capture = {}
        try:
            self.model(input_ids=torch.tensor([ids]))
            return _STATE.capture
        finally:
            _STATE.capture = None


def cfg_with(base: HGAConfig | None = None, **kw) -> HGAConfig:
    """A config like `base` (default: the defaults) with some keys changed."""
    base = base or HGAConfig()
    d = {f.name: getattr(base, f.name) for f in dataclasses.fields(base) if f.name != "preset"}
    if "topk_groups" in kw and "groups_per_query" not in kw:
        d["groups_per_query"] = None
    d.update(kw)
    return HGAConfig(**d)


def mean(x) -> float:
    x = list(x)
    return sum(x) / len(x) if x else math.nan
