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
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from devkit.reference import group_key_variance
from vllm_hga import routing
from vllm_hga.config import HGAConfig
from vllm_hga.ops import SummaryRotation, summarize_blocks
from vllm_hga.rope import RopeSpec
from vllm_hga.routing import keys_seen, routed_groups  # noqa: F401 (re-exported)

ATTN_NAME = "hga_analysis"
# queries per block (a multiple of 64); larger blocks run faster on a GPU
BLOCK = int(os.environ.get("VLLM_HGA_REPLAY_BLOCK", "256"))
GROUP = 16


# ------------------------------------------------------------------ density (exact, analytic)
# routed_groups / keys_seen live in routing.py (the backend counts decode metrics with them)


def density(
    n_tokens: int, cfg: HGAConfig | None, n_layers: int = 1, positions: range | None = None
) -> float:
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


@dataclass(frozen=True)
class PerLayer:
    """A mode per layer: layers[i] for layer i, default for the others."""

    default: Any
    layers: dict


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
    # mass in each rule's own sinks + local window + own chunk (rules may differ in F, L)
    fixed_by: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self):
        z = lambda: torch.zeros(self.n_layers, self.n_heads, dtype=torch.float64)  # noqa: E731
        self.count, self.fixed, self.pool = z(), z(), z()
        self.captured = {n: z() for n in self.names}
        self.fixed_by = {n: z() for n in self.names}

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
                # mass in the routed groups only (captured minus the rule's own window)
                "routed": ((cap - self.fixed_by[n]).sum() / self.count.sum()).item(),
                "per_layer_routed": ((cap - self.fixed_by[n]).sum(1) / cnt.sum(1)).tolist(),
                "per_layer_pool_recall": (
                    (cap - self.fixed).sum(1) / self.pool.sum(1).clamp(min=1e-12)
                ).tolist(),
                "per_layer_head_pool_recall": (
                    (cap - self.fixed) / self.pool.clamp(min=1e-12)
                ).tolist(),
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
    probe: Any = None


_STATE = _State()


def _attention_fn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention interface: q [1, Hq, T, D], k/v [1, Hkv, T, D] post-RoPE."""
    assert query.shape[0] == 1, "batch 1 only"
    q = query[0].transpose(0, 1).float()  # [T, Hq, D]
    k = key[0].transpose(0, 1).float()
    v = value[0].transpose(0, 1).float()
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    if q.shape[0] != k.shape[0]:  # cached decoding (generate): dense only
        assert _STATE.mode == "dense", "cached decoding is supported for dense mode only"
        T, S = q.shape[0], k.shape[0]
        allowed = torch.arange(S).unsqueeze(0) <= torch.arange(S - T, S).unsqueeze(1)
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=allowed, scale=scale, enable_gqa=True
        )
        return out.transpose(1, 2), None
    if _STATE.capture is not None:
        _STATE.capture[module.layer_idx] = (q.clone(), k.clone())
    if _STATE.probe is not None:
        _STATE.probe(module.layer_idx, q, k, scale)
    t0 = time.time()
    mode = _STATE.mode
    if isinstance(mode, PerLayer):
        mode = mode.layers.get(module.layer_idx, mode.default)
    out = layer_attention(
        q, k, v, scale, module.layer_idx, mode, _STATE.measure, _STATE.stats, _STATE.rope
    )
    if os.environ.get("VLLM_HGA_ANALYSIS_VERBOSE"):
        print(f"layer {module.layer_idx}: {time.time() - t0:.1f} s", flush=True)
    return out.unsqueeze(0).to(query.dtype), None


def _cfg_of(mode) -> HGAConfig | None:
    if isinstance(mode, tuple):
        mode = mode[0]
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
        return (
            torch.zeros(1, 0, H, D),
            torch.zeros(1, 0, cfg.groups_per_chunk, H, D),
            torch.zeros(1, 0, H, D),
        )
    pages = summarize_blocks(k[: n * C].view(n, C, H, D), SummaryRotation(rope, cfg, k.device))
    return (
        pages[:, :, 0].unsqueeze(0),
        pages[:, :, 1:].transpose(1, 2).unsqueeze(0),
        _group_var(k, cfg),
    )


def _group_var(k: torch.Tensor, cfg: HGAConfig) -> torch.Tensor | None:
    """The closed chunks' key variance [1, n, H, D], which "mean_std" routing reads (None
    for the other scores)."""
    if cfg.group_score != "mean_std":
        return None
    n = k.shape[0] // cfg.chunk_size
    return group_key_variance(k[: n * cfg.chunk_size], cfg).unsqueeze(0)


def hga_group_vis(qb, pos, summ, cfg: HGAConfig, n_groups: int, router=None):
    """Visibility of 16-token groups for queries qb [Tb, Hq, D] at positions pos [Tb],
    exactly as the backend routes them (``routing.route``; ``router`` replaces it).

    Returns (vis [Tb, Hq, n_groups] bool: sinks, local window, own chunk and routed
    groups; win [Tb, n_groups] bool: the same without the routed groups; budget
    [Tb, Hq]: routed groups per head).  Causality inside the own chunk is left to the
    caller's causal mask."""
    chunk_sum, group_sum, var = summ
    M = cfg.groups_per_chunk
    if router is not None:
        fixed, ids, ok = router(qb, pos, chunk_sum, group_sum, cfg)
    else:
        fixed, ids, ok = routing.route(qb, pos, chunk_sum, group_sum, cfg, group_var=var)
    n_sum = fixed.shape[1] * M
    win = torch.zeros(qb.shape[0], n_groups, dtype=torch.bool)
    win[:, : min(n_sum, n_groups)] = fixed.repeat_interleave(M, dim=-1)[:, :n_groups]
    own = pos // cfg.chunk_size * M
    g = torch.arange(n_groups).unsqueeze(0)
    win |= (g >= own.unsqueeze(1)) & (g < own.unsqueeze(1) + M)
    routed = torch.zeros(*ok.shape[:2], n_groups, dtype=torch.bool)
    r = routing.group_mask(ids, ok, n_sum)
    routed[..., : min(n_sum, n_groups)] = r[..., :n_groups]
    return routed | win.unsqueeze(1), win, ok.sum(-1)


def _pool_groups(win, pos, nG):
    """Groups routing may open: closed chunks before the own chunk, outside the window."""
    closed = torch.arange(nG).unsqueeze(0) < (pos // 64 * 4).unsqueeze(1)
    return closed & ~win


def _oracle_vis(glog, win, budget, pool_g):
    """Group oracle: the window plus, per (query, head), the `budget` pool groups with the
    largest true attention (glog [Tb, Hq, nG]: log of each group's attention weight)."""
    if int(budget.max()) == 0:
        return win.unsqueeze(1).expand(-1, glog.shape[1], -1)
    sc = glog.masked_fill(~pool_g.unsqueeze(1), float("-inf"))
    kmax = min(int(budget.max()), sc.shape[-1])
    top = torch.topk(sc, kmax, dim=-1)
    chosen = torch.arange(kmax).view(1, 1, -1) < budget.unsqueeze(-1)
    chosen &= top.values > float("-inf")
    vis = torch.zeros_like(sc, dtype=torch.bool).scatter_(-1, top.indices, chosen)
    return vis | win.unsqueeze(1)


def _token_oracle_mask(lg, win_tok, budget, pool_tok, gs):
    """Token oracle: the window plus the budget*16 pool tokens with the largest logits."""
    sc = lg.masked_fill(~pool_tok.unsqueeze(1), float("-inf"))
    kmax = min(int(budget.max()) * gs, sc.shape[-1])
    if kmax == 0:
        return win_tok.unsqueeze(1).expand_as(sc)
    top = torch.topk(sc, kmax, dim=-1).values
    thr = top.gather(-1, (budget * gs - 1).clamp(min=0, max=kmax - 1).unsqueeze(-1))
    return win_tok.unsqueeze(1) | ((sc >= thr) & (budget > 0).unsqueeze(-1) & (sc > float("-inf")))


def layer_attention(
    q, k, v, scale, layer: int, mode, measure: dict, stats: LayerStats | None, rope: RopeSpec
) -> torch.Tensor:
    """Attention output [T, Hq, D] of one layer under `mode` (see module docstring)."""
    T, Hq, D = q.shape
    rep = Hq // k.shape[1]
    cfg = _cfg_of(mode)
    # (cfg, factory): factory(k, cfg, rope) gives a router with routing.route's contract
    router = mode[1](k, cfg, rope) if isinstance(mode, tuple) else None
    routers = (
        {n: r[1](k, _cfg_of(r), rope) for n, r in measure.items() if isinstance(r, tuple)}
        if stats is not None
        else {}
    )
    dense_here = cfg is None or layer in cfg.dense_layers
    if dense_here and stats is None:
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0),
            k.transpose(0, 1).unsqueeze(0),
            v.transpose(0, 1).unsqueeze(0),
            is_causal=True,
            scale=scale,
            enable_gqa=True,
        )
        return out[0].transpose(0, 1)
    summ_cache: dict[tuple, Any] = {}

    def summ_for(c: HGAConfig):
        key = (c.rope_threshold, c.group_score)
        if key not in summ_cache:
            summ_cache[key] = _summaries(k, c, rope)
        return summ_cache[key]

    gs = GROUP
    if stats is None and not isinstance(mode, Oracle):  # plain HGA: fused masked SDPA
        return _hga_sdpa(q, k, v, scale, cfg, summ_for(cfg), router)
    kx = k.repeat_interleave(rep, dim=1).transpose(0, 1)  # [Hq, S, D]
    vx = v.repeat_interleave(rep, dim=1).transpose(0, 1)
    out = torch.empty_like(q)
    for first in range(0, T, BLOCK):
        last = min(T, first + BLOCK)
        Tb = last - first
        pos = torch.arange(first, last)
        qb = q[first:last]
        nG = -(-last // gs)
        S = nG * gs  # keys padded to whole groups (the padding is never causal)
        lg = torch.empty(Tb, Hq, S)
        lg[..., :last] = torch.einsum("thd,hsd->ths", qb, kx[:, :last]) * scale
        causal = torch.arange(S).unsqueeze(0) <= pos.unsqueeze(1)  # [Tb, S]
        lg.masked_fill_(~causal.unsqueeze(1), float("-inf"))
        lg4 = lg.view(Tb, Hq, nG, gs)
        if dense_here:
            att = lg
        elif not isinstance(mode, Oracle):
            vis, _, _ = hga_group_vis(qb, pos, summ_for(cfg), cfg, nG, router)
            att = lg4.masked_fill(~vis.unsqueeze(-1), float("-inf")).view_as(lg)
        else:  # Oracle at HGA's budget
            _, win, budget = hga_group_vis(qb, pos, summ_for(cfg), cfg, nG)
            pool_g = _pool_groups(win, pos, nG)
            if mode.kind == "group":
                vis = _oracle_vis(torch.logsumexp(lg4, -1), win, budget, pool_g)
                att = lg4.masked_fill(~vis.unsqueeze(-1), float("-inf")).view_as(lg)
            else:
                m = _token_oracle_mask(
                    lg, win.repeat_interleave(gs, -1), budget, pool_g.repeat_interleave(gs, -1), gs
                )
                att = lg.masked_fill(~m, float("-inf"))
        probs = torch.softmax(att, dim=-1)
        out[first:last] = torch.einsum("ths,hsd->thd", probs[..., :last], vx[:, :last])
        if stats is not None and dense_here:
            _measure(stats, layer, lg, probs, qb, pos, measure, summ_for, nG, routers)
    return out


def _hga_sdpa(q, k, v, scale, cfg, summ, router):
    """HGA attention (same visibility as the backend) through torch's fused SDPA."""
    T, Hq, D = q.shape
    gs = GROUP
    qt, kt, vt = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
    out = torch.empty_like(q)
    for first in range(0, T, BLOCK):
        last = min(T, first + BLOCK)
        pos = torch.arange(first, last)
        nG = -(-last // gs)
        vis, _, _ = hga_group_vis(q[first:last], pos, summ, cfg, nG, router)
        bias_g = torch.zeros(Hq, last - first, nG).masked_fill_(~vis.transpose(0, 1), float("-inf"))
        bias = bias_g.repeat_interleave(gs, dim=-1)[..., :last]  # [Hq, Tb, S]
        lo = first // 64 * 64  # keys before lo are causal for every query of the block
        future = torch.arange(lo, last).unsqueeze(0) > pos.unsqueeze(1)
        bias[:, :, lo:last].masked_fill_(future.unsqueeze(0), float("-inf"))
        o = torch.nn.functional.scaled_dot_product_attention(
            qt[:, :, first:last],
            kt[:, :, :last],
            vt[:, :, :last],
            attn_mask=bias[None],
            scale=scale,
            enable_gqa=True,
        )
        out[first:last] = o[0].transpose(0, 1)
    return out


def _measure(stats: LayerStats, layer, lg, probs, qb, pos, measure, summ_for, nG, routers):
    """Accumulate the true attention mass each rule in `measure` (name -> HGAConfig,
    Oracle, or (HGAConfig, router factory)) would capture, over queries with a non-empty pool."""
    gs = GROUP
    Tb, Hq, _ = lg.shape
    first_cfg = _cfg_of(next(iter(measure.values())))
    active = (pos // first_cfg.chunk_size) > first_cfg.sink_chunks + first_cfg.local_chunks
    if not bool(active.any()):
        return
    gmass = probs.view(Tb, Hq, nG, gs).sum(-1)  # [Tb, Hq, nG] true attention per group
    win_ref = None
    for name, rule in measure.items():
        router = routers.get(name)
        cfg = _cfg_of(rule)
        vis, win, budget = hga_group_vis(qb, pos, summ_for(cfg), cfg, nG, router)
        if isinstance(rule, Oracle):
            pool_g = _pool_groups(win, pos, nG)
            if rule.kind == "group":
                vis = _oracle_vis(gmass.clamp(min=1e-30).log(), win, budget, pool_g)
                cap = (gmass * vis).sum(-1)
            else:
                m = _token_oracle_mask(
                    lg, win.repeat_interleave(gs, -1), budget, pool_g.repeat_interleave(gs, -1), gs
                )
                cap = (probs * m).sum(-1)
        else:
            cap = (gmass * vis).sum(-1)  # own chunk: non-causal keys carry no mass
        stats.captured[name][layer] += cap[active].double().sum(0)
        stats.fixed_by[name][layer] += (gmass * win.unsqueeze(1)).sum(-1)[active].double().sum(0)
        if win_ref is None:
            win_ref = win
    fixed = (gmass * win_ref.unsqueeze(1)).sum(-1)
    stats.fixed[layer] += fixed[active].double().sum(0)
    stats.pool[layer] += (1 - fixed[active].double()).sum(0)
    stats.count[layer] += active.sum()


# ------------------------------------------------------------------ the model
class Analyzer:
    """The embedded checkpoint (float32) under transformers, with swappable attention."""

    def __init__(
        self, model_dir: str | None = None, threads: int | None = None, device: str | None = None
    ):
        """``device`` (e.g. "cuda") runs the replay there: every tensor this module makes
        goes to that device (torch's default device is set process-wide), float32 with
        TF32 off so that results compare with the CPU replay."""
        from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer

        from devkit.model import embedded_model_dir

        if threads:
            torch.set_num_threads(threads)
        if device and device != "cpu":
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
            torch.set_default_device(device)
        model_dir = model_dir or str(embedded_model_dir(dtype="float32"))
        AttentionInterface.register(ATTN_NAME, _attention_fn)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, attn_implementation=ATTN_NAME
        ).eval()
        if device:
            self.model.to(device)
        hf = self.model.config
        self.n_layers = hf.num_hidden_layers
        self.n_heads = hf.num_attention_heads
        head_dim = getattr(hf, "head_dim", hf.hidden_size // hf.num_attention_heads)
        theta = (getattr(hf, "rope_parameters", None) or {}).get(
            "rope_theta", getattr(hf, "rope_theta", 10000.0)
        )
        self.rope = RopeSpec.default(head_dim, theta=float(theta))
        _STATE.rope = self.rope

    @torch.inference_mode()
    def nll(
        self, ids: list[int], mode: Any = "dense", measure: dict[str, Any] | None = None
    ) -> tuple[torch.Tensor, dict | None]:
        """Per-token NLL [len(ids)-1] (nats) of ids[1:] under `mode`; with `measure` (only
        for mode="dense"), the LayerStats summary of each rule's captured attention mass."""
        _STATE.mode = mode
        _STATE.measure = measure or {}
        _STATE.stats = LayerStats(self.n_layers, self.n_heads, list(measure)) if measure else None
        try:
            x = torch.tensor([ids])
            logits = self.model(input_ids=x).logits[0, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="none").cpu()
            self.last_argmax = logits.argmax(-1).cpu()  # greedy token after each prefix
            stats = _STATE.stats.summary() if _STATE.stats is not None else None
        finally:
            _STATE.mode, _STATE.measure, _STATE.stats = "dense", {}, None
        return nll, stats

    @torch.inference_mode()
    def probe(self, ids: list[int], probe: SpanProbe, mode: Any = "dense") -> torch.Tensor:
        """Run `probe` on every layer's q/k during a forward under `mode`; per-token NLL."""
        _STATE.probe = probe
        try:
            return self.nll(ids, mode)[0]
        finally:
            _STATE.probe = None

    @torch.inference_mode()
    def greedy(self, ids: list[int], n: int) -> list[int]:
        """Dense greedy continuation of ids (n new tokens)."""
        _STATE.mode = "dense"
        out = self.model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
        return out[0, len(ids) :].tolist()

    @torch.inference_mode()
    def capture(self, ids: list[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Post-RoPE (q [T, Hq, D], k [T, Hkv, D]) of every layer, dense forward."""
        _STATE.capture = {}
        try:
            self.model(input_ids=torch.tensor([ids]))
            return _STATE.capture
        finally:
            _STATE.capture = None


class SpanProbe:
    """Per layer and head: the dense attention mass that queries at `q_pos` put on the
    keys `span` (e.g. a needle), and how much of it each routing rule keeps visible."""

    def __init__(
        self,
        q_pos: list[int],
        span: range,
        rules: dict[str, Any],
        rope: RopeSpec,
        n_layers: int,
        n_heads: int,
    ):
        self.q_pos, self.span, self.rules, self.rope = q_pos, span, rules, rope
        z = lambda: torch.zeros(n_layers, n_heads, dtype=torch.float64)  # noqa: E731
        self.mass = z()
        self.kept = {n: z() for n in rules}

    def __call__(self, layer, q, k, scale):
        pos = torch.tensor(self.q_pos)
        S = int(pos.max()) + 1
        nG = -(-S // GROUP)
        rep = q.shape[1] // k.shape[1]
        kx = k[:S].repeat_interleave(rep, dim=1)
        lg = torch.einsum("thd,shd->ths", q[pos], kx) * scale
        lg = lg.masked_fill(
            (torch.arange(S).unsqueeze(0) > pos.unsqueeze(1)).unsqueeze(1), float("-inf")
        )
        probs = torch.softmax(lg, -1)
        sp = torch.zeros(S, dtype=torch.bool)
        sp[self.span.start : self.span.stop] = True
        self.mass[layer] += (probs * sp).sum(-1).double().mean(0)
        for name, rule in self.rules.items():
            cfg = _cfg_of(rule)
            if layer in cfg.dense_layers:
                self.kept[name][layer] += (probs * sp).sum(-1).double().mean(0)
                continue
            router = rule[1](k, cfg, self.rope) if isinstance(rule, tuple) else None
            vis, _, _ = hga_group_vis(q[pos], pos, _summaries(k, cfg, self.rope), cfg, nG, router)
            tok = vis.repeat_interleave(GROUP, -1)[..., :S]
            self.kept[name][layer] += (probs * (tok & sp)).sum(-1).double().mean(0)


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


# ------------------------------------------------------------------ experimental routers
def stat_router(
    kind: str, alpha: float = 2.0, level: str = "max_group", bits: int = 2, span: str = "group"
):
    """Router factory for summary statistics the backend does not store (yet).

    Group scores from the post-RoPE keys of each closed group (``stat_scores``); chunk
    scores: the best group score of the chunk (level "max_group") or the mean-key chunk
    summary score (level "summary", from the stored summaries).  Then top K_c chunks, top
    G groups, as routing.route.
    """

    def factory(k: torch.Tensor, cfg: HGAConfig, rope: RopeSpec):
        scores = stat_scores(kind, alpha, k, cfg, bits, span)

        def route(qb, pos, chunk_sum, group_sum, cfg_):
            group_scores = scores(qb, group_sum)
            if level == "summary":
                N, Hq, n, _ = group_scores.shape
                H = chunk_sum.shape[2]
                qd = qb.view(N, H, Hq // H, -1)
                chunk_scores = torch.einsum("nkrd,jkd->nkrj", qd, chunk_sum[0]).reshape(N, Hq, n)
            else:
                chunk_scores = group_scores.amax(-1)
            return routing.select_groups(group_scores, chunk_scores, pos, cfg_)

        return route

    return factory


def stat_scores(
    kind: str, alpha: float, k: torch.Tensor, cfg: HGAConfig, bits: int = 2, span: str = "group"
):
    """scores(qb [N, Hq, D], group_sum) -> [N, Hq, n, M]: group scores of the closed groups
    of keys k [T, Hkv, D] (post-RoPE) by

      "quest"   sum_d q_d c_d + alpha |q_d| r_d, c/r the per-channel midrange/half-range of
                the group's keys: Quest's upper bound of q.k in the group at alpha = 1;
      "meanmax" q.mean + alpha sum_d |q_d| max_t |k_td - mean_d| (an upper bound at 1);
      "meanstd" q.mean + alpha * sqrt(sum_d q_d^2 var_d) (per-group variance; "_iso": one
                variance per group, "_pair": per rotary pair, "_g": per channel with the
                stored group summaries as means, "_chunk": the pooled variance the backend
                stores);
      "gauss"   q.mean*scale + scale^2/2 * sum_d q_d^2 var_d (log-mean-exp under a
                Gaussian key model);
      "mean"    q.mean of post-RoPE keys (no RoPE mixing: rope_threshold = 0);
      "sketch"  log-sum-exp over the group's keys of q.k_hat * scale, k_hat each key
                quantised to `bits` bits per channel between the group's per-channel
                min and max (what a b-bit key copy plus two rows per group would give);
                span "chunk": one min/max pair per chunk instead of per group.
    """
    C, gs, M = cfg.chunk_size, cfg.group_size, cfg.groups_per_chunk
    n = k.shape[0] // C
    H, D = k.shape[1], k.shape[2]
    kg = k[: n * C].view(n, M, gs, H, D)
    if kind == "quest":
        a = (kg.amax(2) + kg.amin(2)) / 2  # [n, M, H, D]
        b = (kg.amax(2) - kg.amin(2)) / 2
    elif kind == "meanmax":
        a = kg.mean(2)
        b = (kg - a.unsqueeze(2)).abs().amax(2)
    elif kind == "meanstd_iso":  # one scalar variance per group (mean over channels)
        a = None
        b = kg.var(2, unbiased=False).mean(-1, keepdim=True).expand(n, M, H, D)
    elif kind == "meanstd_pair":  # one variance per group and rotary pair
        a = None
        var = kg.var(2, unbiased=False)
        half = D // 2
        pv = (var[..., :half] + var[..., half:]) / 2  # neox pairs (i, i + D/2)
        b = torch.cat([pv, pv], dim=-1)
    elif kind == "meanstd_g":  # per-group per-channel variance, stored group means
        a = None
        b = kg.var(2, unbiased=False)
    elif kind == "meanstd_chunk":  # one pooled within-group variance per chunk
        a = None  # the stored (mixed-RoPE) group summaries
        b = kg.var(2, unbiased=False).mean(1, keepdim=True).expand(n, M, H, D)
    elif kind in ("meanstd", "gauss", "mean"):
        a = kg.mean(2)
        b = kg.var(2, unbiased=False)
    elif kind == "sketch":
        dims = (1, 2) if span == "chunk" else 2
        lo, hi = kg.amin(dims, keepdim=True), kg.amax(dims, keepdim=True)
        levels = 2**bits - 1
        step = (hi - lo).clamp(min=1e-12) / levels
        a = lo + torch.round((kg - lo) / step) * step  # [n, M, gs, H, D]
        b = None
    else:
        raise ValueError(f"unknown group statistic {kind!r}")
    scale = D**-0.5

    def scores(qb, group_sum):
        N, Hq, _ = qb.shape
        qd = qb.view(N, H, Hq // H, D)
        if kind == "sketch":
            t = torch.einsum("nkrd,jmtkd->nkrjmt", qd, a) * scale
            return t.logsumexp(-1).reshape(N, Hq, n, M)
        s = torch.einsum("nkrd,jmkd->nkrjm", qd, a if a is not None else group_sum[0])
        if kind in ("quest", "meanmax"):
            s = s + alpha * torch.einsum("nkrd,jmkd->nkrjm", qd.abs(), b)
        elif kind.startswith("meanstd"):
            s = s + alpha * torch.einsum("nkrd,jmkd->nkrjm", qd * qd, b).clamp(min=0).sqrt()
        elif kind == "gauss":
            s = s * scale + scale**2 / 2 * torch.einsum("nkrd,jmkd->nkrjm", qd * qd, b)
        return s.reshape(N, Hq, n, M)

    return scores


def reserve_router(reserve: int, by: str = "quest", alpha: float = 1.0):
    """Router factory: the shipped routing (``routing.route``) opens G - reserve groups,
    then the `reserve` pool groups it left out with the best ``stat_scores(by, alpha)``
    are opened too: a second opinion for spans the shipped score ranks low.  Opens as
    many groups as the shipped rule (the pool permitting), so density is unchanged."""

    def factory(k: torch.Tensor, cfg: HGAConfig, rope: RopeSpec):
        scores = stat_scores(by, alpha, k, cfg)
        n = k.shape[0] // cfg.chunk_size
        var = _group_var(k, cfg)

        def route(qb, pos, chunk_sum, group_sum, cfg_):
            G = cfg_.groups_per_query
            R = min(reserve, G)
            fixed, ids, ok = routing.route(
                qb, pos, chunk_sum, group_sum, cfg_, groups_per_query=G - R, group_var=var
            )
            if R == 0 or n == 0:
                return fixed, ids, ok
            N, Hq = qb.shape[:2]
            M = cfg_.groups_per_chunk
            _, pool = routing.window_masks(pos, n, cfg_)
            s = scores(qb, group_sum).reshape(N, Hq, n * M)
            free = pool.repeat_interleave(M, -1).unsqueeze(1) & ~routing.group_mask(ids, ok, n * M)
            s = s.masked_fill(~free, float("-inf"))
            top = torch.topk(s, min(R, n * M), dim=-1)
            return (
                fixed,
                torch.cat([ids, top.indices], -1),
                torch.cat([ok, top.values > float("-inf")], -1),
            )

        return route

    return factory


def research_router(kind: str, **params):
    """A router factory by name, for the replay's config entries (``"router": {...}``):
    kind "reserve" -> ``reserve_router(**params)``; "tile" -> ``tile_router(**params)``;
    any ``stat_scores`` kind -> ``stat_router(kind, **params)``."""
    if kind == "reserve":
        return reserve_router(**params)
    if kind == "tile":
        return tile_router(**params)
    return stat_router(kind, **params)


def find_span(tok, ids: list[int], text: str) -> range:
    """Token positions of `text` inside ids (binary search on decoded prefixes)."""

    def first(pred):
        lo, hi = 0, len(ids)
        while lo < hi:
            mid = (lo + hi) // 2
            if pred(tok.decode(ids[:mid])):
                hi = mid
            else:
                lo = mid + 1
        return lo

    start = first(lambda s: text[:12] in s) - 1
    end = first(lambda s: text in s)
    return range(max(0, start), end)


# ------------------------------------------------------------------ tile-level routing
def tile_router(agg: str = "max", per: str = "head", tile: int = 64):
    """Router factory: tile-level routing for a paged-varlen prefill (issue 14).  The
    queries of one tile (``tile`` consecutive positions, 64 = the queries of one chunk)
    share ONE routed group list: per query head (per "head") or per KV head, shared by its
    GQA query heads (per "kv").  Same sinks, local window and own chunk (causal) as
    routing.route, same summaries and score functions (``routing.route_scores``), same
    K_c and G (cfg.groups_per_query):

      agg "max"   tile score of a chunk / group = max over the tile's queries (and, per
                  "kv", over the KV head's query heads) of the per-query scores;
      agg "mean"  the scores of the tile's mean query (mean of q over the tile; per "kv",
                  also over the KV head's query heads).

    The tile's later queries help choose the groups of its earlier ones; that leaks no
    token (every routed group lies in a closed chunk before the tile's own chunk), but it
    is no longer per-query causal routing.  ``tile`` must divide the chunk size; tile=1
    with agg "max", per "head" is routing.route."""
    if agg not in ("max", "mean") or per not in ("head", "kv"):
        raise ValueError(f"tile_router: agg {agg!r} / per {per!r} unknown")

    def factory(k: torch.Tensor, cfg: HGAConfig, rope: RopeSpec):
        if cfg.chunk_size % tile:
            raise ValueError(f"tile {tile} must divide the chunk size {cfg.chunk_size}")
        var = _group_var(k, cfg)

        def route(qb, pos, chunk_sum, group_sum, cfg_):
            return tile_route(qb, pos, chunk_sum, group_sum, cfg_, agg, per, tile, var)

        return route

    return factory


def tile_route(qb, pos, chunk_sum, group_sum, cfg, agg="max", per="head", tile=64, var=None):
    """routing.route's contract (fixed [N, n], ids [N, Hq, G], ok [N, Hq, G]) with one
    list per tile (see ``tile_router``); rows of one tile get identical lists."""
    N, Hq, D = qb.shape
    Hkv = chunk_sum.shape[2]
    rep = Hq // Hkv
    t_of, inv = torch.unique(pos // tile, return_inverse=True)  # tile of each row
    nt = t_of.shape[0]
    tpos = t_of * tile  # a position of each tile: its window and pool are the tile's
    if agg == "mean":
        qs = torch.zeros(nt, Hq, D, dtype=qb.dtype).index_add_(0, inv, qb)
        qs = qs / torch.bincount(inv, minlength=nt).to(qb.dtype).view(nt, 1, 1)
        if per == "kv":  # one mean query per KV head, over its query heads too
            qs = qs.view(nt, Hkv, rep, D).mean(2, keepdim=True).expand(nt, Hkv, rep, D)
            qs = qs.reshape(nt, Hq, D)
        gsc, csc = routing.route_scores(qs, chunk_sum, group_sum, cfg, var)
    else:
        g, c = routing.route_scores(qb, chunk_sum, group_sum, cfg, var)
        n, M = g.shape[2], g.shape[3]
        gi = inv.view(N, 1, 1, 1).expand_as(g)
        gsc = torch.full((nt, Hq, n, M), float("-inf")).scatter_reduce_(0, gi, g, "amax")
        csc = gsc.amax(-1) if cfg.chunk_score == "max_group" else None
        if csc is None:
            ci = inv.view(N, 1, 1).expand_as(c)
            csc = torch.full((nt, Hq, n), float("-inf")).scatter_reduce_(0, ci, c, "amax")
    if per == "kv":  # one list per KV head: route Hkv "heads", then give it to the rep
        n, M = gsc.shape[2], gsc.shape[3]
        gsc = gsc.view(nt, Hkv, rep, n, M).amax(2)
        csc = csc.view(nt, Hkv, rep, n).amax(2)
    _, ids, ok = routing.select_groups(gsc, csc, tpos, cfg)
    if per == "kv":
        ids, ok = ids.repeat_interleave(rep, 1), ok.repeat_interleave(rep, 1)
    fixed, _ = routing.window_masks(pos, chunk_sum.shape[1], cfg)
    return fixed, ids[inv], ok[inv]
