"""MHEX+ CAMs of an EU-Net from the equivalent kernels of its heads (paper 000, METHODS.md section 2).

Head s computes ``P_s = W2_s ReLU(W1_s X_s)`` at every voxel (1x1x1 convolutions, no biases). Dropping
the ReLU (and the attention gate, which only shapes what flows on to the next stage) leaves the linear
map ``W_equiv_s = W2_s @ W1_s`` (n_classes x C_s), and

    CAM_s,c = sum_j W_equiv_s[c, j] * X_s[j]        (a 1x1x1 convolution of X_s with W_equiv_s)

is the class-c evidence the decoder features of stage s carry along the head's own read-out direction.
It is a *linearisation*: it equals the head's deep prediction P_s,c only where every unit of
``W1_s X_s`` is positive (the ReLU is the identity there); elsewhere it also counts the evidence the
ReLU cuts away, with its sign (negative = evidence against c). The target's map is the sum over its
channels. Each stage map is upsampled to the model grid (trilinear, ``align_corners=False``); the
MHEX+ map is the mean of the min-max normalised stage maps (the per-stage maps are the "decision
traces" at each scale). Cost: one forward pass plus one 1x1x1 convolution per stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from ..inference import sliding_window_predict
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


@dataclass(frozen=True)
class MHEXOptions(MethodOptions):
    """MHEX+ CAMs take no options."""


class MHEXCAM(Explainer):
    """Equivalent-kernel CAMs of every MHEX+ head of an EU-Net and their normalised mean."""

    name: ClassVar[str] = "mhex"
    Options = MHEXOptions
    summary: ClassVar[str] = ("MHEX+ CAMs of an EU-Net: each decoder stage's evidence for the target through "
                              "its head's equivalent kernel, and their normalised mean (one forward pass)")

    def check_applicable(self, model: LoadedModel) -> None:
        super().check_applicable(model)
        if not isinstance(model.network, EUNet):
            raise NotApplicable("mhex needs a network with MHEX+ heads (an EU-Net, architecture 'eunet'); "
                                f"{model.card.name!r} has none")

    def explain(self, context: ExplainContext) -> Explanation:
        self.check_applicable(context.model)
        network: EUNet = context.model.network

        def window_cams(window: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return tuple(upsample_to(cam, window.shape[2:]) for cam in stage_cams(network, window, context.channels))

        with torch.inference_mode():
            stitched = sliding_window_predict(window_cams, context.image, context.model.card.windows,
                                              context.device, progress=context.progress, stage=self.name)
        stitched = (stitched,) if isinstance(stitched, torch.Tensor) else stitched
        cams = [cam[0, 0] for cam in stitched]
        combined = torch.stack([minmax(cam) for cam in cams]).mean(0)

        count = len(cams)
        maps = [ExplanationMap(
            self.name, combined.numpy().astype(np.float32), None,
            f"MHEX+ map of {context.target}: mean over the {count} decoder stages of each stage's evidence for "
            "it (equivalent kernel of its head, a linear read-out), each scaled to 0-1; high = features "
            "that the heads read as the target")]
        for index, (cam, head) in enumerate(zip(cams, network.heads), start=1):
            scale = "coarsest" if index == 1 else "finest" if index == count else "intermediate"
            maps.append(ExplanationMap(
                self.name, cam.numpy().astype(np.float32), f"stage{index}",
                f"Decoder stage {index} of {count} ({scale}, {head.conv1.in_channels} channels): evidence for "
                f"{context.target} through its head's equivalent kernel; negative = evidence against"))
        return Explanation(self.name, maps, metadata={
            "stages": count, "stage_channels": [head.conv1.in_channels for head in network.heads],
            "feed": network.feed,
            "note": "linearisation of each head (ReLU and attention gate ignored); stage maps upsampled "
                    "trilinearly with align_corners=False"})
