"""Colin27's brain carried onto a human T1 head by an affine registration.

Thresholds and openings (:mod:`.brain_mask`) cut a brain from its scalp where the skull between them
is dark and thin. They cannot cut it from a neck and face that it joins thickly: in pydeface's mean
head (an average of many heads, so a blurred skull) they give a "brain" of 2500 mL that holds the
neck and the face. There, the brain of an atlas head placed onto the scan says where the brain can
be. The atlas is Colin27 with skull (``ch2.nii.gz``) and its brain the skull-stripped ``ch2bet.nii.gz``,
both from Debian's ``mricron-data``; the registration is affine (12 parameters: heads differ in size
and shape), by Mattes mutual information on both heads smoothed and resampled to 4 mm, which is
enough to place a brain to a few mm and takes a few seconds.
"""

from __future__ import annotations

import functools

import numpy as np
import SimpleITK as sitk

from ..errors import SegXAIError
from ..volume import Volume
from .samples import colin27_brain, colin27_t1

REGISTRATION_SPACING_MM = 4.0
"""Both heads are smoothed and resampled to this spacing before registration."""


@functools.lru_cache(maxsize=1)
def _atlas() -> tuple[sitk.Image, sitk.Image] | None:
    """Colin27 with skull at the registration spacing, and its brain (uint8, full resolution); None without
    mricron-data."""
    try:
        head, brain = colin27_t1(), colin27_brain()
    except SegXAIError:
        return None
    mask = Volume((brain.array > 0).astype(np.uint8), brain.spacing, brain.origin, brain.direction)
    return _coarse(head.to_sitk()), mask.to_sitk()


def _coarse(image: sitk.Image) -> sitk.Image:
    """``image`` as float32, smoothed (sigma half the spacing) and resampled to :data:`REGISTRATION_SPACING_MM`."""
    image = sitk.SmoothingRecursiveGaussian(sitk.Cast(image, sitk.sitkFloat32), REGISTRATION_SPACING_MM / 2)
    size = [max(1, int(round(n * s / REGISTRATION_SPACING_MM))) for n, s in zip(image.GetSize(), image.GetSpacing())]
    return sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(),
                         [REGISTRATION_SPACING_MM] * 3, image.GetDirection())


def atlas_brain(t1: Volume) -> np.ndarray | None:
    """Colin27's brain on the grid of ``t1``, a human T1 head with skull: bool (K, J, I).

    Colin27 (moving) is registered to ``t1`` (fixed), its centres of mass aligned first; the brain mask
    follows by nearest-neighbour resampling. One thread, all voxels of the coarse grids: the same scan
    always gives the same mask. None when mricron-data is not installed.
    """
    atlas = _atlas()
    if atlas is None:
        return None
    atlas_head, atlas_mask = atlas
    scan = t1.to_sitk()
    fixed = _coarse(scan)
    initial = sitk.CenteredTransformInitializer(fixed, atlas_head, sitk.AffineTransform(3),
                                                sitk.CenteredTransformInitializerFilter.MOMENTS)
    registration = sitk.ImageRegistrationMethod()
    registration.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    registration.SetMetricSamplingStrategy(registration.NONE)
    registration.SetInterpolator(sitk.sitkLinear)
    registration.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-3, numberOfIterations=200,
                                                          relaxationFactor=0.7)
    registration.SetOptimizerScalesFromPhysicalShift()
    registration.SetShrinkFactorsPerLevel([2, 1])
    registration.SetSmoothingSigmasPerLevel([1, 0])
    registration.SetInitialTransform(initial, inPlace=False)
    registration.SetNumberOfThreads(1)
    transform = registration.Execute(fixed, atlas_head)
    warped = sitk.Resample(atlas_mask, scan, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return sitk.GetArrayFromImage(warped) > 0
