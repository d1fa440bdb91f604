"""MHEX+ CAMs: each decoder stage's evidence for the target, read through that stage's own head (METHODS.md
sections 2 and 10).

Two kinds of network carry one head per decoder stage s (stages run coarse to fine); :func:`stage_source` says
where each one's per-stage maps come from.

EU-Net (paper 000): head s computes ``P_s = W2_s ReLU(W1_s X_s)`` at every voxel (1x1x1 convolutions, no
biases). Dropping the ReLU (and the attention gate, which only shapes what flows on to the next stage) leaves the
linear map ``W_equiv_s = W2_s @ W1_s`` (n_classes x C_s), and

    CAM_s,c = sum_j W_equiv_s[c, j] * X_s[j]        (a 1x1x1 convolution of X_s with W_equiv_s)

is the class-c evidence the decoder features of stage s carry along the head's own read-out direction.
It is a *linearisation*: it equals the head's deep prediction P_s,c only where every unit of
``W1_s X_s`` is positive (the ReLU is the identity there); elsewhere it also counts the evidence the
ReLU cuts away, with its sign (negative = evidence against c).

nnU-Net (any ``dynamic_network_architectures`` U-Net, :mod:`SegXAILib.models.deep_supervision`): head s is one
1x1x1 convolution with bias, ``seg_layers[s]``, trained as deep supervision, so

    CAM_s,c = sum_j W_s[c, j] * X_s[j] + b_s[c]

is exactly the head's logit: nothing is linearised (no hidden layer, no attention gate). Unlike an EU-Net's, these
heads are side outputs: they feed nothing back into the decoder. A head nnU-Net never trained (its coarsest, whose
loss weight is 0: :func:`~SegXAILib.models.deep_supervision.trained_heads`) is left out: its map would be noise.

The target's map is the sum over its channels. Each stage map is upsampled to the model grid (trilinear,
``align_corners=False``); the MHEX+ map is the mean of the min-max normalised stage maps (the per-stage maps are
the "decision traces" at each scale). Cost: one forward pass plus one 1x1x1 convolution per stage.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch
from torch import nn

from ..inference import sliding_window_predict
from ..models.deep_supervision import head_outputs, is_deep_supervised_unet, trained_heads
from ..models.eunet import EUNet, MHEXHead, upsample_to
from ..models.loaders import LoadedModel
from ..scaling import minmax
from .base import ExplainContext, Explainer, Explanation, ExplanationMap, NotApplicable
from .options import MethodOptions


def equivalent_kernel(head: MHEXHead) -> torch.Tensor:
    """``W_equiv = W_conv2 @ W_conv1``, shape (n_classes, C_s)."""
    return head.conv2.weight.flatten(1) @ head.conv1.weight.flatten(1)


def stage_cams(network: EUNet, image: torch.Tensor, channels: list[int]) -> list[torch.Tensor]:
    """The target's CAM_s on every stage's own grid, (N, 1, *grid_s), coarse to fine, from one forward
    pass that stops at the last head."""
    stages = network.stage_outputs(image)
    cams = []
    for head, stage in zip(network.heads, stages):
        kernel = equivalent_kernel(head)[channels].sum(0)  # summing the classes first: one output channel
        cams.append(torch.einsum("c,nc...->n...", kernel, stage.features).unsqueeze(1))
    return cams


def head_cams(network: nn.Module, image: torch.Tensor, channels: list[int], heads: list[int]) -> list[torch.Tensor]:
    """The target's CAM_s of an nnU-Net-style U-Net: the logits of its deep-supervision heads ``heads`` (indices,
    coarse to fine) summed over ``channels``, (N, 1, *grid_s) each, from one forward pass."""
    outputs = head_outputs(network, image)
    return [outputs[s].logits[:, channels].sum(1, keepdim=True) for s in heads]


class StageSource(NamedTuple):
    """Where a network's per-stage maps come from.

    Attributes:
        cams: (image (N, C, *grid), target channels) -> CAM_s (N, 1, *grid_s) of each stage in ``stages``.
        stages: the decoder stages s (0 = coarsest) whose heads are read, coarse to fine.
        total: the decoder's stages with a head, read or not.
        channels: C_s, the features each head reads.
        read_out: how a stage's evidence is read, in words, for the maps' descriptions.
        metadata: which heads, and whether their maps are exact or a linearisation.
    """

    cams: Callable[[torch.Tensor, list[int]], list[torch.Tensor]]
    stages: list[int]
    total: int
    channels: list[int]
    read_out: str
    metadata: dict[str, Any]


def stage_source(network: nn.Module) -> StageSource | None:
    """The per-stage maps of an EU-Net or an nnU-Net-style U-Net; None for a network without heads per stage."""
    if isinstance(network, EUNet):
        count = len(network.heads)
        return StageSource(
            lambda image, channels: stage_cams(network, image, channels), list(range(count)), count,
            [head.conv1.in_channels for head in network.heads],
            "its head's equivalent kernel, a linear read-out",
            {"heads": [f"heads.{s} (MHEX+)" for s in range(count)], "feed": network.feed,
             "note": "linearisation of each head (ReLU and attention gate ignored); stage maps upsampled "
                     "trilinearly with align_corners=False"})
    if is_deep_supervised_unet(network):
        seg_layers, trained = network.decoder.seg_layers, trained_heads(network)
        untrained = [s for s in range(len(seg_layers)) if s not in trained]
        return StageSource(
            lambda image, channels: head_cams(network, image, channels, trained), trained, len(seg_layers),
            [seg_layers[s].in_channels for s in trained],
            "the stage's own trained prediction (its deep-supervision output, read exactly)",
            {"heads": [f"decoder.seg_layers[{s}]" for s in trained],
             "note": "nnU-Net's deep-supervision outputs, coarse to fine: each map is the exact output of its head "
                     "(a 1x1x1 convolution with bias: no hidden layer or attention gate, nothing linearised); "
                     "unlike an EU-Net's MHEX+ heads, these were trained as deep supervision and feed nothing back "
                     "into the decoder; stage maps upsampled trilinearly with align_corners=False",
             **({"untrained_heads_left_out": [f"decoder.seg_layers[{s}]" for s in untrained],
                 "why_left_out": "never trained (bias still 0; nnU-Net gives its coarsest output loss weight 0)"}
                if untrained else {})})
    return None


@dataclass(frozen=True)
class MHEXOptions(MethodOptions):
    """MHEX+ CAMs take no options."""


class MHEXCAM(Explainer):
    """Per-stage CAMs of every head of an EU-Net (equivalent kernels) or an nnU-Net (deep-supervision outputs)
    and their normalised mean."""

    name: ClassVar[str] = "mhex"
    Options = MHEXOptions
    summary: ClassVar[str] = ("MHEX+ CAMs of an EU-Net or nnU-Net: each decoder stage's evidence for the target "
                              "through its own head, and their normalised mean (one forward pass)")

    def check_applicable(self, model: LoadedModel) -> None:
        super().check_applicable(model)
        source = stage_source(model.network)
        if source is None:
            raise NotApplicable("mhex needs a network with a head on every decoder stage (an EU-Net's MHEX+ "
                                f"heads or an nnU-Net's deep-supervision outputs); {model.card.name!r} has none")
        if not source.stages:
            raise NotApplicable(f"mhex: none of the decoder heads of {model.card.name!r} was trained")

    def explain(self, context: ExplainContext) -> Explanation:
        self.check_applicable(context.model)
        source = stage_source(context.model.network)

        def window_cams(window: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return tuple(upsample_to(cam, window.shape[2:]) for cam in source.cams(window, context.channels))

        with torch.inference_mode():
            stitched = sliding_window_predict(window_cams, context.image, context.model.card.windows,
                                              context.device, progress=context.progress, stage=self.name)
        stitched = (stitched,) if isinstance(stitched, torch.Tensor) else stitched
        cams = [cam[0, 0] for cam in stitched]
        combined = torch.stack([minmax(cam) for cam in cams]).mean(0)

        count, total = len(cams), source.total
        maps = [ExplanationMap(
            self.name, combined.numpy().astype(np.float32), None,
            f"MHEX+ map of {context.target}: mean over {count} decoder stages of each stage's evidence for "
            f"it, read through {source.read_out}, each scaled to 0-1; high = features that the heads read as the "
            "target")]
        for s, cam, channels in zip(source.stages, cams, source.channels):
            scale = "coarsest" if s == 0 else "finest" if s == total - 1 else "intermediate"
            maps.append(ExplanationMap(
                self.name, cam.numpy().astype(np.float32), f"stage{s + 1}",
                f"Decoder stage {s + 1} of {total} ({scale}, {channels} channels): evidence for "
                f"{context.target} through {source.read_out}; negative = evidence against"))
        return Explanation(self.name, maps, metadata={"stages": count, "stage_channels": source.channels,
                                                      **source.metadata})
