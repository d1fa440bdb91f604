"""From a scan to the model's grid and back: checks, orientation, spacing and intensity.

The model grid keeps full physical geometry (it is a :class:`~SegXAILib.volume.Volume`),
so going back to the scan's grid is one physical resampling, :func:`resample_to_grid`,
whatever orientation flips or spacing changes happened on the way in.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import SimpleITK as sitk
from scipy.optimize import linear_sum_assignment

from .bias_field import correct_bias_field
from .errors import SegXAIError
from .volume import Volume

_INTERPOLATORS = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor, "bspline": sitk.sitkBSpline}


def validate_scan(scan: Volume, name: str = "scan") -> None:
    """Refuse what no model can segment: not 3D, a single slice, NaN/inf voxels, a constant volume."""
    array = scan.array
    if array.ndim != 3:
        kind = {2: "2D", 4: "4D (a time series or multi-channel)"}.get(array.ndim, f"{array.ndim}D")
        raise SegXAIError(f"{name} is {kind} with shape {array.shape}; SegXAI needs a 3D volume: "
                          "give a 3D scan (for 4D data, extract one volume first)")
    if min(array.shape) < 2:
        raise SegXAIError(f"{name} has shape {array.shape}, a single slice (2D); give a 3D volume with "
                          "several slices")
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise SegXAIError(f"{name} has voxel type {array.dtype}; give a real-valued scalar image")
    if np.issubdtype(array.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(array)))
        if bad:
            raise SegXAIError(f"{name} contains {bad} NaN or infinite voxels; fix the scan (replace them "
                              "with a valid intensity) before running SegXAI")
    lo, hi = array.min(), array.max()
    if lo == hi:
        raise SegXAIError(f"{name} is empty: every voxel has the value {lo}; check that the right file was given")


# ------------------------------------------------------------------ geometry
def input_scans(scans: Volume | Sequence[Volume], names: Sequence[str], model: str) -> tuple[list[Volume], list[int]]:
    """The scans a model with ``len(names)`` input sequences takes, in its order; the others resampled (linearly)
    onto the first scan's grid where they lie on another.

    Returns:
        The scans, and the indices of those resampled.

    Raises:
        SegXAIError: a wrong number of scans (naming the sequences in order), or a scan that does not overlap the
            first one in space (not co-registered).
    """
    scans = [scans] if isinstance(scans, Volume) else list(scans)
    check_scan_count(len(scans), names, model)
    first, resampled = scans[0], []
    for n, scan in enumerate(scans[1:], start=1):
        if scan.same_grid(first, atol=1e-3):
            continue
        if not _overlaps(scan, first):
            raise SegXAIError(f"the {names[n]} scan does not overlap the {names[0]} scan in space; the scans must be "
                              "co-registered (register them first, e.g. in 3D Slicer)")
        scans[n] = resample_to_grid(scan, first)
        resampled.append(n)
    return scans, resampled


def check_scan_count(given: int, names: Sequence[str], model: str) -> None:
    """One line naming the sequences in order when ``given`` scans are not one per sequence of ``model``."""
    if given != len(names):
        raise SegXAIError(f"model {model!r} takes {len(names)} scan(s), in this order: {', '.join(names)}; "
                          f"{given} given; give one co-registered scan per sequence")


def _overlaps(volume: Volume, reference: Volume) -> bool:
    """Whether the RAS bounding boxes of the two grids intersect."""
    def box(v: Volume) -> tuple[np.ndarray, np.ndarray]:
        corners = np.array([[i, j, k, 1.0] for i in (0, v.shape[2] - 1) for j in (0, v.shape[1] - 1)
                            for k in (0, v.shape[0] - 1)])
        points = (v.ijk_to_ras @ corners.T)[:3]
        return points.min(1), points.max(1)
    (low_a, high_a), (low_b, high_b) = box(volume), box(reference)
    return bool(np.all(low_a <= high_b) and np.all(low_b <= high_a))


def reorient_to_ras(volume: Volume) -> Volume:
    """Permute and flip index axes (exactly, no interpolation) so I, J, K point to R, A, S.

    Oblique scans keep their residual rotation: only the closest axis-aligned orientation is
    reached, as Slicer's and MONAI's ``Orientation`` do.
    """
    direction = volume.direction
    # world axis w is taken by the index axis n that is best aligned with it
    _, index_for_world = linear_sum_assignment(-np.abs(direction))
    signs = np.sign(direction[np.arange(3), index_for_world])
    if np.array_equal(index_for_world, [0, 1, 2]) and np.all(signs > 0):
        return volume
    image = sitk.PermuteAxes(volume.to_sitk(), [int(n) for n in index_for_world])
    image = sitk.Flip(image, [bool(s < 0) for s in signs], flipAboutOrigin=False)
    return Volume.from_sitk(image)


def resample_to_spacing(volume: Volume, spacing: Any, interpolation: str = "linear",
                        antialias: bool = True) -> Volume:
    """Resample to ``spacing`` (mm along I, J, K) over the same physical extent, as float32.

    When a spacing grows, the image is first smoothed with a Gaussian whose FWHM makes up the
    difference (sigma = sqrt(new^2 - old^2) / 2.355), so that thin-slice scans do not alias.
    """
    spacing = np.asarray(spacing, dtype=np.float64)
    if np.allclose(spacing, volume.spacing, rtol=1e-6, atol=0):
        return volume.with_array(volume.array.astype(np.float32, copy=False))
    size = np.maximum(1, np.round(np.array(volume.shape[::-1]) * volume.spacing / spacing)).astype(int)
    # keep the outer corner of the field of view where it was
    origin = volume.origin + volume.direction @ ((spacing - volume.spacing) / 2)
    image = sitk.Cast(volume.to_sitk(), sitk.sitkFloat32)
    if antialias and interpolation != "nearest":
        sigma = np.sqrt(np.maximum(spacing**2 - volume.spacing**2, 0)) / 2.355
        if np.any(sigma > 0):
            image = sitk.SmoothingRecursiveGaussian(image, [float(max(s, 1e-3)) for s in sigma])
    target = Volume(np.zeros((1, 1, 1)), spacing, origin, volume.direction)
    return _resample(image, target, size, interpolation, sitk.sitkFloat32)


def resample_to_grid(volume: Volume, reference: Volume, interpolation: str = "linear",
                     default: float = 0.0, dtype: int | None = None) -> Volume:
    """Resample ``volume`` onto ``reference``'s grid (shape, spacing, origin, direction).

    The one function that brings model-grid results back onto the scan's grid. Points outside
    ``volume`` get ``default``. Output type: float32 (``dtype``: a SimpleITK pixel type) .
    """
    if volume.same_grid(reference, atol=1e-9):
        return volume
    size = np.array(reference.shape[::-1])
    image = volume.to_sitk()
    if interpolation != "nearest" and image.GetPixelID() != sitk.sitkFloat32:
        image = sitk.Cast(image, sitk.sitkFloat32)
    return _resample(image, reference, size, interpolation, dtype if dtype is not None else image.GetPixelID(),
                     default)


def _resample(image: sitk.Image, target: Volume, size: np.ndarray, interpolation: str, pixel_type: int,
              default: float = 0.0) -> Volume:
    # a 1-voxel image carries the target geometry through Volume's single LPS/RAS conversion
    probe = Volume(np.zeros((1, 1, 1), np.uint8), target.spacing, target.origin, target.direction).to_sitk()
    out = sitk.Resample(image, [int(s) for s in size], sitk.Transform(), _INTERPOLATORS[interpolation],
                        probe.GetOrigin(), probe.GetSpacing(), probe.GetDirection(), float(default), pixel_type)
    return Volume.from_sitk(out)


# ----------------------------------------------------------------- intensity
def foreground_mask(array: np.ndarray) -> np.ndarray:
    """Voxels above Otsu's threshold (computed on a subsample for speed): the body or head."""
    from skimage.filters import threshold_otsu

    step = max(1, int(round((array.size / 2_000_000) ** (1 / 3))))
    threshold = threshold_otsu(array[::step, ::step, ::step].astype(np.float32).ravel())
    return array > threshold


def no_signal_level(array: np.ndarray) -> float:
    """The intensity of no signal: 0 for a magnitude image, its minimum for a shifted one (e.g. z-scored)."""
    return min(0.0, float(array.min()))


def normalise_intensity(array: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    """Intensity normalisation named by a card's ``preprocessing.intensity`` entry; float32 out."""
    kind = spec.get("kind", "zscore_foreground")
    x = array.astype(np.float32, copy=True)
    if kind == "zscore_foreground":
        values = x[foreground_mask(x)]
        std = float(values.std())
        x -= float(values.mean())
        x /= std if std > 0 else 1.0
    elif kind == "percentile":
        lo, hi = np.percentile(x, [spec.get("lower", 0.5), spec.get("upper", 99.5)])
        x -= lo
        x /= (hi - lo) if hi > lo else 1.0
        if spec.get("clip", False):
            np.clip(x, 0, 1, out=x)
    elif kind == "ct_window":
        low, high = spec["window"]
        x -= low
        x /= high - low
        if spec.get("clip", True):
            np.clip(x, 0, 1, out=x)
    else:
        raise SegXAIError(f"unknown intensity normalisation {kind!r}")
    return x


BRAIN_SCALE_LIMITS = (0.25, 4.0)
"""Brain-size factors outside this range (a brain below 1/64 or above 64x the reference volume)
mean the mask estimate failed or the scan is not a brain, not that the brain is unusual."""


def brain_scaled_spacing(brain: BrainMask, spacing: Any, brain_volume_ml: float) -> np.ndarray:
    """The target ``spacing`` (mm, I, J, K) scaled so that the scan's brain spans as many voxels
    as a brain of ``brain_volume_ml`` does at ``spacing``.

    Models trained on adult human heads see a brain of one size; a child's, a shrunken or an
    animal's brain would reach them as an anatomy they never saw. Resampling at
    ``spacing * (V / brain_volume_ml) ** (1/3)``, with V the volume of ``brain`` on its own grid,
    gives every brain the training size on the model grid (an isotropic scale, the part of atlas
    registration that matters here).
    """
    volume_ml = brain.volume_ml()
    factor = (volume_ml / brain_volume_ml) ** (1.0 / 3.0)
    low, high = BRAIN_SCALE_LIMITS
    if not low <= factor <= high:
        raise SegXAIError(f"the brain found in the scan measures {volume_ml:.0f} mL, far from the "
                          f"{brain_volume_ml:.0f} mL this model expects; give a T1 MRI of a whole head or "
                          "brain, or a model card without 'brain_volume_ml'")
    return np.asarray(spacing, dtype=np.float64) * factor


class BrainMask:
    """The brain of one scan, estimated at most once and brought onto any grid of the scan.

    Several steps of a case need the brain (the brain-size spacing on the scan's grid, the card's
    postprocessing and the uncertainty comparison on the model grid); each estimate may run an atlas
    registration, so the mask is estimated once, on ``source``, the first time it is asked for, and
    resampled onto other grids (linear interpolation of the mask, kept where it reaches 0.5).

    Args:
        source: the scan as the estimator should see it (RAS, bias-corrected when the card says so).
    """

    def __init__(self, source: Volume):
        self.source = source
        self._estimated: np.ndarray | None = None

    def on(self, grid: Volume) -> np.ndarray:
        """Bool (K, J, I) on ``grid`` (a grid of the same scan): True inside the brain."""
        if self._estimated is None:
            from .data.brain_mask import estimate_brain_mask

            self._estimated = estimate_brain_mask(self.source)
        if grid.same_grid(self.source, atol=1e-9):
            return self._estimated
        mask = self.source.with_array(self._estimated.astype(np.float32))
        return resample_to_grid(mask, grid).array >= 0.5

    def volume_ml(self) -> float:
        """The brain's volume in mL."""
        from .data.brain_mask import mask_volume_ml

        return mask_volume_ml(self.on(self.source), self.source.spacing)


# -------------------------------------------------------------------- memory
def segmentation_bytes(voxels: float, n_classes: int) -> float:
    """Bytes a segmentation run holds at its peak on a model grid of ``voxels`` voxels and ``n_classes`` classes:
    ``4 * voxels * (3 * n_classes + 4)``.

    Everything is float32 (4 bytes): three arrays of ``n_classes`` channels (MONAI's stitched logits, their
    softmax, the probabilities returned) and four copies of the grid itself (the resampled scan, its normalised
    copy, the padded network input, MONAI's window-count map). Explanations need more; this is the floor below
    which no run can succeed.
    """
    return 4.0 * voxels * (3 * n_classes + 4)


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation now (psutil, else the OS's free pages), or None if unknown."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover - psutil comes with dask[distributed]
        try:
            return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            return None


def _bytes_text(count: float) -> str:
    for unit, size in (("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if count >= size:
            return f"{count / size:,.{0 if count >= 10 * size else 1}f} {unit}"
    return f"{count:,.0f} bytes"


def check_model_grid_memory(volume: Volume, spacing: Any, n_classes: int = 2,
                            patch_size: Sequence[int] | None = None, available: int | None = None) -> None:
    """Refuse, before anything is allocated, a model grid whose segmentation would not fit in memory.

    The grid is the one :func:`resample_to_spacing` would make: ``volume``'s physical extent at ``spacing`` (mm
    along I, J, K), at least ``patch_size`` (K, J, I) along each axis, since the sliding window pads a smaller
    grid to one window. Its cost is :func:`segmentation_bytes`; ``available`` defaults to
    :func:`available_memory`.

    Raises:
        SegXAIError: the estimate exceeds the available memory; the message gives both and the fix.
    """
    spacing = np.asarray(spacing, dtype=np.float64)
    extent = np.array(volume.shape[::-1], dtype=np.float64) * volume.spacing  # mm along I, J, K
    size = np.maximum(1.0, np.round(extent / spacing))
    if patch_size is not None:
        size = np.maximum(size, np.asarray(patch_size, dtype=np.float64)[::-1])
    need = segmentation_bytes(float(np.prod(size)), n_classes)
    available = available_memory() if available is None else available
    if available is not None and need > available:
        grid = "x".join(f"{s:.0f}" for s in size)
        raise SegXAIError(
            f"the model grid would be {grid} voxels (I x J x K; about {_bytes_text(need)} to segment, "
            f"{_bytes_text(available)} of memory available): the spacing {_mm(spacing)} mm is too fine for this "
            f"scan of {_mm(extent)} mm; use a coarser spacing in the model card or crop the scan")


def _mm(values: np.ndarray) -> str:
    return " x ".join(f"{v:.4g}" for v in values)


BIAS_FIELD_METHODS = ("n4",)
"""Values of a card's ``preprocessing.bias_field``: ``n4`` (see :mod:`SegXAILib.bias_field`)."""

MODEL_GRIDS = ("deepbet",)
"""Kinds of a card's ``preprocessing.grid``: a model's own way from the scan (in RAS) to the array its network
takes, in place of ``spacing`` and ``intensity``, for a model whose grid no spacing describes. ``deepbet``: the
brain's box, found by deepbet's box network at 128^3, cut out of the scan and resized to 256^3
(:mod:`SegXAILib.models.deepbet`, which also says what the grid's geometry is)."""

_GRID_EXCLUDES = ("spacing", "intensity", "brain_volume_ml", "bias_field")


def validate_model_grid(spec: dict[str, Any]) -> None:
    """Check a ``preprocessing`` entry that has a ``grid`` (see :data:`MODEL_GRIDS`).

    Raises:
        SegXAIError: an unknown kind, invalid settings of that kind, or keys the grid replaces.
    """
    grid = spec["grid"]
    kind = grid.get("kind") if isinstance(grid, dict) else None
    if kind not in MODEL_GRIDS:
        raise SegXAIError(f"preprocessing.grid must be an object whose kind is one of {MODEL_GRIDS}, got {grid!r}")
    clash = [key for key in _GRID_EXCLUDES if key in spec]
    if clash or spec.get("orientation", "RAS") != "RAS":
        raise SegXAIError(f"preprocessing.grid {kind!r} takes the scan in RAS and sets the grid and the intensities "
                          f"itself; remove {clash or ['orientation']} from preprocessing")
    from .models import deepbet

    deepbet.validate_grid(grid)


def _model_grid(volume: Volume, grid: dict[str, Any]) -> Volume:
    from .models import deepbet

    return deepbet.deepbet_grid(volume, grid)


def preprocess(scan: Volume, preprocessing: dict[str, Any], n_classes: int = 2,
               patch_size: Sequence[int] | None = None) -> Volume:
    """Scan -> model grid: :func:`preprocess_with_brain` without the brain."""
    return preprocess_with_brain(scan, preprocessing, n_classes, patch_size)[0]


def preprocess_with_brain(scan: Volume, preprocessing: dict[str, Any], n_classes: int = 2,
                          patch_size: Sequence[int] | None = None) -> tuple[Volume, BrainMask]:
    """Scan -> model grid: RAS orientation, bias-field correction (when ``bias_field`` is ``n4``),
    target spacing (``None``: keep; scaled to the brain's size when ``brain_volume_ml`` is given),
    intensity normalisation; or, when the card has a ``grid`` (:data:`MODEL_GRIDS`), RAS orientation and that.

    Before any of it is computed, the model grid is checked against the memory a segmentation of ``n_classes``
    classes in windows of ``patch_size`` would need (:func:`check_model_grid_memory`; the defaults give the
    smallest run): a spacing far too fine for the scan fails at once with the estimate, not in an allocation.

    Returns:
        The model grid, and the scan's :class:`BrainMask` (estimated only when a step asks for it; the
        later steps of the case reuse it).
    """
    validate_scan(scan)
    volume = reorient_to_ras(scan) if preprocessing.get("orientation", "RAS") == "RAS" else scan
    if "grid" in preprocessing:  # a model's own grid: a fixed size, its own intensities
        return _model_grid(volume, preprocessing["grid"]), BrainMask(volume)
    spacing = preprocessing.get("spacing")
    scaled = spacing is not None and preprocessing.get("brain_volume_ml") is not None
    # the coarsest spacing the brain's size can give first: it fails before the N4 and brain estimates
    check_model_grid_memory(volume, volume.spacing if spacing is None else
                            np.asarray(spacing, dtype=np.float64) * (BRAIN_SCALE_LIMITS[1] if scaled else 1.0),
                            n_classes, patch_size)
    if preprocessing.get("bias_field") == "n4":
        volume = correct_bias_field(volume)  # before the brain estimate, which thresholds intensities
    brain = BrainMask(volume)
    if spacing is not None:
        if scaled:
            spacing = brain_scaled_spacing(brain, spacing, float(preprocessing["brain_volume_ml"]))
            check_model_grid_memory(volume, spacing, n_classes, patch_size)
        volume = resample_to_spacing(volume, spacing)
    return volume.with_array(normalise_intensity(volume.array, preprocessing.get("intensity", {}))), brain
