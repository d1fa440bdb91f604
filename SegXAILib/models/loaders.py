"""Loading a model by any of its routes: our card + weights, TorchScript, or a MONAI bundle.

Weights are never unpickled: ``.safetensors`` files are read with safetensors, ``.pt``/``.pth``
with ``torch.load(weights_only=True)``, which refuses any pickle that would construct
arbitrary objects or run code, and a TorchScript archive named as the weights of an architecture SegXAI builds
by :mod:`SegXAILib.models.archive`, which reads its tensors without running its code (an eager copy of the
network: equal output, and the layer methods apply). A card whose architecture is ``torchscript`` is opened with
``torch.jit.load``, which runs the archive's code: only for a user who trusts it (:mod:`SegXAILib.models.trust`).
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import SegXAIError
from . import trust
from .archive import is_torchscript_archive, read_archive_state_dict
from .card import ModelCard
from .networks import ARCHITECTURES, build_network


@dataclass
class LoadedModel:
    """A ready-to-run network and its card.

    Attributes:
        card: the model card (classes, preprocessing, patch size).
        network: the module in eval mode; maps (N, C_in, D, H, W) to logits (N, n_classes, D, H, W).
        route: how it was loaded: "card", "torchscript" or "bundle".
        pipeline: the model's own framework pipeline when it has one (a MONAI bundle's transforms:
            :class:`~SegXAILib.models.bundle_pipeline.BundlePipeline`), which then segments instead of SegXAI's
            preprocessing (:func:`SegXAILib.inference.segment`).
        members: the network of ensemble member t (its weights already read: an nnU-Net model's folds), or None:
            members are built from the card's weights files (:meth:`member`).
    """

    card: ModelCard
    network: nn.Module
    route: str
    pipeline: Any = None
    members: Callable[[int], nn.Module] | None = None

    def member(self, t: int) -> nn.Module:
        """Ensemble member ``t``'s network (the t-th of the card's weights), in eval mode on the CPU."""
        return (self.members(t) if self.members else load_from_card(self.card, t).network).eval()

    @property
    def supports_hooks(self) -> bool:
        """Explanations that hook into layers (Grad-CAM, ProtoSeg, ...) need an eager module."""
        return not isinstance(self.network, torch.jit.ScriptModule)

    def to(self, device: torch.device | str) -> LoadedModel:
        self.network.to(device)
        return self


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a weights file without running code. Raises SegXAIError for pickles and corrupt files."""
    if not path.is_file():
        raise SegXAIError(f"weights file not found: {path}; check the model card's 'weights' entry")
    if is_torchscript_archive(path):  # its tensors, not its code
        return read_archive_state_dict(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise SegXAIError(f"weights file {path} is corrupt ({exc}); re-export it") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        detail = next((ln for ln in reversed(lines) if not ln.startswith("Check the documentation")), "")
        raise SegXAIError(
            f"refusing to load {path}: it is a pickle that would construct objects or run code, or not a "
            f"weights file at all ({detail[:120]}); save plain weights with "
            "safetensors.torch.save_file(model.state_dict(), ...) or torch.save(model.state_dict(), ...)") from None
    except Exception as exc:  # noqa: BLE001 - the restricted unpickler fails on junk bytes in many ways
        # (RuntimeError, EOFError, IndexError, KeyError, struct.error, ...): each means "not a weights file".
        reason = f"{type(exc).__name__}: {str(exc)[:120]}"
        raise SegXAIError(f"weights file {path} is corrupt or not a torch file ({reason}); re-export it") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SegXAIError(f"weights file {path} does not hold a state dict of tensors")
    return state


def load_weights(network: nn.Module, path: Path, architecture: str) -> nn.Module:
    """Load a state dict into ``network``, naming the mismatch when it does not fit."""
    state = read_state_dict(path)
    own = network.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = [k for k in set(own) & set(state) if own[k].shape != state[k].shape]
    if missing or unexpected or wrong_shape:
        detail = "; ".join(part for part in (
            f"missing {len(missing)} (e.g. {missing[0]})" if missing else "",
            f"unexpected {len(unexpected)} (e.g. {unexpected[0]})" if unexpected else "",
            f"shape mismatch in {len(wrong_shape)} (e.g. {sorted(wrong_shape)[0]}: file "
            f"{tuple(state[sorted(wrong_shape)[0]].shape)} vs model {tuple(own[sorted(wrong_shape)[0]].shape)})"
            if wrong_shape else "") if part)
        raise SegXAIError(f"weights file {path} does not match architecture {architecture!r}: {detail}; "
                          "use the weights trained for this card or fix the card's architecture arguments")
    network.load_state_dict(state)
    return network


def load_from_card(card: ModelCard, weights_index: int = 0, trust_model_code: bool = False) -> LoadedModel:
    """Build the card's network and load its weights (``weights_index`` picks an ensemble member).

    ``trust_model_code``: a card whose architecture is ``torchscript`` is opened (its code runs) only with it, or
    when its file was trusted earlier in this process (:func:`SegXAILib.models.trust.grant`).
    """
    paths = card.weight_paths
    if not paths:
        raise SegXAIError(f"model card {card.name!r} names no weights file; add a 'weights' entry")
    path = paths[weights_index]
    if card.architecture.get("name") == "torchscript":
        return LoadedModel(card, load_torchscript(path, trust_model_code), "torchscript")
    network = build_network(card.architecture, card.input_channels, card.n_classes)
    load_weights(network, path, card.architecture.get("name", "?"))
    return LoadedModel(card, network.eval(), "card")


def check_torchscript_trust(path: Path, trust_model_code: bool = False) -> None:
    """Refuse (one line naming ``--trust-model-code``) to open the TorchScript file ``path`` unless trusted."""
    builds = ", ".join(sorted(ARCHITECTURES))
    trust.require(trust_model_code, "the TorchScript model", path,
                  "torch.jit.load runs code stored in the archive (a module's __setstate__ can write any file)",
                  f"or, if its network is one SegXAI builds ({builds}), name that architecture in the model card "
                  "and keep this file as its weights: its tensors are then read without running its code")


def load_torchscript(path: Path, trust_model_code: bool = False) -> nn.Module:
    """``torch.jit.load`` of a TorchScript file, which runs code stored in it: only with ``trust_model_code`` (or a
    file trusted earlier in this process); before anything of it is read but its table of contents.

    Raises:
        SegXAIError: the file is missing or no TorchScript archive, or it is not trusted (the message says why
            and names ``--trust-model-code``).
    """
    if not path.is_file():
        raise SegXAIError(f"TorchScript file not found: {path}; check the model card's 'weights' entry")
    if not is_torchscript_archive(path):
        raise SegXAIError(f"{path} is not a valid TorchScript file (not a zip archive with TorchScript code); "
                          "export the model again with torch.jit.save")
    check_torchscript_trust(path, trust_model_code)
    try:
        return torch.jit.load(str(path), map_location="cpu").eval()
    except RuntimeError as exc:
        raise SegXAIError(f"{path} is not a valid TorchScript file ({str(exc).splitlines()[0][:120]})") from None
