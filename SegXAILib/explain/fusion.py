"""Fusion maps of the dual-encoder network: how much of each encoder reaches the decoder (METHODS.md section 5).

Each :class:`~SegXAILib.models.dual_encoder.FusionGate` mixes its two inputs voxel by voxel,
``fused = psi * x + (1 - psi) * g``, so psi in [0, 1] is the share of path x and 1 - psi the share of
path g. With the default ``fusion="swin_guided"`` x is the local CNN path and g the global Swin
transformer path; with ``"cnn_guided"`` the roles are swapped, and the maps are labelled by path, not
by gate input, so ``cnn-share`` always means the CNN's share. Like attention-gate maps, these are the
network's own, built-in weights (paper 004), read with a forward hook on each gate's coefficient.

The per-level maps are upsampled and stitched by the same function as the attention-gate maps
(:func:`.layers.stitched_outputs`): trilinear interpolation with ``align_corners=False`` to the window, then the
segmentation's Gaussian-blended sliding window over the model grid. The shares do not depend on the
target class. Values are fractions (``normalise=False``), and ``cnn-share + swin-share = 1`` at every
voxel of every level and of the means.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import nn

from ..models.dual_encoder import FusionGate
from ..models.loaders import LoadedModel
from .base import ExplainContext, Explainer, Explanation, ExplanationMap, NotApplicable
from .layers import stitched_outputs
from .options import MethodOptions

PATHS = {"cnn": "the local CNN path", "swin": "the global Swin transformer path"}


def fusion_gates(network: nn.Module) -> list[tuple[str, FusionGate]]:
    """(name, gate) for every dual-encoder fusion gate, in module order."""
    return [(name, module) for name, module in network.named_modules() if isinstance(module, FusionGate)]


@dataclass(frozen=True)
class FusionOptions(MethodOptions):
    """Fusion maps take no options."""


class FusionMaps(Explainer):
    """Per-level share of each encoder path in the fused skip features, and the mean over levels.

    Levels are numbered by resolution, ``level1`` the finest fused skip. Variants:
    ``cnn-share`` (mean over levels), ``cnn-share-level1`` ... ``cnn-share-levelN``, and the same for
    ``swin-share`` (= 1 - cnn-share).
    """

    name = "fusion"
    Options = FusionOptions
    summary = ("Dual-encoder fusion gates: share of the local CNN path and of the global Swin transformer "
               "path in the fused features, per skip level and their mean")

    def check_applicable(self, model: LoadedModel) -> None:
        super().check_applicable(model)
        if not fusion_gates(model.network):
            architecture = model.card.architecture.get("name", type(model.network).__name__)
            raise NotApplicable(f"model {model.card.name!r} ({architecture}) has no fusion gates; fusion maps exist "
                                "only for the dual-encoder network (architecture 'dual_encoder' with fusion "
                                "'swin_guided' or 'cnn_guided'); use a saliency method such as gradcam for this model")

    def explain(self, context: ExplainContext) -> Explanation:
        self.check_applicable(context.model)
        gates = fusion_gates(context.model.network)
        psi, native = stitched_outputs([gate.coefficient for _, gate in gates], context, self.name)

        order = sorted(range(len(gates)), key=lambda i: -int(np.prod(native[i])))  # finest first
        shares: dict[str, list[np.ndarray]] = {"cnn": [], "swin": []}
        for i in order:
            x_path = gates[i][1].x_path
            g_path = "swin" if x_path == "cnn" else "cnn"
            shares[x_path].append(psi[i])
            shares[g_path].append((1 - psi[i]).astype(np.float32))

        patch = tuple(context.model.card.patch_size)
        count = len(gates)
        maps = []
        for path, levels in shares.items():
            maps.append(ExplanationMap(
                self.name, np.mean(levels, axis=0).astype(np.float32), f"{path}-share",
                f"Share of {PATHS[path]} in the features the decoder receives, mean over the {count} fusion "
                "levels: 1 = only this path, 0 = only the other; the same for every target class",
                normalise=False))
            for n, (i, level) in enumerate(zip(order, levels), start=1):
                factors = [p / s for p, s in zip(patch, native[i])]
                maps.append(ExplanationMap(
                    self.name, level, f"{path}-share-level{n}",
                    f"Share of {PATHS[path]} at fusion level {n} of {count} (1 = finest skip connection), "
                    f"computed on a grid {'x'.join(f'{f:g}' for f in factors)} times coarser than the model's: "
                    "1 = only this path reaches the decoder here, 0 = only the other", normalise=False))
        return Explanation(
            method=self.name, maps=maps,
            metadata={"gates": [gates[i][0] for i in order], "native_shapes": [list(native[i]) for i in order],
                      "psi_is_share_of": gates[0][1].x_path, "class_independent": True,
                      "upsampling": "trilinear, align_corners=False"})
