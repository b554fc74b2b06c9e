"""One step's plan, shared by every layer: which rows decode, which chunks close, and what
the step adds to the metrics.  Built from host-side lengths; no vLLM import (the GPU tests
drive HGALayer with it on a machine without vLLM).

Two decode layouts:

* variable (eager steps): the decode rows are the single-query requests of any batch.  vLLM
  puts them first (the builder asks for ``reorder_batch_threshold = 1``), so they are
  normally rows [0, R): the layer then reads ``q[:R]`` and writes ``out[:R]`` in place.
  Any other layout gathers and scatters them by index.
* fixed (CUDA graphs): a batch of N single-token requests, padded or not.  Everything the
  decode step reads is either vLLM's persistent input (q, K/V, slot mapping, block table)
  or a ``DecodeBuffers`` tensor rewritten in place by ``plan``; widths come from
  max_model_len, not from the batch; every host decision depends on N alone.  So one
  captured graph per N replays every such batch.  Padded requests (query length 0,
  sequence length 0, null block table row) get position -1: no visible key, output 0.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .config import CHUNK_SIZE, GROUP_SIZE, HGAConfig
from .routing import keys_seen

GROUPS = CHUNK_SIZE // GROUP_SIZE


@dataclass
class DecodeBuffers:
    """Inputs of the fixed-shape decode step at fixed addresses (what a CUDA graph reads),
    for up to max_reqs rows; owned by the metadata builder, rewritten by every plan."""

    pos: torch.Tensor  # [max_reqs] int64 position of each row's query (-1: padding)
    closing: torch.Tensor  # [max_reqs] int64 block whose chunk closes this step, else -1
    max_chunks: int  # chunks of a max_model_len request: the routing width

    @classmethod
    def allocate(
        cls, max_reqs: int, max_model_len: int, device: torch.device | str
    ) -> DecodeBuffers:
        return cls(
            torch.zeros(max_reqs, dtype=torch.long, device=device),
            torch.full((max_reqs,), -1, dtype=torch.long, device=device),
            -(-max_model_len // CHUNK_SIZE),
        )


@dataclass
class HGAMetadata:
    num_actual_tokens: int
    slot_mapping: torch.Tensor  # [T] block*64 + offset, -1 for padding
    block_table: torch.Tensor  # [R, max_blocks]
    q_starts: list[int]  # per request: position of its first query this step
    q_lens: list[int]
    tok_starts: list[int]  # per request: row of its first query in the batch
    prefill_reqs: list[int]  # requests with more than one query this step
    decode_pairs: list[tuple[int, int]]  # (batch row, request) of single-query requests
    num_decodes: int  # decode rows the kernels run (fixed layout: N, padding included)
    decode_prefix: bool  # decode rows are batch rows = requests [0, num_decodes)
    decode_rows: torch.Tensor | None  # [Rd] their batch rows (None when decode_prefix)
    decode_reqs: torch.Tensor | None  # [Rd] their request indices (None when decode_prefix)
    decode_pos: torch.Tensor  # [Rd] their positions
    decode_chunks: int  # routing width in chunks (>= 1 + every decode row's own chunk)
    closing_blocks: torch.Tensor  # block ids whose chunk closed this step; -1 = none
    num_closing: int  # real entries of closing_blocks
    fixed: bool  # the fixed-shape (CUDA graph) layout

    def decode_queries(self, q: torch.Tensor) -> torch.Tensor:
        return q[: self.num_decodes] if self.decode_prefix else q[self.decode_rows]

    def decode_block_table(self) -> torch.Tensor:
        if self.decode_prefix:
            return self.block_table[: self.num_decodes]
        return self.block_table[self.decode_reqs]

    def decode_positions(self) -> list[int]:
        """Positions of the real decode queries (host)."""
        return [self.q_starts[r] for _, r in self.decode_pairs]

    @classmethod
    def plan(
        cls,
        query_start_loc: list[int],
        seq_lens: list[int],
        block_table: torch.Tensor,
        slot_mapping: torch.Tensor,
        num_actual_tokens: int,
        buffers: DecodeBuffers | None = None,
        seq_lens_dev: torch.Tensor | None = None,
    ) -> HGAMetadata:
        """Plan one step for all layers from host-side lengths (no device reads).

        With `buffers`, a batch of single-token requests (padding included) gets the fixed
        layout; seq_lens_dev (vLLM's device seq_lens) then feeds it without a host copy.
        """
        qsl = query_start_loc
        num_reqs = len(seq_lens)
        q_lens = [qsl[i + 1] - qsl[i] for i in range(num_reqs)]
        q_starts = [s - q for s, q in zip(seq_lens, q_lens)]
        decodes = [r for r in range(num_reqs) if q_lens[r] == 1]
        if buffers is not None and single_token_batch(q_lens, num_actual_tokens):
            decode = _fixed_decode(seq_lens, q_lens, block_table, buffers, seq_lens_dev)
        else:
            decode = _variable_decode(qsl, seq_lens, q_starts, q_lens, decodes, block_table)
        return cls(
            num_actual_tokens=num_actual_tokens,
            slot_mapping=slot_mapping,
            block_table=block_table,
            q_starts=q_starts,
            q_lens=q_lens,
            tok_starts=qsl[:num_reqs],
            decode_pairs=[(qsl[r], r) for r in decodes],
            **decode,
        )


def single_token_batch(q_lens: list[int], num_actual_tokens: int) -> bool:
    """Every request has one query or is padding (none), one token row per request: the
    batches vLLM replays as full decode CUDA graphs (UNIFORM_SINGLE_TOKEN_DECODE)."""
    return bool(q_lens) and num_actual_tokens == len(q_lens) and max(q_lens) <= 1


def _idx(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long).to(device, non_blocking=True)


def _variable_decode(qsl, seq_lens, q_starts, q_lens, decodes, block_table) -> dict:
    closing_r, closing_j = [], []
    for r in range(len(seq_lens)):  # chunk j closes when its last token (64j+63) is computed
        for j in range(q_starts[r] // CHUNK_SIZE, seq_lens[r] // CHUNK_SIZE):
            closing_r.append(r)
            closing_j.append(j)
    dev = block_table.device
    prefix = decodes == list(range(len(decodes)))  # then their rows are [0, R) too
    if closing_r:
        closing = block_table[_idx(closing_r, dev), _idx(closing_j, dev)].long()
    else:  # most decode steps: no index kernel at all
        closing = torch.empty(0, dtype=torch.long, device=dev)
    return dict(
        prefill_reqs=[r for r in range(len(seq_lens)) if q_lens[r] > 1],
        num_decodes=len(decodes),
        decode_prefix=prefix,
        decode_rows=None if prefix else _idx([qsl[r] for r in decodes], dev),
        decode_reqs=None if prefix else _idx(decodes, dev),
        decode_pos=_idx([q_starts[r] for r in decodes], dev),
        decode_chunks=1 + max((q_starts[r] // CHUNK_SIZE for r in decodes), default=-1),
        closing_blocks=closing,
        num_closing=len(closing_r),
        fixed=False,
    )


def _fixed_decode(
    seq_lens, q_lens, block_table, buffers: DecodeBuffers, seq_lens_dev: torch.Tensor | None
) -> dict:
    """Positions and closing blocks of N single-token rows, written into `buffers` by a
    few device ops (outside any graph: build() runs before the replay)."""
    N = len(seq_lens)
    if seq_lens_dev is None:
        seq_lens_dev = torch.tensor(seq_lens, dtype=torch.long, device=block_table.device)
    seq = seq_lens_dev[:N]
    pos = buffers.pos[:N]
    torch.sub(seq, 1, out=pos)  # padding rows: seq_len 0 -> -1
    own = pos.clamp(min=0).div(CHUNK_SIZE, rounding_mode="floor").unsqueeze(1)
    closing = buffers.closing[:N]
    closing.copy_(block_table[:N].gather(1, own).squeeze(1))
    closes = (seq % CHUNK_SIZE == 0) & (seq > 0)  # the row's query is its chunk's last token
    closing.masked_fill_(~closes, -1)
    n_closing = sum(1 for s, n in zip(seq_lens, q_lens) if n == 1 and s % CHUNK_SIZE == 0)
    return dict(
        prefill_reqs=[],
        num_decodes=N,
        decode_prefix=True,
        decode_rows=None,
        decode_reqs=None,
        decode_pos=pos,
        decode_chunks=min(buffers.max_chunks, block_table.shape[1]),
        closing_blocks=closing,
        num_closing=n_closing,
        fixed=True,
    )


# ---------------------------------------------------------------------------- metrics
@functools.lru_cache(maxsize=1 << 16)
def _keys_before_own_chunk(c: int, cfg: HGAConfig) -> int:
    """keys_seen at the first position of chunk c, minus that position's own key."""
    return keys_seen(c * CHUNK_SIZE, cfg) - 1


def routed_decode_keys(positions: list[int], cfg: HGAConfig) -> int:
    """Sum of routing.keys_seen over the positions (one query head each), cached by chunk:
    a step of N decode rows costs N dictionary look-ups on the host."""
    return sum(_keys_before_own_chunk(p // CHUNK_SIZE, cfg) + p % CHUNK_SIZE + 1 for p in positions)


def count_step(
    metrics,
    md: HGAMetadata,
    cfg: HGAConfig,
    layers: int,
    dense_layers: int,
    num_heads: int,
    num_kv_heads: int,
    head_size: int,
    itemsize: int,
) -> None:
    """Add one step's host-countable metrics for `layers` layers (`dense_layers` of them
    dense): query tokens, summary bytes, and density / K/V bytes of the decode rows.

    The builder calls this once per step, not the layers: a replayed CUDA graph runs no
    Python, and decode keys follow from positions and the config alone (keys_seen, tested
    equal to the reference masks).  Prefill attention still counts on the device.
    """
    if metrics is None:
        return
    pos = md.decode_positions()
    dense_keys = sum(pos) + len(pos)  # sum of p + 1: the dense causal pairs per head
    routed_keys = routed_decode_keys(pos, cfg)
    routed = layers - dense_layers
    kv_token = head_size * 2 * itemsize  # K and V of one key of one head
    metrics.add("query_tokens", layers * sum(md.q_lens))
    metrics.add(
        "summary_bytes_written",
        layers * md.num_closing * num_kv_heads * (1 + GROUPS) * head_size * 4,
    )
    metrics.add("keys_attended", num_heads * (routed * routed_keys + dense_layers * dense_keys))
    metrics.add("dense_pairs", num_heads * layers * dense_keys)
    # as the layers counted it: routed lists per query head, dense prefixes per KV head
    metrics.add(
        "kv_bytes_read",
        kv_token * (routed * num_heads * routed_keys + dense_layers * num_kv_heads * dense_keys),
    )
