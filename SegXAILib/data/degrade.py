"""Degraded copies of a scan: the acquisition problems a model meets in the clinic, by seed.

Audits and reliability scores must flag the cases a model should not be trusted on. To test that
they do, we make such cases from good ones, with common failures of MRI quality:

===========  ==================================================================================
kind         what it does (``strength`` is)
===========  ==================================================================================
``noise``    thermal noise: Rician for a magnitude image (no negative voxels), else Gaussian;
             ``strength`` = noise std / the tissue level (the foreground's 85th percentile),
             i.e. 1 / SNR. Default 0.3 (SNR about 3; clinical T1 has 20-40).
``blur``     a lower resolution: Gaussian blur of FWHM ``strength`` mm. Default 4 mm.
``bias``     an uncorrected coil bias field: multiplied by ``exp(f)``, where ``f`` is a random
             smooth field (a ramp plus a quadratic bowl across the field of view) spanning
             +-``strength``. Default 0.4 (up to 1.5x brighter on one side, 0.67x on the other).
``gamma``    another scanner's contrast: intensities, relative to the tissue level, raised to the
             power ``strength`` (values above the tissue level are pushed up for > 1, pulled down
             for < 1; no-signal stays no-signal). Default 0.5: flatter grey/white contrast.
===========  ==================================================================================

The defaults are strengths that cost our bundled lesion model Dice on the unseen-brain cases of
``benchmarks/audit_unseen.py``, which prints what each costs; the model is robust to the bias field
(its intensity normalisation absorbs a smooth field), so an audit should not flag that one.

The copy is on the scan's own grid, so the scan's label still applies; it is float32 (noise and
bias leave an integer range), and the input is never modified.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, get_args

import numpy as np

from ..errors import SegXAIError

if TYPE_CHECKING:
    from ..volume import Volume

# scipy and SimpleITK (through ..preprocessing) are imported where used: the command line reads this
# module's kinds and default strengths to build its parser, on every start

__all__ = ["DEFAULT_STRENGTH", "DEGRADATIONS", "degrade"]

Degradation = Literal["noise", "blur", "bias", "gamma"]
DEGRADATIONS: tuple[str, ...] = get_args(Degradation)
DEFAULT_STRENGTH = {"noise": 0.3, "blur": 4.0, "bias": 0.4, "gamma": 0.5}
"""Per kind, a strength that visibly harms a scan without hiding its anatomy."""

_TISSUE_PERCENTILE = 85.0  # of the foreground: bright tissue (white matter on T1)
_FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))


def degrade(scan: Volume, kind: Degradation, strength: float | None = None, seed: int = 0) -> Volume:
    """A degraded copy of ``scan`` (K, J, I) on the same grid, float32; see the module's table.

    Raises:
        SegXAIError: an unknown kind, a negative strength (or a zero gamma).
    """
    if kind not in DEGRADATIONS:
        raise SegXAIError(f"unknown degradation {kind!r}; use one of {', '.join(DEGRADATIONS)}")
    strength = DEFAULT_STRENGTH[kind] if strength is None else float(strength)
    if not (strength > 0 if kind == "gamma" else strength >= 0):
        raise SegXAIError(f"the strength of a {kind} degradation must be {'> 0' if kind == 'gamma' else '>= 0'}, "
                          f"got {strength}")
    array = scan.array.astype(np.float32)  # a copy: the scan is never modified
    rng = np.random.default_rng(seed)
    if kind == "noise":
        array = _noise(array, strength, rng)
    elif kind == "blur":
        from scipy import ndimage

        sigma_mm = strength / _FWHM_PER_SIGMA
        array = ndimage.gaussian_filter(array, sigma=sigma_mm / scan.spacing[::-1])
    elif kind == "bias":
        array = array * np.exp(_bias_field(array.shape, strength, rng))
    else:
        from ..preprocessing import no_signal_level

        zero = no_signal_level(array)
        level = _tissue_level(array) - zero
        array = zero + level * np.power(np.maximum(array - zero, 0.0) / level, strength)
    return scan.with_array(array.astype(np.float32, copy=False))


def _noise(array: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Add noise of std ``strength`` x the tissue level: Rician on magnitude images, else Gaussian."""
    std = strength * abs(_tissue_level(array))
    real = array + rng.normal(0.0, std, array.shape).astype(np.float32)
    if array.min() < 0:  # not a magnitude image (e.g. already normalised): plain Gaussian noise
        return real
    imaginary = rng.normal(0.0, std, array.shape).astype(np.float32)
    return np.sqrt(real * real + imaginary * imaginary)


def _tissue_level(array: np.ndarray) -> float:
    """Bright tissue's intensity: a high percentile of the foreground (white matter on T1)."""
    from ..preprocessing import foreground_mask

    foreground = array[foreground_mask(array)]
    if foreground.size == 0:
        raise SegXAIError("the scan has no foreground to degrade (it is constant); give a real scan")
    return float(np.percentile(foreground, _TISSUE_PERCENTILE))


def _bias_field(shape: tuple[int, ...], strength: float, rng: np.random.Generator) -> np.ndarray:
    """A smooth log-field over the grid, (K, J, I), spanning [-strength, strength]."""
    axes = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape]
    k, j, i = np.meshgrid(*axes, indexing="ij", sparse=True)
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    curvature = rng.uniform(-1.0, 1.0, size=3)
    field = direction[0] * k + direction[1] * j + direction[2] * i
    field = field + 0.5 * (curvature[0] * k * k + curvature[1] * j * j + curvature[2] * i * i)
    field = field - (field.max() + field.min()) / 2
    half_range = (field.max() - field.min()) / 2
    return (strength * field / half_range).astype(np.float32) if half_range > 0 else np.zeros(shape, np.float32)
