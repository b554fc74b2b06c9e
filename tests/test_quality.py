"""Quality guards: the density formula of the reports, and the HGA-vs-dense NLL gap.

The engine test is the CI version of research/eval_quality.py: 2K tokens of two real
documents (prose and code), float32 checkpoint, dense (vLLM CPU attention) vs HGA with
the defaults.  It fails when the gap rises above the value recorded in docs/QUALITY.md
plus a margin.
"""

from __future__ import annotations

import pytest
import torch

from devkit import reference as ref
from research import analysis
from vllm_hga.config import HGAConfig
from vllm_hga.rope import RopeSpec

# Recorded by this test's own computation (docs/QUALITY.md, "CI regression"), float32.
# Mean over the two documents of the per-token NLL gap, all positions / active positions.
# The defaults since 5691709 (F1 L2 K_c22 K_g88, max_group / sketch); HGA is as good as
# dense at 2K on these two texts (max_group / mean_std: -0.0018 / -0.0020; the paper's
# settings: +0.0026 / +0.0040).
RECORDED_GAP = {"all": -0.0003, "active": -0.0009}  # 2026-11-28, this CPU, 2 x 2048 tokens
MARGIN = 0.004  # nats; ~4x the largest change seen from thread count / kernel order
CI_DOCS = ["devils_dictionary", "argparse_py"]
CI_TOKENS = 2048


@pytest.mark.parametrize(
    "cfg",
    [
        HGAConfig(),
        HGAConfig(sink_chunks=1, local_chunks=0, topk_chunks=3, topk_groups=6),
        HGAConfig(sink_chunks=0, local_chunks=2, topk_chunks=4, topk_groups=16, groups_per_query=5),
        HGAConfig(sink_chunks=2, local_chunks=3, topk_chunks=5, topk_groups=8, dense_layers=(0,)),
    ],
)
def test_density_formula_equals_reference_masks(cfg):
    """analysis.density (used by every report) counts exactly what reference masks hold."""
    gen = torch.Generator().manual_seed(3)
    S, Hq, Hkv, D = 1500, 4, 2, 32
    q = torch.randn(S, Hq, D, generator=gen, dtype=torch.float64)
    k = torch.randn(S, Hkv, D, generator=gen, dtype=torch.float64)
    v = torch.randn(S, Hkv, D, generator=gen, dtype=torch.float64)
    rope = RopeSpec.default(D, theta=1e4)
    _, mask = ref.hga_attention(q, k, v, 0, rope, cfg)
    n_layers = 2
    want = ref.density(mask, 0)
    if cfg.dense_layers:  # one of the two layers dense
        want = (want + 1.0) / 2
    assert analysis.density(S, cfg, n_layers=n_layers) == pytest.approx(want, abs=1e-12)
    start = analysis.first_routed_position(cfg)
    pos = range(start, S)
    sub = mask[:, start:, :]
    dense_pairs = Hq * sum(p + 1 for p in pos)
    want_active = sub.sum().item() / dense_pairs
    if cfg.dense_layers:
        want_active = (want_active + 1.0) / 2
    assert analysis.density(S, cfg, n_layers=n_layers, positions=pos) == pytest.approx(
        want_active, abs=1e-12
    )


@pytest.mark.engine
def test_default_hga_nll_gap_does_not_regress():
    from research import evalcommon as ec

    tok = ec.tokenizer("float32")
    prompts = [ec.doc_tokens(tok, d, CI_TOKENS) for d in CI_DOCS]
    nll = {}
    for backend in ("CPU_ATTN", "HGA"):
        llm = ec.make_llm(backend, {}, dtype="float32", max_model_len=CI_TOKENS + 64)
        try:
            nll[backend] = ec.prompt_nlls(llm, prompts)
        finally:
            ec.close(llm)
    start = analysis.first_routed_position(HGAConfig())
    gaps, active = [], []
    for d, h in zip(nll["CPU_ATTN"], nll["HGA"]):
        gaps.append((sum(h) - sum(d)) / len(d))
        active.append((sum(h[start:]) - sum(d[start:])) / len(d[start:]))
    gap, gap_active = sum(gaps) / len(gaps), sum(active) / len(active)
    print(f"CI gap: all {gap:.5f} active {gap_active:.5f} per doc {gaps}")
    assert gap <= RECORDED_GAP["all"] + MARGIN, (gap, RECORDED_GAP)
    assert gap_active <= RECORDED_GAP["active"] + MARGIN, (gap_active, RECORDED_GAP)
