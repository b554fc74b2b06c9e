"""Tensor parallel serving with HGA in the real vLLM engine (CPU build, embedded model).

SmolLM2-135M has 9 query and 3 KV heads, so TP 3 is its valid TP > 1: each rank serves
one KV head with its own host pool, summaries and counters.  One engine per configuration,
a prompt just past where routing is active (small budgets), a few greedy tokens.  The same
reference engine also checks the start-up plan end to end: vLLM's block count is the
smaller of the host plan and the device budget, and the pools exist before any request.
Nothing of vLLM is mocked; ranks are asked through vLLM's ``collective_rpc``.
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

MAX_LEN = 1024
PROMPT = 320  # 5 chunks: with sinks 1 + local 1, chunks 1-2 are routed (2 of their 8 groups)
NEW = 8
SMALL = {"sink_chunks": 1, "local_chunks": 1, "topk_chunks": 2, "topk_groups": 4}
HOST_BUDGET = 1 << 30  # per rank
DEVICE_BUDGET = 32 << 20  # vLLM's per-rank KV cache (HGA's summary pages): the tighter one
FP32_HOST_BLOCK = 30 * 3 * 2 * 64 * 64 * 4  # layers x KV heads x K,V x 64 x D x 4 B
FP32_PAGE_BLOCK = 30 * 3 * 5 * 64 * 4  # layers x KV heads x (1 + 4 groups) x D x 4 B
# nats, float32: TP reduces the heads in another order, which can flip a near-tie in routing
LOGPROB_TOLERANCE = 5e-3


def run(monkeypatch, **parallel) -> dict:
    """Start one engine, report its ranks before any request, generate, shut down."""
    llm = LLM(
        model=str(embedded_model_dir(dtype="float32")),
        dtype="float32",
        attention_backend="HGA",
        max_model_len=MAX_LEN,
        enforce_eager=True,
        additional_config={"hga": {**SMALL, "host_kv_bytes": HOST_BUDGET}},
        seed=0,
        kv_cache_memory_bytes=DEVICE_BUDGET,
        **parallel,
    )
    try:
        before = llm.collective_rpc("hga_report")
        ids = llm.get_tokenizer().encode(load_text("devils_dictionary"))[:PROMPT]
        sp = SamplingParams(max_tokens=NEW, temperature=0.0, prompt_logprobs=0)
        out = llm.generate([TokensPrompt(prompt_token_ids=ids)], sp)[0]
        after = llm.collective_rpc("hga_report")
        blocks = llm.llm_engine.vllm_config.cache_config.num_gpu_blocks
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    return dict(
        tokens=list(out.outputs[0].token_ids),
        nll=[-next(iter(lp.values())).logprob for lp in out.prompt_logprobs[1:]],
        before=before,
        after=after,
        blocks=blocks,
    )


def density(reports: list[dict]) -> float:
    """The plugin's own density, summed over ranks as /metrics sums them."""
    return sum(r["keys_attended"] for r in reports) / sum(r["dense_pairs"] for r in reports)


@pytest.fixture(scope="module")
def tp1():
    mp = pytest.MonkeyPatch()
    yield run(mp)
    mp.undo()


def test_block_count_is_the_smaller_of_host_plan_and_device_budget_and_pools_exist_at_start(
    tp1,
):
    host_blocks = HOST_BUDGET // FP32_HOST_BLOCK  # 364
    device_blocks = DEVICE_BUDGET // FP32_PAGE_BLOCK  # 291
    assert device_blocks < host_blocks
    assert tp1["blocks"] == device_blocks
    (rank,) = tp1["before"]
    assert rank["pool"] == device_blocks * FP32_HOST_BLOCK  # allocated before any request
    assert rank["host_pool_bytes"] == rank["pool"]


def test_tensor_parallel_3_matches_tp_1_with_each_rank_holding_its_kv_head(tp1, monkeypatch):
    # vLLM binds each CPU worker's OpenMP threads to a NUMA node; this machine has one
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1|0")
    tp3 = run(monkeypatch, tensor_parallel_size=3)
    assert tp3["tokens"] == tp1["tokens"]
    diffs = [abs(a - b) for a, b in zip(tp3["nll"], tp1["nll"])]
    assert len(diffs) == PROMPT - 1 and max(diffs) < LOGPROB_TOLERANCE, max(diffs)
    # HGA routed: the same density as TP 1, below dense
    assert density(tp3["after"]) == pytest.approx(density(tp1["after"]))
    assert density(tp3["after"]) < 0.9
    # one KV head per rank: a third of the bytes per block, same device-capped count
    blocks = DEVICE_BUDGET // (FP32_PAGE_BLOCK // 3)
    assert tp3["blocks"] == min(blocks, HOST_BUDGET // (FP32_HOST_BLOCK // 3))
    assert sorted(r["rank"] for r in tp3["before"]) == [0, 1, 2]
    for r in tp3["before"]:
        assert r["pool"] == tp3["blocks"] * FP32_HOST_BLOCK // 3
