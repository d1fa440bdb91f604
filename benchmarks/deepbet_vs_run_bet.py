"""Does ``segxai segment --model deepbet`` give the brain mask deepbet's own ``run_bet`` gives?

For each head: deepbet 1.0.2's ``run_bet([head], mask_paths=[...], threshold=.5, n_dilate=0, no_gpu=True)`` (its
own code and TorchScript networks: this runs the installed package's code, as its users do), then the command a
SegXAI user runs (deepbet's networks rebuilt eagerly, its archives' code never run)::

    segxai segment HEAD --model deepbet --out OUT --progress none

and the Dice of the two masks on the head's grid. Default heads: Colin27 with skull (mricron-data's ch2),
the MNI152 2009a template nilearn ships (skull-stripped) and the macaque template inia19 (mricron-data)::

    python benchmarks/deepbet_vs_run_bet.py [HEAD ...] [--work DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from importlib import resources
from pathlib import Path

import numpy as np

from SegXAILib.cli import main as segxai
from SegXAILib.data.samples import MRICRON_TEMPLATES
from SegXAILib.volume import read_volume

HEADS = (str(MRICRON_TEMPLATES / "ch2.nii.gz"),
         str(resources.files("nilearn") / "datasets" / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"),
         str(MRICRON_TEMPLATES / "inia19-t1-brain.nii.gz"))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return 2.0 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


def compare(head: str, work: Path) -> tuple[float, float, float, int, int]:
    """Dice, seconds of run_bet, seconds of segxai segment, and the two masks' voxel counts."""
    from deepbet import run_bet

    stem = Path(head).name.split(".")[0]
    reference = work / f"{stem}_run_bet_mask.nii.gz"
    start = time.perf_counter()
    run_bet([head], mask_paths=[str(reference)], threshold=0.5, n_dilate=0, no_gpu=True)
    seconds_reference = time.perf_counter() - start
    out = work / f"{stem}_segxai"
    start = time.perf_counter()
    assert segxai(["segment", head, "--model", "deepbet", "--out", str(out), "--progress", "none"]) == 0
    seconds_segxai = time.perf_counter() - start
    ours = read_volume(out / "segmentation.nii.gz")
    theirs = read_volume(reference)
    assert ours.same_grid(theirs, atol=1e-3), "the masks are not on one grid"
    return (dice(ours.array, theirs.array), seconds_reference, seconds_segxai, int((ours.array > 0).sum()),
            int((theirs.array > 0).sum()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("heads", nargs="*", default=list(HEADS))
    parser.add_argument("--work", default=None, help="keep the masks here (default: a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.work or scratch)
        work.mkdir(parents=True, exist_ok=True)
        for head in args.heads:
            value, t_ref, t_ours, n_ours, n_ref = compare(head, work)
            print(f"{Path(head).name:60s} Dice {value:.4f}  voxels segxai {n_ours} run_bet {n_ref}  "
                  f"seconds run_bet {t_ref:.1f} segxai {t_ours:.1f}", flush=True)


if __name__ == "__main__":
    main()
