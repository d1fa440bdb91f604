"""Finding models by name or path.

A model is named on the command line (or in the Slicer panel) by one of:

- a bundled model's name (cards in ``SegXAILib/models/weights/``), or the name of a card in a
  folder listed in the ``SEGXAI_MODEL_PATH`` environment variable (``os.pathsep``-separated);
- a path to a model card (``.json``);
- a path to a MONAI bundle folder (``configs/inference.json`` and ``models/model.pt``).

A TorchScript model is loaded through a card whose architecture is ``{"name": "torchscript"}``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..errors import SegXAIError
from .card import ModelCard
from .loaders import LoadedModel, load_from_card

BUNDLED_DIR = Path(__file__).parent / "weights"


def model_search_dirs() -> list[Path]:
    extra = [Path(p) for p in os.environ.get("SEGXAI_MODEL_PATH", "").split(os.pathsep) if p]
    return [BUNDLED_DIR, *extra]


def available_cards() -> dict[str, Path]:
    """Name -> card path for every model found in the search folders (first one wins)."""
    found: dict[str, Path] = {}
    for folder in model_search_dirs():
        for path in sorted(folder.glob("*.json")):
            try:
                name = ModelCard.load(path).name
            except SegXAIError:
                continue  # not a model card (e.g. a reliability model beside it)
            found.setdefault(name, path)
    return found


def resolve_card(spec: str | os.PathLike) -> ModelCard:
    """The model card for a name, a card path or a MONAI bundle folder."""
    path = Path(spec)
    if path.is_dir():
        from .bundle import card_from_bundle

        return card_from_bundle(path)
    if path.suffix == ".json" and path.exists():
        return ModelCard.load(path)
    cards = available_cards()
    if str(spec) in cards:
        return ModelCard.load(cards[str(spec)])
    if path.suffix in (".json", ".pt", ".ts", ".pth", ".safetensors") or os.sep in str(spec):
        raise SegXAIError(f"model not found: {spec}; give a model card (.json), a MONAI bundle folder, "
                          "or a name from 'segxai models'")
    raise SegXAIError(f"unknown model {str(spec)!r}; available: {', '.join(cards) or 'none'} "
                      "(or give a model card path or a MONAI bundle folder)")


def load_model(spec: str | os.PathLike, weights_index: int = 0) -> LoadedModel:
    """Load a model by name, card path or bundle folder; the network is in eval mode on the CPU."""
    card = resolve_card(spec)
    if card.extra.get("bundle_root"):
        from .bundle import load_bundle_network

        return LoadedModel(card, load_bundle_network(card), "bundle")
    return load_from_card(card, weights_index)


def model_fingerprint(card: ModelCard) -> str:
    """SHA-256 of the card (its JSON, keys sorted) and of the bytes of every weights file it names, or, for a
    MONAI bundle, of every file of the bundle's ``configs/`` and ``models/``: equal fingerprints, same model."""
    digest = hashlib.sha256(json.dumps(card.to_dict(), sort_keys=True, default=str).encode())
    bundle = card.extra.get("bundle_root")
    files = card.weight_paths if not bundle else sorted(
        p for sub in ("configs", "models") for p in (Path(bundle) / sub).rglob("*") if p.is_file())
    for path in files:
        digest.update(path.name.encode())
        with open(path, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
