"""ProtoSeg segmentation-ability maps (He et al.; METHODS.md section 3).

For a feature map f (C channels) and the model's soft mask B in [0, 1], ProtoSeg takes the soft
prototypes ``c_t = sum(B f) / sum(B)`` and ``c_b = sum((1 - B) f) / sum(1 - B)``, the squared Euclidean
distances ``d_t, d_b`` of every voxel's feature vector to them, ``p = softmax([-d_b, -d_t])`` and the
segmentation-ability map SAM = argmax (target where ``d_t < d_b``; ties go to the background, as
``torch.argmax`` in the official code). The SA score is Dice(SAM, G).

Two identities keep this cheap and exact:

* ``d_b - d_t = 2 (f - m) . (c_t - c_b)`` with ``m = (c_t + c_b) / 2``: the softmax needs only this
  difference (``p_target = sigmoid(d_b - d_t)``), and computing it from ``f - m`` avoids the cancellation
  of expanding ``||f||^2 - 2 f.c + ||c||^2`` when features carry a large common offset. It is linear in f,
  channel by channel.
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
import warnings
from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SegXAIError
from ..models.card import ModelCard
from ..models.loaders import LoadedModel
from .base import ExplainContext, Explainer, Explanation, ExplanationMap, NotApplicable

RESOLUTIONS = ("input", "feature")
"""``input``: features upsampled to the model grid (paper); ``feature``: B downsampled to each feature grid."""

_INTERPOLATION = {1: "linear", 2: "bilinear", 3: "trilinear"}
_CHUNK = 16
"""Channels handled at once where a per-channel map is needed: 16 x 128^3 float32 is 128 MiB."""
_MIN_MASS = 1e-6
"""Below this total weight (in voxels) a region has no prototype: B is treated as empty (or full)."""


def upsample(maps: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Linear/bilinear/trilinear interpolation (``align_corners=False``) of (K, *s) maps to (K, *shape)."""
    shape = tuple(shape)
    if tuple(maps.shape[1:]) == shape:
        return maps
    return F.interpolate(maps[None], size=shape, mode=_INTERPOLATION[len(shape)], align_corners=False)[0]


def _interpolation_matrix(n_out: int, n_in: int) -> torch.Tensor:
    """(n_out, n_in) float64 weights of 1D linear interpolation as ``F.interpolate`` computes it.

    Bi/trilinear interpolation is the tensor product of these along each axis.
    """
    eye = torch.eye(n_in, dtype=torch.float64)[None]  # n_in one-hot signals as channels
    return F.interpolate(eye, size=n_out, mode="linear", align_corners=False)[0].T


def _interpolation_adjoint(maps: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """Adjoint of :func:`upsample` from ``grid`` to ``maps``' grid: (K, *S) -> (K, *grid).

    ``sum(upsample(x) * y) == sum(x * adjoint(y))`` for every x on ``grid``.
    """
    for axis, (n_small, n_big) in enumerate(zip(grid, maps.shape[1:]), start=1):
        if n_small != n_big:
            weights = _interpolation_matrix(n_big, n_small).to(maps.dtype)
            maps = torch.movedim(torch.tensordot(maps, weights, dims=([axis], [0])), -1, axis)
    return maps


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

    def prototypes(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``c_t, c_b``, each (C,), of features (C, *s) on the network grid or a coarser one."""
        weights, totals = self.region_weights(features.shape[1:], features.device)
        sums = features.reshape(features.shape[0], -1).float() @ weights.T  # (C, 2)
        return sums[:, 0] / totals[0], sums[:, 1] / totals[1]

    def logits(self, features: torch.Tensor, per_unit: bool = False) -> torch.Tensor:
        """``d_b - d_t`` on the features' grid: (*s), or (C, *s) with ``per_unit`` (each channel alone).

        ``sigmoid`` of it is ``softmax([-d_b, -d_t])[target]``; the SAM is where it is > 0.
        """
        grid = tuple(features.shape[1:])
        shape = (features.shape[0], *grid) if per_unit else grid
        if self.degenerate is not None:
            return torch.full(shape, -math.inf if self.degenerate == "empty" else math.inf, device=features.device)
        target, background = self.prototypes(features)
        view = (-1,) + (1,) * len(grid)
        delta, middle = (target - background).view(view), ((target + background) / 2).view(view)
        if per_unit:
            return 2 * (features.float() - middle) * delta
        out = torch.zeros(grid, device=features.device)
        for start in range(0, features.shape[0], _CHUNK):
            part = slice(start, start + _CHUNK)
            out += ((features[part].float() - middle[part]) * delta[part]).sum(0)
        return 2 * out

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


def sa_score(sam: torch.Tensor, reference: torch.Tensor) -> float | np.ndarray:
    """SA score = Dice(SAM, reference) (paper Eq. 8); 1.0 when both are empty, as :func:`SegXAILib.metrics.dice`.

    Args:
        sam: (*S) bool, or (K, *S) for K maps at once.
        reference: (*S) bool, the ground truth or the model's own mask.

    Returns:
        a float for one map, a float64 array (K,) for a stack.
    """
    sam = torch.as_tensor(sam).bool()
    reference = torch.as_tensor(reference).to(sam.device, torch.bool)
    dims = tuple(range(sam.ndim - reference.ndim, sam.ndim))
    overlap = (sam & reference).sum(dims, dtype=torch.float64)
    total = sam.sum(dims, dtype=torch.float64) + reference.sum(dtype=torch.float64)
    score = torch.where(total > 0, 2 * overlap / total.clamp(min=1), torch.ones_like(total)).cpu().numpy()
    return float(score) if score.ndim == 0 else score


class _Scorer:
    """SAMs of logits and their SA scores against named reference masks.

    ``input`` resolution: SAMs on the mask grid (logits upsampled); ``feature``: SAMs on the feature grid,
    references area-averaged onto it and voxels mostly in the padding left out.
    """

    def __init__(self, prototypes: SoftMaskPrototypes, references: dict[str, torch.Tensor]) -> None:
        self.prototypes = prototypes
        self.references = references
        self._cache: dict[tuple, torch.Tensor] = {}

    def _on_grid(self, name: str, grid: tuple[int, ...], device: torch.device) -> torch.Tensor:
        key = (name, grid, str(device))
        if key not in self._cache:
            mask = self.references[name] if name != "inside" else torch.ones(self.prototypes.mask_shape, dtype=torch.bool)
            if self.prototypes.resolution == "feature":
                mask = self.prototypes.mask_on_grid(mask, grid)
            self._cache[key] = mask.to(device)
        return self._cache[key]

    def sams(self, logits: torch.Tensor) -> torch.Tensor:
        """(K, *s) logits -> (K, *grid) bool SAMs on the scoring grid."""
        if self.prototypes.resolution == "input":
            return self.prototypes.to_mask_grid(logits) > 0
        return (logits > 0) & self._on_grid("inside", tuple(logits.shape[1:]), logits.device)

    def scores(self, sams: torch.Tensor, name: str) -> np.ndarray:
        """SA scores (K,) of (K, *grid) SAMs against reference ``name``."""
        return np.atleast_1d(sa_score(sams, self._on_grid(name, tuple(sams.shape[1:]), sams.device)))

    def to_mask_grid(self, maps: torch.Tensor) -> torch.Tensor:
        """(K, *grid) float maps of the scoring grid -> (K, *S)."""
        return maps if self.prototypes.resolution == "input" else self.prototypes.to_mask_grid(maps)


def _conv_layers(network: nn.Module) -> list[tuple[str, nn.Module]]:
    """Conv layers to read features from, in registration order.

    MONAI ``Convolution`` blocks that hold no nested block (their output is after normalisation and
    activation: the "deep features" of the paper); plain conv modules for networks without them.
    Minimal stand-in: to be replaced by :func:`SegXAILib.explain.layers.conv_layers`.
    """
    from monai.networks.blocks import Convolution

    blocks = [(name, m) for name, m in network.named_modules() if isinstance(m, Convolution)
              and not any(isinstance(c, Convolution) for c in m.modules() if c is not m)]
    return blocks or [(name, m) for name, m in network.named_modules() if isinstance(m, nn.modules.conv._ConvNd)]


def _divisor(card: ModelCard) -> tuple[int, ...]:
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


def _requested_layers(options: dict[str, Any]) -> list[str] | None:
    """The ``layers`` option as a list of names (a list or a comma-separated string); None if absent."""
    value = options.get("layers")
    if value is None:
        return None
    names = [v.strip() for v in value.split(",")] if isinstance(value, str) else [str(v) for v in value]
    return [n for n in names if n]


class ProtoSegExplainer(Explainer):
    """Segmentation ability of every conv layer and of the last layers' units (ProtoSeg).

    One forward pass of the whole volume on the model grid (padded at the far end to a size the network
    accepts), with hooks on every conv layer; each layer is scored as its output arrives and only the last
    three outputs are kept, so memory stays at about one forward pass. B is the model's target probability;
    G the ground truth when given, else the model's own mask.

    Options (``context.options["protoseg"]``):
        resolution: ``input`` (default, paper: features upsampled to the model grid) or ``feature``
            (B and G area-averaged onto each feature grid: faster per-unit scores).
        layers: names of conv layers to return a SAM probability map for (list or comma-separated);
            default the last feature (decoder) layer.

    Returns:
        maps: ``heat`` = mean of the unit SAMs of the last feature layer (paper Fig. 9), in [0, 1];
            ``layer-<name>`` = the SAM probability ``p_target`` of each selected layer.
        scalars: ``mean_sa`` = mu, mean SA score of the units of the last two feature layers against the
            model's own mask (paper Eq. 12: label-free, so comparable between cases with and without labels;
            low = review this case); ``mean_sa_label`` = the same against the ground truth, when given;
            ``input_separableness`` = SA score of ProtoSeg on the input intensities.
        curves: ``sa_per_layer`` = [{"layer", "sa", "channels", "shape", "output"}] for every conv layer in
            forward order (``output`` marks the layer producing the network's logits, which is not a
            feature layer); ``sa_per_unit`` = [{"layer", "unit", "sa"}] for the last two feature layers.
    """

    name = "protoseg"
    needs_hooks = True
    summary = ("segmentation-ability maps (ProtoSeg): how well each layer's features separate the target; "
               "a low mean SA score flags a case to review")

    def check_applicable(self, model: LoadedModel) -> None:
        super().check_applicable(model)
        if not _conv_layers(model.network):
            raise NotApplicable("protoseg reads the features of conv layers, and this network has none")

    def explain(self, context: ExplainContext) -> Explanation:
        options = context.method_options(self.name)
        resolution = options.get("resolution", "input")
        network = context.model.network
        layers = _conv_layers(network)
        names = [name for name, _ in layers]
        requested = _requested_layers(options)
        unknown = sorted(set(requested or ()) - set(names))
        if unknown:
            raise SegXAIError(f"protoseg: no conv layer named {', '.join(unknown)}; choose from: {', '.join(names)}")

        model_mask = torch.from_numpy(context.predicted_mask)
        reference = torch.from_numpy(np.asarray(context.label, dtype=bool)) if context.label is not None else model_mask
        image = _pad_to_multiple(context.image.float(), _divisor(context.model.card))
        prototypes = SoftMaskPrototypes(torch.from_numpy(context.target_probability), image.shape[2:], resolution)
        scorer = _Scorer(prototypes, {"reference": reference, "model": model_mask})

        curve: list[dict[str, Any]] = []
        maps: dict[str, torch.Tensor] = {}
        recent: deque[tuple[str, torch.Tensor]] = deque(maxlen=3)  # the last feature layers and the output layer

        def probability_map(features: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(prototypes.to_mask_grid(prototypes.logits(features)[None])[0])

        def record(name: str):
            def hook(module: nn.Module, inputs: Any, output: Any) -> None:
                features = (output[0] if isinstance(output, (tuple, list)) else output)[0].detach().float()
                sam = scorer.sams(prototypes.logits(features)[None])
                curve.append({"layer": name, "sa": float(scorer.scores(sam, "reference")[0]),
                              "channels": int(features.shape[0]), "shape": list(features.shape[1:]), "output": False})
                if requested and name in requested:
                    maps[name] = probability_map(features)
                recent.append((name, features))
                context.progress.update("protoseg", len(curve) / (len(layers) + 2), f"layer {name}")
            return hook

        handles = [module.register_forward_hook(record(name)) for name, module in layers]
        try:
            with torch.no_grad():
                output = network(image.to(context.device))
        finally:
            for handle in handles:
                handle.remove()
        output = output[0] if isinstance(output, (tuple, list)) else output

        # the last conv layer is the output layer when it produces the logits themselves
        items = list(recent)
        if items and items[-1][1].shape == output[0].shape:
            curve[-1]["output"] = True
            items = items[:-1]
        if not items:
            raise NotApplicable("protoseg: the network has no conv layer before its output layer")
        unit_layers = items[-2:]
        last_name, last_features = unit_layers[-1]
        if requested is None:
            maps[last_name] = probability_map(last_features)

        units, model_scores, heat = self._unit_scores(unit_layers, scorer)
        context.progress.update("protoseg", (len(layers) + 1) / (len(layers) + 2), "input separableness")
        input_sam = scorer.sams(prototypes.logits(image[0].to(context.device))[None])
        scalars = {"mean_sa": float(np.mean(model_scores)),
                   "input_separableness": float(scorer.scores(input_sam, "reference")[0])}
        if context.label is not None:
            scalars["mean_sa_label"] = float(np.mean([u["sa"] for u in units]))
        context.progress.update("protoseg", 1.0)

        explanation_maps = [ExplanationMap(
            self.name, heat.cpu().numpy().astype(np.float32), "heat", normalise=False,
            description="fraction of the last layer's units whose features place this voxel in the target "
                        "(ProtoSeg unit-average heat map)")]
        explanation_maps += [ExplanationMap(
            self.name, p.cpu().numpy().astype(np.float32), f"layer-{name}", normalise=False,
            description=f"probability that layer {name}'s features put this voxel with the target prototype")
            for name, p in maps.items()]
        return Explanation(
            self.name, explanation_maps, scalars, {"sa_per_layer": curve, "sa_per_unit": units},
            {"reference": "label" if context.label is not None else "model", "resolution": resolution,
             "unit_layers": [name for name, _ in unit_layers], "soft_mask": prototypes.degenerate or "ok",
             "network_grid": list(image.shape[2:])})

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
                for unit, sa in enumerate(scorer.scores(sams, "reference"), start=start):
                    units.append({"layer": name, "unit": unit, "sa": float(sa)})
                model_scores += scorer.scores(sams, "model").tolist()
                if last:
                    counts = sams.sum(0, dtype=torch.float32)
                    heat = counts if heat is None else heat + counts
        return units, model_scores, scorer.to_mask_grid((heat / unit_layers[-1][1].shape[0])[None])[0]
