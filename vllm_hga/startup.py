"""Start-up checks and engine sizing, run once in the API-server process.

Everything HGA cannot serve is refused here, with the reason and the fix, before any
weights load: a request must never be the first to find out.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from vllm.logger import init_logger

from .config import CHUNK_SIZE, HGAConfig, HGAConfigError, require_writable_dir

logger = init_logger("vllm.hga")  # under "vllm" so vLLM's log handler prints it

SUPPORTED_KV_DTYPES = ("auto", "bfloat16", "float16", "float32")
# RoPE variants that are a plain per-position rotation (HGA's summaries rely on it).
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "ntk", None)
# Architectures whose vLLM model rotates keys NeoX style (rotate-half pairs).
NEOX_ARCHITECTURES = frozenset(
    {
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen2MoeForCausalLM",
        "Qwen3ForCausalLM",
        "Qwen3MoeForCausalLM",
    }
)


def rope_is_neox(vllm_config, cfg: HGAConfig) -> bool | None:
    """The model's RoPE pairing, or None when we do not know it."""
    if cfg.rope_style is not None:
        return cfg.rope_style == "neox"
    archs = set(getattr(vllm_config.model_config.hf_config, "architectures", None) or ())
    return True if archs & NEOX_ARCHITECTURES else None


def is_hga_selected(vllm_config) -> bool:
    backend = getattr(vllm_config.attention_config, "backend", None)
    return backend is not None and getattr(backend, "name", None) == "HGA"


def unsupported_features(vllm_config) -> list[str]:
    """Reasons (with fixes) why this engine configuration cannot run HGA."""
    reasons: list[str] = []
    model = vllm_config.model_config
    cache = vllm_config.cache_config
    hf = model.hf_text_config
    if model.use_mla:
        reasons.append(
            "the model uses MLA (latent attention); HGA routes GQA/MHA keys. "
            "Serve this model with vLLM's own MLA backends."
        )
    if model.is_encoder_decoder:
        reasons.append(
            "encoder-decoder / cross attention is not supported; HGA is for "
            "decoder-only causal models."
        )
    if (
        model.get_sliding_window() is not None
        or getattr(hf, "layer_types", None)
        and any("sliding" in str(t) or "chunked" in str(t) for t in hf.layer_types)
    ):
        reasons.append(
            "the model has sliding-window or local-attention layers; HGA replaces "
            "full causal attention only. Use a full-attention model."
        )
    if getattr(hf, "attention_chunk_size", None):
        reasons.append("the model uses chunked local attention; not supported by HGA.")
    if model.uses_alibi:
        reasons.append("ALiBi position bias is not supported (HGA summaries assume RoPE).")
    for key in ("attn_logit_softcapping", "attn_logit_softcap"):
        if getattr(hf, key, None):
            reasons.append("attention logit soft-capping is not supported by HGA.")
    if str(cache.cache_dtype) not in SUPPORTED_KV_DTYPES:
        reasons.append(
            f"--kv-cache-dtype {cache.cache_dtype} is not supported; HGA keeps "
            "K/V in the model dtype. Drop --kv-cache-dtype (or use 'auto')."
        )
    rope = _rope_parameters(hf)
    rope_type = rope.get("rope_type", rope.get("type", "default")) if rope else "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        reasons.append(
            f"RoPE type {rope_type!r} is not supported (supported: "
            f"{[t for t in SUPPORTED_ROPE_TYPES if t]})."
        )
    if getattr(hf, "dual_chunk_attention_config", None):
        reasons.append("dual-chunk attention is not supported with HGA.")
    if vllm_config.speculative_config is not None:
        reasons.append(
            "speculative decoding is not supported with HGA yet; drop --speculative-config."
        )
    par = vllm_config.parallel_config
    if (
        getattr(par, "decode_context_parallel_size", 1) > 1
        or getattr(par, "prefill_context_parallel_size", 1) > 1
    ):
        reasons.append("context parallelism (DCP/PCP) is not supported with HGA.")
    if vllm_config.kv_transfer_config is not None:
        reasons.append(
            "KV connectors / disaggregated prefill are not supported with HGA: "
            "HGA's device pages hold summaries, not K/V."
        )
    return reasons


def _rope_parameters(hf) -> dict:
    for key in ("rope_parameters", "rope_scaling"):
        value = getattr(hf, key, None)
        if isinstance(value, dict):
            return value
    return {}


@dataclass(frozen=True)
class Capacity:
    """How many 64-token blocks the host tier holds, per rank and per node.

    Every rank (TP shard x PP stage) keeps its own pool: its layers' full K/V of its KV
    heads, for the same vLLM block ids.  Host RAM is a node's, so the node pays the sum
    over the ranks it runs.  Planned once, in the API-server process, and carried to the
    engine and worker processes on the pickled config (``planned_capacity``).
    """

    host_bytes_per_block: int  # full K+V of one block on the largest rank
    device_bytes_per_block: int  # summaries of one block on the largest rank
    host_budget_bytes: int  # per rank: host_kv_bytes / disk_kv_bytes or their default
    num_blocks: int
    ranks_per_node: int = 1
    node_bytes_per_block: int = 0  # full K+V of one block, all ranks of the busiest node
    inputs: tuple = ()  # what the plan was made from (a change means: plan again)

    @property
    def max_tokens(self) -> int:
        return self.num_blocks * CHUNK_SIZE

    @property
    def rank_pool_bytes(self) -> int:
        return self.num_blocks * self.host_bytes_per_block

    @property
    def node_pool_bytes(self) -> int:
        return self.num_blocks * (self.node_bytes_per_block or self.host_bytes_per_block)


# attribute of vLLM's CacheConfig that carries the plan to the engine and worker
# processes (not a dataclass field, so vLLM's config hash ignores it)
CAPACITY_ATTR = "hga_capacity"


def rank_shapes(vllm_config) -> list[tuple[int, int]]:
    """(layers, KV heads) of every rank of one engine, in vLLM's rank order (PP stage
    major, TP rank minor).  vLLM's own per-rank getters answer for rank 0 only."""
    from vllm.distributed.utils import get_pp_indices

    model = vllm_config.model_config
    par = vllm_config.parallel_config
    total = model.get_total_num_hidden_layers()
    kv_heads = model.get_num_kv_heads(par)  # per TP rank (replicated if fewer than TP)
    shapes = []
    for stage in range(par.pipeline_parallel_size):
        start, end = get_pp_indices(total, stage, par.pipeline_parallel_size)
        shapes += [(end - start, kv_heads)] * par.tensor_parallel_size
    return shapes


def engine_ranks_per_node(vllm_config) -> int:
    """Ranks of one engine on one node: all of them unless --nnodes spreads them (with
    Ray the placement is only known later, so the plan assumes this node holds all)."""
    par = vllm_config.parallel_config
    return max(1, par.world_size // max(1, par.nnodes_within_dp))


def engines_per_node(vllm_config) -> int:
    """Data-parallel engines started on this node (each has its own ranks and pools)."""
    return max(1, getattr(vllm_config.parallel_config, "data_parallel_size_local", 1) or 1)


def ranks_per_node(vllm_config) -> int:
    return engine_ranks_per_node(vllm_config) * engines_per_node(vllm_config)


def plan_capacity(vllm_config, cfg: HGAConfig) -> Capacity:
    """Per rank: host pool = num_blocks x (its layers x its KV heads x 2 x 64 x head_size x
    dtype bytes); per node: the sum over the ranks it runs, checked against its RAM."""
    model = vllm_config.model_config
    head = model.get_head_size()
    itemsize = model.dtype.itemsize
    shapes = rank_shapes(vllm_config)
    host_blocks = [layers * kv * 2 * CHUNK_SIZE * head * itemsize for layers, kv in shapes]
    device_block = max(layers * kv * (1 + cfg.groups_per_chunk) * head * 4 for layers, kv in shapes)
    local = engine_ranks_per_node(vllm_config)  # ranks r*local .. (r+1)*local-1 share a node
    node_block = engines_per_node(vllm_config) * max(
        sum(host_blocks[i : i + local]) for i in range(0, len(host_blocks), local)
    )
    rank_block = max(host_blocks)
    if cfg.disk_dir is not None:  # NVMe tier: the files hold the full K/V
        budget = cfg.disk_kv_bytes
        available = None
    else:
        budget = (
            cfg.host_kv_bytes
            or vllm_config.cache_config.kv_cache_memory_bytes
            or _default_host_budget() // ranks_per_node(vllm_config)
        )
        available = _available_host_bytes()
    num_blocks = budget // rank_block
    cap = Capacity(
        rank_block,
        device_block,
        budget,
        int(num_blocks),
        ranks_per_node(vllm_config),
        node_block,
        capacity_inputs(vllm_config, cfg),
    )
    if cfg.disk_dir is not None:
        check_disk_dir(cfg.disk_dir, cap.node_pool_bytes)
    if available is not None and cap.node_pool_bytes > available:
        raise HGAConfigError(_over_ram_message(cap, available))
    needed = -(-model.max_model_len // CHUNK_SIZE) + 1  # one request of max length
    if num_blocks < needed:
        raise HGAConfigError(
            f"hga: the host K/V budget of {budget / 2**30:.2f} GiB per rank holds "
            f"{num_blocks} blocks ({num_blocks * CHUNK_SIZE} tokens) but one request of "
            f"--max-model-len {model.max_model_len} needs {needed} blocks "
            f"({needed * rank_block / 2**30:.2f} GiB per rank). Raise host_kv_bytes or "
            "lower --max-model-len."
        )
    return cap


def _over_ram_message(cap: Capacity, available: int) -> str:
    ranks = cap.ranks_per_node
    fit = available // max(1, cap.node_bytes_per_block) * cap.host_bytes_per_block
    return (
        f"hga: the host K/V pools do not fit this node's RAM: {ranks} rank(s) x "
        f"{cap.num_blocks} blocks take {cap.node_pool_bytes / 2**30:.2f} GiB "
        f"({cap.rank_pool_bytes / 2**30:.2f} GiB on the largest rank, budget "
        f"{cap.host_budget_bytes / 2**30:.2f} GiB per rank) but only "
        f"{available / 2**30:.2f} GiB of RAM is available. Set a smaller per-rank "
        f'budget, at most --additional-config \'{{"hga": {{"host_kv_bytes": '
        f'"{max(fit, 1) // 2**20}MiB"}}}}\' (or --kv-cache-memory-bytes / '
        "VLLM_CPU_KVCACHE_SPACE), run fewer ranks per node, or free memory."
    )


def capacity_inputs(vllm_config, cfg: HGAConfig) -> tuple:
    """Everything a plan depends on except the RAM free at planning time."""
    par = vllm_config.parallel_config
    return (
        tuple(rank_shapes(vllm_config)),
        ranks_per_node(vllm_config),
        str(vllm_config.model_config.dtype),
        vllm_config.model_config.get_head_size(),
        vllm_config.model_config.max_model_len,
        cfg.host_kv_bytes,
        cfg.disk_dir,
        cfg.disk_kv_bytes,
        vllm_config.cache_config.kv_cache_memory_bytes,
        par.world_size,
    )


def planned_capacity(vllm_config) -> Capacity | None:
    """The plan start-up made for this engine (None: HGA is not selected)."""
    return getattr(vllm_config.cache_config, CAPACITY_ATTR, None)


def _capacity_once(vllm_config, cfg: HGAConfig) -> tuple[Capacity, bool]:
    """The engine's plan: made once in the API-server process; vLLM re-runs the platform
    check in the engine process after its workers hold memory (our pools among it), and
    a second plan from the RAM free then would shrink or refuse what the first granted.
    Returns the plan and whether it is new."""
    cap = planned_capacity(vllm_config)
    if cap is not None and cap.inputs == capacity_inputs(vllm_config, cfg):
        return cap, False
    cap = plan_capacity(vllm_config, cfg)
    setattr(vllm_config.cache_config, CAPACITY_ATTR, cap)
    return cap, True


def check_disk_dir(directory: str, budget: int) -> None:
    """The NVMe tier's directory must exist, be writable and have room for the budget."""
    import shutil

    fix = (
        'Set --additional-config \'{"hga": {"disk_dir": "/path/on/nvme", '
        '"disk_kv_bytes": "64GiB"}}\' to a writable directory with room.'
    )
    require_writable_dir(directory, "disk_dir ", fix, "does not exist")
    free = shutil.disk_usage(directory).free
    if free < budget:
        raise HGAConfigError(
            f"hga: disk_dir {directory!r} has {free / 2**30:.2f} GiB free but disk_kv_bytes "
            f"asks for {budget / 2**30:.2f} GiB. Lower disk_kv_bytes or free space."
        )


def _available_host_bytes() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # psutil is a vLLM dependency; be tolerant anyway
        return None


def _default_host_budget() -> int:
    """Half of the RAM available now, at most 64 GiB (set host_kv_bytes to change)."""
    available = _available_host_bytes() or 8 * 2**30
    return int(min(available // 2, 64 * 2**30))


def unsupported_tiers(cfg: HGAConfig, device_type: str) -> list[str]:
    """Memory tiers this version cannot serve on this device type (checked at start-up)."""
    if cfg.disk_dir is not None and device_type != "cpu":
        return [
            f"the NVMe tier (disk_dir) runs on CPU only in this version; on {device_type} "
            "the K/V pool must be pinned host RAM, which the kernels read directly. Drop "
            "disk_dir/disk_kv_bytes and size the RAM tier with host_kv_bytes instead."
        ]
    return []


def unsupported_on_device(cfg: HGAConfig, device_type: str, head_size: int) -> list[str]:
    """What the CUDA kernels were not built for, refused at start-up on CUDA: the routing
    kernels would raise at the first decode step, in the middle of serving."""
    if device_type != "cuda":
        return []
    from .ops.cuda_ops import HEAD_SIZES, MAX_TOPK_CHUNKS

    reasons = []
    if cfg.topk_chunks > MAX_TOPK_CHUNKS:
        preset = f" (preset {cfg.preset!r})" if cfg.preset else ""
        reasons.append(
            f"topk_chunks={cfg.topk_chunks}{preset} is above {MAX_TOPK_CHUNKS}, the most "
            "chunks the CUDA routing kernels keep per query head (csrc/routing.cu "
            f"kMaxTopkChunks). Set topk_chunks <= {MAX_TOPK_CHUNKS} (the preset 'full' "
            "is for CPU correctness checks)."
        )
    if head_size not in HEAD_SIZES:
        reasons.append(
            f"the model's head size is {head_size}; the CUDA kernels are built for head "
            f"sizes {list(HEAD_SIZES)} (csrc/hga_common.cuh HGA_DISPATCH_HEAD). Serve "
            "this model with another attention backend."
        )
    return reasons


def configure_engine(vllm_config) -> HGAConfig | None:
    """Validate and size an engine that selected HGA.  No-op for other backends."""
    if not is_hga_selected(vllm_config):
        return None
    cfg = HGAConfig.from_vllm_config(vllm_config)
    reasons = unsupported_features(vllm_config)
    if rope_is_neox(vllm_config, cfg) is None:
        archs = getattr(vllm_config.model_config.hf_config, "architectures", None)
        reasons.append(
            f"HGA has not been validated on architecture {archs}; its summaries must know the "
            "model's RoPE pairing. If you know it, set --additional-config "
            '\'{"hga": {"rope_style": "neox"}}\' (rotate-half, Llama-like) or "gptj" '
            f"(interleaved). Validated: {sorted(NEOX_ARCHITECTURES)}."
        )
    device_type = str(getattr(vllm_config.device_config, "device_type", "cpu") or "cpu")
    reasons += unsupported_tiers(cfg, device_type)
    reasons += unsupported_on_device(cfg, device_type, vllm_config.model_config.get_head_size())
    if reasons:
        raise HGAConfigError("HGA cannot serve this configuration:\n  - " + "\n  - ".join(reasons))
    cache = vllm_config.cache_config
    if cache.user_specified_block_size and cache.block_size != CHUNK_SIZE:
        raise HGAConfigError(
            f"HGA needs --block-size {CHUNK_SIZE} (one chunk is one KV block); got "
            f"{cache.block_size}. Drop --block-size or set it to {CHUNK_SIZE}."
        )
    cache.block_size = CHUNK_SIZE
    bound_onednn_cache(device_type)
    cap, new = _capacity_once(vllm_config, cfg)
    if not install_hga_worker(vllm_config, device_type):
        # another worker class was asked for: vLLM then applies this count even past what
        # its device budget holds (HGAWorkerMixin caps to the smaller of the two instead)
        _cap_block_override(cache, cap.num_blocks)
    elif cache.num_gpu_blocks_override is not None:
        _cap_block_override(cache, cap.num_blocks)
    if new:
        _log_plan(vllm_config, cfg, cap, device_type)
    from .metrics import setup_in_api_process

    setup_in_api_process()
    return cfg


# oneDNN's process-wide primitive cache (docs/RELIABILITY.md §3, "Long soak")
ONEDNN_CACHE_ENV = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
ONEDNN_CACHE_DEFAULT = "0"


def bound_onednn_cache(device_type: str) -> None:
    """On CPU, turn off oneDNN's process-wide primitive cache in the workers, unless the
    user set its capacity.  vLLM's CPU linear layers run oneDNN matmuls (``onednn_mm``)
    whose primitives are made per token count of the step; each layer's handler keeps its
    own 32, and oneDNN's global cache (1,024 by default) keeps every one it made besides,
    so a server fed varying batch sizes grew its worker's heap by hundreds of MiB (dense
    attention as much as HGA).  Set here, in the API-server process, before vLLM spawns
    the engine and its workers, which read it at their first matmul."""
    if device_type != "cpu" or os.environ.get(ONEDNN_CACHE_ENV):
        return
    os.environ[ONEDNN_CACHE_ENV] = ONEDNN_CACHE_DEFAULT
    from .metrics import carry_to_ray_workers

    carry_to_ray_workers(ONEDNN_CACHE_ENV)


def _cap_block_override(cache, num_blocks: int) -> None:
    if cache.num_gpu_blocks_override is None or cache.num_gpu_blocks_override > num_blocks:
        cache.num_gpu_blocks_override = num_blocks


# vLLM's default worker per device type -> the HGA worker that extends it (worker.py)
HGA_WORKERS = {
    "vllm.v1.worker.cpu_worker.CPUWorker": "vllm_hga.worker.HGACpuWorker",
    "vllm.v1.worker.gpu_worker.Worker": "vllm_hga.worker.HGACudaWorker",
}


def install_hga_worker(vllm_config, device_type: str) -> bool:
    """Run vLLM's own worker extended by HGA's start-up duties (worker.py): the block count
    is the smaller of what the host plan and the device budget hold, and the host pools
    are allocated before the engine reports ready.  False when the user chose another
    worker class, which is left alone."""
    par = vllm_config.parallel_config
    if par.worker_cls in HGA_WORKERS.values():
        return True
    if par.worker_cls in HGA_WORKERS:
        par.worker_cls = HGA_WORKERS[par.worker_cls]
        return True
    return False


def _log_plan(vllm_config, cfg: HGAConfig, cap: Capacity, device_type: str) -> None:
    per_request = -(-vllm_config.model_config.max_model_len // CHUNK_SIZE)
    # device bank (bank.py): a constant per worker, allocated on the profiling forward so
    # that vLLM's memory profiler counts it before sizing its own (summary) KV cache
    bank = cfg.bank_size(device_type)
    bank_bytes = max(bank, 0) * cap.host_bytes_per_block
    logger.info(
        "HGA: %s; %s K/V pool %.2f GiB per rank for %d blocks = %d tokens = %d contexts of "
        "%d (at most: the device budget may hold fewer); %d rank(s) per node: %.2f GiB per "
        "node (%d B/token full K/V, %d B/token device summaries, largest rank); device bank "
        "%.2f GiB (%s chunks = %s tokens per layer)",
        _describe(cfg),
        "disk" if cfg.disk_dir else "host",
        cap.rank_pool_bytes / 2**30,
        cap.num_blocks,
        cap.max_tokens,
        cap.num_blocks // per_request,
        vllm_config.model_config.max_model_len,
        cap.ranks_per_node,
        cap.node_pool_bytes / 2**30,
        cap.host_bytes_per_block // CHUNK_SIZE,
        cap.device_bytes_per_block // CHUNK_SIZE,
        bank_bytes / 2**30,
        "auto" if bank < 0 else bank,
        "sized from free device memory" if bank < 0 else bank * CHUNK_SIZE,
    )


def _describe(cfg: HGAConfig) -> str:
    return (
        f"F={cfg.sink_chunks} L={cfg.local_chunks} K_c={cfg.topk_chunks} "
        f"K_g={cfg.topk_groups} groups/query={cfg.groups_per_query} "
        f"chunk_score={cfg.chunk_score} group_score={cfg.group_score}"
    )
