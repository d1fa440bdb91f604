"""The one interface every explanation method implements.

An explainer receives an :class:`ExplainContext` (the model, the preprocessed scan on the
model grid, the target class and the model's own probabilities, computed once) and returns an
:class:`Explanation`: named float32 maps on the *model grid*, case-level scalars, curves and
metadata. Resampling to the scan's grid, display normalisation and file writing happen once,
outside the explainers (:mod:`SegXAILib.explain.pipeline`), so adding a method means adding
one class and registering it in :data:`SegXAILib.explain.registry.EXPLAINERS`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from ..errors import SegXAIError
from ..models.loaders import LoadedModel
from ..progress import Progress


class NotApplicable(SegXAIError):
    """The method cannot run on this model (e.g. attention maps of a network without gates).

    The pipeline records the message in the summary instead of failing the run.
    """


@dataclass
class ExplanationMap:
    """One map on the model grid.

    Attributes:
        method: the method's registry name, e.g. ``gradcam``.
        variant: distinguishes several maps of one method (``layer-decoder2``, ``entropy``), or ``None``.
        array: float32, shape (D, H, W) on the model grid.
        description: what the value means, in words a clinician reads (shown in the report and Slicer).
        colormap: ``inferno`` (saliency), ``viridis`` (uncertainty) or a matplotlib name.
        threshold: default lower display threshold, as a fraction of the displayed range.
        normalise: ``True``: the pipeline min-max scales the map to [0, 1] for display files;
            ``False``: the values have units (entropy, probability) and are written as they are.
    """

    method: str
    array: np.ndarray
    variant: str | None = None
    description: str = ""
    colormap: str = "inferno"
    threshold: float = 0.2
    normalise: bool = True

    @property
    def name(self) -> str:
        """File-name stem ``<method>[-<variant>]``."""
        return self.method if self.variant is None else f"{self.method}-{self.variant}"


@dataclass
class Explanation:
    """What one explainer returns for one target."""

    method: str
    maps: list[ExplanationMap] = field(default_factory=list)
    scalars: dict[str, float] = field(default_factory=dict)
    curves: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class ExplainContext:
    """The inputs shared by every explainer of one run.

    Attributes:
        model: the loaded model (its network in eval mode on ``device``).
        image: preprocessed scan, shape (1, C, D, H, W), float32, on the CPU.
        target: the target's display name (class or group, e.g. ``whole tumour``).
        channels: output channels that make up the target.
        probabilities: the model's softmax, shape (n_classes, D, H, W), numpy, model grid.
        device: where networks run.
        progress: progress and cancel flag.
        label: ground-truth mask of the target on the model grid (bool (D, H, W)), or ``None``.
        options: method options from the command line (``{"gradcam": {"layer": ...}}``).
    """

    model: LoadedModel
    image: torch.Tensor
    target: str
    channels: list[int]
    probabilities: np.ndarray
    device: torch.device = torch.device("cpu")
    progress: Progress = field(default_factory=Progress)
    label: np.ndarray | None = None
    options: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def predicted_mask(self) -> np.ndarray:
        """The model's mask of the target: argmax falls in one of the target's channels, (D, H, W) bool."""
        return np.isin(self.probabilities.argmax(0), self.channels)

    @property
    def target_probability(self) -> np.ndarray:
        """Summed probability of the target's channels, (D, H, W) float32."""
        return self.probabilities[self.channels].sum(0).astype(np.float32)

    def method_options(self, method: str) -> dict[str, Any]:
        return dict(self.options.get(method, {}))


def int_option(options: dict[str, Any], key: str, default: int, minimum: int) -> int:
    """``options[key]`` as an integer >= ``minimum`` (given as a number or as text on the command line)."""
    value = options.get(key, default)
    try:
        number = int(str(value))
    except ValueError:
        number = minimum - 1
    if number < minimum:
        raise SegXAIError(f"option {key!r} must be an integer >= {minimum}, got {value!r}")
    return number


class Explainer(ABC):
    """Base class: subclasses set ``name`` and implement :meth:`explain`.

    ``needs_hooks`` methods cannot run on TorchScript models; :meth:`check_applicable` says so
    (and subclasses may add reasons, e.g. "no attention gates").
    """

    name: ClassVar[str]
    needs_hooks: ClassVar[bool] = True
    summary: ClassVar[str] = ""
    """One line of help (the command line and the Slicer panel show it)."""

    def check_applicable(self, model: LoadedModel) -> None:
        """Raise :class:`NotApplicable` with the reason if this method cannot run on ``model``."""
        if self.needs_hooks and not model.supports_hooks:
            raise NotApplicable(f"{self.name} needs access to the network's layers; a TorchScript model "
                                "only gives its output (load the model from a card with weights instead)")

    @abstractmethod
    def explain(self, context: ExplainContext) -> Explanation:
        """Compute the maps for ``context.target``; maps on the model grid."""
