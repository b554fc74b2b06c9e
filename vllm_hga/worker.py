"""vLLM's CPU and CUDA workers, extended by HGA's two start-up duties in each rank.

The platform (platform.py) swaps vLLM's default worker class for these subclasses when
HGA is selected (``startup.install_hga_worker``); they are plain vLLM workers otherwise.

1. Block count: vLLM sizes its (summary) KV cache from the memory a worker reports; the
   worker reports at most what the host plan's block count needs, so the count is the
   smaller of what the host tier and the device budget hold.  ``num_gpu_blocks_override``
   could not do this: vLLM applies it even past its device budget.
2. Host pools: allocated (RAM committed, NVMe files reserved) right after vLLM allocates
   its KV cache, before the engine reports ready, with the RAM check done first: a tier
   that does not fit refuses the start with the numbers instead of failing a request.
"""

from __future__ import annotations

from ._lazy import build_subclass


class HGAWorkerMixin:
    def determine_available_memory(self) -> int:
        available = super().determine_available_memory()  # type: ignore[misc]
        from .startup import planned_capacity

        cap = planned_capacity(self.vllm_config)  # type: ignore[attr-defined]
        if cap is None:
            return available
        block_bytes = sum(
            spec.page_size_bytes
            for spec in self.get_kv_cache_spec().values()  # type: ignore[attr-defined]
        )
        return min(available, cap.num_blocks * block_bytes) if block_bytes else available

    def initialize_from_config(self, kv_cache_config) -> None:
        super().initialize_from_config(kv_cache_config)  # type: ignore[misc]
        from .startup import planned_capacity
        from .tiers import tiers_for

        if planned_capacity(self.vllm_config) is None:  # type: ignore[attr-defined]
            return
        tiers_for(self.vllm_config).reserve_pools(  # type: ignore[attr-defined]
            kv_cache_config,
            self.device,  # type: ignore[attr-defined]
            rank=self.rank,  # type: ignore[attr-defined]
        )

    def hga_report(self) -> dict:
        """This rank's HGA memory (bytes per tier) and counters, e.g. for
        ``LLM.collective_rpc("hga_report")`` (one dict per rank)."""
        from .tiers import tiers_for

        tiers = tiers_for(self.vllm_config)  # type: ignore[attr-defined]
        return {"rank": self.rank, **tiers.nbytes(), **tiers.metrics.totals()}  # type: ignore[attr-defined]


_WORKERS = {
    "HGACpuWorker": (HGAWorkerMixin, "vllm.v1.worker.cpu_worker", "CPUWorker"),
    "HGACudaWorker": (HGAWorkerMixin, "vllm.v1.worker.gpu_worker", "Worker"),
}


def __getattr__(name: str):
    return build_subclass(globals(), name, _WORKERS)
