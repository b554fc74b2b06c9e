"""The wheel holds the serving package and its presets, nothing of the repository's tooling.

research/, benchmarks/ and devkit/ live beside vllm_hga/ and are not shipped; the YAML
presets are package data, so an installed (not editable) vllm_hga finds them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import vllm_hga
from vllm_hga.config import PRESET_DIR

ROOT = Path(__file__).resolve().parent.parent
# what a wheel build reads, plus the tooling packages the wheel must leave out
BUILD_INPUTS = [
    "setup.py",
    "pyproject.toml",
    "vllm_hga",
    "csrc",
    "research",
    "benchmarks",
    "devkit",
]


def test_presets_resolve_inside_the_package():
    assert PRESET_DIR == Path(vllm_hga.__file__).resolve().parent / "presets"
    assert {"paper", "full"} <= {p.stem for p in PRESET_DIR.glob("*.yaml")}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built (no CUDA extension) from a copy of the source tree."""
    pytest.importorskip("wheel")
    src = tmp_path_factory.mktemp("src")
    for name in BUILD_INPUTS:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
        else:
            shutil.copy2(path, src / name)
    out = tmp_path_factory.mktemp("wheel")
    env = {**os.environ, "VLLM_HGA_BUILD_CUDA": "0"}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(src),
        ],
        check=True,
        env=env,
        cwd=src,
    )
    (whl,) = out.glob("vllm_hga-*.whl")
    return whl


def test_wheel_holds_vllm_hga_and_presets_only(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"vllm_hga"}, top
    assert "vllm_hga/presets/paper.yaml" in names and "vllm_hga/presets/full.yaml" in names


def test_installed_wheel_loads_its_presets(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(site),
            str(wheel),
        ],
        check=True,
    )
    probe = (
        "import vllm_hga, vllm_hga.config as c; "
        "cfg = c.HGAConfig.from_mapping({'preset': 'paper'}); "
        "print(vllm_hga.__file__); print(cfg.topk_chunks)"
    )
    # run outside the repository with only the installed copy ahead of site-packages
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run(
        [sys.executable, "-c", probe],
        check=True,
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert Path(out[0]).resolve().is_relative_to(site.resolve()), out[0]
    assert out[1] == "20"  # the paper's K_c, read from the installed paper.yaml


def test_source_tree_entry_points_match_setup(tmp_path):
    """scripts/register_entry_points.sh (the GPU machine runs from a source tree) declares
    exactly the plugins setup.py installs, so vLLM finds HGA the same way."""
    import ast
    from importlib.metadata import distributions

    subprocess.run(
        ["bash", str(ROOT / "scripts/register_entry_points.sh"), str(tmp_path)], check=True
    )
    (dist,) = [d for d in distributions(path=[str(tmp_path)]) if d.metadata["Name"] == "vllm_hga"]
    got = {(ep.group, f"{ep.name} = {ep.value}") for ep in dist.entry_points}
    call = next(
        n
        for n in ast.walk(ast.parse((ROOT / "setup.py").read_text()))
        if isinstance(n, ast.keyword) and n.arg == "entry_points"
    )
    want = {(group, ep) for group, eps in ast.literal_eval(call.value).items() for ep in eps}
    assert got == want
