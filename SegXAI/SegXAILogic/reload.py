"""Reloading the module's own packages, so that editing the logic needs no restart of Slicer.

Slicer's *Reload* re-executes SegXAI.py only; the packages it imports stay in ``sys.modules`` and
would keep their old code. SlicerNNUNet reloads its library package in ``onReload`` for the same reason.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

RELOADED_PACKAGES = ("SegXAILogic", "SegXAILib")
"""The packages the panel imports in Slicer's own process (the engine's heavy work runs in a child process,
which starts with fresh code anyway)."""


def forgetModules(packages: Sequence[str] = RELOADED_PACKAGES) -> list[str]:
    """Drop ``packages`` and their submodules from ``sys.modules``, so that the next import reads their files
    again; returns the names dropped."""
    names = [name for name in sys.modules if any(name == p or name.startswith(p + ".") for p in packages)]
    for name in names:
        del sys.modules[name]
    return sorted(names)
