"""Dice of a model on lesions placed in a T1 MRI it never saw (the issue's acceptance check).

Runs exactly what a user would run, through the command line, for each seed::

    segxai synth-lesion HOST --seed N --out DIR/N
    segxai segment DIR/N/image.nii.gz --model MODEL --out DIR/N/seg

and prints the Dice of every class and group against the generated label.

    python benchmarks/unseen_host_dice.py /usr/share/mricron/templates/inia19-t1-brain.nii.gz --seeds 1,2,3
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from SegXAILib.cli import main as segxai
from SegXAILib.metrics import dice_per_target
from SegXAILib.models.registry import resolve_card
from SegXAILib.volume import read_volume


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("host", help="a T1 MRI file the model was not trained on")
    parser.add_argument("--seeds", default="1,2,3,4,5")
    parser.add_argument("--model", default="brain-lesion-unet")
    args = parser.parse_args()
    card = resolve_card(args.model)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in [int(s) for s in args.seeds.split(",")]:
            case = Path(tmp) / str(seed)
            assert segxai(["synth-lesion", args.host, "--seed", str(seed), "--out", str(case)]) == 0
            assert segxai(["segment", str(case / "image.nii.gz"), "--model", args.model, "--out", str(case / "seg"),
                           "--progress", "none"]) == 0
            truth = read_volume(case / "label.nii.gz").array
            predicted = read_volume(case / "seg" / "segmentation.nii.gz").array
            rows.append(dice_per_target(predicted, truth, card))
    names = list(rows[0])
    print(f"\nhost: {args.host}   model: {args.model}\n")
    print("| seed | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
    for seed, row in zip(args.seeds.split(","), rows):
        print(f"| {seed} | " + " | ".join(f"{row[n]:.3f}" for n in names) + " |")
    print("| mean | " + " | ".join(f"{np.mean([r[n] for r in rows]):.3f}" for n in names) + " |")


if __name__ == "__main__":
    main()
