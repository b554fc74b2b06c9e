"""The vLLM attention backend: metadata, builder, impl.  Kept thin on purpose.

Per step, ``HGAMetadataBuilder.build`` plans once for all layers (plan.py: which requests
decode, which chunks close, the step's host-side metrics); per layer,
``HGAAttentionImpl.forward``
  1. writes the step's K/V to the host pool (owned by the engine's tiers.EngineTiers),
  2. summarises chunks that closed this step into vLLM's page (ops summarize_pool),
  3. routes and attends: decode rows gather only their visible groups (ops attend_groups);
     prefill rows attend over their prefix under the routed mask.
Both run in HGALayer.forward through the layer's TorchOps or CudaOps, chosen once.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from vllm.config import VllmConfig, get_current_vllm_config
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
)
from vllm.v1.kv_cache_interface import AttentionSpec

from .attention import GROUPS, HGALayer
from .config import CHUNK_SIZE, HGAConfig
from .ops import kernel_blockers
from .plan import DecodeBuffers, HGAMetadata, count_step
from .rope import RopeSpec, spec_from_vllm_rope
from .store import summary_view
from .tiers import tiers_for


class HGAAttentionBackend(AttentionBackend):
    forward_includes_kv_cache_update: bool = True
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list] = ["auto", "float16", "bfloat16"]

    @staticmethod
    def get_name() -> str:
        return "HGA"

    @staticmethod
    def get_impl_cls() -> type[HGAAttentionImpl]:
        return HGAAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[HGAMetadataBuilder]:
        return HGAMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list:
        return [CHUNK_SIZE]

    @classmethod
    def supports_block_size(cls, block_size: int | None) -> bool:
        return block_size is None or block_size == CHUNK_SIZE

    @classmethod
    def get_preferred_block_size(cls, default_block_size: int) -> int:
        return CHUNK_SIZE

    @classmethod
    def supports_kv_connector(cls) -> bool:
        return False  # our pages hold summaries; a connector would ship no K/V

    @classmethod
    def supports_compute_capability(cls, capability) -> bool:
        return True

    @classmethod
    def validate_configuration(cls, **selector) -> list[str]:
        """vLLM's checks plus one of ours: HGA's platform hook ran its start-up checks.
        With VLLM_HGA_PLATFORM=0 vLLM's CUDA platform would build HGA layers on a cache
        nobody sized for them; refuse here, while the model is being built."""
        from vllm.platforms import current_platform

        from .platform import is_hga_platform
        from .platform_hook import HOOK_OFF_REASON

        reasons = list(super().validate_configuration(**selector))
        if not is_hga_platform(current_platform):
            reasons.append(HOOK_OFF_REASON)
        return reasons

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        """One state per block: the chunk's float32 summaries, [H_kv, 1 + M, D]."""
        assert spec.block_size == CHUNK_SIZE, f"HGA needs block size {CHUNK_SIZE}"
        return dataclasses.replace(
            spec,
            tokens_per_state=spec.block_size,
            state_content_bytes=(1 + GROUPS) * spec.head_size * 4,
        )


def cuda_graph_blockers(
    cfg: HGAConfig, head_size: int, dtype: torch.dtype, built: bool | None = None
) -> list[str]:
    """Why decode steps of this config cannot run as full CUDA graphs (empty: they can):
    every reason the layers would not run the kernels (ops.kernel_blockers; built as
    there), plus the graph-only ones.

    A captured decode step may only launch kernels on fixed-address buffers (plan.py).
    """
    reasons = [] if cfg.cuda_graphs else ["cuda_graphs is off"]
    reasons += kernel_blockers(cfg, "cuda", dtype, head_size, built)
    # the device bank is graph-safe: fused admission kernels with a device-side step
    # counter and fixed shapes (bank.py; tests/gpu/test_graphs.py captures it)
    if cfg.dense_layers:
        reasons.append("dense_layers decode through the torch prefix path (host loops)")
    return reasons


class HGAMetadataBuilder(AttentionMetadataBuilder[HGAMetadata]):
    # decided per config by get_cudagraph_support; this is only the class default
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER

    @classmethod
    def get_cudagraph_support(
        cls, vllm_config: VllmConfig, kv_cache_spec: AttentionSpec
    ) -> AttentionCGSupport:
        """Full CUDA graphs for batches of single-token decodes (vLLM captures one per
        batch size and runs everything else eagerly, attention between piecewise graphs)."""
        cfg = HGAConfig.from_vllm_config(vllm_config)
        if cuda_graph_blockers(cfg, kv_cache_spec.head_size, kv_cache_spec.dtype):
            return AttentionCGSupport.NEVER
        return AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE

    def __init__(
        self,
        kv_cache_spec: AttentionSpec,
        layer_names: list[str],
        vllm_config: VllmConfig,
        device: torch.device,
    ):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        assert kv_cache_spec.block_size == CHUNK_SIZE
        # vLLM moves single-token decodes to the front of the batch: decode rows are then
        # [0, R), read and written in place (no index gather / scatter / cast per layer)
        self._init_reorder_batch_threshold(1)
        tiers = tiers_for(vllm_config)
        self.cfg, self.metrics = tiers.cfg, tiers.metrics
        self.buffers = self._graph_buffers(vllm_config, kv_cache_spec, device)
        self.count_args = self._count_args(vllm_config, kv_cache_spec, layer_names)

    def _graph_buffers(
        self, vllm_config: VllmConfig, kv_cache_spec: AttentionSpec, device: torch.device
    ) -> DecodeBuffers | None:
        """The fixed-layout decode inputs, when vLLM will capture full decode graphs
        (its cudagraph mode is resolved before builders are made)."""
        from vllm.config import CUDAGraphMode

        mode = vllm_config.compilation_config.cudagraph_mode
        if (
            mode is None
            or mode.decode_mode() != CUDAGraphMode.FULL
            or self.get_cudagraph_support(vllm_config, kv_cache_spec) == AttentionCGSupport.NEVER
        ):
            return None
        return DecodeBuffers.allocate(
            vllm_config.scheduler_config.max_num_seqs,
            vllm_config.model_config.max_model_len,
            device,
        )

    def _count_args(
        self, vllm_config: VllmConfig, spec: AttentionSpec, layer_names: list[str]
    ) -> dict:
        """plan.count_step's shape arguments for this builder's layers."""
        from vllm.model_executor.models.utils import extract_layer_index

        dense = sum(1 for name in layer_names if extract_layer_index(name) in self.cfg.dense_layers)
        heads = vllm_config.model_config.get_num_attention_heads(vllm_config.parallel_config)
        return dict(
            layers=len(layer_names),
            dense_layers=dense,
            num_heads=heads,
            num_kv_heads=spec.num_kv_heads,
            head_size=spec.head_size,
            itemsize=torch.empty((), dtype=spec.dtype).element_size(),
        )

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> HGAMetadata:
        self.metrics.end_step()  # once per step: rate-limited snapshot for /metrics
        md = self._plan(common_attn_metadata)
        count_step(self.metrics, md, self.cfg, **self.count_args)
        return md

    def build_for_cudagraph_capture(
        self, common_attn_metadata: CommonAttentionMetadata
    ) -> HGAMetadata:
        """Capture plans like any step (positions 0, all rows single-token), writing the
        same buffers replays will; a capture is not a step, so it counts nothing."""
        return self._plan(common_attn_metadata)

    def _plan(self, cm: CommonAttentionMetadata) -> HGAMetadata:
        seq_cpu = (
            cm.seq_lens_cpu_upper_bound
            if cm.seq_lens_cpu_upper_bound is not None
            else cm.seq_lens.cpu()
        )
        return HGAMetadata.plan(
            cm.query_start_loc_cpu.tolist(),
            seq_cpu.tolist()[: cm.num_reqs],
            cm.block_table_tensor,
            cm.slot_mapping,
            cm.num_actual_tokens,
            buffers=self.buffers,
            seq_lens_dev=cm.seq_lens,
        )


def model_rope_spec(vllm_config: VllmConfig, head_size: int, neox: bool) -> RopeSpec:
    """The model's own RoPE frequencies, read from vLLM's rotary embedding."""
    from vllm.model_executor.layers.rotary_embedding import get_rope

    hf = vllm_config.model_config.hf_text_config
    rope = get_rope(
        head_size,
        max_position=getattr(hf, "max_position_embeddings", 8192),
        is_neox_style=neox,
        rope_parameters=getattr(hf, "rope_parameters", None),
        dtype=torch.float32,
    )
    return spec_from_vllm_rope(rope, head_size)


class HGAAttentionImpl(AttentionImpl[HGAMetadata]):
    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int | None = None,
        alibi_slopes: list[float] | None = None,
        sliding_window: int | None = None,
        kv_cache_dtype: str = "auto",
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        **extra,
    ) -> None:
        problems = []
        if alibi_slopes is not None:
            problems.append("ALiBi")
        if sliding_window is not None:
            problems.append("sliding window")
        if logits_soft_cap:
            problems.append("logit soft-capping")
        if attn_type != AttentionType.DECODER:
            problems.append(f"attention type {attn_type}")
        if kv_sharing_target_layer_name is not None:
            problems.append("cross-layer KV sharing")
        if extra.get("sinks") is not None:
            problems.append("learned attention sinks")
        if problems:
            raise ValueError(f"HGA does not support {', '.join(problems)} in this layer")
        self.num_heads, self.head_size, self.scale = num_heads, head_size, float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_cache_dtype = kv_cache_dtype
        from .startup import rope_is_neox

        vllm_config = get_current_vllm_config()
        self.tiers = tiers_for(vllm_config)  # the engine's memory (tiers.py)
        self.cfg = self.tiers.cfg
        self.vllm_config = vllm_config  # bank_chunks "auto" is sized from it at forward time
        self.rope = model_rope_spec(
            vllm_config, head_size, bool(rope_is_neox(vllm_config, self.cfg))
        )
        self.max_model_len = vllm_config.model_config.max_model_len
        self.layer: HGALayer | None = None  # built on first forward (needs the layer name)

    def forward(
        self,
        layer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: HGAMetadata,
        output: torch.Tensor,
        output_scale=None,
        output_block_scale=None,
    ) -> torch.Tensor:
        if self.layer is None:
            self.layer = self._build_layer(layer, query, key)
        if attn_metadata is None:  # memory-profiling run
            # the fixed working sets are allocated now, so that vLLM's profiler counts them
            if self.layer.ops.kernels and not self.layer.dense:  # the CUDA prefill scratch
                self.tiers.prefill_scratch(
                    self.layer.max_chunks, self.num_kv_heads, self.head_size, key.dtype, key.device
                )
            return output.fill_(0)
        T = attn_metadata.num_actual_tokens
        pool = self.tiers.layer_pool(
            layer.layer_name,
            kv_cache.shape[0],
            self.num_kv_heads,
            self.head_size,
            key.dtype,
            key.device,
        )
        H, D = self.num_heads, self.head_size
        self.layer.forward(
            query[:T].view(T, H, D),
            key[:T],
            value[:T],
            pool,
            summary_view(kv_cache, GROUPS, D),
            attn_metadata,
            output[:T].view(T, H, D),
        )
        return output

    def _build_layer(self, layer, query: torch.Tensor, key: torch.Tensor) -> HGALayer:
        """The HGALayer of vLLM layer `layer`, with its device bank (none: off, CPU, dense)."""
        from vllm.model_executor.models.utils import extract_layer_index

        dense = extract_layer_index(layer.layer_name) in self.cfg.dense_layers
        hga = HGALayer(
            self.cfg,
            self.rope,
            self.num_heads,
            self.num_kv_heads,
            self.head_size,
            self.scale,
            self.max_model_len,
            dense,
            query.device,
            self.tiers.metrics,
            dtype=query.dtype,
            tiers=self.tiers,
        )
        chunks = (
            0
            if dense
            else self.tiers.bank_chunks(
                self.vllm_config, self.num_kv_heads, self.head_size, key.element_size(), key.device
            )
        )
        if chunks:
            hga.bank = self.tiers.device_bank(
                layer.layer_name, chunks, self.num_kv_heads, self.head_size, key.dtype, key.device
            )
        return hga
