"""Finding models by name or path.

A model is named on the command line (or in the Slicer panel) by one of:

- a bundled model's name (cards in ``SegXAILib/models/weights/``), or the name of a card or of a MONAI bundle
  folder in a folder listed in the ``SEGXAI_MODEL_PATH`` environment variable (``os.pathsep``-separated);
- a path to a model card (``.json``);
- a path to a MONAI bundle folder (``configs/inference.json`` and ``models/model.pt``);
- a path to an nnU-Net v2 trained-model folder (``dataset.json``, ``plans.json``, ``fold_N/checkpoint_final.pth``:
  :mod:`SegXAILib.models.nnunet`), or to a folder holding exactly one, up to two levels deep (an nnU-Net results
  folder: ``DatasetXXX_Name/Trainer__Plans__Configuration``); a folder holding several is refused with one line
  listing them (:func:`model_folder`). The trained-model folders in a ``SEGXAI_MODEL_PATH`` folder, up to two levels
  deep (a TotalSegmentator or nnU-Net results folder), are listed by name.

A TorchScript model is loaded through a card whose architecture is ``{"name": "torchscript"}``; that runs the
archive's code, so only with ``trust_model_code`` (:mod:`SegXAILib.models.trust`); so does a MONAI bundle whose
needed config keys hold code (:func:`SegXAILib.models.bundle.check_bundle_trust`). Listing and resolving models
reads cards and configs as data only (nothing of a bundle's config is evaluated), never a model file but an nnU-Net
checkpoint's recorded configuration where its folder's name does not give it (read as data: ``weights_only``).

A card whose files come with an installed Python package (``"package:deepbet/..."``, e.g. the bundled
``deepbet`` card) is listed only while that package is installed; naming it without the package says how to
install it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import SegXAIError
from . import trust
from .card import ModelCard
from .packages import installed_version

if TYPE_CHECKING:  # loaders import torch: resolving a name (the command line's checks) reads cards only
    from .loaders import LoadedModel

BUNDLED_DIR = Path(__file__).parent / "weights"


def model_search_dirs() -> list[Path]:
    extra = [Path(p) for p in os.environ.get("SEGXAI_MODEL_PATH", "").split(os.pathsep) if p]
    return [BUNDLED_DIR, *extra]


def _is_bundle(path: Path) -> bool:
    return path.is_dir() and any((path / "configs" / f"inference.{ext}").is_file() for ext in ("json", "yaml", "yml"))


def _is_model_folder(path: Path) -> bool:
    """A MONAI bundle or an nnU-Net trained-model folder (:func:`SegXAILib.models.nnunet.is_nnunet_folder`)."""
    from .nnunet import is_nnunet_folder

    return _is_bundle(path) or is_nnunet_folder(path)


def models_in_folder(path: Path) -> list[Path]:
    """The model folders ``path`` is or holds: itself when it is a MONAI bundle or an nnU-Net trained-model folder,
    else the nnU-Net trained-model folders inside it, up to two levels deep (an nnU-Net results folder's
    ``DatasetXXX_Name/Trainer__Plans__Configuration``), in path order. Nothing is opened."""
    from .nnunet import nnunet_folders_in

    return [path] if _is_model_folder(path) else nnunet_folders_in(path)


def model_folder(path: Path) -> Path:
    """The model folder that a folder named as a model stands for: itself, or the one nnU-Net trained-model folder it
    holds (:func:`models_in_folder`); ``path`` itself when it holds none (reading it then says what is missing).

    Raises:
        SegXAIError: the folder holds several models (one line listing them and how to choose one).
    """
    found = models_in_folder(path)
    if len(found) > 1:
        held = ", ".join(str(p.relative_to(path)) for p in found)
        raise SegXAIError(f"{path} holds {len(found)} nnU-Net models ({held}); choose one by giving its folder, "
                          f"e.g. {found[0]}")
    return found[0] if found else path


def card_at(path: Path) -> ModelCard:
    """The card of a card file, of a MONAI bundle folder (derived from its configs as data) or of an nnU-Net
    trained-model folder (from its dataset.json and plans.json)."""
    if path.is_dir():
        from .nnunet import card_from_nnunet, is_nnunet_folder

        if is_nnunet_folder(path):
            return card_from_nnunet(path)
        from .bundle import card_from_bundle

        return card_from_bundle(path)
    return ModelCard.load(path)


def _cards() -> dict[str, tuple[Path, list[str]]]:
    """Name -> (card path or bundle folder, the packages it needs that are not installed), first one found wins."""
    found: dict[str, tuple[Path, list[str]]] = {}
    from .nnunet import nnunet_folders_in

    for folder in model_search_dirs():
        top = {p for p in folder.glob("*") if p.suffix == ".json" or _is_model_folder(p)}
        for path in sorted(top.union(nnunet_folders_in(folder))):
            try:
                card = card_at(path)
                missing = [p for p in card.packages if installed_version(p) is None]
            except SegXAIError:
                continue  # not a model card (e.g. a reliability model beside it)
            found.setdefault(card.name, (path, missing))
    return found


def available_cards() -> dict[str, Path]:
    """Name -> card path (or MONAI bundle folder) for every model found in the search folders (first one wins), but
    those whose package is not installed."""
    return {name: path for name, (path, missing) in _cards().items() if not missing}


def resolve_card(spec: str | os.PathLike) -> ModelCard:
    """The model card for a name, a card path, a MONAI bundle folder, an nnU-Net trained-model folder or a folder
    holding one (:func:`model_folder`)."""
    path = Path(spec)
    if path.is_dir():
        return card_at(model_folder(path))
    if path.suffix == ".json" and path.exists():
        return ModelCard.load(path)
    every = _cards()
    if str(spec) in every and every[str(spec)][1]:
        card = card_at(every[str(spec)][0])
        install = card.extra.get("install") or f"pip install {' '.join(every[str(spec)][1])}"
        raise SegXAIError(f"model {str(spec)!r} needs the Python package {', '.join(every[str(spec)][1])}, which is "
                          f"not installed; install it ({install})")
    cards = {name: path for name, (path, missing) in every.items() if not missing}
    if str(spec) in cards:
        return card_at(cards[str(spec)])
    if path.suffix in (".json", ".pt", ".ts", ".pth", ".safetensors") or os.sep in str(spec):
        raise SegXAIError(f"model not found: {spec}; give a model card (.json), a MONAI bundle or nnU-Net model "
                          "folder, or a name from 'segxai models'")
    raise SegXAIError(f"unknown model {str(spec)!r}; available: {', '.join(cards) or 'none'} "
                      "(or give a model card path, a MONAI bundle or an nnU-Net model folder)")


def load_model(spec: str | os.PathLike, weights_index: int = 0, trust_model_code: bool = False) -> LoadedModel:
    """Load a model by name, card path or bundle folder; the network is in eval mode on the CPU.

    Args:
        trust_model_code: the user trusts this model's code: a TorchScript model is opened with
            ``torch.jit.load`` (which runs code stored in it), and its files stay trusted for the rest of the
            process (the other members of an ensemble). Without it such a model is refused with one line naming
            ``--trust-model-code`` (:mod:`SegXAILib.models.trust`); models whose weights are data need no trust.

    Raises:
        SegXAIError: unknown model, unreadable card or weights, or code the user has not trusted.
    """
    from .loaders import load_from_card

    card = resolve_card(spec)
    if trust_model_code:
        trust.grant(card.weight_paths)
    if card.extra.get("bundle_root"):
        from .bundle import load_bundle

        return load_bundle(card, trust_model_code)
    if card.extra.get("nnunet_root"):
        from .nnunet import load_nnunet

        return load_nnunet(card)
    return load_from_card(card, weights_index, trust_model_code)


def code_files(card: ModelCard) -> list[Path]:
    """The files of ``card`` whose loading runs code stored in them (TorchScript opened with ``torch.jit.load``);
    nothing is opened to tell. Empty for a model whose weights are data (its architecture is one SegXAI builds)."""
    if card.extra.get("bundle_root"):
        from .bundle import bundle_weights

        path = bundle_weights(card)
        return [path] if path.suffix == ".ts" else []
    if card.architecture.get("name") == "torchscript":
        return list(card.weight_paths)
    return []


def check_trust(card: ModelCard, trust_model_code: bool = False) -> None:
    """Raise the refusal of :func:`SegXAILib.models.trust.refuse` now, before any work, when loading ``card``
    would run code the user has not trusted (``--trust-model-code``): a TorchScript file, or code in a MONAI
    bundle's config; nothing is opened or evaluated.

    For runs that load the model later or elsewhere (an audit's cases, a Slicer child process)."""
    from .loaders import check_torchscript_trust

    for path in code_files(card):
        check_torchscript_trust(path, trust_model_code)
    if card.extra.get("bundle_root"):
        from .bundle import check_bundle_trust

        check_bundle_trust(Path(card.extra["bundle_root"]), trust_model_code)


def model_fingerprint(card: ModelCard) -> str:
    """SHA-256 of the card (its JSON, keys sorted) and of the bytes of every weights file it names, or, for a
    MONAI bundle, of every file of the bundle's ``configs/`` and ``models/`` (of an nnU-Net model, its checkpoints,
    dataset.json and plans.json): equal fingerprints, same model."""
    digest = hashlib.sha256(json.dumps(card.to_dict(), sort_keys=True, default=str).encode())
    bundle, nnunet = card.extra.get("bundle_root"), card.extra.get("nnunet_root")
    files = card.weight_paths if not bundle else sorted(
        p for sub in ("configs", "models") for p in (Path(bundle) / sub).rglob("*") if p.is_file())
    if nnunet:
        files = [*files, Path(nnunet) / "dataset.json", Path(nnunet) / "plans.json"]
    for path in files:
        digest.update(path.name.encode())
        with open(path, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
