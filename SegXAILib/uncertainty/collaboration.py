"""Collaboration-gradient uncertainty of an EU-Net or an nnU-Net (paper 000 section 3.5, METHODS.md sections 2
and 10).

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

An nnU-Net-style U-Net (:mod:`SegXAILib.models.deep_supervision`) has no Conv1: its head s is the 1x1x1
convolution ``seg_layers[s]`` on X_s, and theta is the weight of the last convolution of decoder stage s (the
one producing X_s, before its normalisation and nonlinearity), which head s's loss reaches through X_s and head
s+1's loss through the next stage. That convolution feeds a normalisation (in nnU-Net's plans an instance norm,
which mixes every voxel), so neither loss has the closed form: the tangents of both heads' logits along R come
from ``torch.func.jvp`` through stages s and s+1 (vmapped over the directions: :func:`deep_supervision_projections`).
Only pairs of trained heads are compared (nnU-Net leaves its coarsest head untrained:
:func:`~SegXAILib.models.deep_supervision.trained_heads`). Zero gradients there come from a head whose softmax is
exactly one-hot in float32 at the pseudo-label (its loss is then flat), not from a dead ReLU.

Then ``g_t(p) . R = delta_t(p) . up(dP_t)(p)`` for all voxels at once. Two routes:

- ``sketch`` (default): k Gaussian directions R; the cosine of the two k-vectors estimates
  cos(g_s, g_s+1) (random projections approximately keep angles; error ~ 1/sqrt(k)).
- ``exact``: the canonical basis of theta (k = H_s * C_s directions for an EU-Net, every weight of the
  convolution for an nnU-Net): the sums become the exact dot products and norms, without ever storing a
  per-voxel gradient.

:func:`collaboration_reference` is the brute-force reference (one autograd call per voxel and head).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SegXAIError
from ..explain.base import ExplainContext, Explainer, Explanation, ExplanationMap, NotApplicable
from ..explain.options import MethodOptions, option
from ..inference import sliding_window_predict
from ..metrics import dice
from ..models.deep_supervision import (
    HeadOutput,
    head_outputs,
    is_deep_supervised_unet,
    last_convolution,
    pair_logits,
    trained_heads,
)
from ..models.eunet import EUNet, StageOutput, upsample_to
from ..models.loaders import LoadedModel
from ..models.tangent import jvp_map
from ..progress import Progress

ROUTES = ("sketch", "exact")
_TINY = torch.finfo(torch.float32).tiny

Projections = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""Directions (m, *theta) -> tangents of heads s and s+1's logits, (m, N, n_classes, *grid_s) and (..., *grid_s+1)."""


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


def _directions(route: str, k: int, shape: tuple[int, ...], chunk: int, seed: int) -> Iterator[torch.Tensor]:
    """Chunks (m, *shape) of directions in theta: k Gaussian ones, or the canonical basis (``exact``), a chunk at
    a time (an nnU-Net convolution has 10^5 weights: the whole basis would not fit)."""
    if route == "exact":
        size = math.prod(shape)
        for start in range(0, size, chunk):
            basis = torch.zeros(min(chunk, size - start), size)
            basis[torch.arange(basis.shape[0]), torch.arange(start, start + basis.shape[0])] = 1.0
            yield basis.view(-1, *shape)
        return
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, k, chunk):
        yield torch.randn(min(chunk, k - start), *shape, generator=generator)


def pair_projections(network: EUNet, stages: Sequence[StageOutput], s: int) -> Projections:
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


def deep_supervision_projections(network: nn.Module, heads: list[HeadOutput], s: int) -> Projections:
    """Tangents of heads s and s+1's logits along directions R of the last convolution weight of decoder stage s
    of an nnU-Net-style U-Net (``heads``: :func:`~SegXAILib.models.deep_supervision.head_outputs`), by
    ``torch.func.jvp`` through stages s and s+1, vmapped over the directions (each chunk recomputes the two stages'
    values once)."""
    name, convolution = last_convolution(network, s)
    weight = convolution.weight.detach()
    return jvp_map(lambda theta: pair_logits(network, heads, s, f"{name}.weight", theta), weight)


class HeadPair(NamedTuple):
    """Adjacent heads (s, s+1) and their shared parameter theta.

    Attributes:
        stage: s.
        own, next: the logits P_s (N, n_classes, *grid_s) and P_s+1.
        theta_shape: the shape directions in theta have (without the leading m).
        projections: directions -> tangents of P_s and P_s+1.
    """

    stage: int
    own: torch.Tensor
    next: torch.Tensor
    theta_shape: tuple[int, ...]
    projections: Projections


def pair_stages(network: nn.Module) -> list[int] | None:
    """The s of every pair (s, s+1) of adjacent heads compared, coarse to fine: all of an EU-Net's, those of an
    nnU-Net-style U-Net where both heads were trained (:func:`~SegXAILib.models.deep_supervision.trained_heads`);
    None for a network without heads per decoder stage."""
    if isinstance(network, EUNet):
        return list(range(len(network.heads) - 1))
    if not is_deep_supervised_unet(network):
        return None
    trained = trained_heads(network)
    return [s for s in trained if s + 1 in trained]


def head_pairs(network: nn.Module, image: torch.Tensor) -> Iterator[HeadPair]:
    """The pairs of :func:`pair_stages` of an EU-Net or an nnU-Net-style U-Net on (N, C, *grid) ``image``, coarse to
    fine, from one forward pass; each pair's projections are built when it is reached."""
    if isinstance(network, EUNet):
        stages = network.stage_outputs(image)
        for s in pair_stages(network):
            yield HeadPair(s, stages[s].prediction, stages[s + 1].prediction,
                           tuple(network.heads[s].conv1.weight.shape[:2]), pair_projections(network, stages, s))
        return
    heads = head_outputs(network, image)
    for s in pair_stages(network):
        yield HeadPair(s, heads[s].logits, heads[s + 1].logits, tuple(last_convolution(network, s)[1].weight.shape),
                       deep_supervision_projections(network, heads, s))


def shared_parameter(network: nn.Module, s: int) -> tuple[str, nn.Parameter]:
    """theta of the pair (s, s+1) and its name in the network: the Conv1 weight of an EU-Net's head s, the last
    convolution weight of an nnU-Net's decoder stage s."""
    if isinstance(network, EUNet):
        return f"heads.{s}.conv1.weight", network.heads[s].conv1.weight
    name, convolution = last_convolution(network, s)
    return f"decoder.stages.{s}.{name}.weight", convolution.weight


def head_logits(network: nn.Module, image: torch.Tensor) -> list[torch.Tensor]:
    """Every head's logits P_s, coarse to fine, of an EU-Net or an nnU-Net-style U-Net."""
    if isinstance(network, EUNet):
        return [stage.prediction for stage in network.stage_outputs(image)]
    return [head.logits for head in head_outputs(network, image)]


def collaboration_map(network: nn.Module, image: torch.Tensor, label: torch.Tensor, k: int = 64,
                      route: str = "sketch", chunk: int = 2, seed: int = 0, progress: Progress | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """1 - consistency of (N, C, *grid) ``image`` with pseudo-label ``label`` (N, *grid) (one window), for an
    EU-Net (``feed="decoder"``) or an nnU-Net-style U-Net.

    Returns:
        uncertainty (N, 1, *grid) in [0, 2] (2 at zero-gradient voxels) and the zero-gradient mask
        (N, 1, *grid) bool (a gradient of some pair is zero there).
    """
    if route not in ROUTES:
        raise SegXAIError(f"unknown route {route!r} for mhex-uncertainty; use one of {', '.join(ROUTES)}")
    grid = tuple(image.shape[2:])
    with torch.no_grad():  # forward-mode AD below ignores no_grad; this only stops a backward graph
        cosines, zero = [], torch.zeros(image.shape[0], 1, *grid, dtype=torch.bool, device=image.device)
        for pair in head_pairs(network, image):
            residual_own, residual_next = (_residual(logits, label) for logits in (pair.own, pair.next))
            dot, norm_own, norm_next = (torch.zeros(image.shape[0], 1, *grid, device=image.device) for _ in range(3))
            for directions in _directions(route, k, pair.theta_shape, chunk, seed + pair.stage):
                if progress is not None:
                    progress.check()
                d_own, d_next = pair.projections(directions.to(image))
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


def collaboration_reference(network: nn.Module, image: torch.Tensor, label: torch.Tensor,
                            voxels: Sequence[tuple[int, ...]] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Brute force: the exact per-voxel gradients by one autograd call per voxel, head and pair.

    For tiny volumes (tests). ``image`` (1, C, *grid), ``label`` (1, *grid); ``voxels`` defaults to all.
    Returns the uncertainty (n,) at ``voxels`` (2 where a gradient is zero) and the zero flags (n,).
    """
    grid = tuple(image.shape[2:])
    voxels = list(np.ndindex(grid)) if voxels is None else [tuple(v) for v in voxels]
    with torch.enable_grad():
        logits = head_logits(network, image)
        stages = pair_stages(network)
        cosines = np.zeros((len(stages), len(voxels)))
        zero = np.zeros(len(voxels), dtype=bool)
        for pair, s in enumerate(stages):
            weight = shared_parameter(network, s)[1]
            log_probabilities = [torch.log_softmax(upsample_to(logits[t], grid), dim=1) for t in (s, s + 1)]
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
                    cosines[pair, i] = float((gradients[0] * gradients[1]).sum()) / (norms[0] * norms[1])
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

    route: ``sketch`` or ``exact`` (H_s * C_s directions per pair for an EU-Net, every weight of the convolution
        for an nnU-Net: small networks and volumes).
    k: number of random directions of the sketch. 64: the sketch's error in a cosine is about
        1/sqrt(k), and on the brain-lesion EU-Net the map's own contrast is smaller than that at k = 16
        (two seeds of k = 16 correlated 0.0-0.27; k = 64 correlates 0.72-0.83 with k = 256 and agrees with the
        ensemble entropy as well as k = 256 does: docs/collaboration_uncertainty.md). Cost grows with k.
    chunk: directions per forward-mode pass (memory: chunk x n_classes x window voxels; small batches stay
        in the CPU's cache: 2 is faster than 8). An nnU-Net's pass carries chunk copies of two decoder stages'
        activations and recomputes their values once per pass: larger chunks are faster there, memory permitting.
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
        model: an EU-Net (``feed="decoder"``) or an nnU-Net-style U-Net.
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
    """Collaboration-gradient uncertainty of adjacent heads of an EU-Net (MHEX+ heads) or an nnU-Net
    (deep-supervision outputs): one model, no sampling.

    Options: :class:`CollaborationOptions` (``--option mhex-uncertainty.NAME=VALUE``).
    """

    name: ClassVar[str] = "mhex-uncertainty"
    Options = CollaborationOptions
    summary: ClassVar[str] = ("Collaboration-gradient uncertainty of an EU-Net or nnU-Net: where adjacent decoder "
                              "heads' gradients disagree (options: k, route=sketch|exact, chunk, seed)")

    def check_applicable(self, model: LoadedModel) -> None:
        super().check_applicable(model)
        network = model.network
        stages = pair_stages(network)
        if stages is None:
            raise NotApplicable("mhex-uncertainty needs a network with a head on every decoder stage (an EU-Net's "
                                f"MHEX+ heads or an nnU-Net's deep-supervision outputs); {model.card.name!r} has none")
        if isinstance(network, EUNet) and network.feed != "decoder":
            raise NotApplicable("mhex-uncertainty needs an EU-Net with feed='decoder': with feed='head' the next "
                                "head does not depend on this head's weights, so there is nothing to compare")
        if not stages:
            raise NotApplicable("mhex-uncertainty needs two adjacent trained decoder heads to compare; "
                                f"{model.card.name!r} has none")

    def explain(self, context: ExplainContext) -> Explanation:
        self.check_applicable(context.model)
        options: CollaborationOptions = context.options_for(self)
        route, k = options.route, options.k
        network = context.model.network
        stages = pair_stages(network)
        array, zero = collaboration_volume(context.model, context.image, context.probabilities.argmax(0), options,
                                           context.device, context.progress)

        scalars = {"zero_gradient_voxels": float(zero.sum())}
        inside = context.predicted_mask
        if inside.any():
            scalars["uncertainty_inside"] = float(array[inside].mean())
        directions = "exact (every direction)" if route == "exact" else f"{k} random directions"
        return Explanation(self.name, [ExplanationMap(
            self.name, array, None,
            "Collaboration-gradient uncertainty: 1 - mean cosine between adjacent decoder heads' gradients for the "
            "predicted class (how each head would pull the weights they share); 0 = the heads agree, "
            "1 = unrelated, 2 = opposed or no gradient",
            colormap="viridis", normalise=False)], scalars,
            metadata={"route": route, "directions": directions, "pairs": len(stages),
                      "shared_parameters": [shared_parameter(network, s)[0] for s in stages],
                      "shared_parameter_is": "the first 1x1x1 convolution of head s (Conv1)"
                      if isinstance(network, EUNet) else "the last convolution of decoder stage s, producing the "
                      "features head s reads (before its normalisation); head s+1 reads it through stage s+1",
                      "pseudo_label": "argmax of the model's output", "zero_gradient_value": 2.0})
