"""Has MiSuRe's mask settled before its last optimisation step? The MSR after fewer steps against the MSR after most.

Stage 2 costs one forward and one backward pass of the SR's crop (at most the card's patch) per step, and
takes 100 steps (METHODS.md section 4): a shorter run would be faster only if the mask stopped changing
earlier. MiSuRe is deterministic, so a run with ``steps=s`` is the first ``s`` steps of a longer one. The
scan is segmented once (the pipeline's segmentation and postprocessing, as ``segxai explain``); MiSuRe then
runs once per step count, and each prints one JSON line: seconds, Dice explained, perturbation ratio, the
MSR's mean weight inside the SR, and, against the largest count's MSR, the mean |difference| inside the SR
and the share of SR voxels whose weights differ by more than 0.2 (the clamp that sets a cell to 0).

    python benchmarks/misure_steps.py segxai-demo/case/image.nii.gz --steps 10,20,50,100
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

import SegXAILib as sx
from SegXAILib.explain.base import Explanation
from SegXAILib.explain.misure import CLAMP_BELOW, MiSuRe
from SegXAILib.explain.pipeline import explain_segmentation
from SegXAILib.inference import segment


def msr_change(explanation: Explanation, last: Explanation) -> dict[str, float]:
    """The MSR's mean weight inside the SR, and how it differs from ``last``'s there (both maps (*S))."""
    sr = explanation.maps[0].array > 0
    msr, final = explanation.maps[1].array[sr], last.maps[1].array[sr]
    return {"msr_mean_weight": round(float(msr.mean()), 3),
            "mean_abs_difference": round(float(np.abs(msr - final).mean()), 3),
            "percent_differing": round(100 * float((np.abs(msr - final) > CLAMP_BELOW).mean()), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scan")
    parser.add_argument("--steps", default="10,20,50,100", help="step counts, comma-separated")
    args = parser.parse_args()
    counts = sorted(int(s) for s in args.steps.split(","))

    model = sx.load_model("brain-lesion-unet")
    segmentation = segment(sx.read_volume(args.scan), model, "cpu")
    runs = {steps: explain_segmentation(segmentation, model, [MiSuRe()], None, torch.device("cpu"),
                                        options={"misure": {"steps": steps}}).explanations[0]
            for steps in counts}
    last = runs[counts[-1]]
    for steps, explanation in runs.items():
        print(json.dumps({"steps": steps, "seconds": explanation.metadata["seconds"],
                          **{k: round(explanation.scalars[k], 3) for k in ("dice_explained", "perturbation_ratio")},
                          **msr_change(explanation, last)}), flush=True)


if __name__ == "__main__":
    main()
