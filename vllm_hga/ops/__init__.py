"""HGA's ops: ``TorchOps`` (torch, any device) and ``CudaOps`` (csrc/, built as
``vllm_hga._C``) with the same methods; ``ops_for`` picks one per layer, once, from
``kernel_blockers`` (dispatch.py).  Both are tested against ``devkit.reference``.
"""

from .cuda_ops import CudaOps  # noqa: F401
from .dispatch import kernel_blockers, ops_for  # noqa: F401
from .torch_ops import SummaryRotation, TorchOps, attend_masked, gather_tokens, summarize_blocks  # noqa: F401
