"""ProtoSeg segmentation-ability maps (He et al.; METHODS.md section 3).

For a feature map f (C channels) and the model's soft mask B in [0, 1], ProtoSeg takes the soft
prototypes ``c_t = sum(B f) / sum(B)`` and ``c_b = sum((1 - B) f) / sum(1 - B)``, the squared Euclidean
distances ``d_t, d_b`` of every voxel's feature vector to them, ``p = softmax([-d_b, -d_t])`` and the
segmentation-ability map SAM = argmax (target where ``d_t < d_b``; ties go to the background, as
``torch.argmax`` in the official code). The SA score is Dice(SAM, G).

Two identities keep this cheap and exact:

* ``d_b - d_t = 2 (f - m) . (c_t - c_b)`` with ``m = (c_t + c_b) / 2``: the softmax needs only this
  difference (``p_target = sigmoid(d_b - d_t)``), one pass over the channels with no (C, N) distance
  temporaries. It is linear in f, channel by channel. Features are centred on each channel's mean before
  any float32 sum, so a large common offset (intensities of 50 +- 1) costs no digits, where expanding
  ``||f||^2 - 2 f.c + ||c||^2`` would cancel them.
* Upsampling (bi/trilinear, ``align_corners=False``, as the paper) is linear with weights summing to one,
  so the SAM of the upsampled features is the upsampled one-channel map ``d_b - d_t`` of the coarse
  features, and the prototypes over the fine grid are sums over the coarse grid weighted by the
  *adjoint* of the upsampling applied to B. So "features upsampled to full resolution" never
  materialises C channels at full resolution; only per-unit maps are upsampled, and those only slab by slab:
  each slab of fine rows is interpolated, thresholded and counted against the references while it is in the
  cache (:func:`_count_upsampled_sams`), so no full-resolution unit map is ever whole.

The faster ``resolution="feature"`` mode area-averages B (and the reference mask) onto each feature grid
instead, and scores SAMs there.
"""

from __future__ import annotations

import itertools
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SegXAIError
from ..models.networks import input_multiple
from ..upsampling import interpolation_matrix, upsample_separable
from .base import ExplainContext, Explainer, Explanation, ExplanationMap
from .layers import DEFAULT_LAYER, conv_layers, layer_names, parse_layer_specs, resolve_layers
from .options import MethodOptions, option

RESOLUTIONS = ("input", "feature")
"""``input``: features upsampled to the model grid (paper); ``feature``: B downsampled to each feature grid."""

_CHUNK = 16
"""Channels handled at once where a per-channel map is needed: 16 x 128^3 float32 is 128 MiB."""
_MIN_MASS = 1e-6
"""Below this total weight (in voxels) a region has no prototype: B is treated as empty (or full)."""


def upsample(maps: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Linear/bilinear/trilinear interpolation (``align_corners=False``) of (K, *s) maps to (K, *shape), as
    matrix products per axis (the many per-unit maps are the bulk of ProtoSeg's cost)."""
    return upsample_separable(maps, shape)


def _interpolation_adjoint(maps: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """Adjoint of :func:`upsample` from ``grid`` to ``maps``' grid: (K, *S) -> (K, *grid).

    ``sum(upsample(x) * y) == sum(x * adjoint(y))`` for every x on ``grid``.
    """
    return upsample_separable(maps, grid, adjoint=True)


Tile = tuple[slice, ...]
"""A block of the network grid P (one slice per axis); the whole grid is the one tile of a small volume."""


def _tile_key(tile: Tile) -> tuple[tuple[int, int], ...]:
    """A hashable name of ``tile`` (slices are not hashable before Python 3.12)."""
    return tuple((s.start, s.stop) for s in tile)


def _shape(block: Tile) -> tuple[int, ...]:
    """The number of voxels along each axis of a block of slices."""
    return tuple(s.stop - s.start for s in block)


def _at_origin(block: Tile) -> Tile:
    """Slices of ``block``'s shape from index 0 (the block's place in a tile-sized array)."""
    return tuple(slice(0, n) for n in _shape(block))


def _flat_centred(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, *s) features as float32 (C, prod(s)) centred on each channel's mean, and that mean (C, 1)."""
    flat = features.reshape(features.shape[0], -1).float()
    shift = flat.mean(1, keepdim=True)
    return flat - shift, shift


class SoftMaskPrototypes:
    """One case's soft mask B, ready to run ProtoSeg on feature maps of any grid.

    Args:
        soft_mask: B, shape (*S) with values in [0, 1] (the model's target probability).
        network_shape: the grid P the network ran on, when it was padded at the far end of every axis
            (P >= S); feature maps then cover P, and only its first S voxels are the scan. Default S.
        resolution: ``input`` (features upsampled to P, then cropped to S: the paper) or ``feature``
            (B area-averaged onto each feature grid: faster per-unit maps).

    A volume too large for one forward pass runs tile by tile (blocks of P, see :func:`tiles_of`):
    methods taking ``tile`` read feature maps of that block, upsampled within it, and return maps of
    the block's part of S. Prototypes are the case's, summed over tiles (:class:`PrototypeSums`).

    Empty B (``sum(B)`` below 1e-6) or full B (``sum(1 - B)`` below 1e-6): one region has no prototype, so
    every voxel is nearest to the other. A warning is issued and every logit is ``-inf`` (empty: p = 0, SAM
    all background) or ``+inf`` (full: p = 1, SAM all target); never NaN.
    """

    def __init__(self, soft_mask: torch.Tensor, network_shape: Sequence[int] | None = None,
                 resolution: str = "input") -> None:
        if resolution not in RESOLUTIONS:
            raise SegXAIError(f"unknown ProtoSeg resolution {resolution!r}; choose one of: {', '.join(RESOLUTIONS)}")
        self.resolution = resolution
        self.mask_shape = tuple(soft_mask.shape)
        self.network_shape = tuple(network_shape) if network_shape is not None else self.mask_shape
        if len(self.network_shape) != len(self.mask_shape) or any(
                p < s for p, s in zip(self.network_shape, self.mask_shape)):
            raise ValueError(f"network grid {self.network_shape} must cover the mask grid {self.mask_shape}")
        self.whole: Tile = tuple(slice(0, p) for p in self.network_shape)
        b = torch.as_tensor(soft_mask).detach().to("cpu", torch.float64).clamp(0.0, 1.0)
        # B and 1 - B on the network grid; the padding belongs to neither region (weight zero in both)
        self._regions = torch.zeros((2, *self.network_shape), dtype=torch.float64)
        self._regions[(slice(None), *self.mask_part(self.whole))] = torch.stack([b, 1.0 - b])
        target_mass, background_mass = (float(m) for m in self._regions.flatten(1).sum(1))
        self.degenerate: str | None = None
        if target_mass < _MIN_MASS:
            self.degenerate = "empty"
        elif background_mass < _MIN_MASS:
            self.degenerate = "full"
        if self.degenerate is not None:
            warnings.warn(f"ProtoSeg: the soft mask is {self.degenerate} (sum(B) = {target_mass:.3g}, "
                          f"sum(1 - B) = {background_mass:.3g}); with one prototype every voxel is "
                          f"{'background' if self.degenerate == 'empty' else 'target'}", stacklevel=2)
        self._weights: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def mask_part(self, tile: Tile) -> Tile:
        """The voxels of S inside ``tile``, as slices of S (the tile minus the padding)."""
        return tuple(slice(t.start, min(t.stop, s)) for t, s in zip(tile, self.mask_shape))

    def forget(self, tile: Tile) -> None:
        """Drop the cached weights of ``tile`` (a tiled run is done with it)."""
        self._weights = {key: value for key, value in self._weights.items() if key[2] != _tile_key(tile)}

    def region_weights(self, grid: Sequence[int], device: torch.device | str = "cpu", tile: Tile | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-voxel weights of the target and background regions on ``grid`` (the feature grid of ``tile``,
        default the whole of P): (2, prod(grid)) and their sums (2,)."""
        tile = tile or self.whole
        key = (tuple(grid), str(device), _tile_key(tile))
        if key not in self._weights:
            regions = self._regions[(slice(None), *tile)]
            if self.resolution == "input":
                weights = _interpolation_adjoint(regions, grid)
            else:
                weights = F.interpolate(regions[None], size=tuple(grid), mode="area")[0]
            weights = weights.flatten(1)
            self._weights[key] = (weights.to(device, torch.float32), weights.sum(1).to(device, torch.float32))
        return self._weights[key]

    def _centred(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prototypes of a few channels (c, *s) on the whole of P, relative to each channel's plain mean
        ``shift`` (c, 1).

        Returns ``f - shift`` (c, prod(s)), ``shift``, ``c_t - shift`` and ``c_b - shift`` (c, 1): float32
        sums of values near zero keep the digits that sums over a large common offset (50 +- 1) would lose.
        """
        weights, totals = self.region_weights(features.shape[1:], features.device)
        centred, shift = _flat_centred(features)
        sums = centred @ weights.T / totals  # (c, 2)
        return centred, shift, sums[:, :1], sums[:, 1:]

    def prototypes(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``c_t, c_b``, each (C,), of features (C, *s) on the network grid or a coarser one."""
        parts = []
        for start in range(0, features.shape[0], _CHUNK):
            _, shift, target, background = self._centred(features[start:start + _CHUNK])
            parts.append(torch.cat([shift + target, shift + background], 1))
        both = torch.cat(parts)
        return both[:, 0], both[:, 1]

    def logits(self, features: torch.Tensor, per_unit: bool = False, tile: Tile | None = None,
               prototypes: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """``d_b - d_t`` on the features' grid: (*s), or (C, *s) with ``per_unit`` (each channel alone).

        ``sigmoid`` of it is ``softmax([-d_b, -d_t])[target]``; the SAM is where it is > 0. Computed as
        ``2 (f - m) . (c_t - c_b)``, a few channels at a time (each channel's prototypes are its own).
        ``prototypes`` (``c_t, c_b``, float64 (C,)): given for the features of one ``tile`` (the case's,
        from :class:`PrototypeSums`); default: computed from ``features``, which then cover all of P.
        """
        grid = tuple(features.shape[1:])
        shape = (features.shape[0], *grid) if per_unit else grid
        if self.degenerate is not None:
            return torch.full(shape, -math.inf if self.degenerate == "empty" else math.inf, device=features.device)
        terms = []
        out = torch.zeros(features[0].numel(), device=features.device)
        for start in range(0, features.shape[0], _CHUNK):
            chunk = features[start:start + _CHUNK]
            if prototypes is None:
                centred, _, target, background = self._centred(chunk)
            else:
                centred, shift = _flat_centred(chunk)
                target, background = (p[start:start + _CHUNK, None].to(features.device) - shift.double()
                                      for p in prototypes)
                target, background = target.float(), background.float()
            # 2 (f - m)(c_t - c_b) = scale f + offset: one fused pass per unit, one matrix-vector product for the sum
            scale = 2 * (target - background)
            offset = -scale * (target + background) / 2
            if per_unit:
                terms.append(torch.addcmul(offset, centred, scale))
            else:
                out += scale[:, 0] @ centred + offset.sum()
        if not per_unit:
            return out.reshape(shape)
        return (terms[0] if len(terms) == 1 else torch.cat(terms)).reshape(shape)

    def to_mask_grid(self, maps: torch.Tensor, tile: Tile | None = None) -> torch.Tensor:
        """Bring (K, *s) maps of a feature grid of ``tile`` (default all of P) to that tile's part of S:
        upsample to the tile's network grid, crop the padding."""
        tile = tile or self.whole
        part = self.mask_part(tile)
        if self.degenerate is not None:
            # maps from a degenerate mask are constant (and may be infinite, which interpolation turns into NaN)
            shape = _shape(part)
            return maps.flatten(1)[:, :1].reshape(-1, *([1] * len(shape))).expand(-1, *shape)
        return upsample(maps, _shape(tile))[(slice(None), *_at_origin(part))]

    def mask_on_grid(self, mask: torch.Tensor, grid: Sequence[int], tile: Tile | None = None) -> torch.Tensor:
        """A bool (*S) mask on a feature grid of ``tile``: voxels whose area is more than half inside it
        ((*grid) bool)."""
        tile = tile or self.whole
        part = self.mask_part(tile)
        full = torch.zeros(_shape(tile), dtype=torch.float32)
        full[_at_origin(part)] = torch.as_tensor(mask)[part].to("cpu", torch.float32)
        return F.interpolate(full[None, None], size=tuple(grid), mode="area")[0, 0] > 0.5


class PrototypeSums:
    """``c_t`` and ``c_b`` of one layer, summed tile by tile (a volume too large for one forward pass).

    Each tile adds its features weighted by B and 1 - B (its part of the case's region weights); the
    sums are float64, of features centred on the first tile's channel means (see ``_centred``).
    """

    def __init__(self) -> None:
        self._shift: torch.Tensor | None = None
        self._sums = torch.zeros(0, 2, dtype=torch.float64)
        self._mass = torch.zeros(2, dtype=torch.float64)

    def add(self, features: torch.Tensor, prototypes: SoftMaskPrototypes, tile: Tile) -> None:
        """Add the features (C, *s) of ``tile``."""
        weights, totals = prototypes.region_weights(features.shape[1:], features.device, tile)
        if self._shift is None:
            self._shift = _flat_centred(features)[1]
            self._sums = torch.zeros(features.shape[0], 2, dtype=torch.float64)
        flat = features.reshape(features.shape[0], -1).float()
        self._sums += ((flat - self._shift) @ weights.T).double().cpu()
        self._mass += totals.double().cpu()

    def prototypes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``c_t, c_b``, each float64 (C,)."""
        both = self._shift.double().cpu() + self._sums / self._mass.clamp(min=_MIN_MASS)
        return both[:, 0], both[:, 1]


def tiles_of(shape: Sequence[int], tile: Sequence[int], multiple: Sequence[int]) -> list[Tile]:
    """Blocks covering a grid of ``shape`` (each axis a multiple of ``multiple``): per axis as few blocks as
    fit in ``tile`` voxels, of nearly equal sizes, each a multiple of ``multiple`` (a size the network takes)."""
    per_axis = []
    for size, most, k in zip(shape, tile, multiple):
        most = max(k, most // k * k)
        n = math.ceil(size / most)
        bounds = [round(size // k * i / n) * k for i in range(n + 1)]
        per_axis.append([slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])])
    return list(itertools.product(*per_axis))


def prototype_segmentation(features: torch.Tensor, soft_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ProtoSeg of one feature map (paper Algorithm 1).

    Args:
        features: f, shape (C, *s); on the mask's grid, or a coarser one, which is then upsampled
            (linear/bilinear/trilinear, ``align_corners=False``) to the mask's grid as in the paper.
        soft_mask: B, shape (*S), values in [0, 1].

    Returns:
        probability: (*S) float32, ``softmax([-d_b, -d_t])`` of the target.
        sam: (*S) bool, the segmentation-ability map (``d_t < d_b``).
        Empty or full B: p = 0 and SAM all False, or p = 1 and SAM all True, with a warning.
    """
    prototypes = SoftMaskPrototypes(soft_mask)
    logits = prototypes.to_mask_grid(prototypes.logits(features)[None])[0]
    return torch.sigmoid(logits), logits > 0


def _overlap_counts(sams: torch.Tensor, references: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Overlaps (K, R), SAM sizes (K,) and reference sizes (R,) of (K, N) ``sams`` (bool or 0 / 1) and (R, N) bool
    ``references``, float64.

    One matrix product gives all overlaps and sizes (a single pass over the SAMs, which dominate the cost
    of per-unit scores at full resolution); float32 counts are exact below 2^24 voxels, float64 beyond.
    """
    dtype = torch.float32 if sams.shape[1] < 2**24 else torch.float64
    ones = torch.ones(1, sams.shape[1], dtype=dtype, device=sams.device)
    counts = (sams.to(dtype) @ torch.cat([references.to(sams.device, dtype), ones]).T).double().cpu()  # (K, R + 1)
    return counts[:, :-1], counts[:, -1], references.sum(1, dtype=torch.float64).cpu()


def _dice_of_counts(overlap: torch.Tensor, size: torch.Tensor, reference_size: torch.Tensor) -> np.ndarray:
    """Dice (K, R) from :func:`_overlap_counts` (summed over tiles); 1 where both masks are empty."""
    total = size[:, None] + reference_size[None]
    return torch.where(total > 0, 2 * overlap / total.clamp(min=1), torch.ones_like(total)).numpy()


def _dice_matrix(sams: torch.Tensor, references: torch.Tensor) -> np.ndarray:
    """Dice of every row of (K, N) bool ``sams`` with every row of (R, N) bool ``references``: (K, R) float64."""
    return _dice_of_counts(*_overlap_counts(sams, references))


def sa_score(sam: torch.Tensor, reference: torch.Tensor) -> float | np.ndarray:
    """SA score = Dice(SAM, reference) (paper Eq. 8); 1.0 when both are empty, as :func:`SegXAILib.metrics.dice`.

    Args:
        sam: (*S) bool, or (K, *S) for K maps at once.
        reference: (*S) bool, the ground truth or the model's own mask.

    Returns:
        a float for one map, a float64 array (K,) for a stack.
    """
    sam = torch.as_tensor(sam).bool()
    reference = torch.as_tensor(reference).bool()
    scores = _dice_matrix(sam.reshape(-1, reference.numel()), reference.reshape(1, -1))[:, 0]
    return float(scores[0]) if sam.ndim == reference.ndim else scores


_SLAB_VALUES = 2**18
"""Upsampled logits per slab (1 MiB of float32): with their SAMs and the slab's references they stay in a core's
cache, where whole upsampled maps (48 units of a 96^3 grid: 170 MB) would go through memory several times."""


def _count_upsampled_sams(logits: torch.Tensor, grid: Sequence[int], crop: Sequence[int], weights: torch.Tensor,
                          sam_sum: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Overlaps of the SAMs of (K, *s) logits, upsampled to ``grid`` (:func:`upsample`) and cropped to its first
    ``crop`` voxels per axis, with each row of (W, prod(crop)) 0 / 1 ``weights``.

    Returns the overlaps (K, W) float64 and, with ``sam_sum``, how many of the K SAMs hold each voxel
    ((*crop) float32). The upsampled maps are never whole: every axis but the first is upsampled on the
    coarse grid ("planes"), then slab after slab of fine rows along the first axis is interpolated from two
    planes per row, thresholded and counted by one matrix product with the slab's weights.
    """
    k, rows_in = logits.shape[0], logits.shape[1]
    planes = upsample(logits, (rows_in, *grid[1:]))[(slice(None), slice(None), *(slice(0, n) for n in crop[1:]))]
    planes = planes.reshape(k, rows_in, -1)
    plane = planes.shape[2]
    # fine row j is lerp(planes[low_j], planes[high_j], share_j): linear interpolation mixes two neighbouring
    # coarse rows (an edge row takes one: share 0, or 1 of itself)
    mixing = interpolation_matrix(rows_in, grid[0])[:crop[0]]
    low = (mixing != 0).int().argmax(1)
    high = (low + 1).clamp(max=rows_in - 1)
    share = mixing.gather(1, high[:, None]).to(logits.device, logits.dtype)
    one_row = list(zip(low.tolist(), high.tolist(), share[:, 0].tolist()))
    weights = weights.to(logits.device, logits.dtype).view(weights.shape[0], crop[0], plane)
    counts = torch.zeros(weights.shape[0], k, dtype=torch.float64, device=logits.device)
    total = torch.empty(crop[0], plane, device=logits.device) if sam_sum else None
    step = max(1, _SLAB_VALUES // (k * plane))
    for start in range(0, crop[0], step):
        rows = slice(start, min(start + step, crop[0]))
        if step == 1:  # views of the two planes
            a, b, t = one_row[start]
            slab = torch.lerp(planes[:, a], planes[:, b], t)[:, None]
        else:
            slab = torch.lerp(planes[:, low[rows]], planes[:, high[rows]], share[rows])
        sams = torch.gt(slab, 0, out=torch.empty(slab.shape, dtype=logits.dtype, device=logits.device))
        # float32 counts are exact: a slab holds far fewer than 2^24 voxels
        counts += weights[:, rows].reshape(weights.shape[0], -1) @ sams.view(k, -1).T
        if total is not None:
            torch.sum(sams, 0, out=total[rows])
    return counts.T.cpu(), None if total is None else total.view(tuple(crop))


class _Scorer:
    """SAMs of logits and their SA scores against the reference masks, summed over tiles.

    ``input`` resolution: SAMs on the mask grid (logits upsampled); ``feature``: SAMs on the feature grid,
    references area-averaged onto it and voxels mostly in the padding left out.

    Args:
        prototypes: the case's soft mask, ready for ProtoSeg.
        references: name -> (*S) bool mask (the ground truth or the model's own mask).
    """

    def __init__(self, prototypes: SoftMaskPrototypes, references: dict[str, torch.Tensor]) -> None:
        self.prototypes = prototypes
        self.names = list(references)
        self._references = torch.stack([references[name].bool() for name in self.names])
        self._on_grid: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._counts: dict[Any, list[torch.Tensor]] = {}

    def _grid(self, grid: tuple[int, ...], device: torch.device, tile: Tile) -> tuple[torch.Tensor, torch.Tensor]:
        """What the SAMs on a scoring grid of a tile are counted against: (R + 1, prod(grid)) float32 0 / 1 rows,
        the references then the voxels that count (every voxel of S at ``input`` resolution, those mostly
        inside S on a feature grid; the references lie inside them), and the references' sizes (R,) float64."""
        key = (grid, str(device), _tile_key(tile))
        if key not in self._on_grid:
            part = self.prototypes.mask_part(tile)
            references = self._references[(slice(None), *part)]
            inside = torch.ones(_shape(part), dtype=torch.bool)
            if self.prototypes.resolution == "feature":
                references = torch.stack([self.prototypes.mask_on_grid(r, grid, tile) for r in self._references])
                # a view of S's size, so that only the tile's part is ever allocated
                everywhere = torch.ones((), dtype=torch.bool).expand(self.prototypes.mask_shape)
                inside = self.prototypes.mask_on_grid(everywhere, grid, tile)
            self._on_grid = {k: v for k, v in self._on_grid.items() if k[2] == key[2]}  # one tile at a time
            weights = torch.cat([references.flatten(1), inside.flatten()[None]]).to(device, torch.float32)
            self._on_grid[key] = weights, references.flatten(1).sum(1, dtype=torch.float64)
        return self._on_grid[key]

    def add(self, key: Any, logits: torch.Tensor, tile: Tile | None = None, sam_sum: bool = False
            ) -> torch.Tensor | None:
        """Count the overlaps of the SAMs of (K, *s) logits of ``tile`` (default all of P) with the references,
        under ``key``; with ``sam_sum``, return the number of the K SAMs that hold each voxel of the tile's part
        of S ((*part) float32)."""
        tile = tile or self.prototypes.whole
        if self.prototypes.resolution == "input":
            grid, crop = _shape(tile), _shape(self.prototypes.mask_part(tile))
        else:
            grid = crop = tuple(logits.shape[1:])
        weights, reference_sizes = self._grid(crop, logits.device, tile)
        if self.prototypes.degenerate is not None:  # constant infinite logits: interpolating them gives NaN
            logits = torch.sign(logits)
        counts, total = _count_upsampled_sams(logits, grid, crop, weights, sam_sum)
        counts = [counts[:, :-1], counts[:, -1], reference_sizes]
        if key in self._counts:
            self._counts[key] = [old + new for old, new in zip(self._counts[key], counts)]
        else:
            self._counts[key] = counts
        if total is None or self.prototypes.resolution == "input":
            return total
        return self.prototypes.to_mask_grid((total * weights[-1].view(crop))[None], tile)[0]

    def scores(self, key: Any) -> dict[str, np.ndarray]:
        """Reference name -> SA scores (K,) of the SAMs counted under ``key``."""
        scores = _dice_of_counts(*self._counts[key])
        return {name: scores[:, i] for i, name in enumerate(self.names)}


def _pad_to_multiple(image: torch.Tensor, divisor: Sequence[int]) -> torch.Tensor:
    """Pad (1, C, *S) at the far end of each axis up to multiples of ``divisor`` (edge values repeated,
    so that no artificial edge appears for the convolutions to respond to)."""
    pads: list[int] = []
    for size, k in zip(reversed(image.shape[2:]), reversed(tuple(divisor))):
        pads += [0, -size % k]
    return F.pad(image, pads, mode="replicate") if any(pads) else image


WHOLE_VOLUME_VOXELS = 160**3
"""Largest network grid ProtoSeg runs in one forward pass (about 2 GB at the bundled U-Net's widths);
larger grids run in tiles of the card's patch size, twice (prototypes first, then the scores)."""

_INPUT = "<input>"
"""Key of the input intensities among the layers' prototypes (the input separableness)."""


class _AllLayersSeen(Exception):
    """Raised by the last hooked layer: what the network computes after it (its head, at full resolution the
    costliest layer of a U-Net) is not needed."""


def _forward_with_hooks(network: nn.Module, modules: dict[str, nn.Module], image: torch.Tensor,
                        on_output: Callable[[str, torch.Tensor], None]) -> None:
    """One forward pass of ``image`` calling ``on_output(name, features (C, *s))`` with the first output of
    each of ``modules`` (a module run twice is seen once), as it runs: nothing is kept for later. The pass
    stops once every module has been seen."""
    seen: set[str] = set()

    def hook_for(name: str):
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if not isinstance(output, torch.Tensor):
                raise SegXAIError(f"protoseg: layer {name} returns {type(output).__name__}, not a feature map; "
                                  "choose a conv block")
            if name not in seen:
                seen.add(name)
                on_output(name, output[0].detach().float())
                if len(seen) == len(modules):
                    raise _AllLayersSeen
        return hook

    handles = [module.register_forward_hook(hook_for(name)) for name, module in modules.items()]
    try:
        with torch.no_grad():
            network(image)
    except _AllLayersSeen:
        pass
    finally:
        for handle in handles:
            handle.remove()


class _TileScores:
    """What ProtoSeg gathers from each layer's features, tile by tile: SAM overlaps for the SA curve and the
    units' scores (in the scorer), the selected layers' probability maps and the last layer's unit-SAM counts
    (the heat map, not yet divided by the number of units), on the mask grid.

    ``case_prototypes``: layer -> ``c_t, c_b`` summed over tiles; empty for a whole-volume run, where each
    layer's prototypes come from its own features.
    """

    def __init__(self, prototypes: SoftMaskPrototypes, scorer: _Scorer,
                 case_prototypes: dict[str, tuple[torch.Tensor, torch.Tensor]], curve_names: set[str],
                 selected: set[str], unit_names: list[str]) -> None:
        self.prototypes, self.scorer, self.case_prototypes = prototypes, scorer, case_prototypes
        self.curve_names, self.unit_names = curve_names | {_INPUT}, unit_names
        self.maps = {name: torch.zeros(prototypes.mask_shape) for name in selected}
        self.heat = torch.zeros(prototypes.mask_shape)
        self.layer_info: dict[str, dict[str, Any]] = {}

    def add(self, name: str, features: torch.Tensor, tile: Tile) -> None:
        """Score the features (C, *s) of layer ``name`` on ``tile``."""
        prototypes, scorer = self.prototypes, self.scorer
        part = prototypes.mask_part(tile)
        case = self.case_prototypes.get(name)
        logits = prototypes.logits(features, tile=tile, prototypes=case)
        if name in self.curve_names:
            scorer.add(("layer", name), logits[None], tile)
            self.layer_info[name] = {"channels": int(features.shape[0]), "shape": [
                f * p // t for f, p, t in zip(features.shape[1:], prototypes.network_shape, _shape(tile))]}
        if name in self.maps:
            self.maps[name][part] = torch.sigmoid(prototypes.to_mask_grid(logits[None], tile)[0])
        if name in self.unit_names:
            for start in range(0, features.shape[0], _CHUNK):
                chunk = None if case is None else tuple(p[start:start + _CHUNK] for p in case)
                logits = prototypes.logits(features[start:start + _CHUNK], True, tile, chunk)
                in_heat = name == self.unit_names[-1]
                sams_per_voxel = scorer.add(("units", name, start), logits, tile, sam_sum=in_heat)
                if in_heat:
                    self.heat[part] += sams_per_voxel


@dataclass(frozen=True)
class ProtoSegOptions(MethodOptions):
    """Options of ProtoSeg (see :class:`ProtoSegExplainer`)."""

    resolution: str = option("input", choices=RESOLUTIONS)
    layers: tuple[str, ...] = option((DEFAULT_LAYER,), convert=parse_layer_specs)
    max_voxels: int = option(WHOLE_VOLUME_VOXELS, minimum=1)


class ProtoSegExplainer(Explainer):
    """Segmentation ability of every conv layer and of the last layers' units (ProtoSeg).

    One forward pass of the whole volume on the model grid (padded at the far end to a size the network
    accepts: prototypes are global to the case, so no sliding windows), with hooks on every conv block
    (:func:`.layers.conv_layers`: post-normalisation/activation outputs, the output layer excluded). Each
    layer is scored as its output arrives, so memory stays near that of one forward pass, and the pass stops
    after the last of them (the network's head is not needed). B is the model's
    target probability (one-vs-rest: the target's channels summed); G the ground truth when given, else the
    model's own mask.

    A grid above ``max_voxels`` (default :data:`WHOLE_VOLUME_VOXELS`, e.g. a CT) runs in tiles of the card's
    patch size (:func:`tiles_of`), twice: the first pass sums every layer's prototypes over the tiles, the
    second scores each tile against them. A tile's features are those of the network run on that tile
    (as in sliding-window inference, without blending), upsampled within it.

    Options (:class:`ProtoSegOptions`, ``--option protoseg.NAME=VALUE``):
        resolution: ``input`` (default, paper: features upsampled to the model grid) or ``feature``
            (B and G area-averaged onto each feature grid and SAMs scored there: faster per-unit scores; it
            agrees with ``input`` where the masks are smooth at the feature grid's scale, and under-scores
            structures smaller than a feature voxel).
        layers: layers to return a SAM probability map for: roles (``last_decoder``, ``bottleneck``,
            ``decoder_all``) or module names, as a list or comma-separated; default ``last_decoder``.
        max_voxels: the largest network grid run in one forward pass.

    Returns:
        maps: ``heat`` = mean of the unit SAMs of the last feature layer (paper Fig. 9), in [0, 1];
            ``layer-<slug>`` = the SAM probability ``p_target`` of each selected layer (``layer-last-decoder-stage``,
            :func:`.layers.layer_names`; the map's ``layer`` is the module's name).
        scalars: ``mean_sa`` = mu, mean SA score of the units of the last two feature layers against the
            model's own mask (paper Eq. 12: label-free, so comparable between cases with and without labels;
            low = review this case); ``mean_sa_label`` = the same against the ground truth, when given;
            ``input_separableness`` = SA score of ProtoSeg on the input intensities.
        curves: ``sa_per_layer`` = [{"layer", "title", "sa", "channels", "shape"}] for every conv block in forward
            order (``layer`` the module's name, ``title`` the reader's: ``last decoder stage, 3 mm grid``);
            ``sa_per_unit`` = [{"layer", "unit", "sa"}] for the last two.
    """

    name = "protoseg"
    Options = ProtoSegOptions
    needs_hooks = True
    summary = ("segmentation-ability maps (ProtoSeg): how well each layer's features separate the target; "
               "a low mean SA score flags a case to review")

    def explain(self, context: ExplainContext) -> Explanation:
        start_time = time.perf_counter()
        options: ProtoSegOptions = context.options_for(self)
        resolution = options.resolution
        network = context.model.network
        card = context.model.card
        image = _pad_to_multiple(context.image.float(), input_multiple(card)).to(context.device)
        grid = tuple(image.shape[2:])
        # layers are found on small zero probes (16^3, 32^3, ...): any size the network takes gives the same layers
        layers = conv_layers(network)
        resolved = {spec: [name for name, _ in resolve_layers(network, spec)] for spec in options.layers}
        selected = {name for names in resolved.values() for name in names}
        unit_names = [name for name, _ in layers[-2:]]
        modules = dict(network.named_modules())
        hooked = {**dict(layers), **{name: modules[name] for name in selected}}
        curve_names = {name for name, _ in layers}

        model_mask = torch.from_numpy(context.predicted_mask)
        reference = torch.from_numpy(np.asarray(context.label, dtype=bool)) if context.label is not None else model_mask
        prototypes = SoftMaskPrototypes(torch.from_numpy(context.target_probability), grid, resolution)
        scorer = _Scorer(prototypes, {"reference": reference, "model": model_mask})
        tiles = ([prototypes.whole] if math.prod(grid) <= options.max_voxels
                 else tiles_of(grid, card.patch_size, input_multiple(card)))
        passes = 1 if len(tiles) == 1 or prototypes.degenerate else 2
        case_prototypes = (self._case_prototypes(network, image, tiles, hooked, prototypes, context)
                           if passes == 2 else {})

        gathered = _TileScores(prototypes, scorer, case_prototypes, curve_names, selected, unit_names)
        for n, tile in enumerate(tiles):
            x = image[(slice(None), slice(None), *tile)]
            gathered.add(_INPUT, x[0], tile)
            _forward_with_hooks(network, hooked, x, lambda name, features: gathered.add(name, features, tile))
            prototypes.forget(tile)
            context.progress.update(self.name, (passes - 1 + (n + 1) / len(tiles)) / passes,
                                    f"tile {n + 1}/{len(tiles)}")
        maps, heat, layer_info = gathered.maps, gathered.heat, gathered.layer_info

        units: list[dict[str, Any]] = []
        model_scores: list[float] = []
        for name in unit_names:
            for start in range(0, layer_info[name]["channels"], _CHUNK):
                scores = scorer.scores(("units", name, start))
                units += [{"layer": name, "unit": start + k, "sa": float(sa)}
                          for k, sa in enumerate(scores["reference"])]
                model_scores += scores["model"].tolist()
        scalars = {"mean_sa": float(np.mean(model_scores)),
                   "input_separableness": float(scorer.scores(("layer", _INPUT))["reference"][0])}
        if context.label is not None:
            scalars["mean_sa_label"] = float(np.mean([u["sa"] for u in units]))
        heat /= layer_info[unit_names[-1]]["channels"]
        readers = layer_names(network, sorted(selected), spacing=context.spacing)
        curve = [{"layer": name, "title": readers[name].words,
                  "sa": float(scorer.scores(("layer", name))["reference"][0]), **layer_info[name]}
                 for name, _ in layers]

        last = readers[unit_names[-1]]
        explanation_maps = [ExplanationMap(
            self.name, heat.cpu().numpy().astype(np.float32), "heat", normalise=False, layer=last.module,
            description=f"fraction of the units of the {last.role} ({last.grid}) whose features place this voxel "
                        f"with the {context.target} (ProtoSeg unit-average heat map)")]
        explanation_maps += [ExplanationMap(
            self.name, p.cpu().numpy().astype(np.float32), f"layer-{readers[name].slug}", normalise=False,
            layer=name, description=f"probability that the features of the {readers[name].role} "
                                    f"({readers[name].grid}) put this voxel with the {context.target} prototype "
                                    "(ProtoSeg)")
            for name, p in maps.items()]
        metadata = {"reference": "label" if context.label is not None else "model", "resolution": resolution,
                    "unit_layers": unit_names, "layers": resolved,
                    "layer_names": {name: readers[name].words for name in readers},
                    "soft_mask": prototypes.degenerate or "ok", "network_grid": list(grid), "tiles": len(tiles),
                    "seconds": round(time.perf_counter() - start_time, 3)}
        return Explanation(self.name, explanation_maps, scalars, {"sa_per_layer": curve, "sa_per_unit": units},
                           metadata)

    def _case_prototypes(self, network: nn.Module, image: torch.Tensor, tiles: list[Tile],
                         hooked: dict[str, nn.Module], prototypes: SoftMaskPrototypes, context: ExplainContext
                         ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The first of a tiled run's two passes: every layer's ``c_t, c_b`` (and the input's), summed over tiles."""
        sums = {name: PrototypeSums() for name in [_INPUT, *hooked]}
        for n, tile in enumerate(tiles):
            x = image[(slice(None), slice(None), *tile)]
            sums[_INPUT].add(x[0], prototypes, tile)
            _forward_with_hooks(network, hooked, x, lambda name, features: sums[name].add(features, prototypes, tile))
            prototypes.forget(tile)
            context.progress.update(self.name, (n + 1) / len(tiles) / 2, f"prototypes, tile {n + 1}/{len(tiles)}")
        return {name: s.prototypes() for name, s in sums.items()}
