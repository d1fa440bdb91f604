"""Postprocessing of model-grid probabilities, named by a card's ``postprocessing`` entry.

``{"brain_margin_mm": M}``: a brain-lesion model's foreground is kept only inside the scan's brain
(the case's :class:`~SegXAILib.preprocessing.BrainMask`, estimated once per scan) grown by ``M`` mm. A model
trained on heads whose field of view ends at the skull base meets necks, faces and bright vessels
in other scanners' heads, and finds "lesions" there; a lesion of the brain never lies outside it.
The margin covers the cortex the conservative mask leaves out.

``{"min_fraction_in_brain": F}``: each connected piece of the foreground (the model grid's argmax,
26-connected) is kept only if at least the fraction ``F`` of its voxels lies inside that brain. A
lesion of the brain lies in the brain; what the margin lets through at the brain's surface, the
dura, sinuses and sulcal fluid of another scanner's head, lies mostly outside it.

``{"largest_component": true}``: only the largest 26-connected piece of the foreground stays;
``{"fill_holes": true}``: background enclosed by the foreground (6-connected holes) becomes the most probable
foreground class there. Together, in that order, deepbet's postprocessing of its brain mask
(:mod:`SegXAILib.models.deepbet`); neither needs the brain estimate.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from .errors import SegXAIError
from .preprocessing import BrainMask
from .volume import Volume

_VALID_VALUES = {
    "brain_margin_mm": (lambda v: v >= 0, "a number of mm >= 0"),
    "min_fraction_in_brain": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "largest_component": (None, "true or false"),
    "fill_holes": (None, "true or false"),
}
"""Each key of a card's ``postprocessing``: which numbers it takes, and how the error message says so."""

POSTPROCESSING_KEYS = tuple(_VALID_VALUES)


def validate_postprocessing(spec: dict[str, Any], label_values: Sequence[int]) -> None:
    """Raise :class:`SegXAIError` naming the problem if ``spec`` is not a valid postprocessing entry."""
    unknown = set(spec) - set(POSTPROCESSING_KEYS)
    if unknown:
        raise SegXAIError(f"unknown postprocessing {sorted(unknown)}; use any of {POSTPROCESSING_KEYS}")
    for key, value in spec.items():
        valid, expected = _VALID_VALUES[key]
        if valid is None:  # a switch
            if not isinstance(value, bool):
                raise SegXAIError(f"postprocessing {key} must be {expected}, got {value!r}")
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not valid(value):
            raise SegXAIError(f"postprocessing {key} must be {expected}, got {value!r}")
    if spec and 0 not in label_values:
        raise SegXAIError(f"postprocessing {sorted(spec)[0]} needs a background class (label 0)")


def postprocess(probabilities: np.ndarray, model_grid: Volume, spec: dict[str, Any],
                label_values: Sequence[int], brain_mask: BrainMask) -> np.ndarray:
    """Apply ``spec`` to softmax ``probabilities`` (n_classes, K, J, I) on ``model_grid``; in place, returned.

    ``brain_mask``: the scan's brain, brought onto ``model_grid`` when a rule needs it.
    """
    if not spec:
        return probabilities
    background = list(label_values).index(0)
    if "brain_margin_mm" in spec or "min_fraction_in_brain" in spec:
        brain = brain_mask.on(model_grid)
        if "brain_margin_mm" in spec:
            restrict_to_brain(probabilities, brain, model_grid.spacing, float(spec["brain_margin_mm"]), background)
        if "min_fraction_in_brain" in spec:
            drop_pieces_outside_brain(probabilities, brain, float(spec["min_fraction_in_brain"]), background)
    if spec.get("largest_component"):
        keep_largest_piece(probabilities, background)
    if spec.get("fill_holes"):
        fill_holes(probabilities, background)
    return probabilities


def _set_background(probabilities: np.ndarray, where: np.ndarray, background: int) -> None:
    probabilities[:, where] = 0.0
    probabilities[background, where] = 1.0


def restrict_to_brain(probabilities: np.ndarray, brain: np.ndarray, spacing: Sequence[float], margin_mm: float,
                      background: int) -> np.ndarray:
    """Give channel ``background`` all the probability outside the brain grown by ``margin_mm``.

    Args:
        probabilities: softmax, shape (n_classes, K, J, I); changed in place.
        brain: bool (K, J, I), the brain on the same grid.
        spacing: the grid's spacing in mm, (I, J, K) order.
        margin_mm: how far outside the brain foreground is still allowed.
        background: index of the background channel.

    Returns:
        ``probabilities``, still summing to 1 at every voxel.
    """
    outside = ndimage.distance_transform_edt(~brain, sampling=tuple(spacing)[::-1]) > margin_mm
    _set_background(probabilities, outside, background)
    return probabilities


def drop_pieces_outside_brain(probabilities: np.ndarray, brain: np.ndarray, min_fraction: float,
                              background: int) -> np.ndarray:
    """Give channel ``background`` all the probability of each foreground piece that lies less than
    ``min_fraction`` inside ``brain``.

    Pieces are the 26-connected components of the voxels whose argmax is not ``background``. Every
    voxel around a dropped piece already has background as its argmax, so interpolating the edited
    probabilities onto the scan's grid (a convex combination) cannot bring the piece back.

    Args:
        probabilities: softmax, shape (n_classes, K, J, I); changed in place.
        brain: bool (K, J, I), the brain on the same grid.
        min_fraction: the share of a piece's voxels that must lie in the brain for it to stay.
        background: index of the background channel.

    Returns:
        ``probabilities``, still summing to 1 at every voxel.
    """
    pieces, n = ndimage.label(probabilities.argmax(0) != background, structure=np.ones((3, 3, 3)))
    if n:
        in_brain = ndimage.mean(brain, pieces, np.arange(1, n + 1))
        dropped = np.concatenate([[False], in_brain < min_fraction])
        _set_background(probabilities, dropped[pieces], background)
    return probabilities


def keep_largest_piece(probabilities: np.ndarray, background: int) -> np.ndarray:
    """Give channel ``background`` all the probability of every foreground piece but the largest (26-connected
    components of the voxels whose argmax is not ``background``); in place, returned."""
    pieces, n = ndimage.label(probabilities.argmax(0) != background, structure=np.ones((3, 3, 3)))
    if n > 1:
        largest = np.bincount(pieces.ravel())[1:].argmax() + 1
        _set_background(probabilities, (pieces != largest) & (pieces > 0), background)
    return probabilities


def fill_holes(probabilities: np.ndarray, background: int) -> np.ndarray:
    """Give the background voxels that the foreground encloses (not 6-connected to the grid's border through
    background) to their most probable foreground class, with probability 1; in place, returned."""
    foreground = probabilities.argmax(0) != background
    holes = ndimage.binary_fill_holes(foreground) & ~foreground
    if holes.any():
        others = [c for c in range(probabilities.shape[0]) if c != background]
        best = np.asarray(others)[probabilities[others][:, holes].argmax(0)]
        probabilities[:, holes] = 0.0
        probabilities[(best, *np.nonzero(holes))] = 1.0
    return probabilities
