"""Collaboration-gradient uncertainty of an EU-Net (paper 000 section 3.5, METHODS.md section 2).

For every voxel p and adjacent heads (s, s+1), with pseudo-label y(p) = argmax of the final output::

    g_t(p) = d CE(up(P_t)(p), y(p)) / d theta,   t in {s, s+1},   theta = W1_s (Conv1 weight of head s)
    consistency(p) = mean over pairs of cos(g_s(p), g_s+1(p));   map = 1 - consistency in [0, 2]

``up`` is trilinear with ``align_corners=False`` (as for the deep-supervision loss). theta is shared by
both losses only with ``feed="decoder"``: with ``feed="head"`` head s+1 does not depend on W1_s, every
g_s+1 is zero, and the method does not apply. Voxels where a gradient is zero (the ReLU of head s is
dead at every coarse voxel that p interpolates from) have no direction: they get the maximum, 2, and
are counted. The ground truth is not used for y: the context carries only the target's binary mask,
not a label for every class.

Which pairs admit the closed form ``g(p) = delta(p) (outer) X(p)``, hence
``cos(g1, g2) = cos(delta1, delta2) * cos(X1, X2)``? It needs both losses to reach theta through the
1x1x1 conv at p alone. In an EU-Net only head s's own loss does, and only on its own grid: there
``g_s(q) = [1(Y_s(q) > 0) * W2_s^T delta_s(q)] (outer) X_s(q)``; at full resolution the trilinear
upsampling makes g_s(p) a sum of up to 8 such outer products. Head s+1's loss reaches W1_s through
``X_s + Proj(sigmoid(Y_s) Y_s)``, the next stage's (transposed) convolutions and its normalisation, which
mix neighbouring voxels (instance norm: all of them). So no adjacent pair has the closed form; the
closed form is used where it holds, for the pointwise part:

- tangent of ``Y_s = ReLU(W1_s X_s)`` along a direction R of theta: ``1(Y_s > 0) * (R X_s)``, every
  direction at once, and head s's own tangent ``W2_s`` of that (no autodiff);
- forward mode only through the sub-network from Y_s to P_s+1 (gate, projection, stage s+1, head
  s+1), linearised once at the cached X_s, Y_s and skip (:mod:`SegXAILib.models.tangent`: the
  derivatives written out, about 4x faster than ``torch.func.jvp``, which remains the fallback).

Then ``g_t(p) . R = delta_t(p) . up(dP_t)(p)`` for all voxels at once. Two routes:

- ``sketch`` (default): k Gaussian directions R; the cosine of the two k-vectors estimates
  cos(g_s, g_s+1) (random projections approximately keep angles; error ~ 1/sqrt(k)).
- ``exact``: the canonical basis of theta (k = H_s * C_s directions): the sums become the exact dot
  products and norms, without ever storing a per-voxel gradient.

:func:`collaboration_reference` is the brute-force reference (one autograd call per voxel and head).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import SegXAIError
from ..explain.base import ExplainContext, Explainer, Explanation, ExplanationMap, NotApplicable
from ..explain.options import MethodOptions, option
from ..inference import sliding_window_predict
from ..metrics import dice
from ..models.eunet import EUNet, StageOutput, upsample_to
from ..models.loaders import LoadedModel
from ..progress import Progress

ROUTES = ("sketch", "exact")
_TINY = torch.finfo(torch.float32).tiny


def _residual(prediction: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """delta = softmax(up(P)) - onehot(y): d CE / d logits, (N, n_classes, *grid) on ``label``'s grid."""
    probabilities = torch.softmax(upsample_to(prediction, label.shape[1:]), dim=1)
    return probabilities - F.one_hot(label, probabilities.shape[1]).movedim(-1, 1).to(probabilities.dtype)


def _along(residual: torch.Tensor, tangent: torch.Tensor) -> torch.Tensor:
    """g(p) . R = delta(p) . up(dP)(p) at every voxel: (m, N, 1, *grid) from dP (m, N, n_classes, *grid_t).

    delta sums to zero over the classes (softmax minus one-hot), so delta . v = sum over c >= 1 of
    delta_c (v_c - v_0): one class fewer to upsample, the costliest step, and the difference is taken
    on the coarse grid (interpolation is linear).
    """
    relative = (tangent[:, :, 1:] - tangent[:, :, :1]).flatten(0, 1)
    upsampled = upsample_to(relative, residual.shape[2:]).unflatten(0, tangent.shape[:2])
    along = upsampled[:, :, :1] * residual[:, 1:2]
    for c in range(1, upsampled.shape[2]):  # in place: no (m, N, n_classes, *grid) product
        along.addcmul_(upsampled[:, :, c:c + 1], residual[:, c + 1:c + 2])
    return along


def _directions(route: str, k: int, shape: tuple[int, int], chunk: int, seed: int) -> Iterator[torch.Tensor]:
    """Chunks (m, H, C) of directions in theta: k Gaussian ones, or the canonical basis (``exact``)."""
    if route == "exact":
        yield from torch.eye(shape[0] * shape[1]).view(-1, *shape).split(chunk)
        return
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, k, chunk):
        yield torch.randn(min(chunk, k - start), *shape, generator=generator)


def pair_projections(network: EUNet, stages: Sequence[StageOutput], s: int
                     ) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Tangents of the deep predictions P_s and P_s+1 along directions R of W1_s, on their own grids.

    The sub-network from Y_s to P_s+1 is linearised once at the cached Y_s (models/tangent.py); the
    returned function then costs one linear pass per direction.

    Args:
        network: the EU-Net (``feed="decoder"``), eval mode.
        stages: ``network.stage_outputs(x)`` (the cached activations).
        s: the pair (s, s+1).

    Returns:
        directions (m, H_s, C_s) -> dP_s (m, N, n_classes, *grid_s) and dP_s+1 (m, N, n_classes, *grid_s+1).
    """
    head, here, below = network.heads[s], stages[s], stages[s + 1]
    stream, d_stream = head.stream_linearized(here.features, here.hidden)
    features, d_decode = network.backbone.decode_linearized(s + 1, stream, below.skip)
    _, d_predict = network.heads[s + 1].prediction_linearized(features)
    active = here.hidden > 0

    def projections(directions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # closed form of the pointwise part: d ReLU(W1 X) = 1(Y > 0) * (R X), every direction at once
        d_hidden = active * torch.einsum("mhc,nc...->mnh...", directions.to(here.features), here.features)
        d_own = torch.einsum("kh,mnh...->mnk...", head.conv2.weight.flatten(1), d_hidden)
        return d_own, d_predict(d_decode(d_stream(d_hidden)))

    return projections


def collaboration_map(network: EUNet, image: torch.Tensor, label: torch.Tensor, k: int = 64,
                      route: str = "sketch", chunk: int = 2, seed: int = 0, progress: Progress | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """1 - consistency of (N, C, *grid) ``image`` with pseudo-label ``label`` (N, *grid) (one window).

    Returns:
        uncertainty (N, 1, *grid) in [0, 2] (2 at zero-gradient voxels) and the zero-gradient mask
        (N, 1, *grid) bool (a gradient of some pair is zero there).
    """
    if route not in ROUTES:
        raise SegXAIError(f"unknown route {route!r} for mhex-uncertainty; use one of {', '.join(ROUTES)}")
    grid = tuple(image.shape[2:])
    with torch.no_grad():  # forward-mode AD below ignores no_grad; this only stops a backward graph
        stages = network.stage_outputs(image)
        cosines, zero = [], torch.zeros(image.shape[0], 1, *grid, dtype=torch.bool, device=image.device)
        for s in range(len(stages) - 1):
            residual_own, residual_next = (_residual(stages[t].prediction, label) for t in (s, s + 1))
            dot, norm_own, norm_next = (torch.zeros(image.shape[0], 1, *grid, device=image.device) for _ in range(3))
            projections = pair_projections(network, stages, s)
            for directions in _directions(route, k, tuple(network.heads[s].conv1.weight.shape[:2]), chunk, seed + s):
                if progress is not None:
                    progress.check()
                d_own, d_next = projections(directions)
                a, b = _along(residual_own, d_own), _along(residual_next, d_next)
                for m in range(a.shape[0]):  # in place: no (m, N, 1, *grid) products
                    dot.addcmul_(a[m], b[m])
                    norm_own.addcmul_(a[m], a[m])
                    norm_next.addcmul_(b[m], b[m])
            dead = (norm_own <= _TINY) | (norm_next <= _TINY)
            cosine = dot / (norm_own.sqrt() * norm_next.sqrt()).clamp_min(_TINY)
            cosines.append(torch.where(dead, 0.0, cosine).clamp(-1, 1))
            zero |= dead
        uncertainty = 1.0 - torch.stack(cosines).mean(0)
        return uncertainty.masked_fill(zero, 2.0), zero


def collaboration_reference(network: EUNet, image: torch.Tensor, label: torch.Tensor,
                            voxels: Sequence[tuple[int, ...]] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Brute force: the exact per-voxel gradients by one autograd call per voxel, head and pair.

    For tiny volumes (tests). ``image`` (1, C, *grid), ``label`` (1, *grid); ``voxels`` defaults to all.
    Returns the uncertainty (n,) at ``voxels`` (2 where a gradient is zero) and the zero flags (n,).
    """
    grid = tuple(image.shape[2:])
    voxels = list(np.ndindex(grid)) if voxels is None else [tuple(v) for v in voxels]
    with torch.enable_grad():
        stages = network.stage_outputs(image)
        cosines = np.zeros((len(stages) - 1, len(voxels)))
        zero = np.zeros(len(voxels), dtype=bool)
        for s in range(len(stages) - 1):
            weight = network.heads[s].conv1.weight
            log_probabilities = [torch.log_softmax(upsample_to(stages[t].prediction, grid), dim=1) for t in (s, s + 1)]
            for i, p in enumerate(voxels):
                gradients = []
                for log_p in log_probabilities:
                    (gradient,) = torch.autograd.grad(-log_p[(0, int(label[(0, *p)])) + p], weight,
                                                      retain_graph=True, allow_unused=True)
                    gradients.append(torch.zeros_like(weight) if gradient is None else gradient)
                norms = [float(g.norm()) for g in gradients]
                if min(norms) == 0.0:
                    zero[i] = True
                else:
                    cosines[s, i] = float((gradients[0] * gradients[1]).sum()) / (norms[0] * norms[1])
    return np.where(zero, 2.0, 1.0 - cosines.mean(0)), zero


def agreement(uncertainty: np.ndarray, other: np.ndarray, mask: np.ndarray | None = None) -> dict[str, float]:
    """How well two uncertainty maps agree inside ``mask`` (paper 000, Table 1).

    The verdict passes the brain (or the body's foreground): of the regions compared in
    docs/collaboration_uncertainty.md (whole grid, brain, a band around the object), the brain agrees best.

    Returns ``pearson`` (of the values; NaN if either map is constant there), ``iou_top10`` and
    ``dice_top10`` (overlap of the 10 % highest voxels of each map; ties broken by position).
    """
    a = np.asarray(uncertainty, np.float64)
    b = np.asarray(other, np.float64)
    if a.shape != b.shape:
        raise SegXAIError(f"cannot compare uncertainty maps of shapes {a.shape} and {b.shape}")
    if mask is not None:
        a, b = a[mask], b[mask]
    a, b = a.ravel(), b.ravel()
    if a.size == 0:
        raise SegXAIError("the mask for comparing uncertainty maps is empty")
    pearson = float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else float("nan")
    top = max(1, math.ceil(0.1 * a.size))
    top_a = np.zeros(a.size, bool)
    top_b = np.zeros(a.size, bool)
    top_a[np.argsort(-a, kind="stable")[:top]] = True
    top_b[np.argsort(-b, kind="stable")[:top]] = True
    union = int((top_a | top_b).sum())
    return {"pearson": pearson, "iou_top10": int((top_a & top_b).sum()) / union, "dice_top10": dice(top_a, top_b)}


@dataclass(frozen=True)
class CollaborationOptions(MethodOptions):
    """Options of ``mhex-uncertainty``.

    route: ``sketch`` or ``exact`` (H_s * C_s directions per pair: small volumes).
    k: number of random directions of the sketch. 64: the sketch's error in a cosine is about
        1/sqrt(k), and on the brain-lesion EU-Net the map's own contrast is smaller than that at k = 16
        (two seeds of k = 16 correlated 0.0-0.27; k = 64 correlates 0.72-0.83 with k = 256 and agrees with the
        ensemble entropy as well as k = 256 does: docs/collaboration_uncertainty.md). Cost grows with k.
    chunk: directions per forward-mode pass (memory: chunk x n_classes x window voxels; small batches stay
        in the CPU's cache: 2 is faster than 8).
    seed: of the random directions.
    """

    route: str = option("sketch", choices=ROUTES)
    k: int = option(64, minimum=1)
    chunk: int = option(2, minimum=1)
    seed: int = option(0, minimum=0)


def collaboration_volume(model: LoadedModel, image: torch.Tensor, label: np.ndarray, options: CollaborationOptions,
                         device: torch.device, progress: Progress | None = None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`collaboration_map` of a whole scan by sliding windows of the card's patch size.

    Args:
        model: an EU-Net (``feed="decoder"``).
        image: (1, C, D, H, W) on the model grid.
        label: (D, H, W) integer pseudo-label y (the argmax of the output, or a ground truth as channel indices).

    Returns:
        the uncertainty (D, H, W) float32 in [0, 2] and the zero-gradient mask (D, H, W) bool.
    """
    channels = image.shape[1]
    # the pseudo-label travels as an extra input channel, so the sliding window cuts (and pads) it alike
    stacked = torch.cat([image, torch.from_numpy(np.asarray(label))[None, None].to(image.dtype)], dim=1)

    def window_map(window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(window.device.type, enabled=False):  # gradients' angles in float32
            window = window.float()
            # a scan smaller than a window is padded with the image's minimum in every channel, the
            # label's too; padded voxels are cropped off afterwards, so background stands in for them
            label_window = window[:, channels].round().long().clamp(min=0)
            uncertainty, zero = collaboration_map(model.network, window[:, :channels], label_window, options.k,
                                                  options.route, options.chunk, options.seed, progress)
        return uncertainty, zero.to(uncertainty.dtype)

    uncertainty, zero = sliding_window_predict(window_map, stacked, model.card.windows, device,
                                               progress=progress, stage=CollaborationUncertainty.name)
    zero_mask = zero[0, 0].numpy() >= 0.5  # zero in the windows that weigh most
    array = uncertainty[0, 0].numpy().astype(np.float32)
    array[zero_mask] = 2.0
    return array, zero_mask


class CollaborationUncertainty(Explainer):
    """Collaboration-gradient uncertainty of an EU-Net's adjacent MHEX+ heads (one model, no sampling).

    Options: :class:`CollaborationOptions` (``--option mhex-uncertainty.NAME=VALUE``).
    """

    name: ClassVar[str] = "mhex-uncertainty"
    Options = CollaborationOptions
    summary: ClassVar[str] = ("Collaboration-gradient uncertainty of an EU-Net: where adjacent MHEX+ heads' "
                              "gradients disagree (options: k, route=sketch|exact, chunk, seed)")

    def check_applicable(self, model: LoadedModel) -> None:
        super().check_applicable(model)
        network = model.network
        if not isinstance(network, EUNet):
            raise NotApplicable("mhex-uncertainty needs a network with MHEX+ heads (an EU-Net, architecture "
                                f"'eunet'); {model.card.name!r} has none")
        if network.feed != "decoder":
            raise NotApplicable("mhex-uncertainty needs an EU-Net with feed='decoder': with feed='head' the next "
                                "head does not depend on this head's weights, so there is nothing to compare")
        if len(network.heads) < 2:
            raise NotApplicable("mhex-uncertainty needs two or more MHEX+ heads; this EU-Net has one")

    def explain(self, context: ExplainContext) -> Explanation:
        self.check_applicable(context.model)
        options: CollaborationOptions = context.options_for(self)
        route, k = options.route, options.k
        network: EUNet = context.model.network
        array, zero = collaboration_volume(context.model, context.image, context.probabilities.argmax(0), options,
                                           context.device, context.progress)

        scalars = {"zero_gradient_voxels": float(zero.sum())}
        inside = context.predicted_mask
        if inside.any():
            scalars["uncertainty_inside"] = float(array[inside].mean())
        directions = "exact (every direction)" if route == "exact" else f"{k} random directions"
        return Explanation(self.name, [ExplanationMap(
            self.name, array, None,
            "Collaboration-gradient uncertainty: 1 - mean cosine between adjacent MHEX+ heads' gradients for the "
            "predicted class; 0 = the heads agree, 1 = unrelated, 2 = opposed or no gradient",
            colormap="viridis", normalise=False)], scalars,
            metadata={"route": route, "directions": directions, "pairs": len(network.heads) - 1,
                      "pseudo_label": "argmax of the model's output", "zero_gradient_value": 2.0})
