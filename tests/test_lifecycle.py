"""Request life cycle in the real engine: preemption, abort and block reuse leak nothing.

HGA keeps no per-request state: the host pool (RAM or the NVMe tier's files) is addressed
by vLLM's block id, and summaries live in vLLM's own pages.  So what a preempted or aborted
request held goes back exactly when vLLM frees its blocks, and a block handed to another
request is fully rewritten before it is read.  These tests check that in a real engine
with a host budget small enough to force preemptions (the engine core runs in-process so
the test can read vLLM's block pool; nothing is mocked).
"""

from __future__ import annotations

import gc
import os

import pytest

pytestmark = pytest.mark.engine

vllm = pytest.importorskip("vllm")
from vllm import LLM, SamplingParams  # noqa: E402
from vllm.inputs import TokensPrompt  # noqa: E402

from devkit.model import embedded_model_dir  # noqa: E402
from devkit.texts import load_text  # noqa: E402

MAX_LEN = 1024
PROMPT = 256  # 4 blocks: four requests are admitted within a few steps...
NEW = 100  # ...and outgrow the pool while decoding (4 x 6 blocks > 18)
STEP_TOKENS = 256  # max_num_batched_tokens: a prompt longer than this prefills in chunks
LONG_PROMPT = 1000  # 16 blocks: four prefill steps
# Small budgets so that routing is active from the 4th chunk on (sinks 1, local 1).
SMALL = {"sink_chunks": 1, "local_chunks": 1, "topk_chunks": 2, "topk_groups": 4}
FP32_BLOCK_BYTES = 30 * 3 * 2 * 64 * 64 * 4  # SmolLM2-135M: layers x kv heads x K/V x 64 x D


def engine(hga: dict) -> LLM:
    return LLM(
        model=str(embedded_model_dir(dtype="float32")),
        dtype="float32",
        attention_backend="HGA",
        max_model_len=MAX_LEN,
        enforce_eager=True,
        additional_config={"hga": hga},
        seed=0,
        kv_cache_memory_bytes=1 << 30,
        max_num_batched_tokens=STEP_TOKENS,
        disable_log_stats=False,
    )


def block_pool(llm: LLM):
    return llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_manager.block_pool


def close(llm: LLM) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def prompts(llm: LLM) -> list[TokensPrompt]:
    tok = llm.get_tokenizer()
    names = ["devils_dictionary", "jargon_file", "argparse_py", "gnu_coding_standards"]
    return [TokensPrompt(prompt_token_ids=tok.encode(load_text(n))[:PROMPT]) for n in names]


def mapped_files(directory) -> set[str]:
    """Files under `directory` mapped into this process (the NVMe tier's, unlinked)."""
    with open("/proc/self/maps") as maps:
        paths = {line.split(None, 5)[-1].strip() for line in maps if str(directory) in line}
    return {p.removesuffix(" (deleted)") for p in paths}


def computed_tokens(llm: LLM, request_id: str) -> int:
    requests = llm.llm_engine.engine_core.engine_core.scheduler.requests
    (req,) = [r for rid, r in requests.items() if rid.startswith(request_id)]
    return req.num_computed_tokens


def preemptions(llm: LLM) -> int:
    return sum(int(m.value) for m in llm.get_metrics() if m.name == "vllm:num_preemptions")


def test_preemption_abort_and_block_reuse_leak_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    sp = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True)

    roomy = engine({**SMALL, "host_kv_bytes": 200 * FP32_BLOCK_BYTES})
    batch = prompts(roomy)
    want = [o.outputs[0].token_ids for o in roomy.generate(batch, sp)]
    assert preemptions(roomy) == 0
    close(roomy)

    # 18 blocks: the 4 prompts (4 blocks each) are admitted together, then need 4 x 6
    # blocks by their last token: vLLM must preempt.  The NVMe tier holds the K/V, so the
    # test also sees that no file is left behind.
    tight = engine({**SMALL, "disk_dir": str(tmp_path), "disk_kv_bytes": 18 * FP32_BLOCK_BYTES})
    pool = block_pool(tight)
    assert pool.num_gpu_blocks == 18
    idle_free = pool.get_num_free_blocks()
    got = [o.outputs[0].token_ids for o in tight.generate(batch, sp)]
    # this second engine of the process has its own tiers: its K/V went to its own files
    # (one per layer, mapped, already unlinked), not to the first engine's RAM pool
    assert len(mapped_files(tmp_path)) == 30, "the NVMe tier was not used"
    assert preemptions(tight) > 0, "the budget was meant to force a preemption"
    assert got == want  # recomputed after preemption: same tokens as never preempted
    assert pool.get_num_free_blocks() == idle_free

    # Abort mid-decode, then mid-prefill (a long prompt prefills over several steps of
    # STEP_TOKENS), then reuse the freed blocks.
    eng = tight.llm_engine
    for i, p in enumerate(batch[:3]):
        eng.add_request(f"abort-{i}", p, sp)
    for _ in range(6):
        eng.step()
    assert all(computed_tokens(tight, f"abort-{i}") > PROMPT for i in range(3))  # decoding
    eng.abort_request(["abort-0", "abort-1", "abort-2"])
    while eng.has_unfinished_requests():
        eng.step()
    assert pool.get_num_free_blocks() == idle_free
    long_ids = tight.get_tokenizer().encode(load_text("jargon_file"))[:LONG_PROMPT]
    eng.add_request(
        "abort-long", TokensPrompt(prompt_token_ids=long_ids), SamplingParams(max_tokens=8)
    )
    for _ in range(2):
        eng.step()
    assert 0 < computed_tokens(tight, "abort-long") < LONG_PROMPT  # in the middle of prefill
    assert pool.get_num_free_blocks() < idle_free
    eng.abort_request(["abort-long"])
    while eng.has_unfinished_requests():
        eng.step()
    assert pool.get_num_free_blocks() == idle_free  # every block back
    again = [o.outputs[0].token_ids for o in tight.generate(batch[::-1], sp)]
    assert again == want[::-1]  # blocks reused by other requests: no stale K/V or summaries
    assert pool.get_num_free_blocks() == idle_free
    assert os.listdir(tmp_path) == []  # the tier's files were unlinked when mapped
    close(tight)
    assert os.listdir(tmp_path) == []
