"""The CUDA host pool is pinned in place, exactly the planned bytes (store.pin_exact)."""

import pytest
import torch

from vllm_hga.store import HostKVPool

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_pool_is_pinned_without_power_of_two_rounding_and_readable_by_the_device():
    # 768 blocks x 1 head x K,V x 64 x 2752 x 2 B = 516 MiB, which torch's caching host
    # allocator (Tensor.pin_memory) would round up to 1 GiB
    pool = HostKVPool()
    before = torch.cuda.host_memory_stats().get("allocated_bytes.current", 0)
    view = pool.layer("layers.0", 768, 1, 2752, torch.bfloat16, torch.device("cuda"))
    host = pool._host["layers.0"]
    assert host.is_pinned()
    assert host.numel() * host.element_size() == pool.nbytes()
    # nothing went through the caching allocator (it would hold the rounded block)
    assert torch.cuda.host_memory_stats().get("allocated_bytes.current", 0) == before
    view[5].fill_(1.5)  # the device writes through UVA, the host sees it
    torch.cuda.synchronize()
    assert host[5].float().eq(1.5).all()
    pool.release()
