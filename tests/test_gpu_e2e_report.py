"""Formatting of scripts/gpu_e2e.py results (no engine): ratio table, JSON append, plot."""

import importlib.util
import json
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
_path = next(p for p in (ROOT / "scripts/gpu_e2e.py", ROOT / "benchmarks/gpu_e2e.py") if p.exists())
_spec = importlib.util.spec_from_file_location("gpu_e2e", _path)
gpu_e2e = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_e2e)

ROWS = [
    {"backend": "FLASH_ATTN", "context": 8192, "batch": 1, "prefill_s": 0.5, "decode_tok_s": 100.0},
    {"backend": "HGA", "context": 8192, "batch": 1, "prefill_s": 0.7, "decode_tok_s": 80.0},
    {"backend": "HGA", "context": 32768, "batch": 1, "prefill_s": 2.0, "decode_tok_s": 70.0},
]


def test_ratio_table():
    table = gpu_e2e.ratio_table(ROWS).splitlines()
    assert len(table) == 3
    assert table[1].split() == ["8192", "1", "100.00", "80.00", "0.80", "0.50", "0.70"]
    assert table[2].split() == ["32768", "1", "-", "70.00", "-", "-", "2.00"]


def test_load_rows_appends_to_an_earlier_run(tmp_path):
    out = tmp_path / "r.json"
    assert gpu_e2e.load_rows(str(out)) == []
    out.write_text(json.dumps(ROWS[:1]))
    assert gpu_e2e.load_rows(str(out)) == ROWS[:1]


def test_plot(tmp_path):
    png = tmp_path / "p.png"
    if gpu_e2e.plot(ROWS, str(png)):
        assert png.read_bytes()[:4] == b"\x89PNG"
    else:
        assert not png.exists()
