"""Op dispatch: CUDA kernels (csrc/, built as ``vllm_hga._C``) where they apply, torch else.

Every op here has the same contract as its torch version in ``torch_ops`` and is tested
against ``devkit.reference``; each CUDA entry falls back to torch on CPU tensors, float64
and head sizes the kernels were not built for.
"""

from .cuda_ops import attend_groups, summarize_blocks, summarize_pool, write_kv  # noqa: F401
from .torch_ops import SummaryRotation, attend_masked, gather_tokens  # noqa: F401
