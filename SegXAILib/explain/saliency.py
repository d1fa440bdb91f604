"""Saliency: the gradient of the target score with respect to the scan (Simonyan et al.; METHODS.md section 8).

    attribution = dS/dX (X),   shape (C, D, H, W) on the model grid

S is the target's log-odds summed over its predicted region R (:mod:`.targets`); the gradient is taken on
R's crop through the card's sliding windows (:mod:`.blackbox`: exact in one window, a Gaussian blend of the
windows' gradients otherwise; 0 outside the crop). It equals captum's ``Saliency(abs=False)`` of S (tested).

Maps: ``saliency`` (shown): |dS/dX| summed over the input channels and smoothed by a Gaussian of 1 voxel,
relative; ``saliency-signed``: dS/dX summed over the input channels, in log-odds per intensity unit of the
normalised scan. Cost: one forward and one backward pass of the crop. Options: ``margin`` [16; null: the
whole grid], ``overlap`` [null: the model's own windows]. Needs only the network's output: runs on TorchScript models.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

from .base import ExplainContext, Explainer, Explanation
from .blackbox import CropOptions, CropScorer, attribution_maps, predicted_region


@dataclass(frozen=True)
class SaliencyOptions(CropOptions):
    """Options of saliency: the crop's ``margin`` and the windows' ``overlap`` (:class:`.blackbox.CropOptions`)."""


class Saliency(Explainer):
    """Saliency (input gradient): dS/dX at the scan, on R's crop."""

    name: ClassVar[str] = "saliency"
    Options = SaliencyOptions
    needs_hooks: ClassVar[bool] = False
    summary: ClassVar[str] = ("Saliency: where a small change of the scan's intensity changes the model's confidence "
                              "in the target most (input gradient; any model; options: margin)")

    def explain(self, context: ExplainContext) -> Explanation:
        start = time.perf_counter()
        options: SaliencyOptions = context.options_for(self)
        region = predicted_region(context, self.name)
        scorer = CropScorer(context, region, options.margin, options.overlap, batch=1, window=options.window)
        context.progress.update(self.name, 0.0, "gradient")
        gradient, score = scorer.gradients(scorer.image)
        context.progress.update(self.name, 1.0, "done")
        attribution = scorer.on_grid(gradient[0].numpy(), (gradient.shape[1], *region.shape))
        maps = attribution_maps(
            self.name, attribution,
            shown=(f"Saliency: where a small change of the scan's brightness would change the model's confidence in "
                   f"{context.target} over its segmented region most (size of the input gradient, smoothed over "
                   "1 voxel; relative)"),
            signed=(f"Saliency, signed: positive where a brighter scan would raise the model's confidence in "
                    f"{context.target}, negative where it would lower it (log-odds per intensity unit)"))
        metadata = {**scorer.metadata(), "parameters": {"margin": options.margin, "overlap": options.overlap},
                    "seconds": time.perf_counter() - start}
        return Explanation(self.name, maps, scalars={"score": float(score[0])}, metadata=metadata)
