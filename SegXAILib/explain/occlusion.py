"""Occlusion sensitivity (Zeiler & Fergus; METHODS.md section 8).

A cube of ``cube``^3 voxels of the model grid is set to ``baseline`` (default: the scan's no-signal level,
:func:`SegXAILib.preprocessing.no_signal_level`, i.e. its minimum for a z-scored MRI: air, as if the tissue
were not there), and the drop of the target score is measured:

    drop(Q) = S(X) - S(X with cube Q at the baseline)
    map(p)  = mean of drop(Q) over the cubes Q that contain p   (0 where no cube was placed)

S is the target's log-odds summed over its predicted region R (:mod:`.targets`), on R's crop through the
card's sliding windows (:mod:`.blackbox`). The map is in log-odds units: positive where hiding the tissue
lowers the model's confidence in the target, negative where it raises it. With every cube position of the
grid it equals captum's ``Occlusion`` (tested).

Which cubes. The work is one forward pass of the crop per cube, plus one for S(X). Cubes every ``stride``
voxels cover R's bounding box grown by ``reach`` voxels (default 0; within the crop), centred on it, the
last one reaching its far side. More than ``max_cubes`` cubes widen the stride (and the cube with it once
the stride passes it, so that the cubes still touch) until they fit, and the metadata says so: the cost is
at most ``max_cubes`` + 1 forward passes of the crop, whatever the target's size. With the defaults a target
up to 32 voxels wide gets 3 x 3 x 3 cubes of 16 voxels, each overlapping its neighbours by half; the demo's
tumour (a bounding box of about 48 x 48 x 56 voxels at 1.5 mm; an 80 x 80 x 88 crop) gets 3 x 3 x 3 cubes of
18 voxels (27 mm) every 18: 28 passes of the crop, about two passes of the whole model grid in sliding windows
(the nominal 16/8 would place 150 cubes, METHODS.md's 8^3 every 4 voxels about 900: ask for them with
``--option occlusion.max_cubes=1000``, ``occlusion.cube=8``, ``occlusion.stride=4``).

Options: ``cube`` [16], ``stride`` [8], ``baseline`` [null: no-signal level], ``reach`` [0], ``max_cubes``
[27], ``batch`` [4] occluded copies per pass, ``margin`` [16; null: the whole grid], ``overlap`` [null: the
model's own windows]. Needs only the network's output: runs on TorchScript models.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from ..preprocessing import no_signal_level
from .base import ExplainContext, Explainer, Explanation, ExplanationMap
from .blackbox import CropOptions, CropScorer, bounding_box, chunks, predicted_region
from .options import option
from .targets import SCORE_WORDS


@dataclass(frozen=True)
class OcclusionOptions(CropOptions):
    """Options of occlusion sensitivity (module docstring)."""

    cube: int = option(16, minimum=1)
    stride: int = option(8, minimum=1)
    baseline: float | None = option(None)
    reach: int = option(0, minimum=0)
    max_cubes: int = option(27, minimum=1)
    batch: int = option(4, minimum=1)


def cube_starts(low: int, high: int, size: int, cube: int, stride: int) -> list[int]:
    """Starts of cubes of ``cube`` voxels every ``stride`` covering [low, high) on an axis of ``size`` voxels:
    centred on the interval, the last reaching its end, and moved as a whole to lie inside the axis where the
    interval meets its edge (the stride stays regular, as MONAI's cubes); clipped to the axis only where they span
    more than it (a cube larger than the axis is the axis)."""
    length = high - low
    count = max(math.ceil((length - cube) / stride), 0) + 1
    span = (count - 1) * stride + cube
    first = min(max(low - (span - length) // 2, 0), max(size - span, 0))
    return sorted({min(max(first + n * stride, 0), max(size - cube, 0)) for n in range(count)})


class OcclusionSensitivity(Explainer):
    """Occlusion sensitivity: the mean drop of S when cubes around each voxel are set to the baseline."""

    name: ClassVar[str] = "occlusion"
    Options = OcclusionOptions
    needs_hooks: ClassVar[bool] = False
    summary: ClassVar[str] = ("Occlusion: how much the model's confidence in the target falls when a cube of the scan "
                              "is blanked (any model; options: cube, stride, baseline, reach, max_cubes, margin)")

    @staticmethod
    def placement(box: tuple[tuple[int, ...], tuple[int, ...]], shape: tuple[int, ...], cube: int, stride: int,
                  max_cubes: int) -> tuple[list[list[int]], int, int]:
        """Cube starts per axis covering ``box`` (start, stop) on a crop of ``shape``; the stride (and cube) widened
        until at most ``max_cubes`` cubes remain. Returns the starts, the cube and the stride used."""
        while True:
            starts = [cube_starts(lo, hi, n, cube, stride) for lo, hi, n in zip(*box, shape)]
            if math.prod(len(s) for s in starts) <= max_cubes:
                return starts, cube, stride
            stride += 1
            cube = max(cube, stride)

    def explain(self, context: ExplainContext) -> Explanation:
        start = time.perf_counter()
        options: OcclusionOptions = context.options_for(self)
        region = predicted_region(context, self.name)
        scorer = CropScorer(context, region, options.margin, options.overlap, options.batch, options.window)
        b = no_signal_level(context.image.numpy()) if options.baseline is None else options.baseline
        x = scorer.image
        shape = tuple(x.shape[2:])
        low, high = bounding_box(region[scorer.crop.slices])
        box = (tuple(max(a - options.reach, 0) for a in low), tuple(min(z + options.reach, n)
                                                                   for z, n in zip(high, shape)))
        starts, cube, stride = self.placement(box, shape, options.cube, options.stride, options.max_cubes)
        cubes = list(itertools.product(*starts))

        def occluded(corners: list[tuple[int, ...]]) -> torch.Tensor:
            copies = x.repeat(len(corners), *[1] * (x.ndim - 1))
            for n, corner in enumerate(corners):
                copies[(n, slice(None), *(slice(c, c + cube) for c in corner))] = b
            return copies

        context.progress.update(self.name, 0.0, f"{len(cubes)} cubes")
        score = float(scorer.scores(x)[0])
        drops = []
        for part in chunks(len(cubes), options.batch):
            context.progress.update(self.name, part.start / len(cubes), f"cubes {part.start + 1}-{part.stop} of "
                                                                        f"{len(cubes)}")
            drops += (score - scorer.scores(occluded([cubes[n] for n in part]))).tolist()
        context.progress.update(self.name, 1.0, "done")

        total = np.zeros(shape, np.float64)
        count = np.zeros(shape, np.int32)
        for corner, drop in zip(cubes, drops):
            inside = tuple(slice(c, c + cube) for c in corner)
            total[inside] += drop
            count[inside] += 1
        mean = np.divide(total, count, out=np.zeros_like(total), where=count > 0)
        array = scorer.on_grid(mean.astype(np.float32), region.shape)
        description = (f"Occlusion: how much the model's confidence in {context.target} over its segmented region "
                       f"falls when a {cube}-voxel cube around this point is blanked (set to the scan's no-signal "
                       f"value); {SCORE_WORDS}, mean over the cubes covering the point (negative: blanking raised it)")
        widened = (cube, stride) != (options.cube, options.stride)
        metadata: dict[str, Any] = {
            **scorer.metadata(), "baseline": b, "cubes": len(cubes), "cube": cube, "stride": stride,
            "covered_box": [[lo + s.start, hi + s.start] for lo, hi, s in zip(*box, scorer.crop.slices)],
            "parameters": {"cube": options.cube, "stride": options.stride, "baseline": options.baseline,
                           "reach": options.reach, "max_cubes": options.max_cubes, "batch": options.batch,
                           "margin": options.margin, "overlap": options.overlap},
            "seconds": time.perf_counter() - start}
        if widened:
            metadata["note"] = (f"{options.cube}-voxel cubes every {options.stride} voxels would exceed max_cubes "
                                f"({options.max_cubes}); {cube}-voxel cubes every {stride} voxels were used")
        scalars = {"score": score, "max_drop": max(drops), "min_drop": min(drops)}
        return Explanation(self.name, [ExplanationMap(self.name, array, None, description, normalise=False)], scalars,
                           metadata=metadata)
