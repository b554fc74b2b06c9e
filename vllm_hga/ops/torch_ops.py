"""Torch implementations of HGA's ops (CPU, and the fallback on CUDA).

Pool layout (see store.py): pool[block, kv_head, 0|1 (K|V), 64, D], so one 16-token group
of one head is a contiguous run.
"""

from __future__ import annotations

import torch

from ..config import HGAConfig
from ..rope import RopeSpec

NEG_INF = float("-inf")


def _math_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for half types (fp32 softmax and sums), float64 stays float64."""
    return torch.promote_types(x.dtype, torch.float32)


class SummaryRotation:
    """Rotations that move each key of a chunk to its span's middle position.

    For a chunk-aligned block, token t sits at offset t inside the chunk, so the relative
    rotation (anchor - position) is the same for every chunk: two [64, pairs] tables,
    identity on high-frequency pairs (those are averaged as rotated).
    """

    def __init__(self, rope: RopeSpec, cfg: HGAConfig, device: torch.device | str = "cpu"):
        C, gs = cfg.chunk_size, cfg.group_size
        t = torch.arange(C, dtype=torch.float64)
        low = (~rope.high_frequency(C, cfg.rope_threshold)).to(torch.float64)
        f = torch.tensor(rope.inv_freq, dtype=torch.float64) * low
        chunk_delta = (C - 1) // 2 - t
        group_delta = (t // gs) * gs + (gs - 1) // 2 - t
        # kept in float64 (tiny) so float64 test runs stay exact; cast on use
        self.cos = torch.stack(
            [torch.cos(chunk_delta[:, None] * f), torch.cos(group_delta[:, None] * f)]
        ).to(device)
        self.sin = torch.stack(
            [torch.sin(chunk_delta[:, None] * f), torch.sin(group_delta[:, None] * f)]
        ).to(device)
        a, b = rope.pair_index()
        self.a, self.b = a.to(device), b.to(device)
        self.groups = cfg.groups_per_chunk
        # group_score "mean_std": row 0 of a summary page holds the chunk's within-group key
        # variance (reference.group_key_variance) instead of the chunk summary
        self.variance = cfg.group_score == "mean_std"
        # group_score "sketch": the page holds the 2-bit key copy instead (pack_sketch)
        self.sketch = cfg.group_score == "sketch"

    def rotated(self, k: torch.Tensor, level: int) -> torch.Tensor:
        """k [nb, C, H, D] (float32/64) rotated to the chunk (level 0) or group (1) middles."""
        cos = self.cos[level][None, :, None, :].to(k.dtype)
        sin = self.sin[level][None, :, None, :].to(k.dtype)
        out = k.clone()
        ka, kb = k[..., self.a], k[..., self.b]
        out[..., self.a] = ka * cos - kb * sin
        out[..., self.b] = ka * sin + kb * cos
        return out


def summarize_blocks(k: torch.Tensor, rot: SummaryRotation) -> torch.Tensor:
    """Summaries [nb, H, 1+M, D] float32 of full chunks k [nb, C, H, D] (post-RoPE).

    Row 0 is the chunk summary, rows 1..M the group summaries: means of keys, with
    low-frequency RoPE pairs first rotated to the span's middle position.
    """
    nb, C, H, D = k.shape
    if rot.sketch:
        return pack_sketch(k)
    k32 = k.to(_math_dtype(k))
    if rot.variance:
        kg = k32.view(nb, rot.groups, C // rot.groups, H, D)
        chunk = (kg - kg.mean(dim=2, keepdim=True)).pow(2).mean(dim=(1, 2))  # [nb, H, D]
    else:
        chunk = rot.rotated(k32, 0).mean(dim=1)  # [nb, H, D]
    group = rot.rotated(k32, 1).view(nb, rot.groups, C // rot.groups, H, D).mean(dim=2)
    return torch.cat([chunk.unsqueeze(1), group], dim=1).transpose(1, 2).contiguous()


# group_score "sketch": 2 bits per key channel on a uniform grid between the chunk's
# per-channel min and max, both stored as float16 (levels 0..3).
SKETCH_LEVELS = 3
_F16_MAX = 65504.0


def sketch_quantize(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lo, step, codes) of chunks k [nb, C, H, D]: lo and step float32 [nb, H, D], each a
    float16 value; codes uint8 [nb, C, H, D] in [0, SKETCH_LEVELS].  Float32 arithmetic, so
    that every producer of pages and devkit's reference (tests/test_sketch.py) agree bit
    for bit: the codes are a definition, not an estimate."""
    k32 = k.to(torch.float32).clamp(-_F16_MAX, _F16_MAX)
    lo = k32.amin(dim=1).half().float()
    step = ((k32.amax(dim=1) - lo) / SKETCH_LEVELS).half().float()
    safe_step = step.clamp(min=torch.finfo(torch.float32).tiny)  # constant channels: code 0
    codes = torch.round((k32 - lo[:, None]) / safe_step[:, None])
    return lo, step, codes.clamp(0, SKETCH_LEVELS).to(torch.uint8)


def pack_sketch(k: torch.Tensor) -> torch.Tensor:
    """Sketch page [nb, H, 1+M, D] float32 of chunks k [nb, C, H, D] (group_score "sketch").

    Row 0: the grid, float16 lo then float16 step per channel (``sketch_quantize``);
    row 1+m: the 2-bit codes of group m's 16 keys, token-major (code i*D + d sits in byte
    (i*D + d) // 4 at bit 2*((i*D + d) % 4)): 16*D*2 bits = one row of D float32.
    """
    nb, C, H, D = k.shape
    M = C // 16
    lo, step, codes = sketch_quantize(k)  # [nb, H, D] twice, [nb, C, H, D]
    codes = codes.view(nb, M, 16, H, D).permute(0, 3, 1, 2, 4).reshape(nb, H, M, 4 * D, 4)
    packed = codes[..., 0] | codes[..., 1] << 2 | codes[..., 2] << 4 | codes[..., 3] << 6
    grid = torch.cat([lo, step], dim=-1).to(torch.float16).contiguous().view(torch.float32)
    return torch.cat([grid.unsqueeze(2), packed.contiguous().view(torch.float32)], dim=2)


def sketch_grid_of(grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, step) float32 [..., D] from a sketch page's grid row [..., D] (``pack_sketch``)."""
    D = grid.shape[-1]
    g = grid.contiguous().view(torch.float16).float()
    return g[..., :D], g[..., D:]


def sketch_codes_of(rows: torch.Tensor) -> torch.Tensor:
    """Codes [..., M, 16, D] float32 (0..3) from a sketch page's code rows [..., M, D]."""
    b = rows.contiguous().view(torch.uint8)  # [..., M, 4D]
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=b.device)
    codes = (b.unsqueeze(-1) >> shifts) & 3  # [..., M, 4D, 4]
    return codes.reshape(*rows.shape[:-1], 16, rows.shape[-1]).float()


def unpack_sketch(grid: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Keys k_hat [..., M, 16, D] float32 from a sketch page's grid row [..., D] and code
    rows [..., M, D] (``pack_sketch``; any leading dims, the same for both)."""
    lo, step = sketch_grid_of(grid)
    return lo.unsqueeze(-2).unsqueeze(-2) + sketch_codes_of(rows) * step.unsqueeze(-2).unsqueeze(-2)


def write_kv(
    pool: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor
) -> None:
    """Write key/value [T, H, D] of token slots [T] (block*64 + offset; <0 = padding)."""
    C = pool.shape[3]
    keep = slots >= 0
    if not bool(keep.all()):
        key, value, slots = key[keep], value[keep], slots[keep]
    blocks, offs = slots // C, slots % C
    pool[blocks, :, 0, offs] = key.to(pool.dtype)
    pool[blocks, :, 1, offs] = value.to(pool.dtype)


def gather_tokens(pool: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K, V [N, H, D] of token slots [N] (all valid)."""
    C = pool.shape[3]
    blocks, offs = slots // C, slots % C
    return pool[blocks, :, 0, offs], pool[blocks, :, 1, offs]


def attend_masked(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """Exact attention of q [T, Hq, D] over k, v [S, Hkv, D] where mask [T, Hq, S].

    Half-precision inputs go to torch's fused CPU/GPU kernel as they are (it accumulates
    in float32); an additive mask is several times faster there than a boolean one.
    """
    Hq = q.shape[1]
    bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, NEG_INF)
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0),
        k.transpose(0, 1).unsqueeze(0),
        v.transpose(0, 1).unsqueeze(0),
        attn_mask=bias.transpose(0, 1).unsqueeze(0),
        scale=scale,
        enable_gqa=Hq != k.shape[1],
    )
    return out[0].transpose(0, 1)


def attend_groups(
    q: torch.Tensor,
    pool: torch.Tensor,
    group_rows: torch.Tensor,
    token_ok: torch.Tensor,
    scale: float,
    bank: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention over gathered 16-token groups.

    q [R, Hq, D]; group_rows [R, Hq, G] are K rows of the pool viewed as
    [blocks*H*2*M, 16, D], i.e. ((block*H + kv_head)*2)*M + group (the V row is M later);
    token_ok [R, Hq, G, 16] marks real, visible keys.  Returns [R, Hq, D] float32.
    With a device bank (bank.py) [slots, H, 2, 64, D], a row r < 0 is row -r-1 of the bank
    viewed the same way.
    """
    nb, H, _, C, D = pool.shape
    M = C // 16
    rows = pool.view(nb * H * 2 * M, 16, D)
    dt = _math_dtype(q)
    if bank is None:
        k = rows[group_rows].to(dt)  # [R, Hq, G, 16, D]
        v = rows[group_rows + M].to(dt)  # V half of the same block/head sits M rows later
    else:
        in_bank = group_rows < 0
        k = rows[group_rows.clamp(min=0)]
        v = rows[group_rows.clamp(min=0) + M]
        bank_rows = bank.view(-1, 16, D)
        b = -group_rows[in_bank] - 1  # CPU: a data-dependent size costs nothing
        k[in_bank] = bank_rows[b].to(k.device)
        v[in_bank] = bank_rows[b + M].to(v.device)
        k, v = k.to(dt), v.to(dt)
    R, Hq, G = group_rows.shape
    # slots that are not visible (the own chunk's future, padding) may hold anything,
    # even NaN bit patterns in never-written memory: 0 * NaN would poison the sum
    v = v.masked_fill(~token_ok.unsqueeze(-1), 0.0)
    logits = torch.einsum("rhd,rhgtd->rhgt", q.to(dt), k) * scale
    logits = logits.masked_fill(~token_ok, float("-inf")).view(R, Hq, G * 16)
    probs = torch.softmax(logits, dim=-1).view(R, Hq, G, 16)
    # a row with no visible key (a padded row of a CUDA-graph batch) gives 0, as the
    # kernel does, not softmax's NaN; real NaNs (unwritten memory read) still show
    probs = probs.masked_fill(~token_ok.flatten(2).any(-1).view(R, Hq, 1, 1), 0.0)
    return torch.einsum("rhgt,rhgtd->rhd", probs, v)


def check_sketch_pages(rot: SummaryRotation, summ: torch.Tensor) -> None:
    if rot.sketch and summ.dtype != torch.float32:
        raise ValueError(
            "sketch pages are float32 bit fields; this summary tensor is "
            f"{summ.dtype} (use float32 pages with group_score 'sketch')"
        )


def summarize_pool(
    pool: torch.Tensor, blocks: torch.Tensor, summ: torch.Tensor, rot: SummaryRotation
) -> None:
    """summ[blocks] = summaries of the pool's chunks `blocks` (entries < 0 skipped)."""
    if blocks.numel() == 0:
        return
    keys = pool[:, :, 0].transpose(1, 2)  # [nb, 64, H, D] view
    blocks = blocks[blocks >= 0]  # host sync: the torch path is not graph-safe anyway
    check_sketch_pages(rot, summ)
    summ[blocks] = summarize_blocks(keys[blocks], rot).to(summ.dtype)


def decode_groups(
    q: torch.Tensor,
    pos: torch.Tensor,
    block_table: torch.Tensor,
    n_chunks: int,
    summ: torch.Tensor,
    cfg: HGAConfig,
    sinks: int,
    local: int,
    groups: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per decode row and query head, the fixed-width list of 16-token groups it sees.

    q [R, Hq, D] decode queries at positions pos [R]; block_table [R, >= n_chunks];
    summ [nb, H_kv, 1+M, D].  Returns (pool K rows [R, Hq, Gt], token_ok [R, Hq, Gt, 16],
    group ids [R, Hq, Gt]) with Gt = (sinks + local + 1) * 4 + routed width: sinks, local
    window, own chunk (causal), then the routed groups in score order.
    """
    from .. import routing  # routing reads this module's sketch helpers: import on use

    C, gs = cfg.chunk_size, cfg.group_size
    M = C // gs
    R, Hq, _ = q.shape
    H = summ.shape[1]
    dev = q.device
    bt = block_table[:, :n_chunks].long()  # [R, n]
    pages = summ[bt]  # [R, n, H, 1+M, D]
    var = pages[:, :, :, 0] if cfg.group_score == "mean_std" else None
    _, open_g, open_ok = routing.route(
        q, pos, pages[:, :, :, 0], pages[:, :, :, 1:].transpose(2, 3), cfg, groups, group_var=var
    )
    c = (pos // C).unsqueeze(1)  # [R, 1]
    sink_j = torch.arange(sinks, device=dev).unsqueeze(0).expand(R, -1)
    local_j = c - local + torch.arange(local, device=dev).unsqueeze(0)
    whole_j = torch.cat([sink_j, local_j, c], dim=1)  # chunks seen whole
    whole_ok = torch.cat(
        [
            sink_j < c,
            (local_j >= cfg.sink_chunks) & (local_j >= 0),
            torch.ones_like(c, dtype=torch.bool),
        ],
        dim=1,
    )
    whole_g = whole_j.clamp(min=0).unsqueeze(-1) * M + torch.arange(M, device=dev)
    whole_g = whole_g.reshape(R, 1, -1).expand(R, Hq, -1)
    whole_ok = whole_ok.repeat_interleave(M, dim=1).unsqueeze(1).expand(R, Hq, -1)
    gid = torch.cat([whole_g, open_g], dim=-1)  # [R, Hq, Gt]
    gok = torch.cat([whole_ok, open_ok], dim=-1)
    chunk = (gid // M).clamp(max=bt.shape[1] - 1)  # invalid slots point anywhere real
    block = bt.gather(1, chunk.reshape(R, -1)).reshape(gid.shape)
    kv_head = (torch.arange(Hq, device=dev) // (Hq // H)).view(1, Hq, 1)
    rows = ((block * H + kv_head) * 2) * M + gid % M
    key_pos = (gid * gs).unsqueeze(-1) + torch.arange(gs, device=dev)
    token_ok = gok.unsqueeze(-1) & (key_pos <= pos.view(R, 1, 1, 1))  # own chunk causal
    return rows, token_ok, gid


class TorchOps:
    """HGA's ops in torch: any device and dtype.  ``CudaOps`` has the same methods."""

    kernels = False  # CudaOps: True

    @staticmethod
    def write_kv(pool, key, value, slots, bank=None) -> None:
        """bank: a bank.DeviceBank bound to this pool; its resident blocks get the writes too."""
        write_kv(pool, key, value, slots)
        if bank is not None:
            bank.write_through(key, value, slots[: key.shape[0]])

    @staticmethod
    def summarize_blocks(k, rot: SummaryRotation) -> torch.Tensor:
        return summarize_blocks(k, rot)

    @staticmethod
    def summarize_pool(pool, blocks, summ, rot: SummaryRotation) -> None:
        summarize_pool(pool, blocks, summ, rot)

    @staticmethod
    def decode_groups(
        q,
        pos,
        block_table,
        n_chunks: int,
        summ,
        cfg: HGAConfig,
        sinks: int,
        local: int,
        groups: int,
    ):
        return decode_groups(q, pos, block_table, n_chunks, summ, cfg, sinks, local, groups)

    @staticmethod
    def attend_groups(
        q,
        pool,
        group_rows,
        token_ok,
        scale: float,
        n_shared: int = 0,
        out: torch.Tensor | None = None,
        kernel: str = "auto",
        bank: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """n_shared and kernel only steer the CUDA kernels; the result is the same."""
        res = attend_groups(q, pool, group_rows, token_ok, scale, bank)
        return res if out is None else out.copy_(res)

    gather_tokens = staticmethod(gather_tokens)
    attend_masked = staticmethod(attend_masked)
