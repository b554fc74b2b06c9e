"""Drives HGALayer the way vLLM does: paged blocks, mixed prefill/decode steps.

Not a mock of vLLM: it plans steps with the backend's own HGAMetadata.plan and checks
the layer against the exact reference (vllm_hga.reference).
"""

from __future__ import annotations

import random

import torch

from vllm_hga.attention import GROUPS, HGALayer
from vllm_hga.bank import DeviceBank
from vllm_hga.backend import HGAMetadata
from vllm_hga.config import CHUNK_SIZE
from vllm_hga.rope import RopeSpec


class PagedRun:
    """Requests with random post-RoPE keys, stored in shuffled blocks."""

    def __init__(self, lengths, cfg, num_heads, num_kv_heads, head_size=64, dtype=torch.float32,
                 seed=0, theta=10000.0):
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
        width = max(blocks_per)
        self.block_table = torch.zeros(len(lengths), width, dtype=torch.int32)
        for r, nb in enumerate(blocks_per):
            self.block_table[r, :nb] = torch.tensor(ids[:nb], dtype=torch.int32)
            ids = ids[nb:]
        nb_total = 1 + sum(blocks_per)
        # poisoned: any read of a slot that was never written shows up as NaN
        self.pool = torch.full((nb_total, num_kv_heads, 2, CHUNK_SIZE, head_size), float("nan"),
                               dtype=dtype)
        self.summ = torch.full((nb_total, num_kv_heads, 1 + GROUPS, head_size), float("nan"))
        self.layer = HGALayer(cfg, self.rope, num_heads, num_kv_heads, head_size,
                              head_size ** -0.5, max(lengths) + CHUNK_SIZE)
        chunks = cfg.bank_size("cpu")  # the device bank, in ordinary memory on CPU
        if chunks:
            self.layer.bank = DeviceBank(chunks, num_kv_heads, head_size, dtype, "cpu")
        self.done = [0] * len(lengths)

    def step(self, schedule: dict[int, int]) -> dict[int, torch.Tensor]:
        """Run one step: schedule maps request -> number of new tokens.  Returns outputs."""
        reqs = sorted(schedule)
        qs, ks, vs, slots, qsl, seq = [], [], [], [], [0], []
        for r in reqs:
            a, n = self.done[r], schedule[r]
            pos = torch.arange(a, a + n)
            qs.append(self.q[r][a:a + n])
            ks.append(self.k[r][a:a + n])
            vs.append(self.v[r][a:a + n])
            slots.append(self.block_table[r, pos // CHUNK_SIZE].long() * CHUNK_SIZE
                         + pos % CHUNK_SIZE)
            qsl.append(qsl[-1] + n)
            seq.append(a + n)
        bt = self.block_table[reqs]
        pad = 3  # vLLM may pad the batch; padded rows carry slot -1
        slot_mapping = torch.cat(slots + [torch.full((pad,), -1)])
        T = qsl[-1]
        q = torch.cat(qs + [torch.zeros(pad, self.H, self.D, dtype=self.dtype)])
        k = torch.cat(ks + [torch.zeros(pad, self.Hkv, self.D, dtype=self.dtype)])
        v = torch.cat(vs + [torch.zeros(pad, self.Hkv, self.D, dtype=self.dtype)])
        md = HGAMetadata.plan(qsl, seq, bt, slot_mapping, T)
        out = torch.full((T, self.H, self.D), float("nan"), dtype=self.dtype)
        self.layer.forward(q[:T], k[:T], v[:T], self.pool, self.summ, md, out)
        result = {}
        for i, r in enumerate(reqs):
            result[r] = out[qsl[i]:qsl[i + 1]]
            self.done[r] += schedule[r]
        return result
