"""Postprocessing of model-grid probabilities, named by a card's ``postprocessing`` entry.

``{"brain_margin_mm": M}``: a brain-lesion model's foreground is kept only inside the scan's brain
(estimated by :func:`~SegXAILib.data.brain_mask.estimate_brain_mask`) grown by ``M`` mm. A model
trained on heads whose field of view ends at the skull base meets necks, faces and bright vessels
in other scanners' heads, and finds "lesions" there; a lesion of the brain never lies outside it.
The margin covers the cortex the conservative mask leaves out.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from .errors import SegXAIError
from .volume import Volume

POSTPROCESSING_KEYS = ("brain_margin_mm",)


def validate_postprocessing(spec: dict[str, Any], label_values: Sequence[int]) -> None:
    """Raise :class:`SegXAIError` naming the problem if ``spec`` is not a valid postprocessing entry."""
    unknown = set(spec) - set(POSTPROCESSING_KEYS)
    if unknown:
        raise SegXAIError(f"unknown postprocessing {sorted(unknown)}; use any of {POSTPROCESSING_KEYS}")
    if "brain_margin_mm" in spec:
        margin = spec["brain_margin_mm"]
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not margin >= 0:
            raise SegXAIError(f"postprocessing brain_margin_mm must be a number of mm >= 0, got {margin!r}")
        if 0 not in label_values:
            raise SegXAIError("postprocessing brain_margin_mm needs a background class (label 0)")


def postprocess(probabilities: np.ndarray, model_grid: Volume, spec: dict[str, Any],
                label_values: Sequence[int]) -> np.ndarray:
    """Apply ``spec`` to softmax ``probabilities`` (n_classes, K, J, I) on ``model_grid``; in place, returned."""
    if "brain_margin_mm" in spec:
        restrict_to_brain(probabilities, model_grid, float(spec["brain_margin_mm"]), list(label_values).index(0))
    return probabilities


def restrict_to_brain(probabilities: np.ndarray, model_grid: Volume, margin_mm: float,
                      background: int) -> np.ndarray:
    """Give channel ``background`` all the probability outside the brain grown by ``margin_mm``.

    Args:
        probabilities: softmax, shape (n_classes, K, J, I) on ``model_grid``; changed in place.
        model_grid: the preprocessed scan whose brain is estimated.
        margin_mm: how far outside the estimated brain foreground is still allowed.
        background: index of the background channel.

    Returns:
        ``probabilities``, still summing to 1 at every voxel.
    """
    from .data.brain_mask import estimate_brain_mask

    brain = estimate_brain_mask(model_grid)
    outside = ndimage.distance_transform_edt(~brain, sampling=model_grid.spacing[::-1]) > margin_mm
    probabilities[:, outside] = 0.0
    probabilities[background, outside] = 1.0
    return probabilities
