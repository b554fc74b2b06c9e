"""The bad-input table: what a user may send that HGA or the server refuses, and what they
get back.  One row per input.

The tests are parametrized over these rows (each row names the test that checks it), and
docs/RELIABILITY.md shows the same rows, rendered from here, so the document cannot drift
from what is tested (``tests/test_bad_input.py`` checks it is up to date):

    python -m devkit.bad_input          # prints the table
    python -m devkit.bad_input --write  # rewrites it in docs/RELIABILITY.md
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DOC = Path(__file__).resolve().parent.parent / "docs" / "RELIABILITY.md"
BEGIN = "<!-- bad-input table: made by `python -m devkit.bad_input --write`; do not edit -->"
END = "<!-- end of bad-input table -->"


@dataclass(frozen=True)
class Row:
    id: str
    kind: str  # "config", "engine", "startup", "http", "runtime"
    sent: str  # what the user sent, as they would write it (markdown)
    answer: str  # a phrase the answer contains (start-up error, HTTP error message, log)
    test: str  # tests/FILE.py::TEST that checks this row
    hga: dict[str, Any] | None = None  # config: the "hga" mapping of --additional-config
    engine: dict[str, Any] = field(default_factory=dict)  # engine: vLLM EngineArgs
    status: int | None = None  # http: the status code
    path: str = ""  # http: the endpoint
    body: str = ""  # http: the raw request body

    @property
    def got(self) -> str:
        """The answer column of the document."""
        if self.kind == "http":
            return f"HTTP {self.status}, message contains “{self.answer}”"
        if self.kind == "runtime":
            return self.answer
        return f"refused at start-up: “{self.answer}”"


def _config(id: str, hga: dict[str, Any], answer: str) -> Row:
    sent = f"`--additional-config '{json.dumps({'hga': hga})}'`"
    return Row(id, "config", sent, answer, CONFIG_TEST, hga=hga)


def _http(id: str, sent: str, path: str, body: Any, status: int, answer: str) -> Row:
    text = body if isinstance(body, str) else json.dumps(body)
    return Row(id, "http", sent, answer, HTTP_TEST, status=status, path=path, body=text)


CONFIG_TEST = "tests/test_config.py::test_bad_values_are_refused_with_reason"
ENGINE_TEST = "tests/test_config.py::test_engine_start_refuses_bad_setups"
HTTP_TEST = "tests/test_soak.py::test_soak_kill_and_restart"
MODEL = "smollm2-hga"  # the served model name of scripts/soak.py's server
# scripts/soak.py serves this max_model_len: small, since a CPU prefill near it takes seconds
SOAK_MAX_LEN = 512
TOO_LONG = 8192 + 10  # a prompt over any --max-model-len the soak may be given

ROWS: list[Row] = [
    # ------------------------------------------------ HGA config values (start-up)
    _config(
        "bool-as-number", {"sink_chunks": True}, "sink_chunks must be an integer in [0, 1048576]"
    ),
    _config("zero-topk", {"topk_chunks": 0}, "topk_chunks must be an integer in [1, 1048576]"),
    _config(
        "absurd-topk", {"topk_chunks": 10**9}, "topk_chunks must be an integer in [1, 1048576]"
    ),
    _config(
        "string-number", {"topk_groups": "88"}, "topk_groups must be an integer in [1, 4194304]"
    ),
    _config("negative", {"sink_chunks": -1}, "sink_chunks must be an integer in [0, 1048576]"),
    _config(
        "no-context",
        {"sink_chunks": 0, "local_chunks": 0},
        "sink_chunks + local_chunks must be >= 1",
    ),
    _config("groups-over-opened", {"groups_per_query": 100}, "cannot exceed topk_groups"),
    _config("groups-over-kept", {"topk_chunks": 2, "topk_groups": 9}, "exceeds the 8 groups"),
    _config("chunk-size", {"chunk_size": 128}, "chunk_size must be 64"),
    _config("inf-alpha", {"score_alpha": float("inf")}, "score_alpha must be a finite number >= 0"),
    _config("bool-alpha", {"score_alpha": True}, "score_alpha must be a finite number >= 0"),
    _config(
        "negative-threshold", {"rope_threshold": -1}, "rope_threshold must be a finite number >= 0"
    ),
    _config("chunk-score", {"chunk_score": "best"}, "chunk_score must be"),
    _config("group-score", {"group_score": "max"}, "group_score must be one of"),
    _config("rope-style", {"rope_style": "llama"}, "rope_style must be 'neox' or 'gptj'"),
    _config("size-word", {"host_kv_bytes": "lots"}, "is not a size"),
    _config("size-bool", {"host_kv_bytes": True}, "is not a size"),
    _config("size-inf", {"host_kv_bytes": "infGiB"}, "is not a size"),
    _config(
        "size-absurd",
        {"host_kv_bytes": "4096TiB"},
        "host_kv_bytes must be a number of bytes in [1, 1125899906842624] (1 PiB)",
    ),
    _config(
        "size-negative",
        {"disk_kv_bytes": "-1GiB", "disk_dir": "/tmp"},
        "disk_kv_bytes must be a number of bytes",
    ),
    _config("disk-dir-alone", {"disk_dir": "/tmp"}, "disk_dir and disk_kv_bytes go together"),
    _config(
        "disk-dir-number",
        {"disk_dir": 5, "disk_kv_bytes": "1GiB"},
        "disk_dir must be a directory path (a string)",
    ),
    _config(
        "dense-layers-int", {"dense_layers": 3}, "dense_layers must be a list of layer indices"
    ),
    _config(
        "dense-layers-bool",
        {"dense_layers": [True]},
        "dense_layers must be a list of layer indices",
    ),
    _config(
        "bank-chunks",
        {"bank_chunks": 10**6},
        'bank_chunks must be "auto" or an integer in [0, 32768]',
    ),
    _config("cuda-graphs", {"cuda_graphs": "yes"}, "cuda_graphs must be true or false"),
    _config("unknown-key", {"topk": 3}, "unknown key(s) ['topk']"),
    _config("preset-unknown", {"preset": "nope"}, "preset 'nope' not found; give a shipped preset"),
    _config("preset-any-file", {"preset": "/etc/hostname"}, "preset '/etc/hostname' not found"),
    _config("preset-number", {"preset": 5}, "preset 5 not found"),
    Row(
        "preset-bad-yaml",
        "config",
        '`{"hga": {"preset": "my.yaml"}}`, my.yaml not valid YAML on line 2',
        "is not valid YAML at line 2, column 1; fix that line",
        "tests/test_config.py::test_preset_yaml_errors_say_where_not_what",
    ),
    Row(
        "hga-not-a-mapping",
        "config",
        """`--additional-config '{"hga": "paper"}'`""",
        'the "hga" entry of --additional-config must be a mapping',
        CONFIG_TEST,
        hga="paper",  # type: ignore[arg-type]
    ),
    # ------------------------------------------------ vLLM flags (start-up, real config)
    Row(
        "block-size",
        "engine",
        "`--block-size 32`",
        "HGA needs --block-size 64",
        ENGINE_TEST,
        engine={"block_size": 32},
    ),
    Row(
        "kv-fp8",
        "engine",
        "`--kv-cache-dtype fp8`",
        "--kv-cache-dtype fp8 is not supported",
        ENGINE_TEST,
        engine={"kv_cache_dtype": "fp8"},
    ),
    Row(
        "budget-small",
        "engine",
        "`--kv-cache-memory-bytes 50MiB` with `--max-model-len 8192`",
        "needs 129 blocks",
        ENGINE_TEST,
        engine={"kv_cache_memory_bytes": 50 << 20},
    ),
    Row(
        "budget-over-ram",
        "engine",
        """`{"hga": {"host_kv_bytes": "1000TiB"}}`""",
        "of RAM is available",
        ENGINE_TEST,
        engine={"additional_config": {"hga": {"host_kv_bytes": "1000TiB"}}},
    ),
    Row(
        "bad-value-engine",
        "engine",
        """`{"hga": {"topk_chunks": -2}}`""",
        "topk_chunks must be an integer",
        ENGINE_TEST,
        engine={"additional_config": {"hga": {"topk_chunks": -2}}},
    ),
    # ------------------------------------------------ environment and device (start-up)
    Row(
        "platform-hook-off",
        "startup",
        "`VLLM_HGA_PLATFORM=0` with `--attention-backend HGA`",
        "turned HGA's platform hook off",
        "tests/test_config.py::test_hga_with_the_platform_hook_off_is_refused",
    ),
    Row(
        "cuda-topk",
        "startup",
        """on CUDA: `{"hga": {"topk_chunks": 100}}` or `{"preset": "full"}`""",
        "the most chunks the CUDA routing kernels keep per query head",
        "tests/test_config.py::test_cuda_limits_are_refused_at_start_up",
    ),
    Row(
        "cuda-head-size",
        "startup",
        "on CUDA: a model with head size 96",
        "the CUDA kernels are built for head sizes [64, 128, 256]",
        "tests/test_config.py::test_cuda_limits_are_refused_at_start_up",
    ),
    Row(
        "disk-dir-missing",
        "startup",
        """`{"hga": {"disk_dir": "/no/such/dir", ...}}`""",
        "does not exist",
        "tests/test_tiers.py::test_disk_dir_errors_are_clear",
    ),
    Row(
        "disk-file-exists",
        "startup",
        "a file or symlink already at the NVMe tier's file name in `disk_dir`",
        "already exists (a file or symlink that is not ours)",
        "tests/test_tiers.py::test_nvme_file_refuses_a_symlink_at_its_name",
    ),
    Row(
        "metrics-dir",
        "startup",
        "`HGA_METRICS_DIR=/a/regular/file`",
        "is not a directory",
        "tests/test_metrics.py::test_unusable_metrics_dir_is_refused_at_start_up",
    ),
    # ------------------------------------------------ requests (the running server)
    _http(
        "malformed-json",
        "a request body that is not JSON",
        "/v1/completions",
        '{"model": "smollm2-hga", "prompt": "hi"',
        400,
        "JSON",
    ),
    _http(
        "prompt-too-long",
        f"a prompt of {TOO_LONG} tokens (longer than `--max-model-len`)",
        "/v1/completions",
        {"model": MODEL, "prompt": [1] * TOO_LONG, "max_tokens": 4},
        400,
        "maximum context length",
    ),
    _http(
        "max-tokens-absurd",
        "`max_tokens: 100000000`",
        "/v1/completions",
        {"model": MODEL, "prompt": "hi", "max_tokens": 100000000},
        400,
        "cannot be greater than max_model_len",
    ),
    _http(
        "max-tokens-negative",
        "`max_tokens: -1`",
        "/v1/completions",
        {"model": MODEL, "prompt": "hi", "max_tokens": -1},
        400,
        "max_tokens",
    ),
    _http(
        "n-greedy",
        "`n: 3` with `temperature: 0`",
        "/v1/completions",
        {"model": MODEL, "prompt": "hi", "max_tokens": 4, "n": 3, "temperature": 0},
        400,
        "n must be 1 when using greedy sampling",
    ),
    _http(
        "unknown-model",
        '`model: "nope"`',
        "/v1/completions",
        {"model": "nope", "prompt": "hi", "max_tokens": 4},
        404,
        "does not exist",
    ),
    _http(
        "messages-not-list",
        'chat `messages: "hi"`',
        "/v1/chat/completions",
        {"model": MODEL, "messages": "hi"},
        400,
        "messages",
    ),
    # ------------------------------------------------ faults while serving
    Row(
        "metrics-write-fails",
        "runtime",
        "the metrics directory becomes unwritable",
        "logged once; serving goes on",
        "tests/test_metrics.py::test_failed_snapshot_write_is_logged_once",
    ),
    Row(
        "metrics-malformed",
        "runtime",
        "a malformed metrics snapshot file",
        "skipped with a warning; `/metrics` shows the others",
        "tests/test_metrics.py::test_malformed_snapshot_is_skipped",
    ),
]


def rows(kind: str) -> list[Row]:
    return [r for r in ROWS if r.kind == kind]


def row(id: str) -> Row:
    return next(r for r in ROWS if r.id == id)


def render() -> str:
    lines = [BEGIN, "", "| you send | you get back | checked by |", "|---|---|---|"]
    for r in ROWS:
        lines.append(f"| {r.sent} | {r.got} | `{r.test}` |".replace("\n", " "))
    return "\n".join([*lines, "", END])


def document_with_table(text: str) -> str:
    """`text` (docs/RELIABILITY.md) with its table section replaced by render()."""
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return head + render() + tail


def main(argv: list[str]) -> None:
    if "--write" in argv:
        DOC.write_text(document_with_table(DOC.read_text()))
    else:
        print(render())


if __name__ == "__main__":
    main(sys.argv[1:])
