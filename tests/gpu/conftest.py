"""GPU kernel tests: run on the device machine through scripts/gpu_check.sh."""

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; run through scripts/gpu_check.sh")


@pytest.fixture(autouse=True, scope="module")
def _extension():
    from vllm_hga.ops import cuda_ops

    assert cuda_ops.available(), f"vllm_hga._C not importable: {cuda_ops.IMPORT_ERROR}"
