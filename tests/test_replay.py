"""The replay (research.analysis, float32 checkpoint under transformers) that produces the
sweep, recall and NIAH-replay tables of docs/QUALITY.md and its history log, and
research/niah.py's replay greedy.

Real model and real text; short prompts so that the 2-core CI machine runs them in
seconds.  What they guard: a full-coverage budget in the replay is dense attention (the
tables compare against it), and ``niah.exact_greedy`` returns the greedy continuation
under the mode it is given, whatever guess it starts from.
"""

from __future__ import annotations

import pytest
import torch

from vllm_hga.config import HGAConfig

PROMPT_TOKENS = 700  # > (F + L + 1) * 64 for the sparse config below: routing is on


@pytest.fixture(scope="module")
def analyzer():
    from research.analysis import Analyzer

    return Analyzer(device="cpu", threads=2)


@pytest.fixture(scope="module")
def prompt(analyzer):
    from research import evalcommon as ec

    return ec.doc_tokens(analyzer.tokenizer, "devils_dictionary", PROMPT_TOKENS)


SPARSE = HGAConfig(sink_chunks=1, local_chunks=1, topk_chunks=2, topk_groups=4)


def test_full_coverage_replay_is_dense(analyzer, prompt):
    full = HGAConfig(sink_chunks=1, local_chunks=2, topk_chunks=64, topk_groups=256)
    dense, _ = analyzer.nll(prompt)
    hga, _ = analyzer.nll(prompt, full)
    sparse, _ = analyzer.nll(prompt, SPARSE)
    assert torch.allclose(hga, dense, atol=2e-4, rtol=0), (hga - dense).abs().max()
    # and the sparse budget really differs (else the comparison above proves nothing)
    assert (sparse - dense).abs().max() > 1e-2


@pytest.mark.parametrize("mode", ["dense", SPARSE], ids=["dense", "sparse"])
def test_exact_greedy_is_the_greedy_continuation(analyzer, prompt, mode):
    from research import niah

    n = 12
    eos = analyzer.tokenizer.eos_token_id
    bad_guess = [analyzer.tokenizer.encode(" zebra")[0]] * n  # wrong from the first token
    cont = niah.exact_greedy(analyzer, prompt, bad_guess, mode)
    assert 0 < len(cont) <= n
    # every token is the argmax after its prefix under `mode` (teacher forced)
    analyzer.nll(prompt + cont, mode)
    pred = analyzer.last_argmax[len(prompt) - 1 :].tolist()
    assert pred[: len(cont)] == cont
    if len(cont) < n:  # stopped early only at end of sequence
        assert cont[-1] == eos
    if mode == "dense":  # the same tokens as transformers' own cached greedy decoding
        assert cont == analyzer.greedy(prompt, n)[: len(cont)]
