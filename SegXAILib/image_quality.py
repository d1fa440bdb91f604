"""Acquisition quality of a scan, and the cases of a cohort whose acquisition stands out.

A model's confidence is no guard against a scan unlike the others: a blurred or re-contrasted brain
MRI can be segmented confidently and wrongly (docs/auditing.md). Three label-free
measures of the scan itself, in the spirit of MRIQC's image-quality metrics, describe its acquisition:

=================  =================================================================================
score              what it measures
=================  =================================================================================
``noise``          thermal noise: the robust standard deviation of each voxel's difference from the
                   mean of its 6 face neighbours (a white-noise residual; smooth anatomy cancels),
                   inside the foreground, divided by the foreground's median intensity: 1 / SNR.
``fwhm_mm``        smoothness: the full width at half maximum (mm) of the Gaussian whose correlation
                   between neighbouring voxels equals the image's (AFNI 3dFWHMx's first-difference
                   estimate, averaged over the axes), inside the foreground. Blur raises it; noise
                   lowers it.
``dark_ratio``     contrast: the foreground's 10th percentile over its median, both counted from the
                   no-signal level (0 for MRI, the minimum for CT). Another scanner's contrast curve
                   (e.g. a gamma) moves the dark tissue relative to the rest.
=================  =================================================================================

None of them says a scan is bad: each depends on the scanner, the protocol and the anatomy. What they
do say is when one scan differs from the rest of its cohort (:func:`cohort_outliers`): a robust
("modified") z-score of each score against the cohort's median and median absolute deviation
(Iglewicz and Hoaglin), beyond :data:`OUTLIER_Z` on either side. This needs a cohort (at least
:data:`MIN_COHORT` cases) in which most scans share a protocol.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage

__all__ = ["IMAGE_SCORES", "MIN_COHORT", "OUTLIER_Z", "cohort_outliers", "image_quality"]

IMAGE_SCORES = {
    "noise": "noise (1/SNR)",
    "fwhm_mm": "smoothness (FWHM, mm)",
    "dark_ratio": "dark-tissue contrast (10th percentile / median)",
}
"""The scores of :func:`image_quality` and how the review reasons name them."""

OUTLIER_Z = 3.5
"""Modified z-score beyond which a case's score is an outlier of its cohort (Iglewicz and Hoaglin's
recommendation for the median/MAD z-score)."""

MIN_COHORT = 8
"""Fewer cases with a score: no outliers are called (a median and MAD of a handful of cases mean little)."""

_MAD_TO_SD = 0.6745  # the MAD of a normal distribution, in standard deviations
_MEAN_AD_TO_SD = 0.7979  # the mean absolute deviation of a normal distribution, in standard deviations
_FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
_SAMPLE_VOXELS = 4_000_000  # larger scans are measured on every n-th voxel along each axis (about this many)


def image_quality(array: np.ndarray, spacing: Sequence[float]) -> dict[str, float]:
    """The scores of the module's table for one scan.

    Args:
        array: the scan, shape (K, J, I), any dtype.
        spacing: mm per voxel along (I, J, K) (``Volume.spacing``).

    Returns:
        ``{"noise", "fwhm_mm", "dark_ratio"}``; NaN where undefined (no foreground, a constant foreground).
    """
    from .preprocessing import foreground_mask, no_signal_level

    step = max(1, round((array.size / _SAMPLE_VOXELS) ** (1 / 3)))
    x = np.asarray(array[::step, ::step, ::step], dtype=np.float64)
    mm = np.asarray(spacing, dtype=np.float64)[::-1] * step  # per (K, J, I) axis
    foreground = foreground_mask(x)
    # voxels whose 6 neighbours are foreground too (none on the grid's faces): no edge of the head counts,
    # and the np.roll neighbours below never wrap around for them
    inner = ndimage.binary_erosion(foreground, ndimage.generate_binary_structure(3, 1), border_value=0)
    nan = {name: math.nan for name in IMAGE_SCORES}
    if inner.sum() < 27:
        return nan
    zero = no_signal_level(x)
    dark, median = np.percentile(x[foreground] - zero, [10, 50])
    if not median > 0:
        return nan

    neighbours = sum(np.roll(x, shift, axis) for axis in range(3) for shift in (1, -1)) / 6
    residual = (x - neighbours)[inner]
    # for white noise of std s, the residual's std is s * sqrt(1 + 1/6)
    noise = 1.4826 * np.median(np.abs(residual - np.median(residual))) / math.sqrt(7 / 6)

    variance = x[inner].var()
    widths = []
    for axis in range(3 if variance > 0 else 0):
        differences = np.diff(x, axis=axis)[np.take(inner, range(x.shape[axis] - 1), axis=axis)]
        correlation = 1.0 - differences.var() / (2.0 * variance)
        if 0.0 < correlation < 1.0:
            widths.append(_FWHM_PER_SIGMA * mm[axis] / math.sqrt(-4.0 * math.log(correlation)))
    return {"noise": float(noise / median), "fwhm_mm": float(np.mean(widths)) if widths else math.nan,
            "dark_ratio": float(dark / median)}


def cohort_outliers(scores: Sequence[Mapping[str, float]]) -> list[list[str]]:
    """Per case, the reasons its image scores stand out from the cohort's (empty when they do not).

    Args:
        scores: one mapping per case holding the scores of :func:`image_quality` (missing or NaN
            scores are left out of the cohort and never called outliers).

    Returns:
        One list per case, in order: a sentence per outlying score, naming the value, the cohort's
        median and the modified z-score.
    """
    reasons: list[list[str]] = [[] for _ in scores]
    for name, label in IMAGE_SCORES.items():
        values = np.array([float(s.get(name, math.nan)) for s in scores])
        known = np.isfinite(values)
        if known.sum() < MIN_COHORT:
            continue
        median = float(np.median(values[known]))
        deviation = np.abs(values - median)
        mad = float(np.median(deviation[known]))
        # a MAD of 0 (most cases identical): Iglewicz and Hoaglin's mean absolute deviation instead
        scale = mad / _MAD_TO_SD if mad > 0 else float(np.mean(deviation[known])) / _MEAN_AD_TO_SD
        if not scale > 0:
            continue
        for case, value in enumerate(values):
            z = (value - median) / scale
            if known[case] and abs(z) > OUTLIER_Z:
                reasons[case].append(f"the scan's {label} is {value:.3g}, unlike the rest of the cohort "
                                     f"(median {median:.3g}, modified z {z:+.1f}): check how it was acquired")
    return reasons
