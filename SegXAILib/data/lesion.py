"""Synthetic brain tumours on any T1 MRI host: training and test cases with exact labels.

A lesion is a randomly oriented ellipsoid whose surfaces are bent by smooth low-frequency noise:
a necrotic core, an enhancing rim around it, and peritumoral edema around both (the classic
ring-enhancing glioblastoma). Sizes are in mm and shrink to fit small brains; the whole lesion
lies inside the host's brain mask. Intensities are set relative to the host's own tissue
(see :data:`INTENSITY_FACTORS`), with smooth texture, part of the host's fine texture, and
partial-volume edges. Everything is drawn from one seed: the same seed gives the same case.

The geometry is computed in index space with the physical voxel size per axis (the direction
matrix is a rotation, so spacing alone gives distances in mm), hence any spacing and
orientation work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.special import ndtr

from ..errors import SegXAIError
from ..preprocessing import no_signal_level
from ..volume import Volume, write_volume
from .brain_mask import estimate_brain_mask, mask_volume_ml

LABEL_NCR = 1
"""Necrotic / non-enhancing tumour core (BraTS label 1)."""
LABEL_ED = 2
"""Peritumoral edema (BraTS label 2)."""
LABEL_ET = 4
"""Enhancing tumour: the bright rim around the necrotic core (BraTS label 4)."""
BRATS_LABELS = (LABEL_NCR, LABEL_ED, LABEL_ET)
"""Lesion labels, BraTS convention; 0 is background. Whole tumour = {1, 2, 4}, tumour core = {1, 4}."""

INTENSITY_FACTORS = {
    LABEL_NCR: (0.35, 0.50),  # fluid-like, as dark as CSF
    LABEL_ED: (0.75, 0.85),  # water-logged tissue: mildly hypointense to the tissue it infiltrates
    LABEL_ET: (1.15, 1.35),  # contrast-enhanced: brighter than white matter
}
"""Per label, the range of (mean intensity / reference level) a case draws from.

The reference is the host's white-matter level, except for edema: edema is tissue holding extra
water, so it darkens whatever it infiltrates, and its reference is the host's local tissue level
(see :data:`_EDEMA_TISSUE_SIGMA_MM`), at most white matter. Edema painted relative to white matter
alone would be as bright as grey matter and invisible in it. Intensities are counted from the
host's no-signal level (see :class:`HostLevels`), 0 for MRI."""

CORE_RADIUS_MM = (8.0, 20.0)
"""Range of the tumour core's (necrosis + rim) mean radius."""
EDEMA_MARGIN_MM = (3.0, 15.0)
"""Range of how far the edema extends beyond the tumour core."""
RIM_THICKNESS_MM = (2.0, 4.0)
"""Range of the enhancing rim's thickness."""
ADULT_BRAIN_ML = 1500.0
"""The lengths above are for a brain (its estimated mask) of at least this volume. In a smaller
brain (a child's, an atrophied or an animal's) every length is scaled by
``(volume / ADULT_BRAIN_ML) ** (1/3)``, so that a tumour takes the share of the brain it takes in
an adult: a 40 mm core would fill half of a macaque's brain. The sample hosts' masks measure
1600-1800 mL, so their lesions keep the lengths above."""

_AXIS_RATIO = (0.75, 1.25)  # ellipsoid semi-axes, relative to the core radius
_SURFACE_AMPLITUDE = (0.08, 0.18)  # relative radial displacement per unit of noise
_NOISE_CLIP = 2.0  # noise in standard deviations: bounds how far a surface can be pushed out
_TEXTURE_AMPLITUDE = {LABEL_NCR: 0.08, LABEL_ED: 0.05, LABEL_ET: 0.08}  # relative std of the texture
_EDEMA_TISSUE_SIGMA_MM = 3.0  # smoothing of the host inside the brain: the local tissue level under edema
_HOST_DETAIL_SIGMA_MM = 1.5  # the host's fine texture: its ratio to a local mean over this scale
_HOST_DETAIL_KEPT = 0.5  # exponent on the host's fine-texture ratio: keep half of its contrast
_WM_PERCENTILE = 85.0  # of intensities in the brain: white matter, the brightest large tissue
_DARK_PERCENTILE = 1.0  # of intensities in the brain: the darkest CSF
_MIN_VOXELS = 1.5  # thinnest rim and smallest necrosis radius, in voxels, so every label shows
_MIN_FRACTION = 1e-3  # smaller partial-volume fractions are dropped: the lesion ends somewhere


@dataclass
class LesionCase:
    """One synthetic case.

    Attributes:
        image: the host T1 with the lesion, same grid as the host.
        label: uint8 labels {0, 1, 2, 4} (see :data:`BRATS_LABELS`), same grid.
        center_ras: RAS position of the lesion centre in mm, shape (3,).
        radii_mm: semi-axes of the tumour core's ellipsoid in mm, shape (3,).
        seed: the seed that reproduces this case.
        params: every number drawn or estimated (intensity factors, host levels, sizes, scale).
    """

    image: Volume
    label: Volume
    center_ras: np.ndarray
    radii_mm: np.ndarray
    seed: int
    params: dict = field(default_factory=dict)


@dataclass(frozen=True)
class HostLevels:
    """Reference intensities of a T1 host.

    Attributes:
        wm: white matter, the brightest large tissue: a high percentile inside the brain.
        dark: the darkest CSF: a low percentile inside the brain.
        zero: no signal: 0 for magnitude MRI, the minimum for a shifted (e.g. z-scored) image.
    """

    wm: float
    dark: float
    zero: float

    def level(self, factor: float) -> float:
        """The intensity ``factor`` times the white matter's, counted from :attr:`zero`."""
        return self.zero + factor * (self.wm - self.zero)


def host_levels(host: Volume, brain_mask: np.ndarray) -> HostLevels:
    """Estimate the reference intensities of a T1 host inside its brain mask (bool, K, J, I)."""
    values = host.array[brain_mask]
    if values.size == 0:
        raise SegXAIError("the brain mask is empty; give a T1 MRI of a head or a brain mask with brain in it")
    wm, dark = np.percentile(values, [_WM_PERCENTILE, _DARK_PERCENTILE])
    levels = HostLevels(wm=float(wm), dark=float(dark), zero=no_signal_level(host.array))
    if not levels.wm > levels.zero:
        raise SegXAIError("the host has no brain signal above its background; give a T1 MRI with a visible brain")
    return levels


def synthesize_lesion(host: Volume, seed: int, brain_mask: np.ndarray | None = None,
                      brain_scale: float | None = None) -> LesionCase:
    """Put a random brain tumour into a T1 host.

    Args:
        host: T1 MRI, shape (K, J, I), any dtype, spacing and orientation; never modified.
        seed: seed of every random choice: same host and seed give the same case.
        brain_mask: bool (K, J, I), True inside the brain; estimated from ``host`` when None.
        brain_scale: factor on every length of the lesion model; ``None``: from the brain's volume
            (see :data:`ADULT_BRAIN_ML`). 1 keeps adult lengths in any brain (a training set's
            shrunken heads, where a relatively large lesion is the point).

    Returns:
        the case. ``image`` keeps a float host's dtype; an integer host's dtype only when every
        new value fits in it (e.g. a bright rim can exceed 255 in a uint8 host), else float32.
    """
    mask = estimate_brain_mask(host) if brain_mask is None else np.asarray(brain_mask, dtype=bool)
    if mask.shape != host.shape:
        raise ValueError(f"brain mask shape {mask.shape} does not match the host {host.shape}")
    rng = np.random.default_rng(seed)
    spacing = host.spacing[::-1]  # mm per (K, J, I) index step
    levels = host_levels(host, mask)
    factors = {lab: float(rng.uniform(*INTENSITY_FACTORS[lab])) for lab in BRATS_LABELS}
    shape = _LesionShape.draw(rng)

    brain_ml = mask_volume_ml(mask, spacing)
    depth, offset = _depth_mm(mask, spacing)
    if brain_scale is None:
        brain_scale = min(1.0, (brain_ml / ADULT_BRAIN_ML) ** (1 / 3))
    scale, weights = shape.fit(depth.max(), spacing, max_scale=brain_scale)
    candidates = np.flatnonzero(depth.ravel() > weights.extent_mm)
    center = offset + np.unravel_index(rng.choice(candidates), depth.shape)  # (k, j, i)

    image, label = _paint(host, mask, center, weights, factors, levels, brain_scale)
    center_ras = (host.ijk_to_ras @ np.append(center[::-1], 1.0))[:3]
    params = {
        "intensity_factors": factors, "wm_level": levels.wm, "dark_level": levels.dark, "zero_level": levels.zero,
        "brain_volume_ml": brain_ml, "scale": scale,
        "core_radius_mm": weights.core_mm, "rim_thickness_mm": weights.rim_mm,
        "edema_margin_mm": weights.edema_mm - weights.core_mm, "surface_amplitude": shape.amplitude,
        "center_ijk": center[::-1].tolist(),
    }
    return LesionCase(
        image=host.with_array(image), label=host.with_array(label), center_ras=center_ras,
        radii_mm=weights.core_mm * shape.axis_ratios, seed=seed, params=params)


def write_case(case: LesionCase, out_dir: str | Path, fmt: str = "nii.gz") -> tuple[Path, Path]:
    """Write ``image.<fmt>`` and ``label.<fmt>`` into ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    fmt = fmt.lstrip(".")
    return (write_volume(case.image, out_dir / f"image.{fmt}"),
            write_volume(case.label, out_dir / f"label.{fmt}"))


def _depth_mm(mask: np.ndarray, spacing: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distance in mm from each brain voxel to the nearest non-brain one, in the mask's bounding box.

    Returns (distances over the box, the box's first (k, j, i) index). The box is padded with
    non-brain voxels, so the grid's edge counts as non-brain too.
    """
    (box,) = ndimage.find_objects(mask.astype(np.uint8)) or [None]
    if box is None:
        raise SegXAIError("the brain mask is empty; give a T1 MRI of a head or a brain mask with brain in it")
    padded = np.pad(mask[box], 1)
    depth = ndimage.distance_transform_edt(padded, sampling=spacing)[1:-1, 1:-1, 1:-1]
    return depth, np.array([s.start for s in box])


# ------------------------------------------------------------------------ shape
@dataclass
class _Weights:
    """Partial-volume fractions of each tissue in a box centred on the lesion (the box's shape: (k, j, i))."""

    ncr: np.ndarray
    core: np.ndarray  # necrosis + rim
    lesion: np.ndarray  # necrosis + rim + edema
    texture: np.ndarray  # smooth N(0, 1) field: intensity texture inside the lesion
    extent_mm: float  # farthest voxel with any lesion fraction, from the centre voxel
    core_mm: float  # mean radius of the tumour core (necrosis + rim)
    rim_mm: float
    edema_mm: float  # mean outer radius of the edema

    def labels(self) -> np.ndarray:
        """Hard labels: the tissue with the larger fraction, i.e. the surfaces at fraction 0.5."""
        label = np.zeros(self.lesion.shape, dtype=np.uint8)
        label[self.lesion >= 0.5] = LABEL_ED
        label[self.core >= 0.5] = LABEL_ET
        label[self.ncr >= 0.5] = LABEL_NCR
        return label


@dataclass
class _LesionShape:
    """A lesion's random shape at scale 1; lengths in mm, noise lattices in units of the core radius."""

    core_radius: float
    edema_margin: float
    rim: float
    axis_ratios: np.ndarray  # (3,) semi-axes / core radius
    rotation: np.ndarray  # (3, 3) orthonormal: lesion frame to (k, j, i) mm frame
    amplitude: float
    core_noise: np.ndarray  # lattices of N(0, 1) nodes, spaced _NODE_SPACING core radii
    edema_noise: np.ndarray
    texture: np.ndarray

    _NODE_SPACING = 0.5  # core radii: a few bumps around the surface, not a rough one
    _TEXTURE_NODE_SPACING = 0.25  # core radii: blotchy texture, finer than the shape
    _NODES = 24  # per axis: the lattices span +-6 core radii, beyond the farthest edema (~ 4.5)

    @classmethod
    def draw(cls, rng: np.random.Generator) -> _LesionShape:
        q, r = np.linalg.qr(rng.normal(size=(3, 3)))
        return cls(
            core_radius=float(rng.uniform(*CORE_RADIUS_MM)),
            edema_margin=float(rng.uniform(*EDEMA_MARGIN_MM)),
            rim=float(rng.uniform(*RIM_THICKNESS_MM)),
            axis_ratios=rng.uniform(*_AXIS_RATIO, size=3),
            rotation=q * np.sign(np.diag(r)),  # sign fix: uniformly distributed rotations
            amplitude=float(rng.uniform(*_SURFACE_AMPLITUDE)),
            core_noise=rng.normal(size=(cls._NODES,) * 3),
            edema_noise=rng.normal(size=(cls._NODES,) * 3),
            texture=rng.normal(size=(2 * cls._NODES,) * 3),
        )

    def fit(self, max_depth_mm: float, spacing: np.ndarray, max_scale: float = 1.0) -> tuple[float, _Weights]:
        """Largest scale <= ``max_scale`` at which the lesion fits in a brain ``max_depth_mm`` deep; its weights."""
        # a first guess on a coarse grid: a full-size lesion on a fine grid would be a huge box
        probe = self.weights(1.0, np.full(3, max(spacing.max(), 2.0)))
        scale = float(min(max_scale, 0.95 * max_depth_mm / probe.extent_mm))
        for _ in range(8):
            weights = self.weights(scale, spacing)
            if weights.extent_mm < max_depth_mm:
                return scale, weights
            # the extent is nearly proportional to the scale; aim a little inside
            scale *= float(0.95 * max_depth_mm / weights.extent_mm)
        raise SegXAIError(
            f"the brain mask is too thin ({max_depth_mm:.1f} mm deep at most) to hold a lesion; "
            "give a brain T1 with more than a few voxels of brain, or a larger brain mask")

    def weights(self, scale: float, spacing: np.ndarray) -> _Weights:
        """Tissue fractions on the voxel grid of ``spacing`` (mm per k, j, i), centred on a voxel."""
        core = self.core_radius * scale
        min_mm = _MIN_VOXELS * spacing.max()
        rim = max(self.rim * scale, min_mm)
        ncr = max(core - rim, min_mm)
        core = ncr + rim
        edema = core + self.edema_margin * scale
        # partial volume: a voxel averages a box, whose profile is ~ Gaussian with std 0.29 voxel
        blur = 0.29 * spacing.mean()
        # farthest reach of any lesion fraction (> ndtr(-4)), in radial units: noise clipped at _NOISE_CLIP
        reach = (edema + 4 * blur) * (1 + _NOISE_CLIP * self.amplitude)
        half = np.ceil(reach * self.axis_ratios.max() / spacing).astype(int) + 1
        offsets = [np.arange(-h, h + 1) * s for h, s in zip(half, spacing)]
        xyz = np.stack(np.meshgrid(*offsets, indexing="ij"), axis=-1)  # (k, j, i, 3) mm from the centre
        u = xyz @ self.rotation / (core * self.axis_ratios)  # lesion frame, in core semi-axes
        norm = np.linalg.norm(u, axis=-1)
        radial = core * norm  # ~ mm from the centre along the lesion's radius
        near = radial < reach  # the noise is sampled only here: the box's corners are far outside
        # surfaces are bent by noise on the unit sphere (a function of direction only): each ray
        # crosses each surface once, so the lesion is one star-shaped blob, with no islands
        unit = u[near] / np.maximum(norm[near], 1e-9)[:, None]
        core_level = np.full(radial.shape, np.inf)
        edema_level = np.full(radial.shape, np.inf)
        core_level[near] = radial[near] / (1 + self.amplitude * _sample(self.core_noise, unit, self._NODE_SPACING))
        edema_level[near] = radial[near] / (1 + self.amplitude * _sample(self.edema_noise, unit, self._NODE_SPACING))
        lesion = ndtr((edema - np.minimum(edema_level, core_level)) / blur)
        inside = lesion >= _MIN_FRACTION  # the lesion's support: nothing changes outside it
        texture = np.zeros(radial.shape, dtype=np.float32)
        texture[inside] = _sample(self.texture, u[inside], self._TEXTURE_NODE_SPACING)
        return _Weights(
            ncr=np.where(inside, ndtr((ncr - core_level) / blur), 0).astype(np.float32),
            core=np.where(inside, ndtr((core - core_level) / blur), 0).astype(np.float32),
            lesion=np.where(inside, lesion, 0).astype(np.float32), texture=texture,
            extent_mm=float(np.linalg.norm(xyz[inside], axis=-1).max()), core_mm=core, rim_mm=rim, edema_mm=edema)


def _sample(lattice: np.ndarray, u: np.ndarray, node_spacing: float) -> np.ndarray:
    """Smooth noise at points ``u`` (n, 3) from a lattice of iid N(0, 1) centred on u = 0; shape (n,).

    Cubic B-spline interpolation without prefiltering smooths the lattice; the result is
    rescaled to unit std and clipped at :data:`_NOISE_CLIP`.
    """
    coords = u.T / node_spacing + (np.array(lattice.shape)[:, None] - 1) / 2
    values = ndimage.map_coordinates(lattice, coords, order=3, mode="mirror", prefilter=False)
    values = values / max(float(values.std()), 1e-6)
    return np.clip(values, -_NOISE_CLIP, _NOISE_CLIP)


# ---------------------------------------------------------------------- painting
def _paint(host: Volume, mask: np.ndarray, center: np.ndarray, weights: _Weights, factors: dict[int, float],
           levels: HostLevels, brain_scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Blend the lesion into a copy of the host; returns (image, label), shape (K, J, I).

    ``brain_scale`` scales the lengths over which the host is read (its fine texture, the tissue
    under the edema) as it scales the lesion (:data:`ADULT_BRAIN_ML`): in a small brain, 3 mm
    spans more anatomy, and edema would look flatter relative to it than in an adult."""
    half = (np.array(weights.lesion.shape) - 1) // 2
    lo, hi = center - half, center + half + 1
    box = tuple(slice(max(a, 0), min(b, n)) for a, b, n in zip(lo, hi, host.shape))  # clipped to the grid
    local = tuple(slice(s.start - a, s.stop - a) for s, a in zip(box, lo))

    inside = mask[box]
    ncr, core, lesion = (w[local] * inside for w in (weights.ncr, weights.core, weights.lesion))
    texture = weights.texture[local]
    fractions = {LABEL_NCR: ncr, LABEL_ET: core - ncr, LABEL_ED: lesion - core}

    work_dtype = host.array.dtype if np.issubdtype(host.array.dtype, np.floating) else np.float32
    region = host.array[box].astype(work_dtype)
    # the host's fine texture: its ratio to a local mean, partly kept inside the lesion
    signal = region - levels.zero
    smooth = ndimage.gaussian_filter(signal, sigma=_HOST_DETAIL_SIGMA_MM * brain_scale / host.spacing[::-1])
    detail = np.clip(signal / np.maximum(smooth, 1e-6 * (levels.wm - levels.zero)), 0.5, 1.5) ** _HOST_DETAIL_KEPT
    tissue = _local_tissue_level(signal, inside, _EDEMA_TISSUE_SIGMA_MM * brain_scale / host.spacing[::-1], levels)
    painted = (1 - lesion) * region
    for lab, fraction in fractions.items():
        level = levels.level(factors[lab])
        if lab == LABEL_NCR:
            level = max(level, levels.dark)  # necrosis is fluid: no darker than the host's CSF
        elif lab == LABEL_ED:
            level = levels.zero + factors[lab] * tissue
        texture_factor = (1 + _TEXTURE_AMPLITUDE[lab] * texture) * detail
        painted += fraction * (levels.zero + (level - levels.zero) * texture_factor)

    image = host.array.astype(work_dtype)  # a copy: the host is never modified
    image[box] = painted
    label = np.zeros(host.shape, dtype=np.uint8)
    label[box] = np.where(inside, weights.labels()[local], 0)
    return _cast_like(image, host.array.dtype), label


def _local_tissue_level(signal: np.ndarray, brain: np.ndarray, sigma: np.ndarray, levels: HostLevels) -> np.ndarray:
    """The host's tissue level around each voxel, counted from ``levels.zero``; shape of ``signal``.

    A Gaussian mean (``sigma`` in voxels per axis) over brain voxels only (the background outside
    the brain would darken it near the surface), bounded by the darkest CSF and white matter.
    """
    weight = ndimage.gaussian_filter(brain.astype(signal.dtype), sigma)
    mean = ndimage.gaussian_filter(np.where(brain, signal, 0), sigma) / np.maximum(weight, 1e-6)
    return np.clip(mean, levels.dark - levels.zero, levels.wm - levels.zero)


def _cast_like(image: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``image`` in the host's dtype: floats as they are; integers only if every rounded value fits."""
    if np.issubdtype(dtype, np.floating):
        return image.astype(dtype, copy=False)
    if np.issubdtype(dtype, np.integer):
        rounded = np.rint(image)
        info = np.iinfo(dtype)
        if rounded.min() >= info.min and rounded.max() <= info.max:
            return rounded.astype(dtype)
    return image
