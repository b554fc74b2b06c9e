"""Subclasses of vLLM classes built on first use, for a module's ``__getattr__``.

Importing vLLM's CUDA platform or worker on a CPU build (or the CPU ones on a CUDA build)
fails, so the platform and worker subclasses cannot be defined at import time.
"""

from __future__ import annotations

import importlib


def build_subclass(module_globals: dict, name: str, recipes: dict) -> type:
    """The class `name` of recipes {name: (mixin, "vllm.module", "BaseClass")}: mixin first,
    named and placed as if defined in the calling module, cached in its globals."""
    if name not in recipes:
        raise AttributeError(name)
    mixin, module, base = recipes[name]
    cls = type(name, (mixin, getattr(importlib.import_module(module), base)), {})
    cls.__module__ = module_globals["__name__"]
    cls.__qualname__ = name
    module_globals[name] = cls
    return cls
