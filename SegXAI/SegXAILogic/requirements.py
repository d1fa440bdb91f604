"""The module's Python requirements (Resources/requirements.txt) and which of them are missing.

Installing is the widget's job (it asks the user first); this part only reads and checks, so it runs
anywhere.
"""

from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

__all__ = ["REQUIREMENTS_FILE", "SLICER_PROVIDED", "TORCH_REQUIREMENT", "readRequirements", "missingRequirements"]

REQUIREMENTS_FILE = Path(__file__).resolve().parent.parent / "Resources" / "requirements.txt"
SLICER_PROVIDED = ("torch", "vtk", "SimpleITK")
"""Never pip-installed by the module: torch through the PyTorch extension, the others ship with Slicer."""
TORCH_REQUIREMENT = ">=2.3"


def readRequirements(path: str | os.PathLike = REQUIREMENTS_FILE) -> list[str]:
    """Requirement strings of a requirements file (comments and pip options skipped)."""
    lines = (line.split("#", 1)[0].strip() for line in Path(path).read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line and not line.startswith("-")]


def missingRequirements(requirements: list[str]) -> list[str]:
    """The requirements not installed at a satisfying version."""
    from packaging.requirements import Requirement

    missing = []
    for text in requirements:
        requirement = Requirement(text)
        try:
            installed = version(requirement.name)
        except PackageNotFoundError:
            missing.append(text)
            continue
        if installed not in requirement.specifier:
            missing.append(text)
    return missing
