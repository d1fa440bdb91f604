"""MiSuRe's regions on a real case: stage-1 Dice against dilations for several baselines, and the MSR's roughness.

Segments the scan with the bundled brain-lesion U-Net (the pipeline's segmentation: mirrored passes and
postprocessing), then runs MiSuRe with the given options and prints, as one JSON line each:

- ``regions``: the no-signal level (the scan's minimum and the median outside the head), and the Dice of
  the network's single pass with the whole scan, the head or the brain kept (the rest at the baseline),
  against its own postprocessed pass on the unchanged scan (MiSuRe's reference);
- ``misure``: MiSuRe's scalars, its stage-1 curve, the SR's size (voxels, % of the head) and the MSR's
  roughness: the mean |difference| of neighbouring coarse cells (values at the cells' centres, inside the
  SR 4 voxels from its edge) and the share of neighbours differing by more than 0.5 (a checkerboard).

    segxai synth-lesion mni152 --seed 30007 --out /tmp/mni_case
    python benchmarks/misure_regions.py /tmp/mni_case/image.nii.gz
    python benchmarks/misure_regions.py segxai-demo/case/image.nii.gz --option baseline=0 --option gamma=0.1
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from scipy import ndimage

import SegXAILib as sx
from SegXAILib.explain.base import ExplainContext
from SegXAILib.explain.misure import CropPredictor, MiSuRe
from SegXAILib.inference import segment, target_mask
from SegXAILib.metrics import dice
from SegXAILib.models.networks import input_multiple
from SegXAILib.postprocessing import postprocess
from SegXAILib.preprocessing import foreground_mask, no_signal_level


def cell_roughness(msr: np.ndarray, sr: np.ndarray, coarse: int) -> tuple[float, float]:
    """(mean |difference| of neighbouring cells, share of neighbours differing by > 0.5) inside the SR's interior
    (eroded by ``coarse`` voxels); a cell's value is read at its centre (the mean of its two middle voxels)."""
    inner = ndimage.binary_erosion(sr, iterations=coarse)
    low, high = (tuple(slice(start, None, coarse) for _ in range(msr.ndim)) for start in (coarse // 2 - 1, coarse // 2))
    size = tuple(min(a, b) for a, b in zip(msr[low].shape, msr[high].shape))
    trim = tuple(slice(0, n) for n in size)
    cells, ok = (msr[low][trim] + msr[high][trim]) / 2, inner[high][trim]
    means, flips = [], []
    for axis in range(msr.ndim):
        n = size[axis] - 1
        both = np.take(ok, range(n), axis=axis) & np.take(ok, range(1, n + 1), axis=axis)
        steps = np.abs(np.diff(cells, axis=axis))[both]
        means.append(steps.mean())
        flips.append((steps > 0.5).mean())
    return float(np.mean(means)), float(np.mean(flips))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scan")
    parser.add_argument("--option", action="append", default=[], help="misure option NAME=VALUE (JSON value)")
    args = parser.parse_args()
    options = {k: json.loads(v) for k, v in (o.split("=", 1) for o in args.option)}

    model = sx.load_model("brain-lesion-unet")
    card = model.card
    target, channels = card.target_channels(None)
    seg = segment(sx.read_volume(args.scan), model, "cpu")
    labels = [c.label for c in card.classes]

    def post(p: np.ndarray) -> np.ndarray:
        return postprocess(p, seg.model_grid, card.postprocessing, labels, seg.brain)

    image = seg.model_grid.array
    x0 = torch.from_numpy(image)[None, None]
    head, brain = foreground_mask(image), seg.brain.on(seg.model_grid)
    air = no_signal_level(image)
    reference = target_mask(post(CropPredictor(model.network, card.windows, input_multiple(card), air,
                                               torch.device("cpu"), card.output)(x0)[0].numpy()), channels)
    kept = {}
    for name, b in (("zero", 0.0), ("no_signal", air)):
        predictor = CropPredictor(model.network, card.windows, input_multiple(card), b,
                                  torch.device("cpu"), card.output)
        for region, keep in (("head", head), ("brain", brain | reference)):
            x = torch.where(torch.from_numpy(keep), x0, torch.tensor(b))
            kept[f"{name}.{region}"] = round(dice(target_mask(post(predictor(x)[0].numpy()), channels), reference), 3)
    print(json.dumps({"regions": {"min": round(float(image.min()), 3),
                                  "outside_head_median": round(float(np.median(image[~head])), 3),
                                  "dice_kept": kept}}), flush=True)

    context = ExplainContext(model, x0, target, channels, seg.probabilities, options={"misure": options},
                             postprocess=post)
    explanation = MiSuRe().explain(context)
    sr, msr = explanation.maps[0].array > 0, explanation.maps[1].array
    mean_step, flips = cell_roughness(msr, sr, explanation.metadata["coarse"])
    print(json.dumps({"misure": {
        **{k: round(v, 3) for k, v in explanation.scalars.items()},
        "curve": [round(v, 3) for v in explanation.curves["dilation_dice"]],
        "sr_voxels": int(sr.sum()), "sr_percent_of_head": round(100 * float((sr & head).sum() / head.sum()), 1),
        "cell_step": round(mean_step, 3), "cell_flips": round(flips, 3),
        **{k: explanation.metadata[k] for k in ("baseline", "stage2", "dice_with_segmentation", "seconds")}}}))


if __name__ == "__main__":
    main()
