"""The device bank: an LRU working set of whole chunks of K/V in device memory, per layer.

The host pool (store.py) holds every block's full K/V; on CUDA decode attention reads it
over PCIe (UVA).  Decode steps of a request route to mostly the same chunks step after
step (sinks and local window always, routed chunks largely), so the chunks a step's group
lists touch are copied into a small device-resident bank and later steps read them from
there.

Layout: ``data [bank_chunks (+1 spare), H_kv, 2, 64, D]`` in the pool's dtype (one slot =
one block's K and V of all KV heads, same layout as a pool block, so a group row inside a slot has
the same offset as inside its block).  Tables (int64, each with one spare "dummy" entry at the
end that absorbs writes of padding, so every update is a fixed-shape scatter):

* ``slot_of_block [num_blocks + 1]``: bank slot of a pool block, -1 when not resident;
* ``block_of_slot [bank_chunks + 1]``: pool block held by a slot, -1 when empty;
* ``last_use [bank_chunks + 1]``: the layer's decode step that last touched the slot.

Per decode step (``admit``): the chunks the group lists need (valid columns, except any
``own_cols`` the caller keeps in the pool) are found; resident ones refresh ``last_use``
(hits); the others (misses) take the least recently used slots not hit this step (ties:
lower slot first), in block order, as long as slots remain, and are copied in from the
pool.  Misses beyond the bank's size are read from the pool directly this step.  A
resident block always equals its pool block: the layer writes new tokens through
(``write_through``, or the pool's CUDA write_kv with the bank), so the open own chunk is
banked like any other chunk; ``invalidate`` (drop the written blocks instead) is the
alternative for callers that write the pool alone.  No step reads a device value on the
host, and the step counter is a device tensor (``meta[0]``), so admission can be captured
in a CUDA graph.

Two implementations with the same results: the torch ops below (the reference: CPU, and
CUDA without the extension or with ``kernels = False``), and on CUDA three fused launches
(csrc/bank.cu: mark, one-CTA admit, fill + encode) that keep the LRU order of the slots
incrementally in ``order`` instead of sorting ``last_use``.  ``invalidate`` is one launch
on CUDA.  Counters (hits, misses, chunks admitted) accumulate in ``meta`` on the device;
``admit(metrics=WorkerMetrics)`` also adds them to its ``bank_*`` series (on CUDA the
admit kernel adds into the metric accumulators directly, no extra launch).

Attention reads group rows through the encoded row list ``admit`` returns: row >= 0 is a
row of the pool viewed as [*, 16, D]; row < 0 is row ``-row - 1`` of the bank viewed the
same way.  The V row is M rows after the K row in both.
"""

from __future__ import annotations

import torch

from .config import BANK_MAX_CHUNKS, CHUNK_SIZE, GROUP_SIZE

GROUPS = CHUNK_SIZE // GROUP_SIZE
# meta entries (csrc/bank.cu enum Meta)
STEP, FILLS, HITS, MISSES, ADMITTED, LAST_HITS, LAST_MISSES = range(7)
METRIC_NAMES = ("bank_hits", "bank_misses", "bank_bytes_fetched")


def _cuda_ops():
    from .ops import cuda_ops

    return cuda_ops


class DeviceBank:
    def __init__(
        self,
        chunks: int,
        num_kv_heads: int,
        head_size: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        self.capacity = int(chunks)
        if not 1 <= self.capacity <= BANK_MAX_CHUNKS:
            raise ValueError(
                f"device bank of {self.capacity} chunks: 1..{BANK_MAX_CHUNKS} per "
                f"layer (the CUDA admission kernel keeps one byte per slot in "
                f"shared memory); lower bank_chunks"
            )
        self.num_kv_heads, self.head_size = num_kv_heads, head_size
        self.device = torch.device(device)
        # fused CUDA admission where the extension has it, decided once here (tests set it
        # to compare the two paths on the same inputs)
        self.kernels = self.device.type == "cuda" and _cuda_ops().bank_kernels()
        cap, dev = self.capacity, self.device
        # zeros, not empty: the attention kernels never weight a slot they do not need, but
        # the torch path multiplies masked values by 0 (0 * NaN = NaN would poison it)
        # one spare slot at the end: the target of padding in fixed-shape copies
        self.data = torch.zeros(
            cap + 1, num_kv_heads, 2, CHUNK_SIZE, head_size, dtype=dtype, device=dev
        )
        self.block_of_slot = torch.full((cap + 1,), -1, dtype=torch.long, device=dev)
        self.last_use = torch.full((cap + 1,), -1, dtype=torch.long, device=dev)
        self.slot_of_block: torch.Tensor | None = None
        self.num_blocks = 0
        # [STEP] decode steps admitted so far (the value last_use counts in), [FILLS] chunks
        # the last step admitted, [HITS, MISSES, ADMITTED] totals, [LAST_*] the last step's
        self.meta = torch.zeros(8, dtype=torch.long, device=dev)
        # CUDA admission state (csrc/bank.cu): slots by (last_use, slot), double-buffered by
        # step parity; the fill list of the last step; miss bitmaps (bind sizes them)
        self.order = torch.arange(cap, dtype=torch.int32, device=dev).repeat(2)
        self.fill_blocks = torch.full((cap,), -1, dtype=torch.long, device=dev)
        self.fill_slots = torch.full((cap,), -1, dtype=torch.long, device=dev)
        self._miss_bits: torch.Tensor | None = None
        self._miss_summary: torch.Tensor | None = None
        self._arange: torch.Tensor | None = None
        self._sinks: tuple[object, list[torch.Tensor]] = (None, [])

    @property
    def step(self) -> int:
        """Decode steps admitted so far (reads the device: not on the hot path)."""
        return int(self.meta[STEP])

    @property
    def counters(self) -> torch.Tensor:
        """int64 [3] device view: total hits, misses, chunks admitted (copied in)."""
        return self.meta[HITS : ADMITTED + 1]

    def stats(self) -> dict[str, int]:
        """Totals since construction under the metric names (synchronises the device)."""
        hits, misses, admitted = self.counters.tolist()
        return {
            "bank_hits": hits,
            "bank_misses": misses,
            "bank_bytes_fetched": admitted * self.chunk_bytes,
        }

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    @property
    def chunk_bytes(self) -> int:
        return self.data[0].numel() * self.data.element_size()

    def bind(self, pool: torch.Tensor) -> None:
        """Follow the pool: a pool of another size (vLLM rebinds after profiling) empties
        the bank, since block ids then mean other memory."""
        nb = pool.shape[0]
        if self.slot_of_block is not None and nb == self.num_blocks:
            return
        if pool.dtype != self.data.dtype or tuple(pool.shape[1:]) != tuple(self.data.shape[1:]):
            raise ValueError(
                f"bank {tuple(self.data.shape)} {self.data.dtype} does not match "
                f"pool {tuple(pool.shape)} {pool.dtype}"
            )
        dev = self.device
        self.num_blocks = nb
        self.slot_of_block = torch.full((nb + 1,), -1, dtype=torch.long, device=dev)
        self._arange = torch.arange(nb, device=dev)
        words = -(-nb // 32)
        self._miss_bits = torch.zeros(words, dtype=torch.int32, device=dev)
        self._miss_summary = torch.zeros(-(-words // 32), dtype=torch.int32, device=dev)
        self.block_of_slot.fill_(-1)
        self.last_use.fill_(-1)
        self.order.copy_(torch.arange(self.capacity, dtype=torch.int32, device=dev).repeat(2))

    def _use_kernels(self) -> bool:
        return self.kernels

    def _tables(self) -> dict:
        return {
            "slot_of_block": self.slot_of_block,
            "block_of_slot": self.block_of_slot,
            "last_use": self.last_use,
            "order": self.order,
            "miss_bits": self._miss_bits,
            "miss_summary": self._miss_summary,
            "meta": self.meta,
            "fill_blocks": self.fill_blocks,
            "fill_slots": self.fill_slots,
        }

    # ------------------------------------------------------------------ writes
    def invalidate(self, slots: torch.Tensor) -> None:
        """Drop the blocks of token slots [T] (block*64 + offset; < 0 padding) from the bank."""
        if slots.numel() == 0:
            return
        if slots.device != self.device:
            slots = slots.to(self.device)
        if self._use_kernels():
            _cuda_ops().bank_invalidate(
                slots, self.slot_of_block, self.block_of_slot, self.last_use
            )
            return
        nb = self.num_blocks
        slots = slots.to(torch.long)
        blocks = torch.where(slots >= 0, slots // CHUNK_SIZE, nb)
        held = self.slot_of_block[blocks]  # dummy entry nb is always -1
        self.slot_of_block.index_fill_(0, blocks, -1)
        held = torch.where(held >= 0, held, self.capacity)
        self.block_of_slot.index_fill_(0, held, -1)
        self.last_use.index_fill_(0, held, -1)  # evicted first

    def write_through(self, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor) -> None:
        """Write key/value [T, H, D] of token slots [T] into the bank's copies of the resident
        blocks (the torch path; on CUDA the pool's write_kv does it in the same launch).
        Padding (slots < 0) and blocks not resident land in the spare slot."""
        if slots.numel() == 0:
            return
        if slots.device != self.device:
            slots = slots.to(self.device)
        slots = slots.to(torch.long)
        blocks = torch.where(slots >= 0, slots // CHUNK_SIZE, self.num_blocks)
        held = self.slot_of_block[blocks]  # dummy entry num_blocks is always -1
        held = torch.where(held >= 0, held, self.capacity)
        offs = slots % CHUNK_SIZE
        self.data[held, :, 0, offs] = key.to(self.device, self.data.dtype)
        self.data[held, :, 1, offs] = value.to(self.device, self.data.dtype)

    # ------------------------------------------------------------------ decode
    def admit(
        self,
        pool: torch.Tensor,
        rows: torch.Tensor,
        token_ok: torch.Tensor,
        own_cols: tuple[int, int],
        metrics=None,
    ) -> torch.Tensor:
        """Admit the chunks of a decode step's group lists; return the encoded rows.

        rows [R, Hq, Gt] pool K rows ((block*H + kv_head)*2)*M + group, token_ok
        [R, Hq, Gt, 16]; columns own_cols = [a, b) stay in the pool (the layer passes an empty
        range: it writes through, so its open own chunk is banked like any other).
        """
        if self._use_kernels():
            return self._admit_kernels(pool, rows, token_ok, own_cols, metrics)
        return self._admit_torch(pool, rows, token_ok, own_cols, metrics)

    def _admit_kernels(self, pool, rows, token_ok, own_cols, metrics) -> torch.Tensor:
        cuda_ops = _cuda_ops()
        rows = rows.to(torch.long).contiguous()
        token_ok = token_ok.to(torch.bool).contiguous()
        if token_ok.data_ptr() % 16:
            token_ok = token_ok.clone()
        a, b = own_cols
        enc = torch.empty_like(rows)
        sinks = self._metric_sinks(metrics)
        fill = cuda_ops.bank_fill_covered(pool, self.data)
        cuda_ops.bank_admit(
            pool,
            self.data,
            rows,
            token_ok,
            (a, b) if b > a else (0, 0),
            self._tables(),
            enc,
            sinks,
            self.chunk_bytes,
            fill,
        )
        if not fill:  # fixed-shape copy of the fill list; padding lands in the spare slot
            dst = torch.where(self.fill_slots >= 0, self.fill_slots, self.capacity)
            self.data[dst] = pool[self.fill_blocks.clamp(min=0)].to(self.device)
        return enc

    def _metric_sinks(self, metrics) -> list[torch.Tensor]:
        """The float64 device accumulators of metrics' bank_* series, for the admit
        kernel to add into (no launch of its own); [] without metrics."""
        if metrics is None:
            return []
        if self._sinks[0] is not metrics:
            self._sinks = (
                metrics,
                [metrics.accumulator(name, self.device) for name in METRIC_NAMES],
            )
        return self._sinks[1]

    def _admit_torch(self, pool, rows, token_ok, own_cols, metrics) -> torch.Tensor:
        nb, cap = self.num_blocks, self.capacity
        H2M = self.num_kv_heads * 2 * GROUPS
        self.meta.narrow(0, STEP, 1).add_(1)
        step = self.meta[STEP]  # 0-dim device tensor: no host value in any kernel
        col_ok = token_ok.any(-1)
        a, b = own_cols
        if b > a:
            col_ok[..., a:b].fill_(False)
        blk = rows // H2M
        need = torch.zeros(nb + 1, dtype=torch.bool, device=self.device)
        need = need.index_fill_(0, torch.where(col_ok, blk, nb).flatten(), True)[:nb]
        sob = self.slot_of_block[:nb]
        resident = sob >= 0
        hit = need & resident
        miss = need & ~resident
        n_hit = hit.sum()
        # hits first: they must not be chosen as victims below (last_use = step is the max)
        hit_slots = torch.where(hit, sob, cap)  # (index_put_, not index_fill_: a tensor
        self.last_use.index_put_((hit_slots,), step.expand(nb))  # value there is .item())
        rank = torch.cumsum(miss, 0) - 1  # k-th missing block (block order)
        admit = miss & (rank < cap - n_hit)
        victims = torch.sort(self.last_use[:cap], stable=True).indices  # LRU first
        slot = victims[rank.clamp(0, cap - 1)]
        slot = torch.where(admit, slot, cap)
        old = self.block_of_slot[slot]  # block evicted from each assigned slot
        self.slot_of_block.index_fill_(0, torch.where(admit & (old >= 0), old, nb), -1)
        self.slot_of_block.index_put_((torch.where(admit, self._arange, nb),), slot)
        # the dummy entries took the padding's writes; narrow().fill_ (a kernel with a
        # scalar argument), not `t[i] = -1`, which is a synchronising host-to-device copy
        self.slot_of_block.narrow(0, nb, 1).fill_(-1)
        self.block_of_slot.index_put_((slot,), self._arange)
        self.block_of_slot.narrow(0, cap, 1).fill_(-1)
        self.last_use.index_put_((slot,), step.expand(nb))
        self._fill(pool, admit, slot)
        n_miss, n_admit = miss.sum(), admit.sum()
        last = torch.stack([n_hit, n_miss, n_admit])
        self.meta[HITS : ADMITTED + 1] += last
        self.meta[LAST_HITS : LAST_MISSES + 1] = last[:2]
        self.meta.narrow(0, FILLS, 1).copy_(n_admit.view(1))
        if self.device.type == "cuda":  # keep the kernels' LRU order valid (stable sort)
            order = torch.sort(self.last_use[:cap], stable=True).indices.to(torch.int32)
            self.order.view(2, cap).copy_(order.expand(2, cap))
        if metrics is not None:
            metrics.add("bank_hits", n_hit)
            metrics.add("bank_misses", n_miss)
            metrics.add("bank_bytes_fetched", n_admit * self.chunk_bytes)
        # encode rows of resident chunks (own_cols' columns stay in the pool)
        s = self.slot_of_block[blk]
        in_bank = col_ok & (s >= 0)
        return torch.where(in_bank, -(s * H2M + rows % H2M) - 1, rows)

    def _fill(self, pool: torch.Tensor, admit: torch.Tensor, slot: torch.Tensor) -> None:
        if self.device.type == "cuda":
            cuda_ops = _cuda_ops()
            if cuda_ops.bank_fill_covered(pool, self.data):
                blocks = torch.nonzero_static(admit, size=self.capacity, fill_value=-1)[:, 0]
                slots = torch.where(blocks >= 0, slot[blocks.clamp(min=0)], -1)
                cuda_ops.bank_fill(pool, self.data, blocks, slots)
                return
            # fixed-shape fallback (dtypes the kernel lacks): padding lands in the spare slot
            blocks = torch.nonzero_static(admit, size=self.capacity, fill_value=-1)[:, 0]
            dst = torch.where(blocks >= 0, slot[blocks.clamp(min=0)], self.capacity)
            self.data[dst] = pool[blocks.clamp(min=0)].to(self.device)
            return
        blocks = admit.nonzero()[:, 0]  # CPU: data-dependent sizes cost no sync
        if blocks.numel():
            self.data[slot[blocks]] = pool[blocks]
