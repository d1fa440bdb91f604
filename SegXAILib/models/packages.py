"""Model files that an installed Python package ships (e.g. deepbet's networks inside its wheel).

A model card names such a file as ``"package:<distribution>/<path inside the installed distribution>"``, e.g.
``"package:deepbet/data/models/model.pt"``: the path is found with :mod:`importlib.metadata` where pip installed
the package, and nothing is ever downloaded. The package's Python code is not imported to find it.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

from ..errors import SegXAIError

PREFIX = "package:"


def is_package_file(spec: object) -> bool:
    return isinstance(spec, str) and spec.startswith(PREFIX)


def split(spec: str) -> tuple[str, str]:
    """``"package:deepbet/data/models/model.pt"`` -> ``("deepbet", "data/models/model.pt")``.

    Raises:
        SegXAIError: no distribution name or no path.
    """
    distribution, _, inner = spec[len(PREFIX):].partition("/")
    if not distribution or not inner:
        raise SegXAIError(f"{spec!r} must read package:<distribution>/<path in it>, e.g. "
                          "package:deepbet/data/models/model.pt")
    return distribution, inner


def installed_version(distribution: str) -> str | None:
    """The installed version of ``distribution``, or None when it is not installed."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def package_file(spec: str, install: str = "") -> Path:
    """The file a ``package:`` spec names, in the installed distribution.

    Args:
        install: how to install the package, for the message (e.g. ``pip install 'segxai[models]'``).

    Raises:
        SegXAIError: the distribution is not installed, or does not hold the file.
    """
    distribution, inner = split(spec)
    how = install or f"pip install {distribution}"
    try:
        found = metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        raise SegXAIError(f"this model's files come with the Python package {distribution}, which is not "
                          f"installed; install it ({how})") from None
    path = Path(found.locate_file(inner))
    if not path.is_file():
        raise SegXAIError(f"the installed {distribution} {found.version} has no {inner}; reinstall it ({how})")
    return path
