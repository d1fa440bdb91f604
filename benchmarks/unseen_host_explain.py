"""The explanation checks of issues 3 and 7 on lesions placed in a T1 MRI the models never saw.

For each seed, exactly what a user runs::

    segxai synth-lesion HOST --seed N --out DIR/N
    segxai explain DIR/N/image.nii.gz --model MODEL --methods all --out DIR/N/explain
    segxai degrade DIR/N/image.nii.gz --kind noise --seed N --out DIR/N/noisy.nii.gz
    segxai explain DIR/N/noisy.nii.gz --model MODEL --methods protoseg --out DIR/N/noisy

then, on the scan's grid, against the generated label:

- every map is on the scan's grid;
- the Grad-CAM maximum for the whole tumour lies inside the true lesion dilated by 2 voxels;
- TTA / ensemble / MC-dropout entropy is higher on the lesion border (within 1 voxel of the true
  boundary) than far from it (more than 5 voxels from the lesion);
- mean SA mu of the clean scan is above that of a noisy copy (``segxai degrade --kind noise``, its
  default SNR of about 3, as the audit's degraded cases);
- for the EU-Net: the MHEX+ CAM maximum inside the dilated lesion, the collaboration-gradient map
  finite with its zero-gradient count, and its agreement with the sampled uncertainties;
- the review verdict's reasons.

    python benchmarks/unseen_host_explain.py /usr/share/mricron/templates/inia19-t1-brain.nii.gz --seeds 1,2,3
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
from scipy import ndimage

from SegXAILib.cli import main as segxai
from SegXAILib.metrics import dice
from SegXAILib.volume import read_volume

UNCERTAINTY = ("tta", "ensemble", "mcdropout")


def check_case(case: Path, model: str, seed: int, methods: str) -> dict[str, object]:
    image, truth = read_volume(case / "image.nii.gz"), read_volume(case / "label.nii.gz").array > 0
    explained = case / "explain"
    assert segxai(["explain", str(case / "image.nii.gz"), "--model", model, "--methods", methods, "--out",
                   str(explained), "--progress", "none", "--no-report"]) == 0
    summary = json.loads((explained / "summary.json").read_text(encoding="utf-8"))
    predicted = np.isin(read_volume(explained / summary["files"]["segmentation"]).array,
                        summary["target"]["labels"])
    row: dict[str, object] = {"seed": seed, "dice": round(dice(predicted, truth), 3),
                              "review": "; ".join(summary["review"]["reasons"]) or "no"}

    maps = {(m["method"], m["variant"]): read_volume(explained / m["file"]) for m in summary["maps"]}
    row["maps on scan grid"] = f"{sum(v.same_grid(image, atol=1e-4) for v in maps.values())}/{len(maps)}"
    near_lesion = ndimage.binary_dilation(truth, iterations=2)
    for method in ("gradcam", "mhex"):
        if (method, None) in maps:
            cam = maps[(method, None)].array
            row[f"{method} max in lesion"] = bool(near_lesion[np.unravel_index(np.argmax(cam), cam.shape)])
    if ("mhex-uncertainty", None) in maps:
        collaboration = maps[("mhex-uncertainty", None)].array
        zero = next(e["scalars"]["zero_gradient_voxels"] for e in summary["explanations"]
                    if e["method"] == "mhex-uncertainty")
        row["collab finite, zero-gradient voxels"] = f"{bool(np.isfinite(collaboration).all())}, {zero:.0f}"

    border = ndimage.binary_dilation(truth, iterations=1) & ~ndimage.binary_erosion(truth, iterations=1)
    far = ~ndimage.binary_dilation(truth, iterations=5) & (image.array > np.percentile(image.array, 50))
    for method in UNCERTAINTY:
        if (method, "entropy") in maps:
            entropy = maps[(method, "entropy")].array
            row[f"{method} border/far"] = round(float(entropy[border].mean() / max(entropy[far].mean(), 1e-12)), 1)

    for name, values in summary.get("agreement", {}).get("against", {}).items():
        row[f"collab vs {name} (r)"] = round(values["pearson"], 3)
    if "protoseg" not in methods and methods != "all":
        return row
    noisy = case / "noisy.nii.gz"
    assert segxai(["degrade", str(case / "image.nii.gz"), "--kind", "noise", "--seed", str(seed),
                   "--out", str(noisy)]) == 0
    assert segxai(["explain", str(noisy), "--model", model, "--methods", "protoseg", "--out", str(case / "noisy"),
                   "--progress", "none", "--no-report"]) == 0
    noisy_summary = json.loads((case / "noisy" / "summary.json").read_text(encoding="utf-8"))
    clean_mu, noisy_mu = summary["scores"].get("protoseg.mean_sa"), noisy_summary["scores"].get("protoseg.mean_sa")
    row["mu clean > noisy"] = f"{clean_mu:.3f} > {noisy_mu:.3f}: {clean_mu > noisy_mu}"
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("host", help="a T1 MRI file the model was not trained on")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--model", default="brain-lesion-unet")
    parser.add_argument("--methods", default="all")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in [int(s) for s in args.seeds.split(",")]:
            case = Path(tmp) / str(seed)
            assert segxai(["synth-lesion", args.host, "--seed", str(seed), "--out", str(case)]) == 0
            rows.append(check_case(case, args.model, seed, args.methods))
    names = list(dict.fromkeys(k for r in rows for k in r))
    print(f"\nhost: {args.host}   model: {args.model}\n")
    print("| " + " | ".join(names) + " |\n|" + "---|" * len(names))
    for row in rows:
        print("| " + " | ".join(str(row.get(n, "")) for n in names) + " |")


if __name__ == "__main__":
    main()
