"""Faithfulness of every saliency method on validation cases: the MiSuRe paper's Table 1 protocol.

For each case folder (``image.nii.gz`` + ``label.nii.gz``) it runs what a user would run::

    segxai explain CASE/image.nii.gz --model MODEL --methods METHODS --out OUT/<case>
    segxai evaluate-maps OUT/<case> --steps K

and prints one row per map (mean over the cases) at the threshold the paper uses for that kind of
map: MiSuRe's maps at t = 0 (any non-zero voxel), Seg-Grad-CAM(++) at t = 0.05, the others at
t = 0.1; and the deletion / insertion AUCs of the target probability.

    python benchmarks/faithfulness_table.py data/lesions/val --cases 3
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path

import numpy as np

from SegXAILib.cli import main as segxai

PAPER_THRESHOLD = {"misure": 0.0, "gradcam": 0.05, "gradcampp": 0.05}
"""Binarisation threshold per method (Hasany et al., Table 1); other methods: :data:`DEFAULT_THRESHOLD`."""
DEFAULT_THRESHOLD = 0.1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cases_dir", help="folder of case folders with image.nii.gz and label.nii.gz")
    parser.add_argument("--cases", type=int, default=3, help="how many case folders (sorted by name)")
    parser.add_argument("--model", default="brain-lesion-unet")
    parser.add_argument("--methods", default="gradcam,gradcampp,protoseg,misure")
    parser.add_argument("--steps", type=int, default=10, help="K of the deletion and insertion curves")
    parser.add_argument("--out", default="faithfulness-table", help="explain outputs (kept; finished cases are reused)")
    args = parser.parse_args()

    folders = sorted(p for p in Path(args.cases_dir).iterdir() if (p / "image.nii.gz").exists())[:args.cases]
    rows = defaultdict(list)
    for case in folders:
        out = Path(args.out) / case.name
        if not (out / "faithfulness.csv").exists():
            assert segxai(["explain", str(case / "image.nii.gz"), "--model", args.model, "--methods", args.methods,
                           "--label", str(case / "label.nii.gz"), "--out", str(out), "--progress", "none"]) == 0
            assert segxai(["evaluate-maps", str(out), "--steps", str(args.steps), "--progress", "none"]) == 0
        with open(out / "faithfulness.csv", newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                rows[(row["method"], row["variant"])].append(row)

    print(f"\nmodel: {args.model}   cases: {', '.join(p.name for p in folders)}   K = {args.steps}\n")
    print("| method | map | threshold | Dice explained | perturbation ratio | deletion AUC (p) | insertion AUC (p) |")
    print("|---|---|---|---|---|---|---|")
    for (method, variant), group in sorted(rows.items()):
        t = f"{PAPER_THRESHOLD.get(method, DEFAULT_THRESHOLD):g}"
        values = {key: np.nanmean([float(r[key]) for r in group]) for key in
                  (f"dice_explained_gt{t}", f"perturbation_ratio_gt{t}", "deletion_auc_probability",
                   "insertion_auc_probability")}
        print(f"| {method} | {variant or '-'} | {t} | {values[f'dice_explained_gt{t}']:.3f} | "
              f"{values[f'perturbation_ratio_gt{t}']:.2f} | {values['deletion_auc_probability']:.3f} | "
              f"{values['insertion_auc_probability']:.3f} |")


if __name__ == "__main__":
    main()
