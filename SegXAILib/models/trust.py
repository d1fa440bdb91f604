"""Trusting a model's code: what SegXAI runs of a model file only when the user says so.

A model file is untrusted input. Weights are data and are read as data (safetensors, ``torch.load(...,
weights_only=True)``, the tensors of a TorchScript archive by :mod:`SegXAILib.models.archive`). Some model
formats are code, though:

- a TorchScript archive (``torch.jit.load`` compiles the archive's code and runs it while loading: a module's
  ``__setstate__`` can write any file);
- a MONAI bundle's config whose needed keys hold ``$`` expressions or ``_target_``s off an allowlist, which
  MONAI's ConfigParser would execute when the network is built (:func:`SegXAILib.models.bundle.check_bundle_trust`;
  a bundle without such code is built as data and needs no trust).

Such a model is opened only with ``trust_model_code=True`` (``--trust-model-code`` on the command line, the
confirmation in the Slicer panel); without it the run stops before any work with one line that says why and
names the flag (:func:`refuse`). Listing models (``segxai models``, the panel's catalogue) never opens one.

A model whose architecture SegXAI builds needs no trust even when its weights come as TorchScript: the card
names the architecture and the archive's tensors are loaded into it without its code running
(:func:`SegXAILib.models.loaders.read_state_dict`); this is how the deepbet card works.

Trust is given to a model, and it covers all of its files: :func:`grant` records them for this process, so
that later loads of the same files (the members of a deep ensemble, loaded by an explainer) need not be told
again. Nothing else in the process is trusted by it.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from ..errors import SegXAIError

FLAG = "--trust-model-code"
"""The command-line flag (Python: ``trust_model_code=True``; Slicer: the panel's confirmation)."""

_granted: set[Path] = set()


def _key(path: str | Path) -> Path:
    return Path(path).resolve()


def grant(paths: Iterable[str | Path]) -> None:
    """Trust the code of these files for the rest of this process (the user trusted the model they belong to)."""
    _granted.update(_key(p) for p in paths)


def granted(path: str | Path) -> bool:
    """Whether the user trusted the code of ``path`` earlier in this process."""
    return _key(path) in _granted


def refuse(what: str, path: str | Path, runs: str, alternative: str = "") -> SegXAIError:
    """The one-line error for a model that would run code the user has not trusted.

    Args:
        what: the kind of model file, e.g. ``"the TorchScript model"``.
        path: the file or folder.
        runs: how loading it would run code, e.g. ``"torch.jit.load runs code stored in the archive"``.
        alternative: a way to use the model without trusting it, if there is one.
    """
    return SegXAIError(f"refusing to open {what} {path}: {runs}, which SegXAI does only for a model you trust; "
                       f"if you trust its source, run again with {FLAG} (Python: trust_model_code=True)"
                       + (f"; {alternative}" if alternative else ""))


def require(trusted: bool, what: str, path: str | Path, runs: str, alternative: str = "") -> None:
    """Raise :func:`refuse`'s error unless ``trusted`` or the file was trusted earlier (:func:`granted`)."""
    if not (trusted or granted(path)):
        raise refuse(what, path, runs, alternative)
