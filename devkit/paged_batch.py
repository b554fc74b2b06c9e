"""A paged decode batch on the GPU: random queries, summaries and a shuffled KV pool, with
the block table, decode plan and HGA layer that go with them.  Shared by tests/gpu and
benchmarks/ (which must not import from tests/).
"""

from __future__ import annotations

import torch

from vllm_hga.attention import HGALayer
from vllm_hga.config import CHUNK_SIZE, GROUP_SIZE, HGAConfig
from vllm_hga.ops import TorchOps, cuda_ops
from vllm_hga.plan import HGAMetadata
from vllm_hga.rope import RopeSpec

DEV = "cuda"
M = CHUNK_SIZE // GROUP_SIZE


class PagedBatch:
    """Decode rows of requests with the given lengths over one shuffled paged pool (CUDA).

    Summaries of the open chunk and its unwritten pool slots hold NaN, so a kernel that
    reads what routing must not read shows it.
    """

    def __init__(
        self,
        lengths,
        Hq,
        Hkv,
        D,
        dtype=torch.bfloat16,
        seed=0,
        integer=False,
        uva=False,
        cfg: HGAConfig | None = None,
        with_pool=True,
    ):
        g = torch.Generator(device="cpu").manual_seed(seed)
        gd = torch.Generator(device=DEV).manual_seed(seed)
        self.cfg = cfg or HGAConfig()
        self.Hq, self.Hkv, self.D, self.dtype = Hq, Hkv, D, dtype
        self.lengths = list(lengths)
        R = len(lengths)
        blocks_per = [-(-S // CHUNK_SIZE) for S in lengths]
        nb = 1 + sum(blocks_per)
        perm = (1 + torch.randperm(nb - 1, generator=g)).tolist()
        self.n_chunks = max(blocks_per)
        self.bt = torch.zeros(R, self.n_chunks + 3, dtype=torch.int32)  # wider than needed
        for r, n in enumerate(blocks_per):
            self.bt[r, :n] = torch.tensor(perm[:n], dtype=torch.int32)
            perm = perm[n:]
        self.pos = torch.tensor([S - 1 for S in lengths])
        own = torch.tensor([int(self.bt[r, (S - 1) // CHUNK_SIZE]) for r, S in enumerate(lengths)])
        tail = [(S - 1) % CHUNK_SIZE + 1 for S in lengths]  # first unwritten slot of own chunk
        if integer:  # exact dot products in any order: ties are real and must break alike
            q = torch.randint(-3, 4, (R, Hq, D), generator=gd, device=DEV).float()
            summ = torch.randint(-3, 4, (nb, Hkv, 1 + M, D), generator=gd, device=DEV).float()
        else:
            q = torch.randn(R, Hq, D, generator=gd, device=DEV)
            summ = torch.randn(nb, Hkv, 1 + M, D, generator=gd, device=DEV)
        summ[own.to(DEV)] = float("nan")  # own (open) chunk: never summarised, never read
        summ[0] = float("nan")  # vLLM's null block
        self.q, self.summ = q.to(dtype), summ
        if with_pool:
            pool = torch.randn(nb, Hkv, 2, CHUNK_SIZE, D, generator=gd, device=DEV).to(dtype)
            self.pool_clean = pool.clone()
            for blk, off in zip(own.tolist(), tail):  # slots after the last token: garbage
                self.pool_clean[blk, :, :, off:] = 0
                pool[blk, :, :, off:] = float("nan")
            pool[0] = float("nan")
            if uva:
                self.host = pool.cpu().pin_memory()
                self.pool = cuda_ops.uva_view(self.host)
            else:
                self.pool = pool
        self.bt, self.pos = self.bt.to(DEV), self.pos.to(DEV)
        rope = RopeSpec.default(D, 1e6)
        self.layer = HGALayer(self.cfg, rope, Hq, Hkv, D, D**-0.5, max(lengths) + 64, device=DEV)
        # one decode query per request, as the backend plans it (rows [0, R))
        self.md = HGAMetadata.plan(
            list(range(R + 1)), self.lengths, self.bt, torch.full((R,), -1, device=DEV), R
        )

    def torch_groups(self):
        """The torch path, on the device: the same layer built with TorchOps."""
        L = self.layer
        torch_layer = HGALayer(
            self.cfg,
            L.rope,
            L.num_heads,
            L.num_kv_heads,
            L.head_size,
            L.scale,
            L.max_chunks * CHUNK_SIZE,
            device=DEV,
            ops=TorchOps(),
        )
        return torch_layer.decode_groups(self.q, self.summ, self.md)

    def cuda_groups(self):
        L = self.layer
        return cuda_ops.decode_groups(
            self.q,
            self.pos,
            self.bt,
            self.n_chunks,
            self.summ,
            self.cfg,
            L.sinks,
            L.local,
            L.groups,
        )

    @property
    def n_shared(self):
        return (self.layer.sinks + self.layer.local + 1) * M
