"""group_score "sketch" kernels (csrc/sketch.cu, route_groups' cand_group) against torch.

Pages must equal torch_ops.pack_sketch bit for bit (the codes are a definition, computed
on the CPU here: CUDA torch divides by a scalar through its reciprocal); routing must pick
the groups routing.route picks from the same pages, up to float near-ties.  Run on the
device machine: scripts/gpu_check.sh.
"""

from __future__ import annotations

import pytest
import torch

from vllm_hga import routing
from vllm_hga.config import CHUNK_SIZE, GROUP_SIZE, HGAConfig
from vllm_hga.ops import cuda_ops, torch_ops
from vllm_hga.rope import RopeSpec

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DEV = "cuda"
M = CHUNK_SIZE // GROUP_SIZE


def random_keys(
    nb: int, H: int, D: int, dtype: torch.dtype, seed: int, wild: bool = True
) -> torch.Tensor:
    """[nb, 64, H, D] keys with per-channel scales; wild: a constant channel and one past
    the float16 range (clamped by the grid)."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(nb, CHUNK_SIZE, H, D, generator=g) * torch.rand(1, 1, H, D, generator=g) * 4
    if not wild:
        return k.to(dtype)
    k[..., 0] = 0.3  # max == min: step 0, codes from (k - f16(lo)) / tiny
    k[..., 1] *= 1e4  # near the float16 range
    return k.to(dtype)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32).cpu()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("nb", [1, 7, 33])
def test_sketch_pages_bit_exact(dtype, D, nb):
    k = random_keys(nb, 3, D, dtype, seed=nb + D)
    out = torch.full((nb, 3, 1 + M, D), float("nan"), device=DEV)
    idx = torch.arange(nb, device=DEV)
    torch.ops.vllm_hga.sketch_pages(k.to(DEV), idx, out, idx)
    assert torch.equal(bits(out), bits(torch_ops.pack_sketch(k)))


@pytest.mark.parametrize("uva", [False, True])
def test_summarize_pool_writes_sketch_pages_in_place(uva):
    nb, H, D = 11, 2, 128
    k = random_keys(nb, H, D, torch.bfloat16, seed=5)
    pool = torch.zeros(nb, H, 2, CHUNK_SIZE, D, dtype=torch.bfloat16)
    pool[:, :, 0] = k.transpose(1, 2)
    pool = cuda_ops.uva_view(pool.pin_memory()) if uva else pool.to(DEV)
    summ = torch.full((nb, H, 1 + M, D), float("nan"), device=DEV)
    blocks = torch.tensor([3, -1, 0, 9, -1, 4], device=DEV)
    rot = torch_ops.SummaryRotation(RopeSpec.default(D), HGAConfig(), DEV)
    assert rot.sketch
    cuda_ops.summarize_pool(pool, blocks, summ, rot)
    torch.cuda.synchronize()
    written = [3, 0, 9, 4]
    assert torch.equal(bits(summ[written]), bits(torch_ops.pack_sketch(k[written])))
    untouched = [b for b in range(nb) if b not in written]
    assert bool(summ[untouched].isnan().all())


def make_routing_case(lengths, Hq, Hkv, D, seed):
    """Decode rows (one per length; <= 0 is a padded row) over shuffled sketch pages."""
    g = torch.Generator().manual_seed(seed)
    n_chunks = max(max(lengths) // CHUNK_SIZE + 1, 1)
    R = len(lengths)
    nb = 1 + R * n_chunks
    k = random_keys(nb, Hkv, D, torch.float16, seed, wild=False)
    pages = torch_ops.pack_sketch(k).to(DEV)
    bt = (1 + torch.randperm(nb - 1, generator=g)).view(R, n_chunks).to(torch.int32).to(DEV)
    pos = torch.tensor([S - 1 if S > 0 else -1 for S in lengths], device=DEV)
    q = (torch.randn(R, Hq, D, generator=g) * 2).to(torch.float16).to(DEV)
    return q, pos, bt, n_chunks, pages


def torch_routes(q, pos, bt, n_chunks, pages, cfg):
    rows = pages[bt[:, :n_chunks].long()]  # [R, n, Hkv, 5, D]
    _, open_ids, open_ok = routing.route(
        q, pos.clamp(min=0), rows[:, :, :, 0], rows[:, :, :, 1:].transpose(2, 3), cfg
    )
    return open_ids, open_ok


def sketch_group_scores(q, pos, bt, n_chunks, pages) -> torch.Tensor:
    """float64 oracle [R, Hq, n*M]: log sum_t exp(q . k_hat_t / sqrt(D)) per group."""
    rows = pages[bt[:, :n_chunks].long()]
    k_hat = torch_ops.unpack_sketch(rows[:, :, :, 0], rows[:, :, :, 1:]).double()
    R, Hq, D = q.shape
    Hkv = pages.shape[1]
    qd = q.double().view(R, Hkv, Hq // Hkv, D) * D**-0.5
    t = torch.einsum("rkhd,rnkmtd->rkhnmt", qd, k_hat).logsumexp(-1)
    return t.reshape(R, Hq, n_chunks * M)


@pytest.mark.parametrize("tensor_cores", [True, False])
@pytest.mark.parametrize("rep", [1, 4, 8, 12])
@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("local", [2, 0])
def test_sketch_decode_groups_match_torch(rep, D, local, tensor_cores, monkeypatch):
    monkeypatch.setattr(cuda_ops, "SKETCH_TENSOR_CORES", tensor_cores)
    lengths = [27, 700, 3330, 9000, 0, 20_000]
    Hkv = 2
    cfg = HGAConfig(local_chunks=local, topk_chunks=22, topk_groups=88)
    assert cfg.group_score == "sketch"
    q, pos, bt, n_chunks, pages = make_routing_case(lengths, Hkv * rep, Hkv, D, seed=rep + D)
    sinks = cfg.sink_chunks
    _, token_ok, gid = cuda_ops.decode_groups(
        q, pos, bt, n_chunks, pages, cfg, sinks, local, cfg.groups_per_query
    )
    nfix = (sinks + local + 1) * M
    open_ids, open_ok = torch_routes(q, pos, bt, n_chunks, pages, cfg)
    oracle = sketch_group_scores(q, pos, bt, n_chunks, pages)
    agree = total = 0
    for r, S in enumerate(lengths):
        for h in range(q.shape[1]):
            got = gid[r, h, nfix:][token_ok[r, h, nfix:, 0]]
            if S <= 0:  # a padded row: an empty list
                assert not bool(token_ok[r, h].any())
                continue
            want = open_ids[r, h][open_ok[r, h]]
            assert got.numel() == want.numel() == len(set(got.tolist()))
            agree += len(set(got.tolist()) & set(want.tolist()))
            total += want.numel()
            if got.numel():  # any disagreement is a near-tie: the picked scores sum alike
                sg, sw = oracle[r, h, got].sum(), oracle[r, h, want].sum()
                assert abs(float(sg - sw)) <= 1e-3 * max(1.0, abs(float(sw)))
    assert total > 0 and agree >= 0.97 * total


@pytest.mark.parametrize("tensor_cores", [True, False])
@pytest.mark.parametrize("rep", [1, 8, 12])
@pytest.mark.parametrize("local", [2, 0])
@pytest.mark.parametrize("lengths", [[27, 700, 3330, 0, 9000], [60_000, 64 * 40 + 1, 5000]])
def test_two_pass_routing_equals_sliced(lengths, rep, local, tensor_cores, monkeypatch):
    """score_chunks_sketch + route_select (decode rows) and the sliced route_chunks_sketch +
    route_groups (prefill rows) compute the same scores and pick by the same total order, so
    their lists are equal; repeated blocks make tied chunks that only the order breaks."""
    monkeypatch.setattr(cuda_ops, "SKETCH_TENSOR_CORES", tensor_cores)
    Hkv, D = 2, 128
    cfg = HGAConfig(local_chunks=local, topk_chunks=22, topk_groups=88)
    q, pos, bt, n_chunks, pages = make_routing_case(lengths, Hkv * rep, Hkv, D, seed=rep + local)
    g = torch.Generator().manual_seed(rep)
    tied = torch.rand(bt.shape, generator=g) < 0.3  # ~30% of chunks repeat block bt[r, 0]
    bt = torch.where(tied.to(DEV), bt[:, :1], bt)
    args = (q, pos, bt, n_chunks, pages, cfg, cfg.sink_chunks, local, cfg.groups_per_query)
    n_pool = n_chunks - 1 - local - cfg.sink_chunks
    assert cuda_ops._two_pass(q.shape[0], q.shape[1], n_pool)
    two_pass = cuda_ops.decode_groups(*args)
    monkeypatch.setattr(cuda_ops, "SELECT_SCRATCH_BYTES", 0)
    sliced = cuda_ops.decode_groups(*args)
    for a, b in zip(two_pass, sliced):
        assert torch.equal(a, b)
