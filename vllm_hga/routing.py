"""HGA routing, vectorised over queries: which groups of closed chunks each query sees.

Same rules as ``reference.visible_mask`` (see there), computed for many queries at once
from stored summaries.  Works on any device; no host synchronisation.
"""

from __future__ import annotations

import torch

from .config import HGAConfig
from .ops.torch_ops import sketch_codes_of, sketch_grid_of, unpack_sketch

NEG_INF = float("-inf")


def routed_groups(c: int, cfg: HGAConfig) -> int:
    """Groups routing opens for a query in chunk c (every pool group is a full group)."""
    pool = max(0, c - cfg.local_chunks - cfg.sink_chunks)
    kept = min(cfg.topk_chunks, pool)
    return min(cfg.groups_per_query, kept * cfg.groups_per_chunk)


def keys_seen(p: int, cfg: HGAConfig) -> int:
    """Real keys one query head at position p attends to: sinks + local + own chunk
    (causal) + routed groups.  Exact: every set is made of whole closed chunks/groups,
    so the count follows from p and the config alone (the backend counts decode density
    with it on the host, without touching the device)."""
    C = cfg.chunk_size
    c = p // C
    sinks = min(cfg.sink_chunks, c)
    local = c - max(cfg.sink_chunks, c - cfg.local_chunks) if c > cfg.sink_chunks else 0
    return (sinks + local) * C + (p - c * C + 1) + routed_groups(c, cfg) * cfg.group_size


def window_masks(
    pos: torch.Tensor, n_chunks: int, cfg: HGAConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """(fixed, pool), both bool [N, n_chunks], for queries at positions pos [N].

    fixed = sinks + local window (always visible); pool = chunks routing chooses from.
    """
    c = (pos // cfg.chunk_size).unsqueeze(1)  # [N, 1] the query's own chunk
    j = torch.arange(n_chunks, device=pos.device).unsqueeze(0)
    F, L = cfg.sink_chunks, cfg.local_chunks
    sinks = j < torch.clamp(c, max=F)
    local = (j >= torch.clamp(c - L, min=F)) & (j < c)
    pool = (j >= F) & (j < c - L)
    return sinks | local, pool


def route(
    q: torch.Tensor,
    pos: torch.Tensor,
    chunk_sum: torch.Tensor,
    group_sum: torch.Tensor,
    cfg: HGAConfig,
    groups_per_query: int | None = None,
    group_var: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Route queries q [N, Hq, D] at positions pos [N].

    chunk_sum [B, n, Hkv, D] and group_sum [B, n, M, Hkv, D] are the summaries of chunk
    slots 0..n-1 (B = N, or 1 to share one request's summaries); slots a query may not
    see are masked by position, so their contents never matter.  group_var [B, n, Hkv, D]
    (``reference.group_key_variance``) is needed by group_score "mean_std" only; chunk_sum
    is then not read (chunk scores are the best group score).  With group_score "sketch"
    chunk_sum holds the pages' grid rows and group_sum their code rows
    (``ops.torch_ops.pack_sketch``).

    Returns (fixed [N, n] bool, open_ids [N, Hq, G] long, open_ok [N, Hq, G] bool): whole
    chunks every head sees, and per head the group ids (chunk * M + group) routing opened;
    slots with open_ok False are padding.
    """
    n = chunk_sum.shape[1]
    Kc, G = _budgets(n, cfg, groups_per_query)
    if Kc == 0 or G == 0:  # nothing to route: skip the scoring
        return _nothing_routed(q.shape[0], q.shape[1], pos, n, cfg)
    group_scores, chunk_scores = route_scores(q, chunk_sum, group_sum, cfg, group_var)
    return select_groups(group_scores, chunk_scores, pos, cfg, groups_per_query)


def _budgets(n: int, cfg: HGAConfig, groups_per_query: int | None) -> tuple[int, int]:
    """(chunks kept, groups opened) per query head with n chunk slots."""
    G = cfg.groups_per_query if groups_per_query is None else groups_per_query
    Kc = min(cfg.topk_chunks, n)
    return Kc, min(G, Kc * cfg.groups_per_chunk)


def _nothing_routed(N: int, Hq: int, pos: torch.Tensor, n: int, cfg: HGAConfig):
    fixed, _ = window_masks(pos, n, cfg)
    empty = torch.zeros(N, Hq, 0, dtype=torch.long, device=pos.device)
    return fixed, empty, empty.bool()


def route_scores(
    q: torch.Tensor,
    chunk_sum: torch.Tensor,
    group_sum: torch.Tensor,
    cfg: HGAConfig,
    group_var: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Level-2 group scores [N, Hq, n, M] and level-1 chunk scores [N, Hq, n] of queries
    q [N, Hq, D] over every chunk slot (``route``'s inputs; nothing masked yet)."""
    N, Hq, _ = q.shape
    n, Hkv = chunk_sum.shape[1], chunk_sum.shape[2]
    M = cfg.groups_per_chunk
    rep = Hq // Hkv
    shared = chunk_sum.shape[0] == 1 and N > 1  # one request's summaries for all queries
    b = "" if shared else "n"
    if shared:
        chunk_sum, group_sum = chunk_sum[0], group_sum[0]
    qd = q.to(group_sum.dtype).view(N, Hkv, rep, -1)
    if cfg.group_score == "sketch":
        group_scores = _sketch_scores(qd, chunk_sum, group_sum, b).reshape(N, Hq, n, M)
    else:
        group_scores = torch.einsum(f"nkrd,{b}jmkd->nkrjm", qd, group_sum).reshape(N, Hq, n, M)
    if cfg.group_score == "mean_std":
        if group_var is None:
            raise ValueError(
                "group_score 'mean_std' needs group_var (the key variance "
                "summaries); this caller does not provide them"
            )
        var = group_var[0] if shared else group_var
        spread = torch.einsum(f"nkrd,{b}jkd->nkrj", qd * qd, var.to(qd.dtype))
        spread = spread.clamp(min=0).sqrt().reshape(N, Hq, n, 1)
        group_scores = group_scores + cfg.score_alpha * spread
    # level 1: chunk scores per query head (a KV head's summary serves its GQA group)
    if cfg.chunk_score == "max_group":
        chunk_scores = group_scores.amax(dim=-1)
    else:
        chunk_scores = torch.einsum(f"nkrd,{b}jkd->nkrj", qd, chunk_sum).reshape(N, Hq, n)
    return group_scores, chunk_scores


def select_groups(
    group_scores: torch.Tensor,
    chunk_scores: torch.Tensor,
    pos: torch.Tensor,
    cfg: HGAConfig,
    groups_per_query: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``route``'s selection from scores (``route_scores``' shapes) of rows at positions
    pos [N]: the top K_c pool chunks by chunk score, then the top G of their groups."""
    N, Hq, n, M = group_scores.shape
    Kc, G = _budgets(n, cfg, groups_per_query)
    if Kc == 0 or G == 0:
        return _nothing_routed(N, Hq, pos, n, cfg)
    fixed, pool = window_masks(pos, n, cfg)
    pool_h = pool.unsqueeze(1).expand(N, Hq, n)
    chunk_scores = chunk_scores.masked_fill(~pool_h, NEG_INF)
    if cfg.local_chunks == 0:  # the preceding chunk is then in the pool: always keep it
        prev = torch.arange(n, device=pos.device) == (pos // cfg.chunk_size - 1).unsqueeze(1)
        chunk_scores = chunk_scores.masked_fill((prev & pool).unsqueeze(1), float("inf"))
    kept = torch.topk(chunk_scores, Kc, dim=-1).indices  # [N, Hq, Kc]
    kept_ok = pool_h.gather(-1, kept)
    # level 2: group scores inside the kept chunks only
    group_scores = group_scores.gather(2, kept.unsqueeze(-1).expand(N, Hq, Kc, M))
    group_scores = group_scores.masked_fill(~kept_ok.unsqueeze(-1), NEG_INF).view(N, Hq, Kc * M)
    best = torch.topk(group_scores, G, dim=-1).indices  # [N, Hq, G] into kept x M
    open_ids = kept.gather(-1, best // M) * M + best % M
    open_ok = kept_ok.gather(-1, best // M)
    return fixed, open_ids, open_ok


def _sketch_scores(
    qd: torch.Tensor, grid: torch.Tensor, codes: torch.Tensor, b: str
) -> torch.Tensor:
    """[N, Hkv, rep, n, M]: log sum_t exp(q . k_hat_t / sqrt(D)) over each group's 16 keys
    (``reference.group_scores``), k_hat decoded from the sketch pages."""
    N, Hkv, rep, D = qd.shape
    qs = qd.float() * D**-0.5
    if b:  # per-row pages (decode): q . k_hat_t = q . lo + (q * step) . code_t per chunk,
        # without building k_hat (a [N, n, Hkv, 64, D] tensor per step)
        lo, step = sketch_grid_of(grid)  # [N, n, Hkv, D]
        c = sketch_codes_of(codes.transpose(-3, -2))  # [N, n, Hkv, M, 16, D]
        n, M = c.shape[-5], c.shape[-3]
        base = torch.einsum("nkrd,njkd->nkrj", qs, lo)  # [N, Hkv, rep, n]
        w = qs.unsqueeze(1) * step.unsqueeze(3)  # [N, n, Hkv, rep, D]
        t = torch.matmul(w, c.flatten(-3, -2).transpose(-1, -2))  # [N, n, Hkv, rep, M*16]
        t = t.permute(0, 2, 3, 1, 4).reshape(N, Hkv, rep, n, M, 16)
        return (t + base.unsqueeze(-1).unsqueeze(-1)).logsumexp(-1)
    # one request's pages for all rows (prefill): one matmul per KV head over all queries
    k_hat = unpack_sketch(grid, codes.transpose(-3, -2))  # [n, Hkv, M, 16, D]
    n, M = k_hat.shape[0], k_hat.shape[2]
    keys = k_hat.permute(1, 4, 0, 2, 3).reshape(Hkv, D, -1)  # [Hkv, D, n*M*16]
    t = torch.matmul(qs.transpose(0, 1).reshape(Hkv, N * rep, D), keys)
    return t.view(Hkv, N, rep, n, M, 16).logsumexp(-1).transpose(0, 1)


def group_mask(open_ids: torch.Tensor, open_ok: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Bool [N, Hq, n_groups] from routed group ids."""
    N, Hq, _ = open_ids.shape
    mask = torch.zeros(N, Hq, n_groups + 1, dtype=torch.bool, device=open_ids.device)
    ids = torch.where(open_ok, open_ids, n_groups)  # padding lands in a spare column
    return mask.scatter_(-1, ids, True)[..., :n_groups]


def token_mask(
    pos: torch.Tensor,
    fixed: torch.Tensor,
    open_ids: torch.Tensor,
    open_ok: torch.Tensor,
    n_keys: int,
    cfg: HGAConfig,
) -> torch.Tensor:
    """Bool [N, Hq, n_keys] over keys 0..n_keys-1 of one request, own chunk causal."""
    C, gs = cfg.chunk_size, cfg.group_size
    routed = group_mask(open_ids, open_ok, fixed.shape[1] * cfg.groups_per_chunk)
    groups = routed | fixed.repeat_interleave(cfg.groups_per_chunk, dim=-1).unsqueeze(1)
    mask = groups.repeat_interleave(gs, dim=-1)
    if mask.shape[-1] < n_keys:
        mask = torch.nn.functional.pad(mask, (0, n_keys - mask.shape[-1]))
    mask = mask[..., :n_keys]
    key = torch.arange(n_keys, device=pos.device).unsqueeze(0)
    own = (key >= (pos // C * C).unsqueeze(1)) & (key <= pos.unsqueeze(1))
    return mask | own.unsqueeze(1)
