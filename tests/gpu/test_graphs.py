"""A full decode step of HGALayer (write_kv + summaries of closing chunks + routing +
attention) captured in a torch.cuda.CUDAGraph, as vLLM captures it with
UNIFORM_SINGLE_TOKEN_DECODE, then replayed over other batches written into the same
persistent inputs: other positions, block tables, q/K/V, padded rows, closing chunks.

Each replay is checked against eager runs of the same step from the same pool and
summaries: the fixed-layout plan eagerly (same kernels and launch shapes: bitwise equal)
and the variable layout the eager engine uses (equal within the dtype's tolerance).  The
pool and the summary pages are NaN-poisoned where unwritten, vLLM's null block included.
Run on the device machine: scripts/gpu_check.sh.  No vLLM import (plan.py is vLLM-free).
"""

from __future__ import annotations

import pytest
import torch
from gpu_common import TOL, rel_err

from vllm_hga.attention import HGALayer
from vllm_hga.bank import DeviceBank
from vllm_hga.config import CHUNK_SIZE, GROUP_SIZE
from vllm_hga.config import HGAConfig as _HGAConfig
from vllm_hga.ops import cuda_ops, torch_ops
from vllm_hga.plan import DecodeBuffers, HGAMetadata
from vllm_hga.rope import RopeSpec


def HGAConfig(**kw) -> _HGAConfig:
    """A config as an engine resolves it (group_score "sketch" unless set)."""
    return _HGAConfig.from_mapping(kw)


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DEV = "cuda"
M = CHUNK_SIZE // GROUP_SIZE
NAN = float("nan")
MAX_LEN = 16384  # max_model_len: the routing width of every captured step


class Rig:
    """N persistent decode rows over one paged pool, the way vLLM's model runner holds
    them: q/K/V/out, slot mapping, block table and device seq_lens at fixed addresses."""

    def __init__(
        self,
        cfg: HGAConfig,
        N: int,
        Hq: int,
        Hkv: int,
        D: int,
        uva: bool,
        dtype=torch.bfloat16,
        seed: int = 0,
    ):
        self.cfg, self.N, self.Hq, self.Hkv, self.D, self.dtype = cfg, N, Hq, Hkv, D, dtype
        self.W = MAX_LEN // CHUNK_SIZE
        self.gen = torch.Generator(device=DEV).manual_seed(seed)
        nb = 1 + 2 * N * self.W  # room for every row twice: rows move to other blocks
        self.free = 1 + torch.randperm(nb - 1, generator=torch.Generator().manual_seed(seed))
        self.free = self.free.tolist()
        pool = torch.full((nb, Hkv, 2, CHUNK_SIZE, D), NAN, dtype=dtype)  # block 0: null
        if uva:
            self.host = pool.pin_memory()
            self.pool = cuda_ops.uva_view(self.host)
        else:
            self.pool = pool.to(DEV)
        self.summ = torch.full((nb, Hkv, 1 + M, D), NAN, device=DEV)
        self.q = torch.zeros(N, Hq, D, dtype=dtype, device=DEV)
        self.k = torch.zeros(N, Hkv, D, dtype=dtype, device=DEV)
        self.v = torch.zeros_like(self.k)
        self.out = torch.full((N, Hq, D), NAN, dtype=dtype, device=DEV)
        self.slots = torch.full((N,), -1, dtype=torch.long, device=DEV)
        self.bt = torch.zeros(N, self.W, dtype=torch.int32, device=DEV)
        self.seq = torch.zeros(N, dtype=torch.int32, device=DEV)
        self.blocks: list[list[int] | None] = [None] * N
        self.buffers = DecodeBuffers.allocate(N, MAX_LEN, DEV)
        self.rope = RopeSpec.default(D, 1e6)
        self.rot = torch_ops.SummaryRotation(self.rope, cfg, DEV)
        self.layer = HGALayer(cfg, self.rope, Hq, Hkv, D, D**-0.5, MAX_LEN, device=DEV)
        # an explicit, small bank: the captured admission evicts every step ("auto" needs
        # vLLM's profiling to size it: no bank here)
        if cfg.bank_size("cuda") > 0:
            self.layer.bank = DeviceBank(cfg.bank_size("cuda"), Hkv, D, dtype, DEV)
        self.qsl, self.seq_list = [], []

    def new_request(self, r: int, S: int) -> None:
        """Row r becomes a request with S tokens in the pool (fresh blocks, summaries of
        its closed chunks), as after its prefill."""
        self.blocks[r] = [self.free.pop() for _ in range(self.W)]
        blk = torch.tensor(self.blocks[r], device=DEV)
        t = torch.arange(S, device=DEV)
        k = torch.randn(S, self.Hkv, self.D, generator=self.gen, device=DEV).to(self.dtype)
        v = torch.randn(S, self.Hkv, self.D, generator=self.gen, device=DEV).to(self.dtype)
        cuda_ops.write_kv(self.pool, k, v, blk[t // CHUNK_SIZE] * CHUNK_SIZE + t % CHUNK_SIZE)
        cuda_ops.summarize_pool(self.pool, blk[: S // CHUNK_SIZE], self.summ, self.rot)

    def set_step(self, lengths: list[int | None]) -> None:
        """Write one step into the persistent inputs: row r decodes the token at position
        lengths[r] (its context length); None is a padded row (vLLM: no query, seq_len 0,
        null block table row, slot -1)."""
        n_real = sum(S is not None for S in lengths)
        assert all(S is not None for S in lengths[:n_real]), "real rows come first"
        self.qsl = list(range(n_real + 1)) + [n_real] * (self.N - n_real)
        self.seq_list = [0 if S is None else S + 1 for S in lengths]
        slots, bt = [], torch.zeros(self.N, self.W, dtype=torch.int32)
        for r, S in enumerate(lengths):
            if S is None:
                slots.append(-1)
                continue
            bt[r] = torch.tensor(self.blocks[r], dtype=torch.int32)
            slots.append(self.blocks[r][S // CHUNK_SIZE] * CHUNK_SIZE + S % CHUNK_SIZE)
        self.slots.copy_(torch.tensor(slots))
        self.bt.copy_(bt)
        self.seq.copy_(torch.tensor(self.seq_list, dtype=torch.int32))
        for x in (self.q, self.k, self.v):
            x.copy_(torch.randn(x.shape, generator=self.gen, device=DEV) * 2)

    def plan(self, fixed: bool = True) -> HGAMetadata:
        return HGAMetadata.plan(
            self.qsl,
            self.seq_list,
            self.bt,
            self.slots,
            self.N,
            buffers=self.buffers if fixed else None,
            seq_lens_dev=self.seq,
        )

    def forward(self, md: HGAMetadata) -> None:
        self.layer.forward(self.q, self.k, self.v, self.pool, self.summ, md, self.out)

    def capture(self) -> tuple[torch.cuda.CUDAGraph, HGAMetadata]:
        """vLLM's capture: every row a dummy single-token request at position 0 on the null
        block, slots -1 (nothing written); one eager warm-up run first."""
        self.qsl, self.seq_list = list(range(self.N + 1)), [1] * self.N
        self.seq.fill_(1)
        self.slots.fill_(-1)
        self.bt.zero_()
        for x in (self.q, self.k, self.v):
            x.zero_()
        md = self.plan()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.forward(md)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.forward(md)
        return graph, md

    def state(self) -> tuple[torch.Tensor, torch.Tensor]:
        torch.cuda.synchronize()
        return self.pool.clone(), self.summ.clone()

    def restore(self, state) -> None:
        self.pool.copy_(state[0])
        self.summ.copy_(state[1])
        self.out.fill_(NAN)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit equal (sketch pages are bit fields in float32: NaN patterns are data)."""
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def written(pages: torch.Tensor) -> bool:
    """Every row of every page [n, H, 1+M, D] differs from the NaN poison somewhere (a
    sketch page may hold NaN bit patterns, so isnan cannot tell written from poisoned)."""
    poison = torch.tensor(NAN, dtype=pages.dtype).view(torch.int32).item()
    return bool((pages.contiguous().view(torch.int32) != poison).any(-1).all())


def seen_keys(rig: Rig, md: HGAMetadata, n_real: int) -> torch.Tensor:
    """Bool [n_real, Hq, MAX_LEN]: the keys each real row's heads attend (routing's lists,
    whatever their width and order)."""
    _, ok, gid = rig.layer.decode_groups(rig.q, rig.summ, md)
    ok, gid = ok[:n_real], gid[:n_real]
    keys = gid.unsqueeze(-1) * GROUP_SIZE + torch.arange(GROUP_SIZE, device=DEV)
    seen = torch.zeros(n_real, rig.Hq, MAX_LEN + 1, dtype=torch.bool, device=DEV)
    seen.scatter_(-1, torch.where(ok, keys, MAX_LEN).flatten(2), True)
    return seen[..., :MAX_LEN]


def replay_and_check(rig: Rig, graph, md_cap: HGAMetadata, lengths) -> None:
    rig.set_step(lengths)
    n_real = sum(S is not None for S in lengths)
    # routing of the real rows: the same keys in the fixed (graph) and variable layouts
    assert torch.equal(
        seen_keys(rig, rig.plan(), n_real), seen_keys(rig, rig.plan(fixed=False), n_real)
    )
    before = rig.state()
    md = rig.plan()  # build(): rewrites the buffers the graph reads
    assert (md.num_decodes, md.decode_chunks, md.closing_blocks.numel()) == (
        md_cap.num_decodes,
        md_cap.decode_chunks,
        md_cap.closing_blocks.numel(),
    )
    assert md.decode_pos.data_ptr() == md_cap.decode_pos.data_ptr()
    assert md.closing_blocks.data_ptr() == md_cap.closing_blocks.data_ptr()
    rig.out.fill_(NAN)
    graph.replay()
    got, after = rig.out.clone(), rig.state()
    # padded rows: no visible key, exactly 0 (no NaN from the null block they point at)
    assert torch.equal(got[n_real:], torch.zeros_like(got[n_real:]))
    closing = [b for b in md.closing_blocks.tolist() if b >= 0]
    assert closing and written(after[1][closing])  # a chunk closed, summarised

    rig.restore(before)
    torch.cuda.set_sync_debug_mode("error")  # the fixed step never waits for the device
    try:
        rig.forward(rig.plan())
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(rig.out, got)  # same kernels, same launch shapes: bitwise
    eager = rig.state()
    assert same(eager[0], after[0]) and same(eager[1], after[1])

    rig.restore(before)
    rig.forward(rig.plan(fixed=False))  # the variable layout of eager engine steps
    for r in range(n_real):
        assert rel_err(got[r], rig.out[r]) < TOL[rig.dtype], r
    rig.restore(after)  # continue from the replayed state


CONFIGS = {
    "default_no_bank": HGAConfig(bank_chunks=0),
    "default_small_bank": HGAConfig(bank_chunks=24),  # the defaults: group_score sketch
    "mean_std": HGAConfig(group_score="mean_std", bank_chunks=24),
    "paper": HGAConfig(
        sink_chunks=2,
        local_chunks=8,
        topk_chunks=20,
        topk_groups=32,
        chunk_score="summary",
        group_score="mean",
    ),
}


@pytest.mark.parametrize("cfg_name", list(CONFIGS))
@pytest.mark.parametrize("uva", [False, True], ids=["device_pool", "pinned_host_pool"])
@pytest.mark.parametrize("rep", [8, 3])
def test_captured_decode_step_replays_like_eager(cfg_name, uva, rep):
    Hkv, D = 2, 128
    rig = Rig(CONFIGS[cfg_name], N=6, Hq=rep * Hkv, Hkv=Hkv, D=D, uva=uva, seed=rep)
    contexts = {0: 5000, 1: 127, 2: 63, 3: 700}  # rows 1, 2 close a chunk in step 1
    # (every step below has a row whose query is its chunk's last token)
    for r, S in contexts.items():
        rig.new_request(r, S)
    graph, md_cap = rig.capture()
    replay_and_check(rig, graph, md_cap, [5000, 127, 63, 700, None, None])
    # step 2: rows 0-2 go on; row 3 is a new, longer request on other blocks; a new row 4
    # joins whose query closes its chunk; row 5 stays padding
    rig.new_request(3, 12000)
    rig.new_request(4, 191)
    replay_and_check(rig, graph, md_cap, [5001, 128, 64, 12000, 191, None])
    # step 3: a smaller batch in the same graph (more padding); row 2 is a new request
    rig.new_request(2, 255)
    replay_and_check(rig, graph, md_cap, [5002, 129, 255, None, None, None])
