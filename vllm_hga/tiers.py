"""One owner per engine for HGA's memory: host pool (or NVMe files), device banks, CUDA
prefill scratch and metrics (docs/DESIGN.md §2, "Ownership").

vLLM gives a plugin no per-engine object of its own, so ``tiers_for`` keys one
``EngineTiers`` by the engine's ``VllmConfig`` (the worker's config object, the same one
its attention builders and layers see).  When that config is collected with its engine,
the tiers are shut down: pinned memory is released and NVMe mappings are unmapped, and a
second engine in the same process gets fresh tiers with its own settings.
"""

from __future__ import annotations

import weakref

import torch

from .bank import DeviceBank
from .config import CHUNK_SIZE, HGAConfig
from .metrics import WorkerMetrics
from .ops.cuda_prefill import Scratch
from .sizing import auto_bank_budget, bank_chunks_for, chunk_bytes
from .store import HostKVPool, _nbytes


class EngineTiers:
    """Allocates each tier once per layer (host pools at start-up, ``reserve_pools``;
    banks and scratch on the first bind), reuses it after, frees all of it in
    ``shutdown``.  Any use after shutdown raises."""

    def __init__(self, cfg: HGAConfig, budget_bytes: int | None = None) -> None:
        """`budget_bytes`: this rank's pool budget from the start-up plan (default: the
        configured host_kv_bytes / disk_kv_bytes)."""
        self.cfg = cfg
        if budget_bytes is None:
            budget_bytes = cfg.disk_kv_bytes if cfg.disk_dir else cfg.host_kv_bytes
        self.metrics = WorkerMetrics()
        self.pool = HostKVPool(
            cfg.disk_dir,
            budget_bytes=budget_bytes,
            metrics=self.metrics,
        )
        self.banks: dict[str, DeviceBank] = {}
        self.scratches: dict[tuple, Scratch] = {}
        self.closed = False
        self._auto_bank_chunks: dict[tuple, int] = {}  # bank_chunks "auto", per layer shape

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError(
                "hga: this engine's memory tiers were shut down; a new engine "
                "gets its own (tiers_for)"
            )

    def layer_pool(
        self,
        name: str,
        num_blocks: int,
        num_kv_heads: int,
        head_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> torch.Tensor:
        """Layer `name`'s full K/V [num_blocks, H_kv, 2, 64, D] in the host tier."""
        self._check_open()
        return self.pool.layer(name, num_blocks, num_kv_heads, head_size, dtype, device)

    def reserve_pools(self, kv_cache_config, device, rank: int = 0) -> None:
        """Allocate every layer's pool for vLLM's final block count at start-up (the
        worker calls it right after vLLM allocates its KV cache), after checking that
        this node's RAM or disk has room: a tier that does not fit refuses the start."""
        self._check_open()
        device = torch.device(device)
        layers = [
            (name, group.kv_cache_spec)
            for group in kv_cache_config.kv_cache_groups
            for name in group.layer_names
        ]
        shapes = {
            name: (kv_cache_config.num_blocks, spec.num_kv_heads, 2, CHUNK_SIZE, spec.head_size)
            for name, spec in layers
        }
        need = sum(_nbytes(shapes[name], spec.dtype) for name, spec in layers)
        self.pool.check_room(need, kv_cache_config.num_blocks, len(layers), rank)
        for name, spec in layers:
            self.layer_pool(
                name,
                kv_cache_config.num_blocks,
                spec.num_kv_heads,
                spec.head_size,
                spec.dtype,
                device,
            )
        from vllm.logger import init_logger

        init_logger("vllm.hga").info(
            "HGA rank %d: %s K/V pool allocated, %.2f GiB for %d blocks x %d layers",
            rank,
            "disk" if self.cfg.disk_dir else "host",
            self.pool.nbytes() / 2**30,
            kv_cache_config.num_blocks,
            len(layers),
        )

    def bank_chunks(
        self, vllm_config, num_kv_heads: int, head_size: int, dtype_bytes: int, device
    ) -> int:
        """Chunks per layer of the device bank: the explicit ``bank_chunks``, or for "auto"
        what the memory free on the device holds, decided once on the first layer's
        profiling forward (before any bank is allocated) and logged with the split."""
        chunks = self.cfg.bank_size(torch.device(device).type)
        if chunks >= 0:
            return chunks
        key = (num_kv_heads, head_size, dtype_bytes, str(device))
        if key not in self._auto_bank_chunks:
            self._auto_bank_chunks[key] = self._size_auto_bank(
                vllm_config, num_kv_heads, head_size, dtype_bytes, device
            )
        return self._auto_bank_chunks[key]

    def _size_auto_bank(
        self, vc, num_kv_heads: int, head_size: int, dtype_bytes: int, device
    ) -> int:
        from vllm.logger import init_logger

        free, total = torch.cuda.mem_get_info(device)
        budget = auto_bank_budget(free, total, vc.cache_config.gpu_memory_utilization)
        layers = vc.model_config.get_num_layers(vc.parallel_config) - len(self.cfg.dense_layers)
        chunks = bank_chunks_for(
            budget,
            layers,
            num_kv_heads,
            head_size,
            dtype_bytes,
            vc.model_config.max_model_len,
            vc.scheduler_config.max_num_seqs,
            self.cfg.bank_max_chunks,
        )
        init_logger(__name__).info(
            "HGA: device working set %.2f GiB = %d chunks = %d tokens per layer "
            "(%d layers, bank_chunks auto from %.2f GiB free); the host holds the "
            "full history",
            layers * (chunks + 1) * chunk_bytes(num_kv_heads, head_size, dtype_bytes) / 2**30,
            chunks,
            chunks * CHUNK_SIZE,
            layers,
            free / 2**30,
        )
        return chunks

    def device_bank(
        self,
        name: str,
        chunks: int,
        num_kv_heads: int,
        head_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> DeviceBank:
        """Layer `name`'s device bank (bank.py).  The backend asks for it on vLLM's
        memory-profiling forward already, so the profiler counts it as model memory."""
        self._check_open()
        bank = self.banks.get(name)
        if (
            bank is None
            or bank.data.dtype != dtype
            or bank.capacity != chunks
            or bank.device != torch.device(device)
        ):
            bank = self.banks[name] = DeviceBank(chunks, num_kv_heads, head_size, dtype, device)
            self.metrics.set("bank_bytes", sum(b.nbytes for b in self.banks.values()))
        return bank

    def prefill_scratch(
        self,
        max_chunks: int,
        num_kv_heads: int,
        head_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> Scratch:
        """The CUDA prefill scratch of this shape, shared by all layers (grown if asked for
        more chunks; the smaller one is freed first)."""
        self._check_open()
        device = torch.device(device)
        key = (str(device), dtype, num_kv_heads, head_size)
        sc = self.scratches.get(key)
        if sc is None or sc.max_chunks < max_chunks:
            self.scratches.pop(key, None)
            sc = self.scratches[key] = Scratch(max_chunks, num_kv_heads, head_size, dtype, device)
        return sc

    def nbytes(self) -> dict[str, int]:
        return {
            "pool": self.pool.nbytes(),
            "banks": sum(b.nbytes for b in self.banks.values()),
            "scratch": sum(s.nbytes() for s in self.scratches.values()),
        }

    def shutdown(self) -> None:
        """Drop every tier: pinned host memory goes back, NVMe mappings are unmapped (their
        files were unlinked when mapped), device memory returns to torch's allocator."""
        self.pool.release()
        self.banks.clear()
        self.scratches.clear()
        self.closed = True


_ENGINES: dict[int, EngineTiers] = {}


def tiers_for(vllm_config) -> EngineTiers:
    """The engine's tiers: the only lookup of them (builder and layers both call it)."""
    key = id(vllm_config)
    tiers = _ENGINES.get(key)
    if tiers is None:
        from .startup import planned_capacity

        cap = planned_capacity(vllm_config)
        tiers = _ENGINES[key] = EngineTiers(
            HGAConfig.from_vllm_config(vllm_config),
            cap.host_budget_bytes if cap is not None else None,
        )
        # id() is reused after collection: drop the entry exactly when the config dies
        weakref.finalize(vllm_config, _release, key)
    return tiers


def _release(key: int) -> None:
    tiers = _ENGINES.pop(key, None)
    if tiers is not None:
        tiers.shutdown()
