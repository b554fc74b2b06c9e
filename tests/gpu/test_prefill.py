"""CUDA prefill path (vllm_hga.ops.cuda_prefill, and csrc/prefill.cu where built) against
devkit.reference and against the torch prefill path.

Odd lengths, chunked prefill (q_start > 0, mid-chunk), GQA 1/3/8, bf16/fp16; the pool,
the summaries, the device scratch and the outputs are NaN-poisoned, so a read of an
unwritten slot or an unwritten output element fails.  Run on the device machine:
scripts/gpu_check.sh.
"""

from __future__ import annotations

import pytest
import torch
from gpu_common import TOL, rel_err

from devkit import reference
from vllm_hga.attention import HGALayer
from vllm_hga.config import CHUNK_SIZE, GROUP_SIZE
from vllm_hga.config import HGAConfig as _HGAConfig
from vllm_hga.ops import cuda_ops, cuda_prefill, torch_ops
from vllm_hga.plan import HGAMetadata
from vllm_hga.rope import RopeSpec
from vllm_hga.tiers import EngineTiers


def HGAConfig(**kw) -> _HGAConfig:
    """A config as an engine resolves it (group_score "sketch" unless set)."""
    return _HGAConfig.from_mapping(kw)


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DEV = "cuda"

plan = HGAMetadata.plan  # vllm_hga/plan.py: no vLLM import, the backend's own planning
M = CHUNK_SIZE // GROUP_SIZE
NAN = float("nan")


TIERS = EngineTiers(HGAConfig())  # the engine's owner of the prefill scratch, for all tests


def poison_scratch():
    for sc in TIERS.scratches.values():
        sc.kv.fill_(NAN)
        sc.summ.fill_(NAN)


class Request:
    """One request of S tokens in shuffled blocks of a NaN-poisoned pool, written and
    summarised by the kernels the layer uses (write_kv, summarize_pool)."""

    def __init__(
        self,
        S: int,
        Hq: int,
        Hkv: int,
        D: int,
        dtype,
        cfg: HGAConfig,
        seed: int,
        uva: bool = False,
        spare_blocks: int = 5,
    ):
        g = torch.Generator().manual_seed(seed)
        self.S, self.Hq, self.Hkv, self.D, self.dtype, self.cfg = S, Hq, Hkv, D, dtype, cfg
        self.rope = RopeSpec.default(D, 1e6)
        n = -(-S // CHUNK_SIZE)
        nb = 1 + n + spare_blocks  # block 0: vLLM's null block; spares: other requests'
        perm = 1 + torch.randperm(nb - 1, generator=g)
        self.bt = torch.zeros(n + 3, dtype=torch.int32)  # wider than needed, like vLLM's
        self.bt[:n] = perm[:n].to(torch.int32)
        raw = torch.randn(S, Hkv, D, generator=g, dtype=torch.float64)
        self.k = self.rope.apply(raw, torch.arange(S)).to(dtype)
        self.v = torch.randn(S, Hkv, D, generator=g).to(dtype)
        self.q = (torch.randn(S, Hq, D, generator=g) * 2).to(dtype)
        if uva:
            self.host = torch.full((nb, Hkv, 2, CHUNK_SIZE, D), NAN, dtype=dtype).pin_memory()
            self.pool = cuda_ops.uva_view(self.host)
        else:
            self.pool = torch.full((nb, Hkv, 2, CHUNK_SIZE, D), NAN, dtype=dtype, device=DEV)
        self.summ = torch.full((nb, Hkv, 1 + M, D), NAN, device=DEV)
        t = torch.arange(S)
        slots = (self.bt[t // CHUNK_SIZE].long() * CHUNK_SIZE + t % CHUNK_SIZE).to(DEV)
        cuda_ops.write_kv(self.pool, self.k.to(DEV), self.v.to(DEV), slots)
        rot = torch_ops.SummaryRotation(self.rope, cfg, DEV)
        cuda_ops.summarize_pool(
            self.pool, self.bt[: S // CHUNK_SIZE].long().to(DEV), self.summ, rot
        )
        self.bt = self.bt.to(DEV)
        self.layer = HGALayer(cfg, self.rope, Hq, Hkv, D, D**-0.5, S + 100, device=DEV, tiers=TIERS)

    def prefill(
        self,
        q_start: int,
        max_rows: int = cuda_prefill.MAX_ROWS,
        out_dtype=None,
        kernel: str = "auto",
        impl: str = "rows",
    ) -> torch.Tensor:
        L = self.layer
        q = self.q[q_start:].to(DEV)
        out = torch.full(q.shape, NAN, dtype=out_dtype or self.dtype, device=DEV)
        sc = TIERS.prefill_scratch(L.max_chunks, L.num_kv_heads, L.head_size, self.dtype, DEV)
        poison_scratch()
        cuda_prefill.prefill(
            q,
            q_start,
            self.pool,
            self.summ,
            self.bt,
            self.cfg,
            L.sinks,
            L.local,
            L.groups,
            D_SCALE(self.D),
            out,
            sc,
            max_rows=max_rows,
            kernel=kernel,
            impl=impl,
        )
        return out

    def lists(self, q_start: int):
        """Decode-kernel lists of the same queries over the real pool and block table
        (no scratch, no identity table, no slicing): the groups each query must see."""
        L = self.layer
        n = self.S - q_start
        pos = torch.arange(q_start, self.S, device=DEV)
        bt = self.bt.unsqueeze(0).expand(n, -1)
        return cuda_ops.decode_groups(
            self.q[q_start:].to(DEV),
            pos,
            bt,
            (self.S - 1) // CHUNK_SIZE + 1,
            self.summ,
            self.cfg,
            L.sinks,
            L.local,
            L.groups,
        )

    def mask_of(self, lists) -> torch.Tensor:
        """Bool [Hq, n, S] key visibility of the lists (on the device)."""
        _, ok, gid = lists
        n = ok.shape[0]
        keys = gid.unsqueeze(-1) * GROUP_SIZE + torch.arange(GROUP_SIZE, device=DEV)
        mask = torch.zeros(n, self.Hq, self.S + 1, dtype=torch.bool, device=DEV)
        keys = torch.where(ok, keys, self.S).clamp(max=self.S).flatten(2)
        mask.scatter_(-1, keys, True)
        return mask[..., : self.S].transpose(0, 1)


def D_SCALE(D: int) -> float:
    return D**-0.5


IMPLS = ("rows", "tc")


def impl_tol(impl: str, in_dtype: torch.dtype, out_dtype: torch.dtype) -> float:
    """The tensor-core kernel multiplies P.V in the input dtype, so a float32 output of
    half inputs carries the input dtype's rounding; the rows kernel is float32 inside."""
    if impl == "tc" and in_dtype != torch.float32:
        return TOL[in_dtype]
    return TOL[out_dtype]


def check_request(req: Request, q_start: int, outs: dict, windows, min_agree=0.95):
    """Prefills of queries q_start..S-1 (outs: impl -> output) against (1) exact float64
    attention under the decode kernels' lists, for every query, and (2)
    reference.hga_attention (routing and attention) on the query windows given."""
    if "tc" in outs:
        assert cuda_prefill.tc_available(), "csrc/prefill.cu not built: 'tc' would fall back"
    mask = req.mask_of(req.lists(q_start))
    q = req.q[q_start:]
    exact = reference.masked_attention(
        q.to(DEV, torch.float64),
        req.k.to(DEV, torch.float64),
        req.v.to(DEV, torch.float64),
        mask,
        req.D**-0.5,
    )
    for impl, out in outs.items():
        err = rel_err(out, exact)
        # "tc" multiplies P and V on tensor cores in the input dtype, so a float32 output
        # of it is only as exact as its inputs; the CUDA-core kernels accumulate in fp32
        assert err < impl_tol(impl, req.dtype, out.dtype), f"{impl}: {err}"
    del exact
    mask = mask.cpu()
    agree = total = 0
    for a, b in windows:  # absolute positions [a, b), a >= q_start
        want, ref_mask = reference.hga_attention(
            req.q[a:b].double(), req.k[:b], req.v[:b], a, req.rope, req.cfg
        )
        mine = mask[:, a - q_start : b - q_start, :b]
        same = (mine == ref_mask).all(-1)  # [Hq, T]
        agree += int(same.sum())
        total += same.numel()
        rows = same.all(0)  # queries whose every head routes like the reference
        if rows.any():
            for impl, out in outs.items():
                got = out[a - q_start : b - q_start].cpu()[rows]
                err = rel_err(got, want[rows])
                assert err < impl_tol(impl, req.dtype, out.dtype), f"{impl} vs reference: {err}"
    # fp32 summaries vs the reference's float64 ones may flip a rare near-tie
    assert agree >= min_agree * total, f"routing agrees with the reference on {agree}/{total}"


CASES = {  # S, q_start, reference windows (absolute query positions)
    "short": (27, 0, [(0, 27)]),
    "whole": (3330, 0, [(0, 90), (1500, 1580), (3250, 3330)]),
    "chunked": (3330, 1001, [(1001, 1080), (3270, 3330)]),  # q_start mid-chunk
    "tail": (9001, 8999, [(8999, 9001)]),  # two queries at the end of a long context
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rep", [1, 3, 8])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("impl", IMPLS, ids=lambda i: f"impl_{i}")
def test_prefill_matches_reference(impl, case, rep, dtype):
    S, q_start, windows = CASES[case]
    req = Request(S, 2 * rep, 2, 128, dtype, HGAConfig(), seed=rep * 100 + S)
    check_request(req, q_start, {impl: req.prefill(q_start, impl=impl)}, windows)


@pytest.mark.parametrize(
    "cfg",
    [
        HGAConfig(sink_chunks=1, local_chunks=0, topk_chunks=3, topk_groups=10, groups_per_query=5),
        HGAConfig(
            sink_chunks=0, local_chunks=2, topk_chunks=7, topk_groups=12, chunk_score="max_group"
        ),
        HGAConfig(
            sink_chunks=1,
            local_chunks=2,
            topk_chunks=8,
            topk_groups=20,
            chunk_score="max_group",
            group_score="mean_std",
            score_alpha=3.0,
        ),
    ],
    ids=["no-local", "no-sink-max-group", "mean-std"],
)
@pytest.mark.parametrize("D", [64, 256])
@pytest.mark.parametrize("impl", IMPLS, ids=lambda i: f"impl_{i}")
def test_prefill_configs_and_head_sizes(impl, cfg, D):
    req = Request(2500, 6, 2, D, torch.bfloat16, cfg, seed=D)
    check_request(req, 700, {impl: req.prefill(700, impl=impl)}, [(700, 760), (2440, 2500)])


@pytest.mark.parametrize("uva", [False, True])
@pytest.mark.parametrize("impl", IMPLS, ids=lambda i: f"impl_{i}")
def test_prefill_slices_and_pool_memory(impl, uva):
    """Many small slices (odd size) give the result of one launch; host pool via UVA;
    float32 output; and the other implementation / attention kernels agree."""
    req = Request(5000, 32, 4, 128, torch.bfloat16, HGAConfig(), seed=3, uva=uva)
    whole = req.prefill(1234, impl=impl)
    sliced = req.prefill(1234, max_rows=333, out_dtype=torch.float32, impl=impl)
    assert rel_err(sliced, whole.float()) < TOL[torch.bfloat16]
    check_request(req, 1234, {impl: sliced}, [(1234, 1300), (4940, 5000)])
    if impl == "rows":
        for kernel in ("heads", "shared"):
            assert rel_err(req.prefill(1234, kernel=kernel), whole) < TOL[torch.bfloat16]
    else:
        assert rel_err(req.prefill(1234, impl="rows"), whole) < TOL[torch.bfloat16]


def test_fp32_falls_back_to_rows():
    """float32 has no tensor-core kernel: impl "tc" must still give the exact result."""
    req = Request(1500, 8, 2, 64, torch.float32, HGAConfig(), seed=4)
    check_request(
        req, 0, {"rows": req.prefill(0), "tc->rows": req.prefill(0, impl="tc")}, [(1400, 1500)]
    )


def test_scratch_shared_and_sized_once():
    req = Request(700, 8, 2, 128, torch.bfloat16, HGAConfig(), seed=9)
    req.prefill(0)
    sc = TIERS.prefill_scratch(1, 2, 128, torch.bfloat16, torch.device(DEV))
    assert sc.max_chunks >= req.layer.max_chunks
    ptr = sc.kv.data_ptr()
    req.prefill(300)
    assert TIERS.prefill_scratch(1, 2, 128, torch.bfloat16, torch.device(DEV)).kv.data_ptr() == ptr


@pytest.mark.parametrize("impl", IMPLS, ids=lambda i: f"impl_{i}")
@pytest.mark.parametrize("uva", [False, True])
def test_layer_forward_matches_torch_path(uva, impl, monkeypatch):
    """HGALayer.forward on CUDA (kernel prefill + kernel decode, mixed batches, chunked
    prefill) against the same steps through the torch path on the CPU."""
    monkeypatch.setattr(cuda_prefill, "DEFAULT_IMPL", impl)
    cfg, Hq, Hkv, D, dtype = HGAConfig(), 16, 2, 128, torch.bfloat16
    g = torch.Generator().manual_seed(1)
    rope = RopeSpec.default(D, 1e6)
    lengths = [2100, 501, 777]
    nblk = [-(-S // CHUNK_SIZE) for S in lengths]
    nb = 1 + sum(nblk) + 4
    perm = (1 + torch.randperm(nb - 1, generator=g)).tolist()
    bt = torch.zeros(3, max(nblk) + 2, dtype=torch.int32)
    for r, n in enumerate(nblk):
        bt[r, :n] = torch.tensor(perm[:n], dtype=torch.int32)
        perm = perm[n:]
    qs = [(torch.randn(S, Hq, D, generator=g) * 2).to(dtype) for S in lengths]
    ks = [
        rope.apply(torch.randn(S, Hkv, D, generator=g, dtype=torch.float64), torch.arange(S)).to(
            dtype
        )
        for S in lengths
    ]
    vs = [torch.randn(S, Hkv, D, generator=g).to(dtype) for S in lengths]
    sides = {}
    for side in ("cpu", "cuda"):
        dev = torch.device(side)
        if side == "cuda" and uva:
            host = torch.full((nb, Hkv, 2, CHUNK_SIZE, D), NAN, dtype=dtype).pin_memory()
            pool = cuda_ops.uva_view(host)
        else:
            pool = torch.full((nb, Hkv, 2, CHUNK_SIZE, D), NAN, dtype=dtype, device=dev)
        summ = torch.full((nb, Hkv, 1 + M, D), NAN, device=dev)
        layer = HGALayer(cfg, rope, Hq, Hkv, D, D**-0.5, 8192, device=dev, tiers=TIERS)
        sides[side] = (pool, summ, layer, dev)
    # steps: request -> (first position, tokens)
    steps = [{0: (0, 1500), 1: (0, 500)}, {0: (1500, 600), 1: (500, 1), 2: (0, 777)}]
    poison_scratch()
    for sched in steps:
        reqs = sorted(sched)
        qsl, seq, slots = [0], [], []
        for r in reqs:
            a, n = sched[r]
            pos = torch.arange(a, a + n)
            qsl.append(qsl[-1] + n)
            seq.append(a + n)
            slots.append(bt[r, pos // CHUNK_SIZE].long() * CHUNK_SIZE + pos % CHUNK_SIZE)
        T = qsl[-1]
        q = torch.cat([qs[r][a : a + n] for r, (a, n) in sorted(sched.items())])
        k = torch.cat([ks[r][a : a + n] for r, (a, n) in sorted(sched.items())])
        v = torch.cat([vs[r][a : a + n] for r, (a, n) in sorted(sched.items())])
        outs = {}
        for side, (pool, summ, layer, dev) in sides.items():
            md = plan(qsl, seq, bt[reqs].to(dev), torch.cat(slots).to(dev), T)
            out = torch.full((T, Hq, D), NAN, dtype=dtype, device=dev)
            layer.forward(q.to(dev), k.to(dev), v.to(dev), pool, summ, md, out)
            outs[side] = out.cpu()
        assert not torch.isnan(outs["cuda"]).any(), "NaN in the CUDA layer's output"
        assert not torch.isnan(outs["cpu"]).any()
        err = (outs["cuda"].double() - outs["cpu"].double()).norm(dim=-1) / outs[
            "cpu"
        ].double().norm(dim=-1).clamp_min(1e-30)  # [T, Hq]
        # fp32 routing in a different summation order may flip a rare near-tie
        close = (err < 3 * TOL[dtype]).double().mean().item()
        assert close >= 0.97, f"only {close:.4f} of (query, head) match the torch path"
        assert err.median() < TOL[dtype]
