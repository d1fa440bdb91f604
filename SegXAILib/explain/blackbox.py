"""What the black-box explainers share: the crop they run on, and the target score and its input gradient of
a batch of inputs, in sliding windows.

The black-box methods (occlusion, saliency, SmoothGrad, integrated gradients; one module each) use only the
network's output, never its layers, so they run on TorchScript models too. All of them measure the target
score S of :mod:`.targets` (the target's log-odds summed over R, the model's predicted mask of the target)
on inputs X of the model grid: S(X) for perturbed copies (occlusion), dS/dX for noisy or scaled copies (the
gradient methods).

The crop. The input far from R cannot change S, so every pass runs on a crop of the model grid: R's bounding
box grown by ``margin`` voxels on every side (option ``margin``, default 16: the bundled brain-lesion U-Net's
convolutions reach 15 voxels, and the input gradient of an output voxel is 0.1-0.3% of its peak from 16
voxels on, see :mod:`.misure`), rounded up to the network's input multiple and kept inside the grid, or the
whole grid (``margin: null``). Maps are 0 outside the crop (the metadata gives the crop). A crop within the
card's patch size is one window of its own size (on the demo: a 72^3 crop, about a third of a 96^3 window's
work); a larger one runs in the card's sliding windows (:func:`SegXAILib.inference.sliding_window_predict`,
Gaussian blending, as the segmentation), unless option ``window`` is ``scan``: then the crop, however large,
is one window of its own size (rounded up to the input multiple), as tools without sliding windows run a scan
(captum, MONAI's ``OcclusionSensitivity``): less work than overlapping windows, memory that grows with the crop,
and the network's score on the whole crop rather than the windowed segmentation's. A grid smaller than that
window is padded with the scan's minimum, as inference pads it, the same for every copy.

Gradients through windows. Each window returns its output and the gradient, with respect to the window's
input, of its own part of S (t summed over R inside the window); MONAI blends the gradients with the same
Gaussian weights as the outputs (as Grad-CAM does with layer gradients). In one window this is dS/dX exactly;
over several it is the blend of the windows' gradients, an approximation of the gradient of S computed from
the blended output (exact for a network without spatial context), so integrated gradients' completeness then
holds only approximately (it is reported). S itself is always computed from the blended output.

Batching: several copies (occluded, noisy, on the integration path) go through each window together, up to
``batch`` at a time; copies are independent (eval mode), so batching changes the cost, not the result.
Costs are counted in passes of the crop: one forward pass per copy, and one backward pass per copy for the
gradient methods (a backward costs about one to two forward passes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from ..inference import mixed_precision, sliding_window_predict, window_count
from ..models.networks import input_multiple
from ..progress import Progress
from .base import ExplainContext, ExplanationMap, NotApplicable
from .layers import frozen_parameters
from .options import WINDOWS, MethodOptions, option
from .targets import SCORE_WORDS, log_odds, target_scores

DEFAULT_MARGIN = 16
"""Voxels of context around R's bounding box (see the module docstring)."""

DISPLAY_SIGMA = 1.0
"""Gaussian (voxels of the model grid) that smooths |attribution| into the map shown."""


@dataclass(frozen=True)
class Crop:
    """The part of the model grid the black-box methods run on.

    Attributes:
        slices: the crop on the model grid (K, J, I).
        window: the sliding window: the crop's own (padded) size when it fits in the card's patch, else the patch.
        pad: voxels per axis (K, J, I) that bring the crop to the window where the grid is smaller (0 otherwise),
            split as MONAI pads (half before, the rest after) with the scan's minimum.
    """

    slices: tuple[slice, ...]
    window: tuple[int, ...]
    pad: tuple[int, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(s.stop - s.start for s in self.slices)

    def describe(self, overlap: float) -> dict[str, Any]:
        """The crop for the metadata: its box on the model grid (half-open index ranges), window, windows per pass."""
        padded = tuple(n + p for n, p in zip(self.shape, self.pad))
        return {"box": [[s.start, s.stop] for s in self.slices], "window": list(self.window),
                "windows_per_pass": window_count(padded, self.window, overlap)}


def bounding_box(mask: np.ndarray) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(start, stop) of the smallest box holding every True voxel of a non-empty mask."""
    points = np.nonzero(mask)
    return tuple(int(p.min()) for p in points), tuple(int(p.max()) + 1 for p in points)


def region_crop(region: np.ndarray, margin: int | None, multiple: tuple[int, ...], patch: tuple[int, ...] | None
                ) -> Crop:
    """The crop (module docstring): R's bounding box grown by ``margin`` (``None``: the whole grid), rounded up
    to ``multiple`` where it fits in ``patch`` (``None``: one window whatever its size), centred and kept inside
    the grid; padded where the grid is smaller."""
    shape = region.shape
    if margin is None:
        starts, stops = (0,) * len(shape), shape
    else:
        low, high = bounding_box(region)
        starts = tuple(max(a - margin, 0) for a in low)
        stops = tuple(min(b + margin, n) for b, n in zip(high, shape))
    slices, window, pad = [], [], []
    for start, stop, n, m, p in zip(starts, stops, shape, multiple, patch or (math.inf,) * len(shape)):
        length = stop - start
        if length > p:  # sliding windows of the patch: any length
            slices.append(slice(start, stop))
            window.append(p)
            pad.append(0)
            continue
        wanted = -(-length // m) * m
        if wanted <= n:
            start = min(max(start - (wanted - length) // 2, 0), n - wanted)
            slices.append(slice(start, start + wanted))
            pad.append(0)
        else:  # the grid itself is smaller than a window: the whole axis, padded
            slices.append(slice(0, n))
            pad.append(wanted - n)
        window.append(wanted)
    return Crop(tuple(slices), tuple(window), tuple(pad))


def predicted_region(context: ExplainContext, method: str) -> np.ndarray:
    """R, the model's mask of the target; :class:`NotApplicable` when it is empty (there is nothing to explain)."""
    region = context.predicted_mask
    if not region.any():
        raise NotApplicable(f"the model predicts no voxel of {context.target!r}: {method} explains the score of a "
                            "predicted object, and there is none")
    return region


class CropScorer:
    """S and dS/dX of batches of inputs on the crop (module docstring); counts the passes.

    Args:
        context: the explain context (network, card, scan, target channels, device).
        region: R on the model grid, bool (D, H, W).
        margin: voxels of context around R's bounding box, or ``None`` for the whole grid.
        overlap: the sliding windows' overlap (when the crop is larger than the patch); None: the model's.
        batch: copies per pass.
        window: ``model`` (the card's sliding windows where the crop is larger than its patch) or ``scan`` (the
            crop in one window).
    """

    def __init__(self, context: ExplainContext, region: np.ndarray, margin: int | None, overlap: float | None = None,
                 batch: int = 4, window: str = "model") -> None:
        card = context.model.card
        self.network = context.model.network.to(context.device).eval()
        self.channels = list(context.channels)
        self.kind = card.output
        self.device = context.device
        self.batch = batch
        self.crop = region_crop(region, margin, input_multiple(card),
                                tuple(card.patch_size) if window == "model" else None)
        self.windows = card.windows.adjusted(size=self.crop.window, overlap=overlap)
        self.fill = float(context.image.min())
        self.image = context.image[(..., *self.crop.slices)].float()
        self.weight = torch.from_numpy(region[self.crop.slices].astype(np.float32))[None]
        self.region_voxels = int(region.sum())
        self.forward_passes = 0
        self.backward_passes = 0
        self._widths = [w for before, after in zip(self._half(0), self._half(1)) for w in (before, after)]

    def _half(self, side: int) -> list[int]:
        """Padding before (``side`` 0) or after (1) each axis, in ``F.pad`` order (last axis first)."""
        return [p // 2 if side == 0 else p - p // 2 for p in reversed(self.crop.pad)]

    def _padded(self, x: torch.Tensor, value: float) -> torch.Tensor:
        return F.pad(x, self._widths, value=value) if any(self.crop.pad) else x

    def _unpadded(self, x: torch.Tensor) -> torch.Tensor:
        if not any(self.crop.pad):
            return x
        inner = tuple(slice(p // 2, p // 2 + n) for p, n in zip(self.crop.pad, self.crop.shape))
        return x[(..., *inner)]

    def _summed(self, output: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """S of each example of a stitched output, summed in float64 (occlusion takes differences of large sums)."""
        return (log_odds(output, self.channels, self.kind).double() * weight.double()).flatten(1).sum(1)

    @property
    def one_window(self) -> bool:
        """Whether the (padded) crop is exactly one window: then each input is one network call, without the
        sliding windows' stitching (their Gaussian weights would divide out), as tools without windows run it."""
        return tuple(n + p for n, p in zip(self.crop.shape, self.crop.pad)) == tuple(self.crop.window)

    def _one_call_each(self, predictor, images: torch.Tensor, **coordinates) -> tuple[torch.Tensor, ...]:
        """``predictor`` on each (1, C, *window) input of the batch on the device, as the sliding windows call it
        (one input at a time: a score then does not depend on the batch it came in, so occlusion's differences
        are exactly 0 where a cube changes nothing); its outputs, concatenated, on the CPU."""
        outputs = []
        for image in images.split(1):
            with mixed_precision(self.device):
                out = predictor(image.to(self.device), **coordinates)
            outputs.append(out if isinstance(out, tuple) else (out,))
        return tuple(torch.cat([o[k].float().cpu() for o in outputs]) for k in range(len(outputs[0])))

    def outputs(self, images: torch.Tensor) -> torch.Tensor:
        """The network's stitched output for each of (B, C, *crop) inputs: (B, n_classes, *crop) on the CPU
        (inference mode)."""
        with torch.inference_mode():
            padded = self._padded(images.float(), self.fill)
            if self.one_window:
                (output,) = self._one_call_each(self.network, padded)
            else:
                output = sliding_window_predict(self.network, padded, self.windows, self.device, Progress())
            output = self._unpadded(output)
        self.forward_passes += images.shape[0]
        return output

    def scores_of(self, output: torch.Tensor) -> torch.Tensor:
        """S of each example of an :meth:`outputs` result (B, n_classes, *crop): (B,) float64."""
        return self._summed(output, self.weight)

    def scores(self, images: torch.Tensor) -> torch.Tensor:
        """S of each of (B, C, *crop) inputs: (B,) float64 on the CPU (inference mode)."""
        return self.scores_of(self.outputs(images))

    def gradients(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """dS/dX and S of each of (B, C, *crop) inputs: (B, C, *crop) float32 and (B,) float64, on the CPU."""
        weight = self._padded(self.weight, 0.0)

        def predictor(window: torch.Tensor, coords: list[list[slice]]) -> tuple[torch.Tensor, torch.Tensor]:
            window_weight = weight[(slice(None), *coords[0][2:])].to(window.device)
            with torch.inference_mode(False), torch.enable_grad(), frozen_parameters(self.network):
                x = window.detach().clone().requires_grad_(True)
                output = self.network(x)
                score = target_scores(output, self.channels, window_weight, self.kind).sum()
                (gradient,) = torch.autograd.grad(score, x) if score.requires_grad else (torch.zeros_like(x),)
            return output.detach(), gradient.detach()

        padded = self._padded(images.float(), self.fill)
        if self.one_window:
            output, gradient = self._one_call_each(predictor, padded, coords=[[slice(None)] * padded.ndim])
        else:
            output, gradient = sliding_window_predict(predictor, padded, self.windows, self.device, Progress(),
                                                      with_coord=True)
        self.forward_passes += images.shape[0]
        self.backward_passes += images.shape[0]
        return self._unpadded(gradient).float(), self._summed(output, weight)

    def on_grid(self, values: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """A (..., *crop) map placed on the model grid (``shape``: (..., D, H, W)), 0 outside the crop; float32."""
        grid = np.zeros(shape, np.float32)
        grid[(..., *self.crop.slices)] = values
        return grid

    def metadata(self) -> dict[str, Any]:
        return {"crop": self.crop.describe(self.windows.overlap), "forward_passes": self.forward_passes,
                "backward_passes": self.backward_passes, "batch": self.batch,
                "target_score": f"{SCORE_WORDS} of the target summed over its predicted region "
                                f"({self.region_voxels} voxels), from the network's {self.kind}"}


def chunks(count: int, size: int) -> list[range]:
    """``range(count)`` in consecutive pieces of at most ``size``."""
    return [range(start, min(start + size, count)) for start in range(0, count, size)]


def attribution_maps(method: str, attribution: np.ndarray, shown: str, signed: str) -> list[ExplanationMap]:
    """The two maps of a gradient method from its signed attribution (C, D, H, W) on the model grid.

    The map shown (variant ``None``) is sum_channels |attribution| smoothed by a Gaussian of
    :data:`DISPLAY_SIGMA` voxel (METHODS.md section 8: single-voxel gradients are speckled), min-max scaled for
    display; ``signed`` keeps the attribution summed over the input channels, in its own units.

    Args:
        shown, signed: the two maps' descriptions.
    """
    magnitude = ndimage.gaussian_filter(np.abs(attribution).sum(0), DISPLAY_SIGMA).astype(np.float32)
    return [ExplanationMap(method, magnitude, None, shown),
            ExplanationMap(method, attribution.sum(0).astype(np.float32), "signed", signed, colormap="RdBu_r",
                           threshold=0.0, normalise=False)]


RULES = ("quadratic", "trapezoid", "left", "right", "middle")
"""The integration rules of :func:`path_integral` (explained in :mod:`.integrated_gradients`)."""
ENDPOINT_RULES = ("quadratic", "trapezoid")
"""Rules whose path starts at the baseline and ends at the scan (their S(X'), S(X) cost nothing more)."""


def riemann_rule(steps: int, rule: str) -> tuple[list[float], list[float]]:
    """The path's points a_k in [0, 1] and their weights w_k (``steps`` >= 2; :mod:`.integrated_gradients`)."""
    if rule == "quadratic":
        u = [k / (steps - 1) for k in range(steps)]
        weights = [2 * v / (steps - 1) for v in u]
        weights[0] /= 2
        weights[-1] /= 2
        return [v * v for v in u], weights
    weights = [1 / steps] * steps
    if rule == "trapezoid":  # 1/(m-1) apart: captum weighs them 1/m, which scales the integral by (m-1)/m
        weights = [1 / (steps - 1)] * steps
        weights[0] /= 2
        weights[-1] /= 2
        alphas = torch.linspace(0, 1, steps)
    elif rule == "left":
        alphas = torch.linspace(0, 1 - 1 / steps, steps)
    elif rule == "right":
        alphas = torch.linspace(1 / steps, 1, steps)
    elif rule == "middle":
        alphas = torch.linspace(1 / (2 * steps), 1 - 1 / (2 * steps), steps)
    else:
        raise ValueError(f"unknown rule {rule!r}; use one of {RULES}")
    return alphas.tolist(), weights


@dataclass(frozen=True)
class PathIntegral:
    """Integrated gradients of S on the crop, from a baseline X' to the scan X (:func:`path_integral`).

    Attributes:
        attribution: (C, *crop) float32, (X - X') * sum_k w_k dS/dX(X' + a_k (X - X')).
        alphas: the path's points a_k.
        path_scores: S at each point of the path.
        score, baseline_score: S(X) and S(X').
    """

    attribution: np.ndarray
    alphas: list[float]
    path_scores: list[float]
    score: float
    baseline_score: float

    def completeness(self) -> dict[str, float]:
        """The completeness check: ``attribution_sum`` against S(X) - S(X'), their difference
        (``completeness_gap``) and that difference over |S(X) - S(X')| (``relative_gap``)."""
        attribution_sum = float(self.attribution.astype(float).sum())
        change = self.score - self.baseline_score
        gap = attribution_sum - change
        return {"attribution_sum": attribution_sum, "completeness_gap": gap,
                "relative_gap": abs(gap) / abs(change) if change != 0 else 0.0}


def path_integral(scorer: CropScorer, baseline: torch.Tensor, steps: int, rule: str, progress: Progress,
                  stage: str) -> PathIntegral:
    """Integrated gradients of S from ``baseline`` (X', shaped as ``scorer.image``, (1, C, *crop)) to the crop's
    scan, with ``steps`` points of ``rule`` (:func:`riemann_rule`), ``scorer.batch`` points per pass; progress
    reported as ``stage``. Cost: ``steps`` forward and backward passes of the crop (two more forward passes for
    a rule not in :data:`ENDPOINT_RULES`)."""
    x = scorer.image
    alphas, weights = riemann_rule(steps, rule)
    total = torch.zeros_like(x[0])
    path_scores: list[float] = []
    for part in chunks(steps, scorer.batch):
        progress.update(stage, part.start / steps, f"steps {part.start + 1}-{part.stop} of {steps}")
        a = torch.tensor(alphas[part.start:part.stop]).view(-1, *[1] * (x.ndim - 1))
        gradient, score = scorer.gradients(baseline + a * (x - baseline))
        w = torch.tensor(weights[part.start:part.stop]).view(-1, *[1] * (x.ndim - 1))
        total += (w * gradient).sum(0)
        path_scores += score.tolist()
    if rule in ENDPOINT_RULES:
        baseline_score, score = path_scores[0], path_scores[-1]
    else:
        baseline_score, score = scorer.scores(torch.cat([baseline, x])).tolist()
    attribution = ((x - baseline)[0] * total).numpy()
    return PathIntegral(attribution, alphas, path_scores, score, baseline_score)


@dataclass(frozen=True)
class CropOptions(MethodOptions):
    """Options of every black-box method: ``margin`` (voxels of context around R's bounding box; ``null``: the
    whole grid), ``overlap`` (of the sliding windows, when the crop is larger than the card's patch) and
    ``window`` (``scan``: the crop in one window, module docstring)."""

    margin: int | None = option(DEFAULT_MARGIN, minimum=0)
    overlap: float | None = option(None, check=lambda v: 0 <= v < 1,
                                  must="a number in [0, 1), or null: the model's own windows")
    window: str = option("model", choices=WINDOWS)
