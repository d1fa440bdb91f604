"""Does the cohort audit put the cases a model should not be trusted on first? (issue 5's acceptance check)

Builds a cohort of lesion cases in a T1 MRI the model never saw, degrades some copies, audits it
with exactly the commands a user would run, and prints where the degraded copies land::

    segxai synth-lesion HOST --seed N --out CASES/<host>_<N>              (clean cases)
    segxai degrade CASES/<host>_<N>/image.nii.gz --kind KIND --out ...    (noise, blur, gamma copies)
    segxai audit CASES --model MODEL --out OUT --workers W

The first ``--degraded`` seeds get one degraded copy each (kinds in turn); every case keeps its
label, so the audit also reports each score's Spearman rho and AUROC for Dice < 0.9, the
reliability probability's among them when the model has a reliability classifier.

    python benchmarks/audit_unseen.py /usr/share/mricron/templates/inia19-t1-brain.nii.gz --seeds 1:9 --degraded 6
"""

from __future__ import annotations

import argparse
import csv
import shutil
from pathlib import Path

from SegXAILib.cli import main as segxai

KINDS = ("noise", "blur", "gamma")


def build_cohort(host: str, seeds: range, degraded: int, cases: Path) -> list[str]:
    """Case folders under ``cases``; returns the names of the degraded ones."""
    stem = Path(host).name.split(".")[0]
    names = []
    for n, seed in enumerate(seeds):
        clean = cases / f"{stem}_{seed}"
        if not clean.exists():
            assert segxai(["synth-lesion", host, "--seed", str(seed), "--out", str(clean)]) == 0
        if n < degraded:
            kind = KINDS[n % len(KINDS)]
            copy = cases / f"{clean.name}_{kind}"
            if not copy.exists():
                copy.mkdir()
                assert segxai(["degrade", str(clean / "image.nii.gz"), "--kind", kind, "--seed", str(seed),
                               "--out", str(copy / "image.nii.gz")]) == 0
                shutil.copy(clean / "label.nii.gz", copy / "label.nii.gz")
            names.append(copy.name)
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("host", help="a T1 MRI file the model was not trained on")
    parser.add_argument("--seeds", default="1:9", help="FIRST:STOP of the clean cases")
    parser.add_argument("--degraded", type=int, default=6, help="how many of the seeds get a degraded copy")
    parser.add_argument("--model", default="brain-lesion-unet")
    parser.add_argument("--methods", default="protoseg,misure,tta")
    parser.add_argument("--workers", default="2")
    parser.add_argument("--out", default="audit-unseen", help="folder of the cohort and its audit (resumable)")
    args = parser.parse_args()

    first, stop = (int(v) for v in args.seeds.split(":"))
    out = Path(args.out)
    (out / "cases").mkdir(parents=True, exist_ok=True)
    degraded = set(build_cohort(args.host, range(first, stop), args.degraded, out / "cases"))
    assert segxai(["audit", str(out / "cases"), "--model", args.model, "--methods", args.methods,
                   "--out", str(out / "audit"), "--workers", args.workers, "--progress", "none"]) == 0

    with open(out / "audit" / "audit.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    half = len(rows) / 2
    print(f"\nhost: {args.host}   model: {args.model}   methods: {args.methods}\n")
    print("| rank | case | degraded | review | reasons | reliability | mean SA | Dice |\n"
          "|---|---|---|---|---|---|---|---|")
    for rank, row in enumerate(rows, 1):
        print(f"| {rank} | {row['case']} | {'yes' if row['case'] in degraded else ''} | {row['review_needed']} | "
              f"{row['review_reasons']} | {_fmt(row.get('reliability'))} | {_fmt(row.get('protoseg.mean_sa'))} | "
              f"{_fmt(row.get('dice'))} |")
    in_half = sum(rank <= half for rank, row in enumerate(rows, 1) if row["case"] in degraded)
    print(f"\ndegraded cases in the review half (ranks 1-{int(half)}): {in_half} of {len(degraded)}")
    with open(out / "audit" / "scores_vs_dice.csv", newline="", encoding="utf-8") as f:
        prediction = list(csv.DictReader(f))
    print("\n| score | cases | Spearman rho with Dice | AUROC for Dice < 0.9 |\n|---|---|---|---|")
    for row in prediction:
        print(f"| {row['score']} | {row['cases']} | {_fmt(row['spearman_rho'])} | {_fmt(row['auroc'])} |")


def _fmt(value: str | None) -> str:
    try:
        return f"{float(value):.3f}"
    except (TypeError, ValueError):
        return value or ""


if __name__ == "__main__":
    main()
