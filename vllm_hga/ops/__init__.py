"""Op dispatch: the torch implementations run everywhere; CUDA kernels replace them when built.

Every op here has the same contract as its torch version in ``torch_ops`` and is tested
against ``vllm_hga.reference``.
"""

from .torch_ops import (  # noqa: F401
    SummaryRotation,
    attend_groups,
    attend_masked,
    gather_tokens,
    summarize_blocks,
    write_kv,
)
