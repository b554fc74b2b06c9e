"""HGA configuration: one frozen, validated object per engine.

Sources, later ones winning key by key:
  1. the defaults below: the paper's token budget (960 keys per query and head once the
     context is long) spent differently -- F=1, L=2, K_c=22, K_g=88 (44 groups per query),
     chunks scored by their best group and groups by the attention mass their 2-bit key
     sketch predicts; measured better than the paper's F=2, L=8, K_c=20, K_g=32 at equal
     density (docs/QUALITY.md); the paper's exact routing is the preset "paper"; on CUDA
     groups are scored by mean + 3 x key spread until the kernels read sketches,
  2. a YAML preset (``"preset": "paper"`` names ``vllm_hga/presets/paper.yaml``; the path
     of a .yaml file works too),
  3. the keys of ``--additional-config '{"hga": {...}}'``.

Every value is checked when the object is built, so a bad value stops start-up with the
reason and the fix instead of failing at request time.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHUNK_SIZE = 64  # tokens per chunk; one chunk is one vLLM KV block
GROUP_SIZE = 16  # tokens per group; 4 groups per chunk
# Largest device bank per layer (bank_chunks): the CUDA admission kernel keeps one byte per
# slot in shared memory (csrc/bank.cu kBankMaxSlots).  32768 chunks are 4 GiB per layer
# at 4 KV heads x 128 dims in bf16.
BANK_MAX_CHUNKS = 32768

# Sane bounds (refused beyond them at start-up: a typo must not size an engine).
# Chunk counts (sink_chunks, local_chunks, topk_chunks): 2^20 chunks = 64M tokens, far
# beyond any context vLLM serves; the "full" preset's 10^6 stays below.
MAX_CHUNKS = 2**20
MAX_GROUPS = MAX_CHUNKS * 4  # topk_groups, groups_per_query (4 groups per chunk)
MAX_LAYER_INDEX = 2**16  # dense_layers entries
MAX_KV_BYTES = 2**50  # host_kv_bytes, disk_kv_bytes: 1 PiB

# Presets ship inside the package (setup.py package_data), so a wheel install finds them.
PRESET_DIR = Path(__file__).resolve().parent / "presets"


GROUP_SCORES = ("mean", "mean_std", "sketch")


class HGAConfigError(ValueError):
    """A configuration HGA cannot run with. The message says why and what to do."""


def require_writable_dir(directory: str, label: str, fix: str, missing: str) -> None:
    """Refuse (HGAConfigError "hga: <label><dir> <missing>. <fix>") a directory that does
    not exist or that this process cannot create files in: found at start-up, not by the
    first write."""
    import tempfile

    if not os.path.isdir(directory):
        raise HGAConfigError(f"hga: {label}{directory!r} {missing}. {fix}")
    try:
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as e:
        raise HGAConfigError(
            f"hga: {label}{directory!r} is not writable ({e.strerror}). {fix}"
        ) from None


@dataclass(frozen=True)
class HGAConfig:
    # Budgets (names follow the paper: F, L, K_c, K_g).
    # Defaults: docs/QUALITY.md, "Choice of the defaults" (paper: F=2, L=8, K_c=20, K_g=32,
    # chunk_score "summary", group_score "mean"; presets/paper.yaml).
    sink_chunks: int = 1  # F: first chunks every query sees (attention sinks)
    local_chunks: int = 2  # L: last closed chunks every query sees (local window)
    topk_chunks: int = 22  # K_c: chunks kept by chunk routing, per query head
    topk_groups: int = 88  # K_g: groups opened inside the kept chunks
    # Groups each query attends to; the paper lets a query see K_g // 2 of the K_g opened.
    groups_per_query: int | None = None
    # How a chunk is scored for level-1 routing: "summary" (q . chunk summary, the paper)
    # or "max_group" (the best of its group scores: a short span is not averaged away).
    chunk_score: str = "max_group"
    # How a group is scored (level 2, and level 1 under chunk_score "max_group"):
    # * "sketch" (the default): log sum_t exp(q . k_hat_t / sqrt(D)) over the group's 16
    #   keys -- the attention mass the group would get -- where k_hat is a 2-bit copy of
    #   every post-RoPE key (a per-channel grid between the chunk's min and max, float16)
    #   held in the summary page in place of the summaries, at the same page size.  One
    #   matching key can carry a group; a mean dilutes it 16-fold.  docs/QUALITY.md
    #   section 2b.  The same default on every device: CUDA kernels write and read the
    #   pages (csrc/sketch.cu), CPU engines use the torch path.
    # * "mean_std": q . group summary + score_alpha * sqrt(sum_d q_d^2 var_d), var the
    #   per-channel variance of the chunk's post-RoPE keys around their own group's mean
    #   (one [D] row per chunk and KV head, in place of the chunk summary).
    # * "mean": q . group summary (the paper).
    # "sketch" and "mean_std" take the chunk summary's row, so they need chunk_score
    # "max_group".
    group_score: str = "sketch"
    score_alpha: float = 3.0
    # RoPE pair i is "high frequency" (summed after rotation) when
    # (chunk_size - 1) * inv_freq_i > rope_threshold radians; else it is summed before
    # rotation and rotated at the span's middle position.  0.5 is the authors' value.
    rope_threshold: float = 0.5
    # RoPE pairing of the model: "neox" (rotate-half) or "gptj" (interleaved).  None: take it
    # from the known architectures list (startup.NEOX_ARCHITECTURES) and refuse others.
    rope_style: str | None = None
    chunk_size: int = CHUNK_SIZE
    group_size: int = GROUP_SIZE
    # Layers (by index) that stay exactly dense, e.g. (0, 1).  Empty: every layer routes.
    dense_layers: tuple[int, ...] = ()
    # Host tier: bytes of full K/V the host pool may hold (None: as much as vLLM's KV
    # budget for this platform would give dense attention).
    host_kv_bytes: int | None = None
    # Optional NVMe tier: directory for cold blocks, and its byte budget.
    disk_dir: str | None = None
    disk_kv_bytes: int | None = None
    # Device bank (bank.py): an LRU working set of whole chunks of K/V in device memory per
    # layer, which decode attention reads instead of the host pool.  None = the device's
    # default "auto": on CUDA the device memory a dense engine would have given its KV cache
    # (sizing.py), never more than max_num_seqs whole contexts; none on CPU.  An integer is
    # an explicit size (0 = off, at most BANK_MAX_CHUNKS; it runs on CPU too, in ordinary
    # memory).  bank_max_chunks caps "auto".
    bank_chunks: int | str | None = "auto"
    bank_max_chunks: int | None = None
    # Full CUDA graphs for steps that are all single-token decodes (CUDA, kernels built,
    # no dense_layers; see backend.cuda_graph_blockers).  False: decode
    # attention runs eagerly between vLLM's piecewise graphs, as --enforce-eager does
    # for the whole model.
    cuda_graphs: bool = True
    preset: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.groups_per_query is None and _is_int(self.topk_groups):
            object.__setattr__(self, "groups_per_query", self.topk_groups // 2)
        self._validate()
        object.__setattr__(self, "dense_layers", tuple(sorted(set(self.dense_layers))))

    # ------------------------------------------------------------------ checks
    def _validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise HGAConfigError(f"hga config: {msg}")

        need(
            self.chunk_size == CHUNK_SIZE,
            f"chunk_size must be {CHUNK_SIZE} (one chunk is one vLLM block); got {self.chunk_size}",
        )
        need(
            self.group_size == GROUP_SIZE, f"group_size must be {GROUP_SIZE}; got {self.group_size}"
        )
        for name in ("sink_chunks", "local_chunks"):
            v = getattr(self, name)
            need(
                _is_int(v) and 0 <= v <= MAX_CHUNKS,
                f"{name} must be an integer in [0, {MAX_CHUNKS}]; got {v!r}",
            )
        if self.bank_chunks is None:
            object.__setattr__(self, "bank_chunks", "auto")
        need(
            self.bank_chunks == "auto"
            or (
                isinstance(self.bank_chunks, int)
                and not isinstance(self.bank_chunks, bool)
                and 0 <= self.bank_chunks <= BANK_MAX_CHUNKS
            ),
            f'bank_chunks must be "auto" or an integer in [0, {BANK_MAX_CHUNKS}] '
            "(0 = no device bank; "
            f"the CUDA admission kernel holds at most {BANK_MAX_CHUNKS} slots per layer); "
            f"got {self.bank_chunks!r}",
        )
        need(
            self.bank_max_chunks is None
            or (
                isinstance(self.bank_max_chunks, int)
                and not isinstance(self.bank_max_chunks, bool)
                and 0 <= self.bank_max_chunks <= BANK_MAX_CHUNKS
            ),
            f'bank_max_chunks (the cap of bank_chunks "auto") must be an integer in '
            f"[0, {BANK_MAX_CHUNKS}]; got {self.bank_max_chunks!r}",
        )
        need(
            isinstance(self.cuda_graphs, bool),
            f"cuda_graphs must be true or false; got {self.cuda_graphs!r}",
        )
        for name, most in (
            ("topk_chunks", MAX_CHUNKS),
            ("topk_groups", MAX_GROUPS),
            ("groups_per_query", MAX_GROUPS),
        ):
            v = getattr(self, name)
            need(
                _is_int(v) and 1 <= v <= most,
                f"{name} must be an integer in [1, {most}]; got {v!r}",
            )
        need(
            self.sink_chunks + self.local_chunks >= 1,
            "sink_chunks + local_chunks must be >= 1 so every query keeps some context",
        )
        need(
            self.groups_per_query <= self.topk_groups,
            f"groups_per_query ({self.groups_per_query}) cannot exceed topk_groups "
            f"({self.topk_groups}): a query only sees opened groups",
        )
        groups_in_kept = self.topk_chunks * self.groups_per_chunk
        need(
            self.topk_groups <= groups_in_kept,
            f"topk_groups ({self.topk_groups}) exceeds the {groups_in_kept} groups inside "
            f"topk_chunks={self.topk_chunks} chunks; raise topk_chunks or lower topk_groups",
        )
        need(
            _is_finite(self.rope_threshold) and self.rope_threshold >= 0,
            f"rope_threshold must be a finite number >= 0 (radians); got {self.rope_threshold!r}",
        )
        need(
            self.chunk_score in ("summary", "max_group"),
            f"chunk_score must be 'summary' or 'max_group'; got {self.chunk_score!r}",
        )
        need(
            self.group_score in GROUP_SCORES,
            f"group_score must be one of {list(GROUP_SCORES)}; got {self.group_score!r}",
        )
        need(
            _is_finite(self.score_alpha) and self.score_alpha >= 0,
            f"score_alpha must be a finite number >= 0; got {self.score_alpha!r}",
        )
        need(
            self.group_score == "mean" or self.chunk_score == "max_group",
            f"group_score {self.group_score!r} stores other rows where the chunk summary "
            "was; set chunk_score: max_group with it",
        )
        need(
            self.rope_style in (None, "neox", "gptj"),
            f"rope_style must be 'neox' or 'gptj'; got {self.rope_style!r}",
        )
        need(
            isinstance(self.dense_layers, (list, tuple))
            and all(_is_int(i) and 0 <= i < MAX_LAYER_INDEX for i in self.dense_layers),
            f"dense_layers must be a list of layer indices in [0, {MAX_LAYER_INDEX}); "
            f"got {self.dense_layers!r}",
        )
        for name in ("host_kv_bytes", "disk_kv_bytes"):
            v = getattr(self, name)
            need(
                v is None or (_is_int(v) and 0 < v <= MAX_KV_BYTES),
                f"{name} must be a number of bytes in [1, {MAX_KV_BYTES}] (1 PiB), "
                f"e.g. 8GiB; got {v!r}",
            )
        need(
            self.disk_dir is None or (isinstance(self.disk_dir, str) and self.disk_dir != ""),
            f"disk_dir must be a directory path (a string); got {self.disk_dir!r}",
        )
        need(
            (self.disk_dir is None) == (self.disk_kv_bytes is None),
            "disk_dir and disk_kv_bytes go together: set both to enable the NVMe tier",
        )

    # ------------------------------------------------------------------ derived
    @property
    def groups_per_chunk(self) -> int:
        return self.chunk_size // self.group_size

    def bank_size(self, device_type: str) -> int:
        """Explicit chunks per layer in the device bank on this device type (0 = no bank);
        -1 when it is sized at start-up from free device memory (bank_auto)."""
        if self.bank_chunks == "auto":
            return -1 if device_type == "cuda" else 0
        return self.bank_chunks

    def bank_auto(self, device_type: str) -> bool:
        return self.bank_size(device_type) < 0

    @property
    def keys_per_query_bound(self) -> int:
        """Largest number of real keys one query of one head can see."""
        fixed = (self.sink_chunks + self.local_chunks + 1) * self.chunk_size
        return fixed + self.groups_per_query * self.group_size

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------ builders
    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> HGAConfig:
        """The config of an hga mapping (over its preset, if it names one)."""
        if values is not None and not isinstance(values, Mapping):
            raise HGAConfigError(
                f'hga config: the "hga" entry of --additional-config must be a mapping '
                f'of keys, e.g. \'{{"hga": {{"topk_chunks": 32}}}}\'; got {values!r}'
            )
        values = dict(values or {})
        merged: dict[str, Any] = {}
        preset = values.get("preset") or os.environ.get("VLLM_HGA_PRESET")
        if preset:
            merged.update(load_preset(preset))
            merged["preset"] = preset
        merged.update(values)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(merged) - known)
        if unknown:
            raise HGAConfigError(
                f"hga config: unknown key(s) {unknown}; known keys: {sorted(known)}"
            )
        for key in ("host_kv_bytes", "disk_kv_bytes"):
            merged[key] = _parse_bytes(merged.get(key), key)
        if isinstance(merged.get("dense_layers"), list):
            merged["dense_layers"] = tuple(merged["dense_layers"])
        elif merged.get("dense_layers") is None:
            merged.pop("dense_layers", None)
        return cls(**merged)

    @classmethod
    def from_vllm_config(cls, vllm_config: Any) -> HGAConfig:
        extra = getattr(vllm_config, "additional_config", None) or {}
        return cls.from_mapping(extra.get("hga"))


def preset_path(name: Any) -> Path:
    """A shipped preset's file (by name), or an explicit path to an existing .yaml file.

    Nothing else: a preset is never "any file", so a typo cannot feed, say, a log file to
    the YAML parser (whose errors would echo its lines)."""
    shipped = {p.stem: p for p in PRESET_DIR.glob("*.yaml")}
    if isinstance(name, str) and name in shipped:
        return shipped[name]
    if isinstance(name, str) and name.endswith((".yaml", ".yml")) and Path(name).is_file():
        return Path(name)
    raise HGAConfigError(
        f"hga config: preset {name!r} not found; give a shipped preset "
        f"({sorted(shipped)}) or the path of an existing .yaml file"
    )


def load_preset(name: str) -> dict[str, Any]:
    import yaml

    path = preset_path(name)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        # say where, never what: the message of a YAML error quotes the file's lines
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise HGAConfigError(
            f"hga config: preset {path} is not valid YAML{where}; fix that line"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
        raise HGAConfigError(f"hga config: cannot read preset {path} ({reason})") from None
    if isinstance(data, dict) and "hga" in data:
        data = data["hga"]
    if not isinstance(data, dict):
        raise HGAConfigError(f"hga config: preset {path} must hold a mapping of keys")
    data = dict(data)
    data.pop("preset", None)
    return data


_UNITS = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def _parse_bytes(value: Any, key: str) -> int | None:
    """Accept 123, "512MiB", "8GiB", "8G" so users need not count bytes."""
    if value is None or _is_int(value):
        return value
    if _is_finite(value) and float(value).is_integer():
        return int(value)
    if isinstance(value, str):
        text = value.strip().lower().replace("ib", "").replace("b", "")
        try:
            if text and text[-1] in _UNITS:
                return int(float(text[:-1]) * _UNITS[text[-1]])
            return int(text)
        except (ValueError, OverflowError):  # "lots", "nanG", "infG"
            pass
    raise HGAConfigError(f"hga config: {key}={value!r} is not a size; write e.g. 8GiB or 536870912")


def _is_int(value: Any) -> bool:
    """An integer that is not a bool (YAML and JSON true would pass isinstance(int))."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite(value: Any) -> bool:
    """A finite int or float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
