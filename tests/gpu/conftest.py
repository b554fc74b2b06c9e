"""GPU kernel tests: run on the device machine through scripts/gpu_check.sh."""


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; run through scripts/gpu_check.sh")
