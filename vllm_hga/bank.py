"""The device bank: an LRU working set of whole chunks of K/V in device memory, per layer.

The host pool (store.py) holds every block's full K/V; on CUDA decode attention reads it
over PCIe (UVA).  Decode steps of a request route to mostly the same chunks step after
step (sinks and local window always, routed chunks largely), so the chunks a step's group
lists touch are copied into a small device-resident bank and later steps read them from
there.

Layout: ``data [bank_chunks (+1 spare), H_kv, 2, 64, D]`` in the pool's dtype (one slot = one block's
K and V of all KV heads, same layout as a pool block, so a group row inside a slot has the
same offset as inside its block).  Tables (int64, each with one spare "dummy" entry at the
end that absorbs writes of padding, so every update is a fixed-shape scatter):

* ``slot_of_block [num_blocks + 1]``: bank slot of a pool block, -1 when not resident;
* ``block_of_slot [bank_chunks + 1]``: pool block held by a slot, -1 when empty;
* ``last_use [bank_chunks + 1]``: the layer's decode step that last touched the slot.

Per decode step (``admit``): the chunks the group lists need (valid columns except the
open own chunk) are marked in a [num_blocks] mask; resident ones refresh ``last_use``
(hits); the others (misses) take the least recently used slots not hit this step, in block
order, as long as slots remain, and are copied in from the pool.  Misses beyond the bank's
size are read from the pool directly this step.  Every block written (``invalidate``:
new tokens, or a freed block reused by another request) leaves the bank first, so stale
data is never read.  No step reads a device value on the host: on CUDA the only
data-dependent size (which blocks to copy) is ``torch.nonzero_static`` padded to the bank
size, and the copy kernel skips the padding.

Attention reads group rows through the encoded row list ``admit`` returns: row >= 0 is a
row of the pool viewed as [*, 16, D]; row < 0 is row ``-row - 1`` of the bank viewed the
same way.  The V row is M rows after the K row in both.
"""

from __future__ import annotations

import torch

from .config import CHUNK_SIZE, GROUP_SIZE

GROUPS = CHUNK_SIZE // GROUP_SIZE


class DeviceBank:
    def __init__(self, chunks: int, num_kv_heads: int, head_size: int, dtype: torch.dtype,
                 device: torch.device | str):
        self.capacity = int(chunks)
        self.num_kv_heads, self.head_size = num_kv_heads, head_size
        self.device = torch.device(device)
        # zeros, not empty: the attention kernels never weight a slot they do not need, but
        # the torch path multiplies masked values by 0 (0 * NaN = NaN would poison it)
        # one spare slot at the end: the target of padding in fixed-shape copies
        self.data = torch.zeros(self.capacity + 1, num_kv_heads, 2, CHUNK_SIZE, head_size,
                                dtype=dtype, device=self.device)
        self.block_of_slot = torch.full((self.capacity + 1,), -1, dtype=torch.long,
                                        device=self.device)
        self.last_use = torch.full((self.capacity + 1,), -1, dtype=torch.long,
                                   device=self.device)
        self.slot_of_block: torch.Tensor | None = None
        self.num_blocks = 0
        self.step = 0
        self._arange: torch.Tensor | None = None

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
            raise ValueError(f"bank {tuple(self.data.shape)} {self.data.dtype} does not match "
                             f"pool {tuple(pool.shape)} {pool.dtype}")
        self.num_blocks = nb
        self.slot_of_block = torch.full((nb + 1,), -1, dtype=torch.long, device=self.device)
        self._arange = torch.arange(nb, device=self.device)
        self.block_of_slot.fill_(-1)
        self.last_use.fill_(-1)

    # ------------------------------------------------------------------ writes
    def invalidate(self, slots: torch.Tensor) -> None:
        """Drop the blocks of token slots [T] (block*64 + offset; < 0 padding) from the bank."""
        if slots.numel() == 0:
            return
        nb = self.num_blocks
        slots = slots.to(self.device, torch.long)
        blocks = torch.where(slots >= 0, slots // CHUNK_SIZE, nb)
        held = self.slot_of_block[blocks]  # dummy entry nb is always -1
        self.slot_of_block.index_fill_(0, blocks, -1)
        held = torch.where(held >= 0, held, self.capacity)
        self.block_of_slot.index_fill_(0, held, -1)
        self.last_use.index_fill_(0, held, -1)  # evicted first

    # ------------------------------------------------------------------ decode
    def admit(self, pool: torch.Tensor, rows: torch.Tensor, token_ok: torch.Tensor,
              own_cols: tuple[int, int], metrics=None) -> torch.Tensor:
        """Admit the chunks of a decode step's group lists; return the encoded rows.

        rows [R, Hq, Gt] pool K rows ((block*H + kv_head)*2)*M + group, token_ok
        [R, Hq, Gt, 16]; columns own_cols = [a, b) are the open own chunk (never admitted).
        """
        nb, cap = self.num_blocks, self.capacity
        H2M = self.num_kv_heads * 2 * GROUPS
        self.step += 1
        step = self.step
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
        self.last_use.index_fill_(0, torch.where(hit, sob, cap), step)
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
        self.last_use.index_fill_(0, slot, step)
        self._fill(pool, admit, slot)
        if metrics is not None:
            n_admit = admit.sum()
            metrics.add("bank_hits", n_hit)
            metrics.add("bank_misses", miss.sum())
            metrics.add("bank_bytes_fetched", n_admit * self.chunk_bytes)
        # encode rows of resident chunks (the own chunk's columns stay in the pool)
        s = self.slot_of_block[blk]
        in_bank = col_ok & (s >= 0)
        return torch.where(in_bank, -(s * H2M + rows % H2M) - 1, rows)

    def _fill(self, pool: torch.Tensor, admit: torch.Tensor, slot: torch.Tensor) -> None:
        if self.device.type == "cuda":
            from .ops import cuda_ops

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
