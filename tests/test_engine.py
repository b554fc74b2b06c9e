"""HGA inside the real vLLM engine (CPU build) with the embedded SmolLM2-135M-Instruct.

Each test starts real engines (spawned engine-core processes, the platform plugin, the
general plugin); nothing of vLLM is mocked.
"""

from __future__ import annotations

import gc

import pytest

pytestmark = pytest.mark.engine

vllm = pytest.importorskip("vllm")
from vllm import LLM, SamplingParams  # noqa: E402
from vllm.inputs import TokensPrompt  # noqa: E402

from devkit.model import embedded_model_dir  # noqa: E402
from devkit.texts import load_text  # noqa: E402

MAX_LEN = 8192


def make_llm(model: str, backend: str, hga: dict | None = None, **kw) -> LLM:
    extra = {"hga": hga} if hga is not None else {}
    return LLM(
        model=model,
        attention_backend=backend,
        max_model_len=MAX_LEN,
        enforce_eager=True,
        additional_config=extra,
        seed=0,
        kv_cache_memory_bytes=1 << 30,
        **kw,
    )


def close(llm: LLM) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def text_tokens(llm: LLM, name: str, n: int) -> list[int]:
    ids = llm.get_tokenizer().encode(load_text(name))
    assert len(ids) >= n, f"{name} has only {len(ids)} tokens"
    return ids[:n]


@pytest.fixture(scope="module")
def model_fp32() -> str:
    return str(embedded_model_dir(dtype="float32"))


FP32 = dict(dtype="float32")  # vLLM's "auto" would run a float32 checkpoint in half precision


@pytest.fixture(scope="module")
def model_default() -> str:
    return str(embedded_model_dir())


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, prompt_logprobs=0)


def prompt_nll(out) -> list[float]:
    """Negative log-likelihood of every prompt token after the first."""
    return [-next(iter(lp.values())).logprob for lp in out.prompt_logprobs[1:]]


def test_full_coverage_hga_matches_vllm_cpu_attention(model_fp32):
    """HGA with every chunk visible is dense attention: same greedy tokens and prompt
    log-probabilities as vLLM's own CPU attention on ~3K tokens of real prose."""
    llm = make_llm(model_fp32, "CPU_ATTN", **FP32)
    prompt = TokensPrompt(prompt_token_ids=text_tokens(llm, "devils_dictionary", 3000))
    dense = llm.generate([prompt], greedy(32))[0]
    close(llm)
    llm = make_llm(model_fp32, "HGA", {"preset": "full"}, **FP32)
    hga = llm.generate([prompt], greedy(32))[0]
    close(llm)
    assert hga.outputs[0].token_ids == dense.outputs[0].token_ids
    diffs = [abs(a - b) for a, b in zip(prompt_nll(hga), prompt_nll(dense))]
    assert len(diffs) == 2999 and max(diffs) < 2e-3, max(diffs)


def test_default_hga_is_batch_and_prefix_cache_invariant(model_fp32):
    """Per-query routing: a request's tokens do not depend on its batch mates, on chunked
    prefill, or on a prefix-cache hit (its routing is recomputed from the same summaries)."""
    llm = make_llm(
        model_fp32, "HGA", max_num_batched_tokens=1024, enable_prefix_caching=True, **FP32
    )
    a = TokensPrompt(prompt_token_ids=text_tokens(llm, "jargon_file", 2500))
    b = TokensPrompt(prompt_token_ids=text_tokens(llm, "argparse_py", 1700))
    sp = SamplingParams(max_tokens=24, temperature=0.0)
    alone = llm.generate([a], sp)[0].outputs[0].token_ids
    together = llm.generate([a, b], sp)
    cached = llm.generate([a], sp)[0]  # the prompt's full blocks are in the prefix cache
    close(llm)
    assert together[0].outputs[0].token_ids == alone
    assert cached.outputs[0].token_ids == alone
    assert cached.num_cached_tokens and cached.num_cached_tokens >= 2048


def needle_prompt(llm: LLM, n_tokens: int, depth: float) -> str:
    """~n_tokens of real prose (the GNU GPL v3, a text the embedded model can retrieve from
    with dense attention) with one fact placed at `depth`, then a question about it."""
    tok = llm.get_tokenizer()
    ids = tok.encode(open("/usr/share/common-licenses/GPL-3").read())[:n_tokens]
    paras = tok.decode(ids).split("\n\n")
    cut = int(len(paras) * depth)
    fact = "The secret password for the archive is 'violet-harbor-42'."
    doc = "\n\n".join(paras[:cut] + [fact] + paras[cut:])
    return doc + "\n\nWhat is the secret password for the archive?"


def answers(model: str, backend: str, hga: dict | None = None) -> list[str]:
    llm = make_llm(model, backend, hga)
    msgs = [[{"role": "user", "content": needle_prompt(llm, 6000, depth)}] for depth in (0.2, 0.5)]
    outs = llm.chat(msgs, SamplingParams(max_tokens=24, temperature=0.0))
    assert min(len(o.prompt_token_ids) for o in outs) > 5500
    close(llm)
    return [o.outputs[0].text for o in outs]


def test_dense_answers_from_deep_inside_6k_context(model_default):
    """The premise of the HGA test below: the embedded model can do this task at all."""
    for text in answers(model_default, "CPU_ATTN"):
        assert "violet-harbor-42" in text, text


def test_default_hga_answers_from_deep_inside_6k_context(model_default):
    """The default routing (sketch scores) finds a 15-token fact at 20% and 50% depth of
    ~6K tokens of real prose and answers as dense attention does (bf16, greedy)."""
    for text in answers(model_default, "HGA"):
        assert "violet-harbor-42" in text, text
