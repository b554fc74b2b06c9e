"""The exact PyTorch reference of HGA attention for one request.

Written for clarity, not speed: a loop over queries, float64 by default.  Every
production path (the vLLM backend's torch ops, the CUDA kernels, every memory tier) is
tested against this file.  The rules, for a query at position p in chunk c = p // 64:

* closed chunks are 0 .. c-1; the query's own chunk c is visible causally (keys <= p);
* sinks: chunks [0, min(F, c)); local window: chunks [max(F, c - L), c);
* the pool is the chunks in between, [F, c - L); per query head, chunk scores
  q . chunk_summary(kv head) pick the top K_c pool chunks (the immediately preceding chunk
  c - 1 is always kept: it is in the local window when L >= 1, else forced into the pick,
  after which its groups compete with the others', as in the authors' code);
* group scores q . group_summary over the groups of the kept chunks pick the top
  G = groups_per_query groups (the paper's K_g // 2); with group_score "mean_std" a
  group's score adds score_alpha * sqrt(sum_d q_d^2 var_d) (var: its chunk's
  within-group key variance, ``group_key_variance``); with group_score "sketch" a
  group's score is log sum_t exp(q . k_hat_t / sqrt(D)) over its 16 keys, k_hat the
  2-bit copy of each key (``sketch_keys``): an estimate of the attention mass the group
  holds, which a single matching key can dominate (a mean dilutes it 16-fold);
* attention is exact softmax over the real keys of sinks + local + own chunk + groups.

Ties in top-k go to the lower index here; production paths use torch.topk, whose order
among exactly equal scores is unspecified (equal float scores do not occur in practice).
Routing is per query (not pooled over a block), which keeps it causal and makes prefill,
chunked prefill and token-by-token decode give the same result.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_hga.config import HGAConfig
from vllm_hga.rope import RopeSpec, rotate


@dataclass
class Summaries:
    chunk: torch.Tensor  # [n_chunks, H_kv, D]
    group: torch.Tensor  # [n_chunks, M, H_kv, D]
    # [n_chunks, H_kv, D]: per-channel variance of each chunk's post-RoPE keys around their
    # own group's mean (group_score "mean_std" only; None otherwise)
    var: torch.Tensor | None = None
    # [n_chunks, C, H_kv, D]: the 2-bit key copy (group_score "sketch" only)
    keys_hat: torch.Tensor | None = None


# group_score "sketch": each post-RoPE key is kept as SKETCH_BITS bits per channel, on a
# uniform grid between its chunk's per-channel min and max (both stored as float16).
SKETCH_BITS = 2
SKETCH_LEVELS = 2**SKETCH_BITS - 1
F16_MAX = 65504.0


def sketch_grid(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, step) float32 [n, H, D], both representable in float16, of chunks k [n, C, H, D]:
    the grid of the chunk's 2-bit key codes.  Float32 arithmetic on purpose: the production
    summaries compute the same values bit for bit (the codes are a definition, not an
    approximation of one)."""
    k = k.to(torch.float32).clamp(-F16_MAX, F16_MAX)
    lo = k.amin(dim=1).to(torch.float16).to(torch.float32)
    step = ((k.amax(dim=1) - lo) / SKETCH_LEVELS).to(torch.float16).to(torch.float32)
    return lo, step


def sketch_codes(k: torch.Tensor, lo: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """uint8 codes in [0, SKETCH_LEVELS] of keys k [n, C, H, D] on the grid (lo, step)."""
    k = k.to(torch.float32).clamp(-F16_MAX, F16_MAX)
    x = (k - lo.unsqueeze(1)) / step.unsqueeze(1).clamp(min=torch.finfo(torch.float32).tiny)
    return torch.round(x).clamp(0, SKETCH_LEVELS).to(torch.uint8)


def sketch_keys(k: torch.Tensor) -> torch.Tensor:
    """The 2-bit copy k_hat [n, C, H, D] (float32) of chunks k [n, C, H, D]."""
    lo, step = sketch_grid(k)
    return lo.unsqueeze(1) + sketch_codes(k, lo, step).to(torch.float32) * step.unsqueeze(1)


def summarize(k: torch.Tensor, start_pos: int, rope: RopeSpec, cfg: HGAConfig) -> Summaries:
    """Mixed-RoPE mean summaries of every full chunk of post-RoPE keys k [S, H_kv, D].

    k[0] sits at position start_pos, which must be chunk aligned.  High-frequency pairs
    average the rotated keys; low-frequency pairs (and the unrotated tail of partial
    RoPE, where both rules agree) average the keys rotated to the span's middle.
    A mean ranks exactly like the paper's sums: every chunk (group) has the same size.
    """
    C, gs = cfg.chunk_size, cfg.group_size
    M = C // gs
    assert start_pos % C == 0
    n = k.shape[0] // C
    k = k[: n * C].to(torch.float64)
    pos = torch.arange(start_pos, start_pos + n * C, dtype=torch.float64)
    low = ~rope.high_frequency(C, cfg.rope_threshold)
    # chunk level: rotate each low-frequency pair from p_t to the chunk middle
    chunk_anchor = (pos // C) * C + (C - 1) // 2
    k_chunk = rotate(k, chunk_anchor - pos, rope, low)
    group_anchor = (pos // gs) * gs + (gs - 1) // 2
    k_group = rotate(k, group_anchor - pos, rope, low)
    H, D = k.shape[1], k.shape[2]
    chunk = k_chunk.reshape(n, C, H, D).mean(dim=1)
    group = k_group.reshape(n, M, gs, H, D).mean(dim=2)
    var = keys_hat = None
    if cfg.group_score == "mean_std":
        var = group_key_variance(k, cfg)
    if cfg.group_score == "sketch":
        keys_hat = sketch_keys(k.reshape(n, C, H, D)).to(torch.float64)
    return Summaries(chunk, group, var, keys_hat)


def group_key_variance(k: torch.Tensor, cfg: HGAConfig) -> torch.Tensor:
    """[n, H, D]: per channel, the mean over a chunk's keys of (k - its group's mean)^2,
    from post-RoPE keys k [n*C, H, D] (the within-group variance, pooled over the chunk)."""
    C, gs = cfg.chunk_size, cfg.group_size
    n, H, D = k.shape[0] // C, k.shape[1], k.shape[2]
    kg = k[: n * C].reshape(n, C // gs, gs, H, D)
    return (kg - kg.mean(dim=2, keepdim=True)).pow(2).mean(dim=(1, 2))


def group_scores(
    q: torch.Tensor,
    group: torch.Tensor,
    var: torch.Tensor | None,
    cfg: HGAConfig,
    keys_hat: torch.Tensor | None = None,
) -> torch.Tensor:
    """Level-2 scores of groups with summaries group [..., D] (and their chunk's variance
    var [..., D], same leading shape; group_score "sketch": their 2-bit keys
    keys_hat [..., 16, D]) for one query head's q [D]."""
    if cfg.group_score == "sketch":
        return torch.logsumexp(keys_hat @ q * q.shape[-1] ** -0.5, dim=-1)
    s = group @ q
    if cfg.group_score == "mean_std":
        s = s + cfg.score_alpha * (var @ (q * q)).clamp(min=0).sqrt()
    return s


def _top(scores: torch.Tensor, ids: torch.Tensor, k: int) -> torch.Tensor:
    """The k best ids by score, ties to the lower id."""
    if ids.numel() <= k:
        return ids
    order = torch.sort(ids).indices
    scores, ids = scores[order], ids[order]
    best = torch.sort(scores, descending=True, stable=True).indices[:k]
    return ids[best]


def visible_mask(
    q: torch.Tensor, q_start: int, seq_len: int, summ: Summaries, cfg: HGAConfig
) -> torch.Tensor:
    """Bool [H_q, T, seq_len]: which keys each query of each head attends to."""
    T, Hq, D = q.shape
    Hkv = summ.chunk.shape[1]
    rep = Hq // Hkv
    C, gs, M = cfg.chunk_size, cfg.group_size, cfg.groups_per_chunk
    F, L = cfg.sink_chunks, cfg.local_chunks
    mask = torch.zeros(Hq, T, seq_len, dtype=torch.bool)
    qd = q.to(torch.float64)
    for t in range(T):
        p = q_start + t
        c = p // C
        mask[:, t, c * C : p + 1] = True  # own chunk, causal
        for j in list(range(min(F, c))) + list(range(max(F, c - L), c)):
            mask[:, t, j * C : (j + 1) * C] = True
        pool = torch.arange(F, max(F, c - L))
        if pool.numel() == 0:
            continue
        for h in range(Hq):
            kv = h // rep
            var = (
                summ.var[:, kv].unsqueeze(1).expand(-1, M, -1) if summ.var is not None else None
            )  # [n, M, D]: a chunk's variance serves its four groups
            hat = (
                None if summ.keys_hat is None else summ.keys_hat[:, :, kv].reshape(-1, M, gs, D)
            )  # [n, M, 16, D]
            if cfg.chunk_score == "max_group":
                chunk_scores = group_scores(
                    qd[t, h],
                    summ.group[pool, :, kv],
                    None if var is None else var[pool],
                    cfg,
                    None if hat is None else hat[pool],
                ).amax(dim=1)
            else:
                chunk_scores = summ.chunk[pool, kv] @ qd[t, h]
            if L == 0 and c - 1 >= F:  # keep the immediately preceding chunk
                rest = pool[pool != c - 1]
                rest_scores = chunk_scores[pool != c - 1]
                kept = torch.cat(
                    [torch.tensor([c - 1]), _top(rest_scores, rest, cfg.topk_chunks - 1)]
                )
            else:
                kept = _top(chunk_scores, pool, cfg.topk_chunks)
            gids = (kept.reshape(-1, 1) * M + torch.arange(M)).reshape(-1)
            scores = group_scores(
                qd[t, h],
                summ.group[gids // M, gids % M, kv],
                None if var is None else var[gids // M, gids % M],
                cfg,
                None if hat is None else hat[gids // M, gids % M],
            )
            for g in _top(scores, gids, cfg.groups_per_query).tolist():
                mask[h, t, g * gs : (g + 1) * gs] = True
    return mask


def hga_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_start: int,
    rope: RopeSpec,
    cfg: HGAConfig,
    scale: float | None = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """HGA attention of one request.

    q [T, H_q, D] are the queries at positions q_start .. q_start+T-1; k, v [S, H_kv, D]
    are the post-RoPE keys and values at positions 0 .. S-1 with S = q_start + T.
    Returns (output [T, H_q, D] in q's dtype, visible mask [H_q, T, S]).
    """
    T, Hq, D = q.shape
    S, Hkv, _ = k.shape
    assert S == q_start + T, "keys must cover positions 0 .. q_start+T-1"
    scale = D**-0.5 if scale is None else scale
    summ = summarize(k, 0, rope, cfg)
    mask = visible_mask(q, q_start, S, summ, cfg)
    return masked_attention(q, k, v, mask, scale, dtype), mask


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Exact softmax attention of q [T, Hq, D] over k, v [S, Hkv, D] where mask [Hq, T, S]."""
    Hq, Hkv = q.shape[1], k.shape[1]
    rep = Hq // Hkv
    qd = q.to(dtype).transpose(0, 1)  # [Hq, T, D]
    kd = k.to(dtype).transpose(0, 1).repeat_interleave(rep, dim=0)  # [Hq, S, D]
    vd = v.to(dtype).transpose(0, 1).repeat_interleave(rep, dim=0)
    logits = (qd @ kd.transpose(1, 2)) * scale
    logits = logits.masked_fill(~mask, float("-inf"))
    out = torch.softmax(logits, dim=-1) @ vd  # [Hq, T, D]
    return out.transpose(0, 1).to(q.dtype)


def dense_causal_mask(Hq: int, q_start: int, T: int, S: int) -> torch.Tensor:
    qpos = torch.arange(q_start, q_start + T).reshape(-1, 1)
    return (torch.arange(S).reshape(1, -1) <= qpos).expand(Hq, T, S).clone()


def density(mask: torch.Tensor, q_start: int) -> float:
    """Attended real keys over dense causal pairs, summed over queries and heads (the paper's)."""
    Hq, T, _ = mask.shape
    dense = Hq * sum(q_start + t + 1 for t in range(T))
    return mask.sum().item() / dense
