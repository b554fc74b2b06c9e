"""CUDA implementations of HGA's ops: the ``vllm_hga._C`` extension built from csrc/.

``CudaOps`` has the methods of ``torch_ops.TorchOps`` with the same contracts; each
calls its kernel directly.  Whether the kernels serve a layer at all (device, dtype, head
size, group score, ...) is decided once, by ``dispatch.kernel_blockers``, so no method
checks its inputs again.  The pool may be device memory or the UVA view of pinned host
memory (tiers.py): kernels read and write it in place.
"""

from __future__ import annotations

import functools
import math

import torch

from ..config import CHUNK_SIZE, GROUP_SIZE, HGAConfig
from . import torch_ops

try:
    from .. import _C  # loading it registers torch.ops.vllm_hga.*

    IMPORT_ERROR: Exception | None = None
except ImportError as exc:  # CPU install, or not built
    _C = None
    IMPORT_ERROR = exc

GROUPS = CHUNK_SIZE // GROUP_SIZE
HEAD_SIZES = (64, 128, 256)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_TOPK_CHUNKS = 64  # csrc/routing.cu kMaxTopkChunks
# group scores whose summary pages the kernels write and read (sketch pages: csrc/sketch.cu)
KERNEL_GROUP_SCORES = ("mean", "mean_std", "sketch")


def available() -> bool:
    return _C is not None and torch.cuda.is_available()


def _ops():
    return torch.ops.vllm_hga


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _sms(t: torch.Tensor) -> int:
    return _num_sms(t.device.index if t.device.index is not None else torch.cuda.current_device())


# ----------------------------------------------------------------------------- helpers
def _rot_tables(rot: torch_ops.SummaryRotation, device: torch.device, head_size: int):
    """float32 cos/sin [2, 64, P] and int32 dim map [2, D] (partner dim, pair*2 + second)."""
    key = (str(device), head_size)
    cache = rot.__dict__.setdefault("_cuda_tables", {})
    if key not in cache:
        partner = torch.full((head_size,), -1, dtype=torch.int32)
        code = torch.zeros(head_size, dtype=torch.int32)
        for p, (a, b) in enumerate(zip(rot.a.tolist(), rot.b.tolist())):
            partner[a], partner[b] = b, a
            code[a], code[b] = 2 * p, 2 * p + 1
        cache[key] = (
            rot.cos.to(device, torch.float32).contiguous(),
            rot.sin.to(device, torch.float32).contiguous(),
            torch.stack([partner, code]).to(device),
        )
    return cache[key]


def _route_splits(
    n_pool: int, R: int, Hkv: int, rep: int, D: int, sms: int, scores_per_chunk: int = 1
) -> tuple[int, int]:
    """(splits, chunks per split) for route_chunks: ~4 blocks per SM, >= 128 chunks each
    (one unrolled pass of its warps); a slice's scores of all heads of the KV head must
    fit in shared memory.  scores_per_chunk: floats kept per chunk and head (5 for
    route_chunks_sketch: the chunk score and its 4 group scores)."""
    want = max(1, math.ceil(4 * sms / max(1, R * Hkv)))
    # two blocks per SM fit
    max_len = max(128, ((96 * 1024) // (4 * rep) - D) // scores_per_chunk)
    split_len = min(max_len, max(128, math.ceil(n_pool / want)))
    return math.ceil(n_pool / split_len), split_len


def _score_per_warp(n_pool: int, R: int, Hkv: int, sms: int) -> int:
    """Chunks each warp of score_chunks_sketch scores: about one pass of 32 warps per SM."""
    return min(8, max(1, math.ceil(R * Hkv * n_pool / (32 * sms))))


# Decode rows route in two passes (score_chunks_sketch scores every pool chunk across the
# GPU, route_select picks per row and head) while their scores fit this scratch; batches
# beyond it and prefill rows (decode_groups(sliced=True)) keep the sliced top-k, whose
# scratch does not grow with the pool.
SELECT_SCRATCH_BYTES = 256 << 20
SELECT_MAX_POOL = 40 * 1024  # chunks: route_select holds a row's keys in shared memory


def _two_pass(R: int, Hq: int, n_pool: int) -> bool:
    scratch = R * Hq * n_pool * (1 + GROUPS) * 4
    return scratch <= SELECT_SCRATCH_BYTES and n_pool <= SELECT_MAX_POOL


KERNEL_MODES = {"auto": 0, "heads": 1, "shared": 2, "split": 3}

# route_chunks_sketch scores on tensor cores (mma.sync) or CUDA cores; the two agree to
# float32 near-ties (tests/gpu/test_sketch_kernels.py), benchmarks compare their speed.
SKETCH_TENSOR_CORES = True


# ----------------------------------------------------------------------------- the ops
class CudaOps(torch_ops.TorchOps):
    """The kernels of csrc/ behind TorchOps' methods (gather_tokens / attend_masked stay
    torch's: only the dense and prefill-fallback paths use them)."""

    kernels = True

    @staticmethod
    def write_kv(
        pool: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor, bank=None
    ) -> None:
        """torch_ops.write_kv without the host sync of its padding filter (slots < 0 skipped);
        with a bank.DeviceBank (bound to this pool) its resident blocks get the same writes,
        in the same launch."""
        T = key.shape[0]
        through = () if bank is None or not bank.kernels else (bank.data, bank.slot_of_block)
        _ops().write_kv(
            pool,
            key.to(pool.dtype),
            value.to(pool.dtype),
            slots[:T].to(torch.long).contiguous(),
            *through,
        )
        if bank is not None and not through:
            bank.write_through(key, value, slots[:T])

    @staticmethod
    def summarize_blocks(k: torch.Tensor, rot: torch_ops.SummaryRotation) -> torch.Tensor:
        """Summaries [nb, H, 1+M, D] float32 of full chunks k [nb, C, H, D] (last dim dense)."""
        nb, _, H, D = k.shape
        out = torch.empty(nb, H, 1 + GROUPS, D, dtype=torch.float32, device=k.device)
        idx = torch.arange(nb, device=k.device)
        if rot.sketch:
            _ops().sketch_pages(k, idx, out, idx)
            return out
        _ops().summarize(k, idx, out, idx, *_rot_tables(rot, k.device, D), int(rot.variance))
        return out

    @staticmethod
    def summarize_pool(
        pool: torch.Tensor, blocks: torch.Tensor, summ: torch.Tensor, rot: torch_ops.SummaryRotation
    ) -> None:
        """summ[blocks] = summaries of the pool's chunks `blocks`, read in place (no gather).
        Entries < 0 are skipped: the fixed-width closing list of a CUDA-graph step (plan.py).

        Same result as ``summ[blocks] = summarize_blocks(pool[blocks, :, 0].transpose(1, 2), rot)``.
        """
        if blocks.numel() == 0:
            return
        keys = pool[:, :, 0].transpose(1, 2)  # [nb, 64, H, D] view
        torch_ops.check_sketch_pages(rot, summ)
        blocks = blocks.to(torch.long).contiguous()
        if rot.sketch:
            _ops().sketch_pages(keys, blocks, summ, blocks)
            return
        _ops().summarize(
            keys,
            blocks,
            summ,
            blocks,
            *_rot_tables(rot, pool.device, pool.shape[-1]),
            int(rot.variance),
        )

    @staticmethod
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
        sliced: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """torch_ops.decode_groups on the GPU: (rows [R, Hq, Gt], token_ok [R, Hq, Gt, 16], gid).

        sliced: route through the sliced top-k even where the two-pass routing fits (prefill
        rows, thousands per call; both give the same lists).

        n_chunks = 1 + the largest own-chunk index (md.decode_chunks); summ float32.
        Routed groups come after the (sinks + local + 1) * 4 fixed columns in ascending
        group id (torch's come in score order), then invalid padding; ties in top-k go to
        the lower index (reference.py).
        """
        R, Hq, D = q.shape
        Hkv = summ.shape[1]
        F, L, Kc = cfg.sink_chunks, cfg.local_chunks, cfg.topk_chunks
        G = min(groups, min(Kc, n_chunks) * GROUPS)  # routing.route's width
        nfix = (sinks + local + 1) * GROUPS
        dev = q.device
        rows = torch.empty(R, Hq, nfix + G, dtype=torch.long, device=dev)
        token_ok = torch.empty(R, Hq, nfix + G, GROUP_SIZE, dtype=torch.bool, device=dev)
        gid = torch.empty_like(rows)
        if R == 0:
            return rows, token_ok, gid
        bt = block_table.to(torch.int32)
        if bt.stride(-1) != 1:
            bt = bt.contiguous()
        pos = pos.to(torch.long).contiguous()
        n_pool = n_chunks - 1 - L - F  # pool chunks of the longest row: [F, c - L)
        sketch = cfg.group_score == "sketch"
        if n_pool > 0 and sketch and not sliced and _two_pass(R, Hq, n_pool):
            scores = torch.empty(R, Hq, n_pool, dtype=torch.float32, device=dev)
            group_scores = torch.empty(R, Hq, n_pool, GROUPS, dtype=torch.float32, device=dev)
            per_warp = _score_per_warp(n_pool, R, Hkv, _sms(q))
            _ops().score_chunks_sketch(
                q, pos, bt, summ, F, L, scores, group_scores, per_warp, int(SKETCH_TENSOR_CORES)
            )
            _ops().route_select(
                pos,
                bt,
                scores,
                group_scores,
                Hkv,
                n_chunks,
                F,
                L,
                sinks,
                local,
                Kc,
                rows,
                token_ok,
                gid,
            )
            return rows, token_ok, gid
        S, split_len = (
            (0, 1)
            if n_pool <= 0
            else _route_splits(n_pool, R, Hkv, Hq // Hkv, D, _sms(q), 1 + GROUPS if sketch else 1)
        )
        cand_s = torch.empty(R, Hq, S, Kc, dtype=torch.float32, device=dev)
        cand_i = torch.empty(R, Hq, S, Kc, dtype=torch.int32, device=dev)
        # group_score "mean_std": row 0 of a page is the chunk's key variance; every group
        # score gets + score_alpha * sqrt(q^2 . var) (config guarantees chunk_score max_group)
        spread = int(cfg.group_score == "mean_std")
        alpha = 0.0 if sketch else float(cfg.score_alpha)
        # sketch (config guarantees chunk_score max_group): the chunk pass keeps each
        # candidate's 4 group scores, so route_groups reads no page again
        cand_g = None
        if sketch:
            cand_g = torch.empty(R, Hq, S, Kc, GROUPS, dtype=torch.float32, device=dev)
        if S and sketch:
            _ops().route_chunks_sketch(
                q, pos, bt, summ, F, L, split_len, cand_s, cand_i, cand_g, int(SKETCH_TENSOR_CORES)
            )
        elif S:
            _ops().route_chunks(
                q,
                pos,
                bt,
                summ,
                F,
                L,
                int(cfg.chunk_score == "max_group"),
                spread,
                alpha,
                split_len,
                cand_s,
                cand_i,
            )
        _ops().route_groups(
            q,
            pos,
            bt,
            summ,
            cand_s,
            cand_i,
            n_chunks,
            F,
            L,
            sinks,
            local,
            spread,
            alpha,
            rows,
            token_ok,
            gid,
            cand_g,
        )
        return rows, token_ok, gid

    @staticmethod
    def attend_groups(
        q: torch.Tensor,
        pool: torch.Tensor,
        group_rows: torch.Tensor,
        token_ok: torch.Tensor,
        scale: float,
        n_shared: int = 0,
        out: torch.Tensor | None = None,
        kernel: str = "auto",
        bank: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """torch_ops.attend_groups reading K/V from the pool (contiguous, q's dtype), and
        from the device bank (bank.py, same block layout) for rows encoded < 0.

        n_shared > 0 (HGA decode lists: (F + L + 1) * 4) lets the kernel read the shared
        columns once per KV head; out (any float dtype) avoids a separate cast.  kernel:
        as attend_rows'.  Returns out (float32 [R, Hq, D] if None).
        """
        nb, H, _, C, D = pool.shape
        R, Hq, _ = q.shape
        if out is None:
            out = torch.empty(R, Hq, D, dtype=torch.float32, device=q.device)
        if R == 0:
            return out
        if group_rows.shape[-1] == 0:
            return out.zero_()
        token_ok = token_ok.contiguous()
        if token_ok.data_ptr() % 16:
            token_ok = token_ok.clone()
        bank_rows = None if bank is None else bank.view(-1, GROUP_SIZE, D)
        _ops().attend_groups(
            q if q.stride(-1) == 1 else q.contiguous(),
            pool.view(nb * H * 2 * (C // GROUP_SIZE), GROUP_SIZE, D),
            group_rows.to(torch.long).contiguous(),
            token_ok,
            bank_rows,
            H,
            C // GROUP_SIZE,
            n_shared,
            float(scale),
            KERNEL_MODES[kernel],
            out,
        )
        return out

    def decode(
        self,
        q: torch.Tensor,
        pos: torch.Tensor,
        block_table: torch.Tensor,
        n_chunks: int,
        pool: torch.Tensor,
        summ: torch.Tensor,
        cfg: HGAConfig,
        sinks: int,
        local: int,
        groups: int,
        scale: float,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Routing + sparse attention of decode queries q [R, Hq, D] (benchmarks)."""
        rows, token_ok, _ = self.decode_groups(
            q, pos, block_table, n_chunks, summ, cfg, sinks, local, groups
        )
        return self.attend_groups(q, pool, rows, token_ok, scale, (sinks + local + 1) * GROUPS, out)

    @staticmethod
    def prefill(
        q: torch.Tensor,
        q_start: int,
        pool: torch.Tensor,
        summ: torch.Tensor,
        block_row: torch.Tensor,
        cfg: HGAConfig,
        sinks: int,
        local: int,
        groups: int,
        scale: float,
        out: torch.Tensor,
        scratch,
        count=None,
    ) -> None:
        """One request's prefill on the GPU (ops/cuda_prefill.py; scratch from tiers.py)."""
        from . import cuda_prefill

        cuda_prefill.prefill(
            q,
            q_start,
            pool,
            summ,
            block_row,
            cfg,
            sinks,
            local,
            groups,
            scale,
            out,
            scratch,
            count=count,
        )


# the kernels as plain functions, for benchmarks and kernel tests (inputs must suit them)
KERNELS = CudaOps()
write_kv, summarize_blocks, summarize_pool = (
    KERNELS.write_kv,
    KERNELS.summarize_blocks,
    KERNELS.summarize_pool,
)
decode_groups, attend_groups, decode = KERNELS.decode_groups, KERNELS.attend_groups, KERNELS.decode


def attend_rows(
    q: torch.Tensor,
    kv_rows: torch.Tensor,
    rows: torch.Tensor,
    token_ok: torch.Tensor,
    scale: float,
    num_kv_heads: int,
    v_offset: int,
    n_shared: int = 0,
    out: torch.Tensor | None = None,
    kernel: str = "auto",
    bank_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention of q [R, Hq, D] over the 16-token rows `rows` [R, Hq, G] of
    kv_rows [*, 16, D] (V row = K row + v_offset), where token_ok [R, Hq, G, 16].

    The first n_shared columns must be the same rows and masks for all query heads of a
    KV head (HGA's sinks / local / own chunk).  kernel: "heads" (a warp per query head,
    deep prefetch: best for device memory), "shared" (a warp per column for all heads of
    a KV head, shared columns read once: best for pinned host memory over PCIe), "split"
    (shared columns by the second, routed ones by the first; slower on an H200), or "auto"
    (heads on device memory, shared on host memory).  Writes and returns out [R, Hq, D]
    (float32 if None).  bank_rows [*, 16, D] (device bank, bank.py): a row r < 0 in `rows`
    is row -r-1 of bank_rows (its V row v_offset later, as in kv_rows).
    """
    R, Hq, D = q.shape  # CudaOps.attend_groups makes this call itself (one frame less)
    if out is None:
        out = torch.empty(R, Hq, D, dtype=torch.float32, device=q.device)
    if R == 0:
        return out
    if rows.shape[-1] == 0:
        return out.zero_()
    token_ok = token_ok.contiguous()
    if token_ok.data_ptr() % 16:
        token_ok = token_ok.clone()
    _ops().attend_groups(
        q if q.stride(-1) == 1 else q.contiguous(),
        kv_rows,
        rows.to(torch.long).contiguous(),
        token_ok,
        bank_rows,
        num_kv_heads,
        v_offset,
        n_shared,
        float(scale),
        KERNEL_MODES[kernel],
        out,
    )
    return out


# ----------------------------------------------------------------------------- device bank
def bank_fill_covered(pool: torch.Tensor, bank: torch.Tensor) -> bool:
    return (
        _C is not None
        and pool.is_cuda
        and bank.is_cuda
        and pool.dtype == bank.dtype
        and pool.is_contiguous()
        and bank.is_contiguous()
        and (pool[0].numel() * pool.element_size()) % 16 == 0
    )


def bank_fill(
    pool: torch.Tensor, bank: torch.Tensor, blocks: torch.Tensor, slots: torch.Tensor
) -> None:
    """bank[slots[i]] = pool[blocks[i]] for entries with slots[i] >= 0 (others: padding,
    skipped on the device; fixed shapes, no host sync)."""
    _ops().bank_fill(
        pool, bank, blocks.to(torch.long).contiguous(), slots.to(torch.long).contiguous()
    )


@functools.cache
def bank_kernels() -> bool:
    """True when the extension has the fused bank admission (csrc/bank.cu)."""
    if _C is None:
        return False
    try:
        return hasattr(_ops(), "bank_admit") and hasattr(_ops(), "bank_invalidate")
    except RuntimeError:
        return False


def bank_admit(
    pool: torch.Tensor,
    bank: torch.Tensor,
    rows: torch.Tensor,
    token_ok: torch.Tensor,
    own_cols: tuple[int, int],
    tables: dict,
    enc: torch.Tensor,
    sinks: list[torch.Tensor],
    chunk_bytes: int,
    fill: bool,
) -> None:
    """DeviceBank.admit in three launches (csrc/bank.cu): mark, admit (one CTA), fill +
    encode.  tables: the bank's slot_of_block, block_of_slot, last_use, order, miss_bits,
    miss_summary, meta, fill_blocks, fill_slots (updated in place); enc (like rows) gets
    the encoded rows; sinks: [] or float64 scalars (hits, misses, bytes) to add to.
    fill=False leaves the copy to the caller (fill list in tables)."""
    t = tables
    _ops().bank_admit(
        pool,
        bank,
        rows,
        token_ok,
        int(own_cols[0]),
        int(own_cols[1]),
        t["slot_of_block"],
        t["block_of_slot"],
        t["last_use"],
        t["order"],
        t["miss_bits"],
        t["miss_summary"],
        t["meta"],
        t["fill_blocks"],
        t["fill_slots"],
        enc,
        sinks,
        int(chunk_bytes),
        bool(fill),
    )


def bank_invalidate(
    slots: torch.Tensor,
    slot_of_block: torch.Tensor,
    block_of_slot: torch.Tensor,
    last_use: torch.Tensor,
) -> None:
    """DeviceBank.invalidate in one launch: blocks of token slots (int32/int64, < 0 padding)
    leave the bank."""
    if slots.dtype not in (torch.int32, torch.int64):
        slots = slots.long()
    _ops().bank_invalidate(slots.contiguous(), slot_of_block, block_of_slot, last_use)


# ----------------------------------------------------------------------------- host memory
def uva_view(host: torch.Tensor) -> torch.Tensor:
    """CUDA tensor over a pinned CPU tensor's memory (zero-copy; keeps `host` alive)."""
    return _ops().uva_view(host)


def gather_rows(
    src: torch.Tensor,
    idx: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """out[i] = src[idx[i]] by a zero-copy kernel (src may be a UVA view of host memory)."""
    if out is None:
        out = torch.empty((idx.numel(),) + tuple(src.shape[1:]), dtype=src.dtype, device=idx.device)
    _ops().gather_rows(src, idx.to(torch.long).contiguous(), out)
    return out


def gather_rows_ce(src: torch.Tensor, idx_cpu: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out[i] = src[idx_cpu[i]] by the copy engines (one cudaMemcpyBatchAsync)."""
    _ops().gather_rows_ce(src, idx_cpu.to(torch.long).contiguous(), out)
    return out
