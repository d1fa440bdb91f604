"""A conservative brain mask for any T1 MRI, with or without skull.

Used to place synthetic lesions inside the brain, so the mask errs on the inside: missing a
rim of cortex is harmless, including scalp is not. Works in physical units (mm) on any
spacing and orientation, and on any intensity scale.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu

from ..errors import SegXAIError
from ..volume import Volume

OPENING_RADIUS_MM = 6.0
"""Opening ball radius: cuts the thin links (meninges, vessels, optic nerves) from brain to scalp."""

CLOSING_RADIUS_MM = 3.0
"""Closing ball radius: fills sulci and small notches left by the threshold."""

_THRESHOLD_FRACTION = 0.2
"""Where the tissue threshold sits between the head/background and the dark/bright Otsu levels.

Slightly above the head threshold: CSF and dura, which link brain and scalp, fall below it.
Tuned on Colin27 with skull: Dice 0.966 with ch2bet; 0.04 % of the mask lies > 3 mm outside it."""

_WORK_SPACING_MM = 2.0
"""Finer grids are block-averaged to about this spacing first: a mask needs no more, and it is ~8x faster."""

SCALP_GAP_MM = 5.0
SCALP_FRACTION = 0.05
"""A scan is a head with scalp (not a skull-stripped brain) when its head voxels more than SCALP_GAP_MM outside
the mask add up to more than SCALP_FRACTION of the mask's volume: 0.2-0.8 in heads (0.2 where the mask has
taken the neck and face as well), below 0.005 in skull-stripped brains (Colin27, MNI152, a macaque)."""

ATLAS_MARGIN_MM = 8.0
"""In a head with scalp the mask keeps only what lies within this distance of the registered atlas brain
(:mod:`.atlas_brain`): registration places a brain to a few mm, a neck or a face lies farther."""


def estimate_brain_mask(t1: Volume) -> np.ndarray:
    """Estimate the brain of a T1-weighted volume.

    Steps, on a grid of about 2 mm: smooth (sigma 1 mm); threshold a little above the Otsu level
    that separates the head from the background (two Otsu levels, see :data:`_THRESHOLD_FRACTION`);
    open with a ball of :data:`OPENING_RADIUS_MM`, keeping only the largest piece, to cut the
    brain from the scalp; close and fill holes. In a head with scalp (:data:`SCALP_FRACTION`), keep only what
    lies within :data:`ATLAS_MARGIN_MM` of Colin27's brain registered onto the scan (:mod:`.atlas_brain`): a
    brain joined thickly to a neck or a face survives the opening with them. Balls are in mm (distance
    transforms with the voxel spacing), so any spacing and orientation give the same physical mask.

    Args:
        t1: a T1 volume, shape (K, J, I), any dtype, spacing, orientation.

    Returns:
        bool array, shape (K, J, I): True inside the brain.
    """
    factors = np.maximum(1, np.floor(_WORK_SPACING_MM / t1.spacing[::-1] + 1e-6)).astype(int)  # (K, J, I)
    image = _block_mean(t1.array.astype(np.float32), factors)
    spacing = t1.spacing[::-1] * factors  # mm per (K, J, I) index of the working grid

    image = ndimage.gaussian_filter(image, sigma=1.0 / spacing)
    if not image.max() > image.min():
        raise SegXAIError("the T1 volume is uniform (one intensity everywhere); give a real T1 MRI scan")
    head_level = threshold_otsu(image)
    bright_level = threshold_otsu(image[image > head_level])
    tissue = image > head_level + _THRESHOLD_FRACTION * (bright_level - head_level)

    core = _largest_component(_distance(tissue, spacing) > OPENING_RADIUS_MM)
    if core.any():
        brain = (_distance(core, spacing, outside=True) <= OPENING_RADIUS_MM) & tissue
    else:  # nothing as thick as the ball (a tiny volume): opening would erase it all
        brain = _largest_component(tissue)
    dilated = _distance(brain, spacing, outside=True) <= CLOSING_RADIUS_MM
    closed = _distance(dilated, spacing) > CLOSING_RADIUS_MM
    mask = ndimage.binary_fill_holes(closed | brain)
    scalp = (image > head_level) & (_distance(mask, spacing, outside=True) > SCALP_GAP_MM)
    if np.count_nonzero(scalp) > SCALP_FRACTION * np.count_nonzero(mask):
        mask = _within_atlas_brain(t1, mask, factors, spacing)
    return _upsample(mask, factors, t1.shape)


def _within_atlas_brain(t1: Volume, mask: np.ndarray, factors: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """The part of a head's ``mask`` (working grid) within :data:`ATLAS_MARGIN_MM` of the registered atlas brain,
    its largest piece with holes filled; ``mask`` itself without the atlas (mricron-data missing) or where the
    registration failed (less than half of the atlas brain kept)."""
    from .atlas_brain import atlas_brain

    atlas = atlas_brain(t1)
    if atlas is None:
        return mask
    atlas = _block_mean(atlas.astype(np.float32), factors) > 0.5
    near = _distance(atlas, spacing, outside=True) <= ATLAS_MARGIN_MM
    kept = ndimage.binary_fill_holes(_largest_component(mask & near))
    return kept if np.count_nonzero(kept) >= 0.5 * np.count_nonzero(atlas) else mask


def mask_volume_ml(mask: np.ndarray, spacing: np.ndarray) -> float:
    """Volume of a (K, J, I) brain mask in mL, ``spacing`` in mm per voxel (any axis order)."""
    return float(np.count_nonzero(mask) * np.prod(spacing) / 1000.0)


def _distance(mask: np.ndarray, spacing: np.ndarray, outside: bool = False) -> np.ndarray:
    """Distance in mm from each True voxel to the nearest False one (``outside``: False to True)."""
    return ndimage.distance_transform_edt(~mask if outside else mask, sampling=spacing)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 6-connected component of ``mask`` (all False if it is empty)."""
    labels, count = ndimage.label(mask)
    if count <= 1:
        return labels > 0
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == sizes.argmax()


def _block_mean(array: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """Average non-overlapping blocks of ``factors`` voxels (edge voxels padded by replication)."""
    if np.all(factors == 1):
        return array
    pad = [(0, (-n) % f) for n, f in zip(array.shape, factors)]
    array = np.pad(array, pad, mode="edge")
    k, j, i = (n // f for n, f in zip(array.shape, factors))
    return array.reshape(k, factors[0], j, factors[1], i, factors[2]).mean(axis=(1, 3, 5))


def _upsample(mask: np.ndarray, factors: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Nearest-neighbour inverse of :func:`_block_mean`, cropped to ``shape``."""
    for axis, f in enumerate(factors):
        mask = np.repeat(mask, f, axis=axis)
    return mask[: shape[0], : shape[1], : shape[2]]
