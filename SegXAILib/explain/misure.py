"""MiSuRe: sufficient and minimally sufficient regions in 3D (Hasany et al.; METHODS.md section 4).

Notation: X_0 the scan on the model grid, b the baseline (a "switched-off" voxel), f the network's softmax
as it runs on every perturbed scan (one pass, in sliding windows beyond the patch size, followed by the
card's postprocessing, :attr:`ExplainContext.postprocess`; no test-time mirroring, which would cost 8
passes a step), M_0 = f(X_0)'s mask of the target (argmax in one of its channels). M_0 is f's own
prediction, not the segmentation's (which averages mirrored passes): a Dice against another prediction
measures how the two differ as well (on the demo, f's single unprocessed pass has Dice 0.80 with the
segmentation, its postprocessed one 0.96); ``dice_with_segmentation`` in the metadata gives it.

Stage 1, sufficient region (SR): the network sees X' = X_0 inside M and b outside (M = M_0 first); M is
dilated with a ball of ``radius`` voxels until the target mask of f(X') has Dice >= ``tau`` with M_0,
at most ``max_dilations`` times (the metadata says when the cap was reached before ``tau``).

Stage 2, minimally sufficient region (MSR): a mask M on a grid ``coarse`` times coarser than the model
grid (trilinear upsampling, ``align_corners=False``, :func:`SegXAILib.upsampling.upsample_to`), set
to 1 on every coarse cell that touches the SR and 0 elsewhere, minimises

    lambda * mean|M| + gamma * TV(M) + 1 - sum_{i in {0, target}} alpha_i * softDice_i(f(X_M), f(X_0)),
    X_M = X_SR * M + b * (1 - M),   softDice_i(p, q) = (2 sum p_i q_i + eps) / (sum p_i + sum q_i + eps)

with AdamW (torch defaults besides ``lr``), and after every step M < 0.2 -> 0, M > 1 -> 1. Channel 0
is the background; the target's probability is the sum of its channels. The Dice uses probabilities,
never argmax masks (an argmax has no gradient). mean|M| is over the coarse cells of the whole model
grid and TV is the anisotropic ``sum_axes sum |dM|^beta`` over them divided by the same count, as the
paper's means over the image domain; the soft Dice sums run over the whole model grid.

Outputs: maps ``misure-sr`` (0/1) and ``misure-msr`` (M upsampled, times the SR and the window: outside
them X_SR is already b, so M has no effect there and is shown as 0), both in [0, 1] with units
(``normalise=False``); scalars ``dilations``, ``dice_sufficient`` (stage 1's last Dice),
``dice_explained`` = Dice(target mask of f(X_MSR), M_0), ``perturbation_ratio`` = nonzero voxels of
the MSR map / voxels of M_0; curves ``dilation_dice`` and ``loss``; forward/backward counts and
seconds in the metadata. An empty M_0 raises :class:`NotApplicable` (there is no object to explain).

Where f runs (speed). Outside the SR, X' and X_M equal b, so each pass runs on a crop: the SR's
bounding box plus ``margin`` voxels (default 16; ``None``: the whole grid), aligned to the network's
size divisor and the coarse factor. Beyond the crop the perturbed input is b everywhere, and the model
is taken to predict background there (one-hot); M_0 lies inside the crop, so the target Dice is
exact under that assumption, and the Dice sums include the grid outside the crop as constants.
A crop within the card's patch size runs in one pass (padded with b to the size divisor); a larger
crop runs in sliding windows of the patch size for stage 1 and the final Dice. Stage 2 optimises on
the whole crop in one differentiable pass when it has at most ``max_voxels`` voxels (default: as many
as the card's patch, so a step costs about one window's forward and backward pass, and its memory),
else on a window of the patch size around the centre of M_0: beyond that window the scan is removed
(b, M = 0), as beyond the crop, because the network's pass on the window sees b there; the MSR and its
Dice explained are of that volume (keeping the SR whole beyond the window, as before, drew the window's
box into the map and kept a part the optimisation never saw).
Stage 1 stops early when a dilation no longer changes M (the SR is the whole grid).

Why 16 voxels: the convolutions of the bundled brain-lesion U-Net (3 stride-2 levels of 3^3
kernels) reach 15 voxels: the largest input gradient of an output voxel is 4-14% of its peak 4-15
voxels away and 0.1-0.3% from 16 voxels on, where only instance normalisation's whole-input
statistics remain. Those statistics make a crop an approximation of the whole-grid f for such networks
(``margin: null`` passes the whole grid, slower); for a network whose receptive field fits in the
margin and b = 0 (the zero padding of its convolutions), a crop gives the whole-grid result.

Options (``--option misure.NAME=VALUE``; defaults in brackets): ``radius`` [3], ``tau`` [0.9],
``max_dilations`` [20], ``baseline`` [null: the scan's no-signal level,
:func:`SegXAILib.preprocessing.no_signal_level`, 0 for a magnitude image, the minimum (air) for a z-scored
one; or a number in normalised intensity units, or ``"min"``, the scan's minimum], ``coarse`` [4],
``steps`` [100], ``lr`` [0.1], ``lambda`` [0.01], ``gamma`` [0; with 0 no term ties a coarse cell to its
neighbours and cells survive independently, a speckle at the cell period; 0.1 halves it, docs/misure.md],
``tv_beta`` [1], ``alpha_background`` [1], ``alpha_target`` [2], ``margin`` [16; null], ``max_voxels``
[the patch's voxels]. Why no signal and not 0: on z-scored MRI (the bundled lesion models), 0 is the
head's mean intensity, mid-grey tissue; a region "switched off" to it is a grey head, not an absent one.
On the demo the region with b = 0 never became sufficient (Dice <= 0.45 up to the cap), with air after
10 dilations (docs/misure.md has the measurements).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from ..errors import SegXAIError
from ..faithfulness import resolve_baseline
from ..inference import network_probabilities, sliding_window_predict, target_mask
from ..metrics import dice
from ..models.card import Windows
from ..models.networks import input_multiple
from ..padding import padding_to
from ..preprocessing import no_signal_level
from ..upsampling import upsample_to
from .base import ExplainContext, Explainer, Explanation, ExplanationMap, NotApplicable
from .layers import frozen_parameters
from .options import MethodOptions, option

CLAMP_BELOW = 0.2
"""After each step mask values below this become 0 (Hoyer et al., as the paper)."""
EPS = 1e-5
"""The soft Dice's epsilon (numerator and denominator)."""


@dataclass(frozen=True)
class MiSuReOptions(MethodOptions):
    """The method's options (``--option misure.NAME=VALUE``; ``lambda`` is the L1 weight, field ``lam``)."""

    aliases: ClassVar[Mapping[str, str]] = {"lambda": "lam"}

    radius: int = option(3, minimum=1)
    tau: float = option(0.9, check=lambda v: 0 < v <= 1, must="a number in (0, 1]")
    max_dilations: int = option(20, minimum=0)
    baseline: float | str | None = option(None, check=lambda v: v == "min" or math.isfinite(v),
                                          must="a number or 'min' (the scan's minimum)")
    coarse: int = option(4, minimum=1)
    steps: int = option(100, minimum=0)
    lr: float = option(0.1, check=lambda v: v > 0, must="a number > 0")
    lam: float = option(0.01, minimum=0)
    gamma: float = option(0.0, minimum=0)
    tv_beta: float = option(1.0, check=lambda v: v > 0, must="a number > 0")
    alpha_background: float = option(1.0, minimum=0)
    alpha_target: float = option(2.0, minimum=0)
    margin: int | None = option(16, minimum=0)
    max_voxels: int | None = option(None, minimum=1)


# ------------------------------------------------------------------ geometry
@dataclass(frozen=True)
class Box:
    """Half-open voxel box ``[start, stop)`` on the model grid."""

    start: tuple[int, ...]
    stop: tuple[int, ...]

    @property
    def slices(self) -> tuple[slice, ...]:
        return tuple(slice(a, b) for a, b in zip(self.start, self.stop))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in zip(self.start, self.stop))

    @property
    def voxels(self) -> int:
        return math.prod(self.shape)

    def within(self, outer: Box) -> tuple[slice, ...]:
        """This box's slices in the coordinates of ``outer`` (which contains it)."""
        return tuple(slice(a - o, b - o) for a, b, o in zip(self.start, self.stop, outer.start))


def bounding_box(mask: np.ndarray) -> Box:
    """The smallest box holding every True voxel of a non-empty (*S) mask."""
    start, stop = [], []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        start.append(int(hits[0]))
        stop.append(int(hits[-1]) + 1)
    return Box(tuple(start), tuple(stop))


def crop_box(mask: np.ndarray, margin: int | None, align: tuple[int, ...]) -> Box:
    """``mask``'s bounding box grown by ``margin``, start rounded down and stop up to multiples of ``align``
    (a stop past the grid is clipped to it); ``margin=None``: the whole grid."""
    shape = mask.shape
    if margin is None:
        return Box((0,) * len(shape), tuple(shape))
    tight = bounding_box(mask)
    start = tuple(max(a - margin, 0) // k * k for a, k in zip(tight.start, align))
    stop = tuple(min(-(-(b + margin) // k) * k, n) for b, k, n in zip(tight.stop, align, shape))
    return Box(start, stop)


def ball(radius: int, ndim: int = 3) -> np.ndarray:
    """Bool structuring element: offsets with squared length <= radius^2, shape (2r+1,)*ndim."""
    grid = np.mgrid[(slice(-radius, radius + 1),) * ndim]
    return (grid**2).sum(0) <= radius**2


def dilate(mask: np.ndarray, structure: np.ndarray) -> np.ndarray:
    """Binary dilation computed only on the mask's bounding box grown by the structure's radius."""
    grown = bounding_box(mask)
    reach = [s // 2 for s in structure.shape]
    box = Box(tuple(max(a - r, 0) for a, r in zip(grown.start, reach)),
              tuple(min(b + r, n) for b, r, n in zip(grown.stop, reach, mask.shape)))
    out = np.zeros_like(mask)
    out[box.slices] = ndimage.binary_dilation(mask[box.slices], structure)
    return out


# ------------------------------------------------------------------ the network on a crop
class CropPredictor:
    """f on a crop of a perturbed volume (see the module docstring); counts the passes.

    Args:
        network: the segmentation network (eval mode, on ``device``).
        windows: the card's sliding windows; crops up to their size run in one pass.
        divisor: per-axis multiple the network's input size must be.
        baseline: b, the value the crop is padded with (the perturbed volume's value around the crop).
        output: what the network returns (the card's ``output``): ``logits`` or ``probabilities``.
    """

    def __init__(self, network: nn.Module, windows: Windows, divisor: tuple[int, ...], baseline: float,
                 device: torch.device, output: str = "logits") -> None:
        self.network = network
        self.output = output
        self.windows = windows
        self.patch = tuple(windows.size)
        self.divisor = tuple(divisor)
        self.baseline = baseline
        self.device = device
        self.forward_passes = 0
        self.backward_passes = 0

    def fits(self, shape: tuple[int, ...]) -> bool:
        return all(s <= p for s, p in zip(shape, self.patch))

    def __call__(self, x: torch.Tensor, differentiable: bool = False) -> torch.Tensor:
        """(1, C, *s) crop -> (1, n_classes, *s) softmax on ``device``.

        ``differentiable``: one pass that keeps the graph (the caller freezes the parameters); otherwise an
        inference-mode pass, in sliding windows of the patch size when the crop is larger.
        """
        shape = tuple(x.shape[2:])
        self.forward_passes += 1
        if differentiable or self.fits(shape):
            pad = padding_to(shape, tuple(-(-s // d) * d for s, d in zip(shape, self.divisor)))
            with torch.inference_mode(not differentiable):
                logits = self.network(F.pad(x.to(self.device), pad, value=self.baseline))
        else:
            pad = padding_to(shape, self.patch)
            with torch.inference_mode():
                logits = sliding_window_predict(self.network, F.pad(x, pad, value=self.baseline), self.windows,
                                                self.device).to(self.device)
        inner = tuple(slice(p, p + s) for p, s in zip(pad[-2::-2], shape))
        return network_probabilities(logits[(..., *inner)], self.output)


GridPrediction = Callable[[torch.Tensor, Box], np.ndarray]
"""f of a volume that is b outside ``box``, given its crop (1, C, *box): the target mask (*S), bool."""


def grid_predictor(predictor: CropPredictor, shape: tuple[int, ...], channels: list[int],
                   postprocess: Callable[[np.ndarray], np.ndarray] | None) -> GridPrediction:
    """The model's target mask of a perturbed volume as the pipeline makes it: f on the crop, background
    (one-hot) beyond it (where the input is b), then the card's postprocessing of the whole grid."""

    def predict(x: torch.Tensor, box: Box) -> np.ndarray:
        crop = predictor(x)[0].cpu().numpy()
        probabilities = np.zeros((crop.shape[0], *shape), np.float32)
        probabilities[0] = 1.0
        probabilities[(slice(None), *box.slices)] = crop
        if postprocess is not None:
            probabilities = postprocess(probabilities)
        return target_mask(probabilities, channels)
    return predict


# ------------------------------------------------------------------ stage 1
@dataclass
class SufficientRegion:
    """Stage 1's result: the SR mask (*S), its dilations, the Dice after each, and its crop ``box``."""

    mask: np.ndarray
    dilations: int
    dice: list[float]
    box: Box


def sufficient_region(predict: GridPrediction, image: torch.Tensor, m0: np.ndarray, baseline: float,
                      options: MiSuReOptions, align: tuple[int, ...],
                      on_check: Callable[[int, float], None] = lambda d, s: None) -> SufficientRegion:
    """Dilate M_0 until Dice(target mask of f(X'), M_0) >= tau or the cap (module docstring, stage 1).

    Args:
        predict: f's target mask of a perturbed volume (:func:`grid_predictor`).
        image: X_0, (1, C, *S).
        m0: the model's target mask of X_0 (``predict`` of the whole scan), bool (*S), non-empty.
        on_check: called with (dilations, Dice) after each pass.
    """
    structure = ball(options.radius, m0.ndim)
    mask, dilations, scores = m0, 0, []
    while True:
        box = crop_box(mask, options.margin, align)
        kept = torch.from_numpy(mask[box.slices])
        x = torch.where(kept, image[(..., *box.slices)], torch.tensor(baseline, dtype=image.dtype))
        scores.append(dice(predict(x, box), m0))
        on_check(dilations, scores[-1])
        if scores[-1] >= options.tau or dilations >= options.max_dilations or mask.all():
            return SufficientRegion(mask, dilations, scores, box)
        mask = dilate(mask, structure)
        dilations += 1


# ------------------------------------------------------------------ stage 2
def soft_dice(p: torch.Tensor, q: torch.Tensor, outside: tuple[float, float, float] = (0.0, 0.0, 0.0)
              ) -> torch.Tensor:
    """(2 sum pq + eps) / (sum p + sum q + eps) of probabilities (never argmax: it must have a gradient).

    ``outside`` adds (sum pq, sum p, sum q) of voxels not in ``p`` and ``q`` (the grid outside the window).
    """
    overlap, sum_p, sum_q = outside
    return (2 * ((p * q).sum() + overlap) + EPS) / (p.sum() + sum_p + q.sum() + sum_q + EPS)


def total_variation(mask: torch.Tensor, beta: float) -> torch.Tensor:
    """Anisotropic TV of a (*s) mask: sum over axes of sum |forward difference|^beta."""
    return sum((mask.diff(dim=axis).abs() ** beta).sum() for axis in range(mask.ndim))


def clamp_mask_(mask: torch.Tensor) -> torch.Tensor:
    """In place: values below 0.2 -> 0, above 1 -> 1."""
    return mask.masked_fill_(mask < CLAMP_BELOW, 0.0).clamp_(max=1.0)


@dataclass
class DiceTerm:
    """One alpha_i * softDice_i term: the reference f(X_0) of channel group i on the window, and the
    (sum pq, sum p, sum q) of the rest of the grid, where the perturbed input is b and its prediction fixed."""

    channels: list[int]
    weight: float
    reference: torch.Tensor
    outside: tuple[float, float, float]

    def __call__(self, probabilities: torch.Tensor) -> torch.Tensor:
        """(1, n_classes, *w) perturbed probabilities -> weighted soft Dice."""
        return self.weight * soft_dice(probabilities[0, self.channels].sum(0), self.reference, self.outside)


def outside_sums(reference: np.ndarray, window: Box, background: bool) -> tuple[float, float, float]:
    """(sum pq, sum p, sum q) over the grid outside ``window`` for one channel group, where the input is b
    and the model is taken to predict background: p = 1 for the background group, 0 for the target.

    Args:
        reference: q = f(X_0) of the group, (*S).
    """
    q_total = float(reference.sum(dtype=np.float64))
    beyond_q = q_total - float(reference[window.slices].sum(dtype=np.float64))
    beyond_voxels = reference.size - window.voxels
    return (beyond_q, float(beyond_voxels), beyond_q) if background else (0.0, 0.0, beyond_q)


@dataclass
class CoarseMask:
    """The optimised mask: ``cells`` on the whole coarse grid, of which the window's cells are free.

    The window's cells and a one-cell halo are upsampled together, so the window's fine mask equals the
    whole grid's upsampled mask there (trilinear interpolation reads one neighbour cell each side). The
    window starts on a cell boundary (a multiple of ``factor``).
    """

    cells: torch.Tensor
    factor: int
    window: Box

    def __post_init__(self) -> None:
        k = self.factor
        grid = self.cells.shape
        self.free = Box(tuple(a // k for a in self.window.start), tuple(-(-b // k) for b in self.window.stop))
        self.halo = Box(tuple(max(a - 1, 0) for a in self.free.start),
                        tuple(min(b + 1, n) for b, n in zip(self.free.stop, grid)))
        offset = tuple(a - h * k for a, h in zip(self.window.start, self.halo.start))
        self._fine = tuple(slice(o, o + n) for o, n in zip(offset, self.window.shape))

    def initial(self) -> torch.Tensor:
        """The free cells' starting values (a copy)."""
        return self.cells[self.free.slices].clone()

    def local(self, free: torch.Tensor) -> torch.Tensor:
        """The halo'd cells with ``free`` in place (differentiable in ``free``)."""
        local = self.cells[self.halo.slices].clone()
        local[self.free.within(self.halo)] = free
        return local

    def on_window(self, local: torch.Tensor) -> torch.Tensor:
        """Halo'd cells -> the fine mask on the window, (*w)."""
        size = tuple(n * self.factor for n in local.shape)
        return upsample_to(local[None, None], size)[(0, 0, *self._fine)]

    def on_grid(self, free: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """The whole grid's fine mask (*S) with ``free`` in place."""
        cells = self.cells.clone()
        cells[self.free.slices] = free
        size = tuple(n * self.factor for n in cells.shape)
        return upsample_to(cells[None, None], size)[(0, 0, *(slice(0, n) for n in shape))]


def initial_cells(sr: np.ndarray, factor: int) -> torch.Tensor:
    """1 on every coarse cell touching the SR, else 0: (ceil(S / factor)) float32."""
    shape = tuple(-(-n // factor) * factor for n in sr.shape)
    padded = np.zeros(shape, np.float32)
    padded[tuple(slice(0, n) for n in sr.shape)] = sr
    return F.max_pool3d(torch.from_numpy(padded)[None, None], factor)[0, 0] if sr.ndim == 3 else \
        F.max_pool2d(torch.from_numpy(padded)[None, None], factor)[0, 0]


def optimise_mask(predictor: CropPredictor, x_sr: torch.Tensor, mask: CoarseMask, terms: list[DiceTerm],
                  options: MiSuReOptions,
                  on_step: Callable[[int, torch.Tensor, float], None] = lambda s, m, v: None) -> torch.Tensor:
    """Stage 2 on the window: returns the free coarse cells after ``options.steps`` AdamW steps.

    Args:
        x_sr: X_SR on the window, (1, C, *w), on the predictor's device.
        terms: the background and target soft-Dice terms.
        on_step: called after each step (and its clamp) with (step, free cells, loss); the cells tensor is
            updated in place by later steps (clone it to keep it).
    """
    cells = mask.cells.numel()
    fixed_l1 = float(mask.cells.abs().sum() - mask.cells[mask.free.slices].abs().sum())
    free = mask.initial().requires_grad_(True)
    optimiser = torch.optim.AdamW([free], lr=options.lr)
    b = predictor.baseline
    with torch.enable_grad(), frozen_parameters(predictor.network):
        for step in range(options.steps):
            optimiser.zero_grad()
            local = mask.local(free)
            fine = mask.on_window(local)
            probabilities = predictor(x_sr * fine + b * (1 - fine), differentiable=True)
            loss = (options.lam * (free.abs().sum() + fixed_l1) / cells
                    + options.gamma * total_variation(local, options.tv_beta) / cells
                    + 1 - sum(term(probabilities) for term in terms))
            loss.backward()
            predictor.backward_passes += 1
            optimiser.step()
            with torch.no_grad():
                clamp_mask_(free)
            on_step(step, free.detach(), float(loss.detach()))
    return free.detach()


def centred_window(m0: np.ndarray, crop: Box, patch: tuple[int, ...], align: tuple[int, ...]) -> Box:
    """A box of (up to) the patch size, rounded down to ``align``, inside ``crop``, around M_0's centre."""
    tight = bounding_box(m0)
    size = [min(max(p // k * k, k), n) for p, k, n in zip(patch, align, crop.shape)]
    start = []
    for (a, b), s, k, lo, hi in zip(zip(tight.start, tight.stop), size, align, crop.start, crop.stop):
        begin = ((a + b) // 2 - s // 2) // k * k
        start.append(min(max(begin, lo), max(hi - s, lo)))
    return Box(tuple(start), tuple(min(a + s, hi) for a, s, hi in zip(start, size, crop.stop)))


# ------------------------------------------------------------------ explainer
class MiSuRe(Explainer):
    """Sufficient region by dilation, then the minimally sufficient region by optimisation (module docstring).

    Model-agnostic: it needs the network's output and its gradient with respect to the input only.
    """

    name: ClassVar[str] = "misure"
    Options = MiSuReOptions
    needs_hooks: ClassVar[bool] = False
    summary: ClassVar[str] = ("MiSuRe: the smallest part of the scan around the target that still gives the same "
                              "segmentation (options: radius, tau, baseline, coarse, steps, lambda, margin)")

    def explain(self, context: ExplainContext) -> Explanation:
        start = time.perf_counter()
        options: MiSuReOptions = context.options_for(self)
        if 0 in context.channels:
            raise SegXAIError("MiSuRe explains a foreground target; channel 0 is its background term")
        if not context.predicted_mask.any():
            raise NotApplicable(f"the model predicts no voxel of {context.target!r}: MiSuRe explains a predicted "
                                "object, and there is none")
        card = context.model.card
        image = context.image.float()
        shape = tuple(image.shape[2:])
        align = tuple(math.lcm(int(d), options.coarse) for d in input_multiple(card))
        b = (no_signal_level(image.numpy()) if options.baseline is None
             else resolve_baseline(options.baseline, image))
        predictor = CropPredictor(context.model.network, card.windows, input_multiple(card), b,
                                  context.device, card.output)
        # f(X_0) as f runs on every perturbed scan (one pass, the card's postprocessing, no test-time
        # mirroring): comparing f of a perturbed scan with another prediction would measure their difference
        reference = predictor(image)[0].cpu().numpy()
        if context.postprocess is not None:
            reference = context.postprocess(reference)
        m0 = target_mask(reference, context.channels)
        if not m0.any():
            raise NotApplicable(f"the network's single pass predicts no voxel of {context.target!r} (the segmentation "
                                "averages mirrored passes): MiSuRe has no object to explain")
        predict = grid_predictor(predictor, shape, context.channels, context.postprocess)
        progress = context.progress
        stage1 = sufficient_region(
            predict, image, m0, b, options, align,
            lambda d, s: progress.update(self.name, 0.1 * d / max(options.max_dilations, 1),
                                         f"dilation {d}: Dice {s:.3f}"))
        seconds_stage1 = time.perf_counter() - start

        sr = stage1.mask
        crop = stage1.box
        whole_crop = crop.voxels <= (options.max_voxels or math.prod(card.patch_size))
        window = crop if whole_crop else centred_window(m0, crop, predictor.patch, align)
        in_window = np.zeros_like(sr)
        in_window[window.slices] = True
        mask = CoarseMask(initial_cells(sr & in_window, options.coarse).to(context.device), options.coarse, window)
        x_sr = torch.where(torch.from_numpy(sr[window.slices]), image[(..., *window.slices)],
                           torch.tensor(b, dtype=image.dtype)).to(context.device)
        terms = []
        for group, weight, background in (([0], options.alpha_background, True),
                                          (context.channels, options.alpha_target, False)):
            q = reference[group].sum(0)
            terms.append(DiceTerm(group, float(weight),
                                  torch.from_numpy(q[window.slices].astype(np.float32)).to(context.device),
                                  outside_sums(q, window, background)))
        losses: list[float] = []

        def on_step(step: int, _free: torch.Tensor, loss: float) -> None:
            losses.append(loss)
            progress.update(self.name, 0.1 + 0.9 * (step + 1) / max(options.steps, 1), f"step {step + 1}")

        free = optimise_mask(predictor, x_sr, mask, terms, options, on_step)
        # the network saw b beyond the window: the MSR is cut there (trilinear weights reach 2 voxels past it)
        msr = mask.on_grid(free, shape).cpu().numpy() * (sr & in_window)

        # Dice explained: the network on X_MSR = X_SR * M + b (1 - M), which is b beyond the window
        fine = torch.from_numpy(msr[window.slices])
        explained = predict(image[(..., *window.slices)] * fine + b * (1 - fine), window)
        progress.update(self.name, 1.0, "done")

        objects = int(m0.sum())
        sufficient = stage1.dice[-1] >= options.tau
        scalars = {"dilations": float(stage1.dilations), "dice_sufficient": stage1.dice[-1],
                   "dice_explained": dice(explained, m0), "perturbation_ratio": float((msr > 0).sum()) / objects}
        reach_mm = None if context.spacing is None else stage1.dilations * options.radius * min(context.spacing)
        head = sr_description(sufficient, stage1, options.tau, context.target, reach_mm)
        maps = [
            ExplanationMap(self.name, sr.astype(np.float32), "sr", normalise=False, threshold=0.5, description=head),
            ExplanationMap(self.name, msr.astype(np.float32), "msr", normalise=False, threshold=CLAMP_BELOW,
                           description=f"minimally sufficient region: how much of each voxel the model needs to find "
                                       f"the {context.target} (0 = not needed, 1 = kept whole; MiSuRe stage 2)")]
        metadata: dict[str, Any] = {
            "sufficient": sufficient, "baseline": b, "radius": options.radius,
            "tau": options.tau, "coarse": options.coarse, "steps": options.steps,
            "margin": options.margin, "crop": [list(crop.start), list(crop.stop)],
            "stage2": "crop" if whole_crop else "window", "window": [list(window.start), list(window.stop)],
            "object_voxels": objects, "dice_with_segmentation": dice(m0, context.predicted_mask),
            "sr_voxels": int(sr.sum()), "sr_fraction_of_grid": float(sr.mean()),
            "forward_passes": predictor.forward_passes,
            "backward_passes": predictor.backward_passes, "seconds_stage1": round(seconds_stage1, 3),
            "seconds": round(time.perf_counter() - start, 3)}
        if not sufficient:
            metadata["note"] = (f"stage 1 stopped after {stage1.dilations} dilations (the cap, or the whole grid) at "
                                f"Dice {stage1.dice[-1]:.3f} < tau {options.tau}: the region is not sufficient; raise "
                                "max_dilations or try another baseline")
        if not whole_crop:
            metadata["note_stage2"] = ("the crop exceeded max_voxels: the mask was optimised on a patch-sized window "
                                       "around the object's centre; beyond it the scan is removed (set to the "
                                       "baseline) in the MSR and in its Dice")
        return Explanation(self.name, maps, scalars,
                           {"dilation_dice": stage1.dice, "loss": losses}, metadata)


def sr_description(sufficient: bool, stage1: SufficientRegion, tau: float, target: str,
                   reach_mm: float | None) -> str:
    """The SR map's caption: what the region is, and when it is not sufficient, that the model needs more."""
    grown = (f"the {target} and about {reach_mm:.0f} mm around it" if reach_mm is not None
             else f"the {target} grown {stage1.dilations} times")
    if sufficient:
        return (f"sufficient region: the part of the scan that, alone, lets the model find the {target} again: "
                f"{grown} (MiSuRe stage 1; overlap with its own {target}, Dice, {stage1.dice[-1]:.2f})")
    return (f"region tried by MiSuRe stage 1, {grown}: even from it the model finds only part of the {target} "
            f"again (overlap, Dice, {stage1.dice[-1]:.2f} < {tau:.2f}): it needs more of the scan than this")
