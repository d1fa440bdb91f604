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
  materialises C channels at full resolution; only per-unit maps are upsampled, a few channels at a time.

The faster ``resolution="feature"`` mode area-averages B (and the reference mask) onto each feature grid
instead, and scores SAMs there.
"""

from __future__ import annotations

import math
import re
import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SegXAIError
from ..models.card import ModelCard
from .base import ExplainContext, Explainer, Explanation, ExplanationMap
from ..upsampling import upsample_to
from .layers import conv_layers, parse_layer_specs, resolve_layers

RESOLUTIONS = ("input", "feature")
"""``input``: features upsampled to the model grid (paper); ``feature``: B downsampled to each feature grid."""

_CHUNK = 16
"""Channels handled at once where a per-channel map is needed: 16 x 128^3 float32 is 128 MiB."""
_MIN_MASS = 1e-6
"""Below this total weight (in voxels) a region has no prototype: B is treated as empty (or full)."""


def upsample(maps: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Linear/bilinear/trilinear interpolation (``align_corners=False``) of (K, *s) maps to (K, *shape)."""
    return upsample_to(maps[None], shape)[0]


def _interpolation_adjoint(maps: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """Adjoint of :func:`upsample` from ``grid`` to ``maps``' grid: (K, *S) -> (K, *grid).

    ``sum(upsample(x) * y) == sum(x * adjoint(y))`` for every x on ``grid``: it is the backward pass of the
    interpolation, O(S) work.
    """
    coarse = torch.zeros((1, maps.shape[0], *grid), dtype=maps.dtype, device=maps.device, requires_grad=True)
    with torch.enable_grad():
        fine = upsample(coarse[0], maps.shape[1:])
        (adjoint,) = torch.autograd.grad(fine, coarse, grad_outputs=maps)
    return adjoint[0]


class SoftMaskPrototypes:
    """One case's soft mask B, ready to run ProtoSeg on feature maps of any grid.

    Args:
        soft_mask: B, shape (*S) with values in [0, 1] (the model's target probability).
        network_shape: the grid P the network ran on, when it was padded at the far end of every axis
            (P >= S); feature maps then cover P, and only its first S voxels are the scan. Default S.
        resolution: ``input`` (features upsampled to P, then cropped to S: the paper) or ``feature``
            (B area-averaged onto each feature grid: faster per-unit maps).

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
        self._crop = tuple(slice(0, s) for s in self.mask_shape)
        b = torch.as_tensor(soft_mask).detach().to("cpu", torch.float64).clamp(0.0, 1.0)
        # B and 1 - B on the network grid; the padding belongs to neither region (weight zero in both)
        self._regions = torch.zeros((2, *self.network_shape), dtype=torch.float64)
        self._regions[(slice(None), *self._crop)] = torch.stack([b, 1.0 - b])
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

    def region_weights(self, grid: Sequence[int], device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Per-voxel weights of the target and background regions on ``grid``: (2, prod(grid)) and their sums (2,)."""
        key = (tuple(grid), str(device))
        if key not in self._weights:
            if self.resolution == "input":
                weights = _interpolation_adjoint(self._regions, grid)
            else:
                weights = F.interpolate(self._regions[None], size=tuple(grid), mode="area")[0]
            weights = weights.flatten(1)
            self._weights[key] = (weights.to(device, torch.float32), weights.sum(1).to(device, torch.float32))
        return self._weights[key]

    def _centred(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prototypes of a few channels (c, *s), relative to each channel's plain mean ``shift`` (c, 1).

        Returns ``f - shift`` (c, prod(s)), ``shift``, ``c_t - shift`` and ``c_b - shift`` (c, 1): float32
        sums of values near zero keep the digits that sums over a large common offset (50 +- 1) would lose.
        """
        weights, totals = self.region_weights(features.shape[1:], features.device)
        flat = features.reshape(features.shape[0], -1).float()
        shift = flat.mean(1, keepdim=True)
        centred = flat - shift
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

    def logits(self, features: torch.Tensor, per_unit: bool = False) -> torch.Tensor:
        """``d_b - d_t`` on the features' grid: (*s), or (C, *s) with ``per_unit`` (each channel alone).

        ``sigmoid`` of it is ``softmax([-d_b, -d_t])[target]``; the SAM is where it is > 0. Computed as
        ``2 (f - m) . (c_t - c_b)``, a few channels at a time (each channel's prototypes are its own).
        """
        grid = tuple(features.shape[1:])
        shape = (features.shape[0], *grid) if per_unit else grid
        if self.degenerate is not None:
            return torch.full(shape, -math.inf if self.degenerate == "empty" else math.inf, device=features.device)
        terms = []
        out = torch.zeros(features[0].numel(), device=features.device)
        for start in range(0, features.shape[0], _CHUNK):
            centred, _, target, background = self._centred(features[start:start + _CHUNK])
            term = 2 * (centred - (target + background) / 2) * (target - background)
            if per_unit:
                terms.append(term)
            else:
                out += term.sum(0)
        return torch.cat(terms).reshape(shape) if per_unit else out.reshape(shape)

    def to_mask_grid(self, maps: torch.Tensor) -> torch.Tensor:
        """Bring (K, *s) maps of a feature grid to the mask grid: upsample to the network grid, crop to S."""
        if self.degenerate is not None:
            # maps from a degenerate mask are constant (and may be infinite, which interpolation turns into NaN)
            return maps.flatten(1)[:, :1].reshape(-1, *([1] * len(self.mask_shape))).expand(-1, *self.mask_shape)
        return upsample(maps, self.network_shape)[(slice(None), *self._crop)]

    def mask_on_grid(self, mask: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        """A bool (*S) mask on a feature grid: voxels whose area is more than half inside it ((*grid) bool)."""
        full = torch.zeros(self.network_shape, dtype=torch.float32)
        full[self._crop] = torch.as_tensor(mask).to("cpu", torch.float32)
        return F.interpolate(full[None, None], size=tuple(grid), mode="area")[0, 0] > 0.5


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


def _dice_matrix(sams: torch.Tensor, references: torch.Tensor) -> np.ndarray:
    """Dice of every row of (K, N) bool ``sams`` with every row of (R, N) bool ``references``: (K, R) float64.

    One matrix product gives all overlaps and sizes (a single pass over the SAMs, which dominate the cost
    of per-unit scores at full resolution); float32 counts are exact below 2^24 voxels, float64 beyond.
    """
    dtype = torch.float32 if sams.shape[1] < 2**24 else torch.float64
    ones = torch.ones(1, sams.shape[1], dtype=dtype, device=sams.device)
    counts = (sams.to(dtype) @ torch.cat([references.to(sams.device, dtype), ones]).T).double()  # (K, R + 1)
    overlap, size = counts[:, :-1], counts[:, -1:]
    total = size + references.sum(1, dtype=torch.float64).to(sams.device)
    return torch.where(total > 0, 2 * overlap / total.clamp(min=1), torch.ones_like(total)).cpu().numpy()


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


class _Scorer:
    """SAMs of logits and their SA scores against the reference masks.

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

    def _grid(self, grid: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """References (R, prod(grid)) and the voxels inside the scan (prod(grid),) on a scoring grid."""
        key = (grid, str(device))
        if key not in self._on_grid:
            references = self._references
            inside = torch.ones(self.prototypes.mask_shape, dtype=torch.bool)
            if self.prototypes.resolution == "feature":
                references = torch.stack([self.prototypes.mask_on_grid(r, grid) for r in references])
                inside = self.prototypes.mask_on_grid(inside, grid)
            self._on_grid[key] = references.flatten(1).to(device), inside.flatten().to(device)
        return self._on_grid[key]

    def sams(self, logits: torch.Tensor) -> torch.Tensor:
        """(K, *s) logits -> (K, *grid) bool SAMs on the scoring grid."""
        if self.prototypes.resolution == "input":
            return self.prototypes.to_mask_grid(logits) > 0
        inside = self._grid(tuple(logits.shape[1:]), logits.device)[1]
        return (logits > 0) & inside.view(logits.shape[1:])

    def scores(self, sams: torch.Tensor) -> dict[str, np.ndarray]:
        """Reference name -> SA scores (K,) of (K, *grid) SAMs."""
        references = self._grid(tuple(sams.shape[1:]), sams.device)[0]
        scores = _dice_matrix(sams.flatten(1), references)
        return {name: scores[:, i] for i, name in enumerate(self.names)}

    def to_mask_grid(self, maps: torch.Tensor) -> torch.Tensor:
        """(K, *grid) float maps of the scoring grid -> (K, *S)."""
        return maps if self.prototypes.resolution == "input" else self.prototypes.to_mask_grid(maps)


def input_multiple(card: ModelCard) -> tuple[int, ...]:
    """Per-axis multiple the network's input size must be.

    The product of the card's ``strides`` when its architecture lists them (MONAI U-Nets), else the
    largest power of two dividing the patch size (a size the network is known to accept).
    """
    strides = card.architecture.get("args", {}).get("strides")
    if strides is not None:
        per_axis = np.ones(len(card.patch_size), dtype=int)
        for s in strides:
            per_axis *= np.broadcast_to(np.asarray(s, dtype=int), per_axis.shape)
        return tuple(int(k) for k in per_axis)
    return tuple(p & -p for p in card.patch_size)


def _pad_to_multiple(image: torch.Tensor, divisor: Sequence[int]) -> torch.Tensor:
    """Pad (1, C, *S) at the far end of each axis up to multiples of ``divisor`` (edge values repeated,
    so that no artificial edge appears for the convolutions to respond to)."""
    pads: list[int] = []
    for size, k in zip(reversed(image.shape[2:]), reversed(tuple(divisor))):
        pads += [0, -size % k]
    return F.pad(image, pads, mode="replicate") if any(pads) else image


class ProtoSegExplainer(Explainer):
    """Segmentation ability of every conv layer and of the last layers' units (ProtoSeg).

    One forward pass of the whole volume on the model grid (padded at the far end to a size the network
    accepts: prototypes are global to the case, so no sliding windows), with hooks on every conv block
    (:func:`.layers.conv_layers`: post-normalisation/activation outputs, the output layer excluded). Each
    layer is scored as its output arrives and only the last two layers' outputs are kept, so memory stays
    near that of one forward pass. B is the model's target probability (one-vs-rest: the target's channels
    summed); G the ground truth when given, else the model's own mask.

    Options (``context.options["protoseg"]``):
        resolution: ``input`` (default, paper: features upsampled to the model grid) or ``feature``
            (B and G area-averaged onto each feature grid and SAMs scored there: faster per-unit scores; it
            agrees with ``input`` where the masks are smooth at the feature grid's scale, and under-scores
            structures smaller than a feature voxel).
        layers: layers to return a SAM probability map for: roles (``last_decoder``, ``bottleneck``,
            ``decoder_all``) or module names, as a list or comma-separated; default ``last_decoder``.

    Returns:
        maps: ``heat`` = mean of the unit SAMs of the last feature layer (paper Fig. 9), in [0, 1];
            ``layer-<name>`` = the SAM probability ``p_target`` of each selected layer.
        scalars: ``mean_sa`` = mu, mean SA score of the units of the last two feature layers against the
            model's own mask (paper Eq. 12: label-free, so comparable between cases with and without labels;
            low = review this case); ``mean_sa_label`` = the same against the ground truth, when given;
            ``input_separableness`` = SA score of ProtoSeg on the input intensities.
        curves: ``sa_per_layer`` = [{"layer", "sa", "channels", "shape"}] for every conv block in forward
            order; ``sa_per_unit`` = [{"layer", "unit", "sa"}] for the last two.
    """

    name = "protoseg"
    needs_hooks = True
    summary = ("segmentation-ability maps (ProtoSeg): how well each layer's features separate the target; "
               "a low mean SA score flags a case to review")

    def explain(self, context: ExplainContext) -> Explanation:
        start_time = time.perf_counter()
        options = context.method_options(self.name)
        resolution = options.get("resolution", "input")
        network = context.model.network
        image = _pad_to_multiple(context.image.float(), input_multiple(context.model.card)).to(context.device)
        # layers are found on small zero probes (16^3, 32^3, ...): any size the network takes gives the same layers
        layers = conv_layers(network)
        resolved = {spec: [name for name, _ in resolve_layers(network, spec)] for spec in parse_layer_specs(options.get("layers"))}
        selected = {name for names in resolved.values() for name in names}
        unit_names = [name for name, _ in layers[-2:]]

        model_mask = torch.from_numpy(context.predicted_mask)
        reference = torch.from_numpy(np.asarray(context.label, dtype=bool)) if context.label is not None else model_mask
        prototypes = SoftMaskPrototypes(torch.from_numpy(context.target_probability), image.shape[2:], resolution)
        scorer = _Scorer(prototypes, {"reference": reference, "model": model_mask})

        curve: dict[str, dict[str, Any]] = {}
        maps: dict[str, torch.Tensor] = {}
        kept: dict[str, torch.Tensor] = {}

        def hook_for(name: str, in_curve: bool):
            # each layer is handled as it runs (not captured for later, as LayerCapture does): only the
            # last two layers' features outlive their hook
            def hook(module: nn.Module, inputs: Any, output: Any) -> None:
                if not isinstance(output, torch.Tensor):
                    raise SegXAIError(f"protoseg: layer {name} returns {type(output).__name__}, not a feature map; "
                                      "choose a conv block")
                features = output[0].detach().float()
                logits = prototypes.logits(features)
                if in_curve and name not in curve:
                    sam = scorer.sams(logits[None])
                    curve[name] = {"layer": name, "sa": float(scorer.scores(sam)["reference"][0]),
                                   "channels": int(features.shape[0]), "shape": list(features.shape[1:])}
                    context.progress.update(self.name, len(curve) / (len(layers) + 2), f"layer {name}")
                if name in selected and name not in maps:
                    maps[name] = torch.sigmoid(prototypes.to_mask_grid(logits[None])[0])
                if name in unit_names:
                    kept.setdefault(name, features)
            return hook

        curve_names = {name for name, _ in layers}
        modules = dict(network.named_modules())
        hooked = {**dict(layers), **{name: modules[name] for name in selected}}
        handles = [module.register_forward_hook(hook_for(name, name in curve_names)) for name, module in hooked.items()]
        try:
            with torch.no_grad():
                network(image)
        finally:
            for handle in handles:
                handle.remove()

        units, model_scores, heat = self._unit_scores([(name, kept[name]) for name in unit_names], scorer)
        context.progress.update(self.name, (len(layers) + 1) / (len(layers) + 2), "input separableness")
        input_sam = scorer.sams(prototypes.logits(image[0])[None])
        scalars = {"mean_sa": float(np.mean(model_scores)),
                   "input_separableness": float(scorer.scores(input_sam)["reference"][0])}
        if context.label is not None:
            scalars["mean_sa_label"] = float(np.mean([u["sa"] for u in units]))
        context.progress.update(self.name, 1.0, "done")

        explanation_maps = [ExplanationMap(
            self.name, heat.cpu().numpy().astype(np.float32), "heat", normalise=False,
            description=f"fraction of the units of layer {unit_names[-1]} whose features place this voxel with "
                        f"the {context.target} (ProtoSeg unit-average heat map)")]
        explanation_maps += [ExplanationMap(
            self.name, p.cpu().numpy().astype(np.float32), "layer-" + re.sub(r"[^A-Za-z0-9_-]+", "_", name),
            normalise=False, description=f"probability that the features of layer {name} put this voxel with the "
                                         f"{context.target} prototype (ProtoSeg)")
            for name, p in maps.items()]
        metadata = {"reference": "label" if context.label is not None else "model", "resolution": resolution,
                    "unit_layers": unit_names, "layers": resolved,
                    "soft_mask": prototypes.degenerate or "ok", "network_grid": list(image.shape[2:]),
                    "seconds": round(time.perf_counter() - start_time, 3)}
        return Explanation(self.name, explanation_maps, scalars,
                           {"sa_per_layer": [curve[name] for name, _ in layers], "sa_per_unit": units}, metadata)

    @staticmethod
    def _unit_scores(unit_layers: list[tuple[str, torch.Tensor]], scorer: _Scorer
                     ) -> tuple[list[dict[str, Any]], list[float], torch.Tensor]:
        """Per-unit SA (against the reference and the model's mask) and the last layer's unit-average heat map."""
        units: list[dict[str, Any]] = []
        model_scores: list[float] = []
        heat = None
        for index, (name, features) in enumerate(unit_layers):
            last = index == len(unit_layers) - 1
            for start in range(0, features.shape[0], _CHUNK):
                sams = scorer.sams(scorer.prototypes.logits(features[start:start + _CHUNK], per_unit=True))
                scores = scorer.scores(sams)
                for unit, sa in enumerate(scores["reference"], start=start):
                    units.append({"layer": name, "unit": unit, "sa": float(sa)})
                model_scores += scores["model"].tolist()
                if last:
                    counts = sams.sum(0, dtype=torch.float32)
                    heat = counts if heat is None else heat + counts
        return units, model_scores, scorer.to_mask_grid((heat / unit_layers[-1][1].shape[0])[None])[0]
