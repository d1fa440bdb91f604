"""Seg-Grad-CAM and Grad-CAM++ for 3D segmentation networks (METHODS.md section 1).

The target score is the target's log-odds summed over a region R (:mod:`.targets`, shared by every gradient
and perturbation method):

    score = sum_{p in R} t(p),   t = logsumexp_{c in T} z_c - logsumexp_{c not in T} z_c

from the logits z, or the same from log-probabilities for a network that returns probabilities (the model
card's ``output``): the maps of a network and of that network followed by a softmax are the same. (METHODS.md
section 1 names the sum of the target's logits; with two classes t is the logit difference z_1 - z_0, and the
raw logit is not defined for a network that returns probabilities, see :mod:`.targets`.)

R is the model's predicted mask of the target (default, Vinogradova et al.; when that mask is
empty the whole volume is used and the metadata says so), a box (option ``box``:
``[k0, k1, j0, j1, i0, i1]``, half-open index ranges on the model grid), a mask (option ``mask``: bool
array on the model grid) or the whole volume (option ``region: "all"``). With A_k the k-th channel of
the chosen layer's output and G_k = d score / d A_k:

    Grad-CAM:   alpha_k = mean_p G_k(p)
    Grad-CAM++: alpha_k = sum_p a_k(p) ReLU(G_k(p)),
                a_k(p) = G_k(p)^2 / (2 G_k(p)^2 + sum_q A_k(q) G_k(p)^3)   (0 where G_k(p) = 0)
    CAM = ReLU(sum_k alpha_k A_k)

Grad-CAM++ uses Chattopadhay et al.'s closed form (their eq. 19) for an exponential of the score
(the exponential cancels; second and third derivatives become powers of the first), as
pytorch-grad-cam does. The two classes differ only in :meth:`SegGradCAM.channel_weights`.

Resolution convention: a CAM at a coarser layer is brought to the model grid with
``F.interpolate(mode="trilinear", align_corners=False)`` (voxel centres, as PyTorch and captum do;
``scipy.ndimage.zoom`` uses a different grid), *after* the ReLU.

Layers (option ``layer``, a spec or a comma-separated list; see :mod:`.layers`): ``last_decoder``
(default), ``bottleneck``, ``decoder_all`` (each decoder stage's CAM min-max normalised to [0, 1], then
averaged: Mullan & Sonka) or module names. One map per spec (specs naming the same layers give one); the
default's variant is ``None``, ``decoder_all``'s ``all-decoder-stages``, any other layer's its reader's name
(``bottleneck``, ``encoder-stage-3mm``: :func:`.layers.layer_names`), which the description spells out
("at the last decoder stage (3 mm grid)"); the module's name is the map's ``layer``.

Memory: parameters are frozen and the first hooked activation is replaced by a detached leaf, so autograd
keeps only the graph from that layer to the output (:class:`.layers.LayerCapture`).

Scans larger than the card's patch size run window by window in MONAI's sliding window
(``with_coord=True``): each window returns its logits, activations and the gradient of its part of
the score (t summed over R inside the window), activations and gradients on the layer's
own grid; MONAI stitches each output at its own scale with its Gaussian weights, which costs
(channels x layer grid) memory per layer. The stitched gradient is the blend of per-window gradients, an
approximation of the gradient of the global score (exact for networks without spatial context); the
channel weights are computed once from the stitched tensors, so the CAM is one global map, not a
mosaic of window CAMs, and it is upsampled after the ReLU exactly as in the single-window case.
(Stitching on the layer grid instead of upsampling every window first makes Grad-CAM about twice
as fast at 128^3; window starts that are not multiples of the layer's stride are rounded to its grid.)
Option ``window: scan`` runs the whole scan in one pass instead, padded to the network's input multiple: the
gradient of the score of that one pass, as MONAI's and captum's Grad-CAM compute it. It does less work than
overlapping windows (at 128^3 about half, docs/peers.md) but its memory grows with the scan, and its score is
the network's on the whole scan, not that of the windowed segmentation.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SegXAIError
from ..inference import pad_as_windows, sliding_window_predict
from ..models.card import Windows
from ..models.networks import input_multiple
from ..padding import padding_to
from ..scaling import minmax
from ..upsampling import upsample_to
from .base import ExplainContext, Explainer, Explanation, ExplanationMap
from .layers import (
    DEFAULT_LAYER,
    LayerCapture,
    LayerName,
    conv_layers,
    frozen_parameters,
    layer_names,
    parse_layer_specs,
    resolve_layers,
)
from .options import WINDOWS, MethodOptions, option
from .targets import SCORE_WORDS, log_odds, target_scores

REGIONS = ("predicted", "all", "box", "mask")
_REGION_WORDS = {"predicted": "predicted target", "all": "whole volume", "box": "chosen box", "mask": "chosen mask"}
UPSAMPLING = "trilinear, align_corners=False (voxel centres), of the layer's CAM (after the ReLU)"
"""How a coarse layer's CAM reaches the model grid."""


@dataclass(frozen=True)
class GradCAMOptions(MethodOptions):
    """Options of Grad-CAM and Grad-CAM++ (module docstring): layer specs, the region R, the sliding windows'
    overlap (null: the model's, as its segmentation ran). ``box`` and ``mask`` are checked against the model grid
    when R is made (:func:`target_region`)."""

    layer: tuple[str, ...] = option((DEFAULT_LAYER,), convert=parse_layer_specs)
    region: str | None = option(None, choices=REGIONS)
    box: tuple[int, ...] | None = option(None, check=lambda box: len(box) == 6,
                                         must="[k0, k1, j0, j1, i0, i1] (six integers) or null")
    mask: np.ndarray | None = option(None, convert=lambda v: None if v is None else np.asarray(v, dtype=bool),
                                     must="a bool array on the model grid or null")
    overlap: float | None = option(None, check=lambda v: 0 <= v < 1,
                                  must="a number in [0, 1), or null: the model's own windows")
    window: str = option("model", choices=WINDOWS)


@dataclass
class TargetRegion:
    """The region R over which the target's log-odds are summed into the score.

    Attributes:
        mask: bool, (D, H, W) on the model grid.
        kind: ``predicted``, ``all``, ``box`` or ``mask``.
        note: why R differs from what was asked (empty predicted mask), or ``""``.
    """

    mask: np.ndarray
    kind: str
    note: str = ""


def target_region(context: ExplainContext, options: GradCAMOptions) -> TargetRegion:
    """R from the options ``region``, ``box``, ``mask`` (see the module docstring); user errors as SegXAIError."""
    shape = tuple(context.image.shape[2:])
    given = [k for k in ("box", "mask") if getattr(options, k) is not None]
    if len(given) > 1:
        raise SegXAIError("give either a box or a mask as the Grad-CAM region, not both")
    kind = given[0] if given else options.region or "predicted"
    if options.region not in (None, kind) or (kind in ("box", "mask") and not given):
        raise SegXAIError(f"unknown or conflicting Grad-CAM region {options.region!r}; use one of "
                          f"{', '.join(REGIONS)} (box and mask also need the option of that name)")
    if kind == "all":
        return TargetRegion(np.ones(shape, bool), kind)
    if kind == "predicted":
        mask = context.predicted_mask
        if mask.any():
            return TargetRegion(mask, kind)
        return TargetRegion(np.ones(shape, bool), "all",
                            f"the predicted mask of {context.target!r} is empty; the whole volume was used")
    if kind == "box":
        box = options.box
        if any(not 0 <= lo < hi <= n for lo, hi, n in zip(box[::2], box[1::2], shape)):
            raise SegXAIError(f"Grad-CAM box {list(box)} must be [k0, k1, j0, j1, i0, i1] with 0 <= start < stop <= "
                              f"size on the model grid {shape}")
        mask = np.zeros(shape, bool)
        mask[box[0]:box[1], box[2]:box[3], box[4]:box[5]] = True
        return TargetRegion(mask, kind)
    mask = options.mask
    if mask.shape != shape or not mask.any():
        raise SegXAIError(f"Grad-CAM mask must be a non-empty bool array of the model grid's shape {shape}, "
                          f"got shape {mask.shape}{' (empty)' if mask.shape == shape else ''}")
    return TargetRegion(mask, kind)


def layer_gradients(network: nn.Module, window: torch.Tensor, weight: torch.Tensor, channels: list[int],
                    modules: list[nn.Module], output: str = "logits"
                    ) -> tuple[torch.Tensor, float, list[torch.Tensor], list[torch.Tensor]]:
    """One forward and backward pass of ``score = sum(weight * t)``, t the target's log-odds (:mod:`.targets`).

    Args:
        window: (1, C, *s) input.
        weight: (1, 1, *s) indicator of R on the window.
        modules: layers whose outputs A and gradients d score / d A are wanted.
        output: what the network returns (the card's ``output``).

    Returns:
        the network's output (1, n_classes, *s), score, activations and gradients (each (1, C_l, *s_l)), all
        detached.
    """
    with torch.inference_mode(False), torch.enable_grad(), frozen_parameters(network), \
            LayerCapture(modules, leaf=True) as capture:
        logits = network(window.clone())
        score = target_scores(logits, channels, weight[:, 0], output).sum()
        activations = capture.outputs
        grads = torch.autograd.grad(score, activations, allow_unused=True) if score.requires_grad else \
            [None] * len(activations)
    grads = [torch.zeros_like(a) if g is None else g for a, g in zip(activations, grads)]
    return logits.detach(), float(score.detach()), [a.detach() for a in activations], grads


def probe_input(context: ExplainContext) -> torch.Tensor:
    """The input the layers are found on (each probe is a forward pass without gradients, :mod:`.layers`).

    Zeros of two of the card's input multiples per axis (16^3 for the bundled U-Net: 1/216 of the work of its
    96^3 window, where the two probes had cost two thirds of Grad-CAM's time) when the network runs on them (two
    multiples keep the coarsest grid larger than one voxel); else the scan's corner padded to the card's window,
    the one size every network here is known to accept (e.g. a transformer with a fixed input size).

    Returns:
        (1, C, *s) on the context's device.
    """
    card = context.model.card
    small = tuple(min(2 * m, p) for m, p in zip(input_multiple(card), card.patch_size))
    zeros = torch.zeros((1, context.image.shape[1], *small), dtype=context.image.dtype, device=context.device)
    try:
        conv_layers(context.model.network, zeros)
        return zeros
    except SegXAIError:
        corner = context.image[(..., *(slice(0, p) for p in card.patch_size))]
        return F.pad(corner, padding_to(tuple(corner.shape[2:]), card.patch_size)).to(context.device)


def _layer_words(spec: str, layers: list[LayerName]) -> str:
    """Where a map was taken, for a reader: ``at the last decoder stage (3 mm grid)``, or ``averaged over the 2
    decoder stages (6.1 mm and 3 mm grids)`` for ``decoder_all``."""
    if spec != "decoder_all":
        return f"at the {layers[0].role} ({layers[0].grid})" if layers[0].grid else f"at the {layers[0].role}"
    grids = [layer.grid.removesuffix(" grid") for layer in layers]
    listed = grids[0] if len(grids) == 1 else f"{', '.join(grids[:-1])} and {grids[-1]}"
    return f"averaged over the {len(layers)} decoder stages ({listed} grid{'s' if len(grids) > 1 else ''})"


def _layer_variant(spec: str, first: LayerName) -> str | None:
    """The map's variant (its file name's part after the method): none for the default layer, ``all-decoder-stages``,
    else the layer's slug (``bottleneck``, ``encoder-stage-3mm``)."""
    if spec == DEFAULT_LAYER:
        return None
    return "all-decoder-stages" if spec == "decoder_all" else first.slug


class SegGradCAM(Explainer):
    """Seg-Grad-CAM: channel weights = spatial mean of the score's gradient (Selvaraju et al.; Vinogradova et al.)."""

    name: ClassVar[str] = "gradcam"
    Options = GradCAMOptions
    title: ClassVar[str] = "Grad-CAM"
    summary: ClassVar[str] = ("Seg-Grad-CAM: where the chosen layer's features raise the target's log-odds over "
                              "its predicted region (options: layer, region, box, mask, window)")
    zero_map_reason: ClassVar[str] = ("nowhere does the gradient-weighted sum of the layer's features raise the "
                                      "score; try another layer")

    @staticmethod
    def channel_weights(activation: torch.Tensor, gradient: torch.Tensor, voxels: int) -> torch.Tensor:
        """alpha_k = mean over space of G_k.

        Args:
            activation, gradient: (1, C, *s).
            voxels: number of voxels of the layer's own grid over the scan (sums over space are
                ``mean * voxels``, so they do not depend on ``s`` being upsampled; unused here).

        Returns:
            (1, C, 1, ..., 1).
        """
        return gradient.mean(dim=tuple(range(2, gradient.ndim)), keepdim=True)

    def cam(self, activation: torch.Tensor, gradient: torch.Tensor, voxels: int) -> torch.Tensor:
        """ReLU(sum_k alpha_k A_k): (1, C, *s) -> (1, 1, *s)."""
        weights = self.channel_weights(activation, gradient, voxels)
        return F.relu((weights * activation).sum(dim=1, keepdim=True))

    # ------------------------------------------------------------ passes
    def _single_window(self, context: ExplainContext, region: np.ndarray, modules: list[nn.Module]
                       ) -> tuple[float, list[torch.Tensor]]:
        """One pass over the scan, padded as inference pads it to the patch where smaller (and up to the network's
        input multiple where larger: option ``window: scan``); CAMs upsampled, cropped."""
        card = context.model.card
        shape = tuple(context.image.shape[2:])
        grid = tuple(p if n <= p else -(-n // m) * m for n, p, m in zip(shape, card.patch_size, input_multiple(card)))
        pad = padding_to(shape, grid)
        image = pad_as_windows(context.image, pad, context.model.card.windows).to(context.device)
        weight = F.pad(torch.from_numpy(region).float()[None, None], pad).to(context.device)
        _, score, activations, grads = layer_gradients(context.model.network, image, weight, context.channels,
                                                       modules, context.model.card.output)
        crop = tuple(slice(before, before + n) for before, n in zip(pad[-2::-2], shape))
        cams = [upsample_to(self.cam(a, g, math.prod(a.shape[2:])), tuple(image.shape[2:]))[(..., *crop)].cpu()
                for a, g in zip(activations, grads)]
        return score, cams

    def _sliding_window(self, context: ExplainContext, region: np.ndarray, modules: list[nn.Module],
                        windows: Windows) -> tuple[float, list[torch.Tensor]]:
        """Windows return (logits, A..., G...) on their own grids; one CAM per layer from the stitched tensors."""
        patch = windows.size
        # MONAI pads a scan smaller than the patch along some axis; the window slices index the padded scan
        pad = padding_to(region.shape, patch)
        padded = np.pad(region, list(zip(pad[-2::-2], pad[::-2])))

        def predictor(window: torch.Tensor, coords: list[list[slice]]):
            window_region = torch.from_numpy(padded[tuple(coords[0][2:])]).to(window.device)
            window_weight = window_region.float()[None, None]
            logits, _, activations, grads = layer_gradients(context.model.network, window, window_weight,
                                                            context.channels, modules, context.model.card.output)
            return (logits, *activations, *grads)

        logits, *stitched = sliding_window_predict(predictor, context.image, windows, context.device,
                                                   context.progress, self.name, with_coord=True)
        score = float(log_odds(logits, context.channels, context.model.card.output)[0][torch.from_numpy(region)].sum())
        n = len(modules)
        cams = [upsample_to(self.cam(a, g, math.prod(a.shape[2:])), region.shape)
                for a, g in zip(stitched[:n], stitched[n:])]
        return score, cams

    # ------------------------------------------------------------ explainer
    def explain(self, context: ExplainContext) -> Explanation:
        start = time.perf_counter()
        options: GradCAMOptions = context.options_for(self)
        specs = list(options.layer)
        region = target_region(context, options)
        windows = context.model.card.windows.adjusted(overlap=options.overlap)
        network = context.model.network
        patch = context.model.card.patch_size
        window = probe_input(context)
        layers = {spec: [name for name, _ in resolve_layers(network, spec, window)] for spec in specs}
        names = list(dict.fromkeys(name for spec in specs for name in layers[spec]))
        all_modules = dict(network.named_modules())
        modules = [all_modules[name] for name in names]

        sliding = options.window == "model" and any(s > p for s, p in zip(context.image.shape[2:], patch))
        context.progress.update(self.name, 0.0, "gradients")
        if sliding:
            score, cams = self._sliding_window(context, region.mask, modules, windows)
        else:
            score, cams = self._single_window(context, region.mask, modules)
        context.progress.update(self.name, 1.0, "done")
        by_name = dict(zip(names, cams))

        readers = layer_names(network, names, window, context.spacing)
        maps, notes, shown = [], [], set()
        for spec in specs:
            if tuple(layers[spec]) in shown:  # a role and the module name it resolves to give one map
                continue
            shown.add(tuple(layers[spec]))
            stage_cams = [by_name[name] for name in layers[spec]]
            # decoder stages have different scales: each normalised before averaging (Mullan & Sonka)
            cam = torch.stack([minmax(c) for c in stage_cams]).mean(0) if spec == "decoder_all" else stage_cams[0]
            where = _layer_words(spec, [readers[name] for name in layers[spec]])
            description = (f"{self.title} {where}: where the layer's features raise the {context.target} {SCORE_WORDS} "
                           f"over the {_REGION_WORDS[region.kind]} (relative)")
            if not bool((cam > 0).any()):
                notes.append(f"the map {where} is zero everywhere: {self.zero_map_reason}")
                description += f"; zero everywhere: {self.zero_map_reason}"
            maps.append(ExplanationMap(
                method=self.name, variant=_layer_variant(spec, readers[layers[spec][0]]),
                array=cam[0, 0].numpy().astype(np.float32), description=description, layer=", ".join(layers[spec])))
        metadata: dict[str, Any] = {
            "layers": layers, "layer_names": {name: readers[name].words for name in names},
            "region": region.kind, "sliding_window": sliding, "upsampling": UPSAMPLING,
            "target_score": f"{SCORE_WORDS} of {context.target} summed over the region, from the network's "
                            f"{context.model.card.output}",
            "seconds": time.perf_counter() - start,
            "parameters": {"layer": specs, "patch_size": list(patch), "overlap": windows.overlap,
                           **({"window": options.window} if options.window != "model" else {}),
                           **({"region": options.region} if options.region is not None else {}),
                           **({"box": list(options.box)} if options.box is not None else {})}}
        if region.note or notes:
            metadata["note"] = "; ".join(filter(None, [region.note, *notes]))
        return Explanation(self.name, maps, scalars={"score": score, "region_voxels": float(region.mask.sum())},
                           metadata=metadata)


class SegGradCAMPlusPlus(SegGradCAM):
    """Grad-CAM++ (Chattopadhay et al.): positive gradients weighted by the closed-form a_k(p).

    The closed form is Y = exp(S)'s exact alpha where S is piecewise linear in the layer's output A (ReLU, PReLU,
    convolutions, batch norm in eval mode, and a two-class log-odds z_1 - z_0 after it): then
    d2Y/dA^2 = exp(S) G^2 and d3Y/dA^3 = exp(S) G^3 (tested against those derivatives taken by autograd). A
    softmax over more classes, instance norm or attention after the layer add second derivatives that the
    closed form leaves out, as every implementation of it does. exp(S) itself is never computed: it cancels
    from a_k(p) and is a factor common to every channel's weight (it would underflow for a score of -1e5).

    It also assumes non-negative activations (ReLU). After PReLU or a normalisation (MONAI's
    blocks), a channel's sum can be negative and ``2 + sum_q A_k(q) G_k(p)`` can approach zero, which makes
    the weights unstable; prefer Grad-CAM or a post-ReLU layer there.

    The map is zero everywhere when no feature of the layer raises the score anywhere (every G_k(p) <= 0):
    the ReLU of the gradients leaves no weight. That is what the raw target logit did on the demo before
    scores became log-odds (:mod:`.targets`): the demo U-Net lowers all its logits together, the background's
    most, so every gradient of the tumour logits was negative while those of the tumour's log-odds are not.
    """

    name: ClassVar[str] = "gradcampp"
    title: ClassVar[str] = "Grad-CAM++"
    summary: ClassVar[str] = ("Grad-CAM++: like Grad-CAM with higher-order channel weights that spread credit over "
                              "several regions (options: layer, region, box, mask, window)")
    zero_map_reason: ClassVar[str] = ("no feature of the layer raises the score anywhere (every gradient is zero or "
                                      "negative), so no channel gets a weight; Grad-CAM may still show one")

    @staticmethod
    def channel_weights(activation: torch.Tensor, gradient: torch.Tensor, voxels: int) -> torch.Tensor:
        """alpha_k = sum_p a_k(p) ReLU(G_k(p)), sums over the layer's grid of ``voxels`` voxels.

        Where G_k(p) > 0, a_k(p) = G^2 / (2 G^2 + sum_q A_k(q) G^3) = 1 / (2 + sum_q A_k(q) G): written so, no
        power of a small gradient underflows (pytorch-grad-cam adds an epsilon to the denominator instead, which
        would dominate the per-voxel gradients of a summed score). Elsewhere ReLU(G) = 0 and so is the term.
        """
        dims = tuple(range(2, gradient.ndim))
        sum_activation = activation.mean(dim=dims, keepdim=True) * voxels
        positive = F.relu(gradient)
        denominator = 2 + sum_activation * gradient
        a = torch.where((positive > 0) & (denominator != 0), 1 / torch.where(denominator != 0, denominator, 1), 0)
        return (a * positive).mean(dim=dims, keepdim=True) * voxels
