"""The one interface every explanation method implements.

An explainer receives an :class:`ExplainContext` (the model, the preprocessed scan on the
model grid, the target class and the model's own probabilities, computed once) and returns an
:class:`Explanation`: named float32 maps on the *model grid*, case-level scalars, curves and
metadata. Resampling to the scan's grid, display normalisation and file writing happen once,
outside the explainers (:mod:`SegXAILib.explain.pipeline`), so adding a method means adding
one class (with its ``Options``) and registering it in :data:`SegXAILib.methods.EXPLAINERS`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from ..errors import SegXAIError
from ..models.loaders import LoadedModel
from ..progress import Progress
from .options import MethodOptions


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
        layer: the module name(s) of the network layer(s) a map shows (``model.1.submodule.2``), for experts;
            the description names the layer in words (:func:`.layers.layer_names`). ``None`` for other maps.
    """

    method: str
    array: np.ndarray
    variant: str | None = None
    description: str = ""
    colormap: str = "inferno"
    threshold: float = 0.2
    normalise: bool = True
    layer: str | None = None

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


# ------------------------------------------------------------------ context
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
        options: method name -> its options, raw (``{"gradcam": {"layer": "bottleneck"}}``, from the command line
            or a program) or parsed (:func:`SegXAILib.methods.check_options`); read with
            :meth:`options_for`.
        spacing: the model grid's voxel size in mm along (D, H, W), to name layers by their grid
            (``3 mm grid``); ``None`` when unknown (then named by their downsampling).
        postprocess: the card's postprocessing of a whole-grid softmax (n_classes, D, H, W), in place and
            returned (the rules :func:`SegXAILib.inference.segment` applied to ``probabilities``), for methods
            that compare the model's prediction of a changed scan with its prediction; ``None``: none.
    """

    model: LoadedModel
    image: torch.Tensor
    target: str
    channels: list[int]
    probabilities: np.ndarray
    device: torch.device = torch.device("cpu")
    progress: Progress = field(default_factory=Progress)
    label: np.ndarray | None = None
    options: Mapping[str, MethodOptions | Mapping[str, Any]] = field(default_factory=dict)
    spacing: tuple[float, ...] | None = None
    postprocess: Callable[[np.ndarray], np.ndarray] | None = None

    @property
    def predicted_mask(self) -> np.ndarray:
        """The model's mask of the target: argmax falls in one of the target's channels, (D, H, W) bool."""
        return np.isin(self.probabilities.argmax(0), self.channels)

    @property
    def target_probability(self) -> np.ndarray:
        """Summed probability of the target's channels, (D, H, W) float32."""
        return self.probabilities[self.channels].sum(0).astype(np.float32)

    def options_for(self, explainer: Explainer) -> MethodOptions:
        """The explainer's options (an instance of its ``Options``): ``options[explainer.name]`` parsed when it
        is a raw ``{name: value}`` dict, as given when already parsed, the defaults when absent.

        Raises:
            SegXAIError: an unknown option name or a bad value.
        """
        return explainer.Options.of(self.options.get(explainer.name, {}), explainer.name)


class Explainer(ABC):
    """Base class: subclasses set ``name`` and ``Options`` and implement :meth:`explain`.

    ``Options`` is the method's :class:`MethodOptions` subclass (an empty one when
    it takes no options); :meth:`ExplainContext.options_for` returns an instance of it.

    ``needs_hooks`` methods cannot run on TorchScript models; :meth:`check_applicable` says so
    (and subclasses may add reasons, e.g. "no attention gates").
    """

    name: ClassVar[str]
    Options: ClassVar[type[MethodOptions]]
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
