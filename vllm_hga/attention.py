"""One layer of HGA attention over the host pool and the summary pages.

Independent of vLLM's classes so that tests can drive it with planned metadata
(``plan.HGAMetadata.plan``) on any device.  ``HGAAttentionImpl`` is a thin wrapper.
Kernels or torch is decided once, here at construction (``ops.ops_for``); a decode step
then goes backend -> ``HGALayer.forward`` -> ops method -> kernel.
"""

from __future__ import annotations

import torch

from . import routing
from .config import CHUNK_SIZE, GROUP_SIZE, HGAConfig
from .ops import SummaryRotation, TorchOps, ops_for
from .rope import RopeSpec

GROUPS = CHUNK_SIZE // GROUP_SIZE


class HGALayer:
    def __init__(
        self,
        cfg: HGAConfig,
        rope: RopeSpec,
        num_heads: int,
        num_kv_heads: int,
        head_size: int,
        scale: float,
        max_model_len: int,
        dense: bool = False,
        device: torch.device | str = "cpu",
        metrics=None,
        bank=None,
        dtype: torch.dtype | None = None,
        ops: TorchOps | None = None,
        tiers=None,
    ):
        self.cfg, self.rope, self.dense = cfg, rope, dense
        self.metrics = metrics  # a metrics.WorkerMetrics, or None (tests)
        self.bank = bank  # a bank.DeviceBank (decode working set in device memory), or None
        # TorchOps or CudaOps, for good (ops.kernel_blockers says why not kernels); tests
        # pass one to compare the two on the same inputs
        self.ops = ops if ops is not None else ops_for(cfg, device, dtype, head_size)
        if tiers is None:  # tests: a private owner (it allocates only what is asked for)
            from .tiers import EngineTiers

            tiers = EngineTiers(cfg)
        self.tiers = tiers  # owns the CUDA prefill scratch
        self.num_heads, self.num_kv_heads, self.head_size = num_heads, num_kv_heads, head_size
        self.scale = float(scale)
        self.rot = SummaryRotation(rope, cfg, device)
        # Fixed decode widths: never more than a max-length request can use.
        max_chunks = -(-max_model_len // CHUNK_SIZE)
        self.max_chunks = max_chunks  # sizes the CUDA prefill scratch (ops/cuda_prefill.py)
        self.sinks = min(cfg.sink_chunks, max_chunks)
        self.local = min(cfg.local_chunks, max_chunks)
        self.groups = min(cfg.groups_per_query, max_chunks * GROUPS)
        self.n_shared = (self.sinks + self.local + 1) * GROUPS  # columns all heads share
        kernel_prefill = self.ops.kernels and not dense
        self._prefill = self._prefill_kernels if kernel_prefill else self._prefill_torch

    def forward(
        self,
        q: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        pool: torch.Tensor,
        summ: torch.Tensor,
        md,
        out: torch.Tensor,
    ) -> None:
        """q [T, Hq, D], key/value [T, Hkv, D] of this step; writes out [T, Hq, D].

        pool [nb, Hkv, 2, 64, D] full K/V; summ [nb, Hkv, 1+M, D] float32 summaries;
        md a plan.HGAMetadata.  Every branch below is decided by host values of the plan,
        which for a fixed-layout plan (CUDA graphs) depend only on its batch size.
        """
        ops = self.ops
        slots = md.slot_mapping[: key.shape[0]]
        bank = None if self.dense else self.bank
        if bank is not None:
            bank.bind(pool)
        ops.write_kv(pool, key, value, slots, bank)  # resident blocks are written through
        if md.closing_blocks.numel():  # fixed layout: always, its -1 entries are skipped
            ops.summarize_pool(pool, md.closing_blocks, summ, self.rot)
        if md.num_decodes and self.dense:
            self._dense_decode(q, pool, summ, md, out)
        elif md.num_decodes:
            # decode rows: the body of self.decode, inlined so that the kernels launch one
            # frame below this one; builder-counted metrics (plan.count_step)
            qd = md.decode_queries(q)
            rows, token_ok, _ = ops.decode_groups(
                qd,
                md.decode_pos,
                md.decode_block_table(),
                md.decode_chunks,
                summ,
                self.cfg,
                self.sinks,
                self.local,
                self.groups,
            )
            rows, bank_data = self._through_bank(pool, rows, token_ok)
            if md.decode_prefix:  # rows [0, R): attention writes out[:R] in its dtype
                ops.attend_groups(
                    qd,
                    pool,
                    rows,
                    token_ok,
                    self.scale,
                    self.n_shared,
                    out=out[: md.num_decodes],
                    bank=bank_data,
                )
            else:
                out[md.decode_rows] = ops.attend_groups(
                    qd, pool, rows, token_ok, self.scale, self.n_shared, bank=bank_data
                ).to(out.dtype)
        if md.prefill_reqs:
            self._prefill(q, pool, summ, md, out)

    def _dense_decode(self, q, pool, summ, md, out: torch.Tensor) -> None:
        for row, r in md.decode_pairs:  # host lists: no device sync
            out[row : row + 1] = self.attend_prefix(q, pool, summ, md, r, row, 1, count=False)

    def _prefill_kernels(self, q, pool, summ, md, out: torch.Tensor) -> None:
        """All queries of a request at once (ops/cuda_prefill.py)."""
        sc = self.tiers.prefill_scratch(
            self.max_chunks, self.num_kv_heads, self.head_size, pool.dtype, q.device
        )
        count = self._count_attention if self.metrics is not None else None
        for r in md.prefill_reqs:
            start, n = md.tok_starts[r], md.q_lens[r]
            self.ops.prefill(
                q[start : start + n],
                md.q_starts[r],
                pool,
                summ,
                md.block_table[r],
                self.cfg,
                self.sinks,
                self.local,
                self.groups,
                self.scale,
                out[start : start + n],
                sc,
                count=count,
            )

    def _prefill_torch(self, q, pool, summ, md, out: torch.Tensor) -> None:
        for r in md.prefill_reqs:
            start, n = md.tok_starts[r], md.q_lens[r]
            out[start : start + n] = self.attend_prefix(q, pool, summ, md, r, start, n)

    # ------------------------------------------------------------------ prefill
    def attend_prefix(
        self, q, pool, summ, md, r: int, row: int, n: int, count: bool = True
    ) -> torch.Tensor:
        """Queries rows [row, row+n) of request r, one chunk of queries at a time (the torch
        path: CPU, and CUDA inputs the kernels do not cover; see ops/cuda_prefill.py).

        The queries of one chunk share their sinks, local window and own chunk; only the
        routed groups differ, so each chunk gathers its window plus the union of the
        groups its queries opened, and attends under a per-query mask.
        """
        q_start = md.q_starts[r]
        S = q_start + n
        t = torch.arange(S, device=q.device)
        slots = md.block_table[r, t // CHUNK_SIZE].long() * CHUNK_SIZE + t % CHUNK_SIZE
        k, v = self.ops.gather_tokens(pool, slots)
        n_closed = S // CHUNK_SIZE
        pages = summ[md.block_table[r, :n_closed].long()]  # [n, H, 1+M, D]
        chunk_sum = pages[:, :, 0].unsqueeze(0)
        group_sum = pages[:, :, 1:].transpose(1, 2).unsqueeze(0)
        out = torch.empty(n, self.num_heads, self.head_size, dtype=q.dtype, device=q.device)
        first = q_start
        while first < S:
            last = min(S, (first // CHUNK_SIZE + 1) * CHUNK_SIZE)  # queries of one chunk
            pos = torch.arange(first, last, device=q.device)
            qb = q[row + first - q_start : row + last - q_start]
            keys, mask = self._block_keys(qb, pos, chunk_sum, group_sum)
            out[first - q_start : last - q_start] = self.ops.attend_masked(
                qb, k[keys], v[keys], mask, self.scale
            ).to(q.dtype)
            if count:
                self._count_attention(mask.sum(), pos, keys.numel() * k[0].numel() * 2 * k.itemsize)
            first = last
        return out

    def _block_keys(self, qb, pos, chunk_sum, group_sum) -> tuple[torch.Tensor, torch.Tensor]:
        """Key indices [K] and visibility [Tb, Hq, K] for queries of one chunk."""
        C, gs = CHUNK_SIZE, GROUP_SIZE
        dev = qb.device
        c = int(pos[0]) // C
        F, L = self.cfg.sink_chunks, self.cfg.local_chunks
        window = [
            torch.arange(min(F, c) * C, device=dev),
            torch.arange(min(c, max(F, c - L)) * C, c * C, device=dev),
            torch.arange(c * C, int(pos[-1]) + 1, device=dev),
        ]
        if self.dense:
            window = [torch.arange(int(pos[-1]) + 1, device=dev)]
        win = torch.cat(window)
        win_ok = (win.unsqueeze(0) <= pos.unsqueeze(1)).unsqueeze(1)  # own chunk causal
        win_ok = win_ok.expand(qb.shape[0], self.num_heads, -1)
        if self.dense or c <= F + L:
            return win, win_ok
        var = chunk_sum[:, :c] if self.cfg.group_score == "mean_std" else None
        _, ids, ok = routing.route(
            qb, pos, chunk_sum[:, :c], group_sum[:, :c], self.cfg, group_var=var
        )
        union = torch.unique(ids[ok])  # sorted group ids any query of the chunk opened
        member = torch.zeros(*ids.shape[:2], union.numel() + 1, dtype=torch.bool, device=dev)
        slot = torch.where(ok, torch.searchsorted(union, ids), union.numel())
        member = member.scatter_(-1, slot, True)[..., :-1]  # [Tb, Hq, U]
        keys = torch.cat([win, (union.unsqueeze(1) * gs + torch.arange(gs, device=dev)).flatten()])
        mask = torch.cat([win_ok, member.repeat_interleave(gs, dim=-1)], dim=-1)
        return keys, mask

    # ------------------------------------------------------------------ decode
    def decode_groups(self, q, summ, md) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per decode row and query head, the fixed-width list of 16-token groups it sees.

        Returns (pool K rows [R, Hq, Gt], token_ok [R, Hq, Gt, 16], group ids [R, Hq, Gt])
        with Gt = (F + L + 1) * 4 + the routed width: sinks, local window, own chunk
        (causal), then the routed groups (ops.decode_groups).
        """
        return self.ops.decode_groups(
            md.decode_queries(q),
            md.decode_pos,
            md.decode_block_table(),
            md.decode_chunks,
            summ,
            self.cfg,
            self.sinks,
            self.local,
            self.groups,
        )

    def decode(self, q, pool, summ, md, out: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of the decode rows (what forward does for them): float32 [R, Hq, D],
        or written into out (any float dtype, e.g. out[:R] of the step's output)."""
        rows, token_ok, _ = self.decode_groups(q, summ, md)
        rows, bank_data = self._through_bank(pool, rows, token_ok)
        return self.ops.attend_groups(
            md.decode_queries(q),
            pool,
            rows,
            token_ok,
            self.scale,
            self.n_shared,
            out=out,
            bank=bank_data,
        )

    def _through_bank(self, pool, rows, token_ok) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(rows, bank data): every chunk of the lists goes through the bank, the open own
        chunk too (write_kv writes resident blocks through, so the bank never holds stale
        tokens); chunks the bank cannot take this step are read from the pool."""
        bank = None if self.dense else self.bank
        if bank is None:
            return rows, None
        return bank.admit(pool, rows, token_ok, (0, 0), self.metrics), bank.data

    # ------------------------------------------------------------------ metrics
    def _count_attention(self, keys, pos: torch.Tensor, kv_bytes) -> None:
        """Density of prefill rows exactly as the paper counts it: keys attended / dense
        causal pairs (device tensors, no sync).  Decode rows: plan.count_step."""
        if self.metrics is not None:
            self.metrics.add("keys_attended", keys)
            self.metrics.add("dense_pairs", (pos + 1).sum() * self.num_heads)
            self.metrics.add("kv_bytes_read", kv_bytes)
