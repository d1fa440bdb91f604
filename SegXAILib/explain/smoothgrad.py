"""SmoothGrad: the input gradient averaged over noisy copies of the scan (Smilkov et al.; METHODS.md section 8).

    attribution = (1/n) sum_{k=1..n} dS/dX (X + e_k),   e_k ~ N(0, sigma^2) per voxel,
    sigma = noise * (max X - min X)   (the intensity range of the scan on the model grid)

S is the target's log-odds summed over its predicted region R (:mod:`.targets`), on R's crop through the
card's sliding windows (:mod:`.blackbox`). The noise is drawn on the crop, copy after copy, from a generator
seeded with ``seed`` (:meth:`SmoothGrad.draw_noise`), so a run is reproducible and does not depend on
``batch``. Given the same noise it equals captum's ``NoiseTunnel(Saliency(abs=False))`` with
``nt_type="smoothgrad"`` (tested).

Maps as saliency's: ``smoothgrad`` (shown: |attribution| summed over the input channels, smoothed by a
Gaussian of 1 voxel, relative) and ``smoothgrad-signed`` (log-odds per intensity unit). Cost: ``samples``
forward and backward passes of the crop, ``batch`` copies per pass. Options: ``samples`` [8], ``noise``
[0.1], ``seed`` [0], ``batch`` [4], ``margin`` [16; null: the whole grid], ``overlap`` [null: the model's own
windows]. The paper averages 50 copies; 8 keep the cost near that of integrated gradients with 8 steps (ask
for more when the map is grainy). Needs only the network's output: runs on TorchScript models.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import ExplainContext, Explainer, Explanation
from .blackbox import CropOptions, CropScorer, attribution_maps, chunks, predicted_region
from .options import option


@dataclass(frozen=True)
class SmoothGradOptions(CropOptions):
    """Options of SmoothGrad (module docstring)."""

    samples: int = option(8, minimum=1)
    noise: float = option(0.1, minimum=0.0)
    seed: int = option(0)
    batch: int = option(4, minimum=1)


class SmoothGrad(Explainer):
    """SmoothGrad: the mean of dS/dX over ``samples`` copies of the scan with Gaussian noise, on R's crop."""

    name: ClassVar[str] = "smoothgrad"
    Options = SmoothGradOptions
    needs_hooks: ClassVar[bool] = False
    summary: ClassVar[str] = ("SmoothGrad: saliency averaged over noisy copies of the scan, steadier than one "
                              "gradient (any model; options: samples, noise, seed, batch, margin)")

    @staticmethod
    def draw_noise(shape: tuple[int, ...], samples: int, sigma: float, seed: int) -> torch.Tensor:
        """The noise e_1..e_n: (samples, *shape) float32, N(0, sigma^2), copy after copy from ``seed``."""
        generator = torch.Generator().manual_seed(seed)
        return torch.stack([torch.randn(shape, generator=generator) for _ in range(samples)]) * sigma

    def explain(self, context: ExplainContext) -> Explanation:
        start = time.perf_counter()
        options: SmoothGradOptions = context.options_for(self)
        region = predicted_region(context, self.name)
        scorer = CropScorer(context, region, options.margin, options.overlap, options.batch, options.window)
        sigma = options.noise * float(context.image.max() - context.image.min())
        noise = self.draw_noise(tuple(scorer.image.shape[1:]), options.samples, sigma, options.seed)
        total = torch.zeros_like(scorer.image[0])
        scores = []
        for part in chunks(options.samples, options.batch):
            context.progress.update(self.name, part.start / options.samples,
                                    f"noisy copies {part.start + 1}-{part.stop} of {options.samples}")
            gradient, score = scorer.gradients(scorer.image + noise[part.start:part.stop])
            total += gradient.sum(0)
            scores += score.tolist()
        context.progress.update(self.name, 1.0, "done")
        attribution = scorer.on_grid((total / options.samples).numpy(), (total.shape[0], *region.shape))
        maps = attribution_maps(
            self.name, attribution,
            shown=(f"SmoothGrad: where a small change of the scan's brightness would change the model's confidence "
                   f"in {context.target} over its segmented region most, averaged over {options.samples} noisy copies "
                   "of the scan (size, smoothed over 1 voxel; relative)"),
            signed=(f"SmoothGrad, signed: positive where a brighter scan would raise the model's confidence in "
                    f"{context.target}, negative where it would lower it (log-odds per intensity unit, mean over "
                    f"{options.samples} noisy copies)"))
        metadata = {**scorer.metadata(), "noise_sigma": sigma, "noisy_scores": scores,
                    "parameters": {"samples": options.samples, "noise": options.noise, "seed": options.seed,
                                   "batch": options.batch, "margin": options.margin, "overlap": options.overlap},
                    "seconds": time.perf_counter() - start}
        return Explanation(self.name, maps, metadata=metadata)
