"""Integrated gradients (Sundararajan et al.; METHODS.md section 8).

    attribution = (X - X') * sum_{k=1..m} w_k dS/dX (X' + a_k (X - X')),   shape (C, D, H, W)

X' is the baseline: every voxel at ``baseline`` (default: the scan's no-signal level,
:func:`SegXAILib.preprocessing.no_signal_level`, i.e. its minimum for a z-scored MRI: air). The m steps
a_k and weights w_k (option ``method``):

- ``quadratic`` (default): the trapezoid rule after the substitution a = u^2, i.e. u_k = (k-1)/(m-1),
  a_k = u_k^2, w_k = 2 u_k / (m-1), halved at both ends. The same integral, with the steps crowded near the
  baseline, and the baseline's own gradient weighted 0. Why: with instance normalisation (the bundled
  U-Nets) the output hardly depends on the input's contrast, so S changes almost entirely while a is small,
  and at a = 0 (a constant input, normalised by a standard deviation of about 0) the gradient is huge. On
  the demo, dS/da is -6.2e6 at a = 0, +2.6e6 at 0.01 and 1.6e4 at 1; the sum of the attributions over
  S(X) - S(X') was 1.12, 1.04, 1.04 with 8, 12, 16 quadratic steps, against -1.73 and -0.39 with 8 and 16
  uniform trapezoid steps (0.81 and 1.17 with ``middle``);
- the Riemann rules of captum: ``trapezoid`` (METHODS.md's rule: a_k = (k-1)/(m-1), w_k = 1/(m-1), halved
  at both ends), ``left``, ``right``, ``middle`` (w_k = 1/m); the result equals captum's
  ``IntegratedGradients`` with the same baseline, steps and rule (tested), except that captum's trapezoid
  weighs its steps 1/m, not 1/(m-1), so that its attributions are (m-1)/m of these and of the integral.

S is the target's log-odds summed over its predicted region R (:mod:`.targets`), on R's crop through the
card's sliding windows (:mod:`.blackbox`); X' replaces the scan on the whole crop. Completeness, the
defining property of integrated gradients, is reported as a check: ``attribution_sum`` (the sum of the
attributions) against ``score - baseline_score`` = S(X) - S(X'); ``completeness_gap`` is their difference
and ``relative_gap`` that difference over |S(X) - S(X')|. The gap comes from the finite number of steps
(the integral is a sum of m gradients) and, when the crop needs several windows, from the blended
gradients (:mod:`.blackbox`). With ``quadratic`` and ``trapezoid`` S(X') and S(X) come from the path's two
ends; the other rules spend two more forward passes on them. The integral itself is
:func:`.blackbox.path_integral` (the rules: :func:`.blackbox.riemann_rule`), which :mod:`.sequences` shares.

Maps: ``integrated-gradients`` (shown: |attribution| summed over the input channels, smoothed by a Gaussian
of 1 voxel, relative) and ``integrated-gradients-signed`` (log-odds: the voxels' signed contributions,
which add up to ``attribution_sum``). Cost: ``steps`` forward and backward passes of the crop, ``batch``
copies per pass. Options: ``steps`` [16; METHODS.md's 32 costs twice as much: take it for a tighter
completeness check], ``method`` [quadratic], ``baseline`` [null: no-signal level], ``batch`` [4],
``margin`` [16; null: the whole grid], ``overlap`` [null: the model's own windows]. Needs only the network's
output: runs on TorchScript models.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..preprocessing import no_signal_level
from .base import ExplainContext, Explainer, Explanation
from .blackbox import RULES, CropOptions, CropScorer, attribution_maps, path_integral, predicted_region
from .options import option


@dataclass(frozen=True)
class IntegratedGradientsOptions(CropOptions):
    """Options of integrated gradients (module docstring)."""

    steps: int = option(16, minimum=2)
    method: str = option("quadratic", choices=RULES)
    baseline: float | None = option(None)
    batch: int = option(4, minimum=1)


class IntegratedGradients(Explainer):
    """Integrated gradients from the no-signal baseline to the scan, on R's crop, with a completeness check."""

    name: ClassVar[str] = "integrated-gradients"
    Options = IntegratedGradientsOptions
    needs_hooks: ClassVar[bool] = False
    summary: ClassVar[str] = ("Integrated gradients: each voxel's share of the model's confidence in the target, "
                              "compared with a blank scan (any model; options: steps, method, baseline, margin)")

    def explain(self, context: ExplainContext) -> Explanation:
        start = time.perf_counter()
        options: IntegratedGradientsOptions = context.options_for(self)
        region = predicted_region(context, self.name)
        scorer = CropScorer(context, region, options.margin, options.overlap, options.batch, options.window)
        b = no_signal_level(context.image.numpy()) if options.baseline is None else options.baseline
        path = path_integral(scorer, torch.full_like(scorer.image, b), options.steps, options.method, context.progress,
                             self.name)
        context.progress.update(self.name, 1.0, "done")
        attribution = path.attribution
        scalars = {"score": path.score, "baseline_score": path.baseline_score, **path.completeness()}
        maps = attribution_maps(
            self.name, scorer.on_grid(attribution, (attribution.shape[0], *region.shape)),
            shown=(f"Integrated gradients: how much each voxel's brightness, compared with no signal, contributes to "
                   f"the model's confidence in {context.target} over its segmented region (size, smoothed over "
                   "1 voxel; relative)"),
            signed=(f"Integrated gradients, signed: each voxel's contribution to the model's confidence in "
                    f"{context.target} (log-odds; positive raises it); they add up to the change from a blank scan"))
        metadata = {**scorer.metadata(), "baseline": b, "alphas": path.alphas, "path_scores": path.path_scores,
                    "parameters": {"steps": options.steps, "method": options.method, "baseline": options.baseline,
                                   "batch": options.batch, "margin": options.margin, "overlap": options.overlap},
                    "seconds": time.perf_counter() - start}
        return Explanation(self.name, maps, scalars=scalars, metadata=metadata)
