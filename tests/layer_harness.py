"""Drives HGALayer the way vLLM does: paged blocks, mixed prefill/decode steps.

Not a mock of vLLM: it plans and counts steps as the backend's builder does
(plan.HGAMetadata.plan, plan.count_step) and checks the layer against the exact
reference (devkit.reference).  With ``graph_buffers`` it plans single-token steps in
the fixed layout vLLM's full decode CUDA graphs replay (plan.py), padded like vLLM pads
them: extra requests with no query, sequence length 0, null block table rows, slot -1.
"""

from __future__ import annotations

import random

import torch

from vllm_hga.attention import GROUPS, HGALayer
from vllm_hga.bank import DeviceBank
from vllm_hga.config import CHUNK_SIZE
from vllm_hga.plan import DecodeBuffers, HGAMetadata, count_step
from vllm_hga.rope import RopeSpec

MAX_PAD = 4  # padded requests a step may add (pad_reqs)


class PagedRun:
    """Requests with random post-RoPE keys, stored in shuffled blocks."""

    def __init__(
        self,
        lengths,
        cfg,
        num_heads,
        num_kv_heads,
        head_size=64,
        dtype=torch.float32,
        seed=0,
        theta=10000.0,
        graph_buffers=False,
        decodes_first=False,
    ):
        gen = torch.Generator().manual_seed(seed)
        self.cfg, self.dtype = cfg, dtype
        self.rope = RopeSpec.default(head_size, theta)
        self.H, self.Hkv, self.D = num_heads, num_kv_heads, head_size
        self.q, self.k, self.v = [], [], []
        for S in lengths:
            raw = torch.randn(S, num_kv_heads, head_size, generator=gen, dtype=torch.float64)
            self.k.append(self.rope.apply(raw, torch.arange(S)).to(dtype))
            self.v.append(torch.randn(S, num_kv_heads, head_size, generator=gen).to(dtype))
            self.q.append((torch.randn(S, num_heads, head_size, generator=gen) * 2).to(dtype))
        blocks_per = [-(-S // CHUNK_SIZE) for S in lengths]
        ids = list(range(1, 1 + sum(blocks_per)))  # block 0 is vLLM's null block
        random.Random(seed).shuffle(ids)
        width = -(-(max(lengths) + CHUNK_SIZE) // CHUNK_SIZE)  # vLLM's: max_model_len's blocks
        self.block_table = torch.zeros(len(lengths), width, dtype=torch.int32)
        for r, nb in enumerate(blocks_per):
            self.block_table[r, :nb] = torch.tensor(ids[:nb], dtype=torch.int32)
            ids = ids[nb:]
        nb_total = 1 + sum(blocks_per)
        # poisoned: any read of a slot that was never written shows up as NaN
        self.pool = torch.full(
            (nb_total, num_kv_heads, 2, CHUNK_SIZE, head_size), float("nan"), dtype=dtype
        )
        self.summ = torch.full((nb_total, num_kv_heads, 1 + GROUPS, head_size), float("nan"))
        max_model_len = max(lengths) + CHUNK_SIZE
        self.layer = HGALayer(
            cfg, self.rope, num_heads, num_kv_heads, head_size, head_size**-0.5, max_model_len
        )
        # the builder's fixed-layout buffers (room for MAX_PAD padded requests)
        self.buffers = (
            DecodeBuffers.allocate(len(lengths) + MAX_PAD, max_model_len, "cpu")
            if graph_buffers
            else None
        )
        self.decodes_first = decodes_first  # vLLM's order with reorder_batch_threshold = 1
        chunks = cfg.bank_size("cpu")  # the device bank, in ordinary memory on CPU
        if chunks:
            self.layer.bank = DeviceBank(chunks, num_kv_heads, head_size, dtype, "cpu")
        self.done = [0] * len(lengths)

    def step(self, schedule: dict[int, int], pad_reqs: int = 0) -> dict[int, torch.Tensor]:
        """Run one step: schedule maps request -> number of new tokens; pad_reqs padded
        requests follow (as in a padded CUDA-graph batch).  Returns outputs."""
        reqs = self._order(schedule)
        qs, ks, vs, slots, qsl, seq = [], [], [], [], [0], []
        for r in reqs:
            a, n = self.done[r], schedule[r]
            pos = torch.arange(a, a + n)
            qs.append(self.q[r][a : a + n])
            ks.append(self.k[r][a : a + n])
            vs.append(self.v[r][a : a + n])
            slots.append(
                self.block_table[r, pos // CHUNK_SIZE].long() * CHUNK_SIZE + pos % CHUNK_SIZE
            )
            qsl.append(qsl[-1] + n)
            seq.append(a + n)
        T = qsl[-1] + pad_reqs  # a padded request's token row: slot -1, no request owns it
        qsl += [qsl[-1]] * pad_reqs
        seq += [0] * pad_reqs
        bt = torch.cat(
            [
                self.block_table[reqs],
                torch.zeros(pad_reqs, self.block_table.shape[1], dtype=torch.int32),
            ]
        )
        pad = 3 + pad_reqs  # vLLM may pad the batch; padded rows carry slot -1
        slot_mapping = torch.cat(slots + [torch.full((pad,), -1)])
        q = torch.cat(qs + [torch.zeros(pad, self.H, self.D, dtype=self.dtype)])
        k = torch.cat(ks + [torch.zeros(pad, self.Hkv, self.D, dtype=self.dtype)])
        v = torch.cat(vs + [torch.zeros(pad, self.Hkv, self.D, dtype=self.dtype)])
        md = HGAMetadata.plan(
            qsl,
            seq,
            bt,
            slot_mapping,
            T,
            buffers=self.buffers,
            seq_lens_dev=torch.tensor(seq, dtype=torch.int32),
        )
        count_step(
            self.layer.metrics,
            md,
            self.cfg,
            layers=1,
            dense_layers=int(self.layer.dense),
            num_heads=self.H,
            num_kv_heads=self.Hkv,
            head_size=self.D,
            itemsize=self.pool.element_size(),
        )
        out = torch.full((T, self.H, self.D), float("nan"), dtype=self.dtype)
        self.layer.forward(q[:T], k[:T], v[:T], self.pool, self.summ, md, out)
        self.last_md, self.last_pad = md, out[qsl[-1] :]
        result = {}
        for i, r in enumerate(reqs):
            result[r] = out[qsl[i] : qsl[i + 1]]
            self.done[r] += schedule[r]
        return result

    def _order(self, schedule: dict[int, int]) -> list[int]:
        reqs = sorted(schedule)
        if self.decodes_first:
            reqs.sort(key=lambda r: schedule[r] > 1)  # stable: single-token requests first
        return reqs


def run_requests(run: PagedRun, lengths, prefill_chunk: int, decode_tail: int):
    """Chunked prefill of all requests together, then `decode_tail` decode steps each."""
    outs = {r: [] for r in range(len(lengths))}
    target = {r: max(L - decode_tail, 1) for r, L in enumerate(lengths)}
    while any(run.done[r] < target[r] for r in target):
        sched = {
            r: min(prefill_chunk, target[r] - run.done[r])
            for r in target
            if run.done[r] < target[r]
        }
        for r, o in run.step(sched).items():
            outs[r].append(o)
    while any(run.done[r] < L for r, L in enumerate(lengths)):
        for r, o in run.step({r: 1 for r, L in enumerate(lengths) if run.done[r] < L}).items():
            outs[r].append(o)
    return {r: torch.cat(o) for r, o in outs.items()}
