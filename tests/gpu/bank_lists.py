"""Decode group lists shaped like routing's (cuda_ops.decode_groups), for bank tests, on any
device and without summaries: requests over one shuffled paged pool, each decoding a token
per step; a request that reaches its length finishes and a new one takes free blocks (as
vLLM reuses them), and the written token slots come back for ``DeviceBank.invalidate``.

Per request and step: sinks, local window, own chunk (causal) as fixed columns, then per
query head `groups` routed groups from a slowly drifting set of `topk` closed chunks,
ascending, then invalid padding pointing at the request's first block (as routing.cu).
"""

from __future__ import annotations

import random

import torch

CHUNK, M = 64, 4


class DecodeLists:
    def __init__(
        self,
        nb: int,
        R: int,
        Hq: int,
        Hkv: int,
        sinks: int = 1,
        local: int = 2,
        topk: int = 8,
        groups: int = 12,
        lengths=(300, 4000),
        seed: int = 0,
        device="cpu",
        drift: float = 0.15,
        max_decode: int | None = None,
    ):
        self.rng = random.Random(seed)
        self.nb, self.R, self.Hq, self.Hkv = nb, R, Hq, Hkv
        self.F, self.L, self.topk, self.groups = sinks, local, topk, groups
        self.lengths, self.drift, self.device = lengths, drift, device
        self.max_decode = max_decode  # decode steps per request at most (None: up to half)
        self.h2m = Hkv * 2 * M
        self.nfix = (sinks + local + 1) * M
        self.Gt = self.nfix + groups
        self.free = list(range(1, nb))  # block 0: vLLM's null block
        self.rng.shuffle(self.free)
        self.reqs: list[dict | None] = [None] * R
        self.pending: list[int] = []  # token slots written since the last step

    @property
    def own_cols(self) -> tuple[int, int]:
        return self.nfix - M, self.nfix

    def _start(self, r: int) -> None:
        end = self.rng.randint(*self.lengths)
        lo = max(1, end // 2, end - (self.max_decode or end))
        start = self.rng.randint(lo, end - 1)  # prompt length
        n = -(-end // CHUNK)
        if len(self.free) < n:
            raise RuntimeError("pool too small for the requests")
        bt = [self.free.pop() for _ in range(n)]
        self.reqs[r] = {"bt": bt, "pos": start - 1, "end": end, "hot": []}
        self.pending += [bt[t // CHUNK] * CHUNK + t % CHUNK for t in range(start)]  # prefill

    def _route(self, req: dict, c: int) -> None:
        cand = list(range(self.F, c - self.L))
        hot = [j for j in req["hot"] if j in cand and self.rng.random() > self.drift]
        rest = [j for j in cand if j not in hot]
        self.rng.shuffle(rest)
        req["hot"] = hot + rest[: max(0, min(self.topk, len(cand)) - len(hot))]

    def step(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows [R, Hq, Gt] int64, token_ok [R, Hq, Gt, 16] bool, slots written since the
        last step [T] int64, with -1 padding) after every request advanced one token."""
        for r in range(self.R):
            req = self.reqs[r]
            if req is not None and req["pos"] + 1 >= req["end"]:
                freed = list(req["bt"])  # finished: its blocks are taken again first
                self.rng.shuffle(freed)
                self.free += freed
                req = self.reqs[r] = None
            if req is None:
                self._start(r)
                req = self.reqs[r]
            req["pos"] += 1
            p = req["pos"]
            self.pending.append(req["bt"][p // CHUNK] * CHUNK + p % CHUNK)
        R, Hq, Gt = self.R, self.Hq, self.Gt
        rows, n_ok = [], []  # per (request, head, column): pool K row, valid tokens
        rep = Hq // self.Hkv
        for req in self.reqs:
            bt, pos = req["bt"], req["pos"]
            c = pos // CHUNK
            self._route(req, c)
            fixed = []  # (chunk, ok) of the sinks, local window, own chunk
            for j in range(self.F):
                fixed.append((j, j < c))
            for i in range(self.L):
                j = c - self.L + i
                fixed.append((j, j >= self.F and j >= 0))
            fixed.append((c, True))
            groups = [(j, m) for j in req["hot"] for m in range(M)]
            for h in range(Hq):
                base = (h // rep) * 2 * M  # kv head offset inside a block's rows
                cols, oks = [], []
                for j, valid in fixed:
                    jc = max(j, 0)
                    for m in range(M):
                        cols.append(bt[jc] * self.h2m + base + m)
                        oks.append(min(16, max(0, pos - (jc * M + m) * 16 + 1)) if valid else 0)
                for j, m in sorted(self.rng.sample(groups, min(self.groups, len(groups)))):
                    cols.append(bt[j] * self.h2m + base + m)
                    oks.append(16)
                cols += [bt[0] * self.h2m + base] * (Gt - len(cols))
                oks += [0] * (Gt - len(oks))
                rows.append(cols)
                n_ok.append(oks)
        rows = torch.tensor(rows, dtype=torch.long).view(R, Hq, Gt)
        ok = torch.arange(16) < torch.tensor(n_ok).view(R, Hq, Gt, 1)
        slots = torch.tensor(self.pending + [-1] * self.rng.randint(0, 5), dtype=torch.long)
        self.pending = []
        dev = self.device
        return rows.to(dev), ok.to(dev), slots.to(dev)


# ----------------------------------------------------------------------------- checks
def assert_same(ref, fused, host: torch.Tensor | None, order: bool = True) -> None:
    """Tables, counters, bank data; order: the LRU order (valid right after an admission;
    invalidation leaves it to the next admission to correct)."""
    cap = fused.capacity
    assert torch.equal(ref.slot_of_block, fused.slot_of_block), "slot_of_block"
    assert torch.equal(ref.block_of_slot, fused.block_of_slot), "block_of_slot"
    # (the torch path's padding writes land in last_use's spare entry: not compared)
    assert torch.equal(ref.last_use[:cap], fused.last_use[:cap]), "last_use"
    assert torch.equal(ref.meta[:7], fused.meta[:7]), (ref.meta.tolist(), fused.meta.tolist())
    if order:
        lru = torch.sort(fused.last_use[:cap], stable=True).indices.to(torch.int32)
        assert torch.equal(fused.order.view(2, cap)[fused.step & 1], lru), "LRU order"
    held = (fused.block_of_slot[:cap] >= 0).nonzero()[:, 0]
    assert int((fused.slot_of_block[:-1] >= 0).sum()) == held.numel()
    if host is not None and held.numel():
        blocks = fused.block_of_slot[held].cpu()
        assert torch.equal(fused.data[held].cpu(), host[blocks]), "bank data != pool blocks"


def run_steps(lists: DecodeLists, ref, fused, pool, host, steps: int, int32_every: int = 3):
    """Both banks (DeviceBank: ref on the torch path, fused on the kernels) through `steps`
    decode steps of `lists`: invalidate, admit, compare rows and state after each."""
    stats = {"hits": 0, "misses": 0, "admitted": 0, "dropped": 0}
    for i in range(steps):
        rows, ok, slots = lists.step()
        before = int((fused.slot_of_block >= 0).sum())
        ref.invalidate(slots)
        fused.invalidate(slots.int() if i % int32_every == 0 else slots)
        stats["dropped"] += before - int((fused.slot_of_block >= 0).sum())
        want = ref.admit(pool, rows, ok, lists.own_cols)
        got = fused.admit(pool, rows, ok, lists.own_cols)
        assert torch.equal(got, want), f"encoded rows differ at step {i}"
        assert_same(ref, fused, host)
        stats["hits"] += int(fused.meta[5])
        stats["misses"] += int(fused.meta[6])
        stats["admitted"] += int(fused.meta[1])
    return stats
