"""Explain one segmentation: run each explainer on the model grid and keep what did not apply.

The case around it (reading, segmenting, judging, writing) lives in :mod:`SegXAILib.case`; this
module knows only explainers, so it imports no scores, verdicts or output writers.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..inference import SegmentationResult
from ..models.channel_view import binary_view
from ..models.loaders import LoadedModel
from ..postprocessing import postprocess
from ..preprocessing import resample_to_grid
from ..progress import Progress
from ..volume import Volume
from .base import ExplainContext, Explainer, Explanation, NotApplicable


@dataclass
class ExplainResult:
    """A segmentation, the explanations of one target, and the methods that did not apply."""

    segmentation: SegmentationResult
    target: str
    channels: list[int]
    label_values: list[int]
    explanations: list[Explanation] = field(default_factory=list)
    not_applicable: dict[str, str] = field(default_factory=dict)

    def target_on_scan(self) -> np.ndarray:
        """Bool (K, J, I): the target's voxels on the scan's grid (its class's mask for a multi-label model, whose
        label map may hold other values, else the voxels of its labels)."""
        if self.segmentation.masks:
            return self.segmentation.masks[self.channels[0]].array > 0
        return np.isin(self.segmentation.labels.array, self.label_values)


def target_mask_on_grid(label: Volume, grid: Volume, model: LoadedModel, channels: list[int]) -> np.ndarray:
    """Ground truth of the target (label values of ``channels``) on the model grid, bool (D, H, W)."""
    values = [model.card.classes[c].label for c in channels]
    on_grid = resample_to_grid(label, grid, interpolation="nearest").array
    return np.isin(on_grid, values)


def explain_segmentation(segmentation: SegmentationResult, model: LoadedModel, explainers: Sequence[Explainer],
                         target: str | None, device: torch.device, progress: Progress | None = None,
                         label: Volume | None = None,
                         options: dict[str, Any] | None = None) -> ExplainResult:
    """Explain ``target`` of ``segmentation`` with each method (maps stay on the model grid).

    Args:
        segmentation: :func:`SegXAILib.inference.segment`'s result for ``model``.
        explainers: the methods to run (:func:`SegXAILib.methods.get_explainer` makes one by name).
        target: class or group name; ``None``: the card's default target.
        label: ground truth on the scan's grid, or ``None``.
        options: per-method options, raw (``{"gradcam": {"layer": ...}}``) or parsed.
    """
    progress = progress or Progress()
    target_name, channels = model.card.target_channels(target)
    run = ExplainResult(segmentation, target_name, channels, [model.card.classes[c].label for c in channels])
    probabilities, explained = segmentation.probabilities, model
    if model.card.multilabel:  # one channel, as the two-class model every method explains (models/channel_view.py)
        explained, channels = binary_view(model, channels[0]), [1]
        probabilities = np.stack([1 - segmentation.probabilities[run.channels[0]],
                                  segmentation.probabilities[run.channels[0]]])
        label = None  # a multi-label model's truth is not one label map of its classes
    context = ExplainContext(
        model=explained, image=torch.from_numpy(np.ascontiguousarray(segmentation.network_input))[None],
        target=target_name, channels=channels, probabilities=probabilities, device=device,
        progress=progress, options=options or {},
        spacing=tuple(float(s) for s in segmentation.model_grid.spacing[::-1]),  # (I, J, K) -> the array's (D, H, W)
        postprocess=lambda p: postprocess(p, segmentation.model_grid, explained.card.postprocessing,
                                          [c.label for c in explained.card.classes], segmentation.brain),
        label=None if label is None else target_mask_on_grid(label, segmentation.model_grid, model, channels))
    for explainer in explainers:
        try:
            explainer.check_applicable(explained)
            start = time.perf_counter()
            explanation = explainer.explain(context)
            explanation.metadata.setdefault("seconds", round(time.perf_counter() - start, 3))
            run.explanations.append(explanation)
        except NotApplicable as reason:
            run.not_applicable[explainer.name] = str(reason)
    model.network.to("cpu")
    return run
