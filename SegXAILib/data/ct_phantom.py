"""A synthetic abdominal CT in Hounsfield units, with a liver-like organ and a lesion in it.

Test data for CT paths (HU windowing, int16 voxels, anisotropic slices) that needs no download.
Every structure is sized relative to the field of view, so any shape and spacing give the same
anatomy; the lesion is a sphere in mm.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ..volume import Volume

HU = {
    "air": -1000.0,
    "lung": -850.0,
    "fat": -100.0,
    "soft_tissue": 40.0,
    "organ": 60.0,
    "bone": 700.0,
}
"""Mean HU of each tissue; the lesion draws its own from :data:`LESION_HU`."""

LESION_HU = (20.0, 30.0)
"""Range of the lesion's mean HU: hypodense against the organ's 60."""

NOISE_HU = 10.0
"""Standard deviation of the Gaussian image noise."""

LABEL_ORGAN = 1
LABEL_LESION = 2


def ct_phantom(shape: tuple[int, int, int] = (64, 128, 128), spacing: tuple[float, float, float] = (0.8, 0.8, 2.5),
               seed: int = 0) -> tuple[Volume, Volume]:
    """Build the phantom.

    Args:
        shape: (K, J, I) voxels.
        spacing: mm along (I, J, K), as in :class:`Volume`.
        seed: seed of the jitter of organ size and position, the lesion and the noise.

    Returns:
        (image, label): int16 HU and uint8 labels (1 organ, 2 lesion), shape (K, J, I), on one
        grid centred on RAS (0, 0, 0) with identity direction (I to the right, J anterior, K superior).
    """
    rng = np.random.default_rng(seed)
    spacing_kji = np.asarray(spacing, dtype=np.float64)[::-1]
    origin = -(np.asarray(shape[::-1]) - 1) / 2 * np.asarray(spacing, dtype=np.float64)
    z, y, x = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing_kji)], indexing="ij")
    half = (np.asarray(shape) - 1) / 2 * spacing_kji  # half the field of view along k, j, i, in mm
    width, depth, height = half[2], half[1], half[0]

    # body: an elliptic cylinder, with a fat layer under the skin
    body_a, body_b = 0.85 * width, 0.65 * depth
    body = _ellipse(x, y, body_a, body_b) <= 1
    inner = _ellipse(x, y, body_a - 0.12 * body_b, 0.88 * body_b) <= 1
    hu = np.full(shape, HU["air"])
    hu[body] = HU["fat"]
    hu[inner] = HU["soft_tissue"]

    # lungs: the upper part of the field, either side of the midline, posterior
    lung_center_z = height * rng.uniform(0.8, 1.0)
    for side in (-1, 1):
        lung = _ellipsoid(x - side * 0.4 * body_a, y + 0.1 * body_b, z - lung_center_z,
                          0.3 * body_a, 0.55 * body_b, 0.6 * height)
        hu[(lung <= 1) & inner] = HU["lung"]

    # liver-like organ: right, anterior, below the right lung's base
    organ_center = np.array([0.35 * body_a, -0.1 * body_b, 0.2 * height]) * rng.uniform(0.9, 1.1, size=3)
    organ_radii = np.array([0.4 * body_a, 0.55 * body_b, 0.45 * height]) * rng.uniform(0.9, 1.1, size=3)
    organ_distance = _ellipsoid(x - organ_center[0], y - organ_center[1], z - organ_center[2], *organ_radii)
    organ = (organ_distance <= 1) & inner
    hu[organ] = HU["organ"]

    # spine: a vertebral column behind the organs, the full height of the field
    spine = _ellipse(x, y + 0.7 * body_b, 0.12 * body_b, 0.12 * body_b) <= 1
    hu[spine] = HU["bone"]

    # lesion: a sphere wholly inside the organ (its centre deep enough in normalised units)
    radius = rng.uniform(0.3, 0.45) * organ_radii.min()
    margin = 1 - radius / organ_radii.min()
    direction = rng.normal(size=3)
    offset = direction / np.linalg.norm(direction) * rng.uniform(0, 0.5 * margin) * organ_radii
    center = organ_center + offset
    lesion = (((x - center[0]) ** 2 + (y - center[1]) ** 2 + (z - center[2]) ** 2) <= radius**2) & organ
    hu[lesion] = rng.uniform(*LESION_HU)

    # partial volume at tissue edges (a voxel averages ~ 0.3 voxel std), then quantum noise
    hu = ndimage.gaussian_filter(hu, sigma=0.3) + rng.normal(0, NOISE_HU, size=shape)
    image = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)

    label = np.zeros(shape, dtype=np.uint8)
    label[organ] = LABEL_ORGAN
    label[lesion] = LABEL_LESION
    return (Volume(image, spacing, origin, np.eye(3)), Volume(label, spacing, origin, np.eye(3)))


def _ellipse(x: np.ndarray, y: np.ndarray, a: float, b: float) -> np.ndarray:
    """Normalised squared radius: <= 1 inside the ellipse of semi-axes a, b."""
    return (x / a) ** 2 + (y / b) ** 2


def _ellipsoid(x: np.ndarray, y: np.ndarray, z: np.ndarray, a: float, b: float, c: float) -> np.ndarray:
    """Normalised squared radius: <= 1 inside the ellipsoid of semi-axes a, b, c."""
    return (x / a) ** 2 + (y / b) ** 2 + (z / c) ** 2
