"""Attention-gate maps of an Attention U-Net (METHODS.md section 5).

An additive attention gate (Oktay et al.; MONAI ``AttentionBlock``) multiplies the encoder's skip
features x by ``psi = sigmoid(BN(conv(ReLU(W_g g + W_x x))))``, one coefficient in [0, 1] per voxel
of its level: 0 = the skip features are suppressed there, 1 = passed to the decoder unchanged.
These coefficients are the model's own, built-in account of where it looks; we read them with a
forward hook on each gate's final sigmoid. (The reference notebook of paper 001 shows
sigmoid(final logits) and calls it attention: that is a probability map, not a gate, and is not
done here.)

Each gate's psi (one channel, on its level's grid) is upsampled to the window with trilinear
interpolation, ``align_corners=False`` (voxel centres at (i + 0.5) * factor - 0.5, as
``torch.nn.functional.interpolate``; scipy's zoom uses a different grid), and the windows are
stitched by the same Gaussian-blended sliding window as the segmentation. The gates do not depend
on the target class: the maps are the same for every target.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import nn

from ..models.loaders import LoadedModel
from .base import ExplainContext, Explainer, Explanation, ExplanationMap, NotApplicable
from .layers import stitched_outputs
from .options import MethodOptions


def attention_gates(network: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, gate) for every module with a ``psi`` Sequential ending in a sigmoid, in module order.

    That is the structure of MONAI's ``AttentionBlock`` (and of any gate written the same way).
    """
    return [(name, module) for name, module in network.named_modules()
            if isinstance(getattr(module, "psi", None), nn.Sequential) and len(module.psi) > 0
            and isinstance(module.psi[-1], nn.Sigmoid)]


@dataclass(frozen=True)
class AttentionOptions(MethodOptions):
    """Attention-gate maps take no options."""


class AttentionGateMaps(Explainer):
    """Per-level attention-gate coefficients and their mean, on the model grid.

    Levels are numbered by resolution: ``level1`` is the finest gate (in MONAI's AttentionUnet the
    outermost skip connection, at full resolution), ``levelN`` the coarsest (next to the
    bottleneck). The map without a variant is the mean of the N upsampled level maps.
    """

    name = "attention"
    Options = AttentionOptions
    summary = "Attention U-Net gate coefficients (0 = suppressed, 1 = passed) per skip level and their mean"

    def check_applicable(self, model: LoadedModel) -> None:
        super().check_applicable(model)
        if not attention_gates(model.network):
            architecture = model.card.architecture.get("name", type(model.network).__name__)
            raise NotApplicable(f"model {model.card.name!r} ({architecture}) has no attention gates; attention "
                                "maps exist only for Attention U-Nets (architecture 'attention_unet'); "
                                "use a saliency method such as gradcam for this model")

    def explain(self, context: ExplainContext) -> Explanation:
        self.check_applicable(context.model)
        gates = attention_gates(context.model.network)
        stitched, native = stitched_outputs([gate.psi[-1] for _, gate in gates], context, self.name)

        # finest first, whatever order the modules were declared in
        order = sorted(range(len(gates)), key=lambda i: -int(np.prod(native[i])))
        levels = [stitched[i] for i in order]
        patch = tuple(context.model.card.patch_size)
        maps = []
        for n, i in enumerate(order, start=1):
            factors = [p / s for p, s in zip(patch, native[i])]
            grid = ("at full resolution" if max(factors) == 1 else
                    f"on a grid {'x'.join(f'{f:g}' for f in factors)} times coarser than the model's")
            maps.append(ExplanationMap(
                self.name, levels[n - 1], f"level{n}",
                f"Attention gate {n} of {len(gates)} (1 = finest skip connection), computed {grid}: "
                "0 = the network suppresses its encoder features here, 1 = passes them", normalise=False))
        mean = np.mean(levels, axis=0).astype(np.float32)
        maps.insert(0, ExplanationMap(
            self.name, mean, None,
            f"Mean of the {len(gates)} attention gates: where the network lets encoder features through "
            "(1) or suppresses them (0); the same for every target class", normalise=False))
        return Explanation(
            method=self.name, maps=maps,
            metadata={"gates": [gates[i][0] for i in order], "native_shapes": [list(native[i]) for i in order],
                      "class_independent": True, "upsampling": "trilinear, align_corners=False"})
